//! Errors of the data readers: each names the file (and the line, key or set) and what was expected.

use std::path::{Path, PathBuf};

use crate::image::ImageError;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: file not found")]
    NotFound { path: PathBuf },
    #[error("{path}: cannot read: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// Writing an output failed (no space, no permission, a folder in the way).
    #[error("{path}: cannot write: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{path}: malformed JSON at `{at}`: {message}")]
    Json { path: PathBuf, at: String, message: String },
    #[error("{path}:{line}: {message}")]
    Line { path: PathBuf, line: usize, message: String },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("{path}: set `{set}` has {found} images, expected {expected}")]
    SetSize { path: PathBuf, set: String, found: usize, expected: usize },
    #[error("{path}: path `{entry}` escapes the data root (absolute or containing `..`)")]
    PathEscape { path: PathBuf, entry: String },
    /// Samples that cannot be used, found before the first one was loaded.
    #[error("{bad} of {total} {what} cannot be used:\n{first}\n(mend or remove them, or leave them out with --skip-bad, which reports what it left out)")]
    Unusable { what: &'static str, bad: usize, total: usize, first: String },
    /// In a data-parallel run: a batch another rank could not load (that rank reports the sample),
    /// or batches of unequal sizes.
    #[error("{0}")]
    OtherRank(String),
    /// A WebDataset shard (a tar file) that cannot be read as one: not a tar archive, a damaged or
    /// truncated entry (the message names the entry and its byte offset), or a shard list that
    /// does not fit the run (too few shards for the ranks, a file changed since it was scanned).
    #[error("{path}: {message}")]
    Shard { path: PathBuf, message: String },
    /// One sample of a WebDataset shard that cannot be used (no image, no caption, malformed JSON),
    /// named by its shard and key.
    #[error("{path}: sample {key}: {message}")]
    Sample { path: PathBuf, key: String, message: String },
    /// An image of a WebDataset sample that cannot be decoded; the image error names the member
    /// (`<key>.<ext>`) within the shard. Boxed: every reader returns this error type, which stays
    /// small.
    #[error("{path}: sample {key}: {source}")]
    SampleImage { path: PathBuf, key: String, source: Box<ImageError> },
    /// A split with nothing in it where a task needs items (a classification test split left with
    /// no image by a 70/30 split of one image per class, or by --skip-bad): an accuracy over no
    /// item would read 0 % as if measured.
    #[error("{what} holds no images{detail}: there is nothing to evaluate or train on")]
    EmptySplit { what: String, detail: String },
    /// The folder a job would write is locked by another job that is still running (or whose
    /// process cannot be checked from here: another host). Two jobs writing one folder would leave
    /// it holding parts of each.
    #[error(
        "{dir} is in use by another job: {} — wait for it to end, or write elsewhere (if no such job is \
         running, delete {})",
        holder,
        dir.join(crate::lock::LOCK_FILE).display()
    )]
    Locked { dir: PathBuf, holder: Box<crate::lock::LockHolder> },
    /// A caption or description that cannot be trained on or scored (it cleans to nothing, or the
    /// tokenizer refuses it), named by where it is (`<image>, caption 2`, `<split>: set.target`).
    /// Boxed, as the image error of a sample: every reader returns this error type, which stays small.
    #[error("{what}: {source}")]
    Text { what: String, source: Box<crate::text::TextError> },
    /// A data set named on the command line in a form that is not understood.
    #[error("data set `{spec}`: {message}")]
    Spec { spec: String, message: String },
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

impl DataError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        match source.kind() {
            std::io::ErrorKind::NotFound => Self::NotFound { path: path.to_owned() },
            _ => Self::Io { path: path.to_owned(), source },
        }
    }

    pub(crate) fn write(path: &Path, source: std::io::Error) -> Self {
        Self::Write { path: path.to_owned(), source }
    }

    pub(crate) fn format(path: &Path, message: impl Into<String>) -> Self {
        Self::Format { path: path.to_owned(), message: message.into() }
    }

    pub(crate) fn shard(path: &Path, message: impl Into<String>) -> Self {
        Self::Shard { path: path.to_owned(), message: message.into() }
    }

    pub(crate) fn line(path: &Path, line: usize, message: impl Into<String>) -> Self {
        Self::Line { path: path.to_owned(), line, message: message.into() }
    }
}

/// Reads a whole file, transparently gunzipping `*.gz`.
pub(crate) fn read_bytes(path: &Path) -> Result<Vec<u8>, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    if path.extension().is_some_and(|e| e == "gz") {
        use std::io::Read;
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_end(&mut out)
            .map_err(|e| DataError::format(path, format!("bad gzip data: {e}")))?;
        Ok(out)
    } else {
        Ok(bytes)
    }
}

pub(crate) fn read_text(path: &Path) -> Result<String, DataError> {
    let bytes = read_bytes(path)?;
    let text = String::from_utf8(bytes).map_err(|e| DataError::format(path, format!("not UTF-8 text: {e}")))?;
    // A UTF-8 byte-order mark (Excel writes one) is not content.
    Ok(text.strip_prefix('\u{feff}').map(str::to_string).unwrap_or(text))
}

/// Parses JSON into `T`, naming the path of the offending value.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T, DataError> {
    let mut de = serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(&mut de).map_err(|e| DataError::Json {
        path: path.to_owned(),
        at: e.path().to_string(),
        message: e.into_inner().to_string(),
    })
}

/// Joins `entry` (a path from a data file) to `root`, refusing absolute paths and `..` so a data file
/// cannot reach outside its root.
pub fn resolve_under(root: &Path, entry: &str, file: &Path) -> Result<PathBuf, DataError> {
    use std::path::Component;
    let rel = Path::new(entry);
    let escapes = entry.is_empty()
        || rel.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        || entry.contains('\\') && entry.split('\\').any(|p| p == "..");
    if escapes {
        return Err(DataError::PathEscape { path: file.to_owned(), entry: entry.to_string() });
    }
    Ok(root.join(rel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_cannot_escape_the_root() {
        let f = Path::new("data.json");
        assert!(resolve_under(Path::new("/data"), "a/b.jpg", f).is_ok());
        assert!(resolve_under(Path::new("/data"), "./a.jpg", f).is_ok());
        for bad in ["../x.jpg", "a/../../x.jpg", "/etc/passwd", "", "..\\..\\x.jpg"] {
            assert!(matches!(resolve_under(Path::new("/data"), bad, f), Err(DataError::PathEscape { .. })), "{bad}");
        }
    }
}

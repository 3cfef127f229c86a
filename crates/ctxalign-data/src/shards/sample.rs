//! WebDataset samples: consecutive tar entries that share a key, and the two ways ctxalign reads
//! them (a captioned image, an IMAGECODE set).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::tar::{TarEntry, TarReader};
use crate::error::DataError;
use crate::imagecode::{SetKind, SET_SIZE};

/// The image extensions a captioned sample may hold, in the order the first present is taken.
pub const IMAGE_EXTENSIONS: [&str; 8] = ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"];

/// One WebDataset sample: the files of consecutive tar entries with the same key.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WdsSample {
    /// The entries' path up to the first `.` of the file name (folder part kept): `a/b/x01` for
    /// `a/b/x01.img0.jpg`.
    pub key: String,
    /// Extension (the rest of the file name after that `.`, lower-cased: `img0.jpg`) → contents.
    pub files: BTreeMap<String, Vec<u8>>,
}

/// Splits a tar entry's path into WebDataset's key and extension: the key is the path up to the
/// first `.` of the file name (the folder part kept), the extension the rest, lower-cased
/// (`abc.img0.JPG` → (`abc`, `img0.jpg`)). A file name without a `.` has an empty extension.
pub fn split_key(name: &str) -> (&str, String) {
    let base_start = name.rfind('/').map_or(0, |i| i + 1);
    match name[base_start..].find('.') {
        Some(dot) => (&name[..base_start + dot], name[base_start + dot + 1..].to_lowercase()),
        None => (name, String::new()),
    }
}

/// Groups the entries of a tar archive into [`WdsSample`]s, in archive order.
///
/// Errors come in two kinds. A [`DataError::Sample`] concerns that sample alone (a file that
/// appears twice in it, a file without an extension) and reading goes on with the next one; any
/// other error (a damaged or truncated archive, [`DataError::Shard`]) ends the stream, and the
/// sample being gathered when it happened is not yielded (it may be incomplete).
pub struct SampleReader<R: Read> {
    tar: TarReader<R>,
    /// The first entry of the next sample, read while finding the end of the current one.
    pending: Option<TarEntry>,
    done: bool,
}

impl<R: Read> SampleReader<R> {
    /// The samples of the archive `inner`; `path` names it in errors.
    pub fn new(inner: R, path: impl Into<PathBuf>) -> Self {
        Self { tar: TarReader::new(inner, path), pending: None, done: false }
    }

    /// The archive's name, as given.
    pub fn path(&self) -> &Path {
        self.tar.path()
    }

    fn sample_error(&self, key: &str, message: String) -> DataError {
        DataError::Sample { path: self.tar.path().to_owned(), key: key.to_string(), message }
    }
}

impl SampleReader<std::io::BufReader<std::fs::File>> {
    /// The samples of the shard file at `path`.
    pub fn open(path: &Path) -> Result<Self, DataError> {
        let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
        Ok(Self::new(std::io::BufReader::with_capacity(1 << 20, file), path))
    }
}

impl<R: Read> Iterator for SampleReader<R> {
    type Item = Result<WdsSample, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let first = match self.pending.take().map(Ok).or_else(|| self.tar.next()) {
            None => {
                self.done = true;
                return None;
            }
            Some(Err(e)) => {
                self.done = true;
                return Some(Err(e));
            }
            Some(Ok(entry)) => entry,
        };
        let key = split_key(&first.name).0.to_string();
        let mut sample = WdsSample { key, files: BTreeMap::new() };
        let mut defects: Vec<String> = Vec::new();
        let mut add = |sample: &mut WdsSample, entry: TarEntry| {
            let (_, ext) = split_key(&entry.name);
            if ext.is_empty() {
                defects.push(format!("the file `{}` (byte {}) has no extension", entry.name, entry.offset));
                return;
            }
            match sample.files.entry(ext) {
                std::collections::btree_map::Entry::Vacant(slot) => {
                    slot.insert(entry.data);
                }
                std::collections::btree_map::Entry::Occupied(_) => {
                    defects.push(format!("the file `{}` (byte {}) appears twice", entry.name, entry.offset))
                }
            }
        };
        add(&mut sample, first);
        loop {
            match self.tar.next() {
                None => break,
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(e));
                }
                Some(Ok(entry)) if split_key(&entry.name).0 == sample.key => add(&mut sample, entry),
                Some(Ok(entry)) => {
                    self.pending = Some(entry);
                    break;
                }
            }
        }
        match defects.is_empty() {
            true => Some(Ok(sample)),
            false => Some(Err(self.sample_error(&sample.key, defects.join("; ")))),
        }
    }
}

/// What a captioned-image sample holds.
#[derive(Debug, Clone, PartialEq)]
pub struct CaptionedSample<'a> {
    /// The image's extension (the first of [`IMAGE_EXTENSIONS`] present) and bytes.
    pub image_ext: &'a str,
    /// The image file's bytes, as stored.
    pub image: &'a [u8],
    /// At least one, none blank.
    pub captions: Vec<String>,
}

/// What an IMAGECODE sample (one set) holds.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageCodeSample<'a> {
    /// The set's name (`json`'s `set`).
    pub set: String,
    /// Video or static, from the set's name ([`SetKind::of`]).
    pub kind: SetKind,
    /// The ten candidates `(extension, bytes)` in index order: `img<N>.<ext>` sorted by the number
    /// N (never by text: `img10` follows `img9`).
    pub images: Vec<(&'a str, &'a [u8])>,
    /// The descriptions in file order, with their target index (`None` in an unlabeled split).
    pub descriptions: Vec<(Option<usize>, String)>,
}

impl WdsSample {
    /// Reads the sample as a captioned image: the image is the first of [`IMAGE_EXTENSIONS`]
    /// present; the captions come from `json` (`{"captions": [...]}`, `{"caption": "..." | [...]}`
    /// or `{"text": "..." | [...]}`, the first of these keys present), else from `txt` (one caption,
    /// trimmed). The error says what is missing or malformed.
    pub fn captioned(&self) -> Result<CaptionedSample<'_>, String> {
        let Some((image_ext, image)) =
            IMAGE_EXTENSIONS.iter().find_map(|ext| self.files.get_key_value(*ext)).map(|(e, b)| (e.as_str(), &b[..]))
        else {
            return Err(format!(
                "no image (one of {}; the sample has {})",
                IMAGE_EXTENSIONS.join(", "),
                self.listing()
            ));
        };
        let mut captions = None;
        if let Some(json) = self.files.get("json") {
            let value = parse_json_object(json)?;
            for key in ["captions", "caption", "text"] {
                if let Some(v) = value.get(key) {
                    captions = Some(strings(v).ok_or_else(|| {
                        format!("json: `{key}` must be a string or a list of strings, not {}", kind_of(v))
                    })?);
                    break;
                }
            }
        }
        let captions = match captions {
            Some(c) => c,
            None => match self.files.get("txt") {
                Some(txt) => {
                    let text = std::str::from_utf8(txt).map_err(|e| format!("txt: not UTF-8 text: {e}"))?;
                    vec![text.trim().to_string()]
                }
                None => {
                    return Err(format!(
                        "no caption (no `txt`, and no caption in `json`; the sample has {})",
                        self.listing()
                    ))
                }
            },
        };
        if captions.is_empty() {
            return Err("no caption (an empty list)".into());
        }
        if let Some(i) = captions.iter().position(|c| c.trim().is_empty()) {
            return Err(format!("caption {i} is empty"));
        }
        Ok(CaptionedSample { image_ext, image, captions })
    }

    /// Reads the sample as an IMAGECODE set: `img<N>.<ext>` candidates (exactly ten, ordered by the
    /// number N) and `json` = `{"set": name, "descriptions": {"<target index>": "...", ...}}`
    /// (labeled) or `{"set": name, "descriptions": ["...", ...]}` (unlabeled). Every description
    /// must hold a word; targets must be 0..9. The error says what is missing or malformed.
    pub fn imagecode(&self) -> Result<ImageCodeSample<'_>, String> {
        let mut numbered: Vec<(u64, &str, &[u8])> = Vec::new();
        for (ext, bytes) in &self.files {
            let Some(rest) = ext.strip_prefix("img") else { continue };
            let Some((number, image_ext)) = rest.split_once('.') else { continue };
            let Ok(n) = number.parse::<u64>() else { continue };
            if !IMAGE_EXTENSIONS.contains(&image_ext) {
                return Err(format!("`{ext}`: not an image extension ({})", IMAGE_EXTENSIONS.join(", ")));
            }
            numbered.push((n, ext.as_str(), &bytes[..]));
        }
        numbered.sort_by_key(|(n, _, _)| *n);
        if let Some(w) = numbered.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(format!("two candidates share number {}: `{}` and `{}`", w[0].0, w[0].1, w[1].1));
        }
        if numbered.len() != SET_SIZE {
            return Err(format!(
                "{} candidate images (`img<N>.<ext>`), expected {SET_SIZE}; the sample has {}",
                numbered.len(),
                self.listing()
            ));
        }
        let Some(json) = self.files.get("json") else {
            return Err(format!("no `json` with the set's descriptions; the sample has {}", self.listing()));
        };
        let value = parse_json_object(json)?;
        let set = match value.get("set") {
            Some(serde_json::Value::String(s)) if !s.trim().is_empty() => s.clone(),
            Some(v) => return Err(format!("json: `set` must be the set's name, not {}", kind_of(v))),
            None => return Err("json: no `set` (the set's name)".into()),
        };
        let mut descriptions = Vec::new();
        match value.get("descriptions") {
            Some(serde_json::Value::Object(map)) => {
                for (target, text) in map {
                    let t: usize = target
                        .parse()
                        .ok()
                        .filter(|&t| t < SET_SIZE)
                        .ok_or_else(|| format!("json: descriptions: target `{target}` is not an index 0..9"))?;
                    descriptions.push((Some(t), description(text, &format!("descriptions.{target}"))?));
                }
            }
            Some(serde_json::Value::Array(list)) => {
                for (i, text) in list.iter().enumerate() {
                    descriptions.push((None, description(text, &format!("descriptions[{i}]"))?));
                }
            }
            Some(v) => {
                return Err(format!(
                    "json: `descriptions` must be {{\"<target>\": \"...\"}} or [\"...\"], not {}",
                    kind_of(v)
                ))
            }
            None => return Err("json: no `descriptions`".into()),
        }
        if descriptions.is_empty() {
            return Err("json: the set has no description".into());
        }
        let images = numbered.into_iter().map(|(_, ext, bytes)| (ext, bytes)).collect();
        Ok(ImageCodeSample { kind: SetKind::of(&set), set, images, descriptions })
    }

    /// `jpg, json, txt`: the sample's extensions, for messages.
    fn listing(&self) -> String {
        if self.files.is_empty() {
            return "no files".into();
        }
        self.files.keys().map(|k| if k.is_empty() { "(no extension)" } else { k }).collect::<Vec<_>>().join(", ")
    }
}

/// One description, which must hold a word (as `imagecode.rs` requires of its files).
fn description(value: &serde_json::Value, at: &str) -> Result<String, String> {
    match value {
        serde_json::Value::String(s) if s.chars().any(char::is_alphanumeric) => Ok(s.clone()),
        serde_json::Value::String(s) => Err(format!("json: {at}: the description {s:?} has no word")),
        v => Err(format!("json: {at}: a description must be a string, not {}", kind_of(v))),
    }
}

fn parse_json_object(bytes: &[u8]) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("json: not UTF-8 text: {e}"))?;
    match serde_json::from_str(text.strip_prefix('\u{feff}').unwrap_or(text)) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(v) => Err(format!("json: expected an object, found {}", kind_of(&v))),
        Err(e) => Err(format!("json: malformed: {e}")),
    }
}

/// A string or a list of strings.
fn strings(value: &serde_json::Value) -> Option<Vec<String>> {
    match value {
        serde_json::Value::String(s) => Some(vec![s.clone()]),
        serde_json::Value::Array(list) => list.iter().map(|v| v.as_str().map(String::from)).collect(),
        _ => None,
    }
}

fn kind_of(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_extensions() {
        assert_eq!(split_key("abc.img0.JPG"), ("abc", "img0.jpg".to_string()));
        assert_eq!(split_key("a.b/c/x01.txt"), ("a.b/c/x01", "txt".to_string()));
        assert_eq!(split_key("noext"), ("noext", String::new()));
    }

    fn sample(files: &[(&str, &[u8])]) -> WdsSample {
        WdsSample { key: "k".into(), files: files.iter().map(|(e, b)| (e.to_string(), b.to_vec())).collect() }
    }

    #[test]
    fn captions_come_from_json_then_txt() {
        let s = sample(&[("png", b"P"), ("jpg", b"J"), ("txt", b"  a cat \n")]);
        let c = s.captioned().unwrap();
        assert_eq!((c.image_ext, c.image, c.captions), ("jpg", &b"J"[..], vec!["a cat".to_string()]));
        let s = sample(&[("png", b"P"), ("json", br#"{"captions": ["x", "y"]}"#), ("txt", b"z")]);
        assert_eq!(s.captioned().unwrap().captions, ["x", "y"]);
        let s = sample(&[("png", b"P"), ("json", br#"{"id": 3}"#), ("txt", b"z")]);
        assert_eq!(s.captioned().unwrap().captions, ["z"], "a json without captions falls back to txt");
        assert!(sample(&[("txt", b"z")]).captioned().unwrap_err().contains("no image"));
        assert!(sample(&[("png", b"P")]).captioned().unwrap_err().contains("no caption"));
        assert!(sample(&[("png", b"P"), ("txt", b" ")]).captioned().unwrap_err().contains("empty"));
        assert!(sample(&[("png", b"P"), ("txt", b"\xff")]).captioned().unwrap_err().contains("UTF-8"));
        assert!(sample(&[("png", b"P"), ("json", b"{")]).captioned().unwrap_err().contains("malformed"));
    }

    #[test]
    fn imagecode_candidates_sort_by_number() {
        let mut files: Vec<(String, Vec<u8>)> =
            [0, 1, 2, 3, 4, 5, 6, 7, 9, 12].iter().map(|n| (format!("img{n}.png"), vec![*n as u8])).collect();
        files.push(("json".into(), br#"{"set": "open-images-x", "descriptions": {"9": "the last one"}}"#.to_vec()));
        let s = WdsSample { key: "k".into(), files: files.into_iter().collect() };
        let set = s.imagecode().unwrap();
        assert_eq!(set.images.iter().map(|(_, b)| b[0]).collect::<Vec<_>>(), [0, 1, 2, 3, 4, 5, 6, 7, 9, 12]);
        assert_eq!(set.descriptions, [(Some(9), "the last one".to_string())]);
        assert_eq!(set.kind, SetKind::Static);
    }
}

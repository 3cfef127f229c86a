//! Writing shards: [`ShardWriter`] (WebDataset's `ShardWriter`), and the writers of caption data
//! and IMAGECODE splits.

use std::collections::BTreeMap;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use super::sample::{split_key, WdsSample, IMAGE_EXTENSIONS};
use super::tar::{TarWriter, BLOCK};
use crate::captions::CaptionedImage;
use crate::error::DataError;
use crate::image::{check_image_bytes, DecodeOptions};
use crate::imagecode::ImageCodeSplit;
use crate::loader::{find_unusable, BadInputPolicy, Skipped};
use crate::lock::FolderLock;

/// The key of the `n`-th sample a writer of this module writes: nine digits, zero-padded.
pub fn sample_key(n: usize) -> String {
    format!("{n:09}")
}

/// One shard written.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WrittenShard {
    pub path: PathBuf,
    /// Samples in the shard.
    pub samples: usize,
    /// File size (the end-of-archive blocks included).
    pub bytes: u64,
}

/// The shards a [`ShardWriter`] wrote, in order.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WrittenShards {
    /// The output folder.
    pub dir: PathBuf,
    /// The shard names' prefix (`<prefix>-000000.tar`).
    pub prefix: String,
    /// In number order.
    pub shards: Vec<WrittenShard>,
}

impl WrittenShards {
    /// Samples in all shards.
    pub fn samples(&self) -> usize {
        self.shards.iter().map(|s| s.samples).sum()
    }

    /// Bytes of all shards.
    pub fn bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.bytes).sum()
    }

    /// The brace pattern naming every shard written (`out/shards-{000000..000007}.tar`; the one
    /// name when there is one shard, or none), for [`super::expand_shards`].
    pub fn pattern(&self) -> String {
        let name = match self.shards.len() {
            0 | 1 => shard_name(&self.prefix, 0),
            n => format!("{}-{{{:06}..{:06}}}.tar", self.prefix, 0, n - 1),
        };
        self.dir.join(name).display().to_string()
    }
}

/// `<prefix>-<number, 6 digits or more>.tar`.
fn shard_name(prefix: &str, number: usize) -> String {
    format!("{prefix}-{number:06}.tar")
}

/// The number of a file named `<prefix>-<digits>.tar`.
fn shard_number(prefix: &str, name: &str) -> Option<usize> {
    let digits = name.strip_prefix(prefix)?.strip_prefix('-')?.strip_suffix(".tar")?;
    (digits.len() >= 6 && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok()).flatten()
}

/// The shard being written: a temporary file in the output folder, renamed when complete.
struct OpenShard {
    path: PathBuf,
    tmp: PathBuf,
    tar: TarWriter<BufWriter<std::fs::File>>,
    samples: usize,
}

/// Writes samples into numbered tar shards, WebDataset's `ShardWriter`: `<prefix>-000000.tar`,
/// `<prefix>-000001.tar`, … in an output folder, a new shard when the current one holds
/// `max_count` samples or the next sample would take it past `max_bytes` (a sample larger than
/// that gets a shard of its own). Each shard is written to a temporary file and renamed when
/// complete (and synced), so a crash never leaves a half-written shard under a shard's name.
///
/// A folder that already holds shards with the prefix is refused unless `overwrite` is given;
/// then the old shards are replaced, and those numbered past the new last one removed at
/// [`ShardWriter::finish`]. The writer holds the folder's lock ([`FolderLock`]) while it lives:
/// a second writer into the same folder is refused instead of interleaving its shards.
pub struct ShardWriter {
    /// Held until the writer is dropped (after `finish`, or on an error).
    _lock: FolderLock,
    dir: PathBuf,
    prefix: String,
    max_count: usize,
    max_bytes: u64,
    /// Shards of the prefix found in the folder before writing (their numbers and paths).
    existing: Vec<(usize, PathBuf)>,
    current: Option<OpenShard>,
    written: Vec<WrittenShard>,
}

impl ShardWriter {
    /// A writer into `dir` (created). `max_count` ≥ 1 samples and `max_bytes` bytes at most per
    /// shard.
    pub fn create(
        dir: &Path,
        prefix: &str,
        max_count: usize,
        max_bytes: u64,
        overwrite: bool,
    ) -> Result<Self, DataError> {
        let bad = |message: String| DataError::Shard { path: dir.to_owned(), message };
        if prefix.is_empty() || prefix.contains(['/', '\\', '\0']) || prefix.starts_with('.') {
            return Err(bad(format!("`{prefix}` cannot prefix shard names (empty, a path, or hidden)")));
        }
        if max_count == 0 {
            return Err(bad("a shard must hold at least one sample (max count 0)".into()));
        }
        let lock = FolderLock::acquire(dir, "shards")?;
        let mut existing = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
            let entry = entry.map_err(|e| DataError::io(dir, e))?;
            if let Some(n) = entry.file_name().to_str().and_then(|name| shard_number(prefix, name)) {
                existing.push((n, entry.path()));
            }
        }
        existing.sort();
        if !existing.is_empty() && !overwrite {
            return Err(bad(format!(
                "already holds {} shard(s) named {prefix}-NNNNNN.tar; choose another folder or prefix, or overwrite them",
                existing.len()
            )));
        }
        Ok(Self {
            _lock: lock,
            dir: dir.to_owned(),
            prefix: prefix.to_string(),
            max_count,
            max_bytes,
            existing,
            current: None,
            written: vec![],
        })
    }

    /// Appends `sample` (its files as `<key>.<ext>`, in extension order). The key must be a
    /// relative path whose file name has no `.`; extensions must be non-empty, without `/`.
    pub fn write(&mut self, sample: &WdsSample) -> Result<(), DataError> {
        let dir = self.dir.clone();
        let bad = |message: String| DataError::Sample { path: dir.clone(), key: sample.key.clone(), message };
        if sample.files.is_empty() {
            return Err(bad("a sample needs at least one file".into()));
        }
        let names: Vec<String> = sample.files.keys().map(|ext| format!("{}.{ext}", sample.key)).collect();
        for (name, ext) in names.iter().zip(sample.files.keys()) {
            let (key, read_ext) = split_key(name);
            if key != sample.key || read_ext != *ext || ext.is_empty() || name.starts_with('/') {
                return Err(bad(format!(
                    "`{name}` would not read back as key `{}` and extension `{ext}` (keys have no `.` in their file \
                     name; extensions are lower-case, non-empty, without `/`)",
                    sample.key
                )));
            }
        }
        let size: u64 = names
            .iter()
            .zip(sample.files.values())
            .map(|(n, d)| TarWriter::<Vec<u8>>::entry_size(n, d.len() as u64))
            .sum();
        let full = self
            .current
            .as_ref()
            .is_some_and(|c| c.samples >= self.max_count || c.tar.written() + size + 2 * BLOCK as u64 > self.max_bytes);
        if full {
            self.close_current()?;
        }
        if self.current.is_none() {
            self.open_next()?;
        }
        let Some(current) = self.current.as_mut() else {
            return Err(bad("no shard is open".into()));
        };
        for (name, data) in names.iter().zip(sample.files.values()) {
            current.tar.append(name, data).map_err(|e| DataError::write(&current.tmp, e))?;
        }
        current.samples += 1;
        Ok(())
    }

    fn open_next(&mut self) -> Result<(), DataError> {
        let path = self.dir.join(shard_name(&self.prefix, self.written.len()));
        let (_, tmp) = crate::staging(&path)?;
        let file = std::fs::File::create(&tmp).map_err(|e| DataError::write(&tmp, e))?;
        let tar = TarWriter::new(BufWriter::with_capacity(1 << 20, file));
        self.current = Some(OpenShard { path, tmp, tar, samples: 0 });
        Ok(())
    }

    /// Ends the current shard: end blocks, sync, rename over its name.
    fn close_current(&mut self) -> Result<(), DataError> {
        let Some(OpenShard { path, tmp, tar, samples }) = self.current.take() else { return Ok(()) };
        let done = tar
            .finish()
            .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
            .and_then(|f| f.sync_all().map(|_| f))
            .map_err(|e| DataError::write(&tmp, e))
            .and_then(|f| {
                let bytes = f.metadata().map_err(|e| DataError::io(&tmp, e))?.len();
                std::fs::rename(&tmp, &path).map_err(|e| DataError::write(&path, e))?;
                Ok(bytes)
            });
        match done {
            Ok(bytes) => {
                crate::sync_dir(&self.dir);
                self.written.push(WrittenShard { path, samples, bytes });
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// Writes the last shard and removes, when overwriting, the folder's older shards numbered past
    /// it; returns what was written.
    pub fn finish(mut self) -> Result<WrittenShards, DataError> {
        self.close_current()?;
        for (n, path) in std::mem::take(&mut self.existing) {
            if n >= self.written.len() {
                std::fs::remove_file(&path).map_err(|e| DataError::write(&path, e))?;
            }
        }
        crate::sync_dir(&self.dir);
        Ok(WrittenShards {
            dir: self.dir.clone(),
            prefix: self.prefix.clone(),
            shards: std::mem::take(&mut self.written),
        })
    }
}

impl Drop for ShardWriter {
    /// A writer dropped before [`ShardWriter::finish`] (an error part-way) leaves no temporary file.
    fn drop(&mut self) {
        if let Some(current) = self.current.take() {
            let _ = std::fs::remove_file(&current.tmp);
        }
    }
}

/// How the data writers shard.
#[derive(Debug, Clone)]
pub struct ShardOptions {
    /// Shard names: `<prefix>-000000.tar`, ….
    pub prefix: String,
    /// Samples per shard at most.
    pub max_count: usize,
    /// Bytes per shard at most (a larger sample gets a shard of its own).
    pub max_bytes: u64,
    /// Replace the shards of the prefix already in the folder.
    pub overwrite: bool,
    /// Bad inputs (missing or damaged images, no caption, incomplete sets), all found before
    /// anything is written: an error, or left out and reported.
    pub policy: BadInputPolicy,
    /// Limits the images are checked against.
    pub decode: DecodeOptions,
}

impl Default for ShardOptions {
    fn default() -> Self {
        Self {
            prefix: "shards".into(),
            max_count: 1000,
            max_bytes: 1 << 30,
            overwrite: false,
            policy: BadInputPolicy::Fail,
            decode: DecodeOptions::default(),
        }
    }
}

/// What a data writer did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ShardWriteReport {
    /// The shards written.
    pub written: WrittenShards,
    /// Inputs left out under [`BadInputPolicy::Skip`]: their index in the input (a captioned
    /// image, or a set in first-appearance order) and why.
    pub left_out: Vec<Skipped>,
}

/// The extension an image is stored under: its own, lower-cased, when a shard reader takes it,
/// else that of the format its bytes are in.
fn image_extension(path: &Path, bytes: &[u8]) -> Result<String, DataError> {
    let own = path.extension().and_then(|e| e.to_str()).map(str::to_lowercase);
    if let Some(ext) = own.filter(|e| IMAGE_EXTENSIONS.contains(&e.as_str())) {
        return Ok(ext);
    }
    use image::ImageFormat as F;
    let ext = match image::guess_format(bytes) {
        Ok(F::Jpeg) => "jpg",
        Ok(F::Png) => "png",
        Ok(F::WebP) => "webp",
        Ok(F::Bmp) => "bmp",
        Ok(F::Gif) => "gif",
        Ok(F::Tiff) => "tiff",
        _ => {
            let message = format!("not an image format shards hold ({})", IMAGE_EXTENSIONS.join(", "));
            return Err(DataError::format(path, message));
        }
    };
    Ok(ext.to_string())
}

fn read_image(path: &Path) -> Result<(String, Vec<u8>), DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    Ok((image_extension(path, &bytes)?, bytes))
}

/// Writes captioned images as shards, one sample per image: the image file's bytes unchanged
/// under its own extension, `txt` = its first caption, `json` = `{"captions": [...], "image":
/// "<path relative to image_root>"}` (the path as given when it is not under the root). Keys are
/// the written samples' numbers ([`sample_key`]). Every image is checked before anything is
/// written (it exists, its header is sound, it has a caption): under [`BadInputPolicy::Fail`] a
/// bad one is an error, under [`BadInputPolicy::Skip`] it is left out and reported.
pub fn write_caption_shards(
    items: &[CaptionedImage],
    image_root: &Path,
    out: &Path,
    options: &ShardOptions,
) -> Result<ShardWriteReport, DataError> {
    let check = |item: &CaptionedImage| -> Result<(), DataError> {
        if item.captions.is_empty() || item.captions.iter().any(|c| c.trim().is_empty()) {
            return Err(DataError::format(&item.image, "an empty caption or none"));
        }
        let (_, bytes) = read_image(&item.image)?;
        check_image_bytes(&bytes, &item.image, options.decode)?;
        Ok(())
    };
    let name = |item: &CaptionedImage| format!("image {}", item.image.display());
    let left_out = find_unusable(items, "captioned images", options.policy, name, check)?;
    let skip: std::collections::HashSet<usize> = left_out.iter().map(|s| s.index).collect();
    if items.is_empty() {
        return Err(DataError::shard(out, "no captioned images to write"));
    }
    let mut writer =
        ShardWriter::create(out, &options.prefix, options.max_count, options.max_bytes, options.overwrite)?;
    for (n, item) in items.iter().enumerate().filter(|(i, _)| !skip.contains(i)).map(|(_, it)| it).enumerate() {
        let (ext, bytes) = read_image(&item.image)?;
        let rel = item.image.strip_prefix(image_root).unwrap_or(&item.image);
        let json = serde_json::json!({
            "captions": item.captions,
            "image": rel.to_string_lossy().replace('\\', "/"),
        });
        let mut files = BTreeMap::new();
        files.insert(ext, bytes);
        files.insert("txt".to_string(), item.captions[0].clone().into_bytes());
        files.insert("json".to_string(), json.to_string().into_bytes());
        writer.write(&WdsSample { key: sample_key(n), files })?;
    }
    Ok(ShardWriteReport { written: writer.finish()?, left_out })
}

/// Writes an IMAGECODE split as shards, one sample per set: its ten images as `img<i>.<ext>` (i
/// the candidate index, 0..9, in IMAGECODE's numeric order) and `json` = `{"set": name,
/// "descriptions": {"<target>": "...", ...}}` (labeled) or `{"set": name, "descriptions": [...]}`
/// (unlabeled), descriptions in file order. Sets are checked first ([`ImageCodeSplit::checked`]):
/// under [`BadInputPolicy::Fail`] a bad one is an error, under [`BadInputPolicy::Skip`] it is
/// left out and reported (its index among the split's sets).
pub fn write_imagecode_shards(
    split: &ImageCodeSplit,
    out: &Path,
    options: &ShardOptions,
) -> Result<ShardWriteReport, DataError> {
    let all_sets: Vec<String> = split.sets().into_iter().map(String::from).collect();
    if all_sets.is_empty() {
        return Err(DataError::shard(out, format!("{} holds no set to write", split.source.display())));
    }
    let (checked, bad_sets) = split.clone().checked(options.decode, options.policy)?;
    let left_out: Vec<Skipped> = bad_sets
        .iter()
        .map(|b| Skipped {
            index: all_sets.iter().position(|s| *s == b.set).unwrap_or(usize::MAX),
            error: b.error.clone(),
        })
        .collect();
    let mut writer =
        ShardWriter::create(out, &options.prefix, options.max_count, options.max_bytes, options.overwrite)?;
    for (n, set) in checked.sets().into_iter().enumerate() {
        let examples: Vec<_> = checked.examples.iter().filter(|e| e.set == set).collect();
        let descriptions = if examples.iter().all(|e| e.target.is_some()) {
            let mut map = serde_json::Map::new();
            for e in &examples {
                let t = e.target.unwrap_or_default().to_string();
                if map.insert(t.clone(), e.description.clone().into()).is_some() {
                    let message =
                        format!("set `{set}` has two descriptions of target {t}; a shard holds one per target");
                    return Err(DataError::format(&checked.source, message));
                }
            }
            serde_json::Value::Object(map)
        } else if examples.iter().all(|e| e.target.is_none()) {
            examples.iter().map(|e| serde_json::Value::from(e.description.clone())).collect()
        } else {
            let message = format!("set `{set}` mixes labeled and unlabeled descriptions");
            return Err(DataError::format(&checked.source, message));
        };
        let mut files = BTreeMap::new();
        for (i, path) in checked.set_images(set)?.iter().enumerate() {
            let (ext, bytes) = read_image(path)?;
            files.insert(format!("img{i}.{ext}"), bytes);
        }
        let json = serde_json::json!({ "set": set, "descriptions": descriptions });
        files.insert("json".to_string(), json.to_string().into_bytes());
        writer.write(&WdsSample { key: sample_key(n), files })?;
    }
    Ok(ShardWriteReport { written: writer.finish()?, left_out })
}

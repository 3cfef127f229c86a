//! Caption data: BLIP/ALBEF caption JSON (COCO, VG, …), Flickr8k `captions.txt` / `Flickr8k.token.txt`,
//! and Karpathy split files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

use crate::error::{parse_json, read_text, resolve_under, DataError};

/// One image with its captions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CaptionedImage {
    /// Resolved under the image root.
    pub image: PathBuf,
    pub captions: Vec<String>,
    /// The group of near-identical images this one belongs to (caption JSON's optional `"group"`),
    /// whose captions are each false of the group's other images. The training loaders keep a
    /// group's images together in a batch ([`crate::loader::Dataset::group`]), so that they are each
    /// other's hard negatives; `None`: a group of its own.
    pub group: Option<String>,
}

impl CaptionedImage {
    /// An image with its captions, in no group.
    pub fn new(image: PathBuf, captions: Vec<String>) -> Self {
        Self { image, captions, group: None }
    }

    /// The same image with its first caption alone (in Vignettes data: the listing of every object
    /// and the background).
    pub fn first_caption_only(&self) -> Self {
        Self { captions: self.captions.iter().take(1).cloned().collect(), ..self.clone() }
    }
}

/// `"caption"` or `["caption", ...]`. Deserialised by hand rather than as an untagged enum, whose
/// only message is "did not match any variant".
struct OneOrMany(Vec<String>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a caption: a string or a list of strings")
            }
            fn visit_str<E: serde::de::Error>(self, caption: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![caption.to_string()]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<OneOrMany, A::Error> {
                Ok(OneOrMany(Deserialize::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))?))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[derive(Deserialize)]
struct CaptionRecord {
    image: String,
    caption: OneOrMany,
    #[serde(default)]
    group: Option<String>,
}

/// Reads BLIP's caption JSON: `[{"image": "<path under image_root>", "caption": "…" | ["…", …]}, …]`
/// (other fields such as `image_id` are ignored), with ctxalign's optional `"group": "<name>"`
/// ([`CaptionedImage::group`]). Records of the same image are merged, in order; they must not name
/// different groups.
pub fn read_caption_json(file: &Path, image_root: &Path) -> Result<Vec<CaptionedImage>, DataError> {
    parse_caption_json(&read_text(file)?, file, image_root)
}

/// Parses caption JSON text; `file` names it in errors.
pub fn parse_caption_json(text: &str, file: &Path, image_root: &Path) -> Result<Vec<CaptionedImage>, DataError> {
    let records: Vec<CaptionRecord> = parse_json(file, text)?;
    let mut merged: IndexMap<String, (Vec<String>, Option<String>)> = IndexMap::new();
    for (i, r) in records.into_iter().enumerate() {
        let OneOrMany(captions) = r.caption;
        if captions.is_empty() || captions.iter().any(|c| c.trim().is_empty()) {
            return Err(DataError::Json {
                path: file.to_owned(),
                at: format!("[{i}].caption"),
                message: "empty caption".into(),
            });
        }
        if r.group.as_deref().is_some_and(|g| g.trim().is_empty()) {
            return Err(DataError::Json {
                path: file.to_owned(),
                at: format!("[{i}].group"),
                message: "empty group".into(),
            });
        }
        resolve_under(image_root, &r.image, file)?;
        let (all, group) = merged.entry(r.image).or_default();
        match (&*group, r.group) {
            (Some(earlier), Some(this)) if *earlier != this => {
                return Err(DataError::Json {
                    path: file.to_owned(),
                    at: format!("[{i}].group"),
                    message: format!("`{this}`, but an earlier record of the same image says `{earlier}`"),
                })
            }
            (None, this) => *group = this,
            _ => {}
        }
        all.extend(captions);
    }
    merged
        .into_iter()
        .map(|(image, (captions, group))| {
            Ok(CaptionedImage { image: resolve_under(image_root, &image, file)?, captions, group })
        })
        .collect()
}

/// Writes caption JSON in BLIP's format (one record per image, `caption` as a list; `group` where
/// the image has one).
pub fn write_caption_json(file: &Path, image_root: &Path, items: &[CaptionedImage]) -> Result<(), DataError> {
    let records: Vec<serde_json::Value> = items
        .iter()
        .map(|it| {
            let rel = it.image.strip_prefix(image_root).unwrap_or(&it.image);
            let mut record =
                serde_json::json!({"image": rel.to_string_lossy().replace('\\', "/"), "caption": it.captions});
            if let Some(group) = &it.group {
                record["group"] = group.clone().into();
            }
            record
        })
        .collect();
    crate::write_atomic(file, serde_json::to_string_pretty(&records).expect("serialisable").as_bytes())
}

/// Reads Flickr8k captions: the Kaggle `captions.txt` (`image,caption` header, captions may contain
/// commas) or the original `Flickr8k.token.txt` (`<image>#<n>\t<caption>`). Images resolve under
/// `image_root`, in first-appearance order.
pub fn read_flickr8k(file: &Path, image_root: &Path) -> Result<Vec<CaptionedImage>, DataError> {
    parse_flickr8k(&read_text(file)?, file, image_root)
}

/// Parses Flickr8k caption text; `file` names it in errors.
pub fn parse_flickr8k(text: &str, file: &Path, image_root: &Path) -> Result<Vec<CaptionedImage>, DataError> {
    let mut merged: IndexMap<String, Vec<String>> = IndexMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || (i == 0 && line.trim().eq_ignore_ascii_case("image,caption")) {
            continue;
        }
        let (image, caption) = if let Some((key, caption)) = line.split_once('\t') {
            (key.split('#').next().unwrap_or(key), caption)
        } else if let Some((image, caption)) = line.split_once(',') {
            (image, caption)
        } else {
            return Err(DataError::line(file, i + 1, "expected `image,caption` or `image#n<TAB>caption`"));
        };
        // The Kaggle file quotes captions that contain commas (RFC 4180: inner quotes doubled).
        let caption = caption.trim();
        let unquoted;
        let caption = if caption.len() >= 2 && caption.starts_with('"') && caption.ends_with('"') {
            unquoted = caption[1..caption.len() - 1].replace("\"\"", "\"");
            unquoted.trim()
        } else {
            caption
        };
        if image.trim().is_empty() || caption.is_empty() {
            return Err(DataError::line(file, i + 1, "empty image name or caption"));
        }
        resolve_under(image_root, image.trim(), file)
            .map_err(|_| DataError::line(file, i + 1, format!("image path `{image}` escapes the data root")))?;
        merged.entry(image.trim().to_string()).or_default().push(caption.to_string());
    }
    merged
        .into_iter()
        .map(|(image, captions)| Ok(CaptionedImage::new(resolve_under(image_root, &image, file)?, captions)))
        .collect()
}

#[derive(Deserialize)]
struct KarpathyFile {
    images: Vec<KarpathyImage>,
}

#[derive(Deserialize)]
struct KarpathyImage {
    filename: String,
    split: String,
}

/// Karpathy split file (`dataset_flickr8k.json`, `dataset_coco.json`): image file name → split
/// (`train`, `val`, `test`, `restval`).
pub fn read_karpathy_splits(file: &Path) -> Result<HashMap<String, String>, DataError> {
    let k: KarpathyFile = parse_json(file, &read_text(file)?)?;
    Ok(k.images.into_iter().map(|i| (i.filename, i.split)).collect())
}

/// Keeps the images whose file name the split map assigns to one of `splits`.
pub fn filter_split(
    items: Vec<CaptionedImage>,
    split_of: &HashMap<String, String>,
    splits: &[&str],
) -> Vec<CaptionedImage> {
    items
        .into_iter()
        .filter(|it| {
            let name = it.image.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            split_of.get(name).is_some_and(|s| splits.contains(&s.as_str()))
        })
        .collect()
}

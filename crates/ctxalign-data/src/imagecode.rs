//! IMAGECODE (Krojer et al. 2022): sets of 10 near-identical images and descriptions of one of them.
//!
//! Layout: `train_data.json` / `valid_data.json` = `{set_name: {"<target index>": description}}`,
//! `test_data_unlabeled.json` = `{set_name: [description, ...]}`; images in
//! `image-sets/<set_name>/imgX.jpg`, 10 per set, ordered by the **number** X (a frame number, which
//! can exceed 9: `img12` comes after `img3`). A set is static iff its name contains `open-images`,
//! otherwise it is a video set. Optional `<split>_categories.json` (written by the built-in
//! benchmark) = `{set_name: {"<target index>": [category, ...]}}`.

use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use serde::Serialize;

use crate::error::{parse_json, read_text, resolve_under, DataError};
use crate::image::{check_image, DecodeOptions};
use crate::loader::{find_unusable, BadInputPolicy};
use crate::walk::{WalkOptions, Walker};

/// Images per IMAGECODE set.
pub const SET_SIZE: usize = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum SetKind {
    Video,
    Static,
}

impl SetKind {
    pub fn of(set_name: &str) -> Self {
        if set_name.contains("open-images") {
            Self::Static
        } else {
            Self::Video
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Video => "video",
            Self::Static => "static",
        }
    }
}

/// One description of one set.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImageCodeExample {
    pub set: String,
    pub kind: SetKind,
    /// Index of the described image after numeric sorting; `None` in the unlabeled test split.
    pub target: Option<usize>,
    pub description: String,
    /// Categories from `<split>_categories.json`, when present.
    pub categories: Vec<String>,
}

impl ImageCodeExample {
    /// The groups IMAGECODE reports this description's accuracy in besides the whole split: its
    /// set's kind (`video` / `static`), then its categories in file order. Counting them is the
    /// evaluation's job (`ctxalign_eval::imagecode`); which groups a description is in is a fact
    /// of the data.
    pub fn groups(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.kind.as_str()).chain(self.categories.iter().map(String::as_str))
    }

    /// Where the description is in its split file: `set.target` (labeled) or `set[?]` (unlabeled;
    /// the list position is not kept).
    pub fn at(&self) -> String {
        match self.target {
            Some(t) => format!("{}.{t}", self.set),
            None => format!("{} (unlabeled)", self.set),
        }
    }
}

/// A split: its examples in file order, and where the images are.
#[derive(Debug, Clone)]
pub struct ImageCodeSplit {
    pub examples: Vec<ImageCodeExample>,
    pub image_root: PathBuf,
    pub source: PathBuf,
}

/// One set's entry: `{"<target index>": description}` (labeled) or `[description, ...]`
/// (unlabeled). Deserialised by hand rather than as an untagged enum, whose only message is "did
/// not match any variant".
enum SetEntry {
    Labeled(IndexMap<String, String>),
    Unlabeled(Vec<String>),
}

impl<'de> serde::Deserialize<'de> for SetEntry {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = SetEntry;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "a set's descriptions: {\"<target index>\": \"description\", ...} (labeled) or \
                     [\"description\", ...] (unlabeled)",
                )
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<SetEntry, A::Error> {
                let inner = serde::de::value::MapAccessDeserializer::new(map);
                Ok(SetEntry::Labeled(serde::Deserialize::deserialize(inner)?))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<SetEntry, A::Error> {
                let inner = serde::de::value::SeqAccessDeserializer::new(seq);
                Ok(SetEntry::Unlabeled(serde::Deserialize::deserialize(inner)?))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl SetEntry {
    fn shape(&self) -> &'static str {
        match self {
            Self::Labeled(_) => "labeled (an object of target index → description)",
            Self::Unlabeled(_) => "unlabeled (a list of descriptions)",
        }
    }
}

/// A set [`ImageCodeSplit::checked`] left out, with its descriptions, and why.
#[derive(Debug, Clone, Serialize)]
pub struct LeftOutSet {
    pub set: String,
    pub descriptions: usize,
    pub error: String,
}

impl ImageCodeSplit {
    /// Reads `<root>/<split>_data.json` (or `test_data_unlabeled.json` for `split = "test"`) with
    /// images under `<root>/image-sets`.
    pub fn open(root: &Path, split: &str) -> Result<Self, DataError> {
        let file = match split {
            "test" => root.join("test_data_unlabeled.json"),
            s => root.join(format!("{s}_data.json")),
        };
        let mut out = Self::read(&file, &root.join("image-sets"))?;
        let cats = root.join(format!("{split}_categories.json"));
        if cats.is_file() {
            let map: IndexMap<String, IndexMap<String, Vec<String>>> = parse_json(&cats, &read_text(&cats)?)?;
            for ex in &mut out.examples {
                if let Some(c) = ex.target.and_then(|t| map.get(&ex.set)?.get(&t.to_string())) {
                    ex.categories = c.clone();
                }
            }
        }
        Ok(out)
    }

    /// Reads one split file, labeled or unlabeled.
    pub fn read(file: &Path, image_root: &Path) -> Result<Self, DataError> {
        Self::parse(&read_text(file)?, file, image_root)
    }

    /// Parses the text of a split file; `file` names it in errors.
    pub fn parse(text: &str, file: &Path, image_root: &Path) -> Result<Self, DataError> {
        let sets: IndexMap<String, SetEntry> = parse_json(file, text)?;
        let mut examples = Vec::new();
        // The first set's shape is the split's: a labeled split with one set given as a list would
        // print its descriptions among the split's and leave them out of the accuracy's total.
        let mut shape: Option<(&'static str, String)> = None;
        for (set, entry) in sets {
            check_set_name(&set, file)?;
            let this = entry.shape();
            match &shape {
                None => shape = Some((this, set.clone())),
                Some((first, first_set)) if *first != this => {
                    return Err(DataError::Json {
                        path: file.to_owned(),
                        at: set.clone(),
                        message: format!(
                            "set `{set}` is {this} but set `{first_set}` is {first}: a split holds one shape \
                             ({{\"<target index>\": \"description\"}} in train/valid, [\"description\", ...] in \
                             the unlabeled test split), else some descriptions would not be counted"
                        ),
                    });
                }
                Some(_) => {}
            }
            let kind = SetKind::of(&set);
            match entry {
                SetEntry::Labeled(map) => {
                    for (target, description) in map {
                        let t: usize = target.parse().map_err(|_| DataError::Json {
                            path: file.to_owned(),
                            at: format!("{set}.{target}"),
                            message: "target keys must be image indices 0..9".into(),
                        })?;
                        if t >= SET_SIZE {
                            return Err(DataError::Json {
                                path: file.to_owned(),
                                at: format!("{set}.{target}"),
                                message: format!("target {t} is outside 0..{}", SET_SIZE - 1),
                            });
                        }
                        check_description(&description, file, &format!("{set}.{target}"))?;
                        examples.push(ImageCodeExample {
                            set: set.clone(),
                            kind,
                            target: Some(t),
                            description,
                            categories: vec![],
                        });
                    }
                }
                SetEntry::Unlabeled(list) => {
                    for (i, description) in list.into_iter().enumerate() {
                        check_description(&description, file, &format!("{set}[{i}]"))?;
                        examples.push(ImageCodeExample {
                            set: set.clone(),
                            kind,
                            target: None,
                            description,
                            categories: vec![],
                        });
                    }
                }
            }
        }
        Ok(Self { examples, image_root: image_root.to_owned(), source: file.to_owned() })
    }

    /// Set names in first-appearance order.
    pub fn sets(&self) -> Vec<&str> {
        let mut seen = std::collections::HashSet::new();
        self.examples.iter().map(|e| e.set.as_str()).filter(|s| seen.insert(*s)).collect()
    }

    /// The 10 image paths of `set`, in IMAGECODE's index order.
    pub fn set_images(&self, set: &str) -> Result<Vec<PathBuf>, DataError> {
        set_images(&self.image_root, set, &self.source)
    }

    /// Checks every set before anything is scored or trained on it (in parallel): its folder holds
    /// exactly 10 `imgX` images, each with a sound header ([`check_image`]). Under
    /// [`BadInputPolicy::Fail`] a bad set is an error that counts them and names the first few;
    /// under [`BadInputPolicy::Skip`] the split comes back without those sets' descriptions, with
    /// the sets left out (an error still when no set is usable).
    pub fn checked(
        mut self,
        decode: DecodeOptions,
        policy: BadInputPolicy,
    ) -> Result<(Self, Vec<LeftOutSet>), DataError> {
        let sets: Vec<String> = self.sets().into_iter().map(String::from).collect();
        let check = |set: &String| -> Result<(), DataError> {
            for path in self.set_images(set)? {
                check_image(&path, decode)?;
            }
            Ok(())
        };
        let bad: Vec<LeftOutSet> = find_unusable(&sets, "sets", policy, |set| format!("set {set}"), check)?
            .into_iter()
            .map(|skipped| {
                let set = sets[skipped.index].clone();
                let descriptions = self.examples.iter().filter(|e| e.set == set).count();
                LeftOutSet { set, descriptions, error: skipped.error }
            })
            .collect();
        let left_out: std::collections::HashSet<&str> = bad.iter().map(|b| b.set.as_str()).collect();
        self.examples.retain(|e| !left_out.contains(e.set.as_str()));
        Ok((self, bad))
    }
}

/// A description must say something: one with no letter or digit (empty, blank, punctuation only)
/// would still be scored, against nothing but `[CLS] [SEP]`, and counted in the accuracy.
fn check_description(description: &str, file: &Path, at: &str) -> Result<(), DataError> {
    if description.chars().any(char::is_alphanumeric) {
        return Ok(());
    }
    Err(DataError::Json {
        path: file.to_owned(),
        at: at.to_string(),
        message: format!("the description {description:?} has no word (no letter or digit)"),
    })
}

/// A set name is one folder under `image-sets`: a single plain path component (not `.`, `..`, empty,
/// absolute or containing a separator). Found by fuzzing: `"."` would otherwise name the root itself.
fn check_set_name(set: &str, file: &Path) -> Result<(), DataError> {
    let mut parts = Path::new(set).components();
    let single = matches!((parts.next(), parts.next()), (Some(std::path::Component::Normal(_)), None));
    if !single || set.contains(['/', '\\']) {
        return Err(DataError::PathEscape { path: file.to_owned(), entry: set.to_string() });
    }
    Ok(())
}

/// The images `imgX.<ext>` of a set folder sorted by the number X; exactly 10 required.
pub fn set_images(image_root: &Path, set: &str, source: &Path) -> Result<Vec<PathBuf>, DataError> {
    check_set_name(set, source)?;
    let dir = resolve_under(image_root, set, source)?;
    // The shared walker, flat: files only, each real file once.
    let mut walker = Walker::new(WalkOptions::flat());
    let mut numbered: Vec<(u64, PathBuf)> = Vec::new();
    for path in walker.files(&dir, |p| p.file_stem().and_then(|s| s.to_str()).is_some_and(|s| s.starts_with("img")))? {
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else { continue };
        let Some(num) = stem.strip_prefix("img") else { continue };
        let n: u64 = num.parse().map_err(|_| DataError::format(&path, "image names must be imgX with X a number"))?;
        numbered.push((n, path));
    }
    // Two names for one image would make one candidate of the ten a copy of another.
    if let Some((entry, first)) = walker.aliases.first() {
        return Err(DataError::format(entry, format!("the same image as {} (through a link)", first.display())));
    }
    numbered.sort();
    if let Some(w) = numbered.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(DataError::format(&w[1].1, format!("two images share frame number {}", w[0].0)));
    }
    if numbered.len() != SET_SIZE {
        return Err(DataError::SetSize { path: dir, set: set.to_string(), found: numbered.len(), expected: SET_SIZE });
    }
    Ok(numbered.into_iter().map(|(_, p)| p).collect())
}

/// Writes a leaderboard submission: `{set_name: [predicted index per description, in file order]}`.
pub fn write_submission(path: &Path, split: &ImageCodeSplit, predictions: &[usize]) -> Result<(), DataError> {
    if split.examples.is_empty() {
        return Err(DataError::format(
            &split.source,
            "the split has no descriptions: there is nothing to submit (no file written)",
        ));
    }
    if predictions.len() != split.examples.len() {
        return Err(DataError::format(
            path,
            format!("{} predictions for {} descriptions", predictions.len(), split.examples.len()),
        ));
    }
    let mut out: IndexMap<&str, Vec<usize>> = IndexMap::new();
    for (ex, &p) in split.examples.iter().zip(predictions) {
        out.entry(ex.set.as_str()).or_default().push(p);
    }
    let text = serde_json::to_string(&out).expect("serialisable");
    crate::write_atomic(path, text.as_bytes())
}

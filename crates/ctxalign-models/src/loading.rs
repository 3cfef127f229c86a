//! Checkpoint loading: model folders (local or hub), strict JSON configs, safetensors with checks.
//!
//! The weights are read through [`CheckedSafetensors`], a `VarBuilder` backend that knows which file
//! holds each key, applies an explicit [`RenameTable`] where the checkpoint's names differ from the
//! model's (HF names are the model's own), refuses non-float tensors, and records the first problem
//! as a typed [`LoadError`] naming the file, the key, the expected and the found shape.
//!
//! It also records which keys the model read. After construction every key of the files must have
//! been read, or be named by the owner type's [`AllowedUnused`] list (HF buffers, heads of another
//! task, parts of a shared file that other loaders read): a config that describes fewer layers than
//! the weights hold would otherwise load, ignore the rest and score ([`LoadError::UnusedTensors`]).
//! When asked ([`build_fingerprinted`]), it hashes each tensor's stored bytes as it reads them, so
//! a checkpoint's full fingerprint ([`crate::artifact`]) costs no second pass over the file.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::{Load, MmapedSafetensors};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;

/// Everything that can go wrong between a model name and a built model.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: file not found ({what})")]
    MissingFile { path: PathBuf, what: String },
    /// A model folder was expected and the path is a file (a weights file given for its folder).
    #[error("{path} is a file; a model folder (config.json, model.safetensors, …) is expected: pass the folder that holds it")]
    NotAFolder { path: PathBuf },
    #[error("{path}: cannot read: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// `field` is the path of the offending value (`text_config.hidden_size`), empty at the root.
    #[error("{path}: malformed JSON at `{field}`: {source}")]
    Json { path: PathBuf, field: String, source: serde_json::Error },
    #[error("{path}: invalid config: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: not a readable safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("{file}: tensor `{key}` is missing (the model expects shape {expected:?})")]
    MissingTensor { file: PathBuf, key: String, expected: Vec<usize> },
    #[error("{file}: tensor `{key}` has shape {found:?}, the model expects {expected:?}")]
    ShapeMismatch { file: PathBuf, key: String, expected: Vec<usize>, found: Vec<usize> },
    /// `found` is the stored dtype as safetensors names it (`I8`, `U8`, `I64`, …): Candle has no
    /// name for some of them, and a wrong name would send the reader after the wrong problem.
    #[error("{file}: tensor `{key}` is stored as {found}; expected a float tensor (f32, f16 or bf16)")]
    UnsupportedDtype { file: PathBuf, key: String, found: String },
    /// Tensors of the file that the model never read: the config describes a smaller model than the
    /// weights hold (2 layers configured, 4 stored), or the file holds another model's parts. Using
    /// the rest would score with a model nobody trained, silently.
    #[error("{file}: {} tensor(s) of the file are not used by the model its config describes: {} \
             (the config and the weights disagree, e.g. fewer layers configured than stored; or the \
             weights belong to another model)", keys.len(), list_keys(keys))]
    UnusedTensors { file: PathBuf, keys: Vec<String> },
    /// A NaN or infinity in the stored values (a damaged file or a diverged run): refused, since
    /// every score computed from it would be NaN.
    #[error("{file}: tensor `{key}` holds non-finite values (NaN or ±inf): the checkpoint is damaged or comes from a diverged run")]
    NonFinite { file: PathBuf, key: String },
    /// Finite stored values that the requested dtype cannot represent (f16 overflows past 65504).
    #[error("{file}: tensor `{key}` has values beyond the range of {dtype:?}; load it in f32 or bf16")]
    Overflow { file: PathBuf, key: String, dtype: DType },
    #[error("{file}: index names `{key}` in `{shard}`, which does not contain it")]
    BrokenIndex { file: PathBuf, key: String, shard: PathBuf },
    #[error("hub model `{id}`: {message}")]
    Hub { id: String, message: String },
    /// Saving a folder failed; the cause names the file (no space, no permission, a folder in the
    /// way). The file being replaced is left as it was.
    #[error(transparent)]
    Write(Box<ctxalign_data::DataError>),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// `a`, `b`, … (the first 12 keys and how many more), for messages.
fn list_keys(keys: &[String]) -> String {
    const SHOWN: usize = 12;
    let mut text = keys.iter().take(SHOWN).map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ");
    if keys.len() > SHOWN {
        text.push_str(&format!(" and {} more", keys.len() - SHOWN));
    }
    text
}

impl From<ctxalign_data::DataError> for LoadError {
    fn from(e: ctxalign_data::DataError) -> Self {
        Self::Write(Box::new(e))
    }
}

/// Reads and strictly parses a JSON file, naming the file (and serde's line/column) on failure.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => LoadError::MissingFile { path: path.to_owned(), what: "JSON".into() },
        _ => LoadError::Io { path: path.to_owned(), source },
    })?;
    parse_json(path, &text)
}

/// Strictly parses JSON `text` meant for `path`, naming the file and the offending field on failure.
pub fn parse_json<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, LoadError> {
    let mut de = serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(&mut de).map_err(|e| LoadError::Json {
        path: path.to_owned(),
        field: e.path().to_string(),
        source: e.into_inner(),
    })
}

/// Takes `key` out of a record's `fields` (read from `path`) and parses it; `None` when absent or
/// null. What is left is the record's flattened config, for [`from_json_value`].
pub fn take_field<T: DeserializeOwned>(
    path: &Path,
    fields: &mut serde_json::Map<String, serde_json::Value>,
    key: &str,
) -> Result<Option<T>, LoadError> {
    fields.remove(key).filter(|v| !v.is_null()).map(|v| from_json_value(path, key, v)).transpose()
}

/// Parses `value`, read from `path`, naming the offending field on failure (prefixed by `at`, the
/// key `value` sat under; empty at the root). Records that hold a config beside their own keys
/// take those keys out and parse the rest as the config with this, so a bad config value is
/// named by its path (serde's `flatten` would lose it).
pub fn from_json_value<T: DeserializeOwned>(path: &Path, at: &str, value: serde_json::Value) -> Result<T, LoadError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let inner = e.path().to_string();
        let field = match (at, inner.as_str()) {
            ("", _) => inner,
            (_, ".") => at.to_string(),
            _ => format!("{at}.{inner}"),
        };
        LoadError::Json { path: path.to_owned(), field, source: e.into_inner() }
    })
}

/// Where a model comes from: a local folder, or a hub repository id (`Salesforce/blip-itm-base-coco`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Dir(PathBuf),
    Hub { id: String, revision: Option<String> },
}

impl ModelSource {
    /// A path that exists is a folder; anything else of the form `owner/name[@revision]` is a hub id.
    pub fn parse(spec: &str) -> Self {
        let path = Path::new(spec);
        if path.exists() || spec.starts_with('.') || spec.starts_with('/') || spec.matches('/').count() != 1 {
            return Self::Dir(path.to_owned());
        }
        match spec.split_once('@') {
            Some((id, rev)) => Self::Hub { id: id.into(), revision: Some(rev.into()) },
            None => Self::Hub { id: spec.into(), revision: None },
        }
    }

    /// Resolves the files of a model: `config.json`, the weights (`model.safetensors` or the shards of
    /// `model.safetensors.index.json`), and `tokenizer.json` / `preprocessor_config.json` when present.
    ///
    /// Hub ids use the local cache first (`HF_HOME`, `HF_HUB_CACHE`); with `HF_HUB_OFFLINE=1` nothing
    /// is downloaded and a file missing from the cache is an error.
    pub fn resolve(&self) -> Result<ModelFiles, LoadError> {
        match self {
            Self::Dir(dir) => ModelFiles::from_dir(dir),
            Self::Hub { id, revision } => resolve_hub(id, revision.as_deref()),
        }
    }

    /// Resolves an artifact folder that is not a plain model folder (a ContextBLIP stage, a
    /// ContextCLIP model): a local folder must hold every file of `required`; a hub repository's
    /// `required` files are fetched (cache first, as [`ModelSource::resolve`]), with whichever of
    /// `optional` it has, and their local snapshot folder is returned.
    pub fn resolve_folder(&self, required: &[&str], optional: &[&str]) -> Result<PathBuf, LoadError> {
        match self {
            Self::Dir(dir) => {
                if dir.is_file() {
                    return Err(LoadError::NotAFolder { path: dir.to_owned() });
                }
                if !dir.is_dir() {
                    return Err(LoadError::MissingFile { path: dir.to_owned(), what: "model folder".into() });
                }
                for name in required {
                    let path = dir.join(name);
                    if !path.is_file() {
                        return Err(LoadError::MissingFile { path, what: "a file the model folder needs".into() });
                    }
                }
                Ok(dir.to_owned())
            }
            Self::Hub { id, revision } => resolve_hub_folder(id, revision.as_deref(), required, optional),
        }
    }
}

/// The files of one model.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub config: PathBuf,
    /// One file, or the shards in index order.
    pub weights: Vec<PathBuf>,
    /// `model.safetensors.index.json`, for sharded checkpoints.
    pub weight_index: Option<PathBuf>,
    pub tokenizer: Option<PathBuf>,
    pub preprocessor_config: Option<PathBuf>,
}

use crate::blip::{
    CONFIG_FILE as CONFIG, PREPROCESSOR_FILE as PREPROCESSOR, TOKENIZER_FILE as TOKENIZER,
    WEIGHTS_FILE as SINGLE_WEIGHTS,
};
const WEIGHT_INDEX: &str = "model.safetensors.index.json";

#[derive(serde::Deserialize)]
struct WeightIndex {
    weight_map: HashMap<String, String>,
}

/// Shard file names of an index, sorted and unique.
fn shard_names(index_path: &Path) -> Result<Vec<String>, LoadError> {
    let index: WeightIndex = read_json(index_path)?;
    let names: BTreeSet<String> = index.weight_map.into_values().collect();
    for name in &names {
        if Path::new(name).components().count() != 1 {
            return Err(LoadError::Config {
                path: index_path.to_owned(),
                message: format!("shard name {name:?} is not a plain file name"),
            });
        }
    }
    Ok(names.into_iter().collect())
}

impl ModelFiles {
    pub fn from_dir(dir: &Path) -> Result<Self, LoadError> {
        if dir.is_file() {
            return Err(LoadError::NotAFolder { path: dir.to_owned() });
        }
        if !dir.is_dir() {
            return Err(LoadError::MissingFile { path: dir.to_owned(), what: "model folder".into() });
        }
        let config = dir.join(CONFIG);
        if !config.is_file() {
            return Err(LoadError::MissingFile { path: config, what: "model config".into() });
        }
        let single = dir.join(SINGLE_WEIGHTS);
        let index = dir.join(WEIGHT_INDEX);
        let (weights, weight_index) = if single.is_file() {
            (vec![single], None)
        } else if index.is_file() {
            let shards = shard_names(&index)?.into_iter().map(|n| dir.join(n)).collect::<Vec<_>>();
            for shard in &shards {
                if !shard.is_file() {
                    return Err(LoadError::MissingFile {
                        path: shard.clone(),
                        what: format!("shard listed in {}", index.display()),
                    });
                }
            }
            (shards, Some(index))
        } else {
            let hint = if dir.join("pytorch_model.bin").is_file() {
                " (only pytorch_model.bin is present: convert it to safetensors, e.g. with HF's `convert` space)"
            } else {
                ""
            };
            return Err(LoadError::MissingFile {
                path: single,
                what: format!("weights: neither {SINGLE_WEIGHTS} nor {WEIGHT_INDEX}{hint}"),
            });
        };
        let optional = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
        Ok(Self {
            config,
            weights,
            weight_index,
            tokenizer: optional(TOKENIZER),
            preprocessor_config: optional(PREPROCESSOR),
        })
    }
}

#[cfg(feature = "hub")]
fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes" | "ON" | "on"))
        .unwrap_or(false)
}

/// A build without hub support names the feature rather than failing some other way.
#[cfg(not(feature = "hub"))]
fn no_hub(id: &str) -> LoadError {
    LoadError::Hub {
        id: id.into(),
        message: "this build loads models from local folders only (hub ids need the feature `hub`); \
                  pass the model's local folder (an `owner/name` that is not an existing folder is read as a hub id)"
            .into(),
    }
}

#[cfg(not(feature = "hub"))]
fn resolve_hub(id: &str, _revision: Option<&str>) -> Result<ModelFiles, LoadError> {
    Err(no_hub(id))
}

/// A hub repository read through the local cache first, then (unless `HF_HUB_OFFLINE`) downloaded.
#[cfg(feature = "hub")]
struct HubRepo {
    id: String,
    repo: hf_hub::Repo,
    cache: hf_hub::Cache,
    api: Option<hf_hub::api::sync::Api>,
}

#[cfg(feature = "hub")]
impl HubRepo {
    fn open(id: &str, revision: Option<&str>) -> Result<Self, LoadError> {
        use hf_hub::{Cache, Repo, RepoType};
        let repo = match revision {
            Some(rev) => Repo::with_revision(id.into(), RepoType::Model, rev.into()),
            None => Repo::new(id.into(), RepoType::Model),
        };
        // hf-hub's `Cache::from_env` honours HF_HOME / HF_HUB_CACHE; its downloader ignores
        // HF_HUB_OFFLINE, so the offline rule is applied here.
        let cache = Cache::from_env();
        let api = match hub_offline() {
            true => None,
            false => Some(
                hf_hub::api::sync::ApiBuilder::from_cache(cache.clone())
                    .with_progress(true)
                    .build()
                    .map_err(|e| LoadError::Hub { id: id.into(), message: format!("cannot start the hub client: {e}") })?,
            ),
        };
        Ok(Self { id: id.into(), repo, cache, api })
    }

    fn error(&self, message: String) -> LoadError {
        LoadError::Hub { id: self.id.clone(), message }
    }

    /// The local path of `name`; `None` when it is optional and the repository has none.
    fn fetch(&self, name: &str, required: bool) -> Result<Option<PathBuf>, LoadError> {
        if let Some(p) = self.cache.repo(self.repo.clone()).get(name) {
            return Ok(Some(p));
        }
        match &self.api {
            None if required => Err(self.error(format!(
                "{name} is not in the local cache {} and HF_HUB_OFFLINE is set",
                self.cache.path().display()
            ))),
            None => Ok(None),
            Some(api) => match api.repo(self.repo.clone()).get(name) {
                Ok(p) => Ok(Some(p)),
                Err(e) if required => Err(self.error(format!("cannot fetch {name}: {e}"))),
                Err(_) => Ok(None),
            },
        }
    }

    fn required(&self, name: &str) -> Result<PathBuf, LoadError> {
        Ok(self.fetch(name, true)?.expect("a required file is Some or an error"))
    }
}

#[cfg(feature = "hub")]
fn resolve_hub(id: &str, revision: Option<&str>) -> Result<ModelFiles, LoadError> {
    let hub = HubRepo::open(id, revision)?;
    let config = hub.required(CONFIG)?;
    let (weights, weight_index) = match hub.fetch(SINGLE_WEIGHTS, false)? {
        Some(p) => (vec![p], None),
        None => {
            let index = hub.fetch(WEIGHT_INDEX, false)?.ok_or_else(|| {
                hub.error(format!("neither {SINGLE_WEIGHTS} nor {WEIGHT_INDEX} could be found"))
            })?;
            let shards = shard_names(&index)?.iter().map(|n| hub.required(n)).collect::<Result<Vec<_>, _>>()?;
            (shards, Some(index))
        }
    };
    Ok(ModelFiles {
        config,
        weights,
        weight_index,
        tokenizer: hub.fetch(TOKENIZER, false)?,
        preprocessor_config: hub.fetch(PREPROCESSOR, false)?,
    })
}

/// The local folder of a hub repository holding every `required` file and whichever `optional`
/// files it has. hf-hub keeps a revision's files side by side in one snapshot folder, which is
/// returned.
#[cfg(feature = "hub")]
fn resolve_hub_folder(
    id: &str,
    revision: Option<&str>,
    required: &[&str],
    optional: &[&str],
) -> Result<PathBuf, LoadError> {
    let hub = HubRepo::open(id, revision)?;
    let mut folder = None;
    for name in required {
        let path = hub.required(name)?;
        folder.get_or_insert_with(|| path.parent().map(Path::to_owned).unwrap_or_default());
    }
    for name in optional {
        hub.fetch(name, false)?;
    }
    folder.ok_or_else(|| hub.error("no file of the repository was asked for".into()))
}

#[cfg(not(feature = "hub"))]
fn resolve_hub_folder(id: &str, _revision: Option<&str>, _: &[&str], _: &[&str]) -> Result<PathBuf, LoadError> {
    Err(no_hub(id))
}

/// Maps the model's parameter names (HF's) to the names a checkpoint uses, by ordered prefix and
/// infix rewrites. The identity table reads HF checkpoints; [`RenameTable::blip_original`] reads
/// BLIP's own (salesforce/BLIP) names, as listed in HF's `convert_blip_original_pytorch_to_hf.py`.
#[derive(Debug, Clone, Default)]
pub struct RenameTable {
    /// `(model substring, checkpoint substring)`, applied in order to the model name.
    pub rules: Vec<(String, String)>,
}

impl RenameTable {
    pub fn identity() -> Self {
        Self::default()
    }

    pub fn blip_original() -> Self {
        let rules = [
            ("vision_model.embeddings.class_embedding", "visual_encoder.cls_token"),
            ("vision_model.embeddings.position_embedding", "visual_encoder.pos_embed"),
            ("vision_model.embeddings.patch_embedding", "visual_encoder.patch_embed.proj"),
            ("vision_model.encoder.layers.", "visual_encoder.blocks."),
            ("vision_model.post_layernorm", "visual_encoder.norm"),
            (".layer_norm1", ".norm1"),
            (".layer_norm2", ".norm2"),
            (".self_attn.qkv", ".attn.qkv"),
            (".self_attn.projection", ".attn.proj"),
        ];
        Self { rules: rules.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect() }
    }

    pub fn checkpoint_name(&self, model_name: &str) -> String {
        let mut name = model_name.to_string();
        for (from, to) in &self.rules {
            if name.contains(from.as_str()) {
                name = name.replacen(from.as_str(), to, 1);
            }
        }
        name
    }
}

/// Which checkpoint keys a rule of [`AllowedUnused`] matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// The keys under a prefix, as long as the model read none of them from that file: a part of
    /// the checkpoint the model does not take (CLIP's text tower when only its vision tower starts
    /// an image encoder). A part the model read some of must be read whole: its remaining keys are
    /// layers the config left out.
    Part(String),
}

impl KeyPattern {
    fn matches(&self, key: &str) -> bool {
        match self {
            Self::Exact(k) => key == k,
            Self::Prefix(p) | Self::Part(p) => key.starts_with(p.as_str()),
            Self::Suffix(s) => key.ends_with(s.as_str()),
        }
    }
}

/// One key pattern a model may leave unread, why that is no mistake, and optionally the one file
/// it applies to (a model read from several checkpoints).
#[derive(Debug, Clone)]
pub struct UnusedRule {
    pub pattern: KeyPattern,
    pub file: Option<PathBuf>,
    pub why: &'static str,
}

/// The checkpoint keys an owner type may leave unread, each with its reason: the explicit list
/// behind the rule that every other tensor of a file must be used ([`LoadError::UnusedTensors`]).
/// Each owner type declares its own (`BlipItm::allowed_unused`, …); nothing is skipped silently.
#[derive(Debug, Clone, Default)]
pub struct AllowedUnused {
    pub rules: Vec<UnusedRule>,
}

impl AllowedUnused {
    /// Every tensor must be used.
    pub fn none() -> Self {
        Self::default()
    }

    fn rule(mut self, pattern: KeyPattern, why: &'static str) -> Self {
        self.rules.push(UnusedRule { pattern, file: None, why });
        self
    }

    pub fn exact(self, key: impl Into<String>, why: &'static str) -> Self {
        self.rule(KeyPattern::Exact(key.into()), why)
    }

    pub fn prefix(self, prefix: impl Into<String>, why: &'static str) -> Self {
        self.rule(KeyPattern::Prefix(prefix.into()), why)
    }

    pub fn suffix(self, suffix: impl Into<String>, why: &'static str) -> Self {
        self.rule(KeyPattern::Suffix(suffix.into()), why)
    }

    /// A part of the checkpoint (keys under `prefix`) the model does not take ([`KeyPattern::Part`]).
    pub fn part(self, prefix: impl Into<String>, why: &'static str) -> Self {
        self.rule(KeyPattern::Part(prefix.into()), why)
    }

    /// Restricts the rules so far to keys of `file` (the others' keys must then be used).
    pub fn only_in(mut self, file: &Path) -> Self {
        for rule in &mut self.rules {
            rule.file.get_or_insert_with(|| file.to_owned());
        }
        self
    }

    /// Both lists' rules.
    pub fn and(mut self, other: Self) -> Self {
        self.rules.extend(other.rules);
        self
    }

    /// The same rules with every pattern under `prefix` (a model read under a checkpoint prefix,
    /// as BERT task checkpoints keep the encoder under `bert.`).
    pub fn under(mut self, prefix: &str) -> Self {
        for rule in &mut self.rules {
            if let KeyPattern::Exact(k) | KeyPattern::Prefix(k) | KeyPattern::Part(k) = &mut rule.pattern {
                k.insert_str(0, prefix);
            }
        }
        self
    }

    /// Whether `key` of `file` may stay unread, given whether the model read any key of `file`
    /// under a prefix (`read_under`, for [`KeyPattern::Part`]).
    pub fn allows(&self, file: &Path, key: &str, read_under: impl Fn(&str) -> bool) -> bool {
        self.rules.iter().any(|r| {
            r.file.as_deref().is_none_or(|f| f == file)
                && r.pattern.matches(key)
                && match &r.pattern {
                    KeyPattern::Part(p) => !read_under(p),
                    _ => true,
                }
        })
    }
}

/// A set of safetensors files behind a `VarBuilder`, with typed errors and usage tracking.
pub struct CheckedSafetensors {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    /// Checkpoint key → index into `files`.
    key_file: HashMap<String, usize>,
    rename: RenameTable,
    first_error: Mutex<Option<LoadError>>,
    used: Mutex<BTreeSet<String>>,
    /// SHA-256 of each tensor's stored bytes, taken as it is read (only when `hashing`).
    hashing: bool,
    digests: Mutex<HashMap<String, [u8; 32]>>,
}

impl CheckedSafetensors {
    /// Memory-maps `paths`; a key present in two files is an error (a broken sharding).
    pub fn open(paths: &[PathBuf], rename: RenameTable) -> Result<Self, LoadError> {
        let mut files = Vec::with_capacity(paths.len());
        let mut key_file = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            if !path.is_file() {
                return Err(LoadError::MissingFile { path: path.clone(), what: "weights".into() });
            }
            // SAFETY: the file is mapped read-only; like every mmap-based loader we rely on it not
            // being truncated while the model is being built (tensors are copied out on load).
            let st = unsafe { MmapedSafetensors::new(path) }
                .map_err(|e| LoadError::Safetensors { path: path.clone(), message: e.to_string() })?;
            for (key, _) in st.tensors() {
                if let Some(prev) = key_file.insert(key.clone(), i) {
                    return Err(LoadError::Config {
                        path: path.clone(),
                        message: format!("tensor `{key}` is also in {}", paths[prev].display()),
                    });
                }
            }
            files.push((path.clone(), st));
        }
        Ok(Self {
            files,
            key_file,
            rename,
            first_error: Mutex::new(None),
            used: Mutex::new(BTreeSet::new()),
            hashing: false,
            digests: Mutex::new(HashMap::new()),
        })
    }

    /// Hashes each tensor's stored bytes as it is read, for [`CheckedSafetensors::file_digests`].
    pub fn with_hashing(mut self) -> Self {
        self.hashing = true;
        self
    }

    /// The files, in the order given.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|(p, _)| p.as_path())
    }

    /// All checkpoint keys.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.key_file.keys()
    }

    /// The stored shape of a checkpoint key (before renaming), if present.
    pub fn shape_of(&self, key: &str) -> Option<Vec<usize>> {
        let &i = self.key_file.get(key)?;
        self.files[i].1.get(key).ok().map(|v| v.shape().to_vec())
    }

    /// Checkpoint keys no model parameter asked for and `allowed` does not name, by file (in the
    /// files' order), sorted.
    pub fn unused_keys(&self, allowed: &AllowedUnused) -> Vec<(PathBuf, Vec<String>)> {
        let used = self.used.lock().expect("not poisoned");
        let mut by_file: Vec<(PathBuf, Vec<String>)> = self.files.iter().map(|(p, _)| (p.clone(), vec![])).collect();
        let read_under =
            |i: usize, prefix: &str| used.iter().any(|k| k.starts_with(prefix) && self.key_file.get(k) == Some(&i));
        for (key, &i) in &self.key_file {
            if !used.contains(key) && !allowed.allows(&self.files[i].0, key, |p| read_under(i, p)) {
                by_file[i].1.push(key.clone());
            }
        }
        by_file.retain(|(_, keys)| !keys.is_empty());
        for (_, keys) in &mut by_file {
            keys.sort();
        }
        by_file
    }

    /// Refuses a checkpoint of which the model left tensors unread that `allowed` does not name
    /// (the first such file, with its keys).
    pub fn check_all_used(&self, allowed: &AllowedUnused) -> Result<(), LoadError> {
        match self.unused_keys(allowed).into_iter().next() {
            Some((file, keys)) => Err(LoadError::UnusedTensors { file, keys }),
            None => Ok(()),
        }
    }

    /// A SHA-256 digest of each file, over every byte of it: the length, the header (every
    /// tensor's name, dtype, shape and offsets) and each tensor's bytes in file order, hashed per
    /// tensor. Tensors already read with hashing on are not read again; the rest are hashed now.
    /// safetensors' own validation guarantees that the tensors tile the data without gaps, so the
    /// header and the tensors are the whole file.
    pub fn file_digests(&self) -> Result<Vec<[u8; 32]>, LoadError> {
        use sha2::{Digest, Sha256};
        let digests = self.digests.lock().expect("not poisoned");
        let mut out = Vec::with_capacity(self.files.len());
        for (path, st) in &self.files {
            let (file_len, header) = read_header(path)?;
            let offsets: HashMap<String, serde_json::Value> = serde_json::from_slice(&header[8..])
                .map_err(|e| LoadError::Safetensors { path: path.clone(), message: e.to_string() })?;
            let start = |v: &serde_json::Value| v["data_offsets"][0].as_u64().unwrap_or(0);
            let mut keys: Vec<(&String, u64)> =
                offsets.iter().filter(|(k, _)| *k != "__metadata__").map(|(k, v)| (k, start(v))).collect();
            keys.sort_by_key(|&(k, at)| (at, k.clone()));
            let mut file = Sha256::new();
            file.update(file_len.to_le_bytes());
            file.update(&header);
            for (key, _) in keys {
                let digest = match digests.get(key.as_str()) {
                    Some(d) => *d,
                    None => {
                        let view = st
                            .get(key)
                            .map_err(|e| LoadError::Safetensors { path: path.clone(), message: e.to_string() })?;
                        Sha256::digest(view.data()).into()
                    }
                };
                file.update(digest);
            }
            out.push(file.finalize().into());
        }
        Ok(out)
    }

    /// The first problem met while a model was built from this checkpoint.
    pub fn take_error(&self) -> Option<LoadError> {
        self.first_error.lock().expect("not poisoned").take()
    }

    fn fail(&self, error: LoadError) -> candle_core::Error {
        let message = error.to_string();
        let mut slot = self.first_error.lock().expect("not poisoned");
        if slot.is_none() {
            *slot = Some(error);
        }
        candle_core::Error::Msg(message)
    }

    fn display_file(&self) -> PathBuf {
        match self.files.as_slice() {
            [(p, _)] => p.clone(),
            _ => self.files.first().map(|(p, _)| p.with_file_name("<shards>")).unwrap_or_default(),
        }
    }

    fn load(&self, name: &str, expected: Option<&Shape>, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let key = self.rename.checkpoint_name(name);
        let Some(&i) = self.key_file.get(&key) else {
            return Err(self.fail(LoadError::MissingTensor {
                file: self.display_file(),
                key,
                expected: expected.map(|s| s.dims().to_vec()).unwrap_or_default(),
            }));
        };
        let (path, st) = &self.files[i];
        let view = st
            .get(&key)
            .map_err(|e| self.fail(LoadError::Safetensors { path: path.clone(), message: e.to_string() }))?;
        let stored = view.dtype();
        let float = matches!(
            stored,
            safetensors::Dtype::F32 | safetensors::Dtype::F16 | safetensors::Dtype::BF16 | safetensors::Dtype::F64
        );
        if !float {
            let found = format!("{stored:?}");
            return Err(self.fail(LoadError::UnsupportedDtype { file: path.clone(), key, found }));
        }
        if let Some(expected) = expected {
            if view.shape() != expected.dims() {
                return Err(self.fail(LoadError::ShapeMismatch {
                    file: path.clone(),
                    key,
                    expected: expected.dims().to_vec(),
                    found: view.shape().to_vec(),
                }));
            }
        }
        if self.hashing {
            use sha2::Digest;
            let digest: [u8; 32] = sha2::Sha256::digest(view.data()).into();
            self.digests.lock().expect("not poisoned").insert(key.clone(), digest);
        }
        let stored = view.load(dev)?;
        if !all_finite(&stored)? {
            return Err(self.fail(LoadError::NonFinite { file: path.clone(), key }));
        }
        let tensor = stored.to_dtype(dtype)?;
        if tensor.dtype() != stored.dtype() && !all_finite(&tensor)? {
            return Err(self.fail(LoadError::Overflow { file: path.clone(), key, dtype }));
        }
        self.used.lock().expect("not poisoned").insert(key);
        Ok(tensor)
    }
}

/// True when every value of the float tensor `t` is finite: `0 · t` is 0 exactly for finite values
/// and NaN for NaN and ±inf, so one sum on the tensor's own device decides.
pub fn all_finite(t: &Tensor) -> candle_core::Result<bool> {
    if t.elem_count() == 0 {
        return Ok(true);
    }
    let zeros = (t * 0.0)?.to_dtype(DType::F32)?;
    Ok(zeros.abs()?.sum_all()?.to_scalar::<f32>()? == 0.0)
}

impl SimpleBackend for CheckedSafetensors {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, Some(&s), dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, None, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.key_file.contains_key(&self.rename.checkpoint_name(name))
    }
}

/// `(file length, the first 8 + N bytes: the header's length and the header)` of a safetensors file.
fn read_header(path: &Path) -> Result<(u64, Vec<u8>), LoadError> {
    use std::io::Read;
    let io = |source| LoadError::Io { path: path.to_owned(), source };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let mut head = vec![0u8; 8];
    file.read_exact(&mut head).map_err(io)?;
    let n = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
    if n > len.saturating_sub(8) {
        return Err(LoadError::Safetensors { path: path.to_owned(), message: format!("header of {n} bytes") });
    }
    head.resize(8 + n as usize, 0);
    file.read_exact(&mut head[8..]).map_err(io)?;
    Ok((len, head))
}

/// Builds a model from safetensors files, turning the first tensor problem into its typed error,
/// and refusing files with tensors the model did not read that `allowed` does not name.
pub fn build_from_safetensors<M>(
    paths: &[PathBuf],
    rename: RenameTable,
    allowed: &AllowedUnused,
    dtype: DType,
    device: &Device,
    build: impl FnOnce(VarBuilder) -> candle_core::Result<M>,
) -> Result<M, LoadError> {
    build_checked(CheckedSafetensors::open(paths, rename)?, allowed, dtype, device, build).map(|(m, _)| m)
}

/// As [`build_from_safetensors`], also returning each file's digest ([`CheckedSafetensors::file_digests`]),
/// hashed as the tensors were read.
pub fn build_fingerprinted<M>(
    paths: &[PathBuf],
    rename: RenameTable,
    allowed: &AllowedUnused,
    dtype: DType,
    device: &Device,
    build: impl FnOnce(VarBuilder) -> candle_core::Result<M>,
) -> Result<(M, Vec<[u8; 32]>), LoadError> {
    let (model, backend) =
        build_checked(CheckedSafetensors::open(paths, rename)?.with_hashing(), allowed, dtype, device, build)?;
    Ok((model, backend.file_digests()?))
}

fn build_checked<M>(
    backend: CheckedSafetensors,
    allowed: &AllowedUnused,
    dtype: DType,
    device: &Device,
    build: impl FnOnce(VarBuilder) -> candle_core::Result<M>,
) -> Result<(M, Arc<CheckedSafetensors>), LoadError> {
    let backend = Arc::new(backend);
    let vb = VarBuilder::from_backend(Box::new(SharedBackend(backend.clone())), dtype, device.clone());
    match build(vb) {
        Ok(model) => {
            backend.check_all_used(allowed)?;
            Ok((model, backend))
        }
        Err(e) => Err(backend.take_error().unwrap_or(LoadError::Candle(e))),
    }
}

/// Lets the caller keep a handle on the backend the `VarBuilder` owns.
struct SharedBackend(Arc<CheckedSafetensors>);

impl SimpleBackend for SharedBackend {
    fn get(&self, s: Shape, name: &str, h: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.get(s, name, h, dtype, dev)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.get_unchecked(name, dtype, dev)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_tensor(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_source_parsing() {
        assert_eq!(
            ModelSource::parse("Salesforce/blip-itm-base-coco"),
            ModelSource::Hub { id: "Salesforce/blip-itm-base-coco".into(), revision: None }
        );
        assert_eq!(
            ModelSource::parse("Salesforce/blip-itm-base-coco@main"),
            ModelSource::Hub { id: "Salesforce/blip-itm-base-coco".into(), revision: Some("main".into()) }
        );
        assert_eq!(ModelSource::parse("./models/x"), ModelSource::Dir("./models/x".into()));
        assert_eq!(ModelSource::parse("a/b/c"), ModelSource::Dir("a/b/c".into()));
    }

    #[test]
    fn blip_original_renames() {
        let t = RenameTable::blip_original();
        assert_eq!(
            t.checkpoint_name("vision_model.encoder.layers.3.self_attn.qkv.weight"),
            "visual_encoder.blocks.3.attn.qkv.weight"
        );
        assert_eq!(t.checkpoint_name("vision_model.post_layernorm.bias"), "visual_encoder.norm.bias");
        assert_eq!(
            t.checkpoint_name("text_encoder.embeddings.LayerNorm.weight"),
            "text_encoder.embeddings.LayerNorm.weight"
        );
    }

    #[cfg(feature = "hub")]
    #[test]
    fn offline_hub_miss_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        // SAFETY (test): environment changes are confined to this test's process; no other test
        // in this crate reads these variables.
        unsafe {
            std::env::set_var("HF_HOME", dir.path());
            std::env::remove_var("HF_HUB_CACHE");
            std::env::set_var("HF_HUB_OFFLINE", "1");
        }
        let err = ModelSource::parse("nobody/no-such-model").resolve().unwrap_err().to_string();
        assert!(err.contains("nobody/no-such-model") && err.contains("HF_HUB_OFFLINE"), "{err}");

        // An artifact folder in the cache (hf-hub's layout: refs/main names the snapshot) resolves
        // to its snapshot folder; a required file it lacks is named.
        let repo = dir.path().join("hub").join("models--someone--contextblip-s0");
        let snapshot = repo.join("snapshots").join("0123abcd");
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join("main"), "0123abcd").unwrap();
        for file in ["contextblip.json", "contextblip.safetensors"] {
            std::fs::write(snapshot.join(file), b"{}").unwrap();
        }
        let source = ModelSource::parse("someone/contextblip-s0");
        let found = source.resolve_folder(&["contextblip.json", "contextblip.safetensors"], &["config.json"]).unwrap();
        assert_eq!(found, snapshot);
        let err = source.resolve_folder(&["contextblip.json", "head.safetensors"], &[]).unwrap_err().to_string();
        assert!(err.contains("head.safetensors") && err.contains("HF_HUB_OFFLINE"), "{err}");
    }

    #[test]
    fn local_artifact_folders_must_hold_their_required_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("contextclip.json"), b"{}").unwrap();
        let source = ModelSource::Dir(dir.path().to_owned());
        assert_eq!(source.resolve_folder(&["contextclip.json"], &["finetune.json"]).unwrap(), dir.path());
        match source.resolve_folder(&["contextclip.json", "model.safetensors"], &[]) {
            Err(LoadError::MissingFile { path, .. }) => assert_eq!(path, dir.path().join("model.safetensors")),
            other => panic!("expected MissingFile, got {other:?}"),
        }
        let file = dir.path().join("contextclip.json");
        assert!(matches!(ModelSource::Dir(file).resolve_folder(&[], &[]), Err(LoadError::NotAFolder { .. })));
    }
}

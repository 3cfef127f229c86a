//! What a model folder is, and which BLIP a derived folder was built on.
//!
//! A folder given to the wrong command must say what it is ("this is a ContextCLIP folder"), not
//! "contextblip.json: file not found"; and an adapter pre-trained on one BLIP must not be applied to
//! another without a word (its outputs would be noise with exit code 0). [`FolderKind::identify`]
//! tells the kinds apart by their files; [`BaseModel`] is what a ContextBLIP folder records about its
//! BLIP (`"base_model"` in `contextblip.json`). [`write_file`] and [`write_tensors`] are how the owner
//! types (`BlipItm`, `ContextBlip`, `ContextClip`) save their folders: each file atomically, so a
//! crash leaves the old file or the new one, never half of one.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::Tensor;

use serde::{Deserialize, Serialize};

use crate::contextblip::{self, Stage};
use crate::loading::{CheckedSafetensors, LoadError, ModelFiles, RenameTable};

/// The kinds of folders ctxalign reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FolderKind {
    /// A BLIP in the HF layout (`config.json`, weights), without ContextBLIP files.
    Blip,
    /// A ContextBLIP folder of the given stage (`contextblip.json`).
    ContextBlip(Stage),
    /// A ContextCLIP model (`contextclip.json`).
    ContextClip,
}

impl FolderKind {
    /// The kind of `dir` by its files, `None` when it is none of them (or not a folder).
    pub fn identify(dir: &Path) -> Option<Self> {
        if dir.join(contextblip::CONFIG_FILE).is_file() {
            return contextblip::folder_stage(dir).ok().map(Self::ContextBlip);
        }
        if dir.join(crate::contextclip::CONFIG_FILE).is_file() {
            return Some(Self::ContextClip);
        }
        let weights = ["model.safetensors", "model.safetensors.index.json"].iter().any(|f| dir.join(f).is_file());
        (dir.join("config.json").is_file() && weights).then_some(Self::Blip)
    }

    /// "a ContextCLIP folder (contextclip.json)", for error messages.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Blip => "a BLIP model folder (config.json and weights, no ContextBLIP files)",
            Self::ContextBlip(stage) => stage.describe(),
            Self::ContextClip => "a ContextCLIP folder (contextclip.json)",
        }
    }
}

/// The error for a folder that lacks `file` because it is another kind of folder (or none):
/// names what it is, and what `purpose` needs.
pub fn wrong_folder(dir: &Path, file: &str, needs: &str) -> LoadError {
    let what = match FolderKind::identify(dir) {
        Some(kind) => format!("this is {}", kind.describe()),
        None if dir.is_dir() => "this folder holds no ctxalign or HF model files".to_string(),
        None => "there is no such folder".to_string(),
    };
    LoadError::MissingFile { path: dir.join(file), what: format!("{what}; {needs}") }
}

/// Writes `bytes` to `dir/name` atomically, creating `dir` when needed.
pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), LoadError> {
    Ok(ctxalign_data::write_atomic(&dir.join(name), bytes)?)
}

/// Writes `tensors` as the safetensors file `dir/name` atomically, creating `dir` when needed.
pub fn write_tensors(dir: &Path, name: &str, tensors: &BTreeMap<String, Tensor>) -> Result<(), LoadError> {
    Ok(ctxalign_data::write_safetensors(&dir.join(name), tensors)?)
}

/// A checkpoint a folder was built on: the BLIP of a ContextBLIP folder, the checkpoints a
/// ContextCLIP started from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseModel {
    /// The folder (or weights file) it was read from (for a hub id, its cache snapshot, which names
    /// the repository).
    pub source: String,
    /// [`ModelFiles::fingerprint`] of it (`sha256:…`); folders written before it covered every byte
    /// hold the sampled fingerprint of [`sampled_fingerprint`] (16 hex digits).
    pub fingerprint: String,
}

impl BaseModel {
    /// The model of `files`: its folder and [`ModelFiles::fingerprint`] (a pass over its weights).
    pub fn of(files: &ModelFiles) -> Result<Self, LoadError> {
        Ok(Self { source: source_of(files), fingerprint: files.fingerprint()? })
    }

    /// As [`BaseModel::of`], from the file digests taken while the model was loaded
    /// ([`crate::loading::build_fingerprinted`]): no second pass.
    pub fn from_digests(files: &ModelFiles, digests: &[[u8; 32]]) -> Result<Self, LoadError> {
        Ok(Self { source: source_of(files), fingerprint: fingerprint_of(Some(&files.config), digests)? })
    }

    /// The model read from `source` whose config file is `config` and whose weights files hashed to
    /// `digests` while it was loaded (a folder whose config is not `config.json`: ContextCLIP's).
    pub fn from_config_digests(source: &Path, config: &Path, digests: &[[u8; 32]]) -> Result<Self, LoadError> {
        Ok(Self { source: source.display().to_string(), fingerprint: fingerprint_of(Some(config), digests)? })
    }

    /// A checkpoint that is one weights file without a config (a tower's `model.safetensors`).
    pub fn of_weights(path: &Path) -> Result<Self, LoadError> {
        let st = CheckedSafetensors::open(&[path.to_owned()], RenameTable::identity())?;
        Ok(Self { source: path.display().to_string(), fingerprint: fingerprint_of(None, &st.file_digests()?)? })
    }

    /// Whether `files`, whose [`BaseModel`] is `given`, is this checkpoint. A record of the older,
    /// sampled kind is compared by that kind (all such a record can tell).
    pub fn matches(&self, given: &BaseModel, files: &ModelFiles) -> Result<bool, LoadError> {
        if self.fingerprint.starts_with(FULL) {
            return Ok(self.fingerprint == given.fingerprint);
        }
        let weights: Vec<&Path> = files.weights.iter().map(|p| p.as_path()).collect();
        Ok(self.fingerprint == sampled_fingerprint(Some(&files.config), &weights)?)
    }
}

fn source_of(files: &ModelFiles) -> String {
    files.config.parent().map(|p| p.display().to_string()).unwrap_or_default()
}

/// The prefix of full fingerprints.
const FULL: &str = "sha256:";

impl ModelFiles {
    /// A fingerprint of the checkpoint: SHA-256 over `config.json` and every byte of each weights
    /// file (its length, its header, each tensor's bytes: [`CheckedSafetensors::file_digests`]).
    /// Any changed tensor, anywhere in the file, changes it.
    pub fn fingerprint(&self) -> Result<String, LoadError> {
        let st = CheckedSafetensors::open(&self.weights, RenameTable::identity())?;
        fingerprint_of(Some(&self.config), &st.file_digests()?)
    }
}

/// [`ModelFiles::fingerprint`] of a config (when there is one) and the weights files' digests.
fn fingerprint_of(config: Option<&Path>, digests: &[[u8; 32]]) -> Result<String, LoadError> {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    hash.update(b"ctxalign checkpoint fingerprint 2\0");
    match config {
        Some(path) => {
            let bytes = std::fs::read(path).map_err(|source| LoadError::Io { path: path.to_owned(), source })?;
            hash.update((bytes.len() as u64).to_le_bytes());
            hash.update(&bytes);
        }
        None => hash.update(u64::MAX.to_le_bytes()),
    }
    for digest in digests {
        hash.update(digest);
    }
    let hex: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("{FULL}{hex}"))
}

/// Bytes read from each end of a weights file for the sampled fingerprint.
const SAMPLE: u64 = 1 << 20;

/// The fingerprint folders recorded before [`ModelFiles::fingerprint`] covered every byte: FNV-1a
/// over the config and, per weights file, its length and its first and last MiB. Kept only to
/// compare with those records; a change in the middle of a file escapes it.
pub fn sampled_fingerprint(config: Option<&Path>, weights: &[&Path]) -> Result<String, LoadError> {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LoadError + '_ {
        move |source| LoadError::Io { path: path.to_owned(), source }
    }
    let mut hash: u64 = 0xcbf29ce484222325;
    let mut update = |bytes: &[u8]| {
        hash = bytes.iter().fold(hash, |h, &b| (h ^ b as u64).wrapping_mul(0x100000001b3));
    };
    if let Some(config) = config {
        update(&std::fs::read(config).map_err(io(config))?);
    }
    for &path in weights {
        let mut file = std::fs::File::open(path).map_err(io(path))?;
        let len = file.metadata().map_err(io(path))?.len();
        update(&len.to_le_bytes());
        let mut buf = Vec::new();
        (&mut file).take(SAMPLE).read_to_end(&mut buf).map_err(io(path))?;
        update(&buf);
        if len > SAMPLE {
            file.seek(SeekFrom::Start(len - SAMPLE)).map_err(io(path))?;
            buf.clear();
            file.take(SAMPLE).read_to_end(&mut buf).map_err(io(path))?;
            update(&buf);
        }
    }
    Ok(format!("{hash:016x}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path, config: &[u8], tensors: &BTreeMap<String, Tensor>) -> ModelFiles {
        std::fs::write(dir.join("config.json"), config).unwrap();
        write_tensors(dir, "model.safetensors", tensors).unwrap();
        ModelFiles {
            config: dir.join("config.json"),
            weights: vec![dir.join("model.safetensors")],
            weight_index: None,
            tokenizer: None,
            preprocessor_config: None,
        }
    }

    /// Five tensors of 1 MiB each: the middle one lies outside the first and last MiB.
    fn five_mib(middle_value: f32) -> BTreeMap<String, Tensor> {
        (0..5)
            .map(|i| {
                let mut v: Vec<f32> = (0..1usize << 18).map(|j| ((i * 7 + j) % 251) as f32).collect();
                if i == 2 {
                    v[1000] = middle_value;
                }
                (format!("t{i}"), Tensor::from_vec(v, 1usize << 18, &candle_core::Device::Cpu).unwrap())
            })
            .collect()
    }

    /// The fingerprint covers every byte: a value changed in a tensor in the middle of the file
    /// (where the older sampled fingerprint never looked) changes it, and a recorded base model
    /// no longer matches.
    #[test]
    fn fingerprints_cover_every_byte() {
        let tmp = tempfile::tempdir().unwrap();
        let (d1, d2) = (tmp.path().join("a"), tmp.path().join("b"));
        std::fs::create_dir_all(&d1).unwrap();
        std::fs::create_dir_all(&d2).unwrap();
        let a = files(&d1, b"{}", &five_mib(0.0));
        let fa = a.fingerprint().unwrap();
        assert!(fa.starts_with("sha256:"), "{fa}");
        assert_eq!(fa, a.fingerprint().unwrap(), "deterministic");
        let b = files(&d2, b"{}", &five_mib(0.5));
        let sampled = |f: &ModelFiles| sampled_fingerprint(Some(&f.config), &[f.weights[0].as_path()]).unwrap();
        assert_eq!(sampled(&a), sampled(&b), "the middle MiB escapes the sampled fingerprint");
        assert_ne!(fa, b.fingerprint().unwrap(), "a tensor in the middle changed");
        let recorded = BaseModel::of(&a).unwrap();
        let given = BaseModel::of(&b).unwrap();
        assert!(!recorded.matches(&given, &b).unwrap());
        assert!(recorded.matches(&BaseModel::of(&a).unwrap(), &a).unwrap());
        // A record of the older kind is compared by that kind.
        let old = BaseModel { fingerprint: sampled(&a), ..recorded.clone() };
        assert!(old.matches(&given, &a).unwrap());
        assert_ne!(fa, files(&d1, b"{ }", &five_mib(0.0)).fingerprint().unwrap(), "config changed");

        // Digests taken while some tensors were read equal the separate pass.
        let a = files(&d1, b"{}", &five_mib(0.0));
        let st = CheckedSafetensors::open(&a.weights, RenameTable::identity()).unwrap().with_hashing();
        use candle_nn::var_builder::SimpleBackend;
        st.get_unchecked("t3", candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        st.get_unchecked("t0", candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        assert_eq!(BaseModel::from_digests(&a, &st.file_digests().unwrap()).unwrap().fingerprint, fa);
    }

    /// A BLIP saved by its owner type loads again with the same weights; a config that would not
    /// load is refused before anything is written.
    #[test]
    fn a_saved_blip_loads_again_and_a_bad_config_writes_nothing() {
        use crate::blip::{BlipConfig, BlipFolderFiles, BlipItm};
        use candle_core::{DType, Device};
        let tmp = tempfile::tempdir().unwrap();
        let cfg = BlipConfig::vignettes_small(50);
        let varmap = candle_nn::VarMap::new();
        let model = BlipItm::new(&cfg, candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
        let tensors: BTreeMap<String, Tensor> =
            varmap.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
        let dir = tmp.path().join("blip");
        let files = BlipFolderFiles::new(&cfg, Some(b"{}".to_vec()), Some(b"{}".to_vec()));
        BlipItm::save(&dir, &files, &tensors).unwrap();
        assert_eq!(FolderKind::identify(&dir), Some(FolderKind::Blip));
        let saved = ModelFiles::from_dir(&dir).unwrap();
        assert!(saved.tokenizer.is_some() && saved.preprocessor_config.is_some());
        let loaded = BlipItm::load(&saved, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(loaded.config, cfg);
        let (a, b) = (model.itm_head.weight(), loaded.itm_head.weight());
        assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
        // Copying an existing BLIP keeps its config byte for byte.
        let copy = tmp.path().join("copy");
        BlipItm::save(&copy, &BlipFolderFiles::read(&saved).unwrap(), &tensors).unwrap();
        assert_eq!(std::fs::read(copy.join("config.json")).unwrap(), std::fs::read(&saved.config).unwrap());

        let mut bad = cfg.clone();
        bad.text_config.encoder_hidden_size += 1;
        let other = tmp.path().join("bad");
        let e = BlipItm::save(&other, &BlipFolderFiles::new(&bad, None, None), &tensors).unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains("encoder_hidden_size"), "{e}");
        assert!(!other.exists(), "nothing written");
    }

    #[test]
    fn folders_say_what_they_are() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        assert_eq!(FolderKind::identify(dir), None);
        let e = wrong_folder(dir, "contextclip.json", "retrieval needs a ContextCLIP folder").to_string();
        assert!(e.contains("holds no ctxalign or HF model files") && e.contains("retrieval needs"), "{e}");
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        assert_eq!(FolderKind::identify(dir), None, "a config.json alone is not a model");
        std::fs::write(dir.join("model.safetensors"), "").unwrap();
        assert_eq!(FolderKind::identify(dir), Some(FolderKind::Blip));
        std::fs::write(dir.join("contextclip.json"), "{}").unwrap();
        assert_eq!(FolderKind::identify(dir), Some(FolderKind::ContextClip));
        let e = wrong_folder(dir, "contextblip.json", "zero-shot needs an S0 folder").to_string();
        assert!(e.contains("this is a ContextCLIP folder"), "{e}");
        let config = contextblip::ContextBlipConfig::for_blip(&crate::blip::BlipConfig::itm_base_224());
        std::fs::write(dir.join("contextblip.json"), contextblip::ContextBlipRecord::new(Stage::S1, config).to_json())
            .unwrap();
        assert_eq!(FolderKind::identify(dir), Some(FolderKind::ContextBlip(Stage::S1)));
        let missing = wrong_folder(&dir.join("nope"), "contextblip.json", "x").to_string();
        assert!(missing.contains("no such folder"), "{missing}");
    }
}

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
use crate::loading::{LoadError, ModelFiles};

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
    /// [`ModelFiles::fingerprint`] of it.
    pub fingerprint: String,
}

impl BaseModel {
    /// The model of `files`: its folder and [`ModelFiles::fingerprint`].
    pub fn of(files: &ModelFiles) -> Result<Self, LoadError> {
        let source = files.config.parent().map(|p| p.display().to_string()).unwrap_or_default();
        Ok(Self { source, fingerprint: files.fingerprint()? })
    }

    /// A checkpoint that is one weights file without a config (a tower's `model.safetensors`).
    pub fn of_weights(path: &Path) -> Result<Self, LoadError> {
        Ok(Self { source: path.display().to_string(), fingerprint: fingerprint(None, std::slice::from_ref(&path))? })
    }
}

/// Bytes read from each end of a weights file for its fingerprint.
const SAMPLE: u64 = 1 << 20;

impl ModelFiles {
    /// A fingerprint of the checkpoint: FNV-1a over `config.json` and, per weights file, its length
    /// and its first and last MiB (the safetensors header, which lists every tensor's name, shape
    /// and offset, and the last tensors' values). Cheap for a 900 MB checkpoint, and different for
    /// any other checkpoint in practice; it is not a cryptographic hash.
    pub fn fingerprint(&self) -> Result<String, LoadError> {
        let weights: Vec<&Path> = self.weights.iter().map(|p| p.as_path()).collect();
        fingerprint(Some(&self.config), &weights)
    }
}

/// [`ModelFiles::fingerprint`] of a config (when there is one) and weights files.
fn fingerprint(config: Option<&Path>, weights: &[&Path]) -> Result<String, LoadError> {
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

    fn files(dir: &Path, config: &[u8], weights: &[u8]) -> ModelFiles {
        std::fs::write(dir.join("config.json"), config).unwrap();
        std::fs::write(dir.join("model.safetensors"), weights).unwrap();
        ModelFiles {
            config: dir.join("config.json"),
            weights: vec![dir.join("model.safetensors")],
            weight_index: None,
            tokenizer: None,
            preprocessor_config: None,
        }
    }

    #[test]
    fn fingerprints_tell_checkpoints_apart() {
        let tmp = tempfile::tempdir().unwrap();
        let big: Vec<u8> = (0..3 * SAMPLE as usize).map(|i| (i % 251) as u8).collect();
        let a = files(tmp.path(), b"{}", &big).fingerprint().unwrap();
        assert_eq!(a, files(tmp.path(), b"{}", &big).fingerprint().unwrap(), "deterministic");
        let mut tail = big.clone();
        *tail.last_mut().unwrap() ^= 1;
        assert_ne!(a, files(tmp.path(), b"{}", &tail).fingerprint().unwrap(), "last tensor changed");
        assert_ne!(a, files(tmp.path(), b"{ }", &big).fingerprint().unwrap(), "config changed");
        assert_ne!(a, files(tmp.path(), b"{}", &big[..big.len() - 1]).fingerprint().unwrap(), "length changed");
        let small = files(tmp.path(), b"{}", b"12345").fingerprint().unwrap();
        assert_ne!(small, files(tmp.path(), b"{}", b"12346").fingerprint().unwrap());
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

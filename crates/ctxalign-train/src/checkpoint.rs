//! Training checkpoints: model, optimizer, schedule, RNG seed and data position, written
//! atomically (a temporary folder, each file synced, then one rename), the last N kept.
//!
//! Layout of `<dir>/step-00001234/`:
//! - `model.safetensors`: the trainable parameters under their model (HF) key names (the f32
//!   masters under mixed precision);
//! - `optimizer.safetensors`: `<param>.exp_avg`, `<param>.exp_avg_sq`;
//! - `trainer_state.json`: [`TrainerState`] (step, epoch, batch position, seed, schedule, optimizer
//!   step counts and groups).
//!
//! A folder is complete exactly when it has its final name; `.tmp-*` folders left by a crash are
//! ignored and removed before the next save, and a save that fails removes its own.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::optim::{Adam, AdamMeta};
use crate::params::TrainableParams;
use crate::schedule::Schedule;

/// Everything but the tensors.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: u64,
    /// Epoch in progress (0-based).
    pub epoch: u64,
    /// Micro-batches of `epoch` already consumed.
    pub batch_in_epoch: usize,
    /// Run seed: the data order, augmentation and every random draw derive from (seed, epoch,
    /// sample) or (seed, step), so the seed and the position are the whole RNG state.
    pub seed: u64,
    pub schedule: Schedule,
    pub optimizer: AdamMeta,
    /// Free-form additions of the caller (e.g. best validation score, run settings).
    #[serde(default)]
    pub extra: serde_json::Value,
    /// Ranks of the data-parallel run that wrote it (1 before data parallelism was recorded).
    #[serde(default = "one_rank")]
    pub world_size: usize,
}

fn one_rank() -> usize {
    1
}

const MODEL_FILE: &str = "model.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const STATE_FILE: &str = "trainer_state.json";
/// In the checkpoints folder: the newest step saved, rewritten by every save. A resume that finds
/// an older checkpoint than this names the difference instead of continuing from it without a word.
const LATEST_FILE: &str = "latest.json";

/// A checkpoint's three files as bytes.
#[derive(Debug, Clone)]
pub struct CheckpointBytes {
    pub model: Vec<u8>,
    pub optimizer: Vec<u8>,
    pub state: Vec<u8>,
}

impl CheckpointBytes {
    /// Reads the files of the checkpoint folder `path`.
    pub fn read(path: &Path) -> Result<Self> {
        let read = |name: &str| -> Result<Vec<u8>> {
            let file = path.join(name);
            if !file.is_file() {
                return Err(TrainError::checkpoint(&file, "file missing"));
            }
            std::fs::read(&file).map_err(|e| TrainError::io(&file, e))
        };
        Ok(Self { model: read(MODEL_FILE)?, optimizer: read(OPTIMIZER_FILE)?, state: read(STATE_FILE)? })
    }
}

/// A loaded checkpoint.
pub struct Checkpoint {
    pub path: PathBuf,
    pub model: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
    pub state: TrainerState,
}

impl Checkpoint {
    /// The step a checkpoint folder holds, read from its name (`step-00000300` → 300).
    pub fn step_of(path: &Path) -> Option<u64> {
        path.file_name()?.to_str()?.strip_prefix("step-")?.parse().ok()
    }

    /// Reads a checkpoint folder into host memory; [`Checkpoint::restore`] places each tensor on its
    /// parameter's device and dtype.
    pub fn load(path: &Path) -> Result<Self> {
        Self::from_bytes(path, CheckpointBytes::read(path)?)
    }

    /// A checkpoint from its files' contents (as [`CheckpointBytes::read`] gives them: what rank 0
    /// of a data-parallel run sends the others); `path` names it in errors.
    pub fn from_bytes(path: &Path, bytes: CheckpointBytes) -> Result<Self> {
        let parse = |name: &str, data: &[u8]| -> Result<HashMap<String, Tensor>> {
            candle_core::safetensors::load_buffer(data, &Device::Cpu)
                .map_err(|e| TrainError::checkpoint(&path.join(name), e.to_string()))
        };
        let state_file = path.join(STATE_FILE);
        let state: TrainerState = serde_json::from_slice(&bytes.state)
            .map_err(|e| TrainError::checkpoint(&state_file, format!("malformed trainer state: {e}")))?;
        Ok(Self {
            path: path.to_owned(),
            model: parse(MODEL_FILE, &bytes.model)?,
            optimizer: parse(OPTIMIZER_FILE, &bytes.optimizer)?,
            state,
        })
    }

    /// Copies the saved parameters into `params`: every trainable parameter must be present with
    /// its shape, and every saved tensor must be one of them (a checkpoint written by a run whose
    /// model had more layers or taps than this one would otherwise resume with part of its
    /// weights dropped, silently).
    pub fn restore_params(&self, params: &TrainableParams) -> Result<()> {
        let file = self.path.join(MODEL_FILE);
        for (name, var) in &params.vars {
            let t = self.model.get(name).ok_or_else(|| {
                TrainError::checkpoint(&file, format!("tensor `{name}` is missing (expected shape {:?})", var.dims()))
            })?;
            if t.dims() != var.dims() {
                return Err(TrainError::checkpoint(
                    &file,
                    format!("tensor `{name}` has shape {:?}, the model expects {:?}", t.dims(), var.dims()),
                ));
            }
        }
        let unused: Vec<&String> = self.model.keys().filter(|k| !params.vars.contains_key(*k)).collect();
        if !unused.is_empty() {
            let shown: Vec<String> = unused.iter().take(12).map(|k| format!("`{k}`")).collect();
            let more = if unused.len() > 12 { format!(" and {} more", unused.len() - 12) } else { String::new() };
            return Err(TrainError::checkpoint(
                &file,
                format!(
                    "{} saved tensor(s) are not parameters of the model being resumed: {}{more} (the checkpoint \
                     was written by a run of another model)",
                    unused.len(),
                    shown.join(", ")
                ),
            ));
        }
        // Checked whole before anything is set: a refused checkpoint leaves the parameters as
        // they were.
        for name in params.vars.keys() {
            params.set(name, &self.model[name])?;
        }
        Ok(())
    }

    /// Restores parameters and optimizer moments.
    pub fn restore(&self, params: &TrainableParams, optimizer: &mut Adam) -> Result<()> {
        self.restore_params(params)?;
        optimizer.load_state_dict(&self.optimizer, &self.state.optimizer, &self.path.join(OPTIMIZER_FILE))
    }
}

/// Writes checkpoints into a folder and keeps the last `keep_last`.
#[derive(Debug, Clone)]
pub struct Checkpointer {
    pub dir: PathBuf,
    pub keep_last: usize,
}

impl Checkpointer {
    pub fn new(dir: impl Into<PathBuf>, keep_last: usize) -> Self {
        Self { dir: dir.into(), keep_last: keep_last.max(1) }
    }

    /// Complete checkpoints, oldest first.
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>> {
        let mut found = vec![];
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
            Err(e) => return Err(TrainError::io(&self.dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| TrainError::io(&self.dir, e))?;
            if let Some(step) = Checkpoint::step_of(&entry.path()) {
                found.push((step, entry.path()));
            }
        }
        found.sort();
        Ok(found)
    }

    /// The folder the checkpoint of `step` is (or would be) saved in.
    pub fn path_for(&self, step: u64) -> PathBuf {
        self.dir.join(format!("step-{step:08}"))
    }

    pub fn latest(&self) -> Result<Option<PathBuf>> {
        Ok(self.list()?.pop().map(|(_, p)| p))
    }

    /// Saves a checkpoint atomically and prunes older ones. Returns its folder.
    ///
    /// Temporary folders of earlier failed or killed saves are removed first, and this save's own
    /// is removed when writing it fails (a full disk, say), so a failure leaves the folder as it
    /// was: the last complete checkpoint and nothing else.
    pub fn save(&self, params: &TrainableParams, optimizer: &Adam, state: &TrainerState) -> Result<PathBuf> {
        std::fs::create_dir_all(&self.dir).map_err(|e| TrainError::io(&self.dir, e))?;
        self.remove_temporaries()?;
        let final_dir = self.path_for(state.step);
        let tmp = self.dir.join(format!(".tmp-step-{:08}-{}", state.step, std::process::id()));
        let written = (|| -> Result<()> {
            std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
            write_safetensors(&tmp.join(MODEL_FILE), &params.tensors())?;
            let (moments, _) = optimizer.state_dict()?;
            write_safetensors(&tmp.join(OPTIMIZER_FILE), &moments)?;
            let json = serde_json::to_vec_pretty(state).map_err(|e| TrainError::checkpoint(&tmp, e.to_string()))?;
            Ok(ctxalign_data::write_atomic(&tmp.join(STATE_FILE), &json)?)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        if final_dir.exists() {
            // Re-saving the same step (e.g. Ctrl-C right after a periodic save): replace it.
            std::fs::remove_dir_all(&final_dir).map_err(|e| TrainError::io(&final_dir, e))?;
        }
        std::fs::rename(&tmp, &final_dir).map_err(|e| TrainError::io(&final_dir, e))?;
        ctxalign_data::sync_dir(&self.dir);
        let latest = serde_json::json!({ "step": state.step }).to_string();
        ctxalign_data::write_atomic(&self.dir.join(LATEST_FILE), latest.as_bytes())?;
        self.prune()?;
        Ok(final_dir)
    }

    /// The step of the newest checkpoint saved into this folder, as the last save recorded it
    /// (`None` before any, or in a folder written before the record was kept). When it is newer
    /// than [`Checkpointer::latest`], checkpoints were deleted since.
    pub fn recorded_latest(&self) -> Option<u64> {
        let text = std::fs::read_to_string(self.dir.join(LATEST_FILE)).ok()?;
        serde_json::from_str::<serde_json::Value>(&text).ok()?.get("step")?.as_u64()
    }

    /// Removes every `.tmp-step-*` folder: a save in progress is this process's own, and only one
    /// process trains into a folder.
    fn remove_temporaries(&self) -> Result<()> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(TrainError::io(&self.dir, e)),
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(".tmp-step-") {
                std::fs::remove_dir_all(entry.path()).map_err(|e| TrainError::io(&entry.path(), e))?;
            }
        }
        Ok(())
    }

    fn prune(&self) -> Result<()> {
        let all = self.list()?;
        let excess = all.len().saturating_sub(self.keep_last);
        for (_, path) in &all[..excess] {
            std::fs::remove_dir_all(path).map_err(|e| TrainError::io(path, e))?;
        }
        Ok(())
    }
}

/// Reads every tensor of safetensors `files` into host memory (later files win on a repeated key);
/// the caller places them on its device.
pub fn read_all(files: &[std::path::PathBuf]) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for f in files {
        let tensors =
            candle_core::safetensors::load(f, &Device::Cpu).map_err(|e| TrainError::checkpoint(f, e.to_string()))?;
        out.extend(tensors);
    }
    Ok(out)
}

/// Writes tensors to a safetensors file atomically ([`ctxalign_data::write_safetensors`]).
pub fn write_safetensors(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    Ok(ctxalign_data::write_safetensors(path, tensors)?)
}

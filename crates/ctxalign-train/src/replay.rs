//! Replaying a reference run: its exact batches and its random choices, fed to the library's own
//! training loop.
//!
//! A step fixture (`tests/fixtures/steps_*`, made by a PyTorch generator) records what one
//! reference training run saw and chose: the micro-batch of every optimizer step (processed pixels,
//! captions, labels, data-set indices, in the reference's shuffled order) and every random draw it
//! made (hard-negative indices, masked patches, …). [`Replay`] holds them; a recipe given one
//! ([`RecordedBatches`] as its loader, [`Replay::draw`] where an objective would draw) runs the
//! same loop, optimizer, schedule and clipping as any other run, so the step-by-step comparison
//! checks the code users train with, not a test copy of it.
//!
//! Files of a replay (the step fixture's layout):
//! - `batches.safetensors`: `step.{k}.{field}` for each step k (`pixels` `[b, …]` f32, `indices`
//!   `[b]` i64, plus the fields of the recipe's samples, e.g. `image_index`, `label`, `target`), and
//!   the draws, `step.{k}.draw.{name}`;
//! - `batches.json`: `{"steps": K, "batches_per_epoch": n, "texts": [[text per sample] per step]}`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use ctxalign_data::loader::{Batch, BatchSource, CaptionSample, EpochIter, LabeledImage};
use ctxalign_data::DataError;
use serde::Deserialize;

use crate::error::{Result, TrainError};

/// What a reference run saw and drew, step by step.
#[derive(Debug, Clone)]
pub struct Replay {
    /// The folder it was read from (named in errors).
    pub dir: PathBuf,
    /// Optimizer steps recorded (one micro-batch each).
    pub steps: usize,
    /// Micro-batches per epoch of the reference run (the recorded steps fill whole epochs, so a
    /// per-epoch schedule changes inside them).
    pub batches_per_epoch: usize,
    tensors: Arc<HashMap<String, Tensor>>,
    texts: Arc<Vec<Vec<String>>>,
}

#[derive(Deserialize)]
struct ReplayIndex {
    steps: usize,
    batches_per_epoch: usize,
    #[serde(default)]
    texts: Vec<Vec<String>>,
}

/// Batch file of a replay.
pub const BATCHES_FILE: &str = "batches.safetensors";
/// Index of a replay (steps, epochs, texts).
pub const INDEX_FILE: &str = "batches.json";

impl Replay {
    /// Reads `dir/batches.safetensors` and `dir/batches.json` (onto the CPU).
    pub fn read(dir: &Path) -> Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        let text = std::fs::read_to_string(&index_path).map_err(|e| TrainError::io(&index_path, e))?;
        let index: ReplayIndex = serde_json::from_str(&text)
            .map_err(|e| TrainError::checkpoint(&index_path, format!("not a replay index: {e}")))?;
        if index.steps == 0 || index.batches_per_epoch == 0 || !index.steps.is_multiple_of(index.batches_per_epoch) {
            return Err(TrainError::checkpoint(
                &index_path,
                format!(
                    "{} steps of {} batches per epoch: a replay holds whole epochs of at least one batch",
                    index.steps, index.batches_per_epoch
                ),
            ));
        }
        if !index.texts.is_empty() && index.texts.len() != index.steps {
            return Err(TrainError::checkpoint(
                &index_path,
                format!("texts for {} steps, {} steps recorded", index.texts.len(), index.steps),
            ));
        }
        let batches = dir.join(BATCHES_FILE);
        let tensors = candle_core::safetensors::load(&batches, &Device::Cpu)
            .map_err(|e| TrainError::checkpoint(&batches, format!("cannot read the recorded batches: {e}")))?;
        let replay = Self {
            dir: dir.to_owned(),
            steps: index.steps,
            batches_per_epoch: index.batches_per_epoch,
            tensors: Arc::new(tensors),
            texts: Arc::new(index.texts),
        };
        for step in 0..replay.steps {
            replay.step_tensor(step, "indices")?;
        }
        Ok(replay)
    }

    /// Epochs the recorded steps fill.
    pub fn epochs(&self) -> u64 {
        (self.steps / self.batches_per_epoch) as u64
    }

    /// `step.{step}.{field}`, or an error naming the file and the key.
    pub fn step_tensor(&self, step: usize, field: &str) -> Result<Tensor> {
        let key = format!("step.{step}.{field}");
        self.tensors.get(&key).cloned().ok_or_else(|| {
            TrainError::checkpoint(&self.dir.join(BATCHES_FILE), format!("the recorded batches lack `{key}`"))
        })
    }

    /// A recorded tensor outside the steps (`test.images`, say), or an error naming the key.
    pub fn recorded(&self, key: &str) -> Result<Tensor> {
        self.tensors.get(key).cloned().ok_or_else(|| {
            TrainError::checkpoint(&self.dir.join(BATCHES_FILE), format!("the recorded batches lack `{key}`"))
        })
    }

    /// The reference's random draw `name` at optimizer step `step` (`step.{step}.draw.{name}`), on
    /// `device`. An objective replaying a run takes this where it would draw.
    pub fn draw(&self, step: u64, name: &str, device: &Device) -> Result<Tensor> {
        Ok(self.step_tensor(step as usize, &format!("draw.{name}"))?.to_device(device)?)
    }

    /// The texts of step `step`'s samples.
    pub fn texts(&self, step: usize) -> Result<&[String]> {
        self.texts.get(step).map(Vec::as_slice).ok_or_else(|| {
            TrainError::checkpoint(&self.dir.join(INDEX_FILE), format!("no texts are recorded for step {step}"))
        })
    }

    /// The recorded micro-batches as the loop's data source.
    pub fn loader<T: FromRecord>(&self) -> Result<RecordedBatches<T>> {
        let mut batches = Vec::with_capacity(self.steps);
        for step in 0..self.steps {
            let indices = as_usize(&self.step_tensor(step, "indices")?)?;
            let record = RecordedStep { replay: self, step };
            let items = (0..indices.len()).map(|row| T::from_record(&record, row)).collect::<Result<Vec<_>>>()?;
            batches.push((indices, items));
        }
        Ok(RecordedBatches {
            dir: self.dir.clone(),
            batches: Arc::new(batches),
            batches_per_epoch: self.batches_per_epoch,
        })
    }
}

fn as_usize(t: &Tensor) -> Result<Vec<usize>> {
    Ok(t.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?.into_iter().map(|v| v as usize).collect())
}

/// One recorded step, as a sample type reads its rows from it.
pub struct RecordedStep<'a> {
    replay: &'a Replay,
    step: usize,
}

impl RecordedStep<'_> {
    /// Row `row` of `step.{k}.{field}`.
    pub fn row(&self, field: &str, row: usize) -> Result<Tensor> {
        Ok(self.replay.step_tensor(self.step, field)?.get(row)?)
    }

    /// Row `row` of a float field, flattened (pixels).
    pub fn floats(&self, field: &str, row: usize) -> Result<Vec<f32>> {
        Ok(self.row(field, row)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
    }

    /// Row `row` of an integer field.
    pub fn index(&self, field: &str, row: usize) -> Result<usize> {
        Ok(self.row(field, row)?.to_dtype(DType::I64)?.to_scalar::<i64>()? as usize)
    }

    /// The text of sample `row`.
    pub fn text(&self, row: usize) -> Result<String> {
        let texts = self.replay.texts(self.step)?;
        texts.get(row).cloned().ok_or_else(|| {
            TrainError::checkpoint(
                &self.replay.dir.join(INDEX_FILE),
                format!("step {} records {} texts, the batch has more samples", self.step, texts.len()),
            )
        })
    }
}

/// A sample type a replay can build from a recorded step.
pub trait FromRecord: Sized + Clone + Send + 'static {
    fn from_record(step: &RecordedStep, row: usize) -> Result<Self>;
}

impl FromRecord for CaptionSample {
    fn from_record(step: &RecordedStep, row: usize) -> Result<Self> {
        Ok(Self {
            pixels: step.floats("pixels", row)?,
            caption: step.text(row)?,
            image_index: step.index("image_index", row)?,
        })
    }
}

impl FromRecord for LabeledImage {
    fn from_record(step: &RecordedStep, row: usize) -> Result<Self> {
        Ok(Self { pixels: step.floats("pixels", row)?, label: step.index("label", row)? })
    }
}

/// The batches of a reference run in its order: epoch e's batch j is recorded step
/// `e · batches_per_epoch + j`. A data source like any loader, so the loop resumes into it too.
#[derive(Clone)]
pub struct RecordedBatches<T> {
    dir: PathBuf,
    batches: Arc<Vec<(Vec<usize>, Vec<T>)>>,
    batches_per_epoch: usize,
}

impl<T: Clone + Send + 'static> BatchSource for RecordedBatches<T> {
    type Item = T;

    fn batches_per_epoch(&self) -> usize {
        self.batches_per_epoch
    }

    fn epoch(&self, epoch: u64, start: usize) -> EpochIter<T> {
        let (tx, rx) = mpsc::channel();
        let first = epoch as usize * self.batches_per_epoch + start;
        let last = (epoch as usize + 1) * self.batches_per_epoch;
        // The receiver is returned below, so the sends cannot fail.
        if last > self.batches.len() {
            let message = format!(
                "the replay records {} steps; epoch {epoch} asks for steps {first}..{last}",
                self.batches.len()
            );
            let _ = tx.send(Err(DataError::Format { path: self.dir.clone(), message }));
        }
        for (indices, items) in self.batches.iter().take(last).skip(first) {
            let _ = tx.send(Ok(Batch { indices: indices.clone(), items: items.clone() }));
        }
        EpochIter::new(rx, Arc::new(Mutex::new(vec![])))
    }
}

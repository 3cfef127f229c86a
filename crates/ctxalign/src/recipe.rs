//! What every training recipe (ContextBLIP's S0/S1/S2, ContextCLIP's training and fine-tuning)
//! shares: the loop settings, running the loop for a number of steps, whole-batch loaders, and the
//! `training.json` record.

use std::path::Path;

use ctxalign_data::loader::{DataLoader, Dataset, LoaderConfig};
use ctxalign_data::write_atomic;
use ctxalign_train::{train, Adam, Interrupt, Objective, Schedule, TrainConfig, TrainSummary, TrainableParams};
use serde::Serialize;

use crate::{Error, Result, Runtime};

/// The loop settings every recipe shares (gradient norm clipped at 5, a checkpoint every 100
/// steps); callers set `max_steps` or `epochs`, `seed`, `resume`, `progress`.
pub(crate) fn recipe_config(out_dir: &Path) -> TrainConfig {
    TrainConfig { clip_norm: Some(5.0), checkpoint_every: 100, ..TrainConfig::new(out_dir) }
}

/// Runs the loop for `cfg.max_steps` steps (enough epochs to reach them), or `cfg.epochs` epochs;
/// Ctrl-C writes a checkpoint and stops.
pub(crate) fn run<D: Dataset, O: Objective<Item = D::Item>>(
    mut cfg: TrainConfig,
    loader: &DataLoader<D>,
    objective: &mut O,
    params: &TrainableParams,
    optimizer: &mut Adam,
    schedule: &mut Schedule,
) -> Result<TrainSummary> {
    let steps = cfg.max_steps.unwrap_or(cfg.epochs * loader.batches_per_epoch() as u64);
    cfg.epochs = steps.div_ceil(loader.batches_per_epoch().max(1) as u64);
    Ok(train(&cfg, loader, objective, params, optimizer, schedule, &Interrupt::ctrl_c()?)?)
}

/// A shuffled loader of whole batches; an error when the data does not fill one.
pub(crate) fn batched_loader<D: Dataset>(dataset: D, batch_size: usize, seed: u64) -> Result<DataLoader<D>> {
    let loader = DataLoader::new(dataset, LoaderConfig { batch_size, seed, drop_last: true, ..Default::default() });
    if loader.batches_per_epoch() == 0 {
        return Err(Error::Invalid(format!("fewer training examples than one batch of {batch_size}")));
    }
    Ok(loader)
}

/// Writes a run's options, device and precision, and report to `file` (atomically;
/// `training.json` by convention).
pub(crate) fn write_record(
    file: &Path,
    options: &impl Serialize,
    runtime: &Runtime,
    report: &impl Serialize,
) -> Result<()> {
    let record = serde_json::json!({ "options": options, "runtime": runtime.record(), "report": report });
    write_atomic(file, serde_json::to_string_pretty(&record).expect("JSON").as_bytes())?;
    Ok(())
}

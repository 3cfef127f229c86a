//! The training loop: micro-batches from a [`DataLoader`], gradient accumulation, clipping, the
//! NaN/Inf guard, an optimizer step at the scheduled learning rate, JSONL metrics, a progress bar,
//! periodic and final checkpoints, exact resume, and Ctrl-C → checkpoint → stop; data-parallel over
//! the ranks of a [`Communicator`].

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Tensor;
use ctxalign_data::loader::{Batch, BatchSource};
use ctxalign_data::DataError;
use ctxalign_eval::progress::Progress;
use serde_json::{Map, Value};

use crate::checkpoint::{Checkpoint, CheckpointBytes, Checkpointer, TrainerState};
use crate::dist::{broadcast_parameters, Communicator, DistError, GradientBuckets, DEFAULT_BUCKET_BYTES};
use crate::error::{Result, TrainError};
use crate::interrupt::Interrupt;
use crate::metrics::{plot_metrics, MetricsLog};
use crate::optim::{clip_grad_norm, grad_norm, Adam, GradAccumulator};
use crate::params::TrainableParams;
use crate::schedule::Schedule;

/// Settings of the loop (the model, data, optimizer and schedule come separately).
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub epochs: u64,
    /// Stop after this many optimizer steps in total (a resumed run counts the earlier ones).
    pub max_steps: Option<u64>,
    /// Micro-batches per optimizer step.
    pub accumulate: usize,
    /// Clip the global gradient norm to this value.
    pub clip_norm: Option<f64>,
    /// Write a checkpoint every this many optimizer steps (0: only at the end and on Ctrl-C).
    pub checkpoint_every: u64,
    pub keep_last: usize,
    /// Seed of every random draw of the objective (the loader has its own, usually the same).
    pub seed: u64,
    /// Receives `checkpoints/`, `metrics.jsonl`, `loss.png`.
    pub out_dir: PathBuf,
    /// Continue from the latest checkpoint in `out_dir/checkpoints`, if any.
    pub resume: bool,
    /// Without `resume`: delete an earlier run's checkpoints, metrics and plot in `out_dir` instead
    /// of refusing to start ([`TrainError::UsedFolder`]).
    pub overwrite: bool,
    /// What defines the run besides the seed (the recipe's options, a fingerprint of its data),
    /// saved in every checkpoint; a resume whose settings differ is refused
    /// ([`TrainError::SettingsChanged`]) unless `accept_changed_settings`.
    pub settings: Value,
    /// Resume even when `settings` differ from the checkpoint's; the differences are reported in
    /// [`TrainSummary::settings_changed`].
    pub accept_changed_settings: bool,
    /// Show a progress bar (rank 0 only).
    pub progress: bool,
    /// The ranks of a data-parallel run ([`Communicator::single`] for one process). Every rank runs
    /// this loop on its share of the data (the loader's [`ctxalign_data::loader::Shard`]); the
    /// gradients are averaged over the ranks before each update, so every rank makes the same
    /// update; rank 0 alone writes checkpoints, metrics and the plot.
    pub comm: Communicator,
    /// Size of the flat buffers the gradients are averaged in ([`GradientBuckets`]).
    pub bucket_bytes: usize,
}

impl TrainConfig {
    pub fn new(out_dir: impl Into<PathBuf>) -> Self {
        Self {
            epochs: 1,
            max_steps: None,
            accumulate: 1,
            clip_norm: None,
            checkpoint_every: 0,
            keep_last: 2,
            seed: 0,
            out_dir: out_dir.into(),
            resume: false,
            overwrite: false,
            settings: Value::Null,
            accept_changed_settings: false,
            progress: true,
            comm: Communicator::single(),
            bucket_bytes: DEFAULT_BUCKET_BYTES,
        }
    }
}

/// Named scalar loss terms of one micro-batch; the loop minimises their sum.
pub struct LossTerms {
    pub terms: Vec<(String, Tensor)>,
    /// Samples in the micro-batch (for throughput).
    pub samples: usize,
}

/// What a model trains on: the loss of a micro-batch, and optional hooks.
///
/// In a data-parallel run every rank calls these with its own micro-batch, and the loop averages the
/// gradients over the ranks: a loss that is a mean over the rank's samples then trains as the mean
/// over the global batch. An objective whose loss couples samples (contrastive logits, hard
/// negatives) gathers what it needs from the other ranks itself
/// ([`Communicator::all_gather_with_grad`]); each rank must make the same collective calls.
pub trait Objective {
    type Item: Send + 'static;
    /// Loss terms of one micro-batch. `step` is the optimizer step it contributes to: derive any
    /// random draw from (seed, step, sample index) so a resumed run draws the same, and a run on
    /// several ranks draws what one process with the whole batch draws.
    fn loss(&mut self, batch: &Batch<Self::Item>, step: u64) -> Result<LossTerms>;
    /// Before the first micro-batch of each optimizer step (BLIP clamps its temperature here).
    fn before_step(&mut self, _step: u64) -> Result<()> {
        Ok(())
    }
    /// At the end of each epoch: metrics to log (computed on rank 0 and shared). When the schedule
    /// has a plateau rule, the first metric (lower is better) feeds it.
    fn validate(&mut self, _epoch: u64) -> Result<Vec<(String, f64)>> {
        Ok(vec![])
    }
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub steps: u64,
    pub epoch: u64,
    /// Mean of each loss term over the last epoch's (or the run's last) optimizer steps, over all
    /// ranks.
    pub last_terms: Vec<(String, f64)>,
    pub last_validation: Vec<(String, f64)>,
    /// The last complete checkpoint (written by rank 0; the same path on every rank).
    pub checkpoint: Option<PathBuf>,
    pub metrics: PathBuf,
    pub plot: Option<PathBuf>,
    pub interrupted: bool,
    pub resumed_from: Option<PathBuf>,
    /// Settings that differ from the resumed checkpoint's run, accepted by
    /// [`TrainConfig::accept_changed_settings`] (`path: was → now`).
    pub settings_changed: Vec<String>,
    /// `(was, now)` when a data-parallel run resumed on another number of ranks with the same global
    /// batch: the data order and every random draw are those of the earlier run.
    pub world_size_changed: Option<(usize, usize)>,
    pub seconds: f64,
    /// Over all ranks.
    pub samples_per_second: f64,
    /// Ranks that trained.
    pub world_size: usize,
    /// Mean seconds per step spent averaging gradients between ranks (0 on one process), as the
    /// host saw it (NCCL's collectives run asynchronously on the device).
    pub communication_seconds_per_step: f64,
    /// What the caller should tell the user about how the run started: a resume that found no
    /// checkpoint and started fresh, a newest checkpoint that was gone, nothing left to train.
    pub notices: Vec<String>,
}

/// How the run starts: decided by rank 0 (which holds the checkpoints), followed by every rank.
enum Start {
    Fresh,
    Resume { path: PathBuf, bytes: CheckpointBytes, settings_changed: Vec<String> },
}

/// Rank 0's decision: refuse a used folder, clear it, start fresh or resume (checking the seed, the
/// settings and the schedule's shape), with what the run's summary should say about it.
fn decide_start(
    cfg: &TrainConfig,
    checkpointer: &Checkpointer,
    schedule: &Schedule,
    max_steps: u64,
) -> Result<(Start, Vec<String>)> {
    if cfg.resume && !cfg.out_dir.is_dir() {
        return Err(TrainError::NothingToResume { dir: cfg.out_dir.clone() });
    }
    let mut notices = vec![];
    let latest = checkpointer.list()?.pop();
    if !cfg.resume {
        if let Some((latest_step, _)) = latest {
            if !cfg.overwrite {
                return Err(TrainError::UsedFolder { dir: cfg.out_dir.clone(), latest_step });
            }
            clear_run(&cfg.out_dir)?;
        }
        return Ok((Start::Fresh, notices));
    }
    let recorded = checkpointer.recorded_latest();
    let Some((found, path)) = latest else {
        notices.push(match recorded {
            Some(step) => format!(
                "resume: the checkpoints of {} (the newest recorded at step {step}) are gone; this run started \
                 from scratch",
                cfg.out_dir.display()
            ),
            None => format!("resume: {} holds no checkpoint; this run started from scratch", cfg.out_dir.display()),
        });
        return Ok((Start::Fresh, notices));
    };
    if let Some(recorded) = recorded.filter(|r| *r > found) {
        // Resume is exact, so continuing from the older checkpoint reaches the same weights; but the
        // steps in between are trained again, and the user should know their checkpoint is gone.
        notices.push(format!(
            "resume: the newest checkpoint, step {recorded}, is gone from {}; continued from step {found} \
             (steps {}–{recorded} were trained again)",
            checkpointer.dir.display(),
            found + 1
        ));
    }
    let bytes = CheckpointBytes::read(&path)?;
    let ckpt = Checkpoint::from_bytes(&path, bytes.clone())?;
    // First: asked for fewer steps than done, nothing else about the resume matters.
    let done = ckpt.state.step;
    if done > max_steps {
        return Err(TrainError::AlreadyPast { checkpoint: path, done, asked: max_steps });
    }
    if done == max_steps {
        notices
            .push(format!("nothing left to train: {} is at step {done}, the total this run asks for", path.display()));
    }
    if ckpt.state.seed != cfg.seed {
        return Err(TrainError::checkpoint(
            &path,
            format!(
                "saved with seed {}, this run has seed {}: it would not continue the same run",
                ckpt.state.seed, cfg.seed
            ),
        ));
    }
    let mut differences = vec![];
    // Checkpoints written before settings were recorded have none to compare.
    if let Some(saved) = ckpt.state.extra.get("settings").filter(|_| !cfg.settings.is_null()) {
        differences = resume_differences(saved, &cfg.settings);
    }
    // The schedule's shape is this run's to choose only where it does not change the steps done:
    // a cosine or linear decay over the run's total steps does, when the total changes.
    let schedule_changes = differences_at(
        "schedule",
        &serde_json::to_value(&ckpt.state.schedule.config).expect("a schedule serialises"),
        &serde_json::to_value(&schedule.config).expect("a schedule serialises"),
    );
    if let Some(first) = schedule_changes.first() {
        differences.push(format!(
            "{first} (the learning-rate schedule: its decay spans the run's total steps, so continuing to \
             another total changes the rate from here on; accepting follows the new total)"
        ));
        differences.extend(schedule_changes.into_iter().skip(1));
    }
    let (was, now) = (ckpt.state.world_size, cfg.comm.world_size());
    if !differences.is_empty() && was != now {
        differences.push(format!(
            "world size: {was} → {now} ranks (a run resumes on another number of ranks only with the same \
             global batch: per-rank batch × ranks)"
        ));
    }
    if !differences.is_empty() && !cfg.accept_changed_settings {
        return Err(TrainError::SettingsChanged { checkpoint: path, differences });
    }
    Ok((Start::Resume { path, bytes, settings_changed: differences }, notices))
}

/// The start as every rank learns it: rank 0 decides and sends the decision (and the checkpoint's
/// files, so that no rank needs to see rank 0's disk).
fn agree_on_start(
    cfg: &TrainConfig,
    checkpointer: &Checkpointer,
    schedule: &Schedule,
    max_steps: u64,
) -> Result<(Start, Vec<String>)> {
    let comm = &cfg.comm;
    if !comm.is_distributed() {
        return decide_start(cfg, checkpointer, schedule, max_steps);
    }
    let decided = if comm.is_primary() { Some(decide_start(cfg, checkpointer, schedule, max_steps)) } else { None };
    let header = match &decided {
        Some(Err(e)) => serde_json::json!({ "error": e.to_string() }),
        Some(Ok((Start::Resume { path, settings_changed, .. }, notices))) => {
            serde_json::json!({ "resume": path, "settings_changed": settings_changed, "notices": notices })
        }
        Some(Ok((Start::Fresh, notices))) => serde_json::json!({ "fresh": true, "notices": notices }),
        None => serde_json::json!({ "fresh": true }),
    };
    let header: Value = serde_json::from_slice(&comm.broadcast_bytes(header.to_string().as_bytes(), 0)?)
        .map_err(|e| TrainError::Config(format!("rank 0's start message: {e}")))?;
    if let Some(decided) = decided {
        if let Ok((Start::Resume { bytes, .. }, _)) = &decided {
            for part in [&bytes.model, &bytes.optimizer, &bytes.state] {
                comm.broadcast_bytes(part, 0)?;
            }
        }
        return decided;
    }
    if let Some(error) = header.get("error").and_then(Value::as_str) {
        let reason = format!("it refused to start: {error}");
        return Err(DistError::PeerFailed { rank: comm.rank(), failed: 0, reason }.into());
    }
    let strings = |key: &str| -> Vec<String> {
        header
            .get(key)
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
            .unwrap_or_default()
    };
    let notices = strings("notices");
    let Some(path) = header.get("resume").and_then(Value::as_str) else { return Ok((Start::Fresh, notices)) };
    let model = comm.broadcast_bytes(&[], 0)?;
    let optimizer = comm.broadcast_bytes(&[], 0)?;
    let state = comm.broadcast_bytes(&[], 0)?;
    let start = Start::Resume {
        path: PathBuf::from(path),
        bytes: CheckpointBytes { model, optimizer, state },
        settings_changed: strings("settings_changed"),
    };
    Ok((start, notices))
}

/// What every rank reports of one micro-batch before its forward pass: whether it loaded, and its
/// size (the ranks' forward passes meet in collectives, so they must all run, on equal batches).
fn agree_on_batch<T>(comm: &Communicator, batch: &std::result::Result<Batch<T>, DataError>) -> Result<Option<String>> {
    let mine = match batch {
        Ok(b) => [0, b.items.len() as u64],
        Err(_) => [1, 0],
    };
    let all = comm.all_gather_u64(&mine)?;
    if let Some(rank) = all.iter().position(|r| r[0] == 1) {
        return Ok(Some(format!("a sample of rank {rank}'s batch failed to load")));
    }
    if all.iter().any(|r| r[1] != mine[1]) {
        let sizes: Vec<u64> = all.iter().map(|r| r[1]).collect();
        return Ok(Some(format!(
            "the ranks' batches differ in size ({sizes:?}: a sample was left out while loading); a data-parallel \
             run needs every sample of its batches — fix the data, then resume"
        )));
    }
    Ok(None)
}

/// Runs `f`, turning a panic into [`TrainError::Panicked`]: an objective that panics mid-run must
/// not take the steps done with it. Only the objective's own state can be left half-changed by the
/// unwinding; the parameters and the optimizer, which the checkpoint saves, are not touched until
/// the update.
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        Err(TrainError::Panicked(message))
    })
}

/// Whether every trainable parameter (and its f32 master) is finite: a failed run's weights are
/// checkpointed only then.
fn params_finite(params: &TrainableParams) -> bool {
    params.tensors().values().all(|t| ctxalign_models::loading::all_finite(t).unwrap_or(false))
}

/// Runs (or resumes) training. `params` are the trainable parameters `optimizer` updates. In a
/// data-parallel run ([`TrainConfig::comm`]) every rank calls this with its own loader share and
/// objective; they start from rank 0's parameters (or checkpoint) and stay equal.
///
/// A run that fails mid-way checkpoints the steps done before it returns the error, whatever the
/// cause ([`TrainError::StoppedMidRun`], [`TrainError::DataDuringTraining`]), except where the
/// weights are not a state worth keeping: a failure during the optimizer's update (half the
/// parameters updated), non-finite weights, and the NaN guard ([`TrainError::NonFinite`]: the
/// weights that gave a non-finite loss are suspect).
///
/// The caller holds the output folder's lock ([`ctxalign_data::lock::FolderLock`]) when several
/// jobs could write it; the recipes of the `ctxalign` crate do.
#[allow(clippy::too_many_arguments)]
pub fn train<O: Objective>(
    cfg: &TrainConfig,
    loader: &dyn BatchSource<Item = O::Item>,
    objective: &mut O,
    params: &TrainableParams,
    optimizer: &mut Adam,
    schedule: &mut Schedule,
    interrupt: &Interrupt,
) -> Result<TrainSummary> {
    if cfg.accumulate == 0 {
        return Err(TrainError::Config("accumulate must be at least 1".into()));
    }
    let comm = &cfg.comm;
    let primary = comm.is_primary();
    let _running = interrupt.loop_running();
    let checkpointer = Checkpointer::new(cfg.out_dir.join("checkpoints"), cfg.keep_last);
    let (mut step, mut epoch, mut batch_pos) = (0u64, 0u64, 0usize);
    let mut resumed_from = None;
    let mut settings_changed = vec![];
    let mut world_size_changed = None;
    let batches = loader.batches_per_epoch();
    let steps_per_epoch = batches.div_ceil(cfg.accumulate) as u64;
    let max_steps = cfg.max_steps.unwrap_or(cfg.epochs * steps_per_epoch).min(cfg.epochs * steps_per_epoch);
    let (start, notices) = agree_on_start(cfg, &checkpointer, schedule, max_steps)?;
    if let Start::Resume { path, bytes, settings_changed: changed } = start {
        let ckpt = Checkpoint::from_bytes(&path, bytes)?;
        ckpt.restore(params, optimizer)?;
        // The schedule's state (a plateau's) is the run's; its shape is this run's, which equals the
        // checkpoint's unless a change was accepted.
        let shape = schedule.config.clone();
        *schedule = ckpt.state.schedule.clone();
        schedule.config = shape;
        (step, epoch, batch_pos) = (ckpt.state.step, ckpt.state.epoch, ckpt.state.batch_in_epoch);
        if ckpt.state.world_size != comm.world_size() {
            world_size_changed = Some((ckpt.state.world_size, comm.world_size()));
        }
        settings_changed = changed;
        resumed_from = Some(path);
    }
    // Every rank starts from rank 0's parameters, as DDP's constructor does.
    broadcast_parameters(comm, params)?;
    let metrics_path = cfg.out_dir.join("metrics.jsonl");
    let mut log =
        if primary { Some(MetricsLog::open(&metrics_path, resumed_from.as_ref().map(|_| step))?) } else { None };
    let bar = if cfg.progress && primary { Progress::new(max_steps, "steps") } else { Progress::hidden() };
    bar.set_position(step);

    let vars: Vec<candle_core::Var> = optimizer.vars().map(|(_, v)| v.clone()).collect();
    let buckets = GradientBuckets::new(&vars, cfg.bucket_bytes);
    // Set when writing a checkpoint failed: a failure of the save itself is not saved again.
    let save_failed = std::cell::Cell::new(false);
    let save = |step, epoch, batch_pos, schedule: &Schedule, optimizer: &Adam| -> Result<PathBuf> {
        if !primary {
            return Ok(checkpointer.path_for(step));
        }
        let state = TrainerState {
            step,
            epoch,
            batch_in_epoch: batch_pos,
            seed: cfg.seed,
            schedule: schedule.clone(),
            optimizer: optimizer.meta(),
            extra: serde_json::json!({ "settings": cfg.settings }),
            world_size: comm.world_size(),
        };
        checkpointer.save(params, optimizer, &state).inspect_err(|_| save_failed.set(true))
    };
    let started = Instant::now();
    let mut samples_seen = 0usize;
    let mut communication = (0.0f64, 0u64);
    let mut last_terms: Vec<(String, f64)> = vec![];
    let mut last_validation = vec![];
    // The latest complete checkpoint of this run (the resumed one until this run saves).
    let mut checkpoint = resumed_from.clone();
    let mut interrupted = false;
    // Where a checkpoint taken now would resume: the start of the step in progress (its
    // micro-batches are not applied yet), or `None` while the optimizer updates the weights.
    let mut consistent_at: Option<(u64, u64, usize)> = Some((step, epoch, batch_pos));

    let looped = (|| -> Result<()> {
        'epochs: while epoch < cfg.epochs && step < max_steps {
            let mut acc = GradAccumulator::default();
            let mut step_terms = TermSums::default(); // over the micro-batches of one step
            let mut epoch_terms = TermSums::default(); // over the step means of the epoch
            let mut step_samples = 0usize;
            let mut step_non_finite: Option<(String, f64)> = None;
            let mut step_started = Instant::now();
            let mut step_start_pos = batch_pos;
            for batch in loader.epoch(epoch, batch_pos) {
                if acc.count() == 0 {
                    step_start_pos = batch_pos;
                }
                let peer_problem = if comm.is_distributed() { agree_on_batch(comm, &batch)? } else { None };
                if batch.is_err() || peer_problem.is_some() {
                    // Keep the steps done: a checkpoint at the start of this step, unless one is there.
                    let saved_here = checkpoint.as_deref().and_then(Checkpoint::step_of) == Some(step);
                    let checkpoint = match step > 0 && !saved_here {
                        true => Some(save(step, epoch, step_start_pos, schedule, optimizer)?),
                        false => checkpoint.clone(),
                    };
                    let source = match (batch, peer_problem) {
                        (Err(source), _) => source,
                        (Ok(_), Some(problem)) => DataError::OtherRank(problem),
                        (Ok(_), None) => unreachable!("checked above"),
                    };
                    return Err(TrainError::DataDuringTraining { step, checkpoint, source: Box::new(source) });
                }
                let batch = batch.expect("checked above");
                if acc.count() == 0 {
                    guarded(|| objective.before_step(step))?;
                    step_started = Instant::now();
                }
                batch_pos += 1;
                if !batch.items.is_empty() {
                    let LossTerms { terms, samples } = guarded(|| objective.loss(&batch, step))?;
                    let mut total: Option<Tensor> = None;
                    for (name, t) in &terms {
                        let value = t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
                        if !value.is_finite() {
                            if !comm.is_distributed() {
                                let last_checkpoint = checkpoint.clone();
                                let (step, term) = (step + 1, name.clone());
                                return Err(TrainError::NonFinite { step, term, value, last_checkpoint });
                            }
                            // The other ranks are in the middle of this step too: all stop at its end.
                            step_non_finite.get_or_insert((name.clone(), value));
                        }
                        step_terms.add(name, value);
                        total = Some(match total {
                            None => t.clone(),
                            Some(s) => (s + t)?,
                        });
                    }
                    let total =
                        total.ok_or_else(|| TrainError::Config("the objective returned no loss term".into()))?;
                    // Also after a non-finite term on this rank: the backward of a data-parallel
                    // objective meets the other ranks.
                    let grads = guarded(|| Ok(total.backward()?))?;
                    acc.add(&grads, &vars)?;
                    step_samples += samples;
                } else {
                    acc.add(&candle_core::backprop::GradStore::default(), &vars)?;
                }
                if acc.count() < cfg.accumulate && batch_pos < batches {
                    continue;
                }
                // One optimizer step. First every rank's loss terms, sample count, non-finite terms
                // and stop request, so that all take the same decisions.
                let micro = acc.count() as f64;
                let agreed = agree_on_step(comm, &step_terms, micro, step_samples, &step_non_finite, interrupt)?;
                if let Some((term, value)) = agreed.non_finite {
                    let last_checkpoint = checkpoint.clone();
                    return Err(TrainError::NonFinite { step: step + 1, term, value, last_checkpoint });
                }
                let mut grads = acc.finish()?;
                let reduced = buckets.all_reduce_mean(comm, &mut grads, &vars)?;
                communication.0 += reduced.seconds;
                communication.1 += 1;
                let norm = match cfg.clip_norm {
                    Some(max) => clip_grad_norm(&mut grads, &vars, max)?,
                    None => grad_norm(&grads, &vars)?,
                };
                if !norm.is_finite() {
                    let last_checkpoint = checkpoint.clone();
                    let term = "gradient norm".to_string();
                    return Err(TrainError::NonFinite { step: step + 1, term, value: norm, last_checkpoint });
                }
                let factor = schedule.factor(step, epoch);
                // From here until the step is counted, the weights may be half updated.
                consistent_at = None;
                optimizer.step(&grads, factor)?;
                step += 1;
                consistent_at = Some((step, epoch, batch_pos));
                samples_seen += agreed.samples;
                let mut record = Map::new();
                record.insert("step".into(), step.into());
                record.insert("epoch".into(), epoch.into());
                let mut loss = 0.0;
                for (name, mean) in &agreed.terms {
                    record.insert(name.clone(), (*mean).into());
                    loss += mean;
                    epoch_terms.add(name, *mean);
                }
                record.insert("loss".into(), loss.into());
                for (g, lr) in optimizer.groups.iter().zip(optimizer.learning_rates()) {
                    record.insert(format!("lr/{}", g.name), (*lr).into());
                }
                record.insert("grad_norm".into(), norm.into());
                let rate = agreed.samples as f64 / step_started.elapsed().as_secs_f64().max(1e-9);
                record.insert("samples_per_s".into(), rate.into());
                if comm.is_distributed() {
                    record.insert("comm_s".into(), reduced.seconds.into());
                }
                if let Some(log) = log.as_mut() {
                    log.write(&record)?;
                }
                let lr0 = optimizer.learning_rates().first().copied().unwrap_or(0.0);
                bar.set_message(format!("loss {loss:.4}  lr {lr0:.2e}  {rate:.1} samples/s"));
                bar.set_position(step);
                step_terms.0.clear();
                step_samples = 0;

                if agreed.stop_requested {
                    checkpoint = Some(save(step, epoch, batch_pos, schedule, optimizer)?);
                    interrupted = true;
                    break 'epochs;
                }
                if cfg.checkpoint_every > 0 && step % cfg.checkpoint_every == 0 {
                    checkpoint = Some(save(step, epoch, batch_pos, schedule, optimizer)?);
                }
                if step >= max_steps {
                    break;
                }
            }
            last_terms = epoch_terms.means();
            if batch_pos < batches {
                break; // stopped by max_steps mid-epoch
            }
            last_validation = shared_validation(comm, objective, epoch)?;
            if !last_validation.is_empty() {
                let mut record = Map::new();
                record.insert("step".into(), step.into());
                record.insert("epoch".into(), epoch.into());
                for (k, v) in &last_validation {
                    record.insert(format!("val/{k}"), (*v).into());
                }
                if let Some(log) = log.as_mut() {
                    log.write(&record)?;
                }
            }
            // Last, after everything that can fail: a checkpoint taken before this point resumes
            // by validating again, and the plateau rule must see each validation once.
            if let Some((_, first)) = last_validation.first() {
                schedule.observe(*first);
            }
            epoch += 1;
            batch_pos = 0;
            consistent_at = Some((step, epoch, batch_pos));
        }
        Ok(())
    })();
    if let Err(error) = looped {
        bar.finish();
        return Err(match error {
            // Their own handling: the NaN guard keeps no suspect weights, a data error saved already.
            e @ (TrainError::NonFinite { .. } | TrainError::DataDuringTraining { .. }) => e,
            // Writing the checkpoint is what failed: the last complete one stays, as the error says.
            e if save_failed.get() => e,
            source => {
                let source = Box::new(source);
                let last = checkpoint.clone();
                match consistent_at {
                    None => TrainError::StoppedMidRun {
                        step,
                        checkpoint: last,
                        not_saved: Some("it failed while the optimizer was updating the weights".into()),
                        source,
                    },
                    Some((done, epoch, position)) => {
                        let saved_here = last.as_deref().and_then(Checkpoint::step_of) == Some(done);
                        if done == 0 || saved_here {
                            TrainError::StoppedMidRun { step: done, checkpoint: last, not_saved: None, source }
                        } else if !params_finite(params) {
                            let not_saved = Some("the weights hold NaN or infinite values".into());
                            TrainError::StoppedMidRun { step: done, checkpoint: last, not_saved, source }
                        } else {
                            match save(done, epoch, position, schedule, optimizer) {
                                Ok(path) => TrainError::StoppedMidRun {
                                    step: done,
                                    checkpoint: Some(path),
                                    not_saved: None,
                                    source,
                                },
                                Err(e) => TrainError::StoppedMidRun {
                                    step: done,
                                    checkpoint: last,
                                    not_saved: Some(format!("writing it failed too: {e}")),
                                    source,
                                },
                            }
                        }
                    }
                }
            }
        });
    }
    bar.finish();
    if !interrupted {
        // Also after a periodic save of this step: the epoch-end work since then is in the state.
        checkpoint = Some(save(step, epoch, batch_pos, schedule, optimizer)?);
    }
    let plot = cfg.out_dir.join("loss.png");
    let mut keys: Vec<String> = vec!["loss".into()];
    keys.extend(last_terms.iter().map(|(k, _)| k.clone()));
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let plot =
        if primary { plot_metrics(&metrics_path, &plot, "training loss", &keys).ok().map(|_| plot) } else { None };
    let seconds = started.elapsed().as_secs_f64();
    Ok(TrainSummary {
        steps: step,
        epoch,
        last_terms,
        last_validation,
        checkpoint,
        metrics: metrics_path,
        plot,
        interrupted,
        resumed_from,
        settings_changed,
        world_size_changed,
        seconds,
        samples_per_second: samples_seen as f64 / seconds.max(1e-9),
        world_size: comm.world_size(),
        communication_seconds_per_step: communication.0 / communication.1.max(1) as f64,
        notices,
    })
}

/// What the ranks agree on at the end of a step's micro-batches.
struct AgreedStep {
    /// Each term's mean over the micro-batches, averaged over the ranks.
    terms: Vec<(String, f64)>,
    /// Over all ranks.
    samples: usize,
    /// The first non-finite term, named with its rank when the run has several.
    non_finite: Option<(String, f64)>,
    /// Any rank was asked to stop (Ctrl-C).
    stop_requested: bool,
}

/// One small all-gather per step: every rank's `[stop, samples, non-finite?, value, terms…]`.
fn agree_on_step(
    comm: &Communicator,
    terms: &TermSums,
    micro: f64,
    samples: usize,
    non_finite: &Option<(String, f64)>,
    interrupt: &Interrupt,
) -> Result<AgreedStep> {
    let means: Vec<(String, f64)> = terms.0.iter().map(|(n, sum, _)| (n.clone(), sum / micro)).collect();
    if !comm.is_distributed() {
        return Ok(AgreedStep {
            terms: means,
            samples,
            non_finite: non_finite.clone(),
            stop_requested: interrupt.requested(),
        });
    }
    let nan_term = non_finite.as_ref().and_then(|(n, _)| means.iter().position(|(m, _)| m == n));
    let mut row = vec![
        interrupt.requested() as u8 as f64,
        samples as f64,
        nan_term.map_or(-1.0, |i| i as f64),
        non_finite.as_ref().map_or(0.0, |(_, v)| *v),
    ];
    row.extend(means.iter().map(|(_, v)| *v));
    let rows = comm.all_gather_f64(&row)?;
    let mut agreed = AgreedStep {
        terms: means.iter().map(|(n, _)| (n.clone(), 0.0)).collect(),
        samples: 0,
        non_finite: None,
        stop_requested: false,
    };
    for (rank, row) in rows.iter().enumerate() {
        agreed.stop_requested |= row[0] != 0.0;
        agreed.samples += row[1] as usize;
        if row[2] >= 0.0 && agreed.non_finite.is_none() {
            let name = means.get(row[2] as usize).map_or("a loss term", |(n, _)| n.as_str());
            agreed.non_finite = Some((format!("{name} on rank {rank}"), row[3]));
        }
        for (t, v) in agreed.terms.iter_mut().zip(&row[4..]) {
            t.1 += v / rows.len() as f64;
        }
    }
    Ok(agreed)
}

/// The epoch-end validation, computed on rank 0 and sent to the others (a plateau schedule must
/// see the same value on every rank).
fn shared_validation<O: Objective>(comm: &Communicator, objective: &mut O, epoch: u64) -> Result<Vec<(String, f64)>> {
    if !comm.is_distributed() {
        return objective.validate(epoch);
    }
    let mine = if comm.is_primary() { objective.validate(epoch)? } else { vec![] };
    let bytes = serde_json::to_vec(&mine).expect("names and numbers serialise");
    serde_json::from_slice(&comm.broadcast_bytes(&bytes, 0)?)
        .map_err(|e| TrainError::Config(format!("rank 0's validation metrics: {e}")))
}

/// Named sums and how many values each has received, in first-seen order.
#[derive(Default)]
struct TermSums(Vec<(String, f64, usize)>);

impl TermSums {
    fn add(&mut self, name: &str, value: f64) {
        match self.0.iter_mut().find(|(n, _, _)| n == name) {
            Some(t) => {
                t.1 += value;
                t.2 += 1;
            }
            None => self.0.push((name.to_owned(), value, 1)),
        }
    }

    fn means(&self) -> Vec<(String, f64)> {
        self.0.iter().map(|(n, s, c)| (n.clone(), s / *c as f64)).collect()
    }
}

/// Deletes what a run leaves in `out_dir`: `checkpoints/`, `metrics.jsonl`, `loss.png`.
fn clear_run(out_dir: &std::path::Path) -> Result<()> {
    let checkpoints = out_dir.join("checkpoints");
    if checkpoints.exists() {
        std::fs::remove_dir_all(&checkpoints).map_err(|e| TrainError::io(&checkpoints, e))?;
    }
    for file in ["metrics.jsonl", "loss.png"] {
        let path = out_dir.join(file);
        if path.exists() {
            std::fs::remove_file(&path).map_err(|e| TrainError::io(&path, e))?;
        }
    }
    Ok(())
}

/// What differs between the settings a checkpoint's run `saved` and this run's (`now`), as a resume
/// compares them: every leaf, as `path: saved → now`. A top-level setting the checkpoint's run did
/// not record (written by an older ctxalign, e.g. before the precision was a setting) cannot be
/// compared, and is not a change. Callers that reuse finished runs (a sweep) compare with it too.
pub fn resume_differences(saved: &Value, now: &Value) -> Vec<String> {
    let mut now = now.clone();
    if let (Some(now), Some(saved)) = (now.as_object_mut(), saved.as_object()) {
        now.retain(|key, _| saved.contains_key(key));
    }
    differences_at("", saved, &now)
}

/// Every leaf where `now` differs from `saved`, as `path: saved → now` (objects compared key by
/// key, anything else as a whole), with every path under `root`.
fn differences_at(root: &str, saved: &Value, now: &Value) -> Vec<String> {
    fn walk(path: &str, saved: Option<&Value>, now: Option<&Value>, out: &mut Vec<String>) {
        match (saved, now) {
            (Some(Value::Object(a)), Some(Value::Object(b))) => {
                let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
                keys.sort();
                keys.dedup();
                for key in keys {
                    let sub = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                    walk(&sub, a.get(key), b.get(key), out);
                }
            }
            (a, b) if a != b => {
                let show = |v: Option<&Value>| v.map_or("(absent)".to_string(), |v| v.to_string());
                out.push(format!("{path}: {} → {}", show(a), show(b)));
            }
            _ => {}
        }
    }
    let mut out = vec![];
    walk(root, Some(saved), Some(now), &mut out);
    out
}

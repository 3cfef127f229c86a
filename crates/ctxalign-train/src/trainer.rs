//! The training loop: micro-batches from a [`DataLoader`], gradient accumulation, clipping, the
//! NaN/Inf guard, an optimizer step at the scheduled learning rate, JSONL metrics, a progress bar,
//! periodic and final checkpoints, exact resume, and Ctrl-C → checkpoint → stop.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Tensor;
use ctxalign_data::loader::{Batch, DataLoader, Dataset};
use ctxalign_eval::progress::Progress;
use serde_json::{Map, Value};

use crate::checkpoint::{Checkpoint, Checkpointer, TrainerState};
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
    /// Show a progress bar.
    pub progress: bool,
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
pub trait Objective {
    type Item;
    /// Loss terms of one micro-batch. `step` is the optimizer step it contributes to: derive any
    /// random draw from (seed, step) so a resumed run draws the same.
    fn loss(&mut self, batch: &Batch<Self::Item>, step: u64) -> Result<LossTerms>;
    /// Before the first micro-batch of each optimizer step (BLIP clamps its temperature here).
    fn before_step(&mut self, _step: u64) -> Result<()> {
        Ok(())
    }
    /// At the end of each epoch: metrics to log. When the schedule has a plateau rule, the first
    /// metric (lower is better) feeds it.
    fn validate(&mut self, _epoch: u64) -> Result<Vec<(String, f64)>> {
        Ok(vec![])
    }
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub steps: u64,
    pub epoch: u64,
    /// Mean of each loss term over the last epoch's (or the run's last) optimizer steps.
    pub last_terms: Vec<(String, f64)>,
    pub last_validation: Vec<(String, f64)>,
    pub checkpoint: Option<PathBuf>,
    pub metrics: PathBuf,
    pub plot: Option<PathBuf>,
    pub interrupted: bool,
    pub resumed_from: Option<PathBuf>,
    /// Settings that differ from the resumed checkpoint's run, accepted by
    /// [`TrainConfig::accept_changed_settings`] (`path: was → now`).
    pub settings_changed: Vec<String>,
    pub seconds: f64,
    pub samples_per_second: f64,
}

/// Runs (or resumes) training. `params` are the trainable parameters `optimizer` updates.
#[allow(clippy::too_many_arguments)]
pub fn train<D: Dataset, O: Objective<Item = D::Item>>(
    cfg: &TrainConfig,
    loader: &DataLoader<D>,
    objective: &mut O,
    params: &TrainableParams,
    optimizer: &mut Adam,
    schedule: &mut Schedule,
    interrupt: &Interrupt,
) -> Result<TrainSummary> {
    if cfg.accumulate == 0 {
        return Err(TrainError::Config("accumulate must be at least 1".into()));
    }
    let _running = interrupt.loop_running();
    let checkpointer = Checkpointer::new(cfg.out_dir.join("checkpoints"), cfg.keep_last);
    let (mut step, mut epoch, mut batch_pos) = (0u64, 0u64, 0usize);
    let mut resumed_from = None;
    let mut settings_changed = vec![];
    let latest = checkpointer.list()?.pop();
    if !cfg.resume {
        if let Some((latest_step, _)) = latest {
            if !cfg.overwrite {
                return Err(TrainError::UsedFolder { dir: cfg.out_dir.clone(), latest_step });
            }
            clear_run(&cfg.out_dir)?;
        }
    } else if let Some((_, path)) = latest {
        let ckpt = Checkpoint::load(&path)?;
        if ckpt.state.seed != cfg.seed {
            return Err(TrainError::checkpoint(
                &path,
                format!(
                    "saved with seed {}, this run has seed {}: it would not continue the same run",
                    ckpt.state.seed, cfg.seed
                ),
            ));
        }
        // Checkpoints written before settings were recorded have none to compare.
        if let Some(saved) = ckpt.state.extra.get("settings").filter(|_| !cfg.settings.is_null()) {
            let differences = setting_differences(saved, &cfg.settings);
            if !differences.is_empty() && !cfg.accept_changed_settings {
                return Err(TrainError::SettingsChanged { checkpoint: path, differences });
            }
            settings_changed = differences;
        }
        ckpt.restore(params, optimizer)?;
        *schedule = ckpt.state.schedule.clone();
        (step, epoch, batch_pos) = (ckpt.state.step, ckpt.state.epoch, ckpt.state.batch_in_epoch);
        resumed_from = Some(path);
    }
    let metrics_path = cfg.out_dir.join("metrics.jsonl");
    let mut log = MetricsLog::open(&metrics_path, resumed_from.as_ref().map(|_| step))?;
    let batches = loader.batches_per_epoch();
    let steps_per_epoch = batches.div_ceil(cfg.accumulate) as u64;
    let max_steps = cfg.max_steps.unwrap_or(cfg.epochs * steps_per_epoch).min(cfg.epochs * steps_per_epoch);
    let bar = if cfg.progress { Progress::new(max_steps, "steps") } else { Progress::hidden() };
    bar.set_position(step);

    let vars: Vec<candle_core::Var> = optimizer.vars().map(|(_, v)| v.clone()).collect();
    let save = |step, epoch, batch_pos, schedule: &Schedule, optimizer: &Adam| -> Result<PathBuf> {
        let state = TrainerState {
            step,
            epoch,
            batch_in_epoch: batch_pos,
            seed: cfg.seed,
            schedule: schedule.clone(),
            optimizer: optimizer.meta(),
            extra: serde_json::json!({ "settings": cfg.settings }),
        };
        checkpointer.save(params, optimizer, &state)
    };
    let started = Instant::now();
    let mut samples_seen = 0usize;
    let mut last_terms: Vec<(String, f64)> = vec![];
    let mut last_validation = vec![];
    // The latest complete checkpoint of this run (the resumed one until this run saves).
    let mut checkpoint = resumed_from.clone();
    let mut interrupted = false;

    'epochs: while epoch < cfg.epochs && step < max_steps {
        let mut acc = GradAccumulator::default();
        let mut step_terms = TermSums::default(); // over the micro-batches of one step
        let mut epoch_terms = TermSums::default(); // over the step means of the epoch
        let mut step_samples = 0usize;
        let mut step_started = Instant::now();
        let mut step_start_pos = batch_pos;
        for batch in loader.epoch(epoch, batch_pos) {
            if acc.count() == 0 {
                step_start_pos = batch_pos;
            }
            let batch = match batch {
                Ok(batch) => batch,
                Err(source) => {
                    // Keep the steps done: a checkpoint at the start of this step, unless one is there.
                    let saved_here = checkpoint.as_deref().and_then(Checkpoint::step_of) == Some(step);
                    let checkpoint = match step > 0 && !saved_here {
                        true => Some(save(step, epoch, step_start_pos, schedule, optimizer)?),
                        false => checkpoint.clone(),
                    };
                    return Err(TrainError::DataDuringTraining { step, checkpoint, source: Box::new(source) });
                }
            };
            if acc.count() == 0 {
                objective.before_step(step)?;
                step_started = Instant::now();
            }
            batch_pos += 1;
            if !batch.items.is_empty() {
                let LossTerms { terms, samples } = objective.loss(&batch, step)?;
                let mut total: Option<Tensor> = None;
                for (name, t) in &terms {
                    let value = t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
                    if !value.is_finite() {
                        let last_checkpoint = checkpoint.clone();
                        return Err(TrainError::NonFinite { step, term: name.clone(), value, last_checkpoint });
                    }
                    step_terms.add(name, value);
                    total = Some(match total {
                        None => t.clone(),
                        Some(s) => (s + t)?,
                    });
                }
                let total = total.ok_or_else(|| TrainError::Config("the objective returned no loss term".into()))?;
                acc.add(&total.backward()?, &vars)?;
                step_samples += samples;
            } else {
                acc.add(&candle_core::backprop::GradStore::default(), &vars)?;
            }
            if acc.count() < cfg.accumulate && batch_pos < batches {
                continue;
            }
            // One optimizer step.
            let micro = acc.count() as f64;
            let mut grads = acc.finish()?;
            let norm = match cfg.clip_norm {
                Some(max) => clip_grad_norm(&mut grads, &vars, max)?,
                None => grad_norm(&grads, &vars)?,
            };
            if !norm.is_finite() {
                let last_checkpoint = checkpoint.clone();
                return Err(TrainError::NonFinite { step, term: "gradient norm".into(), value: norm, last_checkpoint });
            }
            let factor = schedule.factor(step, epoch);
            optimizer.step(&grads, factor)?;
            step += 1;
            samples_seen += step_samples;
            let mut record = Map::new();
            record.insert("step".into(), step.into());
            record.insert("epoch".into(), epoch.into());
            let mut loss = 0.0;
            for (name, sum, _) in &step_terms.0 {
                record.insert(name.clone(), (sum / micro).into());
                loss += sum / micro;
                epoch_terms.add(name, sum / micro);
            }
            record.insert("loss".into(), loss.into());
            for (g, lr) in optimizer.groups.iter().zip(optimizer.learning_rates()) {
                record.insert(format!("lr/{}", g.name), (*lr).into());
            }
            record.insert("grad_norm".into(), norm.into());
            let rate = step_samples as f64 / step_started.elapsed().as_secs_f64().max(1e-9);
            record.insert("samples_per_s".into(), rate.into());
            log.write(&record)?;
            let lr0 = optimizer.learning_rates().first().copied().unwrap_or(0.0);
            bar.set_message(format!("loss {loss:.4}  lr {lr0:.2e}  {rate:.1} samples/s"));
            bar.set_position(step);
            step_terms.0.clear();
            step_samples = 0;

            if interrupt.requested() {
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
        last_validation = objective.validate(epoch)?;
        if let Some((_, first)) = last_validation.first() {
            schedule.observe(*first);
        }
        if !last_validation.is_empty() {
            let mut record = Map::new();
            record.insert("step".into(), step.into());
            record.insert("epoch".into(), epoch.into());
            for (k, v) in &last_validation {
                record.insert(format!("val/{k}"), (*v).into());
            }
            log.write(&record)?;
        }
        epoch += 1;
        batch_pos = 0;
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
    let plot = plot_metrics(&metrics_path, &plot, "training loss", &keys).ok().map(|_| plot);
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
        seconds,
        samples_per_second: samples_seen as f64 / seconds.max(1e-9),
    })
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

/// Every leaf where `now` differs from `saved`, as `path: saved → now` (objects compared key by
/// key, anything else as a whole).
fn setting_differences(saved: &Value, now: &Value) -> Vec<String> {
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
    walk("", Some(saved), Some(now), &mut out);
    out
}

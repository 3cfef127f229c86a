//! Step fixtures: a reference training run replayed through a recipe and compared step by step.
//!
//! A step fixture (`tests/fixtures/steps_*`, written by `tests/fixtures/generators/make_steps_*.py`)
//! holds a tiny model's initial weights, the exact micro-batches and random draws of K optimizer
//! steps of a PyTorch reference run of one recipe, and what that run computed: each loss term, each
//! parameter group's learning rate and the gradient norm before clipping at every step, and every
//! trainable tensor with its Adam moments at the end. [`run_step_fixture`] runs the library's own
//! recipe on it — the same function users call, with [`RunControl::replay`] set, so the loop,
//! optimizer, parameter groups, schedule and clipping are the ones users train with — and compares.
//!
//! Tolerances: in f32 every loss term within [`LOSS_TOLERANCE_F32`] (relative) at every step and
//! the final weights and moments within [`WEIGHT_TOLERANCE`] of their scale; under bf16 mixed
//! precision, losses within [`LOSS_TOLERANCE_BF16`] of the same reference (weights are not
//! compared: bf16 rounding decides them). Where PyTorch itself, running the fixture's steps in
//! float32 (or under bf16 autocast), ends further than that from the float64 reference — the
//! generator records how far: `pytorch_f32_deviation`, `pytorch_bf16_deviation` — the bound is
//! twice PyTorch's own deviation, and the report prints it: the arithmetic of a precision sets a
//! floor no implementation of it goes below (a loss that normalises by a nearest distance, a bias
//! that starts at zero and ends a few learning rates from it).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ctxalign_data::classification::{ClassItem, ClassificationSet, ImageSource};
use ctxalign_data::imagecode::ImageCodeSplit;
use ctxalign_eval::Table;
use ctxalign_models::contextclip::ContextClipConfig;
use ctxalign_models::loading::read_json;
use ctxalign_models::{LoadError, ModelFiles};
use ctxalign_train::contextclip::{ContextClipInit, ContextClipLossConfig};
use ctxalign_train::replay::INDEX_FILE;
use ctxalign_train::{Checkpointer, Replay};
use serde::Deserialize;
use serde_json::Value;

use crate::backbone::{train_backbone, BackboneOptions, STAGE2};
use crate::contextblip::{
    candidate_features, finetune_s1, finetune_s2, pretrain, InterContextOptions, PretrainOptions,
};
use crate::contextclip::{finetune_classifier, train_contextclip, FinetuneOptions, TrainOptions};
use crate::fixtures::{CheckStatus, FixtureReport, RunOptions, TensorCheck};
use crate::{BlipScorer, Error, Precision, Result, RunControl, Runtime, ScorerOptions};
use ctxalign_data::captions::CaptionedImage;

/// Loss terms and learning rates in f32: relative to the reference at every step.
pub const LOSS_TOLERANCE_F32: f64 = 1e-5;
/// Loss terms under bf16 mixed precision, against the f32 reference.
pub const LOSS_TOLERANCE_BF16: f64 = 2e-2;
/// Final weights and optimizer moments in f32, relative to each tensor's largest magnitude.
pub const WEIGHT_TOLERANCE: f64 = 1e-5;
/// The gradient norm before clipping, relative. Looser than the losses: a norm sums the squares of
/// every gradient, whose own rounding (a few ulps of f32 each, through the whole backward pass) the
/// loss values do not carry.
pub const GRAD_NORM_TOLERANCE: f64 = 1e-4;

/// What a step fixture's `recipe.json` says.
#[derive(Debug, Deserialize)]
struct StepCase {
    /// `contextclip`, `classifier`, …
    recipe: String,
    /// The recipe's settings, as its generator wrote them.
    options: Value,
    /// Loss term names, in the order of `expected.terms`' columns.
    terms: Vec<String>,
    /// Parameter group names, in the order of `expected.lr`'s columns.
    groups: Vec<String>,
    /// Parameters whose gradient is zero by construction (an attention key's bias: softmax is
    /// invariant to adding one constant to every score of a query). Both runs compute it as
    /// rounding noise, which Adam normalises into steps of about the learning rate in random
    /// directions, so their values cannot be compared; they are checked to have moved no more than
    /// Adam can move any weight ([`GRADIENT_FREE_BOUND`]). `name[a:b]` names rows `a..b` of a
    /// parameter (the key part of a fused `qkv` bias); its other rows are compared as usual.
    #[serde(default)]
    gradient_free: Vec<String>,
}

/// How far a gradient-free parameter may end from the reference, in units of the sum over the
/// steps of the largest learning rate: Adam's step `lr · m̂ / (√v̂ + ε)` stays within a few `lr`
/// (`|m̂| / √v̂ ≤ (1 − β1) / √(1 − β2) ≈ 3.2` at worst), and both runs take such steps.
pub const GRADIENT_FREE_BOUND: f64 = 8.0;

/// A step fixture's folder holds `recipe.json`.
pub fn is_step_fixture(dir: &Path) -> bool {
    dir.join("recipe.json").is_file()
}

/// A run folder under the system's temporary directory, removed when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> Result<Self> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!("ctxalign-steps-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(Error::io(&dir))?;
        Ok(Self(dir))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Replays the fixture `dir` through its recipe on `options.device`, in f32 or (`options.dtype`
/// bf16) mixed precision, and compares every step.
pub fn run_step_fixture(dir: &Path, options: &RunOptions) -> Result<FixtureReport> {
    let case: StepCase = read_json(&dir.join("recipe.json"))?;
    let expected_path = dir.join("expected.safetensors");
    let expected = candle_core::safetensors::load(&expected_path, &Device::Cpu)
        .map_err(|e| LoadError::Safetensors { path: expected_path.clone(), message: e.to_string() })?;
    let replay = Replay::read(dir)?;
    let precision = match options.dtype {
        DType::F32 => Precision::F32,
        DType::BF16 => Precision::Bf16,
        other => return Err(Error::Invalid(format!("training runs in f32 or bf16, not {other:?}"))),
    };
    let rt = Runtime::new(options.device.clone(), precision);
    let scratch = ScratchDir::new()?;
    let out = scratch.0.join("run");
    let run = RunControl { progress: false, replay: Some(replay.clone()), ..Default::default() };
    let steps = replay.steps as u64;
    // The run folder (metrics, checkpoints) of the replayed run.
    let run_folder = match case.recipe.as_str() {
        "contextclip" => replay_contextclip(dir, &case.options, run, &rt, &out, steps).map(|()| out.clone())?,
        "classifier" => replay_classifier(dir, &case.options, run, &rt, &out, &replay, steps).map(|()| out.clone())?,
        "backbone" => replay_backbone(dir, &case.options, run, &rt, &out, steps)?,
        "s0" => replay_s0(dir, &case.options, run, &rt, &out, steps)?,
        "s1" => replay_s1(dir, &case.options, run, &rt, &out, &replay).map(|()| out.clone())?,
        "s2" => replay_s2(dir, &case.options, run, &rt, &out, &replay).map(|()| out.clone())?,
        other => {
            return Err(Error::Invalid(format!("{}: unknown recipe `{other}`", dir.join("recipe.json").display())))
        }
    };
    let records = read_metrics(&run_folder.join("metrics.jsonl"))?;
    let half = precision != Precision::F32;
    let mut checks = vec![];
    let mut per_step = Table::new(
        std::iter::once("step".to_string())
            .chain(case.terms.iter().map(|t| format!("{t} rel. dev.")))
            .chain(["grad norm rel. dev.".to_string()]),
    );
    let reference = |name: &str| -> Result<Vec<Vec<f64>>> {
        let t =
            expected.get(name).ok_or_else(|| Error::Invalid(format!("{}: no `{name}`", expected_path.display())))?;
        Ok(match t.rank() {
            1 => t.to_dtype(DType::F64)?.to_vec1::<f64>()?.into_iter().map(|v| vec![v]).collect(),
            _ => t.to_dtype(DType::F64)?.to_vec2::<f64>()?,
        })
    };
    let (terms, lrs, norms) = (reference("terms")?, reference("lr")?, reference("grad_norm")?);
    if records.len() != terms.len() {
        return Err(Error::Invalid(format!(
            "the replay ran {} steps, the fixture records {}",
            records.len(),
            terms.len()
        )));
    }
    let ours = |record: &serde_json::Map<String, Value>, key: &str| -> Result<f64> {
        record.get(key).and_then(Value::as_f64).ok_or_else(|| Error::Invalid(format!("the run logged no `{key}`")))
    };
    let mut worst_terms = vec![0.0f64; case.terms.len()];
    let mut worst_lr = vec![0.0f64; case.groups.len()];
    let mut worst_norm = 0.0f64;
    for (step, record) in records.iter().enumerate() {
        let mut row = vec![(step + 1).to_string()];
        for (i, term) in case.terms.iter().enumerate() {
            let dev = relative(ours(record, term)?, terms[step][i]);
            worst_terms[i] = worst_terms[i].max(dev);
            row.push(format!("{dev:.2e}"));
        }
        for (i, group) in case.groups.iter().enumerate() {
            worst_lr[i] = worst_lr[i].max(relative(ours(record, &format!("lr/{group}"))?, lrs[step][i]));
        }
        let dev = relative(ours(record, "grad_norm")?, norms[step][0]);
        worst_norm = worst_norm.max(dev);
        row.push(format!("{dev:.2e}"));
        per_step.row(row);
    }
    let yardstick = |key: &str| -> Result<HashMap<String, f64>> {
        Ok(case
            .options
            .get(key)
            .cloned()
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| Error::Invalid(format!("recipe.json: {key}: {e}")))?
            .unwrap_or_default())
    };
    let (f32_yardstick, bf16_yardstick) = (yardstick("pytorch_f32_deviation")?, yardstick("pytorch_bf16_deviation")?);
    let (loss_tol, loss_yardstick, label) = match half {
        true => (LOSS_TOLERANCE_BF16, &bf16_yardstick, "bf16 autocast"),
        false => (LOSS_TOLERANCE_F32, &f32_yardstick, "f32"),
    };
    for (term, worst) in case.terms.iter().zip(&worst_terms) {
        let pytorch = loss_yardstick.get(term).copied();
        let shown = pytorch.map_or(String::new(), |y| format!(", PyTorch {label} {y:.1e}"));
        let allowed = loss_tol.max(2.0 * pytorch.unwrap_or(0.0));
        checks.push(scored(format!("loss {term} (every step{shown})"), *worst, allowed));
    }
    for (group, worst) in case.groups.iter().zip(&worst_lr) {
        checks.push(scored(format!("lr {group} (every step)"), *worst, LOSS_TOLERANCE_F32));
    }
    let mut detail = format!("per step:\n{per_step}");
    if !half {
        checks.push(scored("gradient norm before clipping (every step)".into(), worst_norm, GRAD_NORM_TOLERANCE));
        let lr_sum: f64 = lrs.iter().map(|row| row.iter().copied().fold(0.0, f64::max)).sum();
        let (finals, worst) = final_tensor_checks(&run_folder, &expected, &case.gradient_free, lr_sum, &f32_yardstick)?;
        checks.extend(finals);
        detail.push_str(&format!("\nthe furthest final tensors:\n{worst}"));
    }
    let ran_on = format!(
        "{} {}",
        crate::device::device_name(&options.device),
        if half { "bf16 mixed precision" } else { "f32" }
    );
    Ok(FixtureReport {
        dir: dir.to_owned(),
        kind: format!("training steps: {} ({} steps, relative deviations)", case.recipe, steps),
        tolerance: loss_tol as f32,
        relative: false,
        ran_on,
        checks,
        detail: Some(detail),
        own_bounds: true,
    })
}

/// `|ours − reference| / |reference|` (absolute where the reference is 0).
fn relative(ours: f64, reference: f64) -> f64 {
    let diff = (ours - reference).abs();
    if reference == 0.0 {
        diff
    } else if diff.is_nan() {
        f64::INFINITY
    } else {
        diff / reference.abs()
    }
}

fn scored(name: String, deviation: f64, tolerance: f64) -> TensorCheck {
    let status = if deviation <= tolerance { CheckStatus::Pass } else { CheckStatus::Fail };
    TensorCheck { name: format!("{name} ≤ {tolerance:.1e}"), max_abs_error: Some(deviation as f32), status }
}

/// The run's step records (one per optimizer step, in order) from its `metrics.jsonl`.
fn read_metrics(path: &Path) -> Result<Vec<serde_json::Map<String, Value>>> {
    let text = std::fs::read_to_string(path).map_err(Error::io(path))?;
    let mut records = vec![];
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let record: serde_json::Map<String, Value> =
            serde_json::from_str(line).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
        // Validation records carry `val/…` keys and no loss.
        if record.contains_key("loss") {
            records.push(record);
        }
    }
    Ok(records)
}

/// The final checkpoint's parameters and Adam moments against `final.*` of the fixture, per kind
/// (weights, `exp_avg`, `exp_avg_sq`): the largest deviation over all tensors relative to the
/// largest reference value of the kind ([`WEIGHT_TOLERANCE`]), and each tensor relative to its own
/// scale, within [`WEIGHT_TOLERANCE`] or twice what PyTorch's own f32 run of the fixture reaches
/// (`f32_yardstick`): a bias that starts at zero ends a few learning rates from it, and Adam turns
/// the rounding of its small gradients into relative differences no f32 run avoids. A tensor on
/// one side only fails.
fn final_tensor_checks(
    out: &Path,
    expected: &HashMap<String, Tensor>,
    gradient_free: &[String],
    lr_sum: f64,
    f32_yardstick: &HashMap<String, f64>,
) -> Result<(Vec<TensorCheck>, Table)> {
    let free_parts = gradient_free.iter().map(|e| FreePart::parse(e)).collect::<Result<Vec<_>>>()?;
    let checkpoints = Checkpointer::new(out.join("checkpoints"), 1);
    let latest = checkpoints.latest()?.ok_or_else(|| Error::Invalid("the replay wrote no checkpoint".into()))?;
    let ckpt = ctxalign_train::Checkpoint::load(&latest)?;
    let mut checks = vec![];
    let mut worst_table = Table::new(["final tensor", "deviation / its scale"]);
    let kinds = [
        ("weights", "", &ckpt.model),
        ("exp_avg", ".exp_avg", &ckpt.optimizer),
        ("exp_avg_sq", ".exp_avg_sq", &ckpt.optimizer),
    ];
    for (kind, suffix, ours) in kinds {
        // (max |ours − ref|, max |ref|, name) per tensor.
        let mut measured: Vec<(f64, f64, String)> = vec![];
        let mut missing = vec![];
        for (key, reference) in expected.iter().filter(|(k, _)| k.starts_with("final.")) {
            let name = &key["final.".len()..];
            let is_moment = name.ends_with(".exp_avg") || name.ends_with(".exp_avg_sq");
            let param = match suffix {
                "" if !is_moment => name,
                "" => continue,
                s => match name.strip_suffix(s) {
                    Some(p) => p,
                    None => continue,
                },
            };
            let free = free_parts.iter().find(|f| f.name == param);
            if free.is_some_and(|f| f.rows.is_none()) {
                continue;
            }
            let Some(t) = ours.get(name) else {
                missing.push(format!("{name} (ours lacks it)"));
                continue;
            };
            let (diff, scale) = match free.and_then(|f| f.rows) {
                Some((a, b)) => deviation_and_scale(&without_rows(t, a, b)?, &without_rows(reference, a, b)?)?,
                None => deviation_and_scale(t, reference)?,
            };
            measured.push((diff, scale, name.to_string()));
        }
        for name in ours.keys().filter(|k| suffix.is_empty() || k.ends_with(suffix)) {
            if !expected.contains_key(&format!("final.{name}")) {
                missing.push(format!("{name} (the reference lacks it)"));
            }
        }
        if !missing.is_empty() {
            missing.sort();
            let name = format!("final {kind}: {}", missing.join(", "));
            checks.push(TensorCheck { name, max_abs_error: None, status: CheckStatus::Fail });
            continue;
        }
        let kind_scale = measured.iter().map(|m| m.1).fold(0.0, f64::max);
        let worst_abs = measured.iter().map(|m| m.0).fold(0.0, f64::max);
        let global = if kind_scale > 0.0 { worst_abs / kind_scale } else { worst_abs };
        let of_largest = format!("final {kind} of the largest");
        let yardstick = f32_yardstick.get(&of_largest).copied();
        let pytorch = yardstick.map_or(String::new(), |y| format!(", PyTorch f32 {y:.1e}"));
        let allowed = WEIGHT_TOLERANCE.max(2.0 * yardstick.unwrap_or(0.0));
        checks.push(scored(format!("{of_largest} ({} tensors{pytorch})", measured.len()), global, allowed));
        let mut relative: Vec<(f64, String)> =
            measured.into_iter().map(|(d, s, n)| (if s > 0.0 { d / s } else { d }, n)).collect();
        relative.sort_by(|a, b| b.0.total_cmp(&a.0));
        for (dev, name) in relative.iter().take(3) {
            worst_table.row([name.clone(), format!("{dev:.2e}")]);
        }
        let yardstick = f32_yardstick.get(&format!("final {kind}")).copied();
        let allowed = WEIGHT_TOLERANCE.max(2.0 * yardstick.unwrap_or(0.0));
        if let Some((dev, name)) = relative.first() {
            let pytorch = yardstick.map_or(String::new(), |y| format!(", PyTorch f32 {y:.1e}"));
            checks.push(scored(format!("final {kind}, each of its own scale (worst {name}{pytorch})"), *dev, allowed));
        }
    }
    let mut moved = 0.0f64;
    for FreePart { name, rows } in &free_parts {
        let (Some(t), Some(reference)) = (ckpt.model.get(name), expected.get(&format!("final.{name}"))) else {
            let name = format!("gradient-free parameter {name}: not in both runs");
            checks.push(TensorCheck { name, max_abs_error: None, status: CheckStatus::Fail });
            continue;
        };
        let (t, reference) = match rows {
            Some((a, b)) if t.dims() == reference.dims() && *b <= t.dim(0)? => {
                (t.narrow(0, *a, b - a)?, reference.narrow(0, *a, b - a)?)
            }
            Some(_) => {
                let name = format!("gradient-free rows of {name}: outside the tensor, or shapes differ");
                checks.push(TensorCheck { name, max_abs_error: None, status: CheckStatus::Fail });
                continue;
            }
            None => (t.clone(), reference.clone()),
        };
        let diff = (t.to_dtype(DType::F64)? - reference.to_dtype(DType::F64)?)?.abs()?.flatten_all()?.max(0)?;
        moved = moved.max(diff.to_scalar::<f64>()? / lr_sum.max(f64::MIN_POSITIVE));
    }
    if !gradient_free.is_empty() {
        let label = format!("gradient-free by construction ({} tensors): |ours − ref| / Σ lr", gradient_free.len());
        checks.push(scored(label, moved, GRADIENT_FREE_BOUND));
    }
    Ok((checks, worst_table))
}

/// A gradient-free entry of `recipe.json`: a whole parameter, or rows `a..b` of one (`name[a:b]`).
struct FreePart {
    name: String,
    rows: Option<(usize, usize)>,
}

impl FreePart {
    fn parse(entry: &str) -> Result<Self> {
        let Some((name, range)) = entry.strip_suffix(']').and_then(|e| e.split_once('[')) else {
            return Ok(Self { name: entry.to_string(), rows: None });
        };
        let bad =
            || Error::Invalid(format!("recipe.json: gradient_free entry `{entry}` is not `name[a:b]` with a < b"));
        let (a, b) = range.split_once(':').ok_or_else(bad)?;
        let (a, b): (usize, usize) = (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
        if a >= b {
            return Err(bad());
        }
        Ok(Self { name: name.to_string(), rows: Some((a, b)) })
    }
}

/// `t` without its rows `a..b` (of the first dimension); `t` itself when they are not all inside it
/// (the shape comparison then reports the mismatch).
fn without_rows(t: &Tensor, a: usize, b: usize) -> Result<Tensor> {
    let n = t.dim(0)?;
    if b > n {
        return Ok(t.clone());
    }
    Ok(Tensor::cat(&[t.narrow(0, 0, a)?, t.narrow(0, b, n - b)?], 0)?)
}

/// `(max |ours − ref|, max |ref|)`; a shape mismatch is an infinite deviation.
fn deviation_and_scale(ours: &Tensor, reference: &Tensor) -> Result<(f64, f64)> {
    if ours.dims() != reference.dims() {
        return Ok((f64::INFINITY, 0.0));
    }
    let max_abs = |t: &Tensor| -> Result<f64> {
        Ok(if t.elem_count() == 0 { 0.0 } else { t.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()? })
    };
    let reference = reference.to_dtype(DType::F64)?;
    Ok((max_abs(&(ours.to_dtype(DType::F64)? - &reference)?)?, max_abs(&reference)?))
}

fn option<T: serde::de::DeserializeOwned>(options: &Value, key: &str) -> Result<T> {
    let value = options.get(key).cloned().ok_or_else(|| Error::Invalid(format!("recipe.json: no option `{key}`")))?;
    serde_json::from_value(value).map_err(|e| Error::Invalid(format!("recipe.json: option `{key}`: {e}")))
}

/// ContextCLIP training ([`train_contextclip`]) from `init.safetensors` with the fixture's
/// tokenizer.
fn replay_contextclip(dir: &Path, o: &Value, run: RunControl, rt: &Runtime, out: &Path, steps: u64) -> Result<()> {
    let config: ContextClipConfig = option(o, "config")?;
    let loss: ContextClipLossConfig = option(o, "loss")?;
    let opts = TrainOptions {
        out_dir: out.to_owned(),
        config,
        init: ContextClipInit { checkpoint: Some(dir.join("init.safetensors")), ..Default::default() },
        tokenizer: dir.join("tokenizer.json"),
        loss,
        steps: Some(steps),
        epochs: 1,
        batch_size: option(o, "batch_size")?,
        image_lr: option(o, "image_lr")?,
        text_lr: option(o, "text_lr")?,
        head_lr: option(o, "head_lr")?,
        weight_decay: option(o, "weight_decay")?,
        decoupled_weight_decay: option(o, "decoupled_weight_decay")?,
        warmup_steps: option(o, "warmup_steps")?,
        crop_scale: None,
        run,
    };
    train_contextclip(Vec::new(), &opts, rt)?;
    Ok(())
}

/// The BLIP backbone recipe ([`train_backbone`]) from the fixture's BLIP folder `model/`: its
/// stage 2 (ITC + ITM on hard negatives) alone, the stage the fixture records. Returns the stage's
/// run folder.
fn replay_backbone(dir: &Path, o: &Value, run: RunControl, rt: &Runtime, out: &Path, steps: u64) -> Result<PathBuf> {
    let run_dir = out.join("training");
    let opts = BackboneOptions {
        init: Some(dir.join("model")),
        itc_steps: 0,
        steps,
        all_captions: false,
        batch_size: option(o, "batch_size")?,
        lr: option(o, "lr")?,
        itm_lr: option(o, "itm_lr")?,
        weight_decay: option(o, "weight_decay")?,
        warmup_steps: option(o, "warmup_steps")?,
        max_tokens: option(o, "max_tokens")?,
        run,
        ..BackboneOptions::vignettes_small(out.join("model"), run_dir.clone())
    };
    train_backbone(Vec::new(), &opts, rt)?;
    Ok(run_dir.join(STAGE2))
}

/// ContextBLIP's S0 pre-training ([`pretrain`]) on the fixture's frozen BLIP `model/`, from the
/// adapter, decoder and text adapter of its S0 folder `init/`. Returns the run folder.
fn replay_s0(dir: &Path, o: &Value, run: RunControl, rt: &Runtime, out: &Path, steps: u64) -> Result<PathBuf> {
    let blip = ModelFiles::from_dir(&dir.join("model"))?;
    let opts = PretrainOptions {
        out_dir: out.to_owned(),
        config: option(o, "config")?,
        init: Some(dir.join("init")),
        negatives: option(o, "negatives")?,
        steps,
        batch_size: option(o, "batch_size")?,
        lr: option(o, "lr")?,
        weight_decay: option(o, "weight_decay")?,
        warmup_steps: option(o, "warmup_steps")?,
        epoch_decay: option(o, "epoch_decay")?,
        crop_scale: None,
        run,
    };
    pretrain(&blip, Vec::<CaptionedImage>::new(), &opts, rt)?;
    Ok(out.to_owned())
}

/// Classification fine-tuning ([`finetune_classifier`]) of the fixture's `model/`; the recorded
/// `test.images` stand in for the test set the recipe evaluates.
fn replay_classifier(
    dir: &Path,
    o: &Value,
    run: RunControl,
    rt: &Runtime,
    out: &Path,
    replay: &Replay,
    steps: u64,
) -> Result<()> {
    let classes: Vec<String> = option(o, "classes")?;
    let images = replay.recorded("test.images")?;
    let labels = replay.recorded("test.labels")?.to_dtype(DType::I64)?.to_vec1::<i64>()?;
    let (n, h, w, _) = images.dims4()?;
    let mut items = vec![];
    for (i, &label) in labels.iter().enumerate().take(n) {
        let raw = images.get(i)?.flatten_all()?.to_vec1::<u8>()?;
        let image = image::RgbImage::from_raw(w as u32, h as u32, raw)
            .ok_or_else(|| Error::Invalid("test.images: not [n, h, w, 3] u8".into()))?;
        items.push(ClassItem { source: ImageSource::Pixels(std::sync::Arc::new(image)), label: label as usize });
    }
    let test = ClassificationSet { classes, items };
    // The recorded batches replace the training images; the set still names the classes.
    let train = test.clone();
    let opts = FinetuneOptions {
        out_dir: out.to_owned(),
        templates: option(o, "templates")?,
        steps,
        batch_size: option(o, "batch_size")?,
        lr: option(o, "lr")?,
        classifier_lr: option(o, "classifier_lr")?,
        weight_decay: option(o, "weight_decay")?,
        run,
    };
    finetune_classifier(&dir.join("model"), &train, &test, &opts, rt)?;
    Ok(())
}

/// ContextBLIP S1 ([`finetune_s1`]) of the fixture's `blip/` with the S0 adapter of `s0/`; the
/// candidate head starts from `init.safetensors`. The recorded batches (each description with its
/// set's processed pixels) replace the split, which stays empty.
fn replay_s1(dir: &Path, o: &Value, run: RunControl, rt: &Runtime, out: &Path, replay: &Replay) -> Result<()> {
    let blip = ModelFiles::from_dir(&dir.join("blip"))?;
    let opts = crate::contextblip::FinetuneOptions {
        out_dir: out.to_owned(),
        epochs: replay.epochs(),
        max_steps: Some(replay.steps as u64),
        batch_size: option(o, "batch_size")?,
        backbone_lr: option(o, "backbone_lr")?,
        head_lr: option(o, "head_lr")?,
        weight_decay: option(o, "weight_decay")?,
        epoch_decay: option(o, "epoch_decay")?,
        train_vision: option(o, "train_vision")?,
        head_init: Some(dir.join("init.safetensors")),
        run,
    };
    let no_split = ImageCodeSplit { examples: vec![], image_root: dir.join("blip"), source: dir.join(INDEX_FILE) };
    finetune_s1(&blip, &dir.join("s0"), no_split, &opts, rt)?;
    Ok(())
}

/// ContextBLIP S2 ([`finetune_s2`]) on the S1 folder `s1/`, the encoder starting from
/// `init.safetensors`: the frozen features of the fixture's IMAGECODE split `imagecode/` (image
/// files, descriptions, targets; video or static by set name) are computed as `finetune-s2`
/// computes them — the S1 folder's scorer in the training precision — and the recorded steps pick
/// each batch's descriptions from them by index.
fn replay_s2(dir: &Path, o: &Value, run: RunControl, rt: &Runtime, out: &Path, replay: &Replay) -> Result<()> {
    let s1 = dir.join("s1");
    let split = ImageCodeSplit::open(&dir.join("imagecode"), "train")?;
    let options = ScorerOptions { dtype: rt.dtype(), ..Default::default() };
    let scorer = BlipScorer::from_files(&ModelFiles::from_dir(&s1)?, options, &rt.device)?.with_contextblip(&s1)?;
    let features = candidate_features(&scorer, &split, &|_| {})?;
    let opts = InterContextOptions {
        out_dir: out.to_owned(),
        epochs: replay.epochs(),
        batch_size: option(o, "batch_size")?,
        lr: option(o, "lr")?,
        weight_decay: option(o, "weight_decay")?,
        init: Some(dir.join("init.safetensors")),
        run,
    };
    finetune_s2(&s1, features, &opts, rt)?;
    Ok(())
}

//! The parity runner: computes every output a reference fixture names and compares it.
//!
//! A fixture is a folder with `expected.safetensors` (inputs and reference outputs) and the files
//! that say what it is (the layout of the reference fixtures; see `tests/fixtures/`):
//! - `config.json` of `BlipForImageTextRetrieval` (+ `model.safetensors`): a BLIP ITM case;
//! - `adapter.json` (+ `adapter.safetensors`): ContextBLIP's adapter on the BLIP fixture it names;
//! - `processors.json` (+ image files): HF image processors on those files;
//! - `cases.json`: contextual-loss cases (two named inputs, a mode and a band width each);
//! - `config.json` of `CLIPModel` or `BertModel` (+ `model.safetensors`): a CLIP or BERT case;
//! - `config.json` with `block` and `layers` (+ `model.safetensors`): a timm-layout ResNet case;
//! - `recipe.json` (+ recorded batches): a training run replayed step by step ([`crate::steps`]).
//!
//! Sizes (image size, layers, heads, widths, vocabulary, taps, reduction) all come from the folder,
//! so a case of another shape needs no code. Outputs the runner cannot compute are reported as
//! unchecked, never dropped.
//!
//! [`RunOptions`] picks the device and the dtype the models run in. In f32 a model output must be
//! within [`MODEL_TOLERANCE`] of the reference; in bf16/f16 within [`half_tolerance`] of the
//! reference's own scale (half precision keeps 8 / 11 significant bits, so its error grows with the
//! magnitude of the values), i.e. `max |ours − ref| ≤ tol · max(1, max |ref|)`.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use ctxalign_data::ImageProcessor;
use ctxalign_eval::Table;
use ctxalign_models::bert::BertModel;
use ctxalign_models::blip::{mean_cross_attention, BlipItm, BlipVisionOutput, ImageMemory};
use ctxalign_models::clip::ClipModel;
use ctxalign_models::contextblip::masking::text_guided_patches;
use ctxalign_models::contextblip::MaskingConfig;
use ctxalign_models::loading::{build_from_safetensors, read_json, AllowedUnused, RenameTable};
use ctxalign_models::resnet::ResNet;
use ctxalign_models::{LoadError, ModelFiles};
use ctxalign_nn::{contextual_loss, ContextualMode};
use ctxalign_nn::{AdapterAggregation, AdapterConfig, MultiScaleAdapter};

use crate::{Error, Result};

/// Default tolerance for model outputs (max |ours − reference| in f32).
pub const MODEL_TOLERANCE: f32 = 1e-4;
/// Default tolerance for preprocessing: one grey level after normalisation is 1/255/std ≈ 1.5e-2,
/// so 2e-2 allows at most one level against the fixture's own reference (decoding and both resize
/// modes are exact, so the errors seen are float rounding and a float16 fixture's storage).
pub const PREPROCESS_TOLERANCE: f32 = 2e-2;

/// Relative tolerance of model outputs computed in a half-precision `dtype` (measured on the
/// shipped fixtures, in `BENCHMARKS.md`): bf16 keeps 8 significant bits (a rounding step of 2⁻⁸ ≈
/// 0.4 %) through every layer, f16 keeps 11.
pub fn half_tolerance(dtype: DType) -> Option<f32> {
    match dtype {
        DType::BF16 => Some(BF16_TOLERANCE),
        DType::F16 => Some(F16_TOLERANCE),
        _ => None,
    }
}
/// See [`half_tolerance`].
pub const BF16_TOLERANCE: f32 = 6e-2;
/// See [`half_tolerance`].
pub const F16_TOLERANCE: f32 = 1e-2;

/// Where and in what dtype a fixture's models run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Overrides the kind's default tolerance (absolute in f32; relative to the reference's scale
    /// in half precision).
    pub tolerance: Option<f32>,
    /// The device the models run on (default: the CPU).
    pub device: Device,
    /// The models' weight and activation dtype (f32, bf16 or f16).
    pub dtype: DType,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self { tolerance: None, device: Device::Cpu, dtype: DType::F32 }
    }
}

/// Device and dtype as the computations below use them.
struct Ctx {
    device: Device,
    dtype: DType,
}

impl Ctx {
    /// A float input of the fixture on the device, in the model dtype.
    fn float(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.to_device(&self.device)?.to_dtype(self.dtype)?)
    }
    /// Token ids / masks on the device.
    fn ids(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.to_dtype(DType::U32)?.to_device(&self.device)?)
    }
}

/// The result for one named tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum CheckStatus {
    /// Within tolerance.
    Pass,
    /// Past tolerance, or not finite.
    Fail,
    /// Computed, but with another shape than the reference.
    ShapeMismatch {
        /// Our output's shape.
        ours: Vec<usize>,
        /// The reference's shape.
        reference: Vec<usize>,
    },
    /// Not computed; the reason says why.
    Unchecked(String),
}

/// The check of one named reference output.
#[derive(Debug, Clone)]
pub struct TensorCheck {
    /// The output's name in `expected.safetensors` (a step fixture's carries its bound).
    pub name: String,
    /// Max |ours − reference| over its elements (a step fixture's relative deviation); `None` when
    /// not computed or mis-shaped.
    pub max_abs_error: Option<f32>,
    /// Whether it passed, and why not.
    pub status: CheckStatus,
}

/// All checks of one fixture folder.
#[derive(Debug, Clone)]
pub struct FixtureReport {
    /// The fixture folder.
    pub dir: PathBuf,
    /// What the folder holds, as detected (`BlipForImageTextRetrieval`, `image processors`, …).
    pub kind: String,
    /// The bound the checks were held to (absolute, or relative when `relative`).
    pub tolerance: f32,
    /// The tolerance scales with each reference's magnitude (half-precision runs).
    pub relative: bool,
    /// Where and in what dtype the models ran (`cpu f32`).
    pub ran_on: String,
    /// One check per reference output (inputs excluded), by name.
    pub checks: Vec<TensorCheck>,
    /// More to show after the checks (a step fixture's per-step deviations).
    pub detail: Option<String>,
    /// Each check carries its own bound in its name (a step fixture's); `tolerance` is then only
    /// the base bound of its loss terms.
    pub own_bounds: bool,
}

impl FixtureReport {
    /// No computed output is past tolerance or mis-shaped.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| matches!(c.status, CheckStatus::Pass | CheckStatus::Unchecked(_)))
    }

    /// Names of the outputs that were not computed.
    pub fn unchecked(&self) -> Vec<&str> {
        self.checks.iter().filter(|c| matches!(c.status, CheckStatus::Unchecked(_))).map(|c| c.name.as_str()).collect()
    }

    /// The largest error of the computed outputs (0 when none was computed).
    pub fn max_error(&self) -> f32 {
        self.checks.iter().filter_map(|c| c.max_abs_error).fold(0.0, f32::max)
    }
}

impl fmt::Display for FixtureReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scale = if self.relative { " × max(1, max|ref|)" } else { "" };
        writeln!(f, "{} ({}, {}, tolerance {:e}{scale})", self.dir.display(), self.kind, self.ran_on, self.tolerance)?;
        let mut table = Table::new(["output", "max abs error", "status"]);
        for c in &self.checks {
            let err = c.max_abs_error.map(|e| format!("{e:.3e}")).unwrap_or_else(|| "-".into());
            let status = match &c.status {
                CheckStatus::Pass => "ok".to_string(),
                CheckStatus::Fail => "FAIL".to_string(),
                CheckStatus::ShapeMismatch { ours, reference } => format!("FAIL shape {ours:?} vs {reference:?}"),
                CheckStatus::Unchecked(why) => format!("unchecked: {why}"),
            };
            table.row([c.name.clone(), err, status]);
        }
        write!(f, "{table}")?;
        match &self.detail {
            Some(detail) => write!(f, "\n{detail}"),
            None => Ok(()),
        }
    }
}

/// What a fixture folder holds.
enum Kind {
    ContextualLoss,
    Blip,
    Clip,
    Bert,
    ResNet,
    Adapter,
    Preprocess,
    Unknown(String),
}

fn detect(dir: &Path) -> Result<Kind> {
    if dir.join("processors.json").is_file() {
        return Ok(Kind::Preprocess);
    }
    if dir.join("cases.json").is_file() {
        return Ok(Kind::ContextualLoss);
    }
    if dir.join("adapter.json").is_file() {
        return Ok(Kind::Adapter);
    }
    let config = dir.join("config.json");
    if config.is_file() {
        let v: serde_json::Value = read_json(&config)?;
        let archs: Vec<&str> =
            v["architectures"].as_array().map(|a| a.iter().filter_map(|s| s.as_str()).collect()).unwrap_or_default();
        if archs.contains(&"BlipForImageTextRetrieval") || v["model_type"] == "blip" {
            return Ok(Kind::Blip);
        }
        if archs.contains(&"CLIPModel") || v["model_type"] == "clip" {
            return Ok(Kind::Clip);
        }
        if archs.contains(&"BertModel") || v["model_type"] == "bert" {
            return Ok(Kind::Bert);
        }
        // timm writes no config.json; a ResNet folder carries its constructor arguments.
        if v.get("block").is_some() && v.get("layers").is_some() {
            return Ok(Kind::ResNet);
        }
        let what = archs.first().map(|s| s.to_string()).or_else(|| v["model_type"].as_str().map(String::from));
        return Ok(Kind::Unknown(what.unwrap_or_else(|| "unrecognised config.json".into())));
    }
    Ok(Kind::Unknown("no config.json, adapter.json or processors.json".into()))
}

/// Runs one fixture folder on the CPU in f32. `tolerance` overrides the kind's default.
pub fn run_fixture(dir: &Path, tolerance: Option<f32>) -> Result<FixtureReport> {
    run_fixture_with(dir, &RunOptions { tolerance, ..Default::default() })
}

/// Runs one fixture folder with the models on `options.device` in `options.dtype`.
pub fn run_fixture_with(dir: &Path, options: &RunOptions) -> Result<FixtureReport> {
    if dir.join("recipe.json").is_file() {
        #[cfg(feature = "train")]
        return crate::steps::run_step_fixture(dir, options);
        #[cfg(not(feature = "train"))]
        return Err(Error::Invalid(format!(
            "{}: a training-step fixture; replaying it needs the `train` feature",
            dir.display()
        )));
    }
    let ctx = Ctx { device: options.device.clone(), dtype: options.dtype };
    let expected_path = dir.join("expected.safetensors");
    if !expected_path.is_file() {
        return Err(LoadError::MissingFile { path: expected_path, what: "fixture outputs".into() }.into());
    }
    let expected = candle_core::safetensors::load(&expected_path, &Device::Cpu)
        .map_err(|e| LoadError::Safetensors { path: expected_path.clone(), message: e.to_string() })?;
    let model_tol = half_tolerance(ctx.dtype).unwrap_or(MODEL_TOLERANCE);
    let (kind, default_tol, computed) = match detect(dir)? {
        Kind::Blip => ("BlipForImageTextRetrieval".to_string(), model_tol, blip_outputs(dir, &expected, None, &ctx)?),
        Kind::Adapter => ("ContextBLIP adapter".to_string(), model_tol, adapter_outputs(dir, &expected, &ctx)?),
        Kind::ContextualLoss => {
            ("contextual loss".to_string(), model_tol, contextual_loss_outputs(dir, &expected, &ctx)?)
        }
        Kind::Clip => ("CLIPModel".to_string(), model_tol, clip_outputs(dir, &expected, &ctx)?),
        Kind::Bert => ("BertModel".to_string(), model_tol, bert_outputs(dir, &expected, &ctx)?),
        Kind::ResNet => ("ResNet (timm layout)".to_string(), model_tol, resnet_outputs(dir, &expected, &ctx)?),
        // Preprocessing is f32 whatever the model dtype: it is checked at its own tolerance.
        Kind::Preprocess => {
            ("image processors".to_string(), PREPROCESS_TOLERANCE, preprocess_outputs(dir, &expected, &ctx)?)
        }
        Kind::Unknown(what) => (format!("unsupported: {what}"), model_tol, Computed::default()),
    };
    let relative = half_tolerance(ctx.dtype).is_some() && default_tol == model_tol;
    let tolerance = options.tolerance.unwrap_or(default_tol);
    let mut names: Vec<&String> = expected
        .keys()
        .filter(|n| !computed.inputs.contains(n.as_str()) && !computed.input_names.contains(*n))
        .collect();
    names.sort();
    let checks = names
        .into_iter()
        .map(|name| check(name, &expected[name], computed.outputs.get(name), tolerance, relative))
        .collect::<Result<Vec<_>>>()?;
    let ran_on = format!("{} {}", crate::device::device_name(&ctx.device), format!("{:?}", ctx.dtype).to_lowercase());
    Ok(FixtureReport {
        dir: dir.to_owned(),
        kind,
        tolerance,
        relative,
        ran_on,
        checks,
        detail: None,
        own_bounds: false,
    })
}

fn check(
    name: &str,
    reference: &Tensor,
    ours: Option<&Result<Tensor, String>>,
    tol: f32,
    relative: bool,
) -> Result<TensorCheck> {
    let (max_abs_error, status) = match ours {
        None => (None, CheckStatus::Unchecked("no computation for this output name".into())),
        Some(Err(why)) => (None, CheckStatus::Unchecked(why.clone())),
        Some(Ok(t)) if t.dims() != reference.dims() => {
            (None, CheckStatus::ShapeMismatch { ours: t.dims().to_vec(), reference: reference.dims().to_vec() })
        }
        Some(Ok(t)) => {
            let reference = reference.to_dtype(DType::F64)?;
            let diff = (t.to_device(&Device::Cpu)?.to_dtype(DType::F64)? - &reference)?.abs()?;
            let max_of = |t: &Tensor| -> Result<f32> {
                Ok(if t.elem_count() == 0 { 0.0 } else { t.flatten_all()?.max(0)?.to_scalar::<f64>()? as f32 })
            };
            let err = max_of(&diff)?;
            let allowed = if relative { tol * max_of(&reference.abs()?)?.max(1.0) } else { tol };
            (Some(err), if err <= allowed && err.is_finite() { CheckStatus::Pass } else { CheckStatus::Fail })
        }
    };
    Ok(TensorCheck { name: name.to_string(), max_abs_error, status })
}

/// Outputs computed for a fixture, and which of its tensors are inputs.
#[derive(Default)]
struct Computed {
    inputs: std::collections::HashSet<&'static str>,
    /// Inputs named by the fixture itself (not known at compile time).
    input_names: std::collections::HashSet<String>,
    outputs: HashMap<String, Result<Tensor, String>>,
}

fn input<'a>(expected: &'a HashMap<String, Tensor>, name: &str) -> Result<&'a Tensor> {
    expected.get(name).ok_or_else(|| Error::Invalid(format!("fixture has no input tensor `{name}`")))
}

/// Parses `prefix{a}_{b}` names into `(a, b)`.
fn pair_suffix(name: &str, prefix: &str) -> Option<(usize, usize)> {
    let rest = name.strip_prefix(prefix)?;
    let (a, b) = rest.split_once('_')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Every BLIP output of the fixture, from the model's own images or from `adapted` image embeds.
fn blip_outputs(
    dir: &Path,
    expected: &HashMap<String, Tensor>,
    adapter: Option<&AdapterCase>,
    ctx: &Ctx,
) -> Result<Computed> {
    let dev = &ctx.device;
    let model = match adapter {
        Some(a) => a.model.clone(),
        None => BlipItm::load(&ModelFiles::from_dir(dir)?, ctx.dtype, dev)?,
    };
    let pixel_values = &ctx.float(input(expected, "pixel_values")?)?;
    let cls_ids = ctx.ids(input(expected, "input_ids")?)?;
    let mask = ctx.ids(input(expected, "attention_mask")?)?;
    let itm_ids = match expected.get("itm_input_ids") {
        Some(t) => ctx.ids(t)?,
        None => cls_ids.clone(),
    };
    let vision: BlipVisionOutput = model.vision_model.forward_with_hidden_states(pixel_values)?;
    let image_embeds = match adapter {
        Some(a) => {
            a.adapter.forward(&vision.hidden_states, &model.vision_model.post_layernorm, &vision.last_hidden_state)?
        }
        None => vision.last_hidden_state.clone(),
    };
    let images = model.prepare_images(image_embeds.clone())?;
    let n_images = pixel_values.dim(0)?;
    let n_texts = cls_ids.dim(0)?;

    // ITM of every (image, text) pair, with cross-attentions: [images][texts].
    let mut pairs: Vec<Vec<ctxalign_models::blip::ItmOutput>> = Vec::with_capacity(n_images);
    for i in 0..n_images {
        let mem: ImageMemory = images.memory.select(i)?;
        let mut row = Vec::with_capacity(n_texts);
        for j in 0..n_texts {
            row.push(model.itm(&mem, &itm_ids.i(j..j + 1)?, &mask.i(j..j + 1)?, true)?);
        }
        pairs.push(row);
    }
    let pair = |i: usize, j: usize| -> Result<&ctxalign_models::blip::ItmOutput, String> {
        pairs
            .get(i)
            .and_then(|r| r.get(j))
            .ok_or_else(|| format!("pair ({i}, {j}) is outside {n_images} images x {n_texts} texts"))
    };

    let mut out = Computed {
        inputs: ["pixel_values", "input_ids", "itm_input_ids", "attention_mask"].into(),
        ..Default::default()
    };
    let text_feat = model.text_features(&cls_ids, &mask)?;
    for name in expected.keys() {
        let value: Option<Result<Tensor, String>> = if let Some(k) = name.strip_prefix("vision_hidden_state_") {
            Some(k.parse::<usize>().map_err(|e| e.to_string()).and_then(|k| {
                vision
                    .hidden_states
                    .get(k)
                    .cloned()
                    .ok_or(format!("the vision model has {} layers", vision.hidden_states.len() - 1))
            }))
        } else if name == "vision_last_hidden_state" {
            Some(Ok(vision.last_hidden_state.clone()))
        } else if name == "adapted_image_embeds" && adapter.is_some() {
            Some(Ok(image_embeds.clone()))
        } else if name == "text_last_hidden_state" {
            Some(Ok(model.text_encoder.forward(&cls_ids, &mask, None, false)?.last_hidden_state))
        } else if name == "itc_similarity" {
            Some(Ok(BlipItm::itc_similarity(&images.itc_features, &text_feat)?))
        } else if name == "itm_logits_pairs" {
            let rows = (0..n_images)
                .map(|i| Tensor::cat(&(0..n_texts).map(|j| pairs[i][j].logits.clone()).collect::<Vec<_>>(), 0))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Some(Ok(Tensor::stack(&rows, 0)?))
        } else if name == "itm_logits_diag" {
            let n = n_images.min(n_texts);
            Some(Ok(Tensor::cat(&(0..n).map(|i| pairs[i][i].logits.clone()).collect::<Vec<_>>(), 0)?))
        } else if let Some((i, j)) = pair_suffix(name, "mm_last_hidden_state_") {
            Some(pair(i, j).and_then(|p| p.fused.i(0).map_err(|e| e.to_string())))
        } else if let Some((i, j)) = pair_suffix(name, "cross_attention_last_layer_") {
            Some(pair(i, j).and_then(|p| {
                p.cross_attentions.last().ok_or("no cross-attention".to_string())?.i(0).map_err(|e| e.to_string())
            }))
        } else if let Some((i, j)) = pair_suffix(name, "cross_attention_mean_") {
            Some(pair(i, j).and_then(|p| {
                mean_cross_attention(&p.cross_attentions).and_then(|m| m.i(0)).map_err(|e| e.to_string())
            }))
        } else if name == "masked_patches_token" {
            adapter.map(|a| {
                let p = pair(0, 0)?;
                let mean = mean_cross_attention(&p.cross_attentions)
                    .and_then(|m| m.i((0, a.mask_token)))
                    .map_err(|e| e.to_string())?;
                let scores = mean.to_dtype(DType::F32).and_then(|m| m.to_vec1::<f32>()).map_err(|e| e.to_string())?;
                // ContextBLIP's own masking code, without its noise: the fixture has none.
                let masking = MaskingConfig { ratio: a.mask_ratio, ..Default::default() };
                let k = masking.masked_count(scores.len()).map_err(|e| e.to_string())?;
                let mut idx: Vec<i64> =
                    text_guided_patches(&scores, k, 0.0, &mut || 0.0).into_iter().map(|i| i as i64).collect();
                if let Some(tol) = half_tolerance(ctx.dtype) {
                    idx = tie_equivalent(idx, name, a.mask_token, expected, tol).map_err(|e| e.to_string())?;
                }
                Tensor::new(idx, dev).map_err(|e| e.to_string())
            })
        } else {
            None
        };
        if let Some(v) = value {
            out.outputs.insert(name.clone(), v);
        }
    }
    Ok(out)
}

/// In half precision, a chosen patch counts as the reference's choice at the same rank when the
/// reference's own scores (`cross_attention_mean_0_0`, row `token`) put the two within `tol` of
/// the largest score: rounding to 8 mantissa bits reorders near-ties, and an index has no
/// "nearly equal". A choice the reference scores lower than that is left as it is and fails.
fn tie_equivalent(
    ours: Vec<i64>,
    name: &str,
    token: usize,
    expected: &HashMap<String, Tensor>,
    tol: f32,
) -> Result<Vec<i64>> {
    let reference: Vec<i64> = input(expected, name)?.to_dtype(DType::I64)?.to_vec1()?;
    let scores: Vec<f32> = input(expected, "cross_attention_mean_0_0")?.i(token)?.to_dtype(DType::F32)?.to_vec1()?;
    let allowed = tol * scores.iter().fold(0f32, |m, s| m.max(s.abs()));
    let score = |i: i64| usize::try_from(i).ok().and_then(|i| scores.get(i).copied());
    Ok(ours
        .into_iter()
        .zip(reference.iter().copied().chain(std::iter::repeat(-1)))
        .map(|(o, r)| match (score(o), score(r)) {
            (Some(so), Some(sr)) if o != r && (so - sr).abs() <= allowed => r,
            _ => o,
        })
        .collect())
}

/// A BLIP fixture with a ContextBLIP adapter on top.
struct AdapterCase {
    model: BlipItm,
    adapter: MultiScaleAdapter,
    mask_ratio: f64,
    mask_token: usize,
}

#[derive(serde::Deserialize)]
struct AdapterFixture {
    blip: String,
    taps: Vec<usize>,
    reduction: usize,
    aggregation: AdapterAggregation,
    mask_ratio: f64,
    mask_token: usize,
}

fn adapter_outputs(dir: &Path, expected: &HashMap<String, Tensor>, ctx: &Ctx) -> Result<Computed> {
    let settings: AdapterFixture = read_json(&dir.join("adapter.json"))?;
    // The BLIP case named by `blip` is a sibling folder; its inputs are this case's inputs.
    let blip_dir = dir.parent().unwrap_or(Path::new(".")).join(&settings.blip);
    let model = BlipItm::load(&ModelFiles::from_dir(&blip_dir)?, ctx.dtype, &ctx.device)?;
    let cfg = AdapterConfig {
        hidden_size: model.config.vision_config.hidden_size,
        taps: settings.taps,
        reduction: settings.reduction,
        aggregation: settings.aggregation,
    };
    let adapter = build_from_safetensors(
        &[dir.join("adapter.safetensors")],
        RenameTable::identity(),
        &AllowedUnused::none(),
        ctx.dtype,
        &ctx.device,
        |vb| MultiScaleAdapter::new(&cfg, vb),
    )?;
    let base = candle_core::safetensors::load(blip_dir.join("expected.safetensors"), &Device::Cpu)?;
    let mut merged: HashMap<String, Tensor> = expected.clone();
    for name in ["pixel_values", "input_ids", "itm_input_ids", "attention_mask"] {
        if let (false, Some(t)) = (merged.contains_key(name), base.get(name)) {
            merged.insert(name.to_string(), t.clone());
        }
    }
    let case = AdapterCase { model, adapter, mask_ratio: settings.mask_ratio, mask_token: settings.mask_token };
    let mut out = blip_outputs(dir, &merged, Some(&case), ctx)?;
    // Only this fixture's own outputs are checked here; the base case checks the rest.
    out.outputs.retain(|k, _| expected.contains_key(k));
    Ok(out)
}

/// Keeps the outputs the fixture names; `inputs` are not checked.
fn named_outputs(
    expected: &HashMap<String, Tensor>,
    inputs: &[&'static str],
    candidates: Vec<(&str, candle_core::Result<Tensor>)>,
) -> Computed {
    let mut out = Computed { inputs: inputs.iter().copied().collect(), ..Default::default() };
    for (name, value) in candidates {
        if expected.contains_key(name) {
            out.outputs.insert(name.to_string(), value.map_err(|e| e.to_string()));
        }
    }
    out
}

#[derive(serde::Deserialize)]
struct ContextualCase {
    image: String,
    text: String,
    mode: ContextualMode,
    band_width: f64,
    expected: String,
}

/// Each case of `cases.json`: the loss of two named input tensors, under the expected name (in f64
/// for an f32 run — the loss is a formula check — else in the run's dtype).
fn contextual_loss_outputs(dir: &Path, expected: &HashMap<String, Tensor>, ctx: &Ctx) -> Result<Computed> {
    let cases: Vec<ContextualCase> = read_json(&dir.join("cases.json"))?;
    let dtype = if ctx.dtype == DType::F32 { DType::F64 } else { ctx.dtype };
    let mut out = Computed::default();
    for case in &cases {
        let value = (|| -> Result<Tensor> {
            let x = input(expected, &case.image)?.to_device(&ctx.device)?.to_dtype(dtype)?;
            let y = input(expected, &case.text)?.to_device(&ctx.device)?.to_dtype(dtype)?;
            Ok(contextual_loss(&x, &y, case.mode, case.band_width)?.reshape(1)?.to_dtype(DType::F32)?)
        })();
        out.outputs.insert(case.expected.clone(), value.map_err(|e| e.to_string()));
        out.input_names.extend([case.image.clone(), case.text.clone()]);
    }
    Ok(out)
}

fn clip_outputs(dir: &Path, expected: &HashMap<String, Tensor>, ctx: &Ctx) -> Result<Computed> {
    let model = ClipModel::load(&ModelFiles::from_dir(dir)?, ctx.dtype, &ctx.device)?;
    let pixel_values = &ctx.float(input(expected, "pixel_values")?)?;
    let input_ids = ctx.ids(input(expected, "input_ids")?)?;
    let mask = ctx.ids(input(expected, "attention_mask")?)?;
    let out = model.forward(pixel_values, &input_ids, &mask)?;
    Ok(named_outputs(
        expected,
        &["pixel_values", "input_ids", "attention_mask"],
        vec![
            ("image_embeds", Ok(out.image_embeds)),
            ("text_embeds", Ok(out.text_embeds)),
            ("logits_per_image", Ok(out.logits_per_image)),
            ("logits_per_text", Ok(out.logits_per_text)),
            ("vision_pooled", model.get_image_features(pixel_values)),
            ("text_pooled", model.get_text_features(&input_ids, &mask)),
        ],
    ))
}

fn bert_outputs(dir: &Path, expected: &HashMap<String, Tensor>, ctx: &Ctx) -> Result<Computed> {
    let model = BertModel::load(&ModelFiles::from_dir(dir)?, ctx.dtype, &ctx.device)?;
    let input_ids = ctx.ids(input(expected, "input_ids")?)?;
    let mask = ctx.ids(input(expected, "attention_mask")?)?;
    let token_types = expected.get("token_type_ids").map(|t| ctx.ids(t)).transpose()?;
    let out = model.forward(&input_ids, &mask, token_types.as_ref())?;
    let pooled = out.pooler_output.ok_or_else(|| candle_core::Error::Msg("the checkpoint has no pooler".into()));
    Ok(named_outputs(
        expected,
        &["input_ids", "attention_mask", "token_type_ids"],
        vec![("last_hidden_state", Ok(out.last_hidden_state)), ("pooler_output", pooled)],
    ))
}

fn resnet_outputs(dir: &Path, expected: &HashMap<String, Tensor>, ctx: &Ctx) -> Result<Computed> {
    let model = ResNet::load(&ModelFiles::from_dir(dir)?, ctx.dtype, &ctx.device)?;
    let out = model.forward_features(&ctx.float(input(expected, "pixel_values")?)?)?;
    Ok(named_outputs(expected, &["pixel_values"], vec![("features", Ok(out.features)), ("pooled", Ok(out.pooled))]))
}

fn preprocess_outputs(dir: &Path, expected: &HashMap<String, Tensor>, ctx: &Ctx) -> Result<Computed> {
    let processors_path = dir.join("processors.json");
    let processors: HashMap<String, serde_json::Value> = read_json(&processors_path)?;
    let files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| LoadError::Io { path: dir.to_owned(), source })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    let mut out = Computed::default();
    for name in expected.keys() {
        let value = (|| -> Result<Tensor, String> {
            let (proc_name, stem) = name.split_once('_').ok_or("expected `<processor>_<image stem>`")?;
            let cfg = processors.get(proc_name).ok_or(format!("processors.json has no `{proc_name}`"))?;
            let processor =
                ImageProcessor::from_hf_value(cfg).map_err(|e| format!("{}: {e}", processors_path.display()))?;
            let file = files
                .iter()
                .find(|p| {
                    p.file_stem().and_then(|s| s.to_str()) == Some(stem)
                        && p.extension().is_some_and(|e| e != "json" && e != "safetensors")
                })
                .ok_or(format!("no image file named {stem}.*"))?;
            processor.load(file, Default::default(), &ctx.device).map_err(|e| e.to_string())
        })();
        out.outputs.insert(name.clone(), value);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A near-tie in the reference's own scores is the same choice; a clearly worse patch is not.
    #[test]
    fn half_precision_index_outputs_accept_only_ties() -> Result<()> {
        let dev = Device::Cpu;
        // Row 1 of a [2, 5] score map: patches 3 and 0 nearly tie, patch 4 is far below.
        let scores = Tensor::new(&[[0.0f32; 5], [0.300, 0.05, 0.10, 0.301, 0.02]], &dev)?;
        let expected: HashMap<String, Tensor> = [
            ("cross_attention_mean_0_0".to_string(), scores),
            ("masked_patches_token".to_string(), Tensor::new(&[3i64, 0], &dev)?),
        ]
        .into();
        let tie = tie_equivalent(vec![0, 3], "masked_patches_token", 1, &expected, 1e-2)?;
        assert_eq!(tie, vec![3, 0], "a near-tie swap is the reference's choice");
        let worse = tie_equivalent(vec![3, 4], "masked_patches_token", 1, &expected, 1e-2)?;
        assert_eq!(worse, vec![3, 4], "a clearly lower-scored patch stays and fails the check");
        Ok(())
    }
}

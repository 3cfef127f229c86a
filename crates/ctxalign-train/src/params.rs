//! Building a model for training: trainable parameters become [`Var`]s, frozen ones are loaded as
//! plain tensors (so no optimizer can ever touch them), and parameters absent from the checkpoint
//! are initialised from a seed — per parameter name, so the values do not depend on build order.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use ctxalign_data::rng::Rng;
use ctxalign_models::loading::{AllowedUnused, CheckedSafetensors, RenameTable};
use ctxalign_models::LoadError;

use crate::precision::master_dtype;

/// How a parameter that the checkpoint does not provide starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Zeros,
    Ones,
    Constant(f64),
    /// `N(0, std²)`.
    Normal {
        std: f64,
    },
}

/// BERT/ViT initialisation as HF's `_init_weights` (BLIP, BERT, ViT): biases 0, LayerNorm weights 1,
/// every other weight (linear, embedding, patch, position and class embeddings) `N(0, std²)`.
pub fn transformer_init(std: f64) -> impl Fn(&str, &[usize]) -> Init + Send + Sync + 'static {
    move |name: &str, _shape: &[usize]| {
        let (parent, leaf) = name.rsplit_once('.').unwrap_or(("", name));
        if leaf == "bias" {
            Init::Zeros
        } else if leaf == "weight" && parent.rsplit('.').next().unwrap_or("").to_lowercase().contains("norm") {
            Init::Ones
        } else {
            Init::Normal { std }
        }
    }
}

/// The trainable parameters of a model, by name (sorted, so iteration order is reproducible).
///
/// Under mixed precision (a half-precision model, see [`crate::precision`]) each half-precision
/// parameter also has an f32 master copy: the optimizer updates the master and writes its rounded
/// value into the parameter, and [`TrainableParams::tensors`] (checkpoints, exports) returns the
/// masters.
#[derive(Debug, Clone, Default)]
pub struct TrainableParams {
    /// The parameters the model computes with.
    pub vars: BTreeMap<String, Var>,
    /// f32 master copies of the half-precision entries of `vars` (empty for an f32 model).
    pub masters: BTreeMap<String, Var>,
}

impl TrainableParams {
    pub fn len(&self) -> usize {
        self.vars.len()
    }
    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }
    /// Total number of scalar parameters.
    pub fn numel(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }
    /// Adds parameters that live outside the model (e.g. a learned temperature). A half-precision
    /// `var` gets an f32 master copy of its current value.
    pub fn insert(&mut self, name: impl Into<String>, var: Var) -> candle_core::Result<()> {
        let name = name.into();
        let master_dtype = master_dtype(var.dtype());
        if master_dtype != var.dtype() {
            self.masters.insert(name.clone(), Var::from_tensor(&var.as_tensor().to_dtype(master_dtype)?)?);
        }
        self.vars.insert(name, var);
        Ok(())
    }
    /// Keeps the parameters (and their masters) whose name satisfies `keep`.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.vars.retain(|k, _| keep(k));
        self.masters.retain(|k, _| keep(k));
    }
    /// The f32 master copy of parameter `name`, if it has one (mixed precision).
    pub fn master(&self, name: &str) -> Option<&Var> {
        self.masters.get(name)
    }
    /// Full-precision current values, for saving (`model.safetensors` layout: HF key names): the
    /// master copy where a parameter has one.
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.vars.iter().map(|(k, v)| (k.clone(), self.masters.get(k).unwrap_or(v).as_tensor().clone())).collect()
    }
    /// Sets parameter `name` (and its master) to `value`, cast to each one's dtype and device.
    pub fn set(&self, name: &str, value: &Tensor) -> candle_core::Result<()> {
        let Some(var) = self.vars.get(name) else { candle_core::bail!("no trainable parameter `{name}`") };
        if let Some(master) = self.masters.get(name) {
            master.set(&value.to_dtype(master.dtype())?.to_device(master.device())?)?;
        }
        var.set(&value.to_dtype(var.dtype())?.to_device(var.device())?)
    }
}

/// Chooses the initialisation of a parameter from its name and shape.
pub type InitRule = Box<dyn Fn(&str, &[usize]) -> Init + Send + Sync>;

/// Where the parameters of a model under construction come from.
pub struct ParamSource {
    /// Checkpoint to start from: its files and the rename table of their key names.
    pub checkpoint: Option<(Vec<PathBuf>, RenameTable)>,
    /// The checkpoint's keys the model may leave unread (the owner types' lists); any other unread
    /// tensor refuses the build ([`LoadError::UnusedTensors`]).
    pub allowed_unused: AllowedUnused,
    /// Which parameter names train; the rest are frozen plain tensors (which must be in the checkpoint).
    pub trainable: Box<dyn Fn(&str) -> bool + Send + Sync>,
    /// Initialisation of trainable parameters the checkpoint lacks.
    pub init: InitRule,
    /// Seed of the initialisation.
    pub seed: u64,
}

impl ParamSource {
    /// Every parameter trainable and freshly initialised.
    pub fn from_scratch(init: impl Fn(&str, &[usize]) -> Init + Send + Sync + 'static, seed: u64) -> Self {
        Self {
            checkpoint: None,
            allowed_unused: AllowedUnused::none(),
            trainable: Box::new(|_| true),
            init: Box::new(init),
            seed,
        }
    }
}

/// Builds a model with `build`, returning it and its trainable parameters. Frozen parameters never
/// become `Var`s. A missing frozen tensor or a mis-shaped one is a typed [`LoadError`].
///
/// With a half-precision `dtype` (mixed precision), every trainable parameter is read or drawn in
/// f32 into its master copy and the model gets its rounded `dtype` value; frozen parameters are
/// loaded in `dtype` directly.
pub fn build_for_training<M>(
    source: ParamSource,
    dtype: DType,
    device: &Device,
    build: impl FnOnce(VarBuilder) -> candle_core::Result<M>,
) -> Result<(M, TrainableParams), LoadError> {
    let checkpoint = match &source.checkpoint {
        Some((paths, renames)) => Some(CheckedSafetensors::open(paths, renames.clone())?),
        None => None,
    };
    let backend = Arc::new(TrainingBackend {
        checkpoint,
        source,
        vars: Mutex::new(BTreeMap::new()),
        masters: Mutex::new(BTreeMap::new()),
        error: Mutex::new(None),
    });
    let vb = VarBuilder::from_backend(Box::new(Shared(backend.clone())), dtype, device.clone());
    match build(vb) {
        Ok(model) => {
            if let Some(c) = &backend.checkpoint {
                c.check_all_used(&backend.source.allowed_unused)?;
            }
            let vars = std::mem::take(&mut *backend.vars.lock().expect("not poisoned"));
            let masters = std::mem::take(&mut *backend.masters.lock().expect("not poisoned"));
            Ok((model, TrainableParams { vars, masters }))
        }
        Err(e) => Err(backend
            .checkpoint
            .as_ref()
            .and_then(|c| c.take_error())
            .or_else(|| backend.error.lock().expect("not poisoned").take())
            .unwrap_or(LoadError::Candle(e))),
    }
}

/// Draws a tensor of `init` with a stream derived from `(seed, name)`.
pub fn init_tensor(
    init: Init,
    shape: &Shape,
    seed: u64,
    name: &str,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let n = shape.elem_count();
    let values: Vec<f32> = match init {
        Init::Zeros => vec![0.0; n],
        Init::Ones => vec![1.0; n],
        Init::Constant(c) => vec![c as f32; n],
        Init::Normal { std } => {
            let mut rng = Rng::derive(seed, fnv1a(name), 0);
            (0..n).map(|_| (std * standard_normal(&mut rng)) as f32).collect()
        }
    };
    Tensor::from_vec(values, shape.clone(), device)?.to_dtype(dtype)
}

/// Box–Muller: one standard normal draw.
pub fn standard_normal(rng: &mut Rng) -> f64 {
    let u1 = 1.0 - rng.f64(); // (0, 1]
    let u2 = rng.f64();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

struct TrainingBackend {
    checkpoint: Option<CheckedSafetensors>,
    source: ParamSource,
    vars: Mutex<BTreeMap<String, Var>>,
    masters: Mutex<BTreeMap<String, Var>>,
    error: Mutex<Option<LoadError>>,
}

impl TrainingBackend {
    fn get(&self, shape: Shape, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let from_checkpoint = self.checkpoint.as_ref().filter(|c| c.contains_tensor(name));
        if !(self.source.trainable)(name) {
            return match from_checkpoint {
                Some(c) => c.get(shape, name, candle_nn::Init::Const(0.), dtype, dev),
                None => {
                    let file =
                        self.source.checkpoint.as_ref().and_then(|(p, _)| p.first().cloned()).unwrap_or_default();
                    let err = LoadError::MissingTensor { file, key: name.to_owned(), expected: shape.dims().to_vec() };
                    let msg = format!("frozen parameter: {err}");
                    self.error.lock().expect("not poisoned").get_or_insert(err);
                    Err(candle_core::Error::Msg(msg))
                }
            };
        }
        let mut vars = self.vars.lock().expect("not poisoned");
        if let Some(var) = vars.get(name) {
            return Ok(var.as_tensor().clone());
        }
        // Read or drawn at full precision: the master copy must not start from a rounded value.
        let full = master_dtype(dtype);
        let value = match from_checkpoint {
            Some(c) => c.get(shape.clone(), name, candle_nn::Init::Const(0.), full, dev)?,
            None => init_tensor((self.source.init)(name, shape.dims()), &shape, self.source.seed, name, full, dev)?,
        };
        if full != dtype {
            self.masters.lock().expect("not poisoned").insert(name.to_owned(), Var::from_tensor(&value)?);
        }
        let var = Var::from_tensor(&value.to_dtype(dtype)?)?;
        let tensor = var.as_tensor().clone();
        vars.insert(name.to_owned(), var);
        Ok(tensor)
    }
}

struct Shared(Arc<TrainingBackend>);

impl SimpleBackend for Shared {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.get(s, name, dtype, dev)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match &self.0.checkpoint {
            Some(c) => c.get_unchecked(name, dtype, dev),
            None => candle_core::bail!("`{name}` has no shape to initialise from"),
        }
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.0.checkpoint.as_ref().is_some_and(|c| c.contains_tensor(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_is_per_name_and_seeded() {
        let s = Shape::from((3, 4));
        let a = init_tensor(Init::Normal { std: 0.02 }, &s, 7, "x.weight", DType::F32, &Device::Cpu).unwrap();
        let b = init_tensor(Init::Normal { std: 0.02 }, &s, 7, "x.weight", DType::F32, &Device::Cpu).unwrap();
        let c = init_tensor(Init::Normal { std: 0.02 }, &s, 7, "y.weight", DType::F32, &Device::Cpu).unwrap();
        assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
        assert_ne!(a.to_vec2::<f32>().unwrap(), c.to_vec2::<f32>().unwrap());
        let rule = transformer_init(0.02);
        assert_eq!(rule("a.LayerNorm.weight", &[4]), Init::Ones);
        assert_eq!(rule("vision_model.post_layernorm.weight", &[4]), Init::Ones);
        assert_eq!(rule("layers.0.layer_norm1.weight", &[4]), Init::Ones);
        assert_eq!(rule("layers.0.mlp.fc1.bias", &[4]), Init::Zeros);
        assert_eq!(rule("embeddings.class_embedding", &[1, 1, 4]), Init::Normal { std: 0.02 });
    }

    #[test]
    fn normal_draws_have_the_right_moments() {
        let mut rng = Rng::new(3);
        let xs: Vec<f64> = (0..200_000).map(|_| standard_normal(&mut rng)).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(mean.abs() < 0.01 && (var - 1.0).abs() < 0.01, "mean {mean} var {var}");
    }
}

//! Adam and AdamW with parameter groups (per-group learning rate and weight decay) and state that
//! saves and restores exactly; gradient clipping by global norm; gradient accumulation.
//!
//! The update is PyTorch's (`torch.optim.Adam`/`AdamW`, non-amsgrad, non-fused):
//! ```text
//! AdamW: θ ← θ·(1 − lr·wd)            Adam: g ← g + wd·θ
//! m ← β1·m + (1−β1)·g;   v ← β2·v + (1−β2)·g²
//! θ ← θ − lr/(1−β1ᵗ) · m / (√v/√(1−β2ᵗ) + ε)
//! ```
//! with `t` counted per parameter (a parameter without a gradient in a step is not updated and
//! its `t` does not advance, as in PyTorch).
//!
//! Mixed precision: a parameter with an f32 master copy (see [`crate::precision`]) is updated on
//! the master, with f32 moments, and then set to the master's rounded value.
//!
//! The update runs in place, two passes per parameter ([`ctxalign_nn::adam`]: the moments, then
//! the parameter) and a third that rounds a half-precision parameter from its master.

use std::collections::{BTreeMap, HashMap};

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, TensorId, Var};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::params::TrainableParams;
use crate::precision::master_dtype;
use ctxalign_nn::adam::{adam_update, round_from_master, AdamCoefficients};

/// A set of parameters sharing a learning rate and a weight decay.
#[derive(Debug, Clone)]
pub struct ParamGroup {
    pub name: String,
    /// Base learning rate; the schedule's factor multiplies it.
    pub lr: f64,
    pub weight_decay: f64,
    /// The parameters the model computes with.
    pub params: Vec<(String, Var)>,
    /// f32 master copies of those of `params` that are half precision (mixed precision).
    pub masters: BTreeMap<String, Var>,
}

/// How to split trainable parameters into groups: the first spec whose `matches` accepts a name
/// takes it.
pub struct GroupSpec {
    pub name: String,
    pub lr: f64,
    pub weight_decay: f64,
    pub matches: Box<dyn Fn(&str) -> bool>,
}

impl GroupSpec {
    pub fn new(name: &str, lr: f64, weight_decay: f64, matches: impl Fn(&str) -> bool + 'static) -> Self {
        Self { name: name.into(), lr, weight_decay, matches: Box::new(matches) }
    }
    /// A group taking every parameter not taken by an earlier one.
    pub fn rest(name: &str, lr: f64, weight_decay: f64) -> Self {
        Self::new(name, lr, weight_decay, |_| true)
    }
}

/// Checks every group's learning rate and weight decay (finite and ≥ 0); [`group_params`] does
/// too, and recipes call it before any work starts.
pub fn check_group_specs(specs: &[GroupSpec]) -> Result<()> {
    for s in specs {
        // A NaN or negative rate would train "successfully" into garbage, or fail steps later as a
        // NaN loss with no checkpoint to fall back on.
        if !(s.lr.is_finite() && s.lr >= 0.0) {
            return Err(TrainError::Config(format!(
                "group `{}`: learning rate {} must be finite and ≥ 0",
                s.name, s.lr
            )));
        }
        if !(s.weight_decay.is_finite() && s.weight_decay >= 0.0) {
            return Err(TrainError::Config(format!(
                "group `{}`: weight decay {} must be finite and ≥ 0",
                s.name, s.weight_decay
            )));
        }
    }
    Ok(())
}

/// Splits `params` by `specs`; a parameter no spec accepts is an error (never silently frozen).
pub fn group_params(params: &TrainableParams, specs: &[GroupSpec]) -> Result<Vec<ParamGroup>> {
    check_group_specs(specs)?;
    let mut groups: Vec<ParamGroup> = specs
        .iter()
        .map(|s| ParamGroup {
            name: s.name.clone(),
            lr: s.lr,
            weight_decay: s.weight_decay,
            params: vec![],
            masters: BTreeMap::new(),
        })
        .collect();
    for (name, var) in &params.vars {
        let Some(g) = specs.iter().position(|s| (s.matches)(name)) else {
            return Err(TrainError::Config(format!("parameter `{name}` belongs to no parameter group")));
        };
        groups[g].params.push((name.clone(), var.clone()));
        if let Some(master) = params.master(name) {
            groups[g].masters.insert(name.clone(), master.clone());
        }
    }
    Ok(groups)
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// true: AdamW (decay applied to the weights); false: Adam (L2 added to the gradient).
    pub decoupled_weight_decay: bool,
}

impl AdamConfig {
    /// PyTorch's AdamW defaults (β = 0.9, 0.999; ε = 1e-8).
    pub fn adamw() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, decoupled_weight_decay: true }
    }
    pub fn adam() -> Self {
        Self { decoupled_weight_decay: false, ..Self::adamw() }
    }
}

#[derive(Debug, Clone)]
struct Moments {
    step: u64,
    /// `[2, n]`: the first moment (`exp_avg`), then the second (`exp_avg_sq`), flattened, in the
    /// updated parameter's dtype; updated in place.
    state: Tensor,
}

impl Moments {
    /// The two moments at the parameter's shape, as copies (the state changes in place).
    fn tensors(&self, shape: &candle_core::Shape) -> Result<(Tensor, Tensor)> {
        Ok((self.state.get(0)?.reshape(shape)?.copy()?, self.state.get(1)?.reshape(shape)?.copy()?))
    }
}

/// Adam / AdamW over parameter groups.
#[derive(Debug)]
pub struct Adam {
    pub config: AdamConfig,
    pub groups: Vec<ParamGroup>,
    /// Keyed by parameter name; created at a parameter's first update.
    state: BTreeMap<String, Moments>,
    /// The learning rate of each group at the last step (base × factor).
    last_lrs: Vec<f64>,
}

/// Serialised form of the optimizer's non-tensor state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AdamMeta {
    pub config: AdamConfig,
    /// group name → (lr, weight_decay, parameter names)
    pub groups: Vec<(String, f64, f64, Vec<String>)>,
    /// parameter name → its step count
    pub steps: BTreeMap<String, u64>,
}

impl Adam {
    pub fn new(config: AdamConfig, groups: Vec<ParamGroup>) -> Result<Self> {
        let mut seen = std::collections::HashSet::new();
        for g in &groups {
            for (name, var) in &g.params {
                if !seen.insert(name.clone()) {
                    return Err(TrainError::Config(format!("parameter `{name}` is in two groups")));
                }
                // The update runs on f32 or f64; a half-precision parameter is updated on its master.
                let updated = g.masters.get(name).unwrap_or(var);
                if !matches!(updated.dtype(), DType::F32 | DType::F64) {
                    return Err(TrainError::Config(format!(
                        "parameter `{name}` is {:?} without an f32 master copy; build the groups with \
                         `group_params` from `TrainableParams`, which gives half-precision parameters one",
                        var.dtype()
                    )));
                }
            }
        }
        let last_lrs = groups.iter().map(|g| g.lr).collect();
        Ok(Self { config, groups, state: BTreeMap::new(), last_lrs })
    }

    /// Learning rates used at the last step, per group.
    pub fn learning_rates(&self) -> &[f64] {
        &self.last_lrs
    }

    /// Every parameter under optimisation.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.groups.iter().flat_map(|g| g.params.iter().map(|(n, v)| (n.as_str(), v)))
    }

    /// One update with every group's learning rate scaled by `lr_factor`.
    pub fn step(&mut self, grads: &GradStore, lr_factor: f64) -> Result<()> {
        let AdamConfig { beta1, beta2, eps, decoupled_weight_decay } = self.config;
        for (gi, group) in self.groups.iter().enumerate() {
            let lr = group.lr * lr_factor;
            self.last_lrs[gi] = lr;
            for (name, var) in &group.params {
                let Some(grad) = grads.get(var.as_tensor()) else { continue };
                let master = group.masters.get(name);
                // f32 or f64: `Adam::new` refuses a half-precision parameter without a master.
                let theta = master.unwrap_or(var).as_tensor();
                let moments = match self.state.get_mut(name) {
                    Some(m) => m,
                    None => self.state.entry(name.clone()).or_insert(Moments {
                        step: 0,
                        state: Tensor::zeros((2, theta.elem_count()), theta.dtype(), theta.device())?,
                    }),
                };
                moments.step += 1;
                let t = moments.step as i32;
                let decoupled = decoupled_weight_decay && group.weight_decay != 0.0;
                let coefficients = AdamCoefficients {
                    beta1,
                    beta2,
                    eps,
                    l2: if decoupled_weight_decay { 0.0 } else { group.weight_decay },
                    decay: if decoupled { 1.0 - lr * group.weight_decay } else { 1.0 },
                    inv_bias2: 1.0 / (1.0 - beta2.powi(t)).sqrt(),
                    step_size: lr / (1.0 - beta1.powi(t)),
                };
                adam_update(theta, &moments.state, grad, &coefficients)?;
                if master.is_some() {
                    round_from_master(var.as_tensor(), theta)?;
                }
            }
        }
        Ok(())
    }

    /// Moment tensors keyed `<param>.exp_avg` / `<param>.exp_avg_sq` (copies: a snapshot that later
    /// steps leave alone), and the rest as [`AdamMeta`].
    pub fn state_dict(&self) -> Result<(BTreeMap<String, Tensor>, AdamMeta)> {
        let mut tensors = BTreeMap::new();
        let vars: HashMap<&str, &Var> = self.vars().collect();
        for (name, m) in &self.state {
            // State exists only for the groups' parameters (`step` and `load_state_dict` see to it).
            let (exp_avg, exp_avg_sq) = m.tensors(vars[name.as_str()].shape())?;
            tensors.insert(format!("{name}.exp_avg"), exp_avg);
            tensors.insert(format!("{name}.exp_avg_sq"), exp_avg_sq);
        }
        Ok((tensors, self.meta()))
    }

    /// The optimizer's non-tensor state: settings, groups and step counts.
    pub fn meta(&self) -> AdamMeta {
        let steps = self.state.iter().map(|(name, m)| (name.clone(), m.step)).collect();
        let groups = self
            .groups
            .iter()
            .map(|g| (g.name.clone(), g.lr, g.weight_decay, g.params.iter().map(|(n, _)| n.clone()).collect()))
            .collect();
        AdamMeta { config: self.config, groups, steps }
    }

    /// Restores a state saved by [`Adam::state_dict`] from the same parameter groups; `file` names
    /// the checkpoint in errors.
    pub fn load_state_dict(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        meta: &AdamMeta,
        file: &std::path::Path,
    ) -> Result<()> {
        let mine = self.meta();
        if meta.config != self.config {
            return Err(TrainError::checkpoint(
                file,
                format!("optimizer settings {:?} differ from this run's {:?}", meta.config, self.config),
            ));
        }
        let names = |g: &[(String, f64, f64, Vec<String>)]| {
            g.iter().map(|(n, _, _, p)| (n.clone(), p.clone())).collect::<Vec<_>>()
        };
        if names(&meta.groups) != names(&mine.groups) {
            return Err(TrainError::checkpoint(file, "parameter groups differ from this run's (names or members)"));
        }
        let shapes: HashMap<&str, &Var> = self.vars().collect();
        let mut state = BTreeMap::new();
        for (name, &step) in &meta.steps {
            let var = shapes.get(name.as_str()).ok_or_else(|| {
                TrainError::checkpoint(file, format!("optimizer state for unknown parameter `{name}`"))
            })?;
            let fetch = |suffix: &str| -> Result<Tensor> {
                let key = format!("{name}.{suffix}");
                let t = tensors
                    .get(&key)
                    .ok_or_else(|| TrainError::checkpoint(file, format!("tensor `{key}` is missing")))?;
                if t.dims() != var.dims() {
                    return Err(TrainError::checkpoint(
                        file,
                        format!("tensor `{key}` has shape {:?}, the parameter has {:?}", t.dims(), var.dims()),
                    ));
                }
                // Moments live at the master's precision (f32 for a half-precision parameter).
                Ok(t.to_dtype(master_dtype(var.dtype()))?.to_device(var.device())?)
            };
            let moments = Tensor::stack(&[fetch("exp_avg")?.flatten_all()?, fetch("exp_avg_sq")?.flatten_all()?], 0)?;
            state.insert(name.clone(), Moments { step, state: moments });
        }
        self.state = state;
        Ok(())
    }
}

/// Global L2 norm of the gradients of `vars` (those that have one).
pub fn grad_norm<'a>(grads: &GradStore, vars: impl IntoIterator<Item = &'a Var>) -> Result<f64> {
    let mut total = 0f64;
    for var in vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            total += g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
        }
    }
    Ok(total.sqrt())
}

/// `torch.nn.utils.clip_grad_norm_`: scales every gradient by `min(1, max_norm / (norm + 1e-6))`.
/// Returns the norm before clipping.
pub fn clip_grad_norm<'a>(
    grads: &mut GradStore,
    vars: impl IntoIterator<Item = &'a Var> + Clone,
    max_norm: f64,
) -> Result<f64> {
    let norm = grad_norm(grads, vars.clone())?;
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for var in vars {
            if let Some(g) = grads.remove(var.as_tensor()) {
                grads.insert(var.as_tensor(), (g * coef)?);
            }
        }
    }
    Ok(norm)
}

/// Sums the gradients of several micro-batches; [`GradAccumulator::finish`] returns their mean (the
/// gradient of the mean loss, as `loss / accum_steps` per micro-batch in PyTorch). Half-precision
/// gradients are summed, and returned, in f32.
#[derive(Default)]
pub struct GradAccumulator {
    sums: HashMap<TensorId, (Var, Tensor)>,
    count: usize,
}

impl GradAccumulator {
    pub fn add<'a>(&mut self, grads: &GradStore, vars: impl IntoIterator<Item = &'a Var>) -> Result<()> {
        for var in vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                let g = g.detach().to_dtype(master_dtype(g.dtype()))?;
                match self.sums.get_mut(&var.id()) {
                    Some((_, sum)) => *sum = (&*sum + g)?,
                    None => {
                        self.sums.insert(var.id(), (var.clone(), g));
                    }
                }
            }
        }
        self.count += 1;
        Ok(())
    }
    pub fn count(&self) -> usize {
        self.count
    }
    pub fn finish(&mut self) -> Result<GradStore> {
        let mut store = GradStore::default();
        let n = self.count.max(1) as f64;
        for (_, (var, sum)) in self.sums.drain() {
            store.insert(var.as_tensor(), (sum / n)?);
        }
        self.count = 0;
        Ok(store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Adam and AdamW against the update rule written out in f64 scalars, three steps, two groups.
    #[test]
    fn matches_the_update_rule_per_group() {
        for decoupled in [true, false] {
            let dev = Device::Cpu;
            let a = Var::new(&[1.0f64, -2.0], &dev).unwrap();
            let b = Var::new(&[0.5f64], &dev).unwrap();
            let cfg = AdamConfig { decoupled_weight_decay: decoupled, ..AdamConfig::adamw() };
            let groups = vec![
                ParamGroup {
                    name: "a".into(),
                    lr: 0.1,
                    weight_decay: 0.01,
                    params: vec![("a".into(), a.clone())],
                    masters: BTreeMap::new(),
                },
                ParamGroup {
                    name: "b".into(),
                    lr: 0.01,
                    weight_decay: 0.0,
                    params: vec![("b".into(), b.clone())],
                    masters: BTreeMap::new(),
                },
            ];
            let mut opt = Adam::new(cfg, groups).unwrap();
            // Reference state.
            let mut th = [1.0f64, -2.0, 0.5];
            let (lr, wd) = ([0.1, 0.1, 0.01], [0.01, 0.01, 0.0]);
            let (mut m, mut v) = ([0.0f64; 3], [0.0f64; 3]);
            for t in 1..=3 {
                let factor = 1.0 / t as f64; // a schedule
                                             // loss = Σ θ³ → g = 3θ²
                let loss = (a.as_tensor().powf(3.0).unwrap().sum_all().unwrap()
                    + b.as_tensor().powf(3.0).unwrap().sum_all().unwrap())
                .unwrap();
                let grads = loss.backward().unwrap();
                opt.step(&grads, factor).unwrap();
                for i in 0..3 {
                    let mut g = 3.0 * th[i] * th[i];
                    let lr_t = lr[i] * factor;
                    if decoupled {
                        th[i] *= 1.0 - lr_t * wd[i];
                    } else {
                        g += wd[i] * th[i];
                    }
                    m[i] = 0.9 * m[i] + 0.1 * g;
                    v[i] = 0.999 * v[i] + 0.001 * g * g;
                    let (b1, b2) = (1.0 - 0.9f64.powi(t), 1.0 - 0.999f64.powi(t));
                    th[i] -= lr_t / b1 * m[i] / (v[i].sqrt() / b2.sqrt() + 1e-8);
                }
            }
            let ours: Vec<f64> = [a.to_vec1::<f64>().unwrap(), b.to_vec1::<f64>().unwrap()].concat();
            for i in 0..3 {
                assert!((ours[i] - th[i]).abs() < 1e-12, "decoupled={decoupled} θ{i}: {} vs {}", ours[i], th[i]);
            }
            assert_eq!(opt.learning_rates(), &[0.1 * (1.0 / 3.0), 0.01 * (1.0 / 3.0)]);
        }
    }

    /// A half-precision parameter is updated on its f32 master; without one the optimizer is refused
    /// before any step.
    #[test]
    fn half_precision_without_a_master_is_refused() {
        let dev = Device::Cpu;
        let p = Var::from_tensor(&Tensor::zeros(3, DType::BF16, &dev).unwrap()).unwrap();
        let group = |masters: BTreeMap<String, Var>| ParamGroup {
            name: "g".into(),
            lr: 0.1,
            weight_decay: 0.0,
            params: vec![("p".into(), p.clone())],
            masters,
        };
        let err = Adam::new(AdamConfig::adamw(), vec![group(BTreeMap::new())]).unwrap_err().to_string();
        assert!(err.contains("`p` is BF16 without an f32 master"), "{err}");
        let master = Var::from_tensor(&Tensor::zeros(3, DType::F32, &dev).unwrap()).unwrap();
        assert!(Adam::new(AdamConfig::adamw(), vec![group(BTreeMap::from([("p".into(), master)]))]).is_ok());
    }

    #[test]
    fn clipping_and_accumulation() {
        let dev = Device::Cpu;
        let x = Var::new(&[3.0f64, 4.0], &dev).unwrap();
        let mut grads = (x.as_tensor() * 1.0).unwrap().sum_all().unwrap().backward().unwrap();
        // gradient (1, 1): norm √2, clipped to 1.
        let norm = clip_grad_norm(&mut grads, [&x], 1.0).unwrap();
        assert!((norm - 2f64.sqrt()).abs() < 1e-12);
        let g = grads.get(&x).unwrap().to_vec1::<f64>().unwrap();
        assert!((g[0] - 1.0 / (2f64.sqrt() + 1e-6)).abs() < 1e-12);

        let mut acc = GradAccumulator::default();
        for k in [1.0, 3.0] {
            let grads = (x.as_tensor() * k).unwrap().sum_all().unwrap().backward().unwrap();
            acc.add(&grads, [&x]).unwrap();
        }
        let mean = acc.finish().unwrap();
        assert_eq!(mean.get(&x).unwrap().to_vec1::<f64>().unwrap(), vec![2.0, 2.0]);
    }

    #[test]
    fn groups_cover_every_parameter() {
        let dev = Device::Cpu;
        let mut params = TrainableParams::default();
        params.insert("enc.weight", Var::new(&[1f32], &dev).unwrap()).unwrap();
        params.insert("head.weight", Var::new(&[1f32], &dev).unwrap()).unwrap();
        let groups = group_params(&params, &[GroupSpec::new("head", 1e-3, 0.0, |n| n.starts_with("head"))]);
        assert!(matches!(groups, Err(TrainError::Config(m)) if m.contains("enc.weight")));
        let groups = group_params(
            &params,
            &[GroupSpec::new("head", 1e-3, 0.0, |n| n.starts_with("head")), GroupSpec::rest("backbone", 1e-5, 0.05)],
        )
        .unwrap();
        assert_eq!(groups[0].params[0].0, "head.weight");
        assert_eq!(groups[1].params[0].0, "enc.weight");
    }
}

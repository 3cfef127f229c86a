//! ContextBLIP's multi-scale adapter (docs/reference-notes.md §2; fixture
//! `contextblip_adapter_tiny`).
//!
//! Each tapped ViT layer output goes through the ViT's *final* LayerNorm and its own down-projection
//! ("DPAL": Linear(d, d/δ, no bias) → ReLU). The tap outputs are concatenated on channels (or summed)
//! and projected back ("UPAL": Linear(k·d/δ, d, no bias) → ReLU); the result is added to the ViT's
//! final output. Every token is adapted, CLS included.
//!
//! Saved key layout (safetensors): `down.{i}.weight` `[d/δ, d]` for the i-th tap in `taps` order,
//! `up.weight` `[d, k·d/δ]` (concat) or `[d, d/δ]` (add); weights are `[out, in]` as in PyTorch.

use crate::linear::{linear_no_bias, Linear};
use candle_core::{bail, Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::ops::LayerNorm;

/// How the tap outputs are combined before the up-projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdapterAggregation {
    /// Concatenate on channels: UPAL input width is `taps.len() · d/δ` (the paper's choice).
    Concat,
    /// Sum the taps: UPAL input width is `d/δ`.
    Add,
}

/// Settings of a [`MultiScaleAdapter`], stored as `adapter.json` beside its weights.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// Width `d` of the ViT the adapter is attached to.
    pub hidden_size: usize,
    /// Tapped encoder layers, 1-based (layer k's output); the paper's default is `[3, 6, 9, 12]`.
    pub taps: Vec<usize>,
    /// Reduction δ of the down-projections (`d/δ` channels each); default 2.
    pub reduction: usize,
    /// Concatenate or add the taps; default concat.
    pub aggregation: AdapterAggregation,
}

impl AdapterConfig {
    /// The paper's adapter for a ViT of width `hidden_size` with `num_layers` layers: four taps
    /// evenly spaced ending at the last layer (`[3, 6, 9, 12]` for 12 layers), δ = 2, concat.
    pub fn paper_default(hidden_size: usize, num_layers: usize) -> Self {
        let mut taps: Vec<usize> = (1..=4).map(|i| (i * num_layers / 4).max(1)).collect();
        // Fewer than four layers: each layer once (taps are strictly increasing).
        taps.dedup();
        Self { hidden_size, taps, reduction: 2, aggregation: AdapterAggregation::Concat }
    }

    /// Width of each down-projection's output.
    pub fn reduced_size(&self) -> usize {
        self.hidden_size / self.reduction
    }

    /// Checks the settings on their own (the layer range needs the ViT: the callers that know it
    /// check it too).
    pub fn validate(&self) -> Result<()> {
        if self.taps.is_empty() {
            bail!("adapter: `taps` is empty")
        }
        if self.taps.contains(&0) {
            bail!("adapter: taps are 1-based encoder layers, got 0 in {:?}", self.taps)
        }
        // A repeated tap would get two down-projections of the same layer, and a reordered list
        // would pair the saved `down.{i}` weights with other layers: one order, each layer once.
        if let Some(w) = self.taps.windows(2).find(|w| w[1] <= w[0]) {
            bail!("adapter: taps must be strictly increasing layers, got {} after {} in {:?}", w[1], w[0], self.taps)
        }
        if self.reduction == 0 || !self.hidden_size.is_multiple_of(self.reduction) {
            bail!("adapter: reduction {} must divide hidden_size {}", self.reduction, self.hidden_size)
        }
        Ok(())
    }
}

/// The multi-scale adapter: per-tap down-projections and one up-projection.
#[derive(Debug, Clone)]
pub struct MultiScaleAdapter {
    pub config: AdapterConfig,
    /// One DPAL per tap, in `config.taps` order.
    pub down: Vec<Linear>,
    /// The UPAL.
    pub up: Linear,
}

impl MultiScaleAdapter {
    pub fn new(cfg: &AdapterConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let reduced = cfg.reduced_size();
        let down = (0..cfg.taps.len())
            .map(|i| linear_no_bias(cfg.hidden_size, reduced, vb.pp("down").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let up_in = match cfg.aggregation {
            AdapterAggregation::Concat => reduced * cfg.taps.len(),
            AdapterAggregation::Add => reduced,
        };
        let up = linear_no_bias(up_in, cfg.hidden_size, vb.pp("up"))?;
        Ok(Self { config: cfg.clone(), down, up })
    }

    /// Adapts the ViT output.
    ///
    /// `hidden_states[k]` is the output of encoder layer k (index 0: the embeddings), each
    /// `[batch, tokens, d]`, before the final LayerNorm; `final_norm` is the ViT's final LayerNorm and
    /// `last_hidden_state` its output (after that norm). Returns `[batch, tokens, d]`.
    pub fn forward(
        &self,
        hidden_states: &[Tensor],
        final_norm: &LayerNorm,
        last_hidden_state: &Tensor,
    ) -> Result<Tensor> {
        let mut reduced = Vec::with_capacity(self.down.len());
        for (&tap, down) in self.config.taps.iter().zip(&self.down) {
            let Some(h) = hidden_states.get(tap) else {
                bail!(
                    "adapter taps layer {tap}, but the vision encoder returned {} layers",
                    hidden_states.len().saturating_sub(1)
                )
            };
            reduced.push(down.forward(&final_norm.forward(h)?)?.relu()?);
        }
        let combined = match self.config.aggregation {
            AdapterAggregation::Concat => Tensor::cat(&reduced, D::Minus1)?,
            AdapterAggregation::Add => {
                let mut sum = reduced[0].clone();
                for r in &reduced[1..] {
                    sum = (sum + r)?;
                }
                sum
            }
        };
        last_hidden_state + self.up.forward(&combined)?.relu()?
    }

    /// Number of trainable scalars.
    pub fn num_parameters(&self) -> usize {
        self.down.iter().map(|l| l.weight().elem_count()).sum::<usize>() + self.up.weight().elem_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn setup(agg: AdapterAggregation) -> Result<(VarMap, MultiScaleAdapter, LayerNorm, Vec<Tensor>)> {
        let dev = Device::Cpu;
        let cfg = AdapterConfig { hidden_size: 8, taps: vec![1, 3], reduction: 2, aggregation: agg };
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F64, &dev);
        let adapter = MultiScaleAdapter::new(&cfg, vb)?;
        let norm = LayerNorm {
            weight: Tensor::randn(1f64, 0.2, 8, &dev)?,
            bias: Tensor::randn(0f64, 0.2, 8, &dev)?,
            eps: 1e-6,
        };
        let hs = (0..4).map(|_| Tensor::randn(0f64, 1.0, (2, 3, 8), &dev)).collect::<Result<Vec<_>>>()?;
        Ok((vm, adapter, norm, hs))
    }

    #[test]
    fn paper_default_taps_for_twelve_layers() {
        let cfg = AdapterConfig::paper_default(768, 12);
        assert_eq!(cfg.taps, vec![3, 6, 9, 12]);
        assert_eq!(cfg.reduced_size(), 384);
    }

    /// Independent computation with plain loops over the formula in the module docs.
    #[test]
    fn matches_formula() -> Result<()> {
        for agg in [AdapterAggregation::Concat, AdapterAggregation::Add] {
            let (_vm, adapter, norm, hs) = setup(agg)?;
            let last = norm.forward(&hs[3])?;
            let out = adapter.forward(&hs, &norm, &last)?.to_vec3::<f64>()?;
            let lastv = last.to_vec3::<f64>()?;
            let w = |l: &Linear| l.weight().to_vec2::<f64>().unwrap();
            let (gamma, beta) = (norm.weight.to_vec1::<f64>()?, norm.bias.to_vec1::<f64>()?);
            for b in 0..2 {
                for t in 0..3 {
                    let mut parts: Vec<Vec<f64>> = vec![];
                    for (tap, down) in [1usize, 3].iter().zip(&adapter.down) {
                        let x = &hs[*tap].to_vec3::<f64>()?[b][t];
                        let mean = x.iter().sum::<f64>() / 8.0;
                        let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 8.0;
                        let n: Vec<f64> =
                            (0..8).map(|i| (x[i] - mean) / (var + 1e-6).sqrt() * gamma[i] + beta[i]).collect();
                        let wd = w(down);
                        parts.push(
                            wd.iter().map(|row| row.iter().zip(&n).map(|(a, b)| a * b).sum::<f64>().max(0.0)).collect(),
                        );
                    }
                    let combined: Vec<f64> = match agg {
                        AdapterAggregation::Concat => parts.concat(),
                        AdapterAggregation::Add => (0..4).map(|i| parts[0][i] + parts[1][i]).collect(),
                    };
                    let wu = w(&adapter.up);
                    for o in 0..8 {
                        let up: f64 = wu[o].iter().zip(&combined).map(|(a, b)| a * b).sum::<f64>().max(0.0);
                        let want = lastv[b][t][o] + up;
                        assert!((want - out[b][t][o]).abs() < 1e-10, "{agg:?} b{b} t{t} o{o}");
                    }
                }
            }
        }
        Ok(())
    }

    /// Central finite differences on every adapter weight against Candle's backward.
    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        let (vm, adapter, norm, hs) = setup(AdapterAggregation::Concat)?;
        let last = norm.forward(&hs[3])?;
        let probe = Tensor::randn(0f64, 1.0, (2, 3, 8), &Device::Cpu)?;
        let loss_of =
            |a: &MultiScaleAdapter| -> Result<Tensor> { (a.forward(&hs, &norm, &last)?.sqr()? * &probe)?.sum_all() };
        crate::gradcheck::check_gradients(&crate::gradcheck::varmap_vars(&vm), &|| loss_of(&adapter), 1e-6, 1e-5, 7)
    }

    #[test]
    fn rejects_bad_settings() {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let bad =
            AdapterConfig { hidden_size: 10, taps: vec![1], reduction: 3, aggregation: AdapterAggregation::Concat };
        assert!(MultiScaleAdapter::new(&bad, vb.clone()).is_err());
        let bad =
            AdapterConfig { hidden_size: 8, taps: vec![0], reduction: 2, aggregation: AdapterAggregation::Concat };
        assert!(MultiScaleAdapter::new(&bad, vb).is_err());
    }
}

//! Fine-tuning heads for image retrieval from contextual descriptions (IMAGECODE).
//!
//! - S1: [`CandidateHead`], `Linear(d, 1)` on the L2-normalised `[ENC]` feature of each
//!   (description, candidate) pair; cross-entropy over a set's 10 logits.
//! - S2: [`InterContextEncoder`], two post-LN BERT layers over the 10 candidate features of one
//!   description, with a learned temporal embedding added for video sets only and a residual back
//!   to the features; the frozen S1 head scores its output.
//!
//! Key layout: `head.weight [1, d]`; `inter_context.{temporal_embeddings.weight
//! [candidates, d], layer.{i}.*}` (BERT names).

use candle_core::{bail, DType, Module, Result, Tensor, D};
use candle_nn::{embedding, Embedding, VarBuilder};
use ctxalign_nn::{linear_no_bias, Linear};
use serde::{Deserialize, Serialize};

use crate::blip::config::BertLayerConfig;
use crate::blip::text::BlipTextLayer;
use crate::HiddenAct;

/// S1's scorer: one logit per (description, candidate) from its normalised `[ENC]` feature.
///
/// The reference's `Linear(d, 1)` has a bias, but a bias shared by all candidates cancels in the
/// softmax over them: it receives exactly zero gradient and never changes a prediction. It is left
/// out (a reference checkpoint's `head.bias` loads as an unused key).
#[derive(Debug, Clone)]
pub struct CandidateHead {
    pub linear: Linear,
}

impl CandidateHead {
    /// `hidden_size`: the text width d.
    pub fn new(hidden_size: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { linear: linear_no_bias(hidden_size, 1, vb)? })
    }
}

impl Module for CandidateHead {
    /// `[…, d]` normalised features → `[…]` logits.
    fn forward(&self, features: &Tensor) -> Result<Tensor> {
        self.linear.forward(features)?.squeeze(D::Minus1)
    }
}

/// Sizes of the [`InterContextEncoder`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InterContextConfig {
    /// Width of the candidate features (the text width d).
    pub hidden_size: usize,
    /// Layers (reference: 2).
    pub num_layers: usize,
    /// Heads (reference: 8).
    pub num_attention_heads: usize,
    /// FFN width (reference: 4d).
    pub intermediate_size: usize,
    /// Candidates per set (IMAGECODE: 10): rows of the temporal embedding.
    pub num_candidates: usize,
    pub layer_norm_eps: f64,
}

impl InterContextConfig {
    /// The reference's encoder for features of width `hidden_size`: 2 layers, 8 heads (fewer when
    /// 8 does not divide the width), FFN 4d, 10 candidates.
    pub fn reference(hidden_size: usize) -> Self {
        let heads = (1..=8).rev().find(|h| hidden_size.is_multiple_of(*h)).unwrap_or(1);
        Self {
            hidden_size,
            num_layers: 2,
            num_attention_heads: heads,
            intermediate_size: 4 * hidden_size,
            num_candidates: 10,
            layer_norm_eps: 1e-12,
        }
    }

    fn layer_config(&self) -> BertLayerConfig {
        BertLayerConfig {
            hidden_size: self.hidden_size,
            num_attention_heads: self.num_attention_heads,
            intermediate_size: self.intermediate_size,
            layer_norm_eps: self.layer_norm_eps,
            hidden_act: HiddenAct::Gelu,
            cross_attention_width: None,
        }
    }
}

/// S2's encoder over a description's candidate features.
#[derive(Debug, Clone)]
pub struct InterContextEncoder {
    pub temporal_embeddings: Embedding,
    pub layers: Vec<BlipTextLayer>,
    pub config: InterContextConfig,
}

impl InterContextEncoder {
    pub fn new(cfg: &InterContextConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            bail!("inter-context width {} is not divisible by {} heads", cfg.hidden_size, cfg.num_attention_heads)
        }
        let layer_cfg = cfg.layer_config();
        Ok(Self {
            temporal_embeddings: embedding(cfg.num_candidates, cfg.hidden_size, vb.pp("temporal_embeddings"))?,
            layers: (0..cfg.num_layers)
                .map(|i| BlipTextLayer::new(&layer_cfg, vb.pp("layer").pp(i)))
                .collect::<Result<_>>()?,
            config: cfg.clone(),
        })
    }

    /// `features` `[B, N, d]` (N candidates, normalised `[ENC]` features); `video[b]` adds the
    /// temporal embedding to sample b. Returns `features + encoder(features [+ temporal])`.
    pub fn forward(&self, features: &Tensor, video: &[bool]) -> Result<Tensor> {
        let (b, n, _) = features.dims3()?;
        if n > self.config.num_candidates || video.len() != b {
            bail!(
                "inter-context encoder: {b} samples of {n} candidates (at most {}), {} video flags",
                self.config.num_candidates,
                video.len()
            )
        }
        let positions = Tensor::arange(0u32, n as u32, features.device())?;
        let temporal = self.temporal_embeddings.forward(&positions)?.unsqueeze(0)?; // [1, N, d]
        let flags: Vec<f32> = video.iter().map(|&v| if v { 1.0 } else { 0.0 }).collect();
        let flags = Tensor::from_vec(flags, (b, 1, 1), features.device())?.to_dtype(features.dtype())?;
        let mut hidden = features.broadcast_add(&temporal.broadcast_mul(&flags)?)?;
        for layer in &self.layers {
            hidden = layer.forward(&hidden, None, None, false)?.0;
        }
        features + hidden
    }
}

/// One description's `[ENC]` features against its N candidates (from
/// [`super::candidate_features`], in f32 on the host), what S2 trains and predicts on.
#[derive(Debug, Clone)]
pub struct CandidateFeatures {
    /// `[N, d]` flattened.
    pub features: Vec<f32>,
    pub candidates: usize,
    pub target: Option<usize>,
    pub video: bool,
}

impl CandidateFeatures {
    /// Stacks `[B, N, d]` from the feature rows of several descriptions (all with N candidates).
    pub fn stack(items: &[CandidateFeatures], device: &candle_core::Device) -> Result<Tensor> {
        let Some(first) = items.first() else { bail!("no candidate features to stack") };
        let (n, d) = (first.candidates, first.features.len() / first.candidates.max(1));
        let data: Vec<f32> = items.iter().flat_map(|i| i.features.iter().copied()).collect();
        Tensor::from_vec(data, (items.len(), n, d), device)
    }
}

/// Cross-entropy of `[B, N]` candidate logits against the target index of each row, in f32 at least.
pub fn candidate_cross_entropy(logits: &Tensor, targets: &[usize]) -> Result<Tensor> {
    let targets = Tensor::new(targets.iter().map(|&t| t as u32).collect::<Vec<_>>(), logits.device())?;
    let logits = match logits.dtype() {
        DType::F16 | DType::BF16 => logits.to_dtype(DType::F32)?,
        _ => logits.clone(),
    };
    candle_nn::loss::cross_entropy(&logits, &targets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;
    use ctxalign_nn::gradcheck::{check_gradients, varmap_vars};

    fn tiny() -> InterContextConfig {
        InterContextConfig {
            hidden_size: 8,
            num_layers: 2,
            num_attention_heads: 2,
            intermediate_size: 16,
            num_candidates: 4,
            layer_norm_eps: 1e-6,
        }
    }

    #[test]
    fn inter_context_and_head_gradients_match_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F64, &dev);
        let enc = InterContextEncoder::new(&tiny(), vb.pp("inter_context"))?;
        let head = CandidateHead::new(8, vb.pp("head"))?;
        let features = Tensor::randn(0f64, 1.0, (3, 4, 8), &dev)?;
        // One static sample: the temporal embedding still gets gradient from the two video ones.
        let video = [true, false, true];
        let loss = || candidate_cross_entropy(&head.forward(&enc.forward(&features, &video)?)?, &[0, 3, 2]);
        check_gradients(&varmap_vars(&vm), &loss, 1e-6, 1e-4, 3)
    }

    #[test]
    fn temporal_embedding_only_reaches_video_sets() -> Result<()> {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let enc = InterContextEncoder::new(&tiny(), VarBuilder::from_varmap(&vm, DType::F64, &dev))?;
        let features = Tensor::randn(0f64, 1.0, (1, 4, 8), &dev)?;
        let static_out = enc.forward(&features, &[false])?;
        let video_out = enc.forward(&features, &[true])?;
        // Zeroing the temporal table changes the video output only.
        let t = enc.temporal_embeddings.embeddings();
        let vars = varmap_vars(&vm);
        let table = &vars.iter().find(|(n, _)| n == "temporal_embeddings.weight").unwrap().1;
        table.set(&t.zeros_like()?)?;
        let diff = |a: &Tensor, b: &Tensor| -> Result<f64> { (a - b)?.abs()?.max_all()?.to_scalar::<f64>() };
        assert!(diff(&static_out, &enc.forward(&features, &[false])?)? < 1e-12);
        assert!(diff(&video_out, &enc.forward(&features, &[true])?)? > 1e-6);
        Ok(())
    }

    #[test]
    fn candidate_cross_entropy_matches_log_softmax_formula() -> Result<()> {
        let logits = Tensor::new(&[[0.5f64, -1.0, 2.0], [0.0, 0.3, -0.2]], &Device::Cpu)?;
        let ours = candidate_cross_entropy(&logits, &[2, 0])?.to_scalar::<f64>()?;
        let ce = |row: &[f64], t: usize| (row.iter().map(|x| x.exp()).sum::<f64>()).ln() - row[t];
        let want = (ce(&[0.5, -1.0, 2.0], 2) + ce(&[0.0, 0.3, -0.2], 0)) / 2.0;
        assert!((ours - want).abs() < 1e-12);
        Ok(())
    }
}

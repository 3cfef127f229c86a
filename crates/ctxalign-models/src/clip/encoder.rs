//! The transformer block both CLIP towers share (`encoder.layers.N`).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use ctxalign_nn::{linear, merge_heads, scaled_dot_product_attention, LayerNorm, Linear};

use crate::HiddenAct;

/// Sizes of one tower's blocks.
#[derive(Debug, Clone, Copy)]
pub struct EncoderDims {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub layer_norm_eps: f64,
    pub activation: HiddenAct,
}

impl EncoderDims {
    /// From a tower config's fields.
    pub fn new(hidden_size: usize, intermediate_size: usize, heads: usize, eps: f64, hidden_act: HiddenAct) -> Self {
        Self { hidden_size, intermediate_size, num_attention_heads: heads, layer_norm_eps: eps, activation: hidden_act }
    }
}

/// Multi-head self-attention with separate q/k/v projections (`self_attn`).
#[derive(Debug, Clone)]
pub struct ClipAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    pub num_heads: usize,
    pub head_dim: usize,
}

impl ClipAttention {
    pub fn new(dims: &EncoderDims, vb: VarBuilder) -> Result<Self> {
        let d = dims.hidden_size;
        Ok(Self {
            q_proj: linear(d, d, vb.pp("q_proj"))?,
            k_proj: linear(d, d, vb.pp("k_proj"))?,
            v_proj: linear(d, d, vb.pp("v_proj"))?,
            out_proj: linear(d, d, vb.pp("out_proj"))?,
            num_heads: dims.num_attention_heads,
            head_dim: d / dims.num_attention_heads,
        })
    }

    /// `xs` `[batch, tokens, d]`; `mask` additive, broadcastable to `[batch, heads, tokens, tokens]`.
    pub fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let q = self.q_proj.forward_heads(xs, self.num_heads)?;
        let k = self.k_proj.forward_heads(xs, self.num_heads)?;
        let v = self.v_proj.forward_heads(xs, self.num_heads)?;
        let out = scaled_dot_product_attention(&q, &k, &v, mask, (self.head_dim as f64).powf(-0.5), false)?;
        self.out_proj.forward(&merge_heads(&out.context)?)
    }
}

/// Pre-LN block: `x += attn(LN1(x)); x += fc2(act(fc1(LN2(x))))`.
#[derive(Debug, Clone)]
pub struct ClipEncoderLayer {
    pub layer_norm1: LayerNorm,
    pub self_attn: ClipAttention,
    pub layer_norm2: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
    pub activation: HiddenAct,
}

impl ClipEncoderLayer {
    pub fn new(dims: &EncoderDims, vb: VarBuilder) -> Result<Self> {
        let (d, eps) = (dims.hidden_size, dims.layer_norm_eps);
        let mlp = vb.pp("mlp");
        Ok(Self {
            layer_norm1: LayerNorm::new(d, eps, vb.pp("layer_norm1"))?,
            self_attn: ClipAttention::new(dims, vb.pp("self_attn"))?,
            layer_norm2: LayerNorm::new(d, eps, vb.pp("layer_norm2"))?,
            fc1: linear(d, dims.intermediate_size, mlp.pp("fc1"))?,
            fc2: linear(dims.intermediate_size, d, mlp.pp("fc2"))?,
            activation: dims.activation,
        })
    }

    pub fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let xs = (xs + self.self_attn.forward(&self.layer_norm1.forward(xs)?, mask)?)?;
        let h = self.activation.forward(&self.fc1.forward(&self.layer_norm2.forward(&xs)?)?)?;
        &xs + self.fc2.forward(&h)?
    }
}

/// `encoder.layers.0..n`.
pub fn encoder_layers(dims: &EncoderDims, num_layers: usize, vb: VarBuilder) -> Result<Vec<ClipEncoderLayer>> {
    let vl = vb.pp("encoder").pp("layers");
    (0..num_layers).map(|i| ClipEncoderLayer::new(dims, vl.pp(i))).collect()
}

//! BLIP's vision tower: ViT with pre-LN blocks (HF `BlipVisionModel`).

use candle_core::{bail, DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use ctxalign_nn::{linear, scaled_dot_product_attention, LayerNorm, Linear};

use super::config::BlipVisionConfig;

/// Patch, class and position embeddings (`vision_model.embeddings`).
#[derive(Debug, Clone)]
pub struct BlipVisionEmbeddings {
    /// `[1, 1, d]`
    pub class_embedding: Tensor,
    /// Conv weight `[d, 3, p, p]` stored as the equivalent matrix `[d, 3·p·p]`: with stride = kernel
    /// a patch embedding is one matmul over unfolded patches (faster on CPU, plainly differentiable).
    pub patch_weight: Tensor,
    /// `[d]`
    pub patch_bias: Tensor,
    /// `[1, 1 + g·g, d]` at the checkpoint's resolution.
    pub position_embedding: Tensor,
    pub patch_size: usize,
    /// Patches per side of `position_embedding` (g).
    pub grid_size: usize,
}

impl BlipVisionEmbeddings {
    pub fn new(cfg: &BlipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let (d, p, g) = (cfg.hidden_size, cfg.patch_size, cfg.grid_size());
        let class_embedding = vb.get((1, 1, d), "class_embedding")?;
        let conv = vb.pp("patch_embedding");
        let patch_weight = conv.get((d, 3, p, p), "weight")?.reshape((d, 3 * p * p))?;
        let patch_bias = conv.get(d, "bias")?;
        let position_embedding = vb.get((1, 1 + g * g, d), "position_embedding")?;
        Ok(Self { class_embedding, patch_weight, patch_bias, position_embedding, patch_size: p, grid_size: g })
    }

    /// `[batch, 3, H, W]` → patch tokens `[batch, (H/p)·(W/p), d]` in row-major patch order, without
    /// position embeddings.
    pub fn patch_tokens(&self, pixel_values: &Tensor) -> Result<Tensor> {
        if pixel_values.dim(1)? != 3 {
            bail!("pixel_values must be [batch, 3, H, W], got {:?}", pixel_values.shape())
        }
        let patches = unfold_patches(pixel_values, self.patch_size)?;
        patches.broadcast_matmul(&self.patch_weight.t()?)?.broadcast_add(&self.patch_bias)
    }

    /// Position embeddings for a `grid_h × grid_w` patch grid: the checkpoint's own, or bicubically
    /// interpolated (PyTorch `interpolate(mode="bicubic", align_corners=False)`, as BLIP and HF do)
    /// with the CLS row kept. `[1, 1 + grid_h·grid_w, d]`.
    pub fn position_embeddings_for(&self, grid_h: usize, grid_w: usize) -> Result<Tensor> {
        resize_position_embeddings(&self.position_embedding, self.grid_size, grid_h, grid_w)
    }

    /// Full embeddings `[batch, 1 + patches, d]`: CLS + patch tokens, plus position embeddings.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = pixel_values.dims4()?;
        let patches = self.patch_tokens(pixel_values)?;
        let d = patches.dim(D::Minus1)?;
        let cls = self.class_embedding.broadcast_as((b, 1, d))?.to_dtype(patches.dtype())?;
        let tokens = Tensor::cat(&[&cls, &patches], 1)?;
        let pos = self.position_embeddings_for(h / self.patch_size, w / self.patch_size)?;
        tokens.broadcast_add(&pos)
    }
}

/// ViT position embeddings `[1, 1 + g·g, d]` (CLS row first) for a `grid_h × grid_w` patch grid:
/// returned as they are when the grid is the checkpoint's, otherwise bicubically interpolated
/// (PyTorch `interpolate(mode="bicubic", align_corners=False)`, as BLIP and HF CLIP do) with the CLS
/// row kept.
pub fn resize_position_embeddings(
    position_embedding: &Tensor,
    g: usize,
    grid_h: usize,
    grid_w: usize,
) -> Result<Tensor> {
    if (grid_h, grid_w) == (g, g) {
        return Ok(position_embedding.clone());
    }
    let d = position_embedding.dim(D::Minus1)?;
    let cls = position_embedding.narrow(1, 0, 1)?;
    let grid = position_embedding.narrow(1, 1, g * g)?.reshape((g, g * d))?;
    let dtype = grid.dtype();
    let dev = grid.device();
    let rows = Tensor::from_vec(bicubic_matrix(g, grid_h), (grid_h, g), dev)?.to_dtype(dtype)?;
    let cols = Tensor::from_vec(bicubic_matrix(g, grid_w), (grid_w, g), dev)?.to_dtype(dtype)?;
    // Separable resize as two matmuls: rows [gh, g] · grid [g, g·d], then columns.
    let resized = rows.matmul(&grid)?.reshape((grid_h, g, d))?; // [gh, g, d]
    let resized = resized.transpose(1, 2)?.contiguous()?; // [gh, d, g]
    let resized = resized.broadcast_matmul(&cols.t()?)?; // [gh, d, gw]
    let resized = resized.transpose(1, 2)?.reshape((1, grid_h * grid_w, d))?;
    Tensor::cat(&[cls, resized], 1)
}

/// `[batch, c, H, W]` → non-overlapping `p×p` patches `[batch, (H/p)·(W/p), c·p·p]`, row-major patch
/// order, each flattened as a conv kernel `[c, p, p]` reads it: with stride = kernel, a patch
/// embedding conv is one matmul over these (faster on CPU, plainly differentiable).
pub fn unfold_patches(pixel_values: &Tensor, p: usize) -> Result<Tensor> {
    let (b, c, h, w) = pixel_values.dims4()?;
    if h % p != 0 || w % p != 0 {
        bail!("pixel_values must be [batch, c, H, W] with H, W multiples of {p}, got {:?}", pixel_values.shape())
    }
    let (gh, gw) = (h / p, w / p);
    // [b, c, gh, p, gw, p] → [b, gh, gw, c, p, p]
    pixel_values.reshape((b, c, gh, p, gw, p))?.permute((0, 2, 4, 1, 3, 5))?.reshape((b, gh * gw, c * p * p))
}

/// PyTorch's bicubic kernel (A = −0.75), `align_corners=False`, edges clamped: the `[out, in]`
/// matrix M with `resized = M · input` along one axis.
pub fn bicubic_matrix(in_len: usize, out_len: usize) -> Vec<f32> {
    const A: f64 = -0.75;
    let cubic1 = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0; // |x| ≤ 1
    let cubic2 = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A; // 1 < |x| < 2
    let scale = in_len as f64 / out_len as f64;
    let mut m = vec![0f32; out_len * in_len];
    for o in 0..out_len {
        let src = (o as f64 + 0.5) * scale - 0.5;
        let floor = src.floor();
        let t = src - floor;
        let weights = [cubic2(t + 1.0), cubic1(t), cubic1(1.0 - t), cubic2(2.0 - t)];
        for (k, wk) in weights.iter().enumerate() {
            let idx = (floor as i64 - 1 + k as i64).clamp(0, in_len as i64 - 1) as usize;
            m[o * in_len + idx] += *wk as f32;
        }
    }
    m
}

/// Multi-head self-attention with a fused `qkv` projection (`self_attn`).
#[derive(Debug, Clone)]
pub struct BlipVisionAttention {
    pub qkv: Linear,
    pub projection: Linear,
    pub num_heads: usize,
    pub head_dim: usize,
}

impl BlipVisionAttention {
    pub fn new(cfg: &BlipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            qkv: linear(d, 3 * d, vb.pp("qkv"))?,
            projection: linear(d, d, vb.pp("projection"))?,
            num_heads: cfg.num_attention_heads,
            head_dim: d / cfg.num_attention_heads,
        })
    }
}

impl Module for BlipVisionAttention {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, t, d) = xs.dims3()?;
        // qkv rows are [q; k; v], each split into heads: [b, t, 3, h, hd] → [3, b, h, t, hd].
        let qkv = self.qkv.forward(xs)?.reshape((b, t, 3, self.num_heads, self.head_dim))?.permute((2, 0, 3, 1, 4))?;
        let (q, k, v) = (qkv.get(0)?.contiguous()?, qkv.get(1)?.contiguous()?, qkv.get(2)?.contiguous()?);
        let scale = (self.head_dim as f64).powf(-0.5);
        let out = scaled_dot_product_attention(&q, &k, &v, None, scale, false)?;
        let context = out.context.transpose(1, 2)?.reshape((b, t, d))?;
        self.projection.forward(&context)
    }
}

/// Two-layer MLP with the config's activation (exact GELU in BLIP).
#[derive(Debug, Clone)]
pub struct BlipMlp {
    pub fc1: Linear,
    pub fc2: Linear,
    pub activation: crate::HiddenAct,
}

impl BlipMlp {
    pub fn new(cfg: &BlipVisionConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: linear(cfg.hidden_size, cfg.intermediate_size, vb.pp("fc1"))?,
            fc2: linear(cfg.intermediate_size, cfg.hidden_size, vb.pp("fc2"))?,
            activation: cfg.hidden_act,
        })
    }
}

impl Module for BlipMlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.activation.forward(&self.fc1.forward(xs)?)?)
    }
}

/// Pre-LN block: `x += attn(LN1(x)); x += mlp(LN2(x))`.
#[derive(Debug, Clone)]
pub struct BlipVisionLayer {
    pub layer_norm1: LayerNorm,
    pub self_attn: BlipVisionAttention,
    pub layer_norm2: LayerNorm,
    pub mlp: BlipMlp,
}

impl BlipVisionLayer {
    pub fn new(cfg: &BlipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let (d, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        Ok(Self {
            layer_norm1: LayerNorm::new(d, eps, vb.pp("layer_norm1"))?,
            self_attn: BlipVisionAttention::new(cfg, vb.pp("self_attn"))?,
            layer_norm2: LayerNorm::new(d, eps, vb.pp("layer_norm2"))?,
            mlp: BlipMlp::new(cfg, vb.pp("mlp"))?,
        })
    }
}

impl Module for BlipVisionLayer {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = (xs + self.self_attn.forward(&self.layer_norm1.forward(xs)?)?)?;
        &xs + self.mlp.forward(&self.layer_norm2.forward(&xs)?)?
    }
}

/// Every layer's output of one vision pass.
#[derive(Debug, Clone)]
pub struct BlipVisionOutput {
    /// After the final LayerNorm: `[batch, tokens, d]`.
    pub last_hidden_state: Tensor,
    /// `hidden_states[0]` is the embeddings, `hidden_states[k]` the output of layer k (1-based),
    /// all before the final LayerNorm. Empty unless requested.
    pub hidden_states: Vec<Tensor>,
}

/// The vision tower (`vision_model`).
#[derive(Debug, Clone)]
pub struct BlipVisionModel {
    pub embeddings: BlipVisionEmbeddings,
    pub layers: Vec<BlipVisionLayer>,
    pub post_layernorm: LayerNorm,
    pub config: BlipVisionConfig,
}

impl BlipVisionModel {
    pub fn new(cfg: &BlipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let embeddings = BlipVisionEmbeddings::new(cfg, vb.pp("embeddings"))?;
        let vl = vb.pp("encoder").pp("layers");
        let layers =
            (0..cfg.num_hidden_layers).map(|i| BlipVisionLayer::new(cfg, vl.pp(i))).collect::<Result<Vec<_>>>()?;
        let post_layernorm = LayerNorm::new(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("post_layernorm"))?;
        Ok(Self { embeddings, layers, post_layernorm, config: cfg.clone() })
    }

    /// Runs the encoder layers and the final norm over already-embedded tokens `[batch, tokens, d]`
    /// (e.g. only the visible patches, MAE-style).
    pub fn encode_tokens(&self, tokens: &Tensor, keep_hidden_states: bool) -> Result<BlipVisionOutput> {
        let mut hidden_states = Vec::new();
        let mut xs = tokens.clone();
        for layer in &self.layers {
            if keep_hidden_states {
                hidden_states.push(xs.clone());
            }
            xs = layer.forward(&xs)?;
        }
        if keep_hidden_states {
            hidden_states.push(xs.clone());
        }
        let last_hidden_state = self.post_layernorm.forward(&xs)?;
        Ok(BlipVisionOutput { last_hidden_state, hidden_states })
    }

    /// `[batch, 3, H, W]` normalised pixels → every layer's output.
    pub fn forward_with_hidden_states(&self, pixel_values: &Tensor) -> Result<BlipVisionOutput> {
        let pixel_values = pixel_values.to_dtype(self.dtype())?;
        self.encode_tokens(&self.embeddings.forward(&pixel_values)?, true)
    }

    pub fn dtype(&self) -> DType {
        self.post_layernorm.weight.dtype()
    }
}

impl Module for BlipVisionModel {
    /// `[batch, 3, H, W]` → `last_hidden_state` `[batch, 1 + patches, d]`.
    fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let pixel_values = pixel_values.to_dtype(self.dtype())?;
        Ok(self.encode_tokens(&self.embeddings.forward(&pixel_values)?, false)?.last_hidden_state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bicubic_matrix_rows_sum_to_one_and_identity_at_same_size() {
        for (i, o) in [(4, 6), (24, 14), (14, 24), (3, 3)] {
            let m = bicubic_matrix(i, o);
            for r in 0..o {
                let s: f32 = m[r * i..(r + 1) * i].iter().sum();
                assert!((s - 1.0).abs() < 1e-6);
            }
        }
        let m = bicubic_matrix(5, 5);
        for r in 0..5 {
            for c in 0..5 {
                assert!((m[r * 5 + c] - if r == c { 1.0 } else { 0.0 }).abs() < 1e-6);
            }
        }
    }
}

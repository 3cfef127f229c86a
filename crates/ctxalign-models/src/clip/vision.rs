//! CLIP's vision tower (HF `CLIPVisionTransformer`, keys under `vision_model.`).

use candle_core::{bail, Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use ctxalign_nn::{first_token, LayerNorm};

use super::config::ClipVisionConfig;
use super::encoder::{encoder_layers, ClipEncoderLayer, EncoderDims};
use crate::blip::vision::{resize_position_embeddings, unfold_patches};

/// Class, patch (a bias-free conv) and position embeddings (`embeddings`).
#[derive(Debug, Clone)]
pub struct ClipVisionEmbeddings {
    /// `[d]`
    pub class_embedding: Tensor,
    /// The conv weight `[d, c, p, p]` as the matrix `[d, c·p·p]` (stride = kernel: one matmul).
    pub patch_weight: Tensor,
    /// `[1, 1 + g·g, d]`
    pub position_embedding: Tensor,
    pub patch_size: usize,
    pub grid_size: usize,
    pub num_channels: usize,
}

impl ClipVisionEmbeddings {
    pub fn new(cfg: &ClipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let (d, p, g, c) = (cfg.hidden_size, cfg.patch_size, cfg.grid_size(), cfg.num_channels);
        let patch_weight = vb.get((d, c, p, p), "patch_embedding.weight")?.reshape((d, c * p * p))?;
        let position_embedding = vb.get((1 + g * g, d), "position_embedding.weight")?.unsqueeze(0)?;
        Ok(Self {
            class_embedding: vb.get(d, "class_embedding")?,
            patch_weight,
            position_embedding,
            patch_size: p,
            grid_size: g,
            num_channels: c,
        })
    }

    /// `[batch, c, H, W]` → `[batch, 1 + patches, d]`. Another resolution than the checkpoint's
    /// interpolates the position embeddings (HF's `interpolate_pos_encoding=True`).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixel_values.dims4()?;
        if c != self.num_channels {
            bail!("pixel_values has {c} channels, the model expects {}", self.num_channels)
        }
        let patches = unfold_patches(pixel_values, self.patch_size)?.broadcast_matmul(&self.patch_weight.t()?)?;
        let d = patches.dim(D::Minus1)?;
        let cls = self.class_embedding.reshape((1, 1, d))?.broadcast_as((b, 1, d))?.to_dtype(patches.dtype())?;
        let tokens = Tensor::cat(&[&cls, &patches], 1)?;
        let p = self.patch_size;
        tokens.broadcast_add(&resize_position_embeddings(&self.position_embedding, self.grid_size, h / p, w / p)?)
    }
}

/// Output of one vision pass.
#[derive(Debug, Clone)]
pub struct ClipVisionOutput {
    /// Encoder output (no final norm) `[batch, tokens, d]`.
    pub last_hidden_state: Tensor,
    /// `post_layernorm` of the class token `[batch, d]`.
    pub pooler_output: Tensor,
}

/// `vision_model`.
#[derive(Debug, Clone)]
pub struct ClipVisionTransformer {
    pub embeddings: ClipVisionEmbeddings,
    /// HF spells it `pre_layrnorm`.
    pub pre_layernorm: LayerNorm,
    pub layers: Vec<ClipEncoderLayer>,
    pub post_layernorm: LayerNorm,
    pub config: ClipVisionConfig,
}

impl ClipVisionTransformer {
    pub fn new(cfg: &ClipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let dims = EncoderDims::new(
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_attention_heads,
            cfg.layer_norm_eps,
            cfg.hidden_act,
        );
        let (d, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        Ok(Self {
            embeddings: ClipVisionEmbeddings::new(cfg, vb.pp("embeddings"))?,
            pre_layernorm: LayerNorm::new(d, eps, vb.pp("pre_layrnorm"))?,
            layers: encoder_layers(&dims, cfg.num_hidden_layers, vb.clone())?,
            post_layernorm: LayerNorm::new(d, eps, vb.pp("post_layernorm"))?,
            config: cfg.clone(),
        })
    }

    pub fn forward_full(&self, pixel_values: &Tensor) -> Result<ClipVisionOutput> {
        let pixel_values = pixel_values.to_dtype(self.post_layernorm.weight.dtype())?;
        let mut xs = self.pre_layernorm.forward(&self.embeddings.forward(&pixel_values)?)?;
        for layer in &self.layers {
            xs = layer.forward(&xs, None)?;
        }
        let pooler_output = self.post_layernorm.forward(&first_token(&xs)?)?;
        Ok(ClipVisionOutput { last_hidden_state: xs, pooler_output })
    }
}

impl Module for ClipVisionTransformer {
    /// `[batch, c, H, W]` → pooled `[batch, d]`.
    fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        Ok(self.forward_full(pixel_values)?.pooler_output)
    }
}

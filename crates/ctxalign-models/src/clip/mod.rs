//! CLIP (HF `CLIPModel`): a ViT image tower and a causal text tower, each projected into a joint
//! space without bias, compared by cosine similarity times `exp(logit_scale)`.

pub mod config;
pub mod encoder;
pub mod text;
pub mod vision;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

pub use config::{ClipConfig, ClipTextConfig, ClipVisionConfig};
pub use text::ClipTextTransformer;
pub use vision::ClipVisionTransformer;

use crate::loading::{build_from_safetensors, read_json, AllowedUnused, LoadError, ModelFiles, RenameTable};
use ctxalign_nn::{l2_normalize, linear_no_bias, Linear};

/// Output of [`ClipModel::forward`].
#[derive(Debug, Clone)]
pub struct ClipOutput {
    /// `exp(logit_scale) · image_embeds · text_embedsᵀ` `[images, texts]`.
    pub logits_per_image: Tensor,
    /// Its transpose `[texts, images]`.
    pub logits_per_text: Tensor,
    /// L2-normalised projections `[images, projection_dim]`.
    pub image_embeds: Tensor,
    /// L2-normalised projections `[texts, projection_dim]`.
    pub text_embeds: Tensor,
}

/// `CLIPModel`.
#[derive(Debug, Clone)]
pub struct ClipModel {
    pub text_model: ClipTextTransformer,
    pub vision_model: ClipVisionTransformer,
    pub visual_projection: Linear,
    pub text_projection: Linear,
    /// Scalar `ln(1/τ)`.
    pub logit_scale: Tensor,
    pub config: ClipConfig,
}

impl ClipModel {
    pub fn new(cfg: &ClipConfig, vb: VarBuilder) -> Result<Self> {
        let (tw, vw, p) = (cfg.text_config.hidden_size, cfg.vision_config.hidden_size, cfg.projection_dim);
        Ok(Self {
            text_model: ClipTextTransformer::new(&cfg.text_config, vb.pp("text_model"))?,
            vision_model: ClipVisionTransformer::new(&cfg.vision_config, vb.pp("vision_model"))?,
            visual_projection: linear_no_bias(vw, p, vb.pp("visual_projection"))?,
            text_projection: linear_no_bias(tw, p, vb.pp("text_projection"))?,
            logit_scale: vb.get_with_hints((), "logit_scale", candle_nn::Init::Const(cfg.logit_scale_init_value))?,
            config: cfg.clone(),
        })
    }

    pub fn read_config(path: &std::path::Path) -> std::result::Result<ClipConfig, LoadError> {
        let cfg: ClipConfig = read_json(path)?;
        cfg.validate().map_err(|message| LoadError::Config { path: path.to_owned(), message })?;
        Ok(cfg)
    }

    /// Loads an HF `CLIPModel` folder (`openai/clip-vit-base-patch32`, …).
    pub fn load(files: &ModelFiles, dtype: DType, device: &Device) -> std::result::Result<Self, LoadError> {
        let cfg = Self::read_config(&files.config)?;
        build_from_safetensors(&files.weights, RenameTable::identity(), &Self::allowed_unused(), dtype, device, |vb| {
            Self::new(&cfg, vb)
        })
    }

    /// The keys of a `CLIPModel` checkpoint that are not parameters; every other tensor must be
    /// read ([`LoadError::UnusedTensors`]).
    pub fn allowed_unused() -> AllowedUnused {
        AllowedUnused::none()
            .suffix("embeddings.position_ids", "HF's position-index buffer (0, 1, 2, …), saved by older transformers")
    }

    /// Projected, unnormalised image features `[images, projection_dim]` (`get_image_features`).
    pub fn get_image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.visual_projection.forward(&self.vision_model.forward(pixel_values)?)
    }

    /// Projected, unnormalised text features `[texts, projection_dim]` (`get_text_features`).
    pub fn get_text_features(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        self.text_projection.forward(&self.text_model.forward(input_ids, attention_mask)?)
    }

    pub fn forward(&self, pixel_values: &Tensor, input_ids: &Tensor, attention_mask: &Tensor) -> Result<ClipOutput> {
        let image_embeds = l2_normalize(&self.get_image_features(pixel_values)?)?;
        let text_embeds = l2_normalize(&self.get_text_features(input_ids, attention_mask)?)?;
        let logits_per_text = text_embeds.matmul(&image_embeds.t()?)?.broadcast_mul(&self.logit_scale.exp()?)?;
        let logits_per_image = logits_per_text.t()?;
        Ok(ClipOutput { logits_per_image, logits_per_text, image_embeds, text_embeds })
    }
}

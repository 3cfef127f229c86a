//! CLIP configuration, mirroring HF's `CLIPConfig` `config.json`.
//!
//! Missing fields take HF's class defaults (`openai/clip-vit-base-patch32`), as HF itself does:
//! recent `config.json` files only write the fields that differ from them.

use serde::{Deserialize, Serialize};

use crate::HiddenAct;

/// Text tower (`text_config`): a causal pre-LN transformer, pooled at the end-of-text token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipTextConfig {
    /// Vocabulary size (49408, CLIP's BPE).
    #[serde(default = "d_text_vocab")]
    pub vocab_size: usize,
    /// Token width (512).
    #[serde(default = "d_text_hidden")]
    pub hidden_size: usize,
    /// MLP width (2048).
    #[serde(default = "d_text_intermediate")]
    pub intermediate_size: usize,
    /// Encoder layers (12).
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    /// Attention heads (8).
    #[serde(default = "d_text_heads")]
    pub num_attention_heads: usize,
    /// Context length (77).
    #[serde(default = "d_text_positions")]
    pub max_position_embeddings: usize,
    /// `"quick_gelu"` (OpenAI checkpoints) or `"gelu"` (exact).
    #[serde(default = "d_act")]
    pub hidden_act: HiddenAct,
    /// LayerNorm eps (1e-5).
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    /// End-of-text id. HF keeps a legacy rule: with `eos_token_id == 2` (configs written before
    /// transformers PR #24773) the pooled token is the one with the highest id in each row (CLIP's
    /// end-of-text is the last vocabulary entry); otherwise the first position of this id.
    #[serde(default = "d_eos")]
    pub eos_token_id: u32,
    /// Padding id (1).
    #[serde(default = "d_pad")]
    pub pad_token_id: u32,
}

/// Vision tower (`vision_config`): a pre-LN ViT with a LayerNorm before the encoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipVisionConfig {
    /// Token width (768).
    #[serde(default = "d_vision_hidden")]
    pub hidden_size: usize,
    /// MLP width (3072).
    #[serde(default = "d_vision_intermediate")]
    pub intermediate_size: usize,
    /// Encoder layers (12).
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    /// Attention heads (12).
    #[serde(default = "d_layers")]
    pub num_attention_heads: usize,
    /// Input channels (3).
    #[serde(default = "d_channels")]
    pub num_channels: usize,
    /// Image side the position embeddings were trained at (224).
    #[serde(default = "d_image")]
    pub image_size: usize,
    /// Patch side (32 for ViT-B/32, 16 for ViT-B/16).
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    /// `"quick_gelu"` or `"gelu"`.
    #[serde(default = "d_act")]
    pub hidden_act: HiddenAct,
    /// LayerNorm eps (1e-5).
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
}

/// `CLIPConfig`: both towers, the shared embedding width and the initial logit scale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipConfig {
    pub text_config: ClipTextConfig,
    pub vision_config: ClipVisionConfig,
    /// Width of the joint embedding space (512).
    #[serde(default = "d_projection")]
    pub projection_dim: usize,
    /// Initial `logit_scale` = ln(1/0.07) (the checkpoint's own value is loaded).
    #[serde(default = "d_logit_scale")]
    pub logit_scale_init_value: f64,
}

fn d_text_vocab() -> usize {
    49408
}
fn d_text_hidden() -> usize {
    512
}
fn d_text_intermediate() -> usize {
    2048
}
fn d_layers() -> usize {
    12
}
fn d_text_heads() -> usize {
    8
}
fn d_text_positions() -> usize {
    77
}
fn d_act() -> HiddenAct {
    HiddenAct::QuickGelu
}
fn d_eps() -> f64 {
    1e-5
}
fn d_eos() -> u32 {
    49407
}
fn d_pad() -> u32 {
    1
}
fn d_vision_hidden() -> usize {
    768
}
fn d_vision_intermediate() -> usize {
    3072
}
fn d_channels() -> usize {
    3
}
fn d_image() -> usize {
    224
}
fn d_patch() -> usize {
    32
}
fn d_projection() -> usize {
    512
}
fn d_logit_scale() -> f64 {
    2.6592
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("all fields have defaults")
    }
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("all fields have defaults")
    }
}

impl ClipVisionConfig {
    /// ViT-B/`patch` at `image_size` (OpenAI's ViT-B/32 and ViT-B/16).
    pub fn vit_base(patch_size: usize, image_size: usize) -> Self {
        Self { patch_size, image_size, ..Self::default() }
    }

    /// A small ViT for CPU training: `layers` × width `hidden` (4 heads, MLP 4×).
    pub fn small(image_size: usize, patch_size: usize, hidden_size: usize, num_hidden_layers: usize) -> Self {
        Self {
            hidden_size,
            intermediate_size: 4 * hidden_size,
            num_hidden_layers,
            num_attention_heads: 4,
            image_size,
            patch_size,
            hidden_act: HiddenAct::Gelu,
            ..Self::default()
        }
    }

    /// Patches per side at the native resolution.
    pub fn grid_size(&self) -> usize {
        self.image_size / self.patch_size
    }

    pub fn validate(&self) -> Result<(), String> {
        check_tower("vision_config", self.hidden_size, self.num_attention_heads, self.layer_norm_eps)?;
        if self.patch_size == 0 || !self.image_size.is_multiple_of(self.patch_size) {
            return Err(format!(
                "vision_config.image_size {} is not a multiple of patch_size {}",
                self.image_size, self.patch_size
            ));
        }
        Ok(())
    }
}

impl ClipTextConfig {
    pub fn validate(&self) -> Result<(), String> {
        check_tower("text_config", self.hidden_size, self.num_attention_heads, self.layer_norm_eps)
    }
}

impl ClipConfig {
    /// `openai/clip-vit-base-patch32`.
    pub fn vit_base_patch32() -> Self {
        Self {
            text_config: ClipTextConfig::default(),
            vision_config: ClipVisionConfig::vit_base(32, 224),
            projection_dim: 512,
            logit_scale_init_value: d_logit_scale(),
        }
    }

    /// `openai/clip-vit-base-patch16`.
    pub fn vit_base_patch16() -> Self {
        Self { vision_config: ClipVisionConfig::vit_base(16, 224), ..Self::vit_base_patch32() }
    }

    pub fn validate(&self) -> Result<(), String> {
        self.text_config.validate()?;
        self.vision_config.validate()
    }
}

fn check_tower(name: &str, width: usize, heads: usize, eps: f64) -> Result<(), String> {
    if heads == 0 || !width.is_multiple_of(heads) {
        return Err(format!("{name}.hidden_size {width} is not divisible by num_attention_heads {heads}"));
    }
    if !(eps > 0.0 && eps < 1e-2) {
        return Err(format!("{name}.layer_norm_eps {eps} is not a small positive number"));
    }
    Ok(())
}

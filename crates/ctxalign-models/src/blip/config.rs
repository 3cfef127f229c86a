//! BLIP configuration, mirroring HF's `BlipConfig` `config.json`.
//!
//! Parsing is strict where a wrong value fails silently: head counts, widths, depths and LayerNorm
//! eps have no defaults (HF's `BlipTextConfig` defaults to 8 heads while BLIP checkpoints need 12 —
//! the weight shapes are identical, so only the config can tell). Fields HF writes that do not
//! affect inference (`architectures`, dropout rates, …) are accepted and ignored.

use serde::{Deserialize, Serialize};

use crate::HiddenAct;

/// Vision tower (`vision_config`): a ViT with pre-LN blocks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlipVisionConfig {
    /// Token width d (768 for ViT-B, 1024 for ViT-L).
    pub hidden_size: usize,
    /// MLP width (3072 for ViT-B).
    pub intermediate_size: usize,
    /// Number of encoder layers (12 for ViT-B).
    pub num_hidden_layers: usize,
    /// Attention heads per layer (12 for ViT-B).
    pub num_attention_heads: usize,
    /// Image side the position embeddings were trained at (224 or 384); other sizes interpolate.
    pub image_size: usize,
    /// Patch side (16).
    pub patch_size: usize,
    /// LayerNorm eps: 1e-5 in HF checkpoints, 1e-6 in BLIP's own code.
    pub layer_norm_eps: f64,
    /// Activation of the MLP (`"gelu"`, exact, in every BLIP checkpoint).
    pub hidden_act: HiddenAct,
}

/// Text tower (`text_config`): BERT with cross-attention in every layer ("MED").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlipTextConfig {
    /// Vocabulary size (30524: bert-base-uncased + `[DEC]` + `[ENC]`).
    pub vocab_size: usize,
    /// Token width (768).
    pub hidden_size: usize,
    /// Width of the image tokens cross-attention reads (the vision `hidden_size`).
    pub encoder_hidden_size: usize,
    /// FFN width (3072).
    pub intermediate_size: usize,
    /// Number of layers (12).
    pub num_hidden_layers: usize,
    /// Attention heads (12 for BLIP checkpoints; HF's class default of 8 is wrong for them).
    pub num_attention_heads: usize,
    /// Number of absolute position embeddings (512).
    pub max_position_embeddings: usize,
    /// LayerNorm eps (1e-12).
    pub layer_norm_eps: f64,
    /// Activation of the FFN (`"gelu"`, exact, in every BLIP checkpoint).
    pub hidden_act: HiddenAct,
    /// `[PAD]` id (0).
    #[serde(default)]
    pub pad_token_id: u32,
    /// `[DEC]` id (30522); BLIP's `[ENC]` is the next id.
    #[serde(default = "default_bos")]
    pub bos_token_id: u32,
    /// `[SEP]` id (102).
    #[serde(default = "default_sep")]
    pub sep_token_id: u32,
    /// Whether each layer has a cross-attention block (HF `add_cross_attention`; true for BLIP's
    /// text encoder, false for a plain BERT stack such as ContextBLIP's inter-context encoder).
    #[serde(default = "default_true")]
    pub add_cross_attention: bool,
}

impl BlipTextConfig {
    /// The settings of each of its layers.
    pub fn layer(&self) -> BertLayerConfig {
        BertLayerConfig {
            hidden_size: self.hidden_size,
            num_attention_heads: self.num_attention_heads,
            intermediate_size: self.intermediate_size,
            layer_norm_eps: self.layer_norm_eps,
            hidden_act: self.hidden_act,
            cross_attention_width: self.add_cross_attention.then_some(self.encoder_hidden_size),
        }
    }
}

/// One BERT layer as [`super::text::BlipTextLayer`] builds it: self-attention, an optional
/// cross-attention block and the FFN. BLIP's text encoder takes it from its config
/// ([`BlipTextConfig::layer`]); ContextBLIP's TMIM decoder and inter-context encoder, which are
/// bare stacks of such layers (no embeddings, no vocabulary), build it from their own settings.
#[derive(Debug, Clone, PartialEq)]
pub struct BertLayerConfig {
    /// Token width.
    pub hidden_size: usize,
    /// Attention heads (`hidden_size` must be a multiple).
    pub num_attention_heads: usize,
    /// FFN width.
    pub intermediate_size: usize,
    /// LayerNorm eps.
    pub layer_norm_eps: f64,
    /// FFN activation.
    pub hidden_act: HiddenAct,
    /// Width of the states cross-attention reads; `None`: the layer has no cross-attention.
    pub cross_attention_width: Option<usize>,
}

fn default_true() -> bool {
    true
}

fn default_bos() -> u32 {
    30522
}
fn default_sep() -> u32 {
    102
}

/// `BlipConfig` as written by HF for `BlipForImageTextRetrieval`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlipConfig {
    pub vision_config: BlipVisionConfig,
    pub text_config: BlipTextConfig,
    /// Width of the ITC projections `vision_proj` / `text_proj` (256).
    pub image_text_hidden_size: usize,
    /// HF class names; informative only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
}

impl BlipVisionConfig {
    /// ViT-B/16 as in BLIP base, at `image_size` (224 for pre-training, 384 for COCO retrieval).
    pub fn vit_base(image_size: usize) -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            image_size,
            patch_size: 16,
            layer_norm_eps: 1e-5,
            hidden_act: HiddenAct::Gelu,
        }
    }

    /// ViT-L/16 as in BLIP large.
    pub fn vit_large(image_size: usize) -> Self {
        Self {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            ..Self::vit_base(image_size)
        }
    }

    /// Patches per side at the configured image size.
    pub fn grid_size(&self) -> usize {
        self.image_size / self.patch_size
    }
}

impl BlipTextConfig {
    /// BERT-base MED reading image tokens of width `encoder_hidden_size`.
    pub fn bert_base(encoder_hidden_size: usize) -> Self {
        Self {
            vocab_size: 30524,
            hidden_size: 768,
            encoder_hidden_size,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 512,
            layer_norm_eps: 1e-12,
            hidden_act: HiddenAct::Gelu,
            pad_token_id: 0,
            bos_token_id: default_bos(),
            sep_token_id: default_sep(),
            add_cross_attention: true,
        }
    }
}

impl BlipConfig {
    /// `Salesforce/blip-itm-base-coco` and `-flickr`: ViT-B/16 at 384 px + BERT-base.
    pub fn itm_base_384() -> Self {
        Self::with_vision(BlipVisionConfig::vit_base(384))
    }

    /// BLIP base at 224 px, the resolution ContextBLIP trains at.
    pub fn itm_base_224() -> Self {
        Self::with_vision(BlipVisionConfig::vit_base(224))
    }

    /// `Salesforce/blip-itm-large-coco` and `-flickr`: ViT-L/16 at 384 px + BERT-base.
    pub fn itm_large_384() -> Self {
        Self::with_vision(BlipVisionConfig::vit_large(384))
    }

    /// The small BLIP shipped in `models/blip-vignettes-small` (trained from scratch by
    /// `cargo xtask train-default-backbone`): 96 px images in 12 px patches (8×8 grid), 4 + 4
    /// layers of width 128 with 4 heads, a WordPiece vocabulary of `vocab_size` ids whose last two
    /// are `[DEC]` and `[ENC]`, `[PAD]` = 0 and `[SEP]` = 3.
    pub fn vignettes_small(vocab_size: usize) -> Self {
        let vision_config = BlipVisionConfig {
            hidden_size: 128,
            intermediate_size: 512,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            image_size: 96,
            patch_size: 12,
            layer_norm_eps: 1e-5,
            hidden_act: HiddenAct::Gelu,
        };
        let text_config = BlipTextConfig {
            vocab_size,
            hidden_size: 128,
            encoder_hidden_size: 128,
            intermediate_size: 512,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            max_position_embeddings: 64,
            layer_norm_eps: 1e-12,
            hidden_act: HiddenAct::Gelu,
            pad_token_id: 0,
            bos_token_id: vocab_size as u32 - 2,
            sep_token_id: 3,
            add_cross_attention: true,
        };
        Self {
            vision_config,
            text_config,
            image_text_hidden_size: 128,
            architectures: Some(vec!["BlipForImageTextRetrieval".into()]),
        }
    }

    fn with_vision(vision_config: BlipVisionConfig) -> Self {
        let text_config = BlipTextConfig::bert_base(vision_config.hidden_size);
        Self {
            vision_config,
            text_config,
            image_text_hidden_size: 256,
            architectures: Some(vec!["BlipForImageTextRetrieval".into()]),
        }
    }

    /// Checks the relations between fields that shapes alone cannot reveal.
    pub fn validate(&self) -> Result<(), String> {
        let v = &self.vision_config;
        let t = &self.text_config;
        let mut problems = vec![];
        for (name, width, heads) in [
            ("vision_config", v.hidden_size, v.num_attention_heads),
            ("text_config", t.hidden_size, t.num_attention_heads),
        ] {
            if heads == 0 || !width.is_multiple_of(heads) {
                problems.push(format!("{name}.hidden_size {width} is not divisible by num_attention_heads {heads}"));
            }
        }
        if v.patch_size == 0 || !v.image_size.is_multiple_of(v.patch_size) {
            problems.push(format!(
                "vision_config.image_size {} is not a multiple of patch_size {}",
                v.image_size, v.patch_size
            ));
        }
        if t.encoder_hidden_size != v.hidden_size {
            problems.push(format!(
                "text_config.encoder_hidden_size {} differs from vision_config.hidden_size {}",
                t.encoder_hidden_size, v.hidden_size
            ));
        }
        for (name, eps) in [("vision_config", v.layer_norm_eps), ("text_config", t.layer_norm_eps)] {
            if !(eps > 0.0 && eps < 1e-2) {
                problems.push(format!("{name}.layer_norm_eps {eps} is not a plausible epsilon"));
            }
        }
        if v.num_hidden_layers == 0 || t.num_hidden_layers == 0 {
            problems.push("num_hidden_layers must be at least 1".into());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid() {
        for c in [BlipConfig::itm_base_224(), BlipConfig::itm_base_384(), BlipConfig::itm_large_384()] {
            c.validate().unwrap();
        }
        assert_eq!(BlipConfig::itm_base_384().vision_config.grid_size(), 24);
    }

    #[test]
    fn missing_head_count_is_an_error_not_a_default() {
        let mut v = serde_json::to_value(BlipConfig::itm_base_224()).unwrap();
        v["text_config"].as_object_mut().unwrap().remove("num_attention_heads");
        let err = serde_json::from_value::<BlipConfig>(v).unwrap_err().to_string();
        assert!(err.contains("num_attention_heads"), "{err}");
    }

    #[test]
    fn inconsistent_sizes_are_reported() {
        let mut c = BlipConfig::itm_base_224();
        c.text_config.num_attention_heads = 7;
        c.text_config.encoder_hidden_size = 1024;
        let err = c.validate().unwrap_err();
        assert!(err.contains("divisible") && err.contains("encoder_hidden_size"), "{err}");
    }
}

//! ContextCLIP's dual encoder: any image tower and any text tower, each followed by the base code's
//! projection head (OpenAI-CLIP tutorial), compared in the joint space by the losses of
//! `ctxalign_nn::contrastive`.
//!
//! Key layout (`model.safetensors`): `image_encoder.<tower keys>` (a timm ResNet's `conv1.weight`, or
//! a CLIP vision tower's `embeddings.…`), `text_encoder.<tower keys>` (a `BertModel`'s
//! `embeddings.…`, or a CLIP text tower's), `image_projection.{projection,fc,layer_norm}.*`,
//! `text_projection.…` — the base code's `state_dict` names. A pretrained tower loads from its own
//! checkpoint through [`tower_renames`].

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use ctxalign_nn::{first_token, linear, LayerNorm, Linear};
use serde::{Deserialize, Serialize};

use crate::artifact::BaseModel;
use crate::bert::{BertConfig, BertModel};
use crate::clip::{ClipTextConfig, ClipTextTransformer, ClipVisionConfig, ClipVisionTransformer};
use crate::loading::{from_json_value, read_json, take_field, AllowedUnused, LoadError, RenameTable};
use crate::resnet::{ResNet, ResNetConfig};

/// The image tower.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ImageEncoderConfig {
    /// timm/torchvision ResNet, global average pooled (the base code's ResNet-50).
    Resnet(ResNetConfig),
    /// CLIP's ViT (`CLIPVisionModel`), pooled class token after `post_layernorm`.
    ClipVision(ClipVisionConfig),
}

/// The text tower.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TextEncoderConfig {
    /// HF `BertModel` (the base code uses DistilBERT's / BERT's CLS token).
    Bert(BertConfig),
    /// CLIP's causal text transformer (`CLIPTextModel`).
    ClipText(ClipTextConfig),
}

/// Which text state represents a caption.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TextPooling {
    /// The first token's final state (BERT's `[CLS]`; the base code).
    #[default]
    Cls,
    /// The tower's pooled output: BERT's tanh pooler, CLIP's end-of-text token.
    Pooled,
}

/// `contextclip.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContextClipConfig {
    pub image_encoder: ImageEncoderConfig,
    pub text_encoder: TextEncoderConfig,
    #[serde(default)]
    pub text_pooling: TextPooling,
    /// Width of the joint space (the base code's 256).
    #[serde(default = "d_projection")]
    pub projection_dim: usize,
    /// Dropout inside the projection heads (0.1 in the base code), training only.
    #[serde(default = "d_dropout")]
    pub dropout: f64,
    /// Input side the image tower is fed (224 in the base code).
    pub image_size: usize,
    /// Longest caption in tokens (the base code's 200; truncated beyond).
    #[serde(default = "d_max_length")]
    pub max_length: usize,
    /// Pixel normalisation after scaling to [0, 1] (ImageNet's, as the base code; a pretrained CLIP
    /// tower wants CLIP's `[0.4815, 0.4578, 0.4082]` / `[0.2686, 0.2613, 0.2758]`).
    #[serde(default = "d_mean")]
    pub image_mean: [f32; 3],
    #[serde(default = "d_std")]
    pub image_std: [f32; 3],
}

/// ImageNet's channel mean and standard deviation.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

fn d_mean() -> [f32; 3] {
    IMAGENET_MEAN
}
fn d_std() -> [f32; 3] {
    IMAGENET_STD
}

fn d_projection() -> usize {
    256
}
fn d_dropout() -> f64 {
    0.1
}
fn d_max_length() -> usize {
    200
}

impl ContextClipConfig {
    /// The padding id of the text tower's tokenizer.
    pub fn pad_token_id(&self) -> u32 {
        match &self.text_encoder {
            TextEncoderConfig::Bert(c) => c.pad_token_id,
            TextEncoderConfig::ClipText(c) => c.pad_token_id,
        }
    }

    /// The base code's model: ResNet-50 + bert-base-uncased (CLS), 256-d heads, 224 px.
    pub fn base_code() -> Self {
        Self {
            image_encoder: ImageEncoderConfig::Resnet(ResNetConfig::resnet50()),
            text_encoder: TextEncoderConfig::Bert(BertConfig::base_uncased()),
            text_pooling: TextPooling::Cls,
            projection_dim: 256,
            dropout: 0.1,
            image_size: 224,
            max_length: 200,
            image_mean: IMAGENET_MEAN,
            image_std: IMAGENET_STD,
        }
    }

    /// A model small enough to train on 2 CPU cores: a 4-layer ViT (width 128, patch 8) on
    /// `image_size` px and a 2-layer BERT (width 128) with bert-base-uncased's vocabulary.
    pub fn small(image_size: usize) -> Self {
        Self {
            image_encoder: ImageEncoderConfig::ClipVision(ClipVisionConfig::small(image_size, 8, 128, 4)),
            text_encoder: TextEncoderConfig::Bert(BertConfig::small(128, 2, 64)),
            text_pooling: TextPooling::Cls,
            projection_dim: 128,
            dropout: 0.1,
            image_size,
            max_length: 64,
            image_mean: IMAGENET_MEAN,
            image_std: IMAGENET_STD,
        }
    }

    /// Width of the image tower's features.
    pub fn image_width(&self) -> usize {
        match &self.image_encoder {
            ImageEncoderConfig::Resnet(c) => c.num_features(),
            ImageEncoderConfig::ClipVision(c) => c.hidden_size,
        }
    }

    /// Width of the text tower's features.
    pub fn text_width(&self) -> usize {
        match &self.text_encoder {
            TextEncoderConfig::Bert(c) => c.hidden_size,
            TextEncoderConfig::ClipText(c) => c.hidden_size,
        }
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        match &self.image_encoder {
            ImageEncoderConfig::Resnet(c) => c.validate().map_err(|e| format!("image_encoder: {e}"))?,
            ImageEncoderConfig::ClipVision(c) => c.validate().map_err(|e| format!("image_encoder: {e}"))?,
        }
        match &self.text_encoder {
            TextEncoderConfig::Bert(c) => {
                c.validate().map_err(|e| format!("text_encoder: {e}"))?;
                if self.max_length > c.max_position_embeddings {
                    return Err(format!(
                        "max_length {} exceeds the text encoder's max_position_embeddings {}",
                        self.max_length, c.max_position_embeddings
                    ));
                }
            }
            TextEncoderConfig::ClipText(c) => c.validate().map_err(|e| format!("text_encoder: {e}"))?,
        }
        if self.projection_dim == 0 || !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("projection_dim {} / dropout {} out of range", self.projection_dim, self.dropout));
        }
        // The image processor's settings (`processor_for`): checked here so that a folder that
        // loads processes every image, as HF processor files are checked at load.
        if self.image_size == 0 || self.image_size > ctxalign_data::image::MAX_SIDE as usize {
            return Err(format!(
                "image_size {}: a side of 1 to {} pixels is needed",
                self.image_size,
                ctxalign_data::image::MAX_SIDE
            ));
        }
        if let ImageEncoderConfig::ClipVision(c) = &self.image_encoder {
            if !self.image_size.is_multiple_of(c.patch_size) {
                return Err(format!(
                    "image_size {} is not a whole number of the ViT's {}-pixel patches",
                    self.image_size, c.patch_size
                ));
            }
        }
        if let Some(m) = self.image_mean.iter().find(|m| !m.is_finite() || **m < 0.0) {
            return Err(format!("image_mean holds {m}: a channel mean is a finite value ≥ 0"));
        }
        if let Some(s) = self.image_std.iter().find(|s| !s.is_finite() || **s <= 0.0) {
            return Err(format!("image_std holds {s}: a channel standard deviation is a finite value > 0"));
        }
        Ok(())
    }

    pub fn read(path: &std::path::Path) -> std::result::Result<Self, LoadError> {
        let cfg: Self = read_json(path)?;
        cfg.validate().map_err(|message| LoadError::Config { path: path.to_owned(), message })?;
        Ok(cfg)
    }
}

/// Renames that load a tower from its own checkpoint into a ContextCLIP: the model asks for
/// `image_encoder.conv1.weight`, a timm file holds `conv1.weight`; a CLIPModel file holds the ViT
/// under `vision_model.` and the text tower under `text_model.`.
pub fn tower_renames(cfg: &ContextClipConfig) -> RenameTable {
    let image = match cfg.image_encoder {
        ImageEncoderConfig::Resnet(_) => "",
        ImageEncoderConfig::ClipVision(_) => "vision_model.",
    };
    let text = match cfg.text_encoder {
        TextEncoderConfig::Bert(_) => "",
        TextEncoderConfig::ClipText(_) => "text_model.",
    };
    RenameTable { rules: vec![("image_encoder.".into(), image.into()), ("text_encoder.".into(), text.into())] }
}

/// The base code's `ProjectionHead`: `p = projection(x)`, `LayerNorm(p + dropout(fc(gelu(p))))`.
#[derive(Debug, Clone)]
pub struct ProjectionHead {
    pub projection: Linear,
    pub fc: Linear,
    pub layer_norm: LayerNorm,
    pub dropout: f64,
}

impl ProjectionHead {
    pub fn new(in_width: usize, cfg: &ContextClipConfig, vb: VarBuilder) -> Result<Self> {
        let p = cfg.projection_dim;
        Ok(Self {
            projection: linear(in_width, p, vb.pp("projection"))?,
            fc: linear(p, p, vb.pp("fc"))?,
            layer_norm: LayerNorm::new(p, 1e-5, vb.pp("layer_norm"))?,
            dropout: cfg.dropout,
        })
    }

    /// `[n, in]` → `[n, projection_dim]` (f32 when the model is in half precision); `dropout` = one
    /// seed per row in training (each row's mask is drawn from its seed, so a step replays
    /// exactly), `None` in evaluation.
    pub fn forward(&self, xs: &Tensor, dropout: Option<&[u64]>) -> Result<Tensor> {
        let projected = self.projection.forward(xs)?;
        let mut h = self.fc.forward(&ctxalign_nn::gelu(&projected)?)?;
        if let Some(seeds) = dropout {
            h = ctxalign_nn::dropout(&h, self.dropout, seeds)?;
        }
        let summed = (projected + h)?;
        match summed.dtype() {
            // Under mixed precision the LayerNorm runs, and returns, in f32 (as autocast's
            // `layer_norm`): the embeddings feed losses that scale them by 1/τ or 100, which would
            // amplify a final bf16 rounding (2⁻⁹ of each element) into loss differences of percents.
            DType::BF16 | DType::F16 => {
                let ln = &self.layer_norm;
                let f32 = |t: &Tensor| t.to_dtype(DType::F32);
                ctxalign_nn::layer_norm(&f32(&summed)?, &f32(&ln.weight)?, &f32(&ln.bias)?, ln.eps)
            }
            _ => self.layer_norm.forward(&summed),
        }
    }
}

/// The image tower, built from [`ImageEncoderConfig`].
#[derive(Debug, Clone)]
pub enum ImageEncoder {
    Resnet(ResNet),
    ClipVision(ClipVisionTransformer),
}

impl Module for ImageEncoder {
    /// `[batch, 3, H, W]` → `[batch, image_width]`.
    fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        match self {
            Self::Resnet(m) => m.forward(pixel_values),
            Self::ClipVision(m) => m.forward(pixel_values),
        }
    }
}

/// The text tower, built from [`TextEncoderConfig`].
#[derive(Debug, Clone)]
pub enum TextEncoder {
    Bert(BertModel),
    ClipText(ClipTextTransformer),
}

impl TextEncoder {
    /// `[batch, len]` ids and mask → `[batch, text_width]`.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor, pooling: TextPooling) -> Result<Tensor> {
        match (self, pooling) {
            (Self::Bert(m), TextPooling::Cls) => {
                first_token(&m.forward(input_ids, attention_mask, None)?.last_hidden_state)
            }
            (Self::Bert(m), TextPooling::Pooled) => match m.forward(input_ids, attention_mask, None)?.pooler_output {
                Some(p) => Ok(p),
                None => candle_core::bail!("text_pooling \"pooled\": this BERT has no pooler"),
            },
            (Self::ClipText(m), TextPooling::Cls) => {
                first_token(&m.forward_full(input_ids, attention_mask)?.last_hidden_state)
            }
            (Self::ClipText(m), TextPooling::Pooled) => m.forward(input_ids, attention_mask),
        }
    }
}

/// ContextCLIP's dual encoder.
#[derive(Debug, Clone)]
pub struct ContextClip {
    pub image_encoder: ImageEncoder,
    pub text_encoder: TextEncoder,
    pub image_projection: ProjectionHead,
    pub text_projection: ProjectionHead,
    pub config: ContextClipConfig,
}

/// Weights file of a saved ContextCLIP folder (next to [`CONFIG_FILE`] and [`TOKENIZER_FILE`]).
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The classification head a fine-tuned folder adds to its weights: `[classes, projection_dim]`,
/// one row per class of its `finetune.json`, applied as `100 · cos(image, row)` with unnormalised
/// rows.
pub const CLASSIFIER_KEY: &str = "classifier.weight";
/// The record of classification fine-tuning (its `report.classes` name the classifier's rows).
pub const FINETUNE_FILE: &str = "finetune.json";
pub const CONFIG_FILE: &str = "contextclip.json";
/// The text tower's tokenizer, carried by the folder.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// `contextclip.json`: what a ContextCLIP folder is — the model's settings and the checkpoints its
/// weights started from. The one definition of the file: every reader and writer goes through it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContextClipRecord {
    #[serde(flatten)]
    pub config: ContextClipConfig,
    /// The checkpoints training started from (a ContextCLIP checkpoint, tower checkpoints), each
    /// with its fingerprint; empty for a model trained from scratch; `None` in folders written
    /// before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initialized_from: Option<Vec<BaseModel>>,
}

impl ContextClipRecord {
    /// Reads and checks `dir/contextclip.json`; a folder without one gets an error that says what
    /// the folder is instead.
    pub fn read(dir: &std::path::Path) -> std::result::Result<Self, LoadError> {
        let path = dir.join(CONFIG_FILE);
        if !path.is_file() {
            let needs = "a ContextCLIP folder is needed (`ctxalign train-contextclip` writes one)";
            return Err(crate::artifact::wrong_folder(dir, CONFIG_FILE, needs));
        }
        let mut fields: serde_json::Map<String, serde_json::Value> = read_json(&path)?;
        let initialized_from = take_field(&path, &mut fields, "initialized_from")?;
        let config: ContextClipConfig = from_json_value(&path, "", serde_json::Value::Object(fields))?;
        config.validate().map_err(|message| LoadError::Config { path, message })?;
        Ok(Self { config, initialized_from })
    }

    /// The file's text.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a record serialises")
    }
}

impl ContextClipConfig {
    /// Rows of the text tower's token embedding table.
    pub fn text_vocab_size(&self) -> usize {
        match &self.text_encoder {
            TextEncoderConfig::Bert(c) => c.vocab_size,
            TextEncoderConfig::ClipText(c) => c.vocab_size,
        }
    }
}

impl ContextClip {
    /// The dtype of the weights, and so of the activations (inputs are cast to it by callers).
    pub fn dtype(&self) -> candle_core::DType {
        self.image_projection.layer_norm.weight.dtype()
    }

    pub fn new(cfg: &ContextClipConfig, vb: VarBuilder) -> Result<Self> {
        let image_encoder = match &cfg.image_encoder {
            ImageEncoderConfig::Resnet(c) => ImageEncoder::Resnet(ResNet::new(c, vb.pp("image_encoder"))?),
            ImageEncoderConfig::ClipVision(c) => {
                ImageEncoder::ClipVision(ClipVisionTransformer::new(c, vb.pp("image_encoder"))?)
            }
        };
        let text_encoder = match &cfg.text_encoder {
            TextEncoderConfig::Bert(c) => {
                // The pooler exists only when it is used: an unused layer would sit in the
                // optimiser without ever receiving a gradient.
                let c = BertConfig { add_pooling_layer: cfg.text_pooling == TextPooling::Pooled, ..c.clone() };
                TextEncoder::Bert(BertModel::new(&c, vb.pp("text_encoder"))?)
            }
            TextEncoderConfig::ClipText(c) => {
                TextEncoder::ClipText(ClipTextTransformer::new(c, vb.pp("text_encoder"))?)
            }
        };
        Ok(Self {
            image_encoder,
            text_encoder,
            image_projection: ProjectionHead::new(cfg.image_width(), cfg, vb.pp("image_projection"))?,
            text_projection: ProjectionHead::new(cfg.text_width(), cfg, vb.pp("text_projection"))?,
            config: cfg.clone(),
        })
    }

    /// Loads a saved folder (`contextclip.json` + `model.safetensors`).
    pub fn load(
        dir: &std::path::Path,
        dtype: DType,
        device: &candle_core::Device,
    ) -> std::result::Result<Self, LoadError> {
        Ok(Self::load_fingerprinted(dir, dtype, device)?.0)
    }

    /// As [`ContextClip::load`], with the folder's fingerprint (SHA-256 of `contextclip.json` and
    /// every byte of the weights, hashed as they were read: no second pass).
    pub fn load_fingerprinted(
        dir: &std::path::Path,
        dtype: DType,
        device: &candle_core::Device,
    ) -> std::result::Result<(Self, crate::artifact::BaseModel), LoadError> {
        let cfg = ContextClipRecord::read(dir)?.config;
        let (model, digests) = crate::loading::build_fingerprinted(
            &[dir.join(WEIGHTS_FILE)],
            RenameTable::identity(),
            &Self::allowed_unused(),
            dtype,
            device,
            |vb| Self::new(&cfg, vb),
        )?;
        let fingerprint = crate::artifact::BaseModel::from_config_digests(dir, &dir.join(CONFIG_FILE), &digests)?;
        Ok((model, fingerprint))
    }

    /// The keys of a saved ContextCLIP's weights that the model does not read; every other tensor
    /// must be read ([`LoadError::UnusedTensors`]).
    pub fn allowed_unused() -> AllowedUnused {
        AllowedUnused::none()
            .exact(
                "temperature",
                "the learned InfoNCE temperature, a training parameter (training reads it itself; embeddings do not use it)",
            )
            .exact(
                CLASSIFIER_KEY,
                "the classification head a fine-tuned folder adds (its rows are `finetune.json`'s classes); embeddings \
                 do not use it",
            )
    }

    /// What tower checkpoints may hold besides the towers `cfg` takes from them: the parts of the
    /// source model that are not the tower (CLIP's other tower and projections, classifiers,
    /// pre-training heads, a pooler the pooling does not use) as whole parts, and the source
    /// models' buffers. A part the towers read some of must be read whole.
    pub fn tower_allowed_unused(cfg: &ContextClipConfig) -> AllowedUnused {
        let clip_other = |other: &'static str| {
            crate::clip::ClipModel::allowed_unused()
                .part(other, "the CLIP checkpoint's other tower: ContextCLIP takes one tower from it")
                .part("visual_projection.", "CLIP's projections: ContextCLIP has its own projection heads")
                .part("text_projection.", "CLIP's projections: ContextCLIP has its own projection heads")
                .part("logit_scale", "CLIP's temperature: ContextCLIP's loss has its own")
        };
        let image = match cfg.image_encoder {
            ImageEncoderConfig::Resnet(_) => ResNet::allowed_unused(),
            ImageEncoderConfig::ClipVision(_) => clip_other("text_model."),
        };
        let text = match cfg.text_encoder {
            TextEncoderConfig::Bert(_) => BertModel::allowed_unused()
                .part("pooler.", "BERT's pooler, when the text pooling is the [CLS] state (the pooler is not built)")
                .part(
                    "bert.pooler.",
                    "BERT's pooler, when the text pooling is the [CLS] state (the pooler is not built)",
                ),
            TextEncoderConfig::ClipText(_) => clip_other("vision_model."),
        };
        image.and(text)
    }

    /// Saves a ContextCLIP folder: `tensors` as `model.safetensors`, the text tower's tokenizer
    /// (`tokenizer_json`), then `record` as `contextclip.json`, each atomically.
    pub fn save(
        dir: &std::path::Path,
        record: &ContextClipRecord,
        tensors: &std::collections::BTreeMap<String, Tensor>,
        tokenizer_json: &[u8],
    ) -> std::result::Result<(), LoadError> {
        record.config.validate().map_err(|message| LoadError::Config { path: dir.join(CONFIG_FILE), message })?;
        crate::artifact::write_tensors(dir, WEIGHTS_FILE, tensors)?;
        crate::artifact::write_file(dir, TOKENIZER_FILE, tokenizer_json)?;
        crate::artifact::write_file(dir, CONFIG_FILE, record.to_json().as_bytes())
    }

    /// Image embeddings `[batch, projection_dim]` (not normalised: the base code compares dot
    /// products). `dropout`: one seed per image in training, as [`ProjectionHead::forward`].
    pub fn encode_images(&self, pixel_values: &Tensor, dropout: Option<&[u64]>) -> Result<Tensor> {
        self.image_projection.forward(&self.image_encoder.forward(pixel_values)?, dropout)
    }

    /// Text embeddings `[batch, projection_dim]`.
    pub fn encode_texts(&self, input_ids: &Tensor, attention_mask: &Tensor, dropout: Option<&[u64]>) -> Result<Tensor> {
        let features = self.text_encoder.forward(input_ids, attention_mask, self.config.text_pooling)?;
        // A different stream for the text head than for the image head.
        let seeds: Option<Vec<u64>> = dropout.map(|s| s.iter().map(|s| s ^ 0x5445_5854).collect());
        self.text_projection.forward(&features, seeds.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_older_folders_still_read() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let e = ContextClipRecord::read(dir).unwrap_err().to_string();
        assert!(e.contains("ContextCLIP folder is needed"), "{e}");
        let base = BaseModel { source: "/runs/a/model.safetensors".into(), fingerprint: "0123456789abcdef".into() };
        let record = ContextClipRecord { config: ContextClipConfig::small(32), initialized_from: Some(vec![base]) };
        std::fs::write(dir.join(CONFIG_FILE), record.to_json()).unwrap();
        assert_eq!(ContextClipRecord::read(dir).unwrap(), record);
        // A folder from before provenance was recorded: the settings alone.
        std::fs::write(dir.join(CONFIG_FILE), serde_json::to_string(&record.config).unwrap()).unwrap();
        let old = ContextClipRecord::read(dir).unwrap();
        assert_eq!((old.config, old.initialized_from), (record.config.clone(), None));
        // A malformed value is named by its path; settings that cannot build a model name the file.
        std::fs::write(
            dir.join(CONFIG_FILE),
            r#"{"image_encoder": {"type": "resnet", "layers": "x"}, "image_size": 32}"#,
        )
        .unwrap();
        let e = ContextClipRecord::read(dir).unwrap_err().to_string();
        assert!(e.contains("contextclip.json") && e.contains("image_encoder"), "{e}");
        let bad = ContextClipRecord {
            config: ContextClipConfig { projection_dim: 0, ..record.config.clone() },
            ..record.clone()
        };
        std::fs::write(dir.join(CONFIG_FILE), bad.to_json()).unwrap();
        let e = ContextClipRecord::read(dir).unwrap_err().to_string();
        assert!(e.contains("contextclip.json") && e.contains("projection_dim"), "{e}");
        // The image processor's settings are checked with the rest (a size of 0 would panic at
        // the first image; a size the ViT's 8-pixel patches do not tile would fail at the first
        // forward pass).
        for (config, key) in [
            (ContextClipConfig { image_size: 0, ..record.config.clone() }, "image_size"),
            (ContextClipConfig { image_size: 36, ..record.config.clone() }, "patches"),
            (ContextClipConfig { image_mean: [0.5, f32::NAN, 0.5], ..record.config.clone() }, "image_mean"),
            (ContextClipConfig { image_std: [0.5, 0.0, 0.5], ..record.config.clone() }, "image_std"),
            (ContextClipConfig { image_std: [0.5, -1.0, 0.5], ..record.config.clone() }, "image_std"),
        ] {
            let e = config.validate().unwrap_err();
            assert!(e.contains(key), "{key}: {e}");
        }
    }
}

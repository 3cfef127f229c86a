//! BERT (HF `BertModel`): embeddings with token types, a post-LN encoder, the tanh pooler.
//!
//! The encoder layers are BLIP's text layers with cross-attention switched off — the key names
//! (`encoder.layer.N.attention.self.query`, …) and the computation are BERT's own — so BERT and
//! BLIP share one gradient-keeping implementation.

use candle_core::{bail, DType, Device, Module, Result, Tensor};
use candle_nn::{embedding, Embedding, VarBuilder};
use ctxalign_nn::{first_token, linear, LayerNorm, Linear};
use serde::{Deserialize, Serialize};

use crate::blip::config::BertLayerConfig;
use crate::blip::text::{additive_mask, BlipTextLayer};
use crate::loading::{build_from_safetensors, read_json, AllowedUnused, LoadError, ModelFiles, RenameTable};
use crate::HiddenAct;

/// HF `BertConfig` (`config.json`). Missing fields take HF's class defaults, which are
/// bert-base-uncased's; fields that do not change inference (dropouts, `architectures`) are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    /// Vocabulary size (30522 for bert-base-uncased).
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    /// Token width (768).
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    /// Number of encoder layers (12).
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    /// Attention heads (12); must divide `hidden_size`.
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    /// FFN width (3072).
    #[serde(default = "d_intermediate")]
    pub intermediate_size: usize,
    /// FFN activation (`"gelu"`, exact, in BERT checkpoints).
    #[serde(default = "d_act")]
    pub hidden_act: HiddenAct,
    /// Number of absolute position embeddings (512).
    #[serde(default = "d_positions")]
    pub max_position_embeddings: usize,
    /// Number of token types (2: sentence A / B).
    #[serde(default = "d_types")]
    pub type_vocab_size: usize,
    /// LayerNorm eps (1e-12).
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    /// `[PAD]` id (0).
    #[serde(default)]
    pub pad_token_id: u32,
    /// Whether the checkpoint has the `pooler.dense` layer. Not part of HF's `config.json` (it is
    /// `BertModel(add_pooling_layer=…)`): true for `bert-base-*`, false for encoders saved without it
    /// (sentence-transformers).
    #[serde(default = "d_true")]
    pub add_pooling_layer: bool,
}

fn d_vocab() -> usize {
    30522
}
fn d_hidden() -> usize {
    768
}
fn d_layers() -> usize {
    12
}
fn d_heads() -> usize {
    12
}
fn d_intermediate() -> usize {
    3072
}
fn d_act() -> HiddenAct {
    HiddenAct::Gelu
}
fn d_positions() -> usize {
    512
}
fn d_types() -> usize {
    2
}
fn d_eps() -> f64 {
    1e-12
}
fn d_true() -> bool {
    true
}

impl Default for BertConfig {
    /// bert-base-uncased.
    fn default() -> Self {
        Self::base_uncased()
    }
}

impl BertConfig {
    /// `bert-base-uncased`: 12 layers, width 768, 12 heads.
    pub fn base_uncased() -> Self {
        serde_json::from_str("{}").expect("all fields have defaults")
    }

    /// A small BERT for CPU training (`layers` × width `hidden`, 4 heads, FFN 4×), with
    /// bert-base-uncased's vocabulary.
    pub fn small(hidden_size: usize, num_hidden_layers: usize, max_position_embeddings: usize) -> Self {
        Self {
            hidden_size,
            num_hidden_layers,
            num_attention_heads: 4,
            intermediate_size: 4 * hidden_size,
            max_position_embeddings,
            ..Self::base_uncased()
        }
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !(self.layer_norm_eps > 0.0 && self.layer_norm_eps < 1e-2) {
            return Err(format!("layer_norm_eps {} is not a small positive number", self.layer_norm_eps));
        }
        Ok(())
    }

    pub fn read(path: &std::path::Path) -> std::result::Result<Self, LoadError> {
        let cfg: Self = read_json(path)?;
        cfg.validate().map_err(|message| LoadError::Config { path: path.to_owned(), message })?;
        Ok(cfg)
    }

    /// The settings of one encoder layer, in the form BLIP's text layer takes.
    fn layer_config(&self) -> BertLayerConfig {
        BertLayerConfig {
            hidden_size: self.hidden_size,
            num_attention_heads: self.num_attention_heads,
            intermediate_size: self.intermediate_size,
            layer_norm_eps: self.layer_norm_eps,
            hidden_act: self.hidden_act,
            cross_attention_width: None,
        }
    }
}

/// Word + position + token-type embeddings, then LayerNorm (`embeddings`).
#[derive(Debug, Clone)]
pub struct BertEmbeddings {
    pub word_embeddings: Embedding,
    pub position_embeddings: Embedding,
    pub token_type_embeddings: Embedding,
    pub layer_norm: LayerNorm,
    pub max_positions: usize,
}

impl BertEmbeddings {
    pub fn new(cfg: &BertConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            word_embeddings: embedding(cfg.vocab_size, d, vb.pp("word_embeddings"))?,
            position_embeddings: embedding(cfg.max_position_embeddings, d, vb.pp("position_embeddings"))?,
            token_type_embeddings: embedding(cfg.type_vocab_size, d, vb.pp("token_type_embeddings"))?,
            layer_norm: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("LayerNorm"))?,
            max_positions: cfg.max_position_embeddings,
        })
    }

    /// `[batch, len]` ids (and token types, 0 when `None`) → `[batch, len, d]`.
    pub fn forward(&self, input_ids: &Tensor, token_type_ids: Option<&Tensor>) -> Result<Tensor> {
        let len = input_ids.dim(1)?;
        if len > self.max_positions {
            bail!("text of {len} tokens exceeds max_position_embeddings {}", self.max_positions)
        }
        let positions = Tensor::arange(0u32, len as u32, input_ids.device())?;
        let types = match token_type_ids {
            Some(t) => self.token_type_embeddings.forward(t)?,
            None => {
                let zero = Tensor::zeros(1, DType::U32, input_ids.device())?;
                self.token_type_embeddings.forward(&zero)?
            }
        };
        let words = self.word_embeddings.forward(input_ids)?;
        let sum = words.broadcast_add(&self.position_embeddings.forward(&positions)?)?.broadcast_add(&types)?;
        self.layer_norm.forward(&sum)
    }
}

/// Output of [`BertModel::forward`].
#[derive(Debug, Clone)]
pub struct BertOutput {
    /// `[batch, len, d]`
    pub last_hidden_state: Tensor,
    /// `tanh(dense(h[:, 0]))` `[batch, d]`, when the model has a pooler.
    pub pooler_output: Option<Tensor>,
}

/// HF `BertModel`.
#[derive(Debug, Clone)]
pub struct BertModel {
    pub embeddings: BertEmbeddings,
    pub layers: Vec<BlipTextLayer>,
    pub pooler: Option<Linear>,
    pub config: BertConfig,
}

impl BertModel {
    pub fn new(cfg: &BertConfig, vb: VarBuilder) -> Result<Self> {
        let layer_cfg = cfg.layer_config();
        let vl = vb.pp("encoder").pp("layer");
        let layers =
            (0..cfg.num_hidden_layers).map(|i| BlipTextLayer::new(&layer_cfg, vl.pp(i))).collect::<Result<_>>()?;
        let pooler = cfg
            .add_pooling_layer
            .then(|| linear(cfg.hidden_size, cfg.hidden_size, vb.pp("pooler").pp("dense")))
            .transpose()?;
        Ok(Self { embeddings: BertEmbeddings::new(cfg, vb.pp("embeddings"))?, layers, pooler, config: cfg.clone() })
    }

    /// Loads an HF `BertModel` folder (`config.json` + safetensors). Task checkpoints
    /// (`bert-base-uncased` is a `BertForPreTraining`) keep the encoder under `bert.`; that prefix is
    /// found and read through. A checkpoint without `pooler.dense.*` loads without the pooler.
    pub fn load(files: &ModelFiles, dtype: DType, device: &Device) -> std::result::Result<Self, LoadError> {
        let mut cfg = BertConfig::read(&files.config)?;
        let probe = crate::loading::CheckedSafetensors::open(&files.weights, RenameTable::identity())?;
        let prefix = Self::checkpoint_prefix(probe.keys());
        cfg.add_pooling_layer = probe.keys().any(|k| *k == format!("{prefix}pooler.dense.weight"));
        let renames = RenameTable { rules: vec![(String::new(), prefix.to_string())] };
        build_from_safetensors(&files.weights, renames, &Self::allowed_unused(), dtype, device, |vb| {
            Self::new(&cfg, vb)
        })
    }

    /// The keys of a BERT checkpoint that `BertModel` does not read; every other tensor must be
    /// read ([`LoadError::UnusedTensors`]).
    pub fn allowed_unused() -> AllowedUnused {
        AllowedUnused::none()
            .suffix("embeddings.position_ids", "HF's position-index buffer (0, 1, 2, …), saved by older transformers")
            .part("cls.", "the pre-training heads of task checkpoints (`BertForPreTraining`: MLM and NSP)")
    }

    /// `"bert."` when a checkpoint's keys hold the encoder under that prefix, else `""`.
    pub fn checkpoint_prefix<'a>(mut keys: impl Iterator<Item = &'a String>) -> &'static str {
        if keys.any(|k| k.starts_with("bert.embeddings.")) {
            "bert."
        } else {
            ""
        }
    }

    /// `input_ids` / `attention_mask` `[batch, len]` (mask 1 = token, 0 = padding).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        token_type_ids: Option<&Tensor>,
    ) -> Result<BertOutput> {
        let mut hidden = self.embeddings.forward(input_ids, token_type_ids)?;
        let mask = additive_mask(attention_mask, hidden.dtype())?;
        for layer in &self.layers {
            hidden = layer.forward(&hidden, Some(&mask), None, false)?.0;
        }
        let pooler_output = match &self.pooler {
            Some(dense) => Some(dense.forward(&first_token(&hidden)?)?.tanh()?),
            None => None,
        };
        Ok(BertOutput { last_hidden_state: hidden, pooler_output })
    }
}

//! BLIP's text tower: BERT with cross-attention in every layer ("MED", HF `BlipTextModel`).
//!
//! Two modes share the weights: text-only (ITC; cross-attention skipped) and multimodal (ITM;
//! every layer reads the image tokens). Image-side keys and values are projected once per image
//! into an [`ImageMemory`] and reused for every text scored against it.

use candle_core::{bail, DType, Module, Result, Tensor, D};
use candle_nn::{embedding, Embedding, VarBuilder};
use ctxalign_nn::{linear, merge_heads, scaled_dot_product_attention, LayerNorm, Linear};

use super::config::{BertLayerConfig, BlipTextConfig};
use crate::HiddenAct;

/// Value added to the scores of masked positions, as BLIP's `(1 - mask) * -10000`.
const MASKED: f64 = -10000.0;

/// `[batch, len]` 1/0 mask → additive `[batch, 1, 1, len]` mask in `dtype`.
pub fn additive_mask(mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let (b, len) = mask.dims2()?;
    let keep = mask.to_dtype(dtype)?;
    ((1.0 - keep)? * MASKED)?.reshape((b, 1, 1, len))
}

/// Word + absolute position embeddings, then LayerNorm (no token types).
#[derive(Debug, Clone)]
pub struct BlipTextEmbeddings {
    pub word_embeddings: Embedding,
    pub position_embeddings: Embedding,
    pub layer_norm: LayerNorm,
    pub max_positions: usize,
}

impl BlipTextEmbeddings {
    pub fn new(cfg: &BlipTextConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            word_embeddings: embedding(cfg.vocab_size, cfg.hidden_size, vb.pp("word_embeddings"))?,
            position_embeddings: embedding(cfg.max_position_embeddings, cfg.hidden_size, vb.pp("position_embeddings"))?,
            layer_norm: LayerNorm::new(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("LayerNorm"))?,
            max_positions: cfg.max_position_embeddings,
        })
    }
}

impl Module for BlipTextEmbeddings {
    /// `[batch, len]` token ids → `[batch, len, d]`.
    fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (_, len) = input_ids.dims2()?;
        if len > self.max_positions {
            bail!("text of {len} tokens exceeds max_position_embeddings {}", self.max_positions)
        }
        let positions = Tensor::arange(0u32, len as u32, input_ids.device())?;
        let words = self.word_embeddings.forward(input_ids)?;
        let pos = self.position_embeddings.forward(&positions)?;
        self.layer_norm.forward(&words.broadcast_add(&pos)?)
    }
}

/// Query/key/value projections of one attention block (`…attention.self` / `…crossattention.self`).
#[derive(Debug, Clone)]
pub struct BlipTextSelfAttention {
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    pub num_heads: usize,
    pub head_dim: usize,
}

impl BlipTextSelfAttention {
    /// `kv_width` is the text width for self-attention, the image width for cross-attention.
    pub fn new(cfg: &BertLayerConfig, kv_width: usize, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            query: linear(d, d, vb.pp("query"))?,
            key: linear(kv_width, d, vb.pp("key"))?,
            value: linear(kv_width, d, vb.pp("value"))?,
            num_heads: cfg.num_attention_heads,
            head_dim: d / cfg.num_attention_heads,
        })
    }

    /// Projected keys and values of `states`, split into heads (`[batch, heads, len, head_dim]`).
    pub fn keys_values(&self, states: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((self.key.forward_heads(states, self.num_heads)?, self.value.forward_heads(states, self.num_heads)?))
    }

    /// Attention of `hidden` over precomputed keys/values; returns the merged context
    /// `[batch, len, d]` and, when `want_probs`, the probabilities `[batch, heads, len, keys]`.
    pub fn attend(
        &self,
        hidden: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        mask: Option<&Tensor>,
        want_probs: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let q = self.query.forward_heads(hidden, self.num_heads)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let out = scaled_dot_product_attention(&q, keys, values, mask, scale, want_probs)?;
        Ok((merge_heads(&out.context)?, out.probs))
    }
}

/// `LayerNorm(dense(x) + residual)` (`…attention.output`, `…output`).
#[derive(Debug, Clone)]
pub struct BlipTextResidualOutput {
    pub dense: Linear,
    pub layer_norm: LayerNorm,
}

impl BlipTextResidualOutput {
    pub fn new(in_width: usize, cfg: &BertLayerConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            dense: linear(in_width, cfg.hidden_size, vb.pp("dense"))?,
            layer_norm: LayerNorm::new(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("LayerNorm"))?,
        })
    }

    pub fn forward(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.layer_norm.forward(&self.dense.forward(xs)?.broadcast_add(residual)?)
    }
}

/// One attention block: projections + residual output.
#[derive(Debug, Clone)]
pub struct BlipTextAttention {
    pub self_: BlipTextSelfAttention,
    pub output: BlipTextResidualOutput,
}

impl BlipTextAttention {
    pub fn new(cfg: &BertLayerConfig, kv_width: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            self_: BlipTextSelfAttention::new(cfg, kv_width, vb.pp("self"))?,
            output: BlipTextResidualOutput::new(cfg.hidden_size, cfg, vb.pp("output"))?,
        })
    }
}

/// Image tokens prepared for cross-attention: per layer, keys and values `[images, heads, tokens,
/// head_dim]`, plus the additive image-token mask. Built once per image set by
/// [`BlipTextModel::image_memory`].
#[derive(Debug, Clone)]
pub struct ImageMemory {
    pub keys_values: Vec<(Tensor, Tensor)>,
    /// `[images, 1, 1, tokens]`, or `None` when every image token is attended.
    pub mask: Option<Tensor>,
    pub num_images: usize,
}

impl ImageMemory {
    /// The memory of image `i` alone (batch 1).
    pub fn select(&self, i: usize) -> Result<Self> {
        self.gather(&Tensor::new(&[i as u32], self.keys_values[0].0.device())?)
    }

    /// The images of several memories, in order (as if one memory had been built for all).
    pub fn cat(parts: &[&ImageMemory]) -> Result<Self> {
        let Some(first) = parts.first() else { bail!("no image memory to concatenate") };
        let layers = first.keys_values.len();
        let keys_values = (0..layers)
            .map(|l| {
                let keys: Vec<&Tensor> = parts.iter().map(|p| &p.keys_values[l].0).collect();
                let values: Vec<&Tensor> = parts.iter().map(|p| &p.keys_values[l].1).collect();
                Ok((Tensor::cat(&keys, 0)?, Tensor::cat(&values, 0)?))
            })
            .collect::<Result<Vec<_>>>()?;
        let masks: Option<Vec<&Tensor>> = parts.iter().map(|p| p.mask.as_ref()).collect();
        let mask = match masks {
            Some(m) => Some(Tensor::cat(&m, 0)?),
            None if parts.iter().all(|p| p.mask.is_none()) => None,
            None => bail!("concatenating image memories with and without a token mask"),
        };
        Ok(Self { keys_values, mask, num_images: parts.iter().map(|p| p.num_images).sum() })
    }

    /// The memory of the images at `indices` (`[n]`, u32), in that order.
    pub fn gather(&self, indices: &Tensor) -> Result<Self> {
        let pick = |t: &Tensor| t.index_select(indices, 0);
        Ok(Self {
            keys_values: self.keys_values.iter().map(|(k, v)| Ok((pick(k)?, pick(v)?))).collect::<Result<_>>()?,
            mask: self.mask.as_ref().map(pick).transpose()?,
            num_images: indices.dim(0)?,
        })
    }
}

/// Self-attention → cross-attention (multimodal mode only) → FFN, all post-LN.
#[derive(Debug, Clone)]
pub struct BlipTextLayer {
    pub attention: BlipTextAttention,
    /// Present when `add_cross_attention` (always in BLIP's text encoder).
    pub crossattention: Option<BlipTextAttention>,
    pub intermediate: Linear,
    /// The FFN's activation (`hidden_act`).
    pub activation: HiddenAct,
    pub output: BlipTextResidualOutput,
}

impl BlipTextLayer {
    pub fn new(cfg: &BertLayerConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            attention: BlipTextAttention::new(cfg, cfg.hidden_size, vb.pp("attention"))?,
            crossattention: cfg
                .cross_attention_width
                .map(|width| BlipTextAttention::new(cfg, width, vb.pp("crossattention")))
                .transpose()?,
            intermediate: linear(cfg.hidden_size, cfg.intermediate_size, vb.pp("intermediate").pp("dense"))?,
            activation: cfg.hidden_act,
            output: BlipTextResidualOutput::new(cfg.intermediate_size, cfg, vb.pp("output"))?,
        })
    }

    /// `hidden` `[batch, len, d]`; `image` = this layer's keys/values and the image mask. Returns
    /// the output and, when `want_cross_probs` (and `image` is given), the cross-attention
    /// probabilities.
    ///
    /// When the text batch is 1 and the image batch N, self-attention runs once and the
    /// cross-attention broadcasts it over the N images; the output then has batch N.
    pub fn forward(
        &self,
        hidden: &Tensor,
        text_mask: Option<&Tensor>,
        image: Option<(&(Tensor, Tensor), Option<&Tensor>)>,
        want_cross_probs: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (k, v) = self.attention.self_.keys_values(hidden)?;
        let (ctx, _) = self.attention.self_.attend(hidden, &k, &v, text_mask, false)?;
        let mut hidden = self.attention.output.forward(&ctx, hidden)?;
        let mut cross_probs = None;
        if let Some(((k, v), image_mask)) = image {
            let Some(cross) = &self.crossattention else {
                bail!("this layer has no cross-attention (add_cross_attention is false)")
            };
            let (ctx, probs) = cross.self_.attend(&hidden, k, v, image_mask, want_cross_probs)?;
            // `ctx` has the larger batch of (text, images); the residual broadcasts.
            hidden = cross.output.forward(&ctx, &hidden)?;
            cross_probs = probs;
        }
        let ffn = self.activation.forward(&self.intermediate.forward(&hidden)?)?;
        Ok((self.output.forward(&ffn, &hidden)?, cross_probs))
    }
}

/// Output of one text pass.
#[derive(Debug, Clone)]
pub struct BlipTextOutput {
    /// `[batch, len, d]`; batch is max(text batch, image batch) in multimodal mode.
    pub last_hidden_state: Tensor,
    /// Per layer `[batch, heads, len, image tokens]`; empty unless requested in multimodal mode.
    pub cross_attentions: Vec<Tensor>,
}

/// The text tower (`text_encoder`).
#[derive(Debug, Clone)]
pub struct BlipTextModel {
    pub embeddings: BlipTextEmbeddings,
    pub layers: Vec<BlipTextLayer>,
    pub config: BlipTextConfig,
}

impl BlipTextModel {
    pub fn new(cfg: &BlipTextConfig, vb: VarBuilder) -> Result<Self> {
        let embeddings = BlipTextEmbeddings::new(cfg, vb.pp("embeddings"))?;
        let vl = vb.pp("encoder").pp("layer");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| BlipTextLayer::new(&cfg.layer(), vl.pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { embeddings, layers, config: cfg.clone() })
    }

    /// Projects image tokens `[images, tokens, d_img]` into every layer's cross-attention keys and
    /// values. `image_mask` `[images, tokens]` (1 = attend) restricts the tokens each image offers.
    pub fn image_memory(&self, image_embeds: &Tensor, image_mask: Option<&Tensor>) -> Result<ImageMemory> {
        let num_images = image_embeds.dim(0)?;
        let dtype = image_embeds.dtype();
        let keys_values = self
            .layers
            .iter()
            .map(|l| match &l.crossattention {
                Some(cross) => cross.self_.keys_values(image_embeds),
                None => bail!("the text model has no cross-attention layers (add_cross_attention is false)"),
            })
            .collect::<Result<Vec<_>>>()?;
        let mask = image_mask.map(|m| additive_mask(m, dtype)).transpose()?;
        Ok(ImageMemory { keys_values, mask, num_images })
    }

    /// Encodes `input_ids` `[batch, len]` with `attention_mask` `[batch, len]` (1 = token, 0 = pad).
    ///
    /// `image = None`: text-only mode. `image = Some(memory)`: multimodal mode; text and image batches
    /// must be equal, or one of them 1 (shared across the other).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        image: Option<&ImageMemory>,
        output_cross_attentions: bool,
    ) -> Result<BlipTextOutput> {
        let text_batch = input_ids.dim(0)?;
        if let Some(mem) = image {
            if text_batch != mem.num_images && text_batch != 1 && mem.num_images != 1 {
                bail!("text batch {text_batch} and image batch {} must match, or one be 1", mem.num_images)
            }
        }
        let mut hidden = self.embeddings.forward(input_ids)?;
        let mask = additive_mask(attention_mask, hidden.dtype())?;
        let mut cross_attentions = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let image_kv = image.map(|m| (&m.keys_values[i], m.mask.as_ref()));
            // After the first cross-attention the hidden batch may have grown to the image batch:
            // the text mask broadcasts over it.
            let (h, probs) = layer.forward(&hidden, Some(&mask), image_kv, output_cross_attentions)?;
            hidden = h;
            if output_cross_attentions {
                cross_attentions.extend(probs);
            }
        }
        Ok(BlipTextOutput { last_hidden_state: hidden, cross_attentions })
    }
}

/// Mean of cross-attention probabilities over layers and heads, image CLS column dropped:
/// `[batch, text tokens, patches]` — ContextBLIP's text-guided mask scores.
pub fn mean_cross_attention(cross_attentions: &[Tensor]) -> Result<Tensor> {
    if cross_attentions.is_empty() {
        bail!("no cross-attention probabilities (run the text model in multimodal mode with output_cross_attentions)")
    }
    let stacked = Tensor::stack(cross_attentions, 0)?; // [layers, batch, heads, len, tokens]
    let mean = stacked.mean(0)?.mean(1)?; // [batch, len, tokens]
    let tokens = mean.dim(D::Minus1)?;
    mean.narrow(D::Minus1, 1, tokens - 1)
}

//! CLIP's text tower (HF `CLIPTextTransformer`, keys under `text_model.`).

use candle_core::{bail, DType, Module, Result, Tensor};
use candle_nn::{embedding, Embedding, VarBuilder};
use ctxalign_nn::LayerNorm;

use super::config::ClipTextConfig;
use super::encoder::{encoder_layers, ClipEncoderLayer, EncoderDims};

/// Added to the scores of positions a token may not attend to.
const MASKED: f32 = -1e9;

/// Token + position embeddings (`embeddings`).
#[derive(Debug, Clone)]
pub struct ClipTextEmbeddings {
    pub token_embedding: Embedding,
    pub position_embedding: Embedding,
    pub max_positions: usize,
}

/// Output of one text pass.
#[derive(Debug, Clone)]
pub struct ClipTextOutput {
    /// After `final_layer_norm`: `[batch, len, d]`.
    pub last_hidden_state: Tensor,
    /// The end-of-text token's state `[batch, d]`.
    pub pooler_output: Tensor,
}

/// `text_model`.
#[derive(Debug, Clone)]
pub struct ClipTextTransformer {
    pub embeddings: ClipTextEmbeddings,
    pub layers: Vec<ClipEncoderLayer>,
    pub final_layer_norm: LayerNorm,
    pub config: ClipTextConfig,
}

impl ClipTextTransformer {
    pub fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let dims = EncoderDims::new(
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_attention_heads,
            cfg.layer_norm_eps,
            cfg.hidden_act,
        );
        let ve = vb.pp("embeddings");
        let embeddings = ClipTextEmbeddings {
            token_embedding: embedding(cfg.vocab_size, cfg.hidden_size, ve.pp("token_embedding"))?,
            position_embedding: embedding(cfg.max_position_embeddings, cfg.hidden_size, ve.pp("position_embedding"))?,
            max_positions: cfg.max_position_embeddings,
        };
        Ok(Self {
            embeddings,
            layers: encoder_layers(&dims, cfg.num_hidden_layers, vb.clone())?,
            final_layer_norm: LayerNorm::new(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("final_layer_norm"))?,
            config: cfg.clone(),
        })
    }

    /// Causal mask plus key padding: `[batch, 1, len, len]`, 0 where attending is allowed. Built
    /// on the ids' device (no round trip through the host).
    fn attention_mask(attention_mask: &Tensor, dtype: DType) -> Result<Tensor> {
        let (b, len) = attention_mask.dims2()?;
        let positions = Tensor::arange(0u32, len as u32, attention_mask.device())?;
        // [len, len]: key j after query i.
        let future = positions.unsqueeze(0)?.broadcast_gt(&positions.unsqueeze(1)?)?.to_dtype(DType::F32)?;
        // [b, 1, 1, len]: padded keys.
        let padded = attention_mask.to_dtype(DType::F32)?.affine(-1.0, 1.0)?.reshape((b, 1, 1, len))?;
        let blocked = padded.broadcast_add(&future.reshape((1, 1, len, len))?)?.clamp(0.0, 1.0)?;
        (blocked * MASKED as f64)?.to_dtype(dtype)
    }

    /// Row index of each sequence's pooled token (HF's rule, see [`ClipTextConfig::eos_token_id`]).
    pub fn pooled_positions(&self, input_ids: &Tensor) -> Result<Vec<u32>> {
        let ids: Vec<Vec<u32>> = input_ids.to_dtype(DType::U32)?.to_vec2()?;
        let eos = self.config.eos_token_id;
        ids.iter()
            .map(|row| {
                let pos = if eos == 2 {
                    // argmax, first occurrence on ties, as torch.
                    let max = row.iter().copied().max().unwrap_or(0);
                    row.iter().position(|&t| t == max)
                } else {
                    row.iter().position(|&t| t == eos)
                };
                match pos {
                    Some(p) => Ok(p as u32),
                    None if eos == 2 => Ok(0),
                    None => bail!("a text has no end-of-text token {eos}; tokenize with the model's tokenizer"),
                }
            })
            .collect()
    }

    /// `input_ids` / `attention_mask` `[batch, len]`.
    pub fn forward_full(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<ClipTextOutput> {
        let (b, len) = input_ids.dims2()?;
        if len > self.embeddings.max_positions {
            bail!("text of {len} tokens exceeds max_position_embeddings {}", self.embeddings.max_positions)
        }
        let positions = Tensor::arange(0u32, len as u32, input_ids.device())?;
        let mut xs = self
            .embeddings
            .token_embedding
            .forward(input_ids)?
            .broadcast_add(&self.embeddings.position_embedding.forward(&positions)?)?;
        let mask = Self::attention_mask(attention_mask, xs.dtype())?;
        for layer in &self.layers {
            xs = layer.forward(&xs, Some(&mask))?;
        }
        let last_hidden_state = self.final_layer_norm.forward(&xs)?;
        let flat_index: Vec<u32> =
            self.pooled_positions(input_ids)?.iter().enumerate().map(|(s, &p)| s as u32 * len as u32 + p).collect();
        let index = Tensor::new(flat_index.as_slice(), input_ids.device())?;
        let d = last_hidden_state.dim(2)?;
        let pooler_output = last_hidden_state.reshape((b * len, d))?.index_select(&index, 0)?;
        Ok(ClipTextOutput { last_hidden_state, pooler_output })
    }

    /// The pooled output alone `[batch, d]`.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        Ok(self.forward_full(input_ids, attention_mask)?.pooler_output)
    }
}

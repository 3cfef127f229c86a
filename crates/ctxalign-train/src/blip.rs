//! BLIP's retrieval objective (`blip_retrieval.py`): image-text contrastive loss with a learned
//! temperature, plus image-text matching on hard negatives drawn from the contrastive similarities.
//!
//! In-batch only: BLIP's momentum encoder and feature queue (a large-batch device for 14M-image
//! pre-training) are not part of this objective; the ITC targets still treat captions of the same
//! image as positives, as BLIP's `idx`-based targets do.

use candle_core::{DType, Device, IndexOp, Module, Tensor, Var};
use ctxalign_data::loader::{stack_pixels, Batch, CaptionSample};
use ctxalign_data::rng::Rng;
use ctxalign_data::text::TokenizedBatch;
use ctxalign_data::TextTokenizer;
use ctxalign_models::blip::{l2_normalize, BlipItm, ImageMemory, ItmOutput};
use ctxalign_nn::first_token;
use ctxalign_nn::losses::{identity_targets, itc_loss, itm_loss, sample_hard_negatives, ItcLoss};

use crate::error::Result;
use crate::precision::master_dtype;
use crate::trainer::{LossTerms, Objective};

/// BLIP clamps its temperature to this range before every step.
pub const TEMPERATURE_RANGE: (f64, f64) = (0.001, 0.5);
/// BLIP's initial temperature.
pub const INITIAL_TEMPERATURE: f64 = 0.07;
/// Checkpoint name of the temperature (BLIP's `temp`); not part of HF's retrieval model.
pub const TEMPERATURE_KEY: &str = "temp";

/// One micro-batch's losses and what was drawn.
#[derive(Debug, Clone)]
pub struct BlipLosses {
    pub itc: ItcLoss,
    pub itm: Tensor,
    /// `(text → negative image, image → negative text)` per sample; `None` when the batch held
    /// nothing but the sample's own image.
    pub negatives: Vec<(Option<usize>, Option<usize>)>,
}

/// The ITC + ITM objective for a [`BlipItm`] under training.
pub struct BlipRetrievalObjective {
    pub model: BlipItm,
    pub temperature: Var,
    pub tokenizer: TextTokenizer,
    pub enc_token_id: u32,
    pub device: Device,
    pub seed: u64,
    /// Train ITM too (BLIP). `false` trains ITC alone and skips the ITM passes: a warm-up for a
    /// model from scratch, whose random ITC similarities would make every "hard" negative random.
    pub with_itm: bool,
}

impl BlipRetrievalObjective {
    pub fn new(model: BlipItm, tokenizer: TextTokenizer, temperature: Var, seed: u64) -> Result<Self> {
        let t = &model.config.text_config;
        let enc_token_id = tokenizer
            .blip_enc_token_id(t.bos_token_id, t.vocab_size)
            .map_err(|e| crate::TrainError::Config(e.to_string()))?;
        let device = temperature.device().clone();
        Ok(Self { model, temperature, tokenizer, enc_token_id, device, seed, with_itm: true })
    }

    /// BLIP's `self.temp.clamp_(0.001, 0.5)`, done in place before the forward pass.
    pub fn clamp_temperature(&self) -> Result<()> {
        let clamped = self.temperature.as_tensor().clamp(TEMPERATURE_RANGE.0, TEMPERATURE_RANGE.1)?;
        self.temperature.set(&clamped)?;
        Ok(())
    }

    /// Losses of images `[n, 3, S, S]` with one caption each; `image_ids[i]` identifies the image
    /// of sample i (captions of one image are positives of each other). `rng` draws the negatives.
    pub fn losses(&self, pixels: &Tensor, captions: &[&str], image_ids: &[usize], rng: &mut Rng) -> Result<BlipLosses> {
        let ItcPass { itc, image_embeds, text, mask } = self.itc_pass(pixels, captions, image_ids)?;
        let itm_ids = Tensor::new(text.with_first_token(self.enc_token_id), &self.device)?;
        let memory = self.model.text_encoder.image_memory(&image_embeds, None)?;
        let pass = itm_on_hard_negatives(&self.model, &memory, &itm_ids, &mask, &itc.logits, image_ids, rng, false)?;
        let (itm, negatives) = (pass.loss, pass.negatives);
        Ok(BlipLosses { itc, itm, negatives })
    }

    /// The ITC loss alone (no ITM passes), for the warm-up.
    pub fn itc_loss(&self, pixels: &Tensor, captions: &[&str], image_ids: &[usize]) -> Result<ItcLoss> {
        Ok(self.itc_pass(pixels, captions, image_ids)?.itc)
    }

    fn itc_pass(&self, pixels: &Tensor, captions: &[&str], image_ids: &[usize]) -> Result<ItcPass> {
        let pad = self.model.config.text_config.pad_token_id;
        let text = self.tokenizer.encode_batch(captions, pad).map_err(|e| crate::TrainError::Config(e.to_string()))?;
        let (ids, mask) = text.to_tensors(&self.device)?;
        let image_embeds = self.model.vision_model.forward(pixels)?; // [n, tokens, d]
        let image_features = l2_normalize(&self.model.vision_proj.forward(&first_token(&image_embeds)?)?)?;
        let text_features = self.model.text_features(&ids, &mask)?;
        let targets = identity_targets(image_ids, &self.device)?.to_dtype(master_dtype(image_features.dtype()))?;
        // τ stays at full precision under mixed precision: the ITC logits are computed in f32.
        let temperature = self.temperature.as_tensor().to_dtype(master_dtype(image_features.dtype()))?;
        let itc = itc_loss(&image_features, &text_features, &temperature, &targets)?;
        Ok(ItcPass { itc, image_embeds, text, mask })
    }
}

/// The ITM passes of one batch: positives and hard negatives.
pub struct ItmPass {
    /// Cross-entropy over `[positives; negatives]` with labels 1 / 0.
    pub loss: Tensor,
    /// The positive pairs' output (with cross-attentions when requested).
    pub positive: ItmOutput,
    /// `(text → negative image, image → negative text)` per sample.
    pub negatives: Vec<(Option<usize>, Option<usize>)>,
}

/// BLIP's ITM on hard negatives: for each text a negative image and for each image a negative text
/// are drawn from `softmax(similarity_logits)` (`[images, texts]`, already divided by the
/// temperature; no gradient is taken through it) with pairs of the same `image_ids` excluded; the
/// positives are the diagonal. `itm_ids` start with `[ENC]`.
#[allow(clippy::too_many_arguments)]
pub fn itm_on_hard_negatives(
    model: &BlipItm,
    memory: &ImageMemory,
    itm_ids: &Tensor,
    mask: &Tensor,
    similarity_logits: &Tensor,
    image_ids: &[usize],
    rng: &mut Rng,
    keep_cross_attentions: bool,
) -> Result<ItmPass> {
    let n = image_ids.len();
    let device = itm_ids.device();
    let sim_i2t: Vec<Vec<f64>> = similarity_logits.detach().to_dtype(DType::F64)?.to_vec2()?;
    let sim_t2i: Vec<Vec<f64>> = (0..n).map(|t| (0..n).map(|i| sim_i2t[i][t]).collect()).collect();
    let uniform: Vec<f64> = (0..2 * n).map(|_| rng.f64()).collect();
    let neg_image_of_text = sample_hard_negatives(&sim_t2i, image_ids, &uniform[..n]);
    let neg_text_of_image = sample_hard_negatives(&sim_i2t, image_ids, &uniform[n..]);

    let positive = model.itm(memory, itm_ids, mask, keep_cross_attentions)?;
    // Negative pairs: (text t, image neg(t)) and (text neg(i), image i), as BLIP concatenates them.
    let (mut texts, mut images) = (vec![], vec![]);
    for (t, neg) in neg_image_of_text.iter().enumerate() {
        if let Some(i) = neg {
            texts.push(t as u32);
            images.push(*i as u32);
        }
    }
    for (i, neg) in neg_text_of_image.iter().enumerate() {
        if let Some(t) = neg {
            texts.push(*t as u32);
            images.push(i as u32);
        }
    }
    let loss = if texts.is_empty() {
        itm_loss(&positive.logits, &positive.logits.i(0..0)?)?
    } else {
        let texts = Tensor::new(texts, device)?;
        let images = Tensor::new(images, device)?;
        let negative = model
            .itm(&memory.gather(&images)?, &itm_ids.index_select(&texts, 0)?, &mask.index_select(&texts, 0)?, false)?
            .logits;
        itm_loss(&positive.logits, &negative)?
    };
    let negatives = neg_image_of_text.into_iter().zip(neg_text_of_image).collect();
    Ok(ItmPass { loss, positive, negatives })
}

/// What the ITC pass leaves for the ITM passes.
struct ItcPass {
    itc: ItcLoss,
    image_embeds: Tensor,
    text: TokenizedBatch,
    mask: Tensor,
}

impl Objective for BlipRetrievalObjective {
    type Item = CaptionSample;

    fn before_step(&mut self, _step: u64) -> Result<()> {
        self.clamp_temperature()
    }

    fn loss(&mut self, batch: &Batch<CaptionSample>, step: u64) -> Result<LossTerms> {
        let size = self.model.config.vision_config.image_size;
        let pixels = stack_pixels(batch.items.iter().map(|s| s.pixels.as_slice()), size, &self.device)?
            .to_dtype(self.model.dtype())?;
        let captions: Vec<&str> = batch.items.iter().map(|s| s.caption.as_str()).collect();
        let ids: Vec<usize> = batch.items.iter().map(|s| s.image_index).collect();
        // Draws depend on (seed, step, first sample): a resumed run draws the same negatives.
        let mut rng = Rng::derive(self.seed, step, batch.indices[0] as u64);
        let terms = if self.with_itm {
            let losses = self.losses(&pixels, &captions, &ids, &mut rng)?;
            vec![("itc".into(), losses.itc.loss), ("itm".into(), losses.itm)]
        } else {
            vec![("itc".into(), self.itc_loss(&pixels, &captions, &ids)?.loss)]
        };
        Ok(LossTerms { terms, samples: batch.items.len() })
    }
}

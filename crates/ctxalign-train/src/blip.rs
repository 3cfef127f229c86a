//! BLIP's retrieval objective (`blip_retrieval.py`): image-text contrastive loss with a learned
//! temperature, plus image-text matching on hard negatives drawn from the contrastive similarities.
//!
//! In-batch only: BLIP's momentum encoder and feature queue (a large-batch device for 14M-image
//! pre-training) are not part of this objective; the ITC targets still treat captions of the same
//! image as positives, as BLIP's `idx`-based targets do.
//!
//! **Data-parallel** (as BLIP's `blip_retrieval.py` under DDP): the ITC features are gathered from
//! every rank with their gradient and the contrastive loss is computed over the global batch; the
//! ITM hard negatives of a rank's samples are drawn from every rank's images and texts (BLIP's
//! `concat_all_gather` for the similarities, `all_gather_with_grad` for the image embeddings), each
//! draw keyed by the pair of samples — so W ranks train as one process with the global batch.

use candle_core::{DType, Device, IndexOp, Module, Tensor, Var};
use ctxalign_data::loader::{stack_pixels, Batch, CaptionSample};
use ctxalign_data::text::TokenizedBatch;
use ctxalign_data::TextTokenizer;
use ctxalign_models::blip::{l2_normalize, BlipItm, ImageMemory, ItmOutput};
use ctxalign_nn::first_token;
use ctxalign_nn::losses::{identity_targets, itc_loss, itm_loss, sample_hard_negatives, ItcLoss};

use crate::dist::Communicator;
use crate::draws::{Purpose, SampleDraws};
use crate::error::Result;
use crate::precision::master_dtype;
use crate::replay::Replay;
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
    /// `(text → negative image, image → negative text)` per sample, as indices into the global
    /// batch (every rank's samples in rank order); `None` when it held nothing but the sample's own
    /// image.
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
    /// The ranks of a data-parallel run (features and negatives are gathered from all).
    pub comm: Communicator,
    /// A reference run being replayed: its hard negatives replace the draws
    /// ([`NEGATIVE_IMAGE_DRAW`], [`NEGATIVE_TEXT_DRAW`]).
    pub replay: Option<Replay>,
    /// Multiplies the ITC logits ITM's negatives are drawn from: 1 is BLIP's `softmax(sim/τ)`, 0
    /// draws uniformly among the other images and texts of the batch (easy negatives), between the
    /// two a flatter softmax. For a matcher from scratch, whose first negatives would otherwise be
    /// the ones ITC finds hardest to tell apart.
    pub negative_sharpness: f64,
}

impl BlipRetrievalObjective {
    pub fn new(model: BlipItm, tokenizer: TextTokenizer, temperature: Var, seed: u64) -> Result<Self> {
        let t = &model.config.text_config;
        let enc_token_id = tokenizer
            .blip_enc_token_id(t.bos_token_id, t.vocab_size)
            .map_err(|e| crate::TrainError::Config(e.to_string()))?;
        let device = temperature.device().clone();
        Ok(Self {
            model,
            temperature,
            tokenizer,
            enc_token_id,
            device,
            seed,
            with_itm: true,
            comm: Communicator::single(),
            replay: None,
            negative_sharpness: 1.0,
        })
    }

    /// BLIP's `self.temp.clamp_(0.001, 0.5)`, done in place before the forward pass.
    pub fn clamp_temperature(&self) -> Result<()> {
        let clamped = self.temperature.as_tensor().clamp(TEMPERATURE_RANGE.0, TEMPERATURE_RANGE.1)?;
        self.temperature.set(&clamped)?;
        Ok(())
    }

    /// Losses of images `[n, 3, S, S]` with one caption each; `image_ids[i]` identifies the image
    /// of sample i (captions of one image are positives of each other). `draws` keys the negatives.
    pub fn losses(
        &self,
        pixels: &Tensor,
        captions: &[&str],
        image_ids: &[usize],
        draws: &SampleDraws,
    ) -> Result<BlipLosses> {
        let ItcPass { itc, image_embeds, text, mask, pool_ids } = self.itc_pass(pixels, captions, image_ids, draws)?;
        let itm_ids = Tensor::new(text.with_first_token(self.enc_token_id), &self.device)?;
        let memory = self.model.text_encoder.image_memory(&image_embeds, None)?;
        let pool = NegativePool::gather(&self.comm, &image_embeds, &itm_ids, &mask, pool_ids)?;
        // This rank's rows of the global ITC logits (which are already divided by τ).
        let (b, offset) = (captions.len(), pool.offset);
        let mut sim_i2t = itc.logits.narrow(0, offset, b)?;
        let mut sim_t2i = itc.logits.t()?.narrow(0, offset, b)?;
        if self.negative_sharpness != 1.0 {
            (sim_i2t, sim_t2i) = ((sim_i2t * self.negative_sharpness)?, (sim_t2i * self.negative_sharpness)?);
        }
        let pass =
            itm_on_hard_negatives(&self.model, &memory, &itm_ids, &mask, &sim_i2t, &sim_t2i, &pool, draws, false)?;
        let (itm, negatives) = (pass.loss, pass.negatives);
        Ok(BlipLosses { itc, itm, negatives })
    }

    /// The ITC loss alone (no ITM passes), for the warm-up.
    pub fn itc_loss(
        &self,
        pixels: &Tensor,
        captions: &[&str],
        image_ids: &[usize],
        draws: &SampleDraws,
    ) -> Result<ItcLoss> {
        Ok(self.itc_pass(pixels, captions, image_ids, draws)?.itc)
    }

    fn itc_pass(
        &self,
        pixels: &Tensor,
        captions: &[&str],
        image_ids: &[usize],
        draws: &SampleDraws,
    ) -> Result<ItcPass> {
        let pad = self.model.config.text_config.pad_token_id;
        let mut text =
            self.tokenizer.encode_batch(captions, pad).map_err(|e| crate::TrainError::Config(e.to_string()))?;
        pad_to_common_length(&self.comm, &mut text, pad)?;
        let (ids, mask) = text.to_tensors(&self.device)?;
        let image_embeds = self.model.vision_model.forward(pixels)?; // [n, tokens, d]
        let image_features = l2_normalize(&self.model.vision_proj.forward(&first_token(&image_embeds)?)?)?;
        let text_features = self.model.text_features(&ids, &mask)?;
        // The global batch: every rank's features (with their gradient) and identities.
        let pool_ids = PoolIds::gather(&self.comm, image_ids, &draws.keys)?;
        let image_features = self.comm.all_gather_with_grad(&image_features)?;
        let text_features = self.comm.all_gather_with_grad(&text_features)?;
        let targets =
            identity_targets(&pool_ids.image_ids, &self.device)?.to_dtype(master_dtype(image_features.dtype()))?;
        // τ stays at full precision under mixed precision: the ITC logits are computed in f32.
        let temperature = self.temperature.as_tensor().to_dtype(master_dtype(image_features.dtype()))?;
        let itc = itc_loss(&image_features, &text_features, &temperature, &targets)?;
        Ok(ItcPass { itc, image_embeds, text, mask, pool_ids })
    }
}

/// Pads every text of `text` to the longest of the run's texts (a data-parallel run gathers texts,
/// and NCCL gathers equal shapes; one process pads to its own longest, which is the same).
pub fn pad_to_common_length(comm: &Communicator, text: &mut TokenizedBatch, pad: u32) -> Result<()> {
    let longest = text.input_ids.iter().map(Vec::len).max().unwrap_or(0);
    let common = comm.all_reduce_f64(&[longest as f64], crate::dist::ReduceOp::Max)?[0] as usize;
    text.pad_to(common, pad);
    Ok(())
}

/// The identities of the global batch: per sample, the image it shows and its draw key, in rank
/// order, and where this rank's samples start.
#[derive(Debug, Clone)]
pub struct PoolIds {
    pub image_ids: Vec<usize>,
    pub keys: Vec<u64>,
    pub offset: usize,
}

impl PoolIds {
    /// Gathers every rank's `image_ids` and `keys` (a world of one: its own).
    pub fn gather(comm: &Communicator, image_ids: &[usize], keys: &[u64]) -> Result<Self> {
        let mine: Vec<u64> = image_ids.iter().zip(keys).flat_map(|(&id, &k)| [id as u64, k]).collect();
        let all = comm.all_gather_u64(&mine)?;
        let offset = all[..comm.rank()].iter().map(|r| r.len() / 2).sum();
        let pairs: Vec<(usize, u64)> = all.iter().flat_map(|r| r.chunks(2).map(|p| (p[0] as usize, p[1]))).collect();
        Ok(Self { image_ids: pairs.iter().map(|p| p.0).collect(), keys: pairs.iter().map(|p| p.1).collect(), offset })
    }
}

/// What hard negatives are drawn from: every rank's batch (on one process, its own).
pub struct NegativePool {
    /// `[pool, tokens, d]` image embeddings, gathered with their gradient.
    pub image_embeds: Tensor,
    /// `[pool, len]` ITM ids (`[ENC]` first) and attention masks.
    pub itm_ids: Tensor,
    pub mask: Tensor,
    pub ids: PoolIds,
    pub offset: usize,
    /// More than one rank: a negative image may be another rank's, whose cross-attention memory
    /// is computed here from its gathered embeddings.
    pub distributed: bool,
}

impl NegativePool {
    /// The pool of a rank's batch: its `image_embeds` (`[b, tokens, d]`), ITM texts, and
    /// identities, gathered from every rank.
    pub fn gather(
        comm: &Communicator,
        image_embeds: &Tensor,
        itm_ids: &Tensor,
        mask: &Tensor,
        ids: PoolIds,
    ) -> Result<Self> {
        Ok(Self {
            image_embeds: comm.all_gather_with_grad(image_embeds)?,
            itm_ids: comm.all_gather(itm_ids)?,
            mask: comm.all_gather(mask)?,
            offset: ids.offset,
            ids,
            distributed: comm.is_distributed(),
        })
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

/// BLIP's ITM on hard negatives: for each text of this rank a negative image and for each image a
/// negative text are drawn from the pool (every rank's batch) by `softmax(similarity logits)` — `[b,
/// pool]` rows of this rank's images (`sim_i2t`) and texts (`sim_t2i`) against the pool, already
/// divided by the temperature; no gradient is taken through them — with pairs of the same image
/// excluded ([`sample_hard_negatives`], keyed by the pair of samples) — or, when `draws` replays a
/// reference run, taken from its recording ([`NEGATIVE_IMAGE_DRAW`], [`NEGATIVE_TEXT_DRAW`]). The
/// positives are this rank's own pairs; `memory` holds this rank's images, `itm_ids` (`[ENC]`
/// first) and `mask` its texts.
#[allow(clippy::too_many_arguments)]
pub fn itm_on_hard_negatives(
    model: &BlipItm,
    memory: &ImageMemory,
    itm_ids: &Tensor,
    mask: &Tensor,
    sim_i2t: &Tensor,
    sim_t2i: &Tensor,
    pool: &NegativePool,
    draws: &SampleDraws,
    keep_cross_attentions: bool,
) -> Result<ItmPass> {
    let b = draws.len();
    let device = itm_ids.device();
    let rows = |t: &Tensor| -> Result<Vec<Vec<f64>>> { Ok(t.detach().to_dtype(DType::F64)?.to_vec2()?) };
    let (sim_i2t, sim_t2i) = (rows(sim_i2t)?, rows(sim_t2i)?);
    let ids = &pool.ids;
    let row_ids = &ids.image_ids[pool.offset..pool.offset + b];
    // Recorded draws (a replay fixture's) are read as host indices by `recorded_negatives`, so they
    // are loaded on the CPU whatever the model's device: no round trip through the GPU.
    let neg_image_of_text = match draws.recorded(NEGATIVE_IMAGE_DRAW, &Device::Cpu) {
        Some(recorded) => recorded_negatives(&recorded?, NEGATIVE_IMAGE_DRAW, row_ids, &ids.image_ids)?,
        None => sample_hard_negatives(&sim_t2i, row_ids, &ids.image_ids, |t, j| {
            draws.pair_uniform(Purpose::NegativeImage, draws.keys[t], ids.keys[j])
        }),
    };
    let neg_text_of_image = match draws.recorded(NEGATIVE_TEXT_DRAW, &Device::Cpu) {
        Some(recorded) => recorded_negatives(&recorded?, NEGATIVE_TEXT_DRAW, row_ids, &ids.image_ids)?,
        None => sample_hard_negatives(&sim_i2t, row_ids, &ids.image_ids, |i, j| {
            draws.pair_uniform(Purpose::NegativeText, draws.keys[i], ids.keys[j])
        }),
    };

    let positive = model.itm(memory, itm_ids, mask, keep_cross_attentions)?;
    // Negative pairs: (text t, image neg(t)) then (text neg(i), image i), as BLIP concatenates them.
    let (local_texts, pool_images): (Vec<u32>, Vec<u32>) =
        neg_image_of_text.iter().enumerate().filter_map(|(t, n)| n.map(|j| (t as u32, j as u32))).unzip();
    let (pool_texts, local_images): (Vec<u32>, Vec<u32>) =
        neg_text_of_image.iter().enumerate().filter_map(|(i, n)| n.map(|j| (j as u32, i as u32))).unzip();
    let mut negatives_logits = vec![];
    let mut unused_pool = None;
    if !pool_images.is_empty() || !local_images.is_empty() {
        let pick = |t: &Tensor, idx: &[u32]| -> Result<Tensor> { Ok(t.index_select(&Tensor::new(idx, device)?, 0)?) };
        let image_memory = match pool.distributed {
            // Another rank's image: its cross-attention memory from its gathered embeddings.
            true if !pool_images.is_empty() => {
                let theirs = model.text_encoder.image_memory(&pick(&pool.image_embeds, &pool_images)?, None)?;
                ImageMemory::cat(&[&theirs, &memory.gather(&Tensor::new(local_images.as_slice(), device)?)?])?
            }
            true => memory.gather(&Tensor::new(local_images.as_slice(), device)?)?,
            // One process: the pool is this batch, whose memory is built.
            false => {
                let all: Vec<u32> = pool_images.iter().chain(&local_images).copied().collect();
                memory.gather(&Tensor::new(all, device)?)?
            }
        };
        let texts = Tensor::cat(&[pick(itm_ids, &local_texts)?, pick(&pool.itm_ids, &pool_texts)?], 0)?;
        let masks = Tensor::cat(&[pick(mask, &local_texts)?, pick(&pool.mask, &pool_texts)?], 0)?;
        negatives_logits.push(model.itm(&image_memory, &texts, &masks, false)?.logits);
        if pool.distributed && pool_images.is_empty() {
            unused_pool = Some(&pool.image_embeds);
        }
    } else if pool.distributed {
        unused_pool = Some(&pool.image_embeds);
    }
    let negative = match negatives_logits.pop() {
        Some(l) => l,
        None => positive.logits.i(0..0)?,
    };
    let mut loss = itm_loss(&positive.logits, &negative)?;
    if let Some(embeds) = unused_pool {
        // No image of the pool was drawn on this rank, but the pool's backward meets the other
        // ranks: keep it in the graph with a zero weight.
        let zero = (embeds.sum_all()?.to_dtype(loss.dtype())? * 0.0)?;
        loss = (loss + zero)?;
    }
    let negatives = neg_image_of_text.into_iter().zip(neg_text_of_image).collect();
    Ok(ItmPass { loss, positive, negatives })
}

/// Name of the recorded draw of each text's negative image in a replayed run
/// (`step.{k}.draw.negative_image`: `[b]` indices into the pool, −1 where none was drawn).
pub const NEGATIVE_IMAGE_DRAW: &str = "negative_image";
/// Name of the recorded draw of each image's negative text (`step.{k}.draw.negative_text`).
pub const NEGATIVE_TEXT_DRAW: &str = "negative_text";

/// A replayed run's hard negatives (`name`): one pool index per row (−1: none). A negative that
/// shows the row's own image is an error — the reference drew what this objective excludes, so
/// the replay would not test this objective.
fn recorded_negatives(
    recorded: &Tensor,
    name: &str,
    row_ids: &[usize],
    pool_image_ids: &[usize],
) -> Result<Vec<Option<usize>>> {
    let values = recorded.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?;
    if values.len() != row_ids.len() {
        return Err(crate::TrainError::Config(format!(
            "the replay's `{name}` draw holds {} indices for a batch of {}",
            values.len(),
            row_ids.len()
        )));
    }
    values
        .iter()
        .zip(row_ids)
        .enumerate()
        .map(|(row, (&j, &own))| match j {
            -1 => Ok(None),
            j if j < 0 || j as usize >= pool_image_ids.len() => Err(crate::TrainError::Config(format!(
                "the replay's `{name}` draw of row {row} is {j}, outside the pool of {}",
                pool_image_ids.len()
            ))),
            j if pool_image_ids[j as usize] == own => Err(crate::TrainError::Config(format!(
                "the replay's `{name}` draw of row {row} is sample {j}, which shows the row's own image \
                 (this objective never draws it)"
            ))),
            j => Ok(Some(j as usize)),
        })
        .collect()
}

/// What the ITC pass leaves for the ITM passes.
struct ItcPass {
    itc: ItcLoss,
    image_embeds: Tensor,
    text: TokenizedBatch,
    mask: Tensor,
    pool_ids: PoolIds,
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
        // Draws depend on (seed, step, sample): a resumed run, and a run on several ranks, draw the
        // same negatives.
        let draws = SampleDraws::of_batch(self.seed, step, batch).replaying(self.replay.as_ref());
        let terms = if self.with_itm {
            let losses = self.losses(&pixels, &captions, &ids, &draws)?;
            vec![("itc".into(), losses.itc.loss), ("itm".into(), losses.itm)]
        } else {
            vec![("itc".into(), self.itc_loss(&pixels, &captions, &ids, &draws)?.loss)]
        };
        Ok(LossTerms { terms, samples: batch.items.len() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_negatives_are_checked_against_the_rows_images() {
        let pool_ids = [0, 0, 1, 2];
        let rows = [0, 0, 1, 2];
        let recorded = |v: &[i64]| Tensor::new(v, &Device::Cpu).unwrap();
        let ok = recorded_negatives(&recorded(&[2, 3, -1, 0]), "negative_image", &rows, &pool_ids).unwrap();
        assert_eq!(ok, vec![Some(2), Some(3), None, Some(0)]);
        let e = recorded_negatives(&recorded(&[1, 3, 0, 0]), "negative_image", &rows, &pool_ids).unwrap_err();
        assert!(e.to_string().contains("own image"), "{e}");
        let e = recorded_negatives(&recorded(&[2, 3, 4, 0]), "negative_text", &rows, &pool_ids).unwrap_err();
        assert!(e.to_string().contains("outside the pool"), "{e}");
        assert!(recorded_negatives(&recorded(&[2, 3]), "negative_text", &rows, &pool_ids).is_err());
    }
}

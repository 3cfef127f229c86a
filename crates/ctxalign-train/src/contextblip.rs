//! ContextBLIP's training objectives (docs/reference-notes.md §2):
//! - [`PretrainObjective`] (S0): BLIP frozen; the adapter, TMIM decoder and text adapter train on
//!   `L_itm + L_tmim` over captioned images.
//! - [`FinetuneObjective`] (S1): BLIP + adapter + a candidate head on IMAGECODE descriptions,
//!   cross-entropy over each set's candidates.
//! - [`InterContextObjective`] (S2): the inter-context encoder over frozen S1 features.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use ctxalign_data::loader::{stack_pixels, Batch, CaptionSample, DescriptionSample};
use ctxalign_data::rng::Rng;
use ctxalign_data::TextTokenizer;
use ctxalign_models::blip::{l2_normalize, mean_cross_attention, BlipConfig, BlipItm};
use ctxalign_models::contextblip::masking::{choose_tokens, random_patches, text_guided_patches};
use ctxalign_models::contextblip::{
    candidate_cross_entropy, CandidateHead, ContextBlip, ContextBlipConfig, InterContextEncoder, MaskSelection,
    PatchMask, TmimHead, TokenChoice,
};
use ctxalign_models::contextblip::{parts_read_elsewhere, Stage, PART_ADAPTER};
use ctxalign_models::loading::{AllowedUnused, RenameTable};
use ctxalign_models::ModelFiles;
use ctxalign_nn::first_token;
use serde::{Deserialize, Serialize};

use crate::blip::{itm_on_hard_negatives, pad_to_common_length, NegativePool, PoolIds};
use crate::dist::Communicator;
use crate::draws::{Purpose, SampleDraws};
use crate::error::{Result, TrainError};
use crate::params::{build_for_training, transformer_init, ParamSource, TrainableParams};
use crate::replay::Replay;
use crate::trainer::{LossTerms, Objective};

/// Prefixes of the parameters S0 trains.
pub const PRETRAINED_PREFIXES: [&str; 3] = ["adapter.", "decoder.", "text_adapter."];

fn config_error(e: impl std::fmt::Display) -> TrainError {
    TrainError::Config(e.to_string())
}

/// How S0 draws ITM hard negatives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HardNegativeConfig {
    /// Divide the frozen ITC similarities by this before the softmax (BLIP: 0.07). `None` reproduces
    /// the authors' code, which samples from `softmax(cosine)` — almost uniform.
    pub temperature: Option<f64>,
    /// Never draw another caption of the same image as a negative (the authors' code does).
    pub mask_same_image: bool,
}

impl Default for HardNegativeConfig {
    fn default() -> Self {
        Self { temperature: Some(0.07), mask_same_image: true }
    }
}

/// BLIP's config (checked against `cfg`) and a parameter source reading BLIP's weights plus, when
/// given, a `contextblip.safetensors`; `trainable` picks the `Var`s, new ones start from `seed`.
///
/// Every tensor of those files must be read except what BLIP's list allows and, in the
/// `contextblip.safetensors`, the parts in `unread_parts` (whole).
fn contextblip_source(
    blip: &ModelFiles,
    cfg: &ContextBlipConfig,
    contextblip: Option<&Path>,
    unread_parts: AllowedUnused,
    seed: u64,
    trainable: impl Fn(&str) -> bool + Send + Sync + 'static,
) -> Result<(BlipConfig, ParamSource)> {
    let blip_cfg = BlipItm::read_config(&blip.config)?;
    cfg.validate_for(&blip_cfg).map_err(config_error)?;
    let mut files = blip.weights.clone();
    files.extend(contextblip.map(Path::to_path_buf));
    let mut allowed_unused = BlipItm::allowed_unused();
    if let Some(path) = contextblip {
        allowed_unused = allowed_unused.and(unread_parts.only_in(path));
    }
    let source = ParamSource {
        checkpoint: Some((files, RenameTable::identity())),
        allowed_unused,
        trainable: Box::new(trainable),
        init: Box::new(transformer_init(0.02)),
        seed,
    };
    Ok((blip_cfg, source))
}

/// Builds ContextBLIP for S0: BLIP's tensors from `blip` frozen (plain tensors), the adapter,
/// decoder and text adapter trainable — from `resume_from` (a `contextblip.safetensors`) when
/// given, else initialised from `seed`.
pub fn build_pretraining(
    blip: &ModelFiles,
    cfg: &ContextBlipConfig,
    resume_from: Option<&Path>,
    dtype: DType,
    device: &Device,
    seed: u64,
) -> Result<(ContextBlip, TmimHead, TrainableParams)> {
    let (blip_cfg, source) = contextblip_source(blip, cfg, resume_from, AllowedUnused::none(), seed, |name| {
        PRETRAINED_PREFIXES.iter().any(|p| name.starts_with(p))
    })?;
    let ((model, tmim), params) = build_for_training(source, dtype, device, |vb| {
        let model = ContextBlip::new(&blip_cfg, cfg, vb.clone())?;
        Ok((model, TmimHead::new(cfg, vb)?))
    })?;
    Ok((model, tmim, params))
}

/// One S0 micro-batch's losses and what was drawn.
#[derive(Debug, Clone)]
pub struct PretrainLosses {
    pub itm: Tensor,
    pub tmim: Tensor,
    /// The masked patches of each sample.
    pub mask: PatchMask,
    /// The text position whose attention guided each sample's mask.
    pub guide_tokens: Vec<usize>,
}

/// S0: `L_itm + L_tmim` with BLIP frozen.
///
/// Data-parallel: the frozen ITC features and the texts are gathered from every rank, the adapted
/// image tokens with their gradient, and each rank's hard negatives are drawn from the global batch
/// (as BLIP's `concat_all_gather`); `L_itm` and `L_tmim` are means over the rank's own samples,
/// which the loop's gradient mean turns into means over the global batch. Every draw (negatives,
/// guide tokens, mask noise) is keyed by sample, so W ranks with batch b train as one process with
/// batch W·b — except under [`ctxalign_models::contextblip::TokenChoice::SharedPosition`] (the
/// authors' one position per batch), which each rank draws for its own batch.
pub struct PretrainObjective {
    pub model: ContextBlip,
    pub tmim: TmimHead,
    pub tokenizer: TextTokenizer,
    pub enc_token_id: u32,
    pub negatives: HardNegativeConfig,
    pub device: Device,
    pub seed: u64,
    /// The ranks of a data-parallel run.
    pub comm: Communicator,
    /// A reference run being replayed: its hard negatives, guide tokens and mask noise (or random
    /// masks) replace the draws ([`GUIDE_TOKEN_DRAW`], [`MASK_NOISE_DRAW`], [`RANDOM_MASK_DRAW`]).
    pub replay: Option<Replay>,
}

/// Name of the recorded draw of each sample's guide token in a replayed run
/// (`step.{k}.draw.guide_token`: `[b]` positions in the sample's ids).
pub const GUIDE_TOKEN_DRAW: &str = "guide_token";
/// Name of the recorded mask noise (`step.{k}.draw.mask_noise`: `[b, patches]` uniforms in [0, 1),
/// scaled by [`ctxalign_models::contextblip::MaskingConfig::noise`] as a fresh draw is).
pub const MASK_NOISE_DRAW: &str = "mask_noise";
/// Name of the recorded uniforms of random masking (`step.{k}.draw.random_mask`: `[b, k]`).
pub const RANDOM_MASK_DRAW: &str = "random_mask";

/// A replayed run's uniforms `name`, `[rows, per_row]`; `None` when not replaying.
fn recorded_uniforms(draws: &SampleDraws, name: &str, rows: usize, per_row: usize) -> Result<Option<Vec<Vec<f64>>>> {
    let Some(recorded) = draws.recorded(name, &Device::Cpu) else { return Ok(None) };
    let values: Vec<Vec<f64>> = recorded?.to_dtype(DType::F64)?.to_vec2()?;
    if values.len() != rows || values.iter().any(|r| r.len() != per_row) {
        return Err(config_error(format!("the replay's `{name}` draw is not [{rows}, {per_row}]")));
    }
    if values.iter().flatten().any(|u| !(0.0..1.0).contains(u)) {
        return Err(config_error(format!("the replay's `{name}` draw holds values outside [0, 1)")));
    }
    Ok(Some(values))
}

/// A replayed run's guide tokens: one position per sample, inside its text; under
/// [`TokenChoice::Content`] never a special or padding token (this objective never picks one, so
/// such a recording would not test it).
fn recorded_guide_tokens(
    recorded: &Tensor,
    ids: &[Vec<u32>],
    mask: &[Vec<u32>],
    special: &[u32],
    choice: TokenChoice,
) -> Result<Vec<usize>> {
    let positions = recorded.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?;
    if positions.len() != ids.len() {
        return Err(config_error(format!(
            "the replay's `{GUIDE_TOKEN_DRAW}` draw holds {} positions for a batch of {}",
            positions.len(),
            ids.len()
        )));
    }
    positions
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            let Some(t) = usize::try_from(t).ok().filter(|&t| t < ids[i].len()) else {
                return Err(config_error(format!(
                    "the replay's guide token of sample {i} is {t}, outside its {} tokens",
                    ids[i].len()
                )));
            };
            if choice == TokenChoice::Content && (mask[i][t] != 1 || special.contains(&ids[i][t])) {
                return Err(config_error(format!(
                    "the replay's guide token of sample {i} (position {t}) is a special or padding token, \
                     which this objective never picks"
                )));
            }
            Ok(t)
        })
        .collect()
}

/// Name of a replay's record of the reference's masked patches (`step.{k}.masked`: `[b, k]`, each
/// row ascending): not a draw — ours computes the mask from the recorded guide tokens and noise —
/// but what that computation must give.
pub const MASKED_PATCHES_RECORD: &str = "masked";

/// In a replayed run that recorded the reference's masked patches, ours must have chosen the same
/// when computing in f32 (under half precision, rounding of the attention may flip a near-tie; the
/// loss comparison bounds that).
fn check_replayed_mask(draws: &SampleDraws, mask: &PatchMask, dtype: DType) -> Result<()> {
    let Some(replay) = draws.replay.as_ref().filter(|_| dtype == DType::F32) else { return Ok(()) };
    let Ok(recorded) = replay.step_tensor(draws.step as usize, MASKED_PATCHES_RECORD) else { return Ok(()) };
    let recorded: Vec<Vec<i64>> = recorded.to_dtype(DType::I64)?.to_vec2()?;
    let ours: Vec<Vec<i64>> = mask.masked.iter().map(|m| m.iter().map(|&p| p as i64).collect()).collect();
    if recorded != ours {
        return Err(config_error(format!(
            "step {}: the replayed guide tokens and noise mask patches {ours:?}; the reference masked {recorded:?}",
            draws.step
        )));
    }
    Ok(())
}

impl PretrainObjective {
    pub fn new(
        model: ContextBlip,
        tmim: TmimHead,
        tokenizer: TextTokenizer,
        device: &Device,
        seed: u64,
    ) -> Result<Self> {
        let t = &model.blip.config.text_config;
        let enc_token_id = tokenizer.blip_enc_token_id(t.bos_token_id, t.vocab_size).map_err(config_error)?;
        Ok(Self {
            model,
            tmim,
            tokenizer,
            enc_token_id,
            negatives: HardNegativeConfig::default(),
            device: device.clone(),
            seed,
            comm: Communicator::single(),
            replay: None,
        })
    }

    /// Losses of images `[n, 3, S, S]` with one caption each (`image_ids` as in BLIP's objective);
    /// `draws` keys every random choice by sample.
    pub fn losses(
        &self,
        pixels: &Tensor,
        captions: &[&str],
        image_ids: &[usize],
        draws: &SampleDraws,
    ) -> Result<PretrainLosses> {
        let blip = &self.model.blip;
        let t = &blip.config.text_config;
        let comm = &self.comm;
        let mut text = self.tokenizer.encode_batch(captions, t.pad_token_id).map_err(config_error)?;
        pad_to_common_length(comm, &mut text, t.pad_token_id)?;
        let (ids, mask) = text.to_tensors(&self.device)?;
        let itm_rows = text.with_first_token(self.enc_token_id);
        let itm_ids = Tensor::new(itm_rows.clone(), &self.device)?;

        // Frozen parts: the ViT (every layer kept for the adapter), ITC features, text states.
        let vision = self.model.frozen_vision(pixels)?;
        let image_itc =
            l2_normalize(&candle_core::Module::forward(&blip.vision_proj, &first_token(&vision.last_hidden_state)?)?)?;
        let text_states = blip.text_encoder.forward(&ids, &mask, None, false)?.last_hidden_state.detach();
        let text_itc = l2_normalize(&candle_core::Module::forward(&blip.text_proj, &first_token(&text_states)?)?)?;
        // Hard negatives come from the global batch: every rank's frozen ITC features, texts and
        // (with their gradient) adapted image tokens.
        let pool_ids = PoolIds::gather(comm, image_ids, &draws.keys)?;
        let scale = self.negatives.temperature.map_or(1.0, |temp| 1.0 / temp);
        let sim_i2t = (image_itc.matmul(&comm.all_gather(&text_itc)?.t()?)? * scale)?.detach();
        let sim_t2i = (text_itc.matmul(&comm.all_gather(&image_itc)?.t()?)? * scale)?.detach();
        let pool_ids = if self.negatives.mask_same_image {
            pool_ids
        } else {
            // Only the sample itself is excluded: every sample its own identity.
            PoolIds { image_ids: (0..pool_ids.keys.len()).collect(), ..pool_ids }
        };

        // ITM on the adapted image tokens: the gradient reaches the adapter through the frozen BERT.
        let adapted = self.model.adapt(&vision)?;
        let memory = blip.text_encoder.image_memory(&adapted, None)?;
        let pool = NegativePool::gather(comm, &adapted, &itm_ids, &mask, pool_ids)?;
        let itm = itm_on_hard_negatives(blip, &memory, &itm_ids, &mask, &sim_i2t, &sim_t2i, &pool, draws, true)?;

        // Text-guided mask from the positive pass's cross-attention (no gradient through the choice).
        let masking = &self.model.config.masking;
        let num_patches = blip.config.vision_config.grid_size().pow(2);
        let k = masking.masked_count(num_patches)?;
        let mask_rows: Vec<Vec<u32>> = mask.to_vec2()?;
        let special = [self.enc_token_id, t.bos_token_id, t.sep_token_id, t.pad_token_id];
        let recorded_tokens = draws.recorded(GUIDE_TOKEN_DRAW, &Device::Cpu);
        let guide_tokens: Vec<usize> = match (recorded_tokens, masking.token_choice) {
            (Some(recorded), choice) => recorded_guide_tokens(&recorded?, &itm_rows, &mask_rows, &special, choice)?,
            (None, TokenChoice::SharedPosition) => {
                let mut rng = draws.batch_rng(Purpose::BatchPosition);
                choose_tokens(&itm_rows, &mask_rows, &special, masking.token_choice, &mut || rng.f64())
            }
            (None, TokenChoice::Content) => (0..captions.len())
                .map(|i| {
                    let mut rng = draws.rng(i, Purpose::GuideToken);
                    let one = |v: &Vec<Vec<u32>>| vec![v[i].clone()];
                    choose_tokens(&one(&itm_rows), &one(&mask_rows), &special, masking.token_choice, &mut || rng.f64())
                        [0]
                })
                .collect(),
        };
        // Each sample's uniforms: its own stream, or the replayed run's recorded values in order.
        let uniforms = |recorded: &Option<Vec<Vec<f64>>>, i: usize, purpose: Purpose| {
            let mut rng = draws.rng(i, purpose);
            let mut replayed = recorded.as_ref().map(|r| r[i].clone().into_iter());
            move || match replayed.as_mut() {
                // The recording holds as many values per sample as the selection draws.
                Some(values) => values.next().unwrap_or(0.0),
                None => rng.f64(),
            }
        };
        let masked = match masking.selection {
            MaskSelection::TextGuided => {
                let noise = match masking.noise > 0.0 {
                    true => recorded_uniforms(draws, MASK_NOISE_DRAW, captions.len(), num_patches)?,
                    false => None,
                };
                let attention: Vec<Vec<Vec<f32>>> =
                    mean_cross_attention(&itm.positive.cross_attentions)?.detach().to_dtype(DType::F32)?.to_vec3()?;
                attention
                    .iter()
                    .zip(&guide_tokens)
                    .enumerate()
                    .map(|(i, (rows, &tok))| {
                        let mut draw = uniforms(&noise, i, Purpose::MaskNoise);
                        text_guided_patches(&rows[tok], k, masking.noise, &mut draw)
                    })
                    .collect()
            }
            MaskSelection::Random => {
                let recorded = recorded_uniforms(draws, RANDOM_MASK_DRAW, captions.len(), k)?;
                (0..captions.len())
                    .map(|i| random_patches(num_patches, k, &mut uniforms(&recorded, i, Purpose::RandomMask)))
                    .collect()
            }
        };
        let patch_mask = PatchMask::new(masked, num_patches)?;
        check_replayed_mask(draws, &patch_mask, blip.dtype())?;

        let visible = self.model.encode_visible(&vision, &patch_mask)?;
        let tmim = self.tmim.loss(&visible, &patch_mask, &text_states, &mask, pixels)?;
        Ok(PretrainLosses { itm: itm.loss, tmim, mask: patch_mask, guide_tokens })
    }
}

impl Objective for PretrainObjective {
    type Item = CaptionSample;

    fn loss(&mut self, batch: &Batch<CaptionSample>, step: u64) -> Result<LossTerms> {
        let size = self.model.blip.config.vision_config.image_size;
        let pixels = stack_pixels(batch.items.iter().map(|s| s.pixels.as_slice()), size, &self.device)?
            .to_dtype(self.model.blip.dtype())?;
        let captions: Vec<&str> = batch.items.iter().map(|s| s.caption.as_str()).collect();
        let ids: Vec<usize> = batch.items.iter().map(|s| s.image_index).collect();
        let draws = SampleDraws::of_batch(self.seed, step, batch).replaying(self.replay.as_ref());
        let l = self.losses(&pixels, &captions, &ids, &draws)?;
        Ok(LossTerms { terms: vec![("itm".into(), l.itm), ("tmim".into(), l.tmim)], samples: batch.items.len() })
    }
}

/// Parameters of BLIP that S1 leaves alone because no S1 loss reaches them (the ITC projections
/// and BLIP's ITM head, replaced by the candidate head).
pub fn unused_in_finetuning(name: &str) -> bool {
    name.starts_with("vision_proj.") || name.starts_with("text_proj.") || name.starts_with("itm_head.")
}

/// Builds ContextBLIP for S1: BLIP (from `blip`) and the adapter (from `contextblip`, a
/// `contextblip.safetensors`) trainable — the ViT only when `train_vision` — plus a new candidate
/// head `head.*` initialised from `seed`.
pub fn build_finetuning(
    blip: &ModelFiles,
    contextblip: &Path,
    cfg: &ContextBlipConfig,
    train_vision: bool,
    dtype: DType,
    device: &Device,
    seed: u64,
) -> Result<(ContextBlip, CandidateHead, TrainableParams)> {
    // S1 starts from S0's adapter; S0's TMIM decoder and text adapter stay behind.
    let s0_only = parts_read_elsewhere(Stage::S0, PART_ADAPTER);
    let (blip_cfg, source) = contextblip_source(blip, cfg, Some(contextblip), s0_only, seed, move |name| {
        !unused_in_finetuning(name)
            && !name.starts_with("decoder.")
            && !name.starts_with("text_adapter.")
            && (train_vision || !name.starts_with("vision_model."))
    })?;
    let d = blip_cfg.text_config.hidden_size;
    let ((model, head), params) = build_for_training(source, dtype, device, |vb| {
        let model = ContextBlip::new(&blip_cfg, cfg, vb.clone())?;
        Ok((model, CandidateHead::new(d, vb.pp("head"))?))
    })?;
    Ok((model, head, params))
}

pub use ctxalign_models::contextblip::candidate_features;

/// S1: cross-entropy over each description's candidates, **summed** over the micro-batch's
/// descriptions, as the reference sums their gradients (one backward per description, one step per
/// batch of 36).
///
/// The sum matters: S1's Adam adds its L2 weight decay `wd · w` to the gradient, so a mean over B
/// descriptions would weigh the decay B times more against the loss than the reference does (and
/// clipping would act on a B times smaller norm). In a data-parallel run each rank's sum is scaled
/// by the number of ranks, so the loop's gradient mean over the ranks is the sum over the global
/// batch, as one process with the whole batch computes it; the logged `ce` is that global sum.
pub struct FinetuneObjective {
    pub model: ContextBlip,
    pub head: CandidateHead,
    pub tokenizer: TextTokenizer,
    pub enc_token_id: u32,
    /// Keep the ViT in the gradient graph (the reference fine-tunes all of BLIP).
    pub train_vision: bool,
    pub device: Device,
    /// Ranks of the run (1: one process): each rank's sum is scaled by it (see above).
    pub world_size: usize,
}

impl FinetuneObjective {
    pub fn new(
        model: ContextBlip,
        head: CandidateHead,
        tokenizer: TextTokenizer,
        train_vision: bool,
        device: &Device,
    ) -> Result<Self> {
        let t = &model.blip.config.text_config;
        let enc_token_id = tokenizer.blip_enc_token_id(t.bos_token_id, t.vocab_size).map_err(config_error)?;
        Ok(Self { model, head, tokenizer, enc_token_id, train_vision, device: device.clone(), world_size: 1 })
    }

    /// Candidate logits `[N]` of one description against its images `[N, 3, S, S]`.
    pub fn logits(&self, pixels: &Tensor, description: &str) -> Result<Tensor> {
        let pad = self.model.blip.config.text_config.pad_token_id;
        let text = self.tokenizer.encode_batch(&[description], pad).map_err(config_error)?;
        let (_, mask) = text.to_tensors(&self.device)?;
        let itm_ids = Tensor::new(text.with_first_token(self.enc_token_id), &self.device)?;
        let images = if self.train_vision {
            self.model.encode_images_end_to_end(pixels)?
        } else {
            self.model.encode_images(pixels)?
        };
        let features = candidate_features(&self.model.blip, &images, &itm_ids, &mask)?;
        Ok(candle_core::Module::forward(&self.head, &features)?)
    }
}

impl Objective for FinetuneObjective {
    type Item = DescriptionSample;

    fn loss(&mut self, batch: &Batch<DescriptionSample>, _step: u64) -> Result<LossTerms> {
        let size = self.model.blip.config.vision_config.image_size;
        let mut total: Option<Tensor> = None;
        for s in &batch.items {
            let target = s.target.ok_or_else(|| candle_core::Error::Msg("S1 needs labeled descriptions".into()))?;
            let per_image = 3 * size * size;
            let pixels =
                stack_pixels(s.pixels.chunks(per_image), size, &self.device)?.to_dtype(self.model.blip.dtype())?;
            let logits = self.logits(&pixels, &s.description)?.unsqueeze(0)?;
            let ce = candidate_cross_entropy(&logits, &[target])?;
            total = Some(match total {
                None => ce,
                Some(t) => (t + ce)?,
            });
        }
        let n = batch.items.len();
        let total = total.ok_or_else(|| candle_core::Error::Msg("empty batch".into()))?;
        let total = if self.world_size > 1 { (total * self.world_size as f64)? } else { total };
        Ok(LossTerms { terms: vec![("ce".into(), total)], samples: n })
    }
}

pub use ctxalign_models::contextblip::CandidateFeatures;

/// In-memory dataset of S1 features.
pub struct FeatureDataset(pub Vec<CandidateFeatures>);

impl ctxalign_data::loader::Dataset for FeatureDataset {
    type Item = CandidateFeatures;
    fn len(&self) -> usize {
        self.0.len()
    }
    fn load(&self, index: usize, _rng: &mut Rng) -> std::result::Result<CandidateFeatures, ctxalign_data::DataError> {
        Ok(self.0[index].clone())
    }
    fn check(&self, _index: usize) -> std::result::Result<(), ctxalign_data::DataError> {
        Ok(()) // in memory: nothing left to read
    }
}

/// S2: the inter-context encoder, scored by the frozen S1 head; cross-entropy over each
/// description's candidates, summed over the micro-batch as S1's ([`FinetuneObjective`]: the
/// reference sums the descriptions' gradients, and its Adam adds an L2 decay to them).
pub struct InterContextObjective {
    pub encoder: InterContextEncoder,
    pub head: CandidateHead,
    pub device: Device,
    /// The encoder's dtype: the f32 features are cast to it.
    pub dtype: DType,
    /// Ranks of the run (1: one process): each rank's sum is scaled by it, so the gradient mean
    /// over the ranks is the sum over the global batch.
    pub world_size: usize,
}

impl InterContextObjective {
    /// Logits `[B, N]` of stacked features `[B, N, d]`.
    pub fn logits(&self, features: &Tensor, video: &[bool]) -> candle_core::Result<Tensor> {
        candle_core::Module::forward(&self.head, &self.encoder.forward(features, video)?)
    }

    /// Stacks `[B, N, d]` from feature rows ([`CandidateFeatures::stack`]).
    pub fn stack(items: &[CandidateFeatures], device: &Device) -> candle_core::Result<Tensor> {
        CandidateFeatures::stack(items, device)
    }
}

impl Objective for InterContextObjective {
    type Item = CandidateFeatures;

    fn loss(&mut self, batch: &Batch<CandidateFeatures>, _step: u64) -> Result<LossTerms> {
        let features = Self::stack(&batch.items, &self.device)?.to_dtype(self.dtype)?;
        let video: Vec<bool> = batch.items.iter().map(|i| i.video).collect();
        let targets: Vec<usize> = batch
            .items
            .iter()
            .map(|i| i.target.ok_or_else(|| candle_core::Error::Msg("S2 needs labeled descriptions".into())))
            .collect::<candle_core::Result<_>>()?;
        // `candidate_cross_entropy` is the mean over the rows.
        let n = batch.items.len();
        let ce = candidate_cross_entropy(&self.logits(&features, &video)?, &targets)?;
        let ce = (ce * (n * self.world_size.max(1)) as f64)?;
        Ok(LossTerms { terms: vec![("ce".into(), ce)], samples: n })
    }
}

//! ContextCLIP's training: `L = L_CLIP + α·L_CX` on image-caption batches, and fine-tuning for
//! classification (image tower + heads + a classifier initialised from the zero-shot weights).
//!
//! The temperature τ is fixed (the paper's 1.0) or learned (a `Var` saved as
//! [`TEMPERATURE_KEY`], clamped to [`TEMPERATURE_RANGE`] before each step). Dropout masks are drawn
//! per sample from (seed, step, sample), so a resumed run replays the same steps.
//!
//! **Data-parallel** (open_clip's `gather_with_grad=True, local_loss=False`): every rank gathers
//! the image and text embeddings of the global batch with their gradient and computes `L_CLIP`
//! and `L_CX` over it; with the loop's gradient mean, W ranks train as one process with the global
//! batch. Classification fine-tuning's cross-entropy is per sample and needs no gather.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use ctxalign_data::loader::{stack_pixels, Batch, CaptionSample, LabeledImage};
use ctxalign_data::TextTokenizer;
use ctxalign_models::contextclip::{tower_renames, ContextClip, ContextClipConfig, ImageEncoderConfig};
use ctxalign_models::loading::RenameTable;
use ctxalign_nn::{clip_loss, contextual_loss, ClipLoss, ClipLossConfig, ContextualMode};
use serde::{Deserialize, Serialize};

use crate::blip::pad_to_common_length;
use crate::dist::Communicator;
use crate::draws::{Purpose, SampleDraws};
use crate::error::{Result, TrainError};
use crate::params::{build_for_training, transformer_init, Init, ParamSource, TrainableParams};
use crate::trainer::{LossTerms, Objective};

/// Checkpoint name of a learned temperature.
pub const TEMPERATURE_KEY: &str = "temperature";
/// A learned τ is kept in this range.
pub const TEMPERATURE_RANGE: (f64, f64) = (0.01, 100.0);

/// The loss settings (docs/reference-notes.md §4; defaults: the paper's λ 0.75, α 0.5, h 0.5 on
/// the base code's dot products and soft targets, `samples` reading).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ContextClipLossConfig {
    pub clip: ClipLossConfig,
    /// Weight α of `L_CX`; 0 trains the plain CLIP baseline.
    pub alpha: f64,
    pub mode: ContextualMode,
    /// Band width h.
    pub band_width: f64,
    /// τ (the paper's 1.0).
    pub temperature: f64,
    pub learn_temperature: bool,
}

impl Default for ContextClipLossConfig {
    fn default() -> Self {
        Self {
            clip: ClipLossConfig::default(),
            alpha: 0.5,
            mode: ContextualMode::Samples,
            band_width: 0.5,
            temperature: 1.0,
            learn_temperature: false,
        }
    }
}

/// Initialisation of parameters a checkpoint does not provide: PyTorch's defaults where the base
/// code relies on them (Kaiming-normal fan-out convs and unit batch norms as torchvision's ResNet;
/// `U(±1/√fan_in)`-variance linears in the heads), HF's `N(0, 0.02²)` in transformer towers.
pub fn contextclip_init(cfg: &ContextClipConfig) -> impl Fn(&str, &[usize]) -> Init + Send + Sync + 'static {
    let resnet = matches!(cfg.image_encoder, ImageEncoderConfig::Resnet(_));
    let transformer = transformer_init(0.02);
    move |name: &str, shape: &[usize]| {
        let leaf = name.rsplit('.').next().unwrap_or(name);
        match leaf {
            "running_mean" | "bias" => return Init::Zeros,
            "running_var" => return Init::Ones,
            _ => {}
        }
        if resnet && name.starts_with("image_encoder.") {
            return match shape {
                [out, _, kh, kw] => Init::Normal { std: (2.0 / (out * kh * kw) as f64).sqrt() },
                _ => Init::Ones, // batch-norm weights
            };
        }
        if name.contains("_projection.") {
            return match shape {
                [_, fan_in] => Init::Normal { std: (1.0 / (3.0 * *fan_in as f64)).sqrt() },
                _ => Init::Ones, // the head's LayerNorm weight
            };
        }
        transformer(name, shape)
    }
}

/// Where a ContextCLIP's weights start: from scratch, from a saved ContextCLIP, or from tower
/// checkpoints (a timm ResNet / CLIP file for the image side, a BERT / CLIP file for the text side)
/// with fresh heads.
#[derive(Debug, Clone, Default)]
pub struct ContextClipInit {
    /// A `model.safetensors` with ContextCLIP's own key layout.
    pub checkpoint: Option<PathBuf>,
    /// Tower checkpoints in their own layouts (read through [`tower_renames`]).
    pub towers: Vec<PathBuf>,
    /// For a BERT text tower whose file keeps it under `bert.` (task checkpoints).
    pub bert_prefix: bool,
}

/// τ of the InfoNCE.
#[derive(Debug, Clone)]
pub enum Temperature {
    Fixed(Tensor),
    /// Trained; saved under [`TEMPERATURE_KEY`].
    Learned(Var),
}

impl Temperature {
    /// The scalar τ.
    pub fn tensor(&self) -> Tensor {
        match self {
            Self::Fixed(t) => t.clone(),
            Self::Learned(v) => v.as_tensor().clone(),
        }
    }

    /// Keeps a learned τ in [`TEMPERATURE_RANGE`] (done before every step).
    pub fn clamp(&self) -> Result<()> {
        if let Self::Learned(v) = self {
            v.set(&v.as_tensor().clamp(TEMPERATURE_RANGE.0, TEMPERATURE_RANGE.1)?)?;
        }
        Ok(())
    }
}

/// Builds a ContextCLIP for training: every parameter a `Var` (batch-norm running statistics
/// included, so checkpoints carry them; the model detaches them, so they never move). A learned
/// temperature is added to the parameters under [`TEMPERATURE_KEY`]; it stays f32 whatever
/// `dtype` the model computes in (the contrastive logits are f32).
pub fn build_contextclip(
    cfg: &ContextClipConfig,
    init: &ContextClipInit,
    loss: &ContextClipLossConfig,
    dtype: DType,
    device: &Device,
    seed: u64,
) -> Result<(ContextClip, TrainableParams, Temperature)> {
    let checkpoint = match (&init.checkpoint, init.towers.is_empty()) {
        (Some(file), true) => Some((vec![file.clone()], RenameTable::identity())),
        (None, false) => {
            let mut renames = tower_renames(cfg);
            if init.bert_prefix {
                for rule in &mut renames.rules {
                    if rule.0 == "text_encoder." {
                        rule.1 = "bert.".into();
                    }
                }
            }
            Some((init.towers.clone(), renames))
        }
        (None, true) => None,
        (Some(_), false) => {
            return Err(TrainError::Config(
                "start from a ContextCLIP checkpoint or from tower checkpoints, not both".into(),
            ))
        }
    };
    // A ContextCLIP checkpoint holds the whole model (and its learned τ, read below); tower
    // checkpoints hold other parts of their source models besides the towers.
    let allowed_unused =
        if init.towers.is_empty() { ContextClip::allowed_unused() } else { ContextClip::tower_allowed_unused(cfg) };
    let source = ParamSource {
        checkpoint,
        allowed_unused,
        trainable: Box::new(|_| true),
        init: Box::new(contextclip_init(cfg)),
        seed,
    };
    let (model, mut params) = build_for_training(source, dtype, device, |vb| ContextClip::new(cfg, vb))?;
    // A saved learned τ continues from its value; otherwise the configured start.
    let saved = match &init.checkpoint {
        Some(file) if loss.learn_temperature => {
            // SAFETY: read-only map of a file this process does not modify while loading.
            let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(file) }?;
            st.get(TEMPERATURE_KEY).is_ok().then(|| st.load(TEMPERATURE_KEY, device)).transpose()?
        }
        _ => None,
    };
    let temperature = match saved {
        Some(t) => t.to_dtype(DType::F32)?.reshape(())?,
        None => Tensor::new(loss.temperature as f32, device)?,
    };
    let temperature = if loss.learn_temperature {
        let var = Var::from_tensor(&temperature)?;
        params.insert(TEMPERATURE_KEY, var.clone())?;
        Temperature::Learned(var)
    } else {
        Temperature::Fixed(temperature)
    };
    Ok((model, params, temperature))
}

/// Loss terms of one batch.
pub struct ContextClipLosses {
    pub clip: ClipLoss,
    /// `L_CX` (unweighted); `None` when α = 0.
    pub contextual: Option<Tensor>,
}

/// `L_CLIP + α·L_CX` over image-caption batches.
pub struct ContextClipObjective {
    pub model: ContextClip,
    pub tokenizer: TextTokenizer,
    pub loss: ContextClipLossConfig,
    pub temperature: Temperature,
    pub device: Device,
    pub seed: u64,
    /// The ranks of a data-parallel run (the embeddings of every rank are gathered).
    pub comm: Communicator,
}

impl ContextClipObjective {
    /// Both losses for images `[n, 3, S, S]` and their captions; `image_ids` groups captions of one
    /// image (hard targets treat them as positives of each other). `dropout` keys each sample's
    /// dropout masks (`None`: no dropout, as in evaluation). In a data-parallel run the losses are
    /// over every rank's samples.
    pub fn losses(
        &self,
        pixels: &Tensor,
        captions: &[&str],
        image_ids: &[usize],
        dropout: Option<&SampleDraws>,
    ) -> Result<ContextClipLosses> {
        let pad = pad_token_id(&self.model);
        let mut text = self.tokenizer.encode_batch(captions, pad).map_err(|e| TrainError::Config(e.to_string()))?;
        pad_to_common_length(&self.comm, &mut text, pad)?;
        let (ids, mask) = text.to_tensors(&self.device)?;
        let seeds = dropout.map(|d| d.seeds(Purpose::Dropout));
        let image = self.comm.all_gather_with_grad(&self.model.encode_images(pixels, seeds.as_deref())?)?;
        let text = self.comm.all_gather_with_grad(&self.model.encode_texts(&ids, &mask, seeds.as_deref())?)?;
        // Captions of one image are positives of each other across ranks too.
        let keys = dropout.map_or_else(|| (0..captions.len() as u64).collect(), |d| d.keys.clone());
        let image_ids = crate::blip::PoolIds::gather(&self.comm, image_ids, &keys)?.image_ids;
        let clip = clip_loss(&image, &text, &self.temperature.tensor(), &image_ids, &self.loss.clip)?;
        let contextual = (self.loss.alpha != 0.0)
            .then(|| contextual_loss(&image, &text, self.loss.mode, self.loss.band_width))
            .transpose()?;
        Ok(ContextClipLosses { clip, contextual })
    }
}

/// The pad id of the model's text tower.
pub fn pad_token_id(model: &ContextClip) -> u32 {
    model.config.pad_token_id()
}

/// `captions` → `(input_ids, attention_mask)` `[n, len]` for `model`'s text tower.
pub fn tokenize(
    tokenizer: &TextTokenizer,
    model: &ContextClip,
    captions: &[&str],
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let batch = tokenizer.encode_batch(captions, pad_token_id(model)).map_err(|e| TrainError::Config(e.to_string()))?;
    Ok(batch.to_tensors(device)?)
}

impl Objective for ContextClipObjective {
    type Item = CaptionSample;

    fn before_step(&mut self, _step: u64) -> Result<()> {
        self.temperature.clamp()
    }

    fn loss(&mut self, batch: &Batch<CaptionSample>, step: u64) -> Result<LossTerms> {
        let size = self.model.config.image_size;
        let pixels = stack_pixels(batch.items.iter().map(|s| s.pixels.as_slice()), size, &self.device)?
            .to_dtype(self.model.dtype())?;
        let captions: Vec<&str> = batch.items.iter().map(|s| s.caption.as_str()).collect();
        let ids: Vec<usize> = batch.items.iter().map(|s| s.image_index).collect();
        let draws = SampleDraws::of_batch(self.seed, step, batch);
        let losses = self.losses(&pixels, &captions, &ids, Some(&draws))?;
        let mut terms = vec![("clip".to_string(), losses.clip.loss)];
        if let Some(cx) = losses.contextual {
            terms.push(("cx".to_string(), (cx * self.loss.alpha)?));
        }
        Ok(LossTerms { terms, samples: batch.items.len() })
    }
}

/// Fine-tuning for classification: image tower + image head + a linear classifier over the
/// normalised embeddings, `logits = scale · normalize(embed(x)) · Wᵀ`, W initialised from the
/// zero-shot class embeddings (so step 0 is the zero-shot classifier).
pub struct ClassifierObjective {
    pub model: ContextClip,
    /// `[classes, projection_dim]` (a variable; f32 under mixed precision too).
    pub classifier: Tensor,
    /// CLIP's 100.
    pub logit_scale: f64,
    pub device: Device,
    pub seed: u64,
}

/// Checkpoint name of the classifier of [`ClassifierObjective`] (the inference side reads it too).
pub use ctxalign_models::contextclip::CLASSIFIER_KEY;

impl ClassifierObjective {
    /// `[n, classes]` logits of images `[n, 3, S, S]`, in f32; `dropout`: one seed per image in
    /// training. Under mixed precision the embeddings are normalised and compared in f32 (the
    /// classifier is kept in f32): the logit scale of 100 would turn bf16 rounding of the cosines
    /// into differences of tenths.
    pub fn logits(&self, pixels: &Tensor, dropout: Option<&[u64]>) -> candle_core::Result<Tensor> {
        let image = ctxalign_nn::upcast_half(&self.model.encode_images(pixels, dropout)?)?;
        let classifier = ctxalign_nn::upcast_half(&self.classifier)?;
        ctxalign_nn::l2_normalize(&image)?.matmul(&classifier.t()?)? * self.logit_scale
    }
}

impl Objective for ClassifierObjective {
    type Item = LabeledImage;

    fn loss(&mut self, batch: &Batch<LabeledImage>, step: u64) -> Result<LossTerms> {
        let size = self.model.config.image_size;
        let pixels = stack_pixels(batch.items.iter().map(|s| s.pixels.as_slice()), size, &self.device)?
            .to_dtype(self.model.dtype())?;
        let labels: Vec<u32> = batch.items.iter().map(|s| s.label as u32).collect();
        let labels = Tensor::new(labels, &self.device)?;
        let seeds = SampleDraws::of_batch(self.seed, step, batch).seeds(Purpose::Dropout);
        let logits = self.logits(&pixels, Some(&seeds))?;
        let ce = candle_nn::loss::cross_entropy(&logits, &labels)?;
        Ok(LossTerms { terms: vec![("ce".to_string(), ce)], samples: batch.items.len() })
    }
}

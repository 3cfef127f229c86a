//! ContextCLIP's losses: the weighted InfoNCE of its base code (OpenAI-CLIP tutorial) and the
//! contextual loss (Mechrez et al. 2018) in the three readings of reference-notes §4.
//!
//! Both are composed from ops Candle differentiates (`log_softmax`, `softmax` over a dimension,
//! `max`/`min` reductions, `maximum`), and the contextual loss clamps distances at 0 so a cosine
//! that rounds above 1 (bf16) cannot make the normaliser vanish or turn negative.

use candle_core::{DType, Result, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::losses::identity_targets;
use crate::ops::l2_normalize;

/// How image and text embeddings are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Similarity {
    /// Unnormalised dot product of the projection heads' outputs (the base code).
    #[default]
    Dot,
    /// Cosine similarity (L2-normalised embeddings), as CLIP.
    Cosine,
}

/// The cross-entropy targets of the InfoNCE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Targets {
    /// Identity (1/n over the captions of the same image when a batch holds several).
    Hard,
    /// The base code's `softmax((sim(I, I) + sim(T, T)) / 2 · τ)` — computed from the embeddings
    /// without detaching, as the base code does.
    #[default]
    Soft,
}

/// Settings of [`clip_loss`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ClipLossConfig {
    /// Weight λ of the image→text direction; text→image gets 1 − λ (paper 0.75; 0.5 = symmetric).
    pub lambda: f64,
    pub similarity: Similarity,
    pub targets: Targets,
}

impl Default for ClipLossConfig {
    /// The paper's weighting on the base code's dot products and soft targets.
    fn default() -> Self {
        Self { lambda: 0.75, similarity: Similarity::Dot, targets: Targets::Soft }
    }
}

/// The parts of [`clip_loss`].
#[derive(Debug, Clone)]
pub struct ClipLoss {
    /// `mean(λ·ℓ_i→t + (1 − λ)·ℓ_t→i)`, a scalar.
    pub loss: Tensor,
    /// Mean of the per-image losses over the batch.
    pub image_to_text: Tensor,
    /// Mean of the per-text losses over the batch.
    pub text_to_image: Tensor,
    /// `[texts, images]` similarities divided by τ.
    pub logits: Tensor,
}

/// Similarity matrix `a · bᵀ` (after L2 normalisation for `Cosine`).
pub fn similarity_matrix(a: &Tensor, b: &Tensor, similarity: Similarity) -> Result<Tensor> {
    match similarity {
        Similarity::Dot => a.matmul(&b.t()?),
        Similarity::Cosine => l2_normalize(a)?.matmul(&l2_normalize(b)?.t()?),
    }
}

/// ContextCLIP's `L_CLIP` on `[n, e]` image and text embeddings of n pairs.
///
/// `logits = sim(T, I) / τ` (`[texts, images]`, as the base code); text→image is the cross-entropy of
/// its rows, image→text of its columns, each against the targets of `cfg.targets`; `image_ids[k]`
/// names the image of pair k (captions of one image share an id) for hard targets. `temperature` is
/// a scalar tensor (a `Var` when learned).
pub fn clip_loss(
    image: &Tensor,
    text: &Tensor,
    temperature: &Tensor,
    image_ids: &[usize],
    cfg: &ClipLossConfig,
) -> Result<ClipLoss> {
    let logits = similarity_matrix(text, image, cfg.similarity)?.broadcast_div(temperature)?;
    let targets = match cfg.targets {
        Targets::Hard => identity_targets(image_ids, image.device())?.to_dtype(logits.dtype())?,
        Targets::Soft => {
            let images = similarity_matrix(image, image, cfg.similarity)?;
            let texts = similarity_matrix(text, text, cfg.similarity)?;
            let mixed = ((images + texts)? * 0.5)?.broadcast_mul(temperature)?;
            candle_nn::ops::softmax(&mixed, D::Minus1)?
        }
    };
    // Per-row soft cross-entropy: −Σ_j t_ij log softmax(x)_ij.
    let cross_entropy = |logits: &Tensor, targets: &Tensor| -> Result<Tensor> {
        (candle_nn::ops::log_softmax(logits, D::Minus1)? * targets)?.sum(D::Minus1)?.neg()
    };
    let text_to_image = cross_entropy(&logits, &targets)?;
    let image_to_text = cross_entropy(&logits.t()?, &targets.t()?)?;
    let loss = ((&image_to_text * cfg.lambda)? + (&text_to_image * (1.0 - cfg.lambda))?)?.mean_all()?;
    Ok(ClipLoss { loss, image_to_text: image_to_text.mean_all()?, text_to_image: text_to_image.mean_all()?, logits })
}

/// What the contextual loss treats as its points (reference-notes §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum ContextualMode {
    /// The B embeddings of the batch, centred by the text side's batch mean per dimension.
    #[default]
    #[serde(rename = "samples")]
    Samples,
    /// The D dimensions, each described by its B values; each sample centred by the text side's own
    /// mean over its dimensions.
    #[serde(rename = "dims")]
    Dims,
    /// The first author's code: per sample, each scalar component is a point (degenerate: ≈ log D
    /// for aligned and random pairs alike); kept only to reproduce that code.
    #[serde(rename = "paper-code")]
    PaperCode,
}

impl std::str::FromStr for ContextualMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "samples" => Ok(Self::Samples),
            "dims" => Ok(Self::Dims),
            "paper-code" => Ok(Self::PaperCode),
            _ => Err(format!("unknown contextual-loss mode {s:?} (samples | dims | paper-code)")),
        }
    }
}

/// The eps of the distance normalisation and of the log.
pub const CONTEXTUAL_EPS: f64 = 1e-5;

/// The contextual similarity `CX` of point sets given their cosine matrices `[.., P, Q]` (x points
/// on rows, y points on columns): `d = max(1 − cos, 0)`, `d̃_ij = d_ij / (min_k d_ik + eps)`,
/// `CX_ij = softmax_j((1 − d̃_ij)/h)`, `CX = mean_j max_i CX_ij`. Returns `[..]`.
pub fn contextual_similarity(cosine: &Tensor, band_width: f64) -> Result<Tensor> {
    let rank = cosine.rank();
    let distance = (1.0 - cosine)?.relu()?;
    let nearest = distance.min_keepdim(D::Minus1)?;
    let relative = distance.broadcast_div(&(nearest + CONTEXTUAL_EPS)?)?;
    let affinity = candle_nn::ops::softmax(&((1.0 - relative)? / band_width)?, D::Minus1)?;
    affinity.max(rank - 2)?.mean(D::Minus1)
}

/// `−log(CX + eps)` of image-side `x` and text-side `y` embeddings `[B, D]` (ContextCLIP's `L_CX`),
/// a scalar. Half-precision inputs are computed in f32 (the distance normaliser and the
/// log-sum-exp lose too much in bf16); the result is f32 then.
pub fn contextual_loss(x: &Tensor, y: &Tensor, mode: ContextualMode, band_width: f64) -> Result<Tensor> {
    if x.dims() != y.dims() || x.rank() != 2 {
        candle_core::bail!("contextual loss: image {:?} and text {:?} must both be [B, D]", x.dims(), y.dims())
    }
    if !(band_width > 0.0) {
        candle_core::bail!("contextual loss: band width h must be positive, got {band_width}")
    }
    let (x, y) = match x.dtype() {
        DType::F16 | DType::BF16 => (x.to_dtype(DType::F32)?, y.to_dtype(DType::F32)?),
        _ => (x.clone(), y.clone()),
    };
    let neg_log = |cx: &Tensor| -> Result<Tensor> { (cx + CONTEXTUAL_EPS)?.log()?.neg() };
    let cosine_of_rows = |a: &Tensor, b: &Tensor| -> Result<Tensor> { l2_normalize(a)?.matmul(&l2_normalize(b)?.t()?) };
    match mode {
        ContextualMode::Samples => {
            let centre = y.mean_keepdim(0)?;
            let cosine = cosine_of_rows(&x.broadcast_sub(&centre)?, &y.broadcast_sub(&centre)?)?;
            neg_log(&contextual_similarity(&cosine, band_width)?)
        }
        ContextualMode::Dims => {
            let centre = y.mean_keepdim(1)?;
            // [D, B]: one point per dimension.
            let xc = x.broadcast_sub(&centre)?.t()?.contiguous()?;
            let yc = y.broadcast_sub(&centre)?.t()?.contiguous()?;
            neg_log(&contextual_similarity(&cosine_of_rows(&xc, &yc)?, band_width)?)
        }
        ContextualMode::PaperCode => {
            let centre = y.mean_keepdim(1)?;
            let xn = l2_normalize(&x.broadcast_sub(&centre)?)?;
            let yn = l2_normalize(&y.broadcast_sub(&centre)?)?;
            // cos_ij = x_i · y_j per sample: [B, D, 1] × [B, 1, D] → [B, D, D].
            let cosine = xn.unsqueeze(2)?.broadcast_mul(&yn.unsqueeze(1)?)?;
            neg_log(&contextual_similarity(&cosine, band_width)?)?.mean_all()
        }
    }
}

//! ContextCLIP's losses: the weighted InfoNCE of its base code (OpenAI-CLIP tutorial) and the
//! contextual loss (Mechrez et al. 2018) in the three readings of docs/reference-notes.md §4.
//!
//! Both are composed from ops Candle differentiates (`log_softmax`, `softmax` over a dimension,
//! `max`/`min` reductions, `maximum`), and the contextual loss clamps distances at 0 so a cosine
//! that rounds above 1 (bf16) cannot make the normaliser vanish or turn negative.

use candle_core::{DType, Result, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::losses::identity_targets;
use crate::ops::l2_normalize;
use crate::ops::upcast_half;

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
    // The contrastive logits and the loss in f32 whatever the embedding dtype (mixed precision).
    let (image, text) = (&upcast_half(image)?, &upcast_half(text)?);
    let temperature = &upcast_half(temperature)?;
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

/// What the contextual loss treats as its points (docs/reference-notes.md §4).
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
/// a scalar, in the input's dtype (f32 for half-precision inputs). Computed in f64: the distance
/// normaliser and the log-sum-exp lose too much in bf16, and measurably in f32.
pub fn contextual_loss(x: &Tensor, y: &Tensor, mode: ContextualMode, band_width: f64) -> Result<Tensor> {
    if x.dims() != y.dims() || x.rank() != 2 {
        candle_core::bail!("contextual loss: image {:?} and text {:?} must both be [B, D]", x.dims(), y.dims())
    }
    if band_width.is_nan() || band_width <= 0.0 {
        candle_core::bail!("contextual loss: band width h must be positive, got {band_width}")
    }
    // Computed in f64 whatever the input dtype: the normaliser divides by the nearest distance,
    // which amplifies rounding (in f32 the `dims` reading loses ~1e-5 relative at the first step
    // of a small model); the matrices are B×B, D×D or B×D×D, so the cost is negligible.
    let out_dtype = match x.dtype() {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    };
    let (x, y) = (x.to_dtype(DType::F64)?, y.to_dtype(DType::F64)?);
    let neg_log = |cx: &Tensor| -> Result<Tensor> { (cx + CONTEXTUAL_EPS)?.log()?.neg() };
    let cosine_of_rows = |a: &Tensor, b: &Tensor| -> Result<Tensor> { l2_normalize(a)?.matmul(&l2_normalize(b)?.t()?) };
    let loss = match mode {
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
    }?;
    loss.to_dtype(out_dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::check_gradients;
    use candle_core::{Device, Var};

    fn randn(rows: usize, cols: usize, seed: u64) -> Vec<Vec<f64>> {
        // A small LCG: the tests need fixed, not good, randomness.
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..rows)
            .map(|_| {
                (0..cols)
                    .map(|_| {
                        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
                    })
                    .collect()
            })
            .collect()
    }

    fn tensor(v: &[Vec<f64>]) -> Tensor {
        Tensor::new(v.to_vec(), &Device::Cpu).unwrap()
    }

    /// The contextual core written out with loops over plain point lists.
    fn cx_reference(xs: &[Vec<f64>], ys: &[Vec<f64>], h: f64) -> f64 {
        let norm = |v: &Vec<f64>| v.iter().map(|a| a * a).sum::<f64>().sqrt().max(1e-12);
        let cos = |a: &Vec<f64>, b: &Vec<f64>| a.iter().zip(b).map(|(p, q)| p * q).sum::<f64>() / (norm(a) * norm(b));
        let cx: Vec<Vec<f64>> = xs
            .iter()
            .map(|x| {
                let d: Vec<f64> = ys.iter().map(|y| (1.0 - cos(x, y)).max(0.0)).collect();
                let m = d.iter().cloned().fold(f64::INFINITY, f64::min);
                let w: Vec<f64> = d.iter().map(|dij| ((1.0 - dij / (m + 1e-5)) / h).exp()).collect();
                let z: f64 = w.iter().sum();
                w.iter().map(|wij| wij / z).collect()
            })
            .collect();
        (0..ys.len()).map(|j| cx.iter().map(|row| row[j]).fold(f64::MIN, f64::max)).sum::<f64>() / ys.len() as f64
    }

    fn loss_reference(x: &[Vec<f64>], y: &[Vec<f64>], mode: ContextualMode, h: f64) -> f64 {
        let (b, d) = (x.len(), x[0].len());
        match mode {
            ContextualMode::Samples => {
                let mu: Vec<f64> = (0..d).map(|k| y.iter().map(|r| r[k]).sum::<f64>() / b as f64).collect();
                let c = |m: &[Vec<f64>]| {
                    m.iter().map(|r| r.iter().zip(&mu).map(|(a, u)| a - u).collect()).collect::<Vec<_>>()
                };
                -(cx_reference(&c(x), &c(y), h) + 1e-5).ln()
            }
            ContextualMode::Dims => {
                let mu: Vec<f64> = y.iter().map(|r| r.iter().sum::<f64>() / d as f64).collect();
                let cols =
                    |m: &[Vec<f64>]| (0..d).map(|k| (0..b).map(|s| m[s][k] - mu[s]).collect()).collect::<Vec<_>>();
                -(cx_reference(&cols(x), &cols(y), h) + 1e-5).ln()
            }
            ContextualMode::PaperCode => {
                let per_sample: f64 = (0..b)
                    .map(|s| {
                        let mu = y[s].iter().sum::<f64>() / d as f64;
                        let unit = |r: &Vec<f64>| {
                            let c: Vec<f64> = r.iter().map(|a| a - mu).collect();
                            let n = c.iter().map(|a| a * a).sum::<f64>().sqrt();
                            c.iter().map(|a| a / n).collect::<Vec<f64>>()
                        };
                        let (xu, yu) = (unit(&x[s]), unit(&y[s]));
                        // Scalar points: cos(x_i, y_j) = x_i · y_j, so pass them as 1-vectors whose
                        // "cosine" is that product — done directly here.
                        let cx: Vec<Vec<f64>> = xu
                            .iter()
                            .map(|xi| {
                                let dd: Vec<f64> = yu.iter().map(|yj| (1.0 - xi * yj).max(0.0)).collect();
                                let m = dd.iter().cloned().fold(f64::INFINITY, f64::min);
                                let w: Vec<f64> = dd.iter().map(|v| ((1.0 - v / (m + 1e-5)) / h).exp()).collect();
                                let z: f64 = w.iter().sum();
                                w.iter().map(|v| v / z).collect()
                            })
                            .collect();
                        let c =
                            (0..d).map(|j| cx.iter().map(|r| r[j]).fold(f64::MIN, f64::max)).sum::<f64>() / d as f64;
                        -(c + 1e-5).ln()
                    })
                    .sum();
                per_sample / b as f64
            }
        }
    }

    const MODES: [ContextualMode; 3] = [ContextualMode::Samples, ContextualMode::Dims, ContextualMode::PaperCode];

    #[test]
    fn contextual_loss_matches_a_loop_reference() -> Result<()> {
        for (b, d) in [(6, 5), (4, 9)] {
            let (x, y) = (randn(b, d, 1), randn(b, d, 2));
            for mode in MODES {
                for h in [0.5, 0.1] {
                    let ours = contextual_loss(&tensor(&x), &tensor(&y), mode, h)?.to_scalar::<f64>()?;
                    let want = loss_reference(&x, &y, mode, h);
                    assert!((ours - want).abs() < 1e-9, "{mode:?} h {h} [{b}x{d}]: {ours} vs {want}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn aligned_pairs_score_zero_and_random_pairs_high() -> Result<()> {
        let x = randn(16, 32, 3);
        // Aligned: the text side is a positive rescaling of the image side.
        let y: Vec<Vec<f64>> = x.iter().map(|r| r.iter().map(|v| 2.0 * v).collect()).collect();
        let random = randn(16, 32, 4);
        for mode in [ContextualMode::Samples, ContextualMode::Dims] {
            let aligned = contextual_loss(&tensor(&x), &tensor(&y), mode, 0.5)?.to_scalar::<f64>()?;
            let shuffled = contextual_loss(&tensor(&x), &tensor(&random), mode, 0.5)?.to_scalar::<f64>()?;
            assert!(aligned.abs() < 1e-3, "{mode:?}: aligned loss {aligned}");
            assert!(shuffled > 0.5, "{mode:?}: random loss {shuffled}");
        }
        Ok(())
    }

    #[test]
    fn contextual_loss_gradients_match_finite_differences() -> Result<()> {
        for mode in MODES {
            let x = Var::from_tensor(&tensor(&randn(5, 6, 5)))?;
            let y = Var::from_tensor(&tensor(&randn(5, 6, 6)))?;
            let vars = vec![("x".to_string(), x.clone()), ("y".to_string(), y.clone())];
            // h = 1: smooth enough for central differences at step 1e-6.
            check_gradients(&vars, &|| contextual_loss(x.as_tensor(), y.as_tensor(), mode, 1.0), 1e-6, 1e-4, 1)
                .map_err(|e| candle_core::Error::Msg(format!("{mode:?}: {e}")))?;
        }
        Ok(())
    }

    #[test]
    fn no_nan_when_rounding_pushes_a_distance_below_zero() -> Result<()> {
        // A cosine above 1 (as bf16 rounding produces) must not flip the normaliser's sign.
        let cosine = Tensor::new(&[[1.0039f32, 0.2, -0.3], [0.5, 1.0078, 0.1], [0.0, 0.3, 0.9961]], &Device::Cpu)?;
        let cx = contextual_similarity(&cosine, 0.5)?.to_scalar::<f32>()?;
        assert!(cx.is_finite() && cx > 0.0 && cx <= 1.0 + 1e-6, "CX {cx}");
        // End to end on bf16-rounded, nearly aligned embeddings, in bf16 and in f32.
        let x = tensor(&randn(8, 16, 7)).to_dtype(DType::BF16)?;
        let y = ((x.to_dtype(DType::F32)? * 1.001)?).to_dtype(DType::BF16)?;
        for mode in MODES {
            for (a, b) in [(x.clone(), y.clone()), (x.to_dtype(DType::F32)?, y.to_dtype(DType::F32)?)] {
                let a = Var::from_tensor(&a.to_dtype(DType::F32)?)?;
                let loss = contextual_loss(a.as_tensor(), &b.to_dtype(DType::F32)?, mode, 0.1)?;
                let value = loss.to_scalar::<f32>()?;
                assert!(value.is_finite(), "{mode:?}: loss {value}");
                let grad = loss.backward()?.get(a.as_tensor()).expect("gradient").sum_all()?.to_scalar::<f32>()?;
                assert!(grad.is_finite(), "{mode:?}: gradient {grad}");
            }
            let half = contextual_loss(&x, &y, mode, 0.1)?.to_scalar::<f32>()?;
            assert!(half.is_finite(), "{mode:?} in bf16: {half}");
        }
        Ok(())
    }

    /// `L_CLIP` written out: logits [t, i] = s(t, i)/τ; CE rows (t→i), columns (i→t).
    fn clip_reference(img: &[Vec<f64>], txt: &[Vec<f64>], tau: f64, ids: &[usize], cfg: &ClipLossConfig) -> f64 {
        let n = img.len();
        let unit = |v: &Vec<f64>| {
            let nn = v.iter().map(|a| a * a).sum::<f64>().sqrt();
            v.iter().map(|a| a / nn).collect::<Vec<f64>>()
        };
        let prep = |m: &[Vec<f64>]| -> Vec<Vec<f64>> {
            match cfg.similarity {
                Similarity::Dot => m.to_vec(),
                Similarity::Cosine => m.iter().map(unit).collect(),
            }
        };
        let (im, tx) = (prep(img), prep(txt));
        let dot = |a: &Vec<f64>, b: &Vec<f64>| a.iter().zip(b).map(|(p, q)| p * q).sum::<f64>();
        let logits: Vec<Vec<f64>> = (0..n).map(|t| (0..n).map(|i| dot(&tx[t], &im[i]) / tau).collect()).collect();
        let targets: Vec<Vec<f64>> = match cfg.targets {
            Targets::Hard => (0..n)
                .map(|a| {
                    let same = ids.iter().filter(|&&k| k == ids[a]).count() as f64;
                    (0..n).map(|b| if ids[a] == ids[b] { 1.0 / same } else { 0.0 }).collect()
                })
                .collect(),
            Targets::Soft => (0..n)
                .map(|a| {
                    let row: Vec<f64> =
                        (0..n).map(|b| (dot(&im[a], &im[b]) + dot(&tx[a], &tx[b])) / 2.0 * tau).collect();
                    let m = row.iter().cloned().fold(f64::MIN, f64::max);
                    let z: f64 = row.iter().map(|v| (v - m).exp()).sum();
                    row.iter().map(|v| (v - m).exp() / z).collect()
                })
                .collect(),
        };
        let ce = |row: &[f64], t: &[f64]| {
            let m = row.iter().cloned().fold(f64::MIN, f64::max);
            let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            -row.iter().zip(t).map(|(l, p)| p * (l - lse)).sum::<f64>()
        };
        (0..n)
            .map(|k| {
                let t2i = ce(&logits[k], &targets[k]);
                let col: Vec<f64> = (0..n).map(|t| logits[t][k]).collect();
                let tcol: Vec<f64> = (0..n).map(|t| targets[t][k]).collect();
                cfg.lambda * ce(&col, &tcol) + (1.0 - cfg.lambda) * t2i
            })
            .sum::<f64>()
            / n as f64
    }

    fn configs() -> Vec<ClipLossConfig> {
        let mut out = vec![];
        for similarity in [Similarity::Dot, Similarity::Cosine] {
            for targets in [Targets::Hard, Targets::Soft] {
                out.push(ClipLossConfig { lambda: 0.75, similarity, targets });
            }
        }
        out
    }

    #[test]
    fn clip_loss_matches_the_written_out_formula() -> Result<()> {
        let (img, txt) = (randn(5, 4, 8), randn(5, 4, 9));
        let ids = [0, 1, 1, 2, 3];
        for cfg in configs() {
            let tau = Tensor::new(0.7f64, &Device::Cpu)?;
            let ours = clip_loss(&tensor(&img), &tensor(&txt), &tau, &ids, &cfg)?.loss.to_scalar::<f64>()?;
            let want = clip_reference(&img, &txt, 0.7, &ids, &cfg);
            assert!((ours - want).abs() < 1e-10, "{cfg:?}: {ours} vs {want}");
        }
        Ok(())
    }

    #[test]
    fn clip_loss_gradients_match_finite_differences() -> Result<()> {
        for cfg in configs() {
            let img = Var::from_tensor(&tensor(&randn(4, 3, 10)))?;
            let txt = Var::from_tensor(&tensor(&randn(4, 3, 11)))?;
            let tau = Var::from_tensor(&Tensor::new(&[0.8f64], &Device::Cpu)?)?;
            let vars = vec![
                ("image".to_string(), img.clone()),
                ("text".to_string(), txt.clone()),
                ("tau".to_string(), tau.clone()),
            ];
            let loss = || {
                clip_loss(img.as_tensor(), txt.as_tensor(), &tau.as_tensor().squeeze(0)?, &[0, 1, 2, 3], &cfg)
                    .map(|l| l.loss)
            };
            check_gradients(&vars, &loss, 1e-6, 1e-5, 1)
                .map_err(|e| candle_core::Error::Msg(format!("{cfg:?}: {e}")))?;
        }
        Ok(())
    }
}

//! BLIP's retrieval losses: image-text contrastive (ITC) with identity-aware soft targets, and the
//! image-text matching (ITM) cross-entropy over positives and hard negatives.
//!
//! Both are written with differentiable ops only (`log_softmax` is composed from max/exp/log in
//! Candle), so gradients reach every feature and the temperature.

use candle_core::{Result, Tensor, D};

use crate::ops::upcast_half;

/// Soft ITC targets from sample identities (BLIP `blip_retrieval.py`): `targets[i][j] = 1 / n_i` when
/// text `j` belongs to the same image as image `i` (`ids[i] == ids[j]`), where `n_i` counts them.
/// With all identities distinct this is the identity matrix. `[n, n]` f32.
pub fn identity_targets(ids: &[usize], device: &candle_core::Device) -> Result<Tensor> {
    let n = ids.len();
    let mut data = vec![0f32; n * n];
    for i in 0..n {
        let same: Vec<usize> = (0..n).filter(|&j| ids[j] == ids[i]).collect();
        for &j in &same {
            data[i * n + j] = 1.0 / same.len() as f32;
        }
    }
    Tensor::from_vec(data, (n, n), device)
}

/// The parts of the ITC loss, for logging and tests.
#[derive(Debug, Clone)]
pub struct ItcLoss {
    /// `(image_to_text + text_to_image) / 2`, a scalar.
    pub loss: Tensor,
    pub image_to_text: Tensor,
    pub text_to_image: Tensor,
    /// `[n, n]` similarities divided by the temperature (image rows, text columns).
    pub logits: Tensor,
}

/// BLIP's ITC: `sim = image_features · text_featuresᵀ / temperature`, then the soft-target
/// cross-entropy `-Σ_j targets[i,j] · log_softmax(sim)[i,j]` averaged over rows, in both directions.
///
/// `image_features`, `text_features`: `[n, e]`, L2-normalised. `temperature`: a scalar tensor (BLIP
/// learns it; clamp it to [0.001, 0.5] before the forward pass as BLIP does). `targets`: `[n, n]`
/// rows summing to 1 (see [`identity_targets`]); it is symmetric, so it serves both directions.
pub fn itc_loss(
    image_features: &Tensor,
    text_features: &Tensor,
    temperature: &Tensor,
    targets: &Tensor,
) -> Result<ItcLoss> {
    // Logits, their log-sum-exp and the loss in f32 whatever the feature dtype (mixed precision).
    let (image_features, text_features) = (upcast_half(image_features)?, upcast_half(text_features)?);
    let sim = image_features.matmul(&text_features.t()?)?.broadcast_div(&upcast_half(temperature)?)?;
    let soft_ce = |logits: &Tensor| -> Result<Tensor> {
        let log_probs = candle_nn::ops::log_softmax(logits, D::Minus1)?;
        (log_probs * targets)?.sum(D::Minus1)?.neg()?.mean_all()
    };
    let image_to_text = soft_ce(&sim)?;
    let text_to_image = soft_ce(&sim.t()?)?;
    let loss = ((&image_to_text + &text_to_image)? * 0.5)?;
    Ok(ItcLoss { loss, image_to_text, text_to_image, logits: sim })
}

/// BLIP's ITM loss: cross-entropy of the `[pairs, 2]` ITM logits against labels 1 for the positive
/// pairs and 0 for the negatives (`positive_logits` `[p, 2]`, `negative_logits` `[q, 2]`).
pub fn itm_loss(positive_logits: &Tensor, negative_logits: &Tensor) -> Result<Tensor> {
    let (p, q) = (positive_logits.dim(0)?, negative_logits.dim(0)?);
    let logits = Tensor::cat(&[positive_logits, negative_logits], 0)?;
    let labels: Vec<u32> = std::iter::repeat_n(1u32, p).chain(std::iter::repeat_n(0u32, q)).collect();
    let labels = Tensor::from_vec(labels, p + q, logits.device())?;
    // Half-precision logits are lifted to f32 for the log-sum-exp; f32/f64 stay as they are.
    let logits = upcast_half(&logits)?;
    candle_nn::loss::cross_entropy(&logits, &labels)
}

/// Draws one hard negative per row `i`: a column `j` whose identity differs from the row's
/// (`col_ids[j] != row_ids[i]`) with probability `softmax(logits[i])[j]` renormalised over the
/// allowed columns (BLIP: `softmax(sim / temp)` with same-identity entries zeroed, then
/// `torch.multinomial`). A row with no allowed column (or only non-finite logits) gets `None`.
///
/// The draw is the Gumbel-max trick, `argmax_j logits[i][j] − ln(−ln u(i, j))`, which samples
/// exactly that distribution when `u(i, j)` is uniform in (0, 1). Keyed by the pair of samples
/// (`u` from the row's and the column's sample keys), a row draws the same negative however the
/// columns are ordered or split: a data-parallel run, whose rows see every rank's columns, draws
/// what one process with the whole batch draws.
pub fn sample_hard_negatives(
    logits: &[Vec<f64>],
    row_ids: &[usize],
    col_ids: &[usize],
    uniform: impl Fn(usize, usize) -> f64,
) -> Vec<Option<usize>> {
    logits
        .iter()
        .enumerate()
        .map(|(i, row)| {
            let mut best: Option<(usize, f64)> = None;
            for (j, &logit) in row.iter().enumerate() {
                if col_ids[j] == row_ids[i] || !logit.is_finite() {
                    continue;
                }
                let u = uniform(i, j).clamp(f64::MIN_POSITIVE, 1.0 - f64::EPSILON);
                let score = logit - (-u.ln()).ln();
                if best.is_none_or(|(_, b)| score > b) {
                    best = Some((j, score));
                }
            }
            best.map(|(j, _)| j)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn features(rows: &[&[f64]]) -> Tensor {
        let n = rows.len();
        let d = rows[0].len();
        let flat: Vec<f64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        let t = Tensor::from_vec(flat, (n, d), &Device::Cpu).unwrap();
        let norm = t.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap();
        t.broadcast_div(&norm).unwrap()
    }

    /// The ITC loss written out with plain loops in f64, from BLIP's definition.
    fn itc_reference(img: &[Vec<f64>], txt: &[Vec<f64>], temp: f64, ids: &[usize]) -> f64 {
        let n = img.len();
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        let sim: Vec<Vec<f64>> = (0..n).map(|i| (0..n).map(|j| dot(&img[i], &txt[j]) / temp).collect()).collect();
        let direction = |m: &dyn Fn(usize, usize) -> f64| {
            let mut total = 0.0;
            for i in 0..n {
                let lse = (0..n).map(|j| m(i, j).exp()).sum::<f64>().ln();
                let same: Vec<usize> = (0..n).filter(|&j| ids[j] == ids[i]).collect();
                total -= same.iter().map(|&j| (m(i, j) - lse) / same.len() as f64).sum::<f64>();
            }
            total / n as f64
        };
        (direction(&|i, j| sim[i][j]) + direction(&|i, j| sim[j][i])) / 2.0
    }

    fn rows(t: &Tensor) -> Vec<Vec<f64>> {
        t.to_vec2::<f64>().unwrap()
    }

    #[test]
    fn itc_matches_a_loop_implementation_with_repeated_identities() {
        let img = features(&[&[1.0, 0.2, -0.3], &[0.1, 0.9, 0.4], &[-0.5, 0.3, 0.8], &[0.7, -0.6, 0.1]]);
        let txt = features(&[&[0.9, 0.1, -0.2], &[0.2, 1.0, 0.1], &[-0.4, 0.5, 0.7], &[0.3, 0.3, 0.3]]);
        let ids = [0, 1, 1, 2];
        let temp = Tensor::new(0.07f64, &Device::Cpu).unwrap();
        let targets = identity_targets(&ids, &Device::Cpu).unwrap().to_dtype(DType::F64).unwrap();
        let ours = itc_loss(&img, &txt, &temp, &targets).unwrap().loss.to_scalar::<f64>().unwrap();
        let reference = itc_reference(&rows(&img), &rows(&txt), 0.07, &ids);
        assert!((ours - reference).abs() < 1e-10, "{ours} vs {reference}");
    }

    #[test]
    fn itm_matches_a_loop_implementation() {
        let pos = Tensor::new(&[[0.3f32, 1.2], [-0.4, 0.1]], &Device::Cpu).unwrap();
        let neg = Tensor::new(&[[0.5f32, -0.2], [1.5, 0.3], [0.0, 0.0]], &Device::Cpu).unwrap();
        let ours = itm_loss(&pos, &neg).unwrap().to_scalar::<f32>().unwrap() as f64;
        let nll = |a: f64, b: f64, label: usize| {
            let lse = (a.exp() + b.exp()).ln();
            lse - if label == 1 { b } else { a }
        };
        let reference =
            (nll(0.3, 1.2, 1) + nll(-0.4, 0.1, 1) + nll(0.5, -0.2, 0) + nll(1.5, 0.3, 0) + nll(0.0, 0.0, 0)) / 5.0;
        assert!((ours - reference).abs() < 1e-6, "{ours} vs {reference}");
    }

    /// Central differences of the ITC loss with respect to every feature and the temperature.
    #[test]
    fn itc_finite_difference_gradients() {
        let dev = Device::Cpu;
        let img0 = features(&[&[1.0, 0.2, -0.3], &[0.1, 0.9, 0.4], &[-0.5, 0.3, 0.8]]);
        let txt0 = features(&[&[0.9, 0.1, -0.2], &[0.2, 1.0, 0.1], &[-0.4, 0.5, 0.7]]);
        let ids = [0, 1, 0];
        let targets = identity_targets(&ids, &dev).unwrap().to_dtype(DType::F64).unwrap();
        let img = Var::from_tensor(&img0).unwrap();
        let txt = Var::from_tensor(&txt0).unwrap();
        let temp = Var::new(0.2f64, &dev).unwrap();
        let loss = itc_loss(&img, &txt, &temp, &targets).unwrap().loss;
        let grads = loss.backward().unwrap();
        let eval = |i: &Tensor, t: &Tensor, tau: f64| {
            let tau = Tensor::new(tau, &dev).unwrap();
            itc_loss(i, t, &tau, &targets).unwrap().loss.to_scalar::<f64>().unwrap()
        };
        let eps = 1e-6;
        for (which, var) in [("image", &img), ("text", &txt)] {
            let analytic = rows(grads.get(var).unwrap());
            let base = rows(var.as_tensor());
            for r in 0..3 {
                for c in 0..3 {
                    let bump = |delta: f64| {
                        let mut m = base.clone();
                        m[r][c] += delta;
                        let t = Tensor::new(m, &dev).unwrap();
                        if which == "image" {
                            eval(&t, &txt0, 0.2)
                        } else {
                            eval(&img0, &t, 0.2)
                        }
                    };
                    let numeric = (bump(eps) - bump(-eps)) / (2.0 * eps);
                    assert!(
                        (numeric - analytic[r][c]).abs() < 1e-6,
                        "{which}[{r},{c}]: {numeric} vs {}",
                        analytic[r][c]
                    );
                }
            }
        }
        let numeric = (eval(&img0, &txt0, 0.2 + eps) - eval(&img0, &txt0, 0.2 - eps)) / (2.0 * eps);
        let analytic = grads.get(&temp).unwrap().to_scalar::<f64>().unwrap();
        assert!((numeric - analytic).abs() < 1e-6, "temperature: {numeric} vs {analytic}");
        assert!(analytic.abs() > 1e-3, "the temperature gradient is not trivially zero");
    }

    #[test]
    fn itm_finite_difference_gradients() {
        let dev = Device::Cpu;
        let pos0 = vec![vec![0.3f64, 1.2], vec![-0.4, 0.1]];
        let neg0 = vec![vec![0.5f64, -0.2], vec![1.5, 0.3]];
        let pos = Var::new(pos0.clone(), &dev).unwrap();
        let neg = Var::new(neg0.clone(), &dev).unwrap();
        let grads = itm_loss(&pos, &neg).unwrap().backward().unwrap();
        let eval = |p: &[Vec<f64>], n: &[Vec<f64>]| {
            let p = Tensor::new(p.to_vec(), &dev).unwrap();
            let n = Tensor::new(n.to_vec(), &dev).unwrap();
            itm_loss(&p, &n).unwrap().to_scalar::<f64>().unwrap()
        };
        let eps = 1e-6;
        for (which, var, base) in [("positive", &pos, &pos0), ("negative", &neg, &neg0)] {
            let analytic = rows(grads.get(var).unwrap());
            for r in 0..2 {
                for c in 0..2 {
                    let bump = |delta: f64| {
                        let mut m = base.clone();
                        m[r][c] += delta;
                        if which == "positive" {
                            eval(&m, &neg0)
                        } else {
                            eval(&pos0, &m)
                        }
                    };
                    let numeric = (bump(eps) - bump(-eps)) / (2.0 * eps);
                    assert!(
                        (numeric - analytic[r][c]).abs() < 1e-8,
                        "{which}[{r},{c}]: {numeric} vs {}",
                        analytic[r][c]
                    );
                }
            }
        }
    }

    #[test]
    fn hard_negatives_follow_the_masked_softmax() {
        let sim = vec![
            vec![5.0, 1.0, 0.0, 2.0],
            vec![1.0, 5.0, 3.0, 0.0],
            vec![0.0, 0.0, 0.0, 0.0],
            vec![9.0, 9.0, 9.0, 9.0],
        ];
        let ids = [0, 1, 2, 0];
        // Expected distribution for row 0: j ∈ {1, 2} (j = 0 and 3 share identity 0); row 1: j ∈
        // {0, 2, 3}.
        let (w1, w2) = (1f64.exp(), 0f64.exp());
        let p1 = w1 / (w1 + w2);
        let row1: Vec<f64> = [1f64, 3.0, 0.0].iter().map(|l| l.exp()).collect();
        let row1_p2 = row1[1] / row1.iter().sum::<f64>();
        let mut counts = [[0usize; 4]; 2];
        let n = 40_000u64;
        for k in 0..n {
            let uniform = |i: usize, j: usize| {
                let mut r = SplitMix(k.wrapping_mul(1_000_003) ^ ((i as u64) << 32) ^ j as u64);
                (r.next() >> 11) as f64 / (1u64 << 53) as f64
            };
            let picks = sample_hard_negatives(&sim, &ids, &ids, uniform);
            counts[0][picks[0].unwrap()] += 1;
            counts[1][picks[1].unwrap()] += 1;
            for (i, p) in picks.iter().enumerate() {
                assert_ne!(ids[p.unwrap()], ids[i], "row {i} drew a same-identity negative");
            }
        }
        assert_eq!(counts[0][0] + counts[0][3] + counts[1][1], 0);
        let share = |c: usize| c as f64 / n as f64;
        assert!((share(counts[0][1]) - p1).abs() < 0.01, "{} vs {p1}", share(counts[0][1]));
        assert!((share(counts[1][2]) - row1_p2).abs() < 0.01, "{} vs {row1_p2}", share(counts[1][2]));
        // The draw of a row depends on its candidates, not on their order: reversed columns (and
        // the noise keyed by the same pairs) give the same picks.
        let key = |i: usize, j: usize| ((i * 7 + j * 13) % 97) as f64 / 97.0 + 0.005;
        let forward = sample_hard_negatives(&sim, &ids, &ids, key);
        let reversed: Vec<Vec<f64>> = sim.iter().map(|r| r.iter().rev().copied().collect()).collect();
        let rev_ids: Vec<usize> = ids.iter().rev().copied().collect();
        let backward = sample_hard_negatives(&reversed, &ids, &rev_ids, |i, j| key(i, 3 - j));
        assert_eq!(forward, backward.iter().map(|p| p.map(|j| 3 - j)).collect::<Vec<_>>());
        // A batch of one identity has no negatives.
        assert_eq!(
            sample_hard_negatives(&[vec![1.0, 2.0], vec![2.0, 1.0]], &[7, 7], &[7, 7], |_, _| 0.5),
            vec![None, None]
        );
    }

    /// A self-contained uniform source for the sampler test.
    struct SplitMix(u64);
    impl SplitMix {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
    }
}

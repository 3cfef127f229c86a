//! Linear probe: multinomial logistic regression on frozen features, its L2 strength chosen on a
//! held-out part of the training features (CLIP's protocol sweeps the regularisation on a
//! validation split, then refits on train + validation).
//!
//! Features are standardised with the training statistics; the convex objective
//! `mean CE + λ/2·‖W‖²` (bias unregularised) is minimised by accelerated gradient descent with the
//! step `1/L` from its Lipschitz bound, so every fit converges without a tuned learning rate.

use serde::Serialize;

use crate::zeroshot::ClassificationMetrics;

/// A fitted classifier (standardisation included).
#[derive(Debug, Clone)]
pub struct LogisticRegression {
    /// `[classes][dims]`
    pub weights: Vec<Vec<f64>>,
    pub bias: Vec<f64>,
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

fn standardiser(x: &[Vec<f32>]) -> (Vec<f64>, Vec<f64>) {
    let d = x.first().map_or(0, |r| r.len());
    let n = x.len().max(1) as f64;
    let mean: Vec<f64> = (0..d).map(|k| x.iter().map(|r| r[k] as f64).sum::<f64>() / n).collect();
    let std: Vec<f64> =
        (0..d).map(|k| (x.iter().map(|r| (r[k] as f64 - mean[k]).powi(2)).sum::<f64>() / n).sqrt().max(1e-8)).collect();
    (mean, std)
}

fn softmax_in_place(z: &mut [f64]) {
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let mut s = 0.0;
    for v in z.iter_mut() {
        *v = (*v - m).exp();
        s += *v;
    }
    for v in z.iter_mut() {
        *v /= s;
    }
}

impl LogisticRegression {
    /// Fits on features `x` (rows) and labels `y < classes` with L2 strength `l2`.
    pub fn fit(x: &[Vec<f32>], y: &[usize], classes: usize, l2: f64, iterations: usize) -> Self {
        let (mean, std) = standardiser(x);
        let d = mean.len();
        let n = x.len();
        let xs: Vec<Vec<f64>> =
            x.iter().map(|r| r.iter().enumerate().map(|(k, v)| (*v as f64 - mean[k]) / std[k]).collect()).collect();
        // Lipschitz constant of the mean cross-entropy in (W, b): ≤ ½·λmax(X̃ᵀX̃ / n), X̃ = [X, 1];
        // λmax by power iteration.
        let mut v = vec![1.0 / ((d + 1) as f64).sqrt(); d + 1];
        let mut lambda_max = 1.0;
        for _ in 0..30 {
            let mut w = vec![0.0; d + 1];
            for r in &xs {
                let dot: f64 = r.iter().zip(&v).map(|(a, b)| a * b).sum::<f64>() + v[d];
                for k in 0..d {
                    w[k] += dot * r[k];
                }
                w[d] += dot;
            }
            let norm = w.iter().map(|a| a * a).sum::<f64>().sqrt() / n.max(1) as f64;
            lambda_max = norm;
            let len = w.iter().map(|a| a * a).sum::<f64>().sqrt().max(1e-12);
            v = w.iter().map(|a| a / len).collect();
        }
        let step = 1.0 / (0.5 * lambda_max + l2);
        let zeros = || (vec![vec![0.0; d]; classes], vec![0.0; classes]);
        let (mut w, mut b) = zeros();
        let (mut w_prev, mut b_prev) = zeros();
        for t in 0..iterations {
            // Nesterov look-ahead point.
            let momentum = t as f64 / (t as f64 + 3.0);
            let look_w: Vec<Vec<f64>> = w
                .iter()
                .zip(&w_prev)
                .map(|(a, p)| a.iter().zip(p).map(|(x, y)| x + momentum * (x - y)).collect())
                .collect();
            let look_b: Vec<f64> = b.iter().zip(&b_prev).map(|(x, y)| x + momentum * (x - y)).collect();
            let (mut gw, mut gb) = zeros();
            for (r, &label) in xs.iter().zip(y) {
                let mut z: Vec<f64> = look_w
                    .iter()
                    .zip(&look_b)
                    .map(|(wc, bc)| wc.iter().zip(r).map(|(a, b)| a * b).sum::<f64>() + bc)
                    .collect();
                softmax_in_place(&mut z);
                z[label] -= 1.0;
                for c in 0..classes {
                    let e = z[c] / n as f64;
                    gb[c] += e;
                    for k in 0..d {
                        gw[c][k] += e * r[k];
                    }
                }
            }
            w_prev = w;
            b_prev = b;
            w = look_w
                .iter()
                .zip(&gw)
                .map(|(lw, g)| lw.iter().zip(g).map(|(a, gk)| a - step * (gk + l2 * a)).collect())
                .collect();
            b = look_b.iter().zip(&gb).map(|(a, g)| a - step * g).collect();
        }
        Self { weights: w, bias: b, mean, std }
    }

    /// Class scores (logits) `[n][classes]`.
    pub fn scores(&self, x: &[Vec<f32>]) -> Vec<Vec<f32>> {
        x.iter()
            .map(|r| {
                let z: Vec<f64> = r.iter().enumerate().map(|(k, v)| (*v as f64 - self.mean[k]) / self.std[k]).collect();
                self.weights
                    .iter()
                    .zip(&self.bias)
                    .map(|(wc, bc)| (wc.iter().zip(&z).map(|(a, b)| a * b).sum::<f64>() + bc) as f32)
                    .collect()
            })
            .collect()
    }
}

/// What a probe chose and reached.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    /// `(λ, validation top-1)` for every λ tried.
    pub validation: Vec<(f64, f64)>,
    pub chosen_l2: f64,
    /// On the test features, after refitting on all training features with the chosen λ.
    pub metrics: ClassificationMetrics,
}

/// CLIP-style sweep: λ ∈ 10^{-6..0} (and 0), chosen by top-1 on a `val_fraction` part of the
/// training features (a fixed shuffle from `seed`).
pub const L2_GRID: [f64; 8] = [0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];

/// Fits the probe on `(train_x, train_y)`, chooses λ on a held-out share, refits, and evaluates on
/// `(test_x, test_y)`.
pub fn linear_probe(
    train_x: &[Vec<f32>],
    train_y: &[usize],
    test_x: &[Vec<f32>],
    test_y: &[usize],
    classes: usize,
    val_fraction: f64,
    seed: u64,
) -> ProbeReport {
    let mut order: Vec<usize> = (0..train_x.len()).collect();
    let mut s = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    for i in (1..order.len()).rev() {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        order.swap(i, (s >> 33) as usize % (i + 1));
    }
    let n_val =
        ((train_x.len() as f64 * val_fraction).round() as usize).clamp(1, train_x.len().saturating_sub(1).max(1));
    let (val_idx, fit_idx) = order.split_at(n_val);
    let pick = |idx: &[usize]| -> (Vec<Vec<f32>>, Vec<usize>) {
        (idx.iter().map(|&i| train_x[i].clone()).collect(), idx.iter().map(|&i| train_y[i]).collect())
    };
    let (fx, fy) = pick(fit_idx);
    let (vx, vy) = pick(val_idx);
    const ITERATIONS: usize = 300;
    let validation: Vec<(f64, f64)> = L2_GRID
        .iter()
        .map(|&l2| {
            let model = LogisticRegression::fit(&fx, &fy, classes, l2, ITERATIONS);
            (l2, ClassificationMetrics::compute(&model.scores(&vx), &vy).acc1)
        })
        .collect();
    // Highest validation accuracy; ties go to the stronger regularisation.
    let chosen_l2 = validation
        .iter()
        .fold((f64::NEG_INFINITY, 0.0), |best, &(l2, acc)| if acc >= best.0 { (acc, l2) } else { best })
        .1;
    let model = LogisticRegression::fit(train_x, train_y, classes, chosen_l2, ITERATIONS);
    let metrics = ClassificationMetrics::compute(&model.scores(test_x), test_y);
    ProbeReport { validation, chosen_l2, metrics }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three Gaussian blobs in 4-d, well separated along different axes.
    fn blobs(n_per: usize, seed: u64) -> (Vec<Vec<f32>>, Vec<usize>) {
        let mut s = seed;
        let mut noise = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64 - 0.5) as f32
        };
        let mut x = vec![];
        let mut y = vec![];
        for c in 0..3 {
            for _ in 0..n_per {
                let mut r: Vec<f32> = (0..4).map(|_| noise()).collect();
                r[c] += 3.0;
                x.push(r);
                y.push(c);
            }
        }
        (x, y)
    }

    #[test]
    fn separable_blobs_are_learned_and_the_objective_decreases() {
        let (x, y) = blobs(30, 1);
        let (tx, ty) = blobs(10, 2);
        let report = linear_probe(&x, &y, &tx, &ty, 3, 0.2, 0);
        assert_eq!(report.metrics.acc1, 1.0, "{report:?}");
        assert_eq!(report.validation.len(), L2_GRID.len());
        // Strong regularisation shrinks the weights: ‖W‖ at λ=1 below ‖W‖ at λ=0.
        let norm = |m: &LogisticRegression| m.weights.iter().flatten().map(|v| v * v).sum::<f64>();
        let free = LogisticRegression::fit(&x, &y, 3, 0.0, 200);
        let tight = LogisticRegression::fit(&x, &y, 3, 1.0, 200);
        assert!(norm(&tight) < norm(&free));
    }

    #[test]
    fn converges_to_the_stationary_point() {
        // At the optimum the gradient of mean CE + λ/2‖W‖² vanishes: check it numerically.
        let (x, y) = blobs(20, 3);
        let l2 = 0.1;
        let m = LogisticRegression::fit(&x, &y, 3, l2, 2000);
        let scores = m.scores(&x);
        let n = x.len() as f64;
        let mut grad_b = [0.0f64; 3];
        for (row, &label) in scores.iter().zip(&y) {
            let mut z: Vec<f64> = row.iter().map(|v| *v as f64).collect();
            softmax_in_place(&mut z);
            z[label] -= 1.0;
            for c in 0..3 {
                grad_b[c] += z[c] / n;
            }
        }
        assert!(grad_b.iter().all(|g| g.abs() < 1e-4), "bias gradient {grad_b:?}");
    }
}

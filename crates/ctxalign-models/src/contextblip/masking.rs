//! Which patches TMIM hides: the text-guided mask (cross-attention of one text token, top-π
//! patches) and random masking for ablations, plus the index bookkeeping of an MAE-style pass.
//!
//! Random draws come in as a closure returning U[0, 1) so the caller owns the seed (a resumed run
//! draws the same masks).

use candle_core::{bail, Device, Result, Tensor};
use serde::{Deserialize, Serialize};

/// How the masked patches are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskSelection {
    /// The patches the chosen text token attends to most (ContextBLIP).
    TextGuided,
    /// Uniformly random patches (the ablation).
    Random,
}

/// Which text token's attention row guides the mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenChoice {
    /// Per sample, a random token that is neither special nor padding (ours).
    Content,
    /// One random position for the whole batch, possibly a special or padding token (the authors'
    /// code; kept to reproduce it).
    SharedPosition,
}

/// Settings of TMIM's masking.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MaskingConfig {
    /// Share π of the patches to mask: `int(π · patches)` of them (at least 1, at most all but 1).
    pub ratio: f64,
    pub selection: MaskSelection,
    pub token_choice: TokenChoice,
    /// After L2-normalising the attention row, U[0, noise) is added to each patch score (the
    /// reference's 0.02) so ties and near-ties do not always mask the same patches.
    pub noise: f64,
}

impl Default for MaskingConfig {
    /// The paper's: π = 0.25, text-guided, noise 0.02; token per sample (see [`TokenChoice`]).
    fn default() -> Self {
        Self { ratio: 0.25, selection: MaskSelection::TextGuided, token_choice: TokenChoice::Content, noise: 0.02 }
    }
}

impl MaskingConfig {
    /// Number of masked patches out of `patches`.
    pub fn masked_count(&self, patches: usize) -> Result<usize> {
        if !(self.ratio > 0.0 && self.ratio < 1.0) {
            bail!("mask ratio must be in (0, 1), got {}", self.ratio)
        }
        if patches < 2 {
            bail!("masking needs at least 2 patches, got {patches}")
        }
        Ok(((self.ratio * patches as f64) as usize).clamp(1, patches - 1))
    }
}

/// Picks, per sample, the text position whose attention guides the mask.
///
/// `ids[b]` are sample b's token ids, `mask[b]` its 1/0 attention mask; `special` lists ids never
/// chosen under [`TokenChoice::Content`] (`[CLS]`/`[ENC]`, `[SEP]`, `[PAD]`). A sample with no
/// content token falls back to position 0.
pub fn choose_tokens(
    ids: &[Vec<u32>],
    mask: &[Vec<u32>],
    special: &[u32],
    choice: TokenChoice,
    draw: &mut dyn FnMut() -> f64,
) -> Vec<usize> {
    match choice {
        TokenChoice::SharedPosition => {
            let len = ids.first().map_or(1, Vec::len).max(1);
            let pos = ((draw() * len as f64) as usize).min(len - 1);
            vec![pos; ids.len()]
        }
        TokenChoice::Content => ids
            .iter()
            .zip(mask)
            .map(|(row, m)| {
                let allowed: Vec<usize> = (0..row.len()).filter(|&t| m[t] == 1 && !special.contains(&row[t])).collect();
                if allowed.is_empty() {
                    0
                } else {
                    allowed[((draw() * allowed.len() as f64) as usize).min(allowed.len() - 1)]
                }
            })
            .collect(),
    }
}

/// The `k` patches with the highest score after L2-normalising `scores` (one token's attention
/// over the patches) and adding U[0, noise); in descending order of the noisy score.
pub fn text_guided_patches(scores: &[f32], k: usize, noise: f64, draw: &mut dyn FnMut() -> f64) -> Vec<usize> {
    let norm = scores.iter().map(|s| (*s as f64).powi(2)).sum::<f64>().sqrt().max(1e-12);
    let noisy: Vec<f64> =
        scores.iter().map(|s| *s as f64 / norm + if noise > 0.0 { noise * draw() } else { 0.0 }).collect();
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| noisy[b].total_cmp(&noisy[a]).then(a.cmp(&b)));
    order.truncate(k);
    order
}

/// `k` distinct patches out of `patches`, uniformly (partial Fisher–Yates).
pub fn random_patches(patches: usize, k: usize, draw: &mut dyn FnMut() -> f64) -> Vec<usize> {
    let mut all: Vec<usize> = (0..patches).collect();
    for i in 0..k.min(patches) {
        let j = i + ((draw() * (patches - i) as f64) as usize).min(patches - i - 1);
        all.swap(i, j);
    }
    all.truncate(k);
    all
}

/// The masked patches of a batch and the index tensors an MAE-style pass needs. Token sequences are
/// `[CLS, patch 0, …, patch P-1]`; every sample masks the same number `k` of patches.
#[derive(Debug, Clone, PartialEq)]
pub struct PatchMask {
    /// Per sample, the masked patch indices (0-based, CLS excluded), ascending.
    pub masked: Vec<Vec<usize>>,
    pub num_patches: usize,
}

impl PatchMask {
    pub fn new(mut masked: Vec<Vec<usize>>, num_patches: usize) -> Result<Self> {
        let k = masked.first().map_or(0, Vec::len);
        for (b, m) in masked.iter_mut().enumerate() {
            m.sort_unstable();
            m.dedup();
            if m.len() != k || k == 0 || k >= num_patches || m.last().is_some_and(|&p| p >= num_patches) {
                bail!("sample {b}: needs {k} distinct masked patches out of {num_patches} (1 ≤ k < patches), got {m:?}")
            }
        }
        Ok(Self { masked, num_patches })
    }

    pub fn batch(&self) -> usize {
        self.masked.len()
    }

    /// Masked patches per sample (k).
    pub fn masked_count(&self) -> usize {
        self.masked[0].len()
    }

    /// Per sample, the visible patches, ascending.
    pub fn visible(&self) -> Vec<Vec<usize>> {
        self.masked.iter().map(|m| (0..self.num_patches).filter(|p| m.binary_search(p).is_err()).collect()).collect()
    }

    /// Rows of the flattened `[B·(1+P), d]` tokens that stay visible: CLS then the visible patches
    /// of each sample, in order. `[B·(1+P−k)]` u32.
    pub fn visible_token_rows(&self, device: &Device) -> Result<Tensor> {
        let t = 1 + self.num_patches;
        let rows: Vec<u32> = self
            .visible()
            .iter()
            .enumerate()
            .flat_map(|(b, vis)| {
                std::iter::once((b * t) as u32).chain(vis.iter().map(move |&p| (b * t + 1 + p) as u32))
            })
            .collect();
        Tensor::new(rows, device)
    }

    /// Rows of the flattened `[B·(1+P), d]` tokens at the masked patches. `[B·k]` u32.
    pub fn masked_token_rows(&self, device: &Device) -> Result<Tensor> {
        let t = 1 + self.num_patches;
        let rows: Vec<u32> =
            self.masked.iter().enumerate().flat_map(|(b, m)| m.iter().map(move |&p| (b * t + 1 + p) as u32)).collect();
        Tensor::new(rows, device)
    }

    /// Token positions (1-based, CLS = 0) of the masked patches, `[B·k]` u32: rows of a `[1+P, d]`
    /// position table.
    pub fn masked_positions(&self, device: &Device) -> Result<Tensor> {
        Tensor::new(self.masked.iter().flatten().map(|&p| (1 + p) as u32).collect::<Vec<_>>(), device)
    }

    /// Rows of the flattened `[B·(1+P), S]` patch targets… without CLS: rows of `[B·P, S]` at the
    /// masked patches. `[B·k]` u32.
    pub fn masked_patch_rows(&self, device: &Device) -> Result<Tensor> {
        let p = self.num_patches;
        let rows: Vec<u32> =
            self.masked.iter().enumerate().flat_map(|(b, m)| m.iter().map(move |&i| (b * p + i) as u32)).collect();
        Tensor::new(rows, device)
    }

    /// Puts `[visible tokens (1+P−k); mask tokens (k)]` of each sample back into the original
    /// order: rows into the flattened `[B·(1+P), d]` concatenation, giving `[B·(1+P)]` u32.
    pub fn restore_rows(&self, device: &Device) -> Result<Tensor> {
        let (t, k) = (1 + self.num_patches, self.masked_count());
        let mut rows = Vec::with_capacity(self.batch() * t);
        for (b, m) in self.masked.iter().enumerate() {
            let base = b * t;
            let (mut next_visible, mut next_masked) = (1usize, 0usize);
            rows.push(base as u32); // CLS
            for p in 0..self.num_patches {
                if next_masked < k && m[next_masked] == p {
                    rows.push((base + (t - k) + next_masked) as u32);
                    next_masked += 1;
                } else {
                    rows.push((base + next_visible) as u32);
                    next_visible += 1;
                }
            }
        }
        Tensor::new(rows, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter() -> impl FnMut() -> f64 {
        let mut state = 12345u64;
        move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    #[test]
    fn masked_count_follows_int_of_ratio_times_patches() {
        let cfg = MaskingConfig::default();
        assert_eq!(cfg.masked_count(196).unwrap(), 49);
        assert_eq!(cfg.masked_count(64).unwrap(), 16);
        assert_eq!(MaskingConfig { ratio: 0.75, ..cfg.clone() }.masked_count(64).unwrap(), 48);
        assert_eq!(MaskingConfig { ratio: 0.1, ..cfg.clone() }.masked_count(4).unwrap(), 1);
        assert!(MaskingConfig { ratio: 1.0, ..cfg }.masked_count(64).is_err());
    }

    #[test]
    fn content_choice_skips_special_and_padding_tokens() {
        let ids = vec![vec![101, 7, 8, 102, 0, 0], vec![101, 102, 0, 0, 0, 0]];
        let mask = vec![vec![1, 1, 1, 1, 0, 0], vec![1, 1, 0, 0, 0, 0]];
        let mut draw = counter();
        for _ in 0..50 {
            let chosen = choose_tokens(&ids, &mask, &[101, 102, 0], TokenChoice::Content, &mut draw);
            assert!(chosen[0] == 1 || chosen[0] == 2, "{chosen:?}");
            assert_eq!(chosen[1], 0, "no content token: falls back to position 0");
        }
        let shared = choose_tokens(&ids, &mask, &[], TokenChoice::SharedPosition, &mut draw);
        assert_eq!(shared[0], shared[1]);
    }

    #[test]
    fn text_guided_patches_are_the_top_scores_without_noise() {
        let scores = [0.1f32, 0.5, 0.05, 0.3, 0.05];
        assert_eq!(text_guided_patches(&scores, 2, 0.0, &mut counter()), vec![1, 3]);
        // Noise smaller than the gaps changes nothing; it only breaks near-ties.
        assert_eq!(text_guided_patches(&scores, 2, 0.01, &mut counter()), vec![1, 3]);
    }

    #[test]
    fn random_patches_are_distinct_and_cover_all_positions_over_draws() {
        let mut draw = counter();
        let mut seen = [0usize; 8];
        for _ in 0..200 {
            let p = random_patches(8, 3, &mut draw);
            let mut s = p.clone();
            s.sort();
            s.dedup();
            assert_eq!(s.len(), 3);
            for i in p {
                seen[i] += 1;
            }
        }
        assert!(seen.iter().all(|&c| c > 40), "{seen:?}");
    }

    /// The index tensors, checked against a direct construction of the MAE gather/restore.
    #[test]
    fn restore_inverts_the_visible_then_masked_split() -> Result<()> {
        let dev = Device::Cpu;
        let mask = PatchMask::new(vec![vec![3, 0], vec![1, 2]], 5)?;
        assert_eq!(mask.visible(), vec![vec![1, 2, 4], vec![0, 3, 4]]);
        // Tokens labelled by (sample, position) → value 10·b + pos.
        let tokens: Vec<f32> = (0..2).flat_map(|b| (0..6).map(move |t| (10 * b + t) as f32)).collect();
        let tokens = Tensor::from_vec(tokens, (12, 1), &dev)?;
        let visible = tokens.index_select(&mask.visible_token_rows(&dev)?, 0)?.reshape((2, 4, 1))?;
        let masked = tokens.index_select(&mask.masked_token_rows(&dev)?, 0)?.reshape((2, 2, 1))?;
        let joined = Tensor::cat(&[visible, masked], 1)?.reshape((12, 1))?;
        let restored = joined.index_select(&mask.restore_rows(&dev)?, 0)?;
        assert_eq!(restored.flatten_all()?.to_vec1::<f32>()?, tokens.flatten_all()?.to_vec1::<f32>()?);
        assert_eq!(mask.masked_positions(&dev)?.to_vec1::<u32>()?, vec![1, 4, 2, 3]);
        assert_eq!(mask.masked_patch_rows(&dev)?.to_vec1::<u32>()?, vec![0, 3, 6, 7]);
        assert!(PatchMask::new(vec![vec![1], vec![1, 2]], 5).is_err());
        assert!(PatchMask::new(vec![vec![5]], 5).is_err());
        Ok(())
    }
}

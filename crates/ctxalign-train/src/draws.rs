//! The random draws of a training step, keyed by sample.
//!
//! Every draw an objective makes (hard negatives, the token that guides a mask, mask noise, dropout)
//! derives from the run seed, the optimizer step, what the draw is for, and the key of the sample it
//! concerns — the sample's index in its data set. Not from its position in the batch, nor from the
//! rank that holds it: a resumed run draws what the uninterrupted one drew, and W ranks with batch b
//! draw what one process with batch W·b draws (the equivalence the data-parallel tests check).

use ctxalign_data::loader::Batch;
use ctxalign_data::rng::Rng;

use crate::replay::Replay;

/// What a draw is for: each purpose has streams of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// The negative image of a text (BLIP's ITM).
    NegativeImage = 1,
    /// The negative text of an image.
    NegativeText = 2,
    /// The token whose cross-attention guides a sample's TMIM mask.
    GuideToken = 3,
    /// The noise added to the attention scores before picking the masked patches.
    MaskNoise = 4,
    /// Random masking (the ablation).
    RandomMask = 5,
    /// Dropout masks.
    Dropout = 6,
    /// One position for a whole batch (the authors' token choice; per rank in a data-parallel run).
    BatchPosition = 7,
}

/// The draws of one micro-batch: run seed, step, and one key per sample (in batch order).
///
/// When the run replays a reference run ([`Replay`]), an objective takes that run's choices from
/// [`SampleDraws::recorded`] where it would draw (hard-negative indices, guide tokens, mask noise),
/// and computes everything else as in any run.
#[derive(Debug, Clone)]
pub struct SampleDraws {
    pub seed: u64,
    pub step: u64,
    pub keys: Vec<u64>,
    /// The reference run being replayed, if any.
    pub replay: Option<Replay>,
}

impl SampleDraws {
    pub fn new(seed: u64, step: u64, keys: Vec<u64>) -> Self {
        Self { seed, step, keys, replay: None }
    }

    /// These draws taken from `replay` where it recorded them.
    pub fn replaying(mut self, replay: Option<&Replay>) -> Self {
        self.replay = replay.cloned();
        self
    }

    /// The replayed run's draw `name` at this step (`step.{step}.draw.{name}` of its recording),
    /// on `device`; `None` when not replaying. Replaying a run that did not record a draw the
    /// objective needs is an error, not a silent fresh draw.
    pub fn recorded(&self, name: &str, device: &candle_core::Device) -> Option<crate::Result<candle_core::Tensor>> {
        self.replay.as_ref().map(|r| r.draw(self.step, name, device))
    }

    /// Keys 0, 1, …, n − 1 at step 0: for a single call outside the loop (tests, one-off losses).
    pub fn sequential(seed: u64, n: usize) -> Self {
        Self::new(seed, 0, (0..n as u64).collect())
    }

    /// A loader batch's draws at `step`: its samples' data-set indices are the keys.
    pub fn of_batch<T>(seed: u64, step: u64, batch: &Batch<T>) -> Self {
        Self::new(seed, step, batch.indices.iter().map(|&i| i as u64).collect())
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Sample `i`'s stream for `purpose`.
    pub fn rng(&self, i: usize, purpose: Purpose) -> Rng {
        self.rng_for_key(self.keys[i], purpose)
    }

    /// The stream of the sample with `key` for `purpose` (a sample of another rank's batch).
    pub fn rng_for_key(&self, key: u64, purpose: Purpose) -> Rng {
        Rng::keyed(self.seed, &[self.step, purpose as u64, key])
    }

    /// One seed per sample (dropout masks).
    pub fn seeds(&self, purpose: Purpose) -> Vec<u64> {
        (0..self.len()).map(|i| self.rng(i, purpose).next_u64()).collect()
    }

    /// A uniform in (0, 1) for the pair of samples `(a, b)` (by key): the noise of a hard-negative
    /// draw, the same whichever rank evaluates it.
    pub fn pair_uniform(&self, purpose: Purpose, a: u64, b: u64) -> f64 {
        let bits = Rng::keyed(self.seed, &[self.step, purpose as u64, a, b]).next_u64() >> 11;
        (bits as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// A stream for the batch as a whole (keyed by its first sample).
    pub fn batch_rng(&self, purpose: Purpose) -> Rng {
        self.rng_for_key(self.keys.first().copied().unwrap_or(0), purpose)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_draw_depends_on_its_sample_not_its_place() {
        let a = SampleDraws::new(3, 7, vec![10, 11, 12]);
        let b = SampleDraws::new(3, 7, vec![12, 10]);
        assert_eq!(a.rng(2, Purpose::MaskNoise).next_u64(), b.rng(0, Purpose::MaskNoise).next_u64());
        assert_ne!(a.rng(2, Purpose::MaskNoise).next_u64(), a.rng(2, Purpose::GuideToken).next_u64());
        assert_ne!(
            a.rng(0, Purpose::Dropout).next_u64(),
            SampleDraws::new(3, 8, vec![10]).rng(0, Purpose::Dropout).next_u64()
        );
        assert_eq!(a.pair_uniform(Purpose::NegativeImage, 10, 12), b.pair_uniform(Purpose::NegativeImage, 10, 12));
        assert_ne!(a.pair_uniform(Purpose::NegativeImage, 10, 12), a.pair_uniform(Purpose::NegativeImage, 12, 10));
        let u = a.pair_uniform(Purpose::NegativeText, 1, 2);
        assert!(u > 0.0 && u < 1.0);
    }
}

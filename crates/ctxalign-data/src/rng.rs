//! A small deterministic RNG (SplitMix64): same seed, same stream, on every platform and thread
//! count — what shuffling, augmentation and the scene generator need for reproducibility.

#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// An independent stream for `(seed, a, b)`, e.g. (run seed, epoch, sample index).
    pub fn derive(seed: u64, a: u64, b: u64) -> Self {
        let mut r = Self(seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let x = r.next_u64() ^ b.wrapping_mul(0xD1B5_4A32_D192_ED03);
        Self(x)
    }

    /// An independent stream for a tuple of keys, e.g. (run seed; step, purpose, sample index).
    pub fn keyed(seed: u64, keys: &[u64]) -> Self {
        keys.iter().enumerate().fold(Self::new(seed), |r, (i, &k)| Self::derive(r.0, k, i as u64 + 1))
    }

    pub fn state(&self) -> u64 {
        self.0
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [lo, hi).
    pub fn range_f64(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.f64()
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.f64() * n as f64) as usize % n.max(1)
    }

    pub fn bool(&mut self, p: f64) -> bool {
        self.f64() < p
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// Fisher–Yates.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

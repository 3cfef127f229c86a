//! Learning-rate schedules as a factor on every group's base learning rate (PyTorch's `LambdaLR`
//! view): a linear warm-up, then a decay, times a reduce-on-plateau factor.

use serde::{Deserialize, Serialize};

/// The decay after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Decay {
    Constant,
    /// Cosine from 1 to `min_factor` over `total_steps` optimizer steps (counted from step 0).
    Cosine {
        total_steps: u64,
        min_factor: f64,
    },
    /// Linear from 1 to `min_factor` over `total_steps`.
    Linear {
        total_steps: u64,
        min_factor: f64,
    },
    /// BLIP's `cosine_lr_schedule`: cosine over epochs, constant within an epoch.
    CosineEpochs {
        epochs: u64,
        min_factor: f64,
    },
    /// `gamma^epoch` (BLIP pre-training's `step_lr_schedule` has `gamma` = 0.9…0.85).
    PerEpoch {
        gamma: f64,
    },
}

/// `ReduceLROnPlateau` (mode "min", relative threshold): after more than `patience` evaluations
/// without a relative improvement of `threshold`, multiply by `factor`, down to `min_factor`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Plateau {
    pub factor: f64,
    pub patience: u32,
    pub threshold: f64,
    pub min_factor: f64,
}

impl Default for Plateau {
    fn default() -> Self {
        Self { factor: 0.1, patience: 10, threshold: 1e-4, min_factor: 0.0 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleConfig {
    /// Optimizer steps of linear warm-up from `warmup_start_factor` to 1.
    pub warmup_steps: u64,
    pub warmup_start_factor: f64,
    pub decay: Decay,
    pub plateau: Option<Plateau>,
}

impl ScheduleConfig {
    /// Factor 1 throughout. A `warmup_steps` set on top of it ramps from 0, as every warm-up here
    /// does (a start factor of 1 would make the warm-up a silent no-op).
    pub fn constant() -> Self {
        Self { warmup_steps: 0, warmup_start_factor: 0.0, decay: Decay::Constant, plateau: None }
    }
    /// Linear warm-up from 0, then `gamma^epoch` (BLIP / ContextBLIP pre-training: 3000 steps, 0.9).
    pub fn warmup_per_epoch(warmup_steps: u64, gamma: f64) -> Self {
        Self { warmup_steps, warmup_start_factor: 0.0, decay: Decay::PerEpoch { gamma }, plateau: None }
    }

    /// Linear warm-up then cosine to `min_factor` at `total_steps`.
    pub fn warmup_cosine(warmup_steps: u64, total_steps: u64, min_factor: f64) -> Self {
        Self { warmup_steps, warmup_start_factor: 0.0, decay: Decay::Cosine { total_steps, min_factor }, plateau: None }
    }
}

/// The mutable part of a schedule (saved in checkpoints).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlateauState {
    pub best: Option<f64>,
    pub bad_evaluations: u32,
    pub factor: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub config: ScheduleConfig,
    pub plateau_state: PlateauState,
}

impl Schedule {
    pub fn new(config: ScheduleConfig) -> Self {
        Self { config, plateau_state: PlateauState { best: None, bad_evaluations: 0, factor: 1.0 } }
    }

    /// The factor for optimizer step `step` (0-based) in `epoch` (0-based).
    pub fn factor(&self, step: u64, epoch: u64) -> f64 {
        let c = &self.config;
        let warmup = if step < c.warmup_steps {
            c.warmup_start_factor + (1.0 - c.warmup_start_factor) * step as f64 / c.warmup_steps as f64
        } else {
            1.0
        };
        let cosine = |t: f64, total: f64, min: f64| {
            min + (1.0 - min) * 0.5 * (1.0 + (std::f64::consts::PI * (t / total).min(1.0)).cos())
        };
        let decay = match c.decay {
            Decay::Constant => 1.0,
            Decay::Cosine { total_steps, min_factor } => cosine(step as f64, total_steps.max(1) as f64, min_factor),
            Decay::Linear { total_steps, min_factor } => {
                1.0 - (1.0 - min_factor) * (step as f64 / total_steps.max(1) as f64).min(1.0)
            }
            Decay::CosineEpochs { epochs, min_factor } => cosine(epoch as f64, epochs.max(1) as f64, min_factor),
            Decay::PerEpoch { gamma } => gamma.powi(epoch as i32),
        };
        warmup * decay * self.plateau_state.factor
    }

    /// Feeds an evaluation metric (lower is better) to the plateau rule; true when it reduced.
    pub fn observe(&mut self, metric: f64) -> bool {
        let Some(p) = self.config.plateau else { return false };
        let s = &mut self.plateau_state;
        let improved = match s.best {
            None => true,
            Some(best) => metric < best * (1.0 - p.threshold), // PyTorch: mode "min", threshold_mode "rel"
        };
        if improved {
            s.best = Some(metric);
            s.bad_evaluations = 0;
            return false;
        }
        s.bad_evaluations += 1;
        if s.bad_evaluations > p.patience {
            s.bad_evaluations = 0;
            let reduced = (s.factor * p.factor).max(p.min_factor);
            let changed = reduced < s.factor;
            s.factor = reduced;
            return changed;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let s = Schedule::new(ScheduleConfig::warmup_cosine(10, 110, 0.0));
        assert_eq!(s.factor(0, 0), 0.0);
        assert!((s.factor(5, 0) - 0.5 * (1.0 + (std::f64::consts::PI * 5.0 / 110.0).cos()) * 0.5).abs() < 1e-12);
        assert!((s.factor(55, 0) - 0.5).abs() < 1e-12);
        assert!(s.factor(110, 0).abs() < 1e-12);
        assert!(s.factor(500, 0).abs() < 1e-12, "stays at the minimum past the end");
    }

    #[test]
    fn epoch_decays_match_blip() {
        // BLIP: lr = (init - min) * 0.5 * (1 + cos(pi * epoch / max_epoch)) + min
        let s = Schedule::new(ScheduleConfig {
            decay: Decay::CosineEpochs { epochs: 6, min_factor: 0.0 },
            ..ScheduleConfig::constant()
        });
        assert!((s.factor(999, 3) - 0.5).abs() < 1e-12);
        let s = Schedule::new(ScheduleConfig { decay: Decay::PerEpoch { gamma: 0.9 }, ..ScheduleConfig::constant() });
        assert!((s.factor(0, 2) - 0.81).abs() < 1e-12);
        let s = Schedule::new(ScheduleConfig {
            decay: Decay::Linear { total_steps: 10, min_factor: 0.2 },
            ..ScheduleConfig::constant()
        });
        assert!((s.factor(5, 0) - 0.6).abs() < 1e-12);
    }

    #[test]
    fn warmup_ramps_from_zero_then_decays_per_epoch() {
        let s = Schedule::new(ScheduleConfig::warmup_per_epoch(10, 0.9));
        assert_eq!(s.factor(0, 0), 0.0);
        assert!((s.factor(5, 0) - 0.5).abs() < 1e-12);
        assert!((s.factor(20, 2) - 0.81).abs() < 1e-12);
        // The same through struct update on `constant()`: the warm-up is not a no-op.
        let s = Schedule::new(ScheduleConfig { warmup_steps: 10, ..ScheduleConfig::constant() });
        assert!((s.factor(5, 0) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn plateau_reduces_after_patience() {
        let mut s = Schedule::new(ScheduleConfig {
            plateau: Some(Plateau { factor: 0.5, patience: 2, threshold: 0.01, min_factor: 0.2 }),
            ..ScheduleConfig::constant()
        });
        assert!(!s.observe(1.0));
        assert!(!s.observe(0.995)); // not 1 % better: bad 1
        assert!(!s.observe(0.999)); // bad 2
        assert!(s.observe(0.999)); // bad 3 > patience → reduce
        assert_eq!(s.factor(0, 0), 0.5);
        assert!(!s.observe(0.5)); // improvement resets
        for _ in 0..3 {
            s.observe(0.6);
        }
        assert_eq!(s.factor(0, 0), 0.25);
        for _ in 0..3 {
            s.observe(0.6);
        }
        assert_eq!(s.factor(0, 0), 0.2, "floored at min_factor");
    }
}

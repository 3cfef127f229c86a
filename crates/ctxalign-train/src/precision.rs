//! Training precision: plain f32, or bf16 mixed precision.
//!
//! Mixed precision here is the classic "master weights" scheme (Micikevicius et al. 2018; Apex O2):
//! - the model's trainable parameters and every activation are bf16, so forward and backward run
//!   at bf16 speed and memory;
//! - each trainable parameter has an f32 master copy ([`crate::TrainableParams::masters`]); the
//!   optimizer accumulates gradients, keeps its moments and applies the update in f32 on the
//!   master, then writes the rounded value back into the bf16 parameter. Small updates that bf16
//!   would round away (`|Δθ| < 2⁻⁸·|θ|`) thus still accumulate;
//! - checkpoints and exported models hold the f32 masters;
//! - the numerically fragile reductions run in f32 whatever the parameter dtype: softmax and
//!   LayerNorm statistics (`ctxalign_nn::ops`), the losses and the contrastive logits.
//!
//! bf16 has f32's exponent range, so no loss scaling is needed (f16 would need it, and is offered
//! for inference only).

use std::fmt;
use std::str::FromStr;

use candle_core::DType;
use serde::{Deserialize, Serialize};

/// The precision a model trains in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Precision {
    /// Everything in f32.
    #[default]
    #[serde(rename = "f32")]
    F32,
    /// bf16 parameters and activations, f32 master weights, optimizer state and reductions.
    #[serde(rename = "bf16")]
    Bf16,
}

impl Precision {
    /// The dtype the model's parameters and activations have.
    pub fn compute_dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "f16" | "fp16" | "float16" => Err(format!(
                "training precision `{s}` is not offered: f16 needs loss scaling; use bf16 (or f16 for inference)"
            )),
            _ => Err(format!("unknown training precision `{s}`: expected f32 or bf16")),
        }
    }
}

/// The dtype in which parameters of `dtype` keep their master copy, optimizer state and gradient
/// sums: f32 for the half types, the dtype itself otherwise (f64 stays f64 for gradient checks).
pub fn master_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_names() {
        assert_eq!("bf16".parse::<Precision>().unwrap(), Precision::Bf16);
        assert_eq!("F32".parse::<Precision>().unwrap(), Precision::F32);
        assert!("f16".parse::<Precision>().unwrap_err().contains("bf16"));
        assert!("f8".parse::<Precision>().unwrap_err().contains("expected f32 or bf16"));
        assert_eq!(Precision::Bf16.compute_dtype(), DType::BF16);
        assert_eq!(master_dtype(DType::BF16), DType::F32);
        assert_eq!(master_dtype(DType::F64), DType::F64);
    }
}

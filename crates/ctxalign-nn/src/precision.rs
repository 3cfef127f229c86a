//! The precision a model trains in (the type of the `--precision` option). What mixed precision
//! means for the optimizer is in `ctxalign_train::precision`; inference uses only the compute dtype,
//! so the type lives here, below both.

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
        assert_eq!(Precision::Bf16.to_string(), "bf16");
    }
}

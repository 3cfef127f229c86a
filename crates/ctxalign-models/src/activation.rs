//! The MLP activations HF configs name in `hidden_act`, as a type: a config naming one ctxalign
//! does not compute fails to parse ("unknown variant `gelu_new`, expected `gelu` or
//! `quick_gelu`") instead of being run with another.

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HiddenAct {
    /// Exact GELU, `x·Φ(x)` with the error function (BERT, BLIP, HF's `"gelu"`).
    Gelu,
    /// `x·σ(1.702·x)` (OpenAI's CLIP checkpoints, HF's `"quick_gelu"`).
    QuickGelu,
}

impl HiddenAct {
    /// The activation applied to `xs`, differentiable.
    pub fn forward(self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Gelu => ctxalign_nn::gelu(xs),
            Self::QuickGelu => ctxalign_nn::quick_gelu(xs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hf_names_and_refuses_others() {
        assert_eq!(serde_json::from_str::<HiddenAct>("\"gelu\"").unwrap(), HiddenAct::Gelu);
        assert_eq!(serde_json::from_str::<HiddenAct>("\"quick_gelu\"").unwrap(), HiddenAct::QuickGelu);
        let e = serde_json::from_str::<HiddenAct>("\"gelu_new\"").unwrap_err().to_string();
        assert!(e.contains("gelu_new") && e.contains("quick_gelu"), "{e}");
        assert_eq!(serde_json::to_string(&HiddenAct::QuickGelu).unwrap(), "\"quick_gelu\"");
    }

    #[test]
    fn computes_the_named_function() {
        let x = Tensor::new(&[-2f64, -0.5, 0.0, 1.0, 3.0], &candle_core::Device::Cpu).unwrap();
        let gelu = HiddenAct::Gelu.forward(&x).unwrap().to_vec1::<f64>().unwrap();
        let quick = HiddenAct::QuickGelu.forward(&x).unwrap().to_vec1::<f64>().unwrap();
        for (i, v) in [-2f64, -0.5, 0.0, 1.0, 3.0].iter().enumerate() {
            let exact = 0.5 * v * (1.0 + candle_core::cpu::erf::erf_f64(v / 2f64.sqrt()));
            assert!((gelu[i] - exact).abs() < 1e-12);
            assert!((quick[i] - v / (1.0 + (-1.702 * v).exp())).abs() < 1e-12);
        }
    }
}

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

use candle_core::DType;

pub use ctxalign_nn::Precision;

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
    fn half_types_keep_f32_masters() {
        assert_eq!(master_dtype(DType::BF16), DType::F32);
        assert_eq!(master_dtype(DType::F16), DType::F32);
        assert_eq!(master_dtype(DType::F64), DType::F64);
    }
}

//! Gradient-aware primitives: fused kernels for inference, composed ops when a gradient may flow.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// True when any of `tensors` is a variable or was computed from one, i.e. when backward through an
/// op on them must record that op.
pub fn tracks_gradient(tensors: &[&Tensor]) -> bool {
    tensors.iter().any(|t| t.track_op())
}

/// Candle's fused kernels cover the float types models run in, not f64 (used by gradient checks).
fn has_fused_kernel(xs: &Tensor) -> bool {
    matches!(xs.dtype(), DType::F32 | DType::F16 | DType::BF16)
}

/// Softmax over the last dimension.
///
/// Uses Candle's fused `softmax_last_dim` (no backward op) only when `xs` tracks no gradient;
/// otherwise the max-subtracted composed form, which Candle differentiates.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    if xs.track_op() || !has_fused_kernel(xs) {
        candle_nn::ops::softmax(xs, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(xs)
    }
}

/// LayerNorm over the last dimension: `(x - mean) / sqrt(var + eps) * weight + bias`.
///
/// Fused kernel when nothing tracks a gradient, `layer_norm_slow` (differentiable) otherwise.
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if tracks_gradient(&[xs, weight, bias]) || !has_fused_kernel(xs) {
        candle_nn::ops::layer_norm_slow(xs, weight, bias, eps as f32)
    } else {
        candle_nn::ops::layer_norm(xs, weight, bias, eps as f32)
    }
}

/// A LayerNorm with HF parameter names (`weight`, `bias`) whose backward is never cut.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    /// Loads `weight` and `bias` of shape `[size]` from `vb`.
    pub fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(size, "weight", candle_nn::Init::Const(1.0))?;
        let bias = vb.get_with_hints(size, "bias", candle_nn::Init::Const(0.0))?;
        Ok(Self { weight, bias, eps })
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        layer_norm(xs, &self.weight, &self.bias, self.eps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn fused_and_composed_paths_agree() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (3, 5, 16), &dev)?;
        let w = Tensor::randn(1f32, 0.1, 16, &dev)?;
        let b = Tensor::randn(0f32, 0.1, 16, &dev)?;
        let fused = layer_norm(&x, &w, &b, 1e-6)?;
        let composed = candle_nn::ops::layer_norm_slow(&x, &w, &b, 1e-6)?;
        let diff = (fused - composed)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "layer norm paths differ by {diff}");
        let s1 = softmax_last_dim(&x)?;
        let s2 = candle_nn::ops::softmax(&x, D::Minus1)?;
        let diff = (s1 - s2)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "softmax paths differ by {diff}");
        Ok(())
    }

    /// The reason this module exists: every parameter behind a LayerNorm and a softmax must get a
    /// gradient, which Candle's fused kernels would silently withhold.
    #[test]
    fn gradients_cross_layer_norm_and_softmax() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 4, 8), &dev)?)?;
        let w = Var::ones(8, DType::F32, &dev)?;
        let b = Var::zeros(8, DType::F32, &dev)?;
        let y = layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5)?;
        let y = softmax_last_dim(&(y * 3.0)?)?;
        let target = Tensor::randn(0f32, 1.0, (2, 4, 8), &dev)?;
        let loss = (y * target)?.sum_all()?;
        let grads = loss.backward()?;
        for (name, v) in [("x", &x), ("weight", &w), ("bias", &b)] {
            let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
            let norm = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
            assert!(norm > 0.0 && norm.is_finite(), "{name}: gradient norm {norm}");
        }
        Ok(())
    }

    /// Finite differences against the analytic gradient of the composed path.
    #[test]
    fn layer_norm_gradient_matches_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let x0 = Tensor::randn(0f64, 1.0, (3, 6), &dev)?;
        let w = Tensor::randn(1f64, 0.3, 6, &dev)?;
        let b = Tensor::randn(0f64, 0.3, 6, &dev)?;
        let probe = Tensor::randn(0f64, 1.0, (3, 6), &dev)?;
        let f = |x: &Tensor| -> Result<f64> { (layer_norm(x, &w, &b, 1e-5)? * &probe)?.sum_all()?.to_scalar::<f64>() };
        let xv = Var::from_tensor(&x0)?;
        let loss = (layer_norm(xv.as_tensor(), &w, &b, 1e-5)? * &probe)?.sum_all()?;
        let analytic = loss.backward()?.get(xv.as_tensor()).unwrap().flatten_all()?.to_vec1::<f64>()?;
        let base = x0.flatten_all()?.to_vec1::<f64>()?;
        let h = 1e-6;
        for i in 0..base.len() {
            let mut plus = base.clone();
            plus[i] += h;
            let mut minus = base.clone();
            minus[i] -= h;
            let fp = f(&Tensor::from_vec(plus, (3, 6), &dev)?)?;
            let fm = f(&Tensor::from_vec(minus, (3, 6), &dev)?)?;
            let numeric = (fp - fm) / (2.0 * h);
            assert!((numeric - analytic[i]).abs() < 1e-6, "index {i}: {numeric} vs {}", analytic[i]);
        }
        Ok(())
    }
}

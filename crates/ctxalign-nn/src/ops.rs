//! Primitives that keep gradients: LayerNorm, softmax and GELU (through [`crate::fused`]), f32 upcasts
//! for half-precision sums, CPU half-precision convolution, max pooling, dropout, CLS selection.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// `xs` in f32 when it is half precision (f16/bf16), unchanged otherwise: for sums, statistics and
/// losses, which lose precision when accumulated in 8 (bf16) or 11 (f16) mantissa bits. The cast
/// is differentiable, so gradients flow back in the original dtype.
pub fn upcast_half(xs: &Tensor) -> Result<Tensor> {
    match xs.dtype() {
        DType::F16 | DType::BF16 => xs.to_dtype(DType::F32),
        _ => Ok(xs.clone()),
    }
}

/// Softmax over the last dimension, in `xs`'s dtype, differentiable.
///
/// The fused op of [`crate::fused`] (one pass, f32 sums for half precision, analytic backward from
/// the output); Candle's composed form for the dtypes it does not cover.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    if crate::fused::supports(xs.dtype()) {
        crate::fused::softmax_last_dim(xs)
    } else {
        candle_nn::ops::softmax(xs, D::Minus1)
    }
}

/// Attention's `softmax(scores · scale + mask)` over the last dimension, differentiable in `scores`
/// and `mask` (which broadcasts onto `scores`).
///
/// One fused pass for the float dtypes (the scaled and masked scores never exist as tensors);
/// composed from Candle's ops for the others.
pub fn scaled_masked_softmax(scores: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    if crate::fused::supports(scores.dtype()) {
        return crate::fused::scaled_masked_softmax(scores, mask, scale);
    }
    let scores = (scores * scale)?;
    let scores = match mask {
        Some(mask) => scores.broadcast_add(mask)?,
        None => scores,
    };
    candle_nn::ops::softmax(&scores, D::Minus1)
}

/// Exact (erf) GELU, `x·Φ(x)`, differentiable: the fused op of [`crate::fused`] (vectorised on the
/// CPU, analytic backward), Candle's `gelu_erf` for the dtypes it does not cover.
pub fn gelu(xs: &Tensor) -> Result<Tensor> {
    if crate::fused::supports(xs.dtype()) {
        crate::fused::gelu_erf(xs)
    } else {
        xs.gelu_erf()
    }
}

/// `conv.forward(xs)`, also for half precision on the CPU: Candle's CPU convolution has no bf16
/// kernel ("unsupported dtype BF16 for op matmul"), so a half-precision convolution there runs in
/// f32 and its result is cast back (differentiably). Elsewhere, and in f32/f64, it is `forward`.
pub fn conv2d(conv: &candle_nn::Conv2d, xs: &Tensor) -> Result<Tensor> {
    let half = matches!(xs.dtype(), DType::F16 | DType::BF16);
    if !(half && xs.device().is_cpu()) {
        return conv.forward(xs);
    }
    let weight = conv.weight().to_dtype(DType::F32)?;
    let bias = conv.bias().map(|b| b.to_dtype(DType::F32)).transpose()?;
    let c = conv.config();
    let y = xs.to_dtype(DType::F32)?.conv2d(&weight, c.padding, c.stride, c.dilation, c.groups)?;
    let y = match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?)?,
        None => y,
    };
    y.to_dtype(xs.dtype())
}

/// LayerNorm over the last dimension: `(x - mean) / sqrt(var + eps) * weight + bias`, differentiable
/// in all three.
///
/// The fused op of [`crate::fused`] (statistics in f32 for half precision, analytic backward that
/// recomputes them from the input); `layer_norm_slow` for the dtypes it does not cover.
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if crate::fused::supports(xs.dtype()) {
        crate::fused::layer_norm(xs, weight, bias, eps)
    } else {
        candle_nn::ops::layer_norm_slow(xs, weight, bias, eps as f32)
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

/// The first token of a sequence batch, `[B, L, D] -> [B, D]` (BERT's and ViT's CLS), contiguous.
///
/// The slice alone has row stride `L·D`; Candle's CUDA matmul (cuBLAS through `gemm_config`) only
/// takes a left operand whose rows are `D` apart, so every projection of a CLS token failed on
/// the GPU while the CPU's gemm accepted it.
pub fn first_token(xs: &Tensor) -> Result<Tensor> {
    xs.narrow(1, 0, 1)?.squeeze(1)?.contiguous()
}

/// Divides each row by its L2 norm (`F.normalize(x, dim=-1)`, eps 1e-12).
pub fn l2_normalize(xs: &Tensor) -> Result<Tensor> {
    let norm = xs.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::INFINITY)?;
    xs.broadcast_div(&norm)
}

/// CLIP's `quick_gelu`: `x · σ(1.702 x)`, composed from differentiable ops (Candle's fused sigmoid
/// is a custom op; composing keeps the backward obviously complete).
pub fn quick_gelu(xs: &Tensor) -> Result<Tensor> {
    let sigmoid = ((xs * -1.702)?.exp()? + 1.0)?.recip()?;
    xs * sigmoid
}

/// Inverted dropout over `xs` `[n, …]` whose row i's mask is drawn from `row_seeds[i]` (SplitMix64
/// per element), so that a training step is reproducible from its seeds alone — Candle's CPU
/// generator cannot be seeded, and a resumed run must draw the same masks — and a sample's mask
/// depends on the sample, not on its place in the batch (a data-parallel run draws what one process
/// with the whole batch draws). `p = 0` returns `xs` unchanged.
pub fn dropout(xs: &Tensor, p: f64, row_seeds: &[u64]) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(xs.clone());
    }
    if p >= 1.0 {
        return xs.zeros_like();
    }
    let rows = xs.dim(0)?;
    if row_seeds.len() != rows {
        candle_core::bail!("dropout: {} row seeds for {rows} rows", row_seeds.len())
    }
    let per_row = xs.elem_count() / rows.max(1);
    let keep_scale = (1.0 / (1.0 - p)) as f32;
    let mut mask: Vec<f32> = Vec::with_capacity(xs.elem_count());
    for &seed in row_seeds {
        let mut state = seed;
        mask.extend((0..per_row).map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let u = (z >> 11) as f64 / (1u64 << 53) as f64;
            if u < p {
                0.0
            } else {
                keep_scale
            }
        }));
    }
    let mask = Tensor::from_vec(mask, xs.shape(), xs.device())?.to_dtype(xs.dtype())?;
    xs * mask
}

/// Max pooling over `[batch, c, H, W]` with any kernel, stride and padding (padded with −∞), as
/// PyTorch's `max_pool2d`. Composed from strided views and `maximum`, so it differentiates — Candle's
/// own `max_pool2d` errors in backward when kernel ≠ stride (ResNet's 3×3/2 stem pool).
pub fn max_pool2d(xs: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    let (b, c, h, w) = xs.dims4()?;
    if kernel == 0 || stride == 0 || h + 2 * padding < kernel || w + 2 * padding < kernel || 2 * padding > kernel {
        candle_core::bail!("max_pool2d: kernel {kernel}, stride {stride}, padding {padding} do not fit a {h}×{w} input")
    }
    let (out_h, out_w) = ((h + 2 * padding - kernel) / stride + 1, (w + 2 * padding - kernel) / stride + 1);
    // Rows needed so that every window offset can take `stride · out` rows and keep every stride-th.
    let (need_h, need_w) = (kernel - 1 + stride * out_h, kernel - 1 + stride * out_w);
    let pad = |xs: &Tensor, dim: usize, before: usize, after: usize| -> Result<Tensor> {
        let mut dims = xs.dims().to_vec();
        let mut parts = vec![];
        if before > 0 {
            dims[dim] = before;
            parts.push(Tensor::full(f32::NEG_INFINITY, dims.clone(), xs.device())?.to_dtype(xs.dtype())?);
        }
        parts.push(xs.clone());
        if after > 0 {
            dims[dim] = after;
            parts.push(Tensor::full(f32::NEG_INFINITY, dims, xs.device())?.to_dtype(xs.dtype())?);
        }
        Tensor::cat(&parts, dim)
    };
    let xs = pad(xs, 2, padding, need_h.saturating_sub(h + padding))?;
    let xs = pad(&xs, 3, padding, need_w.saturating_sub(w + padding))?;
    let width = xs.dim(3)?;
    let mut out: Option<Tensor> = None;
    for dy in 0..kernel {
        // [b, c, out_h·stride, W'] → keep every stride-th row → [b, c, out_h, W']
        let rows =
            xs.narrow(2, dy, stride * out_h)?.reshape((b, c, out_h, stride, width))?.narrow(3, 0, 1)?.squeeze(3)?;
        for dx in 0..kernel {
            let win = rows
                .narrow(3, dx, stride * out_w)?
                .reshape((b, c, out_h, out_w, stride))?
                .narrow(4, 0, 1)?
                .squeeze(4)?;
            out = Some(match out {
                None => win,
                Some(m) => m.maximum(&win)?,
            });
        }
    }
    Ok(out.expect("kernel ≥ 1"))
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

    /// PyTorch semantics written out: windows over the −∞-padded input.
    fn max_pool_reference(x: &[f64], h: usize, w: usize, k: usize, s: usize, p: usize) -> Vec<f64> {
        let (oh, ow) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
        let mut out = vec![];
        for i in 0..oh {
            for j in 0..ow {
                let mut m = f64::NEG_INFINITY;
                for a in 0..k {
                    for b in 0..k {
                        let (r, c) = ((i * s + a) as i64 - p as i64, (j * s + b) as i64 - p as i64);
                        if r >= 0 && c >= 0 && (r as usize) < h && (c as usize) < w {
                            m = m.max(x[r as usize * w + c as usize]);
                        }
                    }
                }
                out.push(m);
            }
        }
        out
    }

    #[test]
    fn max_pool_matches_pytorch_semantics_and_differentiates() -> Result<()> {
        let dev = Device::Cpu;
        for (h, w, k, s, p) in [(7, 6, 3, 2, 1), (8, 8, 3, 2, 1), (5, 5, 2, 2, 0), (6, 5, 3, 1, 1)] {
            // Distinct values, so the arg-max (and the gradient) is unique.
            let vals: Vec<f64> = (0..h * w).map(|i| ((i * 37) % (h * w)) as f64 * 0.1 - 1.0).collect();
            let x = Var::from_tensor(&Tensor::from_vec(vals.clone(), (1, 1, h, w), &dev)?)?;
            let ours = max_pool2d(x.as_tensor(), k, s, p)?.flatten_all()?.to_vec1::<f64>()?;
            assert_eq!(ours, max_pool_reference(&vals, h, w, k, s, p), "{h}x{w} k{k} s{s} p{p}");
            let vars = vec![("x".to_string(), x.clone())];
            let weights = Tensor::arange(1.0f64, (ours.len() + 1) as f64, &dev)?;
            let loss = || (max_pool2d(x.as_tensor(), k, s, p)?.flatten_all()? * &weights)?.sum_all();
            crate::gradcheck::check_gradients(&vars, &loss, 1e-4, 1e-6, 1)?;
        }
        Ok(())
    }

    #[test]
    fn quick_gelu_and_seeded_dropout() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[-3.0f64, -0.5, 0.0, 0.7, 4.0], &dev)?;
        let got = quick_gelu(&x)?.to_vec1::<f64>()?;
        for (v, g) in x.to_vec1::<f64>()?.iter().zip(got) {
            assert!((g - v / (1.0 + (-1.702 * v).exp())).abs() < 1e-12);
        }
        let ones = Tensor::ones((100, 100), DType::F32, &dev)?;
        let seeds = |first: u64| (first..first + 100).collect::<Vec<u64>>();
        let a = dropout(&ones, 0.25, &seeds(7))?.to_vec2::<f32>()?;
        let b = dropout(&ones, 0.25, &seeds(7))?.to_vec2::<f32>()?;
        let c = dropout(&ones, 0.25, &seeds(8))?.to_vec2::<f32>()?;
        assert_eq!(a, b, "same seeds, same mask");
        assert_ne!(a[0], c[0], "another seed, another mask");
        // A row's mask is its seed's, wherever the row sits in the batch.
        assert_eq!(a[1], c[0], "seed 8 is row 1 of the first batch and row 0 of the other");
        let a: Vec<f32> = a.concat();
        let dropped = a.iter().filter(|v| **v == 0.0).count() as f64 / a.len() as f64;
        assert!((dropped - 0.25).abs() < 0.03, "dropped share {dropped}");
        assert!(a.iter().all(|v| *v == 0.0 || (*v - 1.0 / 0.75).abs() < 1e-6));
        Ok(())
    }
}

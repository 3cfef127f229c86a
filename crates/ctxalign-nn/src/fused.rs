//! Fused LayerNorm and softmax that Candle can differentiate.
//!
//! Candle's own fused kernels (`candle_nn::ops::layer_norm`, `softmax_last_dim`) record no backward
//! op, and the composed forms that Candle can differentiate keep every intermediate alive for
//! backward (five tensors the size of the attention scores for one softmax) and launch one kernel
//! per elementwise step. These ops run one fused forward pass and give Candle an analytic backward
//! that needs only what the graph already holds:
//!
//! - softmax: `dx = y ⊙ (g − Σⱼ g ⊙ y)`, from the output `y`;
//! - LayerNorm: with `x̂ = (x − μ)·r`, `r = (σ² + ε)^-½` recomputed from the input row,
//!   `dx = r·(gγ − mean(gγ) − x̂·mean(gγ ⊙ x̂))`, `dγ = Σ g ⊙ x̂`, `dβ = Σ g`.
//!
//! Forward, CPU: one pass per row, statistics and sums in f32 for f16/bf16 inputs (f64 for f64), so
//! half precision loses nothing in the reductions. Forward, CUDA: Candle's `softmax` and `layernorm`
//! kernels from `candle-kernels` (launched as `candle-nn` launches them), which accumulate in f32.
//! Backward runs as Candle tensor ops, in f32 for half-precision tensors, on whatever device holds
//! them. A kernel for another backend goes beside `cpu_fwd`/`cuda_fwd`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use half::{bf16, f16};
use num_traits::Float;
use rayon::prelude::*;

use crate::ops::upcast_half;

/// Softmax over the last dimension (`[.., n]`), differentiable.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    xs.contiguous()?.apply_op1(SoftmaxLastDim)
}

/// LayerNorm over the last dimension, `(x − μ) / sqrt(σ² + ε) · weight + bias`, differentiable in
/// all three arguments. `weight` and `bias` are `[n]` in `xs`'s dtype.
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let n = xs.dim(D::Minus1)?;
    if weight.dims() != [n] || bias.dims() != [n] {
        candle_core::bail!(
            "layer_norm: weight {:?} and bias {:?} must both be [{n}] for input {:?}",
            weight.dims(),
            bias.dims(),
            xs.dims()
        )
    }
    if weight.dtype() != xs.dtype() || bias.dtype() != xs.dtype() {
        candle_core::bail!(
            "layer_norm: input {:?}, weight {:?} and bias {:?} must share one dtype",
            xs.dtype(),
            weight.dtype(),
            bias.dtype()
        )
    }
    xs.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, LayerNormOp { eps })
}

/// The element types the CPU forward handles, each with the type its sums run in.
trait Element: Copy + Send + Sync + candle_core::WithDType {
    type Acc: num_traits::Float + Send + Sync;
    fn widen(self) -> Self::Acc;
    fn narrow(acc: Self::Acc) -> Self;
}

macro_rules! element {
    ($t:ty, $acc:ty, $widen:expr, $narrow:expr) => {
        impl Element for $t {
            type Acc = $acc;
            fn widen(self) -> $acc {
                $widen(self)
            }
            fn narrow(acc: $acc) -> Self {
                $narrow(acc)
            }
        }
    };
}
element!(f32, f32, |x| x, |x| x);
element!(f64, f64, |x| x, |x| x);
element!(bf16, f32, bf16::to_f32, bf16::from_f32);
element!(f16, f32, f16::to_f32, f16::from_f32);

fn contiguous_slice<'a, T>(data: &'a [T], layout: &Layout, what: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

fn softmax_rows<T: Element>(src: &[T], layout: &Layout) -> Result<(CpuStorage, Shape)> {
    let src = contiguous_slice(src, layout, "softmax")?;
    let n = layout.dims().last().copied().unwrap_or(1).max(1);
    let mut dst = vec![T::narrow(num_traits::Float::nan()); src.len()];
    // Each worker reuses one row buffer of exponentials in the accumulator type.
    src.par_chunks(n).zip(dst.par_chunks_mut(n)).for_each_init(Vec::new, |exps, (row, out)| {
        let max = row.iter().fold(<T::Acc as num_traits::Float>::neg_infinity(), |m, &x| m.max(x.widen()));
        exps.clear();
        exps.extend(row.iter().map(|&x| (x.widen() - max).exp()));
        let sum = exps.iter().fold(<T::Acc as num_traits::Zero>::zero(), |s, &e| s + e);
        for (o, &e) in out.iter_mut().zip(exps.iter()) {
            *o = T::narrow(e / sum);
        }
    });
    Ok((T::to_cpu_storage_owned(dst), layout.shape().clone()))
}

fn layer_norm_rows<T: Element>(
    src: &[T],
    layout: &Layout,
    weight: &[T],
    weight_layout: &Layout,
    bias: &[T],
    bias_layout: &Layout,
    eps: f64,
) -> Result<(CpuStorage, Shape)> {
    let src = contiguous_slice(src, layout, "layer_norm")?;
    let weight = contiguous_slice(weight, weight_layout, "layer_norm weight")?;
    let bias = contiguous_slice(bias, bias_layout, "layer_norm bias")?;
    let n = weight.len();
    let eps = <T::Acc as num_traits::NumCast>::from(eps).expect("eps fits the accumulator type");
    let count = <T::Acc as num_traits::NumCast>::from(n).expect("row length fits the accumulator type");
    let mut dst = vec![T::narrow(num_traits::Float::nan()); src.len()];
    src.par_chunks(n).zip(dst.par_chunks_mut(n)).for_each(|(row, out)| {
        let zero = <T::Acc as num_traits::Zero>::zero();
        let mean = row.iter().fold(zero, |s, &x| s + x.widen()) / count;
        // Two passes: the variance of the centred row, not E[x²] − μ², which cancels badly.
        let var = row.iter().fold(zero, |s, &x| {
            let c = x.widen() - mean;
            s + c * c
        }) / count;
        let rstd = (var + eps).sqrt().recip();
        for (((o, &x), &w), &b) in out.iter_mut().zip(row).zip(weight).zip(bias) {
            *o = T::narrow((x.widen() - mean) * rstd * w.widen() + b.widen());
        }
    });
    Ok((T::to_cpu_storage_owned(dst), layout.shape().clone()))
}

/// A backward operand, detached and in f32 when half precision (for the backward's sums).
///
/// Detached because Candle hands `bwd` the graph's own tensors: a gradient computed from them
/// would record its own graph and keep every temporary of this backward (six full-size tensors for
/// LayerNorm) alive until Candle reaches the node it flows into.
fn wide(xs: &Tensor) -> Result<Tensor> {
    upcast_half(&xs.detach())
}

struct SoftmaxLastDim;

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "ctxalign-softmax-last-dim"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        match storage {
            CpuStorage::F32(s) => softmax_rows(s, layout),
            CpuStorage::F64(s) => softmax_rows(s, layout),
            CpuStorage::BF16(s) => softmax_rows(s, layout),
            CpuStorage::F16(s) => softmax_rows(s, layout),
            other => candle_core::bail!("softmax: unsupported dtype {:?}", other.dtype()),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::softmax(storage, layout)
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (y, g) = (wide(res)?, wide(grad_res)?);
        let dot = (&g * &y)?.sum_keepdim(D::Minus1)?;
        let dx = (g.broadcast_sub(&dot)? * y)?;
        Ok(Some(dx.to_dtype(arg.dtype())?))
    }
}

struct LayerNormOp {
    eps: f64,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "ctxalign-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use CpuStorage as S;
        match (s1, s2, s3) {
            (S::F32(x), S::F32(w), S::F32(b)) => layer_norm_rows(x, l1, w, l2, b, l3, self.eps),
            (S::F64(x), S::F64(w), S::F64(b)) => layer_norm_rows(x, l1, w, l2, b, l3, self.eps),
            (S::BF16(x), S::BF16(w), S::BF16(b)) => layer_norm_rows(x, l1, w, l2, b, l3, self.eps),
            (S::F16(x), S::F16(w), S::F16(b)) => layer_norm_rows(x, l1, w, l2, b, l3, self.eps),
            _ => candle_core::bail!(
                "layer_norm: unsupported dtypes {:?}, {:?}, {:?}",
                s1.dtype(),
                s2.dtype(),
                s3.dtype()
            ),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::layer_norm(s1, l1, s2, l2, s3, l3, self.eps as f32)
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = x.dim(D::Minus1)?;
        let (xf, g) = (wide(x)?, wide(grad_res)?);
        let mean = xf.mean_keepdim(D::Minus1)?;
        let centred = xf.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let rstd = (var + self.eps)?.sqrt()?.recip()?;
        let x_hat = centred.broadcast_mul(&rstd)?;
        let rows = x.elem_count() / n.max(1);
        // Parameter gradients sum over every leading position: [rows, n] -> [n].
        let dw = weight
            .track_op()
            .then(|| (&g * &x_hat)?.reshape((rows, n))?.sum(0)?.to_dtype(weight.dtype()))
            .transpose()?;
        let db = bias.track_op().then(|| g.reshape((rows, n))?.sum(0)?.to_dtype(bias.dtype())).transpose()?;
        let dx = if x.track_op() {
            let gw = g.broadcast_mul(&wide(weight)?)?;
            let mean_gw = gw.mean_keepdim(D::Minus1)?;
            let mean_gw_xhat = (&gw * &x_hat)?.mean_keepdim(D::Minus1)?;
            let inner = gw.broadcast_sub(&mean_gw)?.sub(&x_hat.broadcast_mul(&mean_gw_xhat)?)?;
            Some(inner.broadcast_mul(&rstd)?.to_dtype(x.dtype())?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

/// True for the float dtypes these ops accept.
pub fn supports(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F64 | DType::BF16 | DType::F16)
}

/// The CUDA forwards: Candle's `softmax_*` and `layernorm_*` kernels, launched as `candle-nn` 0.11
/// launches them (its op structs are private, its kernels public).
#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{kernel_name, kernels, CudaStorage, Map1, Map3, WrapErr};
    use candle_core::{CudaDevice, Layout, Result, Shape, WithDType};

    fn part<'a, T>(s: &'a CudaSlice<T>, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
        match l.contiguous_offsets() {
            Some((o1, o2)) => Ok(s.slice(o1..o2)),
            None => candle_core::bail!("{what} must be contiguous"),
        }
    }

    fn rows_cols(layout: &Layout) -> (usize, usize) {
        let el = layout.shape().elem_count();
        let cols = layout.dims().last().copied().unwrap_or(1).max(1);
        (el / cols, cols)
    }

    pub fn softmax(storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        struct Softmax;
        impl Map1 for Softmax {
            fn f<T: DeviceRepr + WithDType>(
                &self,
                src: &CudaSlice<T>,
                dev: &CudaDevice,
                layout: &Layout,
            ) -> Result<CudaSlice<T>> {
                let src = part(src, layout, "softmax: the input")?;
                let (rows, cols) = rows_cols(layout);
                let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (1, 32, 1), shared_mem_bytes: 0 };
                let func = dev.get_or_load_func(&kernel_name::<T>("softmax"), &kernels::REDUCE)?;
                // SAFETY: every element is written by the kernel.
                let dst = unsafe { dev.alloc::<T>(rows * cols)? };
                let mut builder = func.builder();
                builder.arg(&src);
                builder.arg(&dst);
                candle_core::builder_arg!(builder, cols as i32);
                // SAFETY: the arguments match the kernel's signature in candle-kernels' reduce.cu.
                unsafe { builder.launch(cfg) }.w()?;
                Ok(dst)
            }
        }
        let dev = storage.device();
        let slice = Softmax.map(&storage.slice, dev, layout)?;
        Ok((CudaStorage { slice, device: dev.clone() }, layout.shape().clone()))
    }

    pub fn layer_norm(
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
        eps: f32,
    ) -> Result<(CudaStorage, Shape)> {
        struct LayerNorm {
            eps: f32,
        }
        impl Map3 for LayerNorm {
            #[allow(clippy::too_many_arguments)]
            fn f<T: DeviceRepr + WithDType>(
                &self,
                src: &CudaSlice<T>,
                layout: &Layout,
                weight: &CudaSlice<T>,
                weight_layout: &Layout,
                bias: &CudaSlice<T>,
                bias_layout: &Layout,
                dev: &CudaDevice,
            ) -> Result<CudaSlice<T>> {
                let (src, weight, bias) = (
                    part(src, layout, "layer_norm: the input")?,
                    part(weight, weight_layout, "layer_norm: weight")?,
                    part(bias, bias_layout, "layer_norm: bias")?,
                );
                let (rows, cols) = rows_cols(layout);
                let block = if cols < 1024 { 32 } else { 1024 };
                let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 };
                let func = dev.get_or_load_func(&kernel_name::<T>("layernorm"), &kernels::REDUCE)?;
                // SAFETY: every element is written by the kernel.
                let dst = unsafe { dev.alloc::<T>(rows * cols)? };
                let mut builder = func.builder();
                builder.arg(&src);
                builder.arg(&dst);
                builder.arg(&weight);
                builder.arg(&bias);
                candle_core::builder_arg!(builder, cols as i32, block as i32, self.eps);
                // SAFETY: the arguments match the kernel's signature in candle-kernels' reduce.cu.
                unsafe { builder.launch(cfg) }.w()?;
                Ok(dst)
            }
        }
        let dev = s1.device();
        let slice = LayerNorm { eps }.map(&s1.slice, l1, &s2.slice, l2, &s3.slice, l3, dev)?;
        Ok((CudaStorage { slice, device: dev.clone() }, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::check_gradients;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// The formulas written out element by element in f64, independent of any tensor op.
    #[test]
    fn forward_matches_the_formulas() -> Result<()> {
        let dev = Device::Cpu;
        let (rows, n) = (5, 7);
        let x = Tensor::randn(0f64, 2.0, (rows, n), &dev)?;
        let w = Tensor::randn(1f64, 0.5, n, &dev)?;
        let b = Tensor::randn(0f64, 0.5, n, &dev)?;
        let (xs, ws, bs) = (x.to_vec2::<f64>()?, w.to_vec1::<f64>()?, b.to_vec1::<f64>()?);
        let soft = softmax_last_dim(&x)?.to_vec2::<f64>()?;
        let norm = layer_norm(&x, &w, &b, 1e-5)?.to_vec2::<f64>()?;
        for r in 0..rows {
            let total: f64 = xs[r].iter().map(|v| v.exp()).sum();
            let mean = xs[r].iter().sum::<f64>() / n as f64;
            let var = xs[r].iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n as f64;
            for j in 0..n {
                assert!((soft[r][j] - xs[r][j].exp() / total).abs() < 1e-12);
                let expect = (xs[r][j] - mean) / (var + 1e-5).sqrt() * ws[j] + bs[j];
                assert!((norm[r][j] - expect).abs() < 1e-12, "[{r}, {j}]: {} vs {expect}", norm[r][j]);
            }
        }
        Ok(())
    }

    /// Central differences in f64 for every argument, through a non-contiguous input (the ops
    /// copy it) and 3-d shapes (the parameter gradients sum over both leading dimensions).
    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.5, (2, 6, 3), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(1f64, 0.4, 3, &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f64, 0.4, 3, &dev)?)?;
        let probe = Tensor::randn(0f64, 1.0, (2, 3, 6), &dev)?;
        let probe_t = probe.transpose(1, 2)?;
        let vars =
            vec![("x".to_string(), x.clone()), ("weight".to_string(), w.clone()), ("bias".to_string(), b.clone())];
        let loss = || {
            // [2, 6, 3] normalised, then a softmax over the transposed (non-contiguous) view.
            let y = layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5)?;
            let s = softmax_last_dim(&(y.transpose(1, 2)? * 2.0)?)?;
            (s * &probe)?.sum_all()?
                + (layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5)? * &probe_t)?.sum_all()?
        };
        check_gradients(&vars, &loss, 1e-5, 1e-6, 1)
    }

    /// Forward and backward equal Candle's composed (differentiable) forms in f32.
    #[test]
    fn agree_with_the_composed_forms() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (3, 4, 33), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.3, 33, &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.3, 33, &dev)?)?;
        let probe = Tensor::randn(0f32, 1.0, (3, 4, 33), &dev)?;
        let ours =
            |x: &Tensor, w: &Tensor, b: &Tensor| -> Result<Tensor> { softmax_last_dim(&layer_norm(x, w, b, 1e-6)?) };
        let composed = |x: &Tensor, w: &Tensor, b: &Tensor| -> Result<Tensor> {
            candle_nn::ops::softmax(&candle_nn::ops::layer_norm_slow(x, w, b, 1e-6)?, D::Minus1)
        };
        let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
        let (y1, y2) = (ours(xt, wt, bt)?, composed(xt, wt, bt)?);
        assert!(max_diff(&y1, &y2) < 1e-6, "forward differs by {}", max_diff(&y1, &y2));
        let g1 = (y1 * &probe)?.sum_all()?.backward()?;
        let g2 = (y2 * &probe)?.sum_all()?.backward()?;
        for (name, v) in [("x", xt), ("weight", wt), ("bias", bt)] {
            let (a, c) = (g1.get(v).expect("fused gradient"), g2.get(v).expect("composed gradient"));
            let scale = c.abs()?.max_all()?.to_scalar::<f32>()? as f64;
            assert!(max_diff(a, c) <= 1e-5 * scale.max(1.0), "{name}: gradients differ by {}", max_diff(a, c));
        }
        Ok(())
    }

    /// bf16 and f16 inputs: the sums run in f32, so the outputs are the f32 results rounded once,
    /// and the gradients come back in the input dtype.
    #[test]
    fn half_precision_rounds_once() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 3.0, (4, 768), &dev)?;
        let w = Tensor::randn(1f32, 0.2, 768, &dev)?;
        let b = Tensor::randn(0f32, 0.2, 768, &dev)?;
        for dtype in [DType::BF16, DType::F16] {
            let (xh, wh, bh) = (x.to_dtype(dtype)?, w.to_dtype(dtype)?, b.to_dtype(dtype)?);
            // The reference sees the same rounded inputs, so only the output rounding differs.
            let (xr, wr, br) = (xh.to_dtype(DType::F32)?, wh.to_dtype(DType::F32)?, bh.to_dtype(DType::F32)?);
            let unit = if dtype == DType::BF16 { 2f64.powi(-8) } else { 2f64.powi(-11) };
            let ln = layer_norm(&xh, &wh, &bh, 1e-5)?;
            let ln_ref = layer_norm(&xr, &wr, &br, 1e-5)?;
            let scale = ln_ref.abs()?.max_all()?.to_scalar::<f32>()? as f64;
            assert_eq!(ln.dtype(), dtype);
            assert!(max_diff(&ln, &ln_ref) <= unit * scale, "{dtype:?} layer norm: {}", max_diff(&ln, &ln_ref));
            let sm = softmax_last_dim(&xh)?;
            let sm_ref = softmax_last_dim(&xr)?;
            assert!(max_diff(&sm, &sm_ref) <= unit, "{dtype:?} softmax: {}", max_diff(&sm, &sm_ref));
            let v = Var::from_tensor(&xh)?;
            let g = softmax_last_dim(&layer_norm(v.as_tensor(), &wh, &bh, 1e-5)?)?.sum_all()?.backward()?;
            assert_eq!(g.get(v.as_tensor()).expect("gradient").dtype(), dtype);
        }
        Ok(())
    }
}

//! Batched matrix products off the gradient path, fast on the CPU at attention's sizes.
//!
//! Candle's CPU matmul runs the products of a batch one after another, each spread over the
//! threads; at attention's sizes (`[30 × 64]·[64 × 197]`, 96 of them) each product is too small to
//! share, and that runs at a third to a half of the machine's rate. Here each product is
//! single-threaded and the batch is spread over the threads instead (measured on a 2-core AVX-512
//! machine: 1.8–2× Candle's speed for `q·kᵀ` at 30 × 197 and 197 × 197 keys, the same bits). Any
//! stride pattern of the two innermost dimensions (a transposed view) is read in place.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};
use half::f16;
use rayon::prelude::*;

/// `a · b` over the leading (batch) dimensions: `[.., m, k] · [.., k, n] → [.., m, n]`. With equal
/// batch dimensions, on the CPU in f32, f64 and f16, for tensors that carry no gradient: the
/// batch-parallel product above. Otherwise Candle's `broadcast_matmul` (differentiable, every device
/// and dtype, and batch dimensions that broadcast: one text against N images).
pub fn batched_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let rank = a.rank();
    let fast = a.device().is_cpu()
        && !(a.track_op() || b.track_op())
        && matches!(a.dtype(), DType::F32 | DType::F64 | DType::F16)
        && a.dtype() == b.dtype()
        && rank >= 3
        && b.rank() == rank
        && a.dims()[..rank - 2] == b.dims()[..rank - 2];
    if fast {
        a.apply_op2_no_bwd(b, &BatchedMatmul)
    } else {
        a.broadcast_matmul(b)
    }
}

struct BatchedMatmul;

impl CustomOp2 for BatchedMatmul {
    fn name(&self) -> &'static str {
        "ctxalign-batched-matmul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        match cpu_batched_matmul(s1, l1, s2, l2)? {
            Some(out) => Ok(out),
            None => candle_core::bail!("batched matmul: unsupported dtypes {:?}, {:?}", s1.dtype(), s2.dtype()),
        }
    }
}

/// The batch-parallel product over storages; `None` for a dtype it does not handle (the caller then
/// uses Candle's).
pub(crate) fn cpu_batched_matmul(
    a: &CpuStorage,
    al: &Layout,
    b: &CpuStorage,
    bl: &Layout,
) -> Result<Option<(CpuStorage, Shape)>> {
    use CpuStorage as S;
    Ok(match (a, b) {
        (S::F32(a), S::F32(b)) => Some(product(a, al, b, bl)?),
        (S::F64(a), S::F64(b)) => Some(product(a, al, b, bl)?),
        (S::F16(a), S::F16(b)) => Some(product::<f16>(a, al, b, bl)?),
        _ => None,
    })
}

/// Each batch item's start offset, row-major over the leading dimensions, and the largest offset
/// any element of the `rows × cols` matrices reaches (checked against the storage).
fn batch_offsets(layout: &Layout) -> (Vec<usize>, usize) {
    let (dims, strides) = (layout.dims(), layout.stride());
    let r = dims.len();
    let offsets = crate::fused::leading_offsets(layout, &dims[..r - 2], &strides[..r - 2]);
    let inner = (dims[r - 2].max(1) - 1) * strides[r - 2] + (dims[r - 1].max(1) - 1) * strides[r - 1];
    let last = offsets.iter().max().copied().unwrap_or(0) + inner;
    (offsets, last)
}

fn product<T: WithDType>(a: &[T], al: &Layout, b: &[T], bl: &Layout) -> Result<(CpuStorage, Shape)> {
    let (ad, bd) = (al.dims(), bl.dims());
    let r = ad.len();
    if r < 3 || bd.len() != r || ad[..r - 2] != bd[..r - 2] || ad[r - 1] != bd[r - 2] {
        candle_core::bail!("batched matmul: {ad:?} · {bd:?} do not fit")
    }
    let (m, k, n) = (ad[r - 2], ad[r - 1], bd[r - 1]);
    let mut shape = ad[..r - 2].to_vec();
    shape.extend([m, n]);
    let items: usize = ad[..r - 2].iter().product();
    let mut out = vec![T::from_f64(0.0); items * m * n];
    if m * n > 0 && k > 0 {
        let ((a_off, a_last), (b_off, b_last)) = (batch_offsets(al), batch_offsets(bl));
        if a_last >= a.len() || b_last >= b.len() {
            candle_core::bail!("batched matmul: a layout reaches past its storage")
        }
        let (a_rs, a_cs) = (al.stride()[r - 2] as isize, al.stride()[r - 1] as isize);
        let (b_rs, b_cs) = (bl.stride()[r - 2] as isize, bl.stride()[r - 1] as isize);
        let (zero, one) = (T::from_f64(0.0), T::from_f64(1.0));
        out.par_chunks_mut(m * n).zip(a_off.par_iter().zip(&b_off)).for_each(|(dst, (&ao, &bo))| {
            // SAFETY: every element either matrix reaches lies in its storage (checked above), and
            // `dst` is this item's own `m × n` block, row-major.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    dst.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    a.as_ptr().add(ao),
                    a_cs,
                    a_rs,
                    b.as_ptr().add(bo),
                    b_cs,
                    b_rs,
                    zero,
                    one,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                )
            }
        });
    }
    Ok((T::to_cpu_storage_owned(out), Shape::from(shape)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Against Candle's matmul: contiguous operands, a transposed right side (`q·kᵀ`), a transposed
    /// left side, batch dimensions with a non-contiguous stride, every dtype it handles and one it
    /// hands to Candle (bf16), and a tracked operand (Candle's, with its gradient).
    #[test]
    fn equals_candles_matmul() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 3, 5, 4), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (2, 3, 7, 4), &dev)?;
        let wide = Tensor::randn(0f32, 1.0, (2, 6, 7, 4), &dev)?.narrow(1, 1, 3)?; // batch stride ≠ contiguous
        for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
            let (q, k, wide) = (q.to_dtype(dtype)?, k.to_dtype(dtype)?, wide.to_dtype(dtype)?);
            for (a, b) in
                [(q.clone(), k.t()?), (q.t()?, q.clone()), (q.clone(), wide.t()?), (k.clone(), q.t()?.contiguous()?)]
            {
                let ours = batched_matmul(&a, &b)?.to_dtype(DType::F64)?;
                let theirs = a.contiguous()?.matmul(&b.contiguous()?)?.to_dtype(DType::F64)?;
                assert_eq!(ours.dims(), theirs.dims());
                let diff = (ours - &theirs)?.abs()?.max_all()?.to_scalar::<f64>()?;
                let tolerance = if matches!(dtype, DType::F16 | DType::BF16) { 2e-2 } else { 1e-5 };
                assert!(diff <= tolerance, "{dtype:?}: differs by {diff}");
            }
        }
        // Broadcast batch dimensions (one text against N images) go to Candle's broadcast product.
        let one = q.narrow(0, 0, 1)?;
        let diff = (batched_matmul(&one, &k.t()?)? - one.broadcast_matmul(&k.t()?)?)?.abs()?.max_all()?;
        assert_eq!(diff.to_scalar::<f32>()?, 0.0);
        let var = candle_core::Var::from_tensor(&q)?;
        let y = batched_matmul(var.as_tensor(), &k.t()?)?;
        assert!(y.sum_all()?.backward()?.get(var.as_tensor()).is_some(), "a tracked operand keeps its gradient");
        assert!(batched_matmul(&q, &Tensor::zeros((2, 3, 5, 4), DType::F32, &dev)?).is_err());
        Ok(())
    }
}

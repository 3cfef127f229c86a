//! Matrix products on the CPU where Candle's way of calling the `gemm` crate leaves cores idle.
//!
//! - [`batched_matmul`], off the gradient path: Candle's CPU matmul runs the products of a batch one
//!   after another, each spread over the threads; at attention's sizes (`[30 × 64]·[64 × 197]`, 96
//!   of them) each product is too small to share, and that runs at a third to a half of the
//!   machine's rate. Here each product is single-threaded and the batch is spread over the threads
//!   instead (measured on a 2-core AVX-512 machine: 1.8–2× Candle's speed for `q·kᵀ` at 30 × 197
//!   and 197 × 197 keys, the same bits). Any stride pattern of the two innermost dimensions (a
//!   transposed view) is read in place.
//! - [`cpu_linear`], a linear layer's `x·Wᵀ + b`: `gemm` wants the weight (its left operand once it
//!   turns the row-major product around) column-major, and copies a row-major `W` of up to about a
//!   thousand outputs into its packed form on the calling thread before the other threads start:
//!   every projection paid a serial copy of its weight. Here the output is split into one tile per
//!   thread (columns first), each a single-threaded `gemm` that packs its own slice of `W` (2
//!   threads, GFLOP/s: `[1576 × 3072]·Wᵀ → 768` 159 → 197, `[240 × 768] → 768` 145 → 186,
//!   `[32 × 768] → 256` 26 → 82), and the bias is the product's starting value instead of a second
//!   pass over the output.

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
        out.par_chunks_mut(m * n).zip(a_off.par_iter().zip(&b_off)).for_each(|(dst, (&ao, &bo))| {
            // SAFETY: every element either matrix reaches lies in its storage (checked above), and
            // `dst` is this item's own `m × n` block, row-major.
            unsafe {
                row_major_gemm(
                    (m, n, k),
                    (dst.as_mut_ptr(), n),
                    false,
                    (a.as_ptr().add(ao), a_rs, a_cs),
                    (b.as_ptr().add(bo), b_rs, b_cs),
                    gemm::Parallelism::None,
                )
            }
        });
    }
    Ok((T::to_cpu_storage_owned(out), Shape::from(shape)))
}

/// `x·Wᵀ + b` for a linear layer on the CPU: `x` `[.., k]` contiguous, `w` `[n, k]` with any
/// strides, `b` `[n]`; the output `[.., n]`. `None` for a dtype it does not handle (bf16: the caller
/// keeps Candle's path).
pub(crate) fn cpu_linear(
    x: &CpuStorage,
    xl: &Layout,
    w: &CpuStorage,
    wl: &Layout,
    bias: Option<(&CpuStorage, &Layout)>,
) -> Result<Option<(CpuStorage, Shape)>> {
    use CpuStorage as S;
    macro_rules! product {
        ($x:expr, $w:expr, $variant:ident) => {{
            let b = match bias {
                None => None,
                Some((S::$variant(b), bl)) => Some((b.as_slice(), bl)),
                Some((b, _)) => candle_core::bail!("linear: a {:?} bias for {:?} weights", b.dtype(), w.dtype()),
            };
            Some(linear_product($x, xl, $w, wl, b)?)
        }};
    }
    Ok(match (x, w) {
        (S::F32(x), S::F32(w)) => product!(x, w, F32),
        (S::F64(x), S::F64(w)) => product!(x, w, F64),
        (S::F16(x), S::F16(w)) => product!(x, w, F16),
        _ => None,
    })
}

/// Outputs per column tile at least: narrower tiles cost more in `gemm`'s per-call overhead than the
/// weight's serial packing they avoid (measured at width 128, where Candle's call is the faster).
const MIN_TILE_COLUMNS: usize = 128;
/// Below this inner dimension the serial packing is cheap and `gemm`'s own threading is kept.
const MIN_TILED_DEPTH: usize = 256;

fn linear_product<T: WithDType>(
    x: &[T],
    xl: &Layout,
    w: &[T],
    wl: &Layout,
    bias: Option<(&[T], &Layout)>,
) -> Result<(CpuStorage, Shape)> {
    let dims = xl.dims();
    let (Some(&k), &[n, k_w]) = (dims.last(), wl.dims()) else {
        candle_core::bail!("linear: weight {:?} for input {dims:?}", wl.dims())
    };
    if k != k_w || !xl.is_contiguous() {
        candle_core::bail!("linear: a contiguous input [.., {k_w}] is needed, got {dims:?}")
    }
    let m = xl.shape().elem_count() / k.max(1);
    let x = &x[xl.start_offset()..];
    let (w_rs, w_cs) = (wl.stride()[0], wl.stride()[1]);
    let w_last = wl.start_offset() + (n.max(1) - 1) * w_rs + (k.max(1) - 1) * w_cs;
    if x.len() < m * k || (n * k > 0 && w_last >= w.len()) {
        candle_core::bail!("linear: a layout reaches past its storage")
    }
    let w = &w[wl.start_offset()..];
    let mut out: Vec<T> = match bias {
        Some((b, bl)) => {
            if bl.dims() != [n] {
                candle_core::bail!("linear: a bias of {:?} for {n} outputs", bl.dims())
            }
            let (start, stride) = (bl.start_offset(), bl.stride()[0]);
            if n > 0 && start + (n - 1) * stride >= b.len() {
                candle_core::bail!("linear: the bias' layout reaches past its storage")
            }
            let b: Vec<T> = (0..n).map(|j| b[start + j * stride]).collect();
            let mut out = Vec::with_capacity(m * n);
            (0..m).for_each(|_| out.extend_from_slice(&b));
            out
        }
        None => vec![T::from_f64(0.0); m * n],
    };
    if m * n > 0 && k > 0 {
        let threads = rayon::current_num_threads();
        // dst ← dst + x·Wᵀ; Wᵀ as the right operand: its rows strided by `w_cs`, columns by `w_rs`.
        let tile = |(r0, r1): (usize, usize), (c0, c1): (usize, usize), dst: usize, par: gemm::Parallelism| {
            // SAFETY: x holds m × k contiguous elements and w reaches `w_last` (both checked above);
            // each call writes its own rows r0..r1 and columns c0..c1 of the m × n row-major output.
            unsafe {
                row_major_gemm(
                    (r1 - r0, c1 - c0, k),
                    ((dst as *mut T).add(r0 * n + c0), n),
                    true,
                    (x.as_ptr().add(r0 * k), k as isize, 1),
                    (w.as_ptr().add(c0 * w_rs), w_cs as isize, w_rs as isize),
                    par,
                )
            }
        };
        let dst = out.as_mut_ptr() as usize;
        // A row-major W (`w_cs == 1`) is what `gemm` packs serially; a transposed one it reads as is.
        if threads > 1 && w_cs == 1 && k >= MIN_TILED_DEPTH && n >= MIN_TILE_COLUMNS {
            // One tile per thread, so no thread waits for a second round: the most column tiles
            // that divide the threads, the rest of the threads as row tiles (at least 64 rows each).
            let most = (n / MIN_TILE_COLUMNS).clamp(1, threads);
            let columns = (1..=most).rev().find(|c| threads.is_multiple_of(*c)).unwrap_or(1);
            let rows = (threads / columns).min(m.div_ceil(64)).max(1);
            // Column tiles on whole SIMD registers (16 f32), so no tile ends mid-register.
            let width = n.div_ceil(columns).div_ceil(16) * 16;
            let height = m.div_ceil(rows);
            (0..rows * columns).into_par_iter().for_each(|t| {
                let (r0, c0) = ((t / columns) * height, (t % columns) * width);
                if r0 < m && c0 < n {
                    tile((r0, (r0 + height).min(m)), (c0, (c0 + width).min(n)), dst, gemm::Parallelism::None);
                }
            });
        } else {
            let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
            tile((0, m), (0, n), dst, par);
        }
    }
    let mut shape = dims[..dims.len() - 1].to_vec();
    shape.push(n);
    Ok((T::to_cpu_storage_owned(out), Shape::from(shape)))
}

/// `dst ← dst + a·b` (`accumulate`) or `dst ← a·b` for an `m × n` output whose rows are `dst_rs`
/// apart; `a` (`m × k`) and `b` (`k × n`) given as a start and their row and column strides.
///
/// # Safety
/// Every element the three matrices reach must lie in their allocations, and no other thread may
/// write the output's elements during the call.
unsafe fn row_major_gemm<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (*mut T, usize),
    accumulate: bool,
    (a, a_rs, a_cs): (*const T, isize, isize),
    (b, b_rs, b_cs): (*const T, isize, isize),
    parallelism: gemm::Parallelism,
) {
    let alpha = T::from_f64(if accumulate { 1.0 } else { 0.0 });
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        a,
        a_cs,
        a_rs,
        b,
        b_cs,
        b_rs,
        alpha,
        T::from_f64(1.0),
        false,
        false,
        false,
        parallelism,
    )
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

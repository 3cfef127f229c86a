//! Fused softmax, LayerNorm and GELU that Candle can differentiate.
//!
//! Candle's own fused kernels (`candle_nn::ops::layer_norm`, `softmax_last_dim`) record no backward
//! op, and the composed forms that Candle can differentiate keep every intermediate alive for
//! backward (five tensors the size of the attention scores for one softmax) and launch one kernel
//! per elementwise step. These ops run one fused forward pass and give Candle an analytic backward
//! that needs only what the graph already holds:
//!
//! - softmax of `x·scale + mask` (attention's scale and additive mask folded into the same pass, so
//!   neither the scaled nor the masked scores exist as tensors): `dz = y ⊙ (g − Σⱼ g ⊙ y)` from the
//!   output `y`, then `dx = scale·dz`, `dmask = dz`;
//! - LayerNorm: with `x̂ = (x − μ)·r`, `r = (σ² + ε)^-½` recomputed from the input row,
//!   `dx = r·(gγ − mean(gγ) − x̂·mean(gγ ⊙ x̂))`, `dγ = Σ g ⊙ x̂`, `dβ = Σ g`;
//! - exact (erf) GELU: `dx = g·(Φ(x) + x·φ(x))`.
//!
//! Forward, CPU: one pass per row, statistics and sums in f32 for f16/bf16 inputs (f64 for f64), so
//! half precision loses nothing in the reductions; `exp` and `erf` vectorised ([`crate::simd`]).
//! Forward, CUDA: Candle's `softmax`, `layernorm` and `gelu_erf` kernels from `candle-kernels`
//! (launched as `candle-nn` launches them), which accumulate in f32; the softmax's scale and mask are
//! applied by Candle's affine and broadcast-add kernels inside the op, so their results are freed
//! when it returns. Backward: one pass per op as well (per row for softmax and LayerNorm's input
//! gradient; LayerNorm's weight and bias gradients as partial sums over blocks of rows, added in a
//! fixed order), sums in f32 for half precision, on the CPU and in ctxalign's CUDA kernels
//! (`kernels/ctxalign.cu`). A kernel for another backend goes beside `cpu_fwd`/`cuda_fwd`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use half::{bf16, f16};
use num_traits::Float;
use rayon::prelude::*;

use crate::matmul::batched_matmul;
use crate::ops::upcast_half;
use crate::simd;

/// Softmax over the last dimension (`[.., n]`), differentiable.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    scaled_masked_softmax(xs, None, 1.0)
}

/// `softmax(scores · scale + mask)` over the last dimension, differentiable in `scores` and `mask`,
/// in one pass: attention's probabilities without the scaled or masked scores as tensors.
///
/// `mask` (additive: 0 keeps, a large negative value removes) broadcasts onto `scores`
/// (`[batch, 1, 1, keys]` for a padding mask) and is cast to `scores`' dtype.
pub fn scaled_masked_softmax(scores: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let scores = scores.contiguous()?;
    match mask {
        None => scores.apply_op1(ScaledSoftmax { scale }),
        Some(mask) => {
            // A stride-0 view, not a copy: the kernels read one mask row per score row.
            let mask = mask.to_dtype(scores.dtype())?.broadcast_as(scores.shape())?;
            scores.apply_op2(&mask, ScaledSoftmax { scale })
        }
    }
}

/// Exact GELU, `x·Φ(x)` with `Φ(x) = (1 + erf(x/√2))/2` (BERT's and BLIP's `"gelu"`), differentiable.
pub fn gelu_erf(xs: &Tensor) -> Result<Tensor> {
    xs.contiguous()?.apply_op1(GeluErf)
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

/// How closely one fused op on a device, in one dtype, follows the f64 CPU result on the same
/// (rounded) inputs: forward and every argument's gradient.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OpAgreement {
    pub op: &'static str,
    pub dtype: String,
    /// `max |device − reference| / max(1, max |reference|)` over the output.
    pub forward_error: f64,
    /// The same for each differentiated argument, worst first.
    pub gradient_errors: Vec<(&'static str, f64)>,
    pub tolerance: f64,
}

impl OpAgreement {
    pub fn passed(&self) -> bool {
        self.forward_error <= self.tolerance && self.gradient_errors.iter().all(|(_, e)| *e <= self.tolerance)
    }
}

/// Runs every op of this module (attention included) and [`crate::Linear`]'s (trainable and
/// frozen) forward and backward on `device` in `dtype` at attention and BLIP-base sizes, and
/// compares each output and gradient with the f64 computation on the CPU: the check that a
/// device's kernels (and their backward) compute what the CPU tests prove.
pub fn device_agreement(device: &candle_core::Device, dtype: DType) -> Result<Vec<OpAgreement>> {
    fn linear_forward(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
        candle_core::Module::forward(&crate::Linear::new(weight.clone(), Some(bias.clone())), x)
    }
    use candle_core::{Device, Var};
    let host = Device::Cpu;
    let tolerance = match dtype {
        DType::F64 => 1e-12,
        DType::F32 => 1e-5,
        DType::F16 => 4e-3,
        _ => 3e-2,
    };
    // A padding mask over 197 keys (ViT-B/16 tokens at 224 px): 150 and 40 real ones in the two rows.
    let pad: Vec<f64> = (0..2 * 197).map(|i| if i % 197 < [150, 40][i / 197] { 0.0 } else { -1e4 }).collect();
    let pad = Tensor::from_vec(pad, (2, 1, 1, 197), &host)?;
    // (op, arguments, the op): every argument is differentiated but a constant mask, as in the
    // models (its gradient is the scores' before scaling, and a bf16 sum over heads and queries
    // would measure Candle's reduction rather than this op).
    type Case<'a> = (&'static str, Vec<(&'static str, Tensor)>, Box<dyn Fn(&[Tensor]) -> Result<Tensor> + 'a>);
    let cases: Vec<Case> = vec![
        (
            "softmax(x·scale + padding mask)",
            vec![("scores", Tensor::randn(0f64, 4.0, (2, 12, 30, 197), &host)?), ("mask", pad.clone())],
            Box::new(|a: &[Tensor]| scaled_masked_softmax(&a[0], Some(&a[1]), 0.125)),
        ),
        (
            "softmax(x)",
            vec![("x", Tensor::randn(0f64, 3.0, (8, 577), &host)?)],
            Box::new(|a: &[Tensor]| softmax_last_dim(&a[0])),
        ),
        (
            "layer_norm",
            vec![
                ("x", Tensor::randn(0.5f64, 2.0, (64, 768), &host)?),
                ("weight", Tensor::randn(1f64, 0.3, 768, &host)?),
                ("bias", Tensor::randn(0f64, 0.3, 768, &host)?),
            ],
            Box::new(|a: &[Tensor]| layer_norm(&a[0], &a[1], &a[2], 1e-12)),
        ),
        ("gelu", vec![("x", Tensor::randn(0f64, 2.0, (64, 3072), &host)?)], Box::new(|a: &[Tensor]| gelu_erf(&a[0]))),
        (
            "linear, trainable (BERT's fc1)",
            vec![
                ("x", Tensor::randn(0f64, 1.0, (2, 30, 768), &host)?),
                ("weight", Tensor::randn(0f64, 0.04, (3072, 768), &host)?),
                ("bias", Tensor::randn(0f64, 0.1, 3072, &host)?),
            ],
            Box::new(|a: &[Tensor]| linear_forward(&a[0], &a[1], &a[2])),
        ),
        (
            "linear, frozen weights (cross-attention keys over 197 image tokens)",
            vec![
                ("x", Tensor::randn(0f64, 1.0, (2, 197, 768), &host)?),
                ("frozen weight", Tensor::randn(0f64, 0.04, (768, 768), &host)?),
                ("frozen bias", Tensor::randn(0f64, 0.1, 768, &host)?),
            ],
            Box::new(|a: &[Tensor]| linear_forward(&a[0], &a[1], &a[2])),
        ),
        (
            "attention (30 queries over 197 keys, padding mask)",
            vec![
                ("q", Tensor::randn(0f64, 1.0, (2, 12, 30, 64), &host)?),
                ("k", Tensor::randn(0f64, 1.0, (2, 12, 197, 64), &host)?),
                ("v", Tensor::randn(0f64, 1.0, (2, 12, 197, 64), &host)?),
                ("mask", pad.clone()),
            ],
            Box::new(|a: &[Tensor]| fused_attention(&a[0], &a[1], &a[2], Some(&a[3]), 0.125)),
        ),
    ];
    // Masks and frozen weights are constants: no gradient is asked of them.
    let constant = |name: &str| name == "mask" || name.starts_with("frozen");
    let mut reports = Vec::new();
    for (op, args, f) in cases {
        // Both sides start from the inputs rounded to `dtype`, so only the op's arithmetic differs.
        let rounded: Vec<Tensor> =
            args.iter().map(|(_, t)| t.to_dtype(dtype)?.to_dtype(DType::F64)).collect::<Result<_>>()?;
        let probe = Tensor::randn(0f64, 1.0, f(&rounded)?.shape(), &host)?;
        let run = |device: &Device, dtype: DType| -> Result<(Tensor, Vec<Tensor>)> {
            let (mut vars, mut inputs) = (Vec::new(), Vec::new());
            for (t, (name, _)) in rounded.iter().zip(&args) {
                let t = t.to_dtype(dtype)?.to_device(device)?;
                if constant(name) {
                    inputs.push(t);
                } else {
                    let v = Var::from_tensor(&t)?;
                    inputs.push(v.as_tensor().clone());
                    vars.push(v);
                }
            }
            let y = f(&inputs)?;
            let loss = (upcast_half(&y)?.to_dtype(DType::F32)? * probe.to_dtype(DType::F32)?.to_device(device)?)?;
            let grads = loss.sum_all()?.backward()?;
            let grads = vars
                .iter()
                .map(|v| match grads.get(v.as_tensor()) {
                    Some(g) => g.to_device(&host)?.to_dtype(DType::F64),
                    None => candle_core::bail!("{op}: an argument got no gradient on {device:?} {dtype:?}"),
                })
                .collect::<Result<_>>()?;
            Ok((y.to_device(&host)?.to_dtype(DType::F64)?, grads))
        };
        let (y_ref, g_ref) = run(&host, DType::F64)?;
        let (y, g) = run(device, dtype)?;
        let error = |a: &Tensor, reference: &Tensor| -> Result<f64> {
            let scale = reference.abs()?.max_all()?.to_scalar::<f64>()?.max(1.0);
            Ok((a - reference)?.abs()?.max_all()?.to_scalar::<f64>()? / scale)
        };
        let mut gradient_errors = Vec::new();
        let differentiated = args.iter().filter(|(name, _)| !constant(name));
        for (((name, _), g), r) in differentiated.zip(&g).zip(&g_ref) {
            gradient_errors.push((*name, error(g, r)?));
        }
        gradient_errors.sort_by(|a, b| b.1.total_cmp(&a.1));
        reports.push(OpAgreement {
            op,
            dtype: format!("{dtype:?}"),
            forward_error: error(&y, &y_ref)?,
            gradient_errors,
            tolerance,
        });
    }
    // The optimizer's update, in place on f32 state from gradients of this dtype.
    if dtype != DType::F64 {
        reports.push(crate::adam::device_agreement(device, dtype)?);
    }
    Ok(reports)
}

/// The accumulator types, each with its `exp` over a row (vectorised for f32).
trait Accumulator: num_traits::Float + Send + Sync + candle_core::WithDType {
    fn exp_in_place(xs: &mut [Self]);
}

impl Accumulator for f32 {
    fn exp_in_place(xs: &mut [f32]) {
        simd::exp_in_place(xs)
    }
}

impl Accumulator for f64 {
    fn exp_in_place(xs: &mut [f64]) {
        xs.iter_mut().for_each(|x| *x = x.exp())
    }
}

/// The element types the CPU forward handles, each with the type its sums run in.
trait Element: Copy + Send + Sync + candle_core::WithDType {
    type Acc: Accumulator;
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

/// The storage offset of each index over the leading dimensions `lead` (with their `strides`), in
/// row-major order: where each row (or matrix) of a strided tensor starts.
pub(crate) fn leading_offsets(layout: &Layout, lead: &[usize], strides: &[usize]) -> Vec<usize> {
    let items: usize = lead.iter().product();
    (0..items)
        .map(|i| {
            let (mut rest, mut offset) = (i, layout.start_offset());
            for (&d, &s) in lead.iter().zip(strides).rev() {
                offset += (rest % d) * s;
                rest /= d;
            }
            offset
        })
        .collect()
}

pub(crate) fn contiguous_slice<'a, T>(data: &'a [T], layout: &Layout, what: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

pub(crate) fn contiguous_slice_mut<'a, T>(data: &'a mut [T], layout: &Layout, what: &str) -> Result<&'a mut [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&mut data[start..end]),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

/// `softmax(x·scale + mask)` row by row; `mask` is read through its (broadcast) layout.
fn softmax_rows<T: Element>(
    src: &[T],
    layout: &Layout,
    scale: f64,
    mask: Option<(&[T], &Layout)>,
) -> Result<(CpuStorage, Shape)> {
    let src = contiguous_slice(src, layout, "softmax")?;
    let n = layout.dims().last().copied().unwrap_or(1).max(1);
    let mask = mask.map(|(data, l)| MaskRows::new(data, l, n)).transpose()?;
    let scale = <T::Acc as num_traits::NumCast>::from(scale).expect("the scale fits the accumulator type");
    let mut dst = vec![T::narrow(num_traits::Float::nan()); src.len()];
    // Each worker reuses one row buffer in the accumulator type.
    src.par_chunks(n).zip(dst.par_chunks_mut(n)).enumerate().for_each_init(Vec::new, |z, (r, (row, out))| {
        z.clear();
        z.extend(row.iter().map(|&x| x.widen() * scale));
        if let Some(mask) = &mask {
            mask.add_row(r, z);
        }
        let max = z.iter().fold(<T::Acc as num_traits::Float>::neg_infinity(), |m, &x| m.max(x));
        z.iter_mut().for_each(|x| *x -= max);
        T::Acc::exp_in_place(z);
        let sum = z.iter().fold(<T::Acc as num_traits::Zero>::zero(), |s, &e| s + e);
        for (o, &e) in out.iter_mut().zip(z.iter()) {
            *o = T::narrow(e / sum);
        }
    });
    Ok((T::to_cpu_storage_owned(dst), layout.shape().clone()))
}

/// An additive mask broadcast onto `[.., n]` scores: where each score row's mask row starts.
struct MaskRows<'a, T> {
    data: &'a [T],
    /// Offset of row `r`'s first element, by the strides of the leading dimensions.
    starts: Vec<usize>,
    /// Stride along the row: 1 for a mask per key, 0 for one value per row.
    step: usize,
}

impl<'a, T: Element> MaskRows<'a, T> {
    fn new(data: &'a [T], layout: &Layout, n: usize) -> Result<Self> {
        let (dims, strides) = (layout.dims(), layout.stride());
        let Some((&step, lead_strides)) = strides.split_last() else {
            candle_core::bail!("softmax: the mask must have at least one dimension")
        };
        if dims.last() != Some(&n) {
            candle_core::bail!("softmax: mask {:?} does not end in the row length {n}", dims)
        }
        let starts = leading_offsets(layout, &dims[..dims.len() - 1], lead_strides);
        let last = starts.iter().max().copied().unwrap_or(0) + (n - 1) * step;
        if last >= data.len() {
            candle_core::bail!("softmax: the mask's layout reaches past its storage")
        }
        Ok(Self { data, starts, step })
    }

    fn add_row(&self, r: usize, z: &mut [T::Acc]) {
        let (start, n) = (self.starts[r], z.len());
        if self.step == 1 {
            for (z, &m) in z.iter_mut().zip(&self.data[start..start + n]) {
                *z += m.widen();
            }
        } else {
            for (j, z) in z.iter_mut().enumerate() {
                *z += self.data[start + j * self.step].widen();
            }
        }
    }
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

/// `softmax(x·scale [+ mask])`: a `CustomOp1` without a mask, a `CustomOp2` with one.
struct ScaledSoftmax {
    scale: f64,
}

impl ScaledSoftmax {
    fn cpu(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
        mask: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        use CpuStorage as S;
        let scale = self.scale;
        match (storage, mask) {
            (S::F32(s), None) => softmax_rows(s, layout, scale, None),
            (S::F64(s), None) => softmax_rows(s, layout, scale, None),
            (S::BF16(s), None) => softmax_rows(s, layout, scale, None),
            (S::F16(s), None) => softmax_rows(s, layout, scale, None),
            (S::F32(s), Some((S::F32(m), ml))) => softmax_rows(s, layout, scale, Some((m, ml))),
            (S::F64(s), Some((S::F64(m), ml))) => softmax_rows(s, layout, scale, Some((m, ml))),
            (S::BF16(s), Some((S::BF16(m), ml))) => softmax_rows(s, layout, scale, Some((m, ml))),
            (S::F16(s), Some((S::F16(m), ml))) => softmax_rows(s, layout, scale, Some((m, ml))),
            (other, mask) => candle_core::bail!(
                "softmax: unsupported dtypes {:?} (mask {:?})",
                other.dtype(),
                mask.map(|(m, _)| m.dtype())
            ),
        }
    }
}

impl CustomOp1 for ScaledSoftmax {
    fn name(&self) -> &'static str {
        "ctxalign-scaled-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu(storage, layout, None)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda_kernels::scaled_masked_softmax(storage, layout, None, self.scale)
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(softmax_backward(res, grad_res, self.scale)?.to_dtype(arg.dtype())?))
    }
}

impl CustomOp2 for ScaledSoftmax {
    fn name(&self) -> &'static str {
        "ctxalign-scaled-masked-softmax"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu(s1, l1, Some((s2, l2)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda_kernels::scaled_masked_softmax(s1, l1, Some((s2, l2)), self.scale)
    }

    fn bwd(
        &self,
        scores: &Tensor,
        mask: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // The mask argument is the broadcast view; Candle sums this back to the mask's own shape.
        let d_mask =
            mask.track_op().then(|| softmax_backward(res, grad_res, 1.0)?.to_dtype(mask.dtype())).transpose()?;
        Ok((Some(softmax_backward(res, grad_res, self.scale)?.to_dtype(scores.dtype())?), d_mask))
    }
}

/// `softmax(q·kᵀ·scale + mask)·v` over `[batch, heads, tokens, head_dim]` as one op, for the gradient
/// path: the graph keeps `q`, `k`, `v` and the context, where the composed form also keeps the
/// scores and the probabilities (`[batch, heads, queries, keys]` each; for S0's TMIM decoder over
/// 197 tokens, 3.7 MB per image per layer). The backward recomputes the probabilities from `q` and
/// `k`: one more `q·kᵀ` and softmax per attention. `q`, `k` and `v` must be contiguous with equal
/// leading dimensions; `mask`, a constant, is viewed at the scores' shape.
pub fn fused_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let [b, h, tq, d] = q.dims() else { candle_core::bail!("attention: q must be [batch, heads, tokens, head_dim]") };
    let tk = k.dim(2)?;
    if k.dims() != [*b, *h, tk, *d] || v.dims() != k.dims() {
        candle_core::bail!("attention: q {:?}, k {:?} and v {:?} do not fit", q.dims(), k.dims(), v.dims())
    }
    let mask = mask.map(|m| m.to_dtype(q.dtype())?.broadcast_as((*b, *h, *tq, tk))).transpose()?;
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, FusedAttention { scale, mask })
}

struct FusedAttention {
    scale: f64,
    /// The additive mask viewed at the scores' shape (no gradient is asked of it).
    mask: Option<Tensor>,
}

impl FusedAttention {
    /// Runs `f` with the mask's storage on this backend (`backend` picks it out of Candle's
    /// `Storage`), or `None` without a mask.
    fn with_mask<S, R>(
        &self,
        backend: impl Fn(&candle_core::Storage) -> Option<&S>,
        f: impl FnOnce(Option<(&S, &Layout)>) -> Result<R>,
    ) -> Result<R> {
        let Some(mask) = &self.mask else { return f(None) };
        let (storage, layout) = mask.storage_and_layout();
        match backend(&storage) {
            Some(s) => f(Some((s, layout))),
            None => candle_core::bail!("attention: the mask is on another device than q, k and v"),
        }
    }

    /// Scores, the softmax (`softmax`: this backend's scale-and-mask softmax over storages), and the
    /// context, on any backend.
    /// `matmul(a, a_layout, b, b_layout, (batch, m, n, k))`: this backend's batched product.
    fn fwd<S: candle_core::backend::BackendStorage>(
        q: (&S, &Layout),
        k: (&S, &Layout),
        v: (&S, &Layout),
        softmax: impl FnOnce(&S, &Layout) -> Result<(S, Shape)>,
        matmul: impl Fn(&S, &Layout, &S, &Layout, (usize, usize, usize, usize)) -> Result<S>,
    ) -> Result<(S, Shape)> {
        let (&[b, h, tq, d], &[_, _, tk, _]) = (q.1.dims(), k.1.dims()) else {
            candle_core::bail!("attention: q {:?} and k {:?} must be 4-D", q.1.dims(), k.1.dims())
        };
        if !(q.1.is_contiguous() && k.1.is_contiguous() && v.1.is_contiguous()) {
            candle_core::bail!("attention: q, k and v must be contiguous")
        }
        let scores = matmul(q.0, q.1, k.0, &k.1.transpose(2, 3)?, (b * h, tq, tk, d))?;
        let scores_layout = Layout::contiguous((b, h, tq, tk));
        let (probs, _) = softmax(&scores, &scores_layout)?;
        let context = matmul(&probs, &scores_layout, v.0, v.1, (b * h, tq, d, tk))?;
        Ok((context, Shape::from((b, h, tq, d))))
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "ctxalign-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let softmax = ScaledSoftmax { scale: self.scale };
        self.with_mask(
            |storage| match storage {
                candle_core::Storage::Cpu(s) => Some(s),
                _ => None,
            },
            |mask| {
                // The batch-parallel product where it handles the dtype, Candle's otherwise.
                let matmul = |a: &CpuStorage, al: &Layout, b: &CpuStorage, bl: &Layout, bmnk| {
                    match crate::matmul::cpu_batched_matmul(a, al, b, bl)? {
                        Some((product, _)) => Ok(product),
                        None => a.matmul(b, bmnk, al, bl),
                    }
                };
                Self::fwd((q, ql), (k, kl), (v, vl), |z, zl| softmax.cpu(z, zl, mask), matmul)
            },
        )
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.with_mask(
            |storage| match storage {
                candle_core::Storage::Cuda(s) => Some(s),
                _ => None,
            },
            |mask| {
                Self::fwd(
                    (q, ql),
                    (k, kl),
                    (v, vl),
                    |z, zl| crate::cuda_kernels::scaled_masked_softmax(z, zl, mask, self.scale),
                    |a, al, b, bl, bmnk| a.matmul(b, bmnk, al, bl),
                )
            },
        )
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Detached operands: gradients that recorded a graph would keep it alive (see `wide`).
        let (qd, kd, vd, g) = (q.detach(), k.detach(), v.detach(), grad.detach());
        let probs = scaled_masked_softmax(&batched_matmul(&qd, &kd.t()?)?, self.mask.as_ref(), self.scale)?;
        let dv = v.track_op().then(|| batched_matmul(&probs.t()?, &g)).transpose()?;
        let d_probs = batched_matmul(&g, &vd.t()?)?;
        let d_scores = softmax_backward(&probs, &d_probs, self.scale)?;
        let dq = q.track_op().then(|| batched_matmul(&d_scores, &kd)).transpose()?;
        let dk = k.track_op().then(|| batched_matmul(&d_scores.t()?, &qd)).transpose()?;
        Ok((dq, dk, dv))
    }
}

/// Exact GELU; its backward is [`GeluErfBackward`].
struct GeluErf;

/// Applies `f32` kernel `f` to chunks of a contiguous slice in parallel, widening and narrowing
/// half-precision elements per chunk.
fn map_chunks<T: Element<Acc = f32>>(inputs: &[&[T]], f: impl Fn(&[&[f32]], &mut [f32]) + Sync) -> Vec<T> {
    const CHUNK: usize = 16 * 1024;
    let len = inputs[0].len();
    let mut dst = vec![T::narrow(0.0); len];
    dst.par_chunks_mut(CHUNK).enumerate().for_each_init(
        || (vec![Vec::new(); inputs.len()], Vec::new()),
        |(wide_in, wide_out), (c, out)| {
            let range = c * CHUNK..c * CHUNK + out.len();
            for (w, input) in wide_in.iter_mut().zip(inputs) {
                w.clear();
                w.extend(input[range.clone()].iter().map(|&x| x.widen()));
            }
            wide_out.clear();
            wide_out.resize(out.len(), 0.0);
            let views: Vec<&[f32]> = wide_in.iter().map(|w| w.as_slice()).collect();
            f(&views, wide_out);
            for (o, &v) in out.iter_mut().zip(wide_out.iter()) {
                *o = T::narrow(v);
            }
        },
    );
    dst
}

/// f32 without the widening copies.
fn map_chunks_f32(inputs: &[&[f32]], f: impl Fn(&[&[f32]], &mut [f32]) + Sync) -> Vec<f32> {
    const CHUNK: usize = 16 * 1024;
    let mut dst = vec![0f32; inputs[0].len()];
    dst.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
        let range = c * CHUNK..c * CHUNK + out.len();
        let views: Vec<&[f32]> = inputs.iter().map(|input| &input[range.clone()]).collect();
        f(&views, out);
    });
    dst
}

fn gelu_f64(x: f64) -> f64 {
    0.5 * x * (1.0 + candle_core::cpu::erf::erf_f64(x * std::f64::consts::FRAC_1_SQRT_2))
}

fn gelu_grad_f64(x: f64, g: f64) -> f64 {
    let cdf = 0.5 * (1.0 + candle_core::cpu::erf::erf_f64(x * std::f64::consts::FRAC_1_SQRT_2));
    let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
    g * (cdf + x * pdf)
}

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "ctxalign-gelu-erf"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let gelu = |x: &[&[f32]], out: &mut [f32]| simd::gelu(x[0], out);
        let out = match storage {
            CpuStorage::F32(s) => CpuStorage::F32(map_chunks_f32(&[contiguous_slice(s, layout, "gelu")?], gelu)),
            CpuStorage::BF16(s) => CpuStorage::BF16(map_chunks(&[contiguous_slice(s, layout, "gelu")?], gelu)),
            CpuStorage::F16(s) => CpuStorage::F16(map_chunks(&[contiguous_slice(s, layout, "gelu")?], gelu)),
            CpuStorage::F64(s) => {
                CpuStorage::F64(contiguous_slice(s, layout, "gelu")?.par_iter().map(|&x| gelu_f64(x)).collect())
            }
            other => candle_core::bail!("gelu: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((storage.unary_impl::<candle_core::op::GeluErf>(layout)?, layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let x = arg.detach().contiguous()?;
        Ok(Some(x.apply_op2_no_bwd(&grad_res.detach().to_dtype(x.dtype())?.contiguous()?, &GeluErfBackward)?))
    }
}

/// `g·gelu'(x)` in one pass ([`GeluErf`]'s backward), `x` and `g` of one dtype.
struct GeluErfBackward;

impl CustomOp2 for GeluErfBackward {
    fn name(&self) -> &'static str {
        "ctxalign-gelu-erf-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        use CpuStorage as S;
        let grad = |xg: &[&[f32]], out: &mut [f32]| simd::gelu_backward(xg[0], xg[1], out);
        let out = match (s1, s2) {
            (S::F32(x), S::F32(g)) => {
                S::F32(map_chunks_f32(&[contiguous_slice(x, l1, "gelu")?, contiguous_slice(g, l2, "gelu")?], grad))
            }
            (S::BF16(x), S::BF16(g)) => {
                S::BF16(map_chunks(&[contiguous_slice(x, l1, "gelu")?, contiguous_slice(g, l2, "gelu")?], grad))
            }
            (S::F16(x), S::F16(g)) => {
                S::F16(map_chunks(&[contiguous_slice(x, l1, "gelu")?, contiguous_slice(g, l2, "gelu")?], grad))
            }
            (S::F64(x), S::F64(g)) => {
                let (x, g) = (contiguous_slice(x, l1, "gelu")?, contiguous_slice(g, l2, "gelu")?);
                S::F64(x.par_iter().zip(g).map(|(&x, &g)| gelu_grad_f64(x, g)).collect())
            }
            _ => candle_core::bail!("gelu backward: unsupported dtypes {:?}, {:?}", s1.dtype(), s2.dtype()),
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((crate::cuda_kernels::gelu_bwd(s1, l1, s2, l2)?, l1.shape().clone()))
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
        crate::cuda_kernels::layer_norm(s1, l1, s2, l2, s3, l3, self.eps as f32)
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (xd, g) = (x.detach().contiguous()?, grad_res.detach().to_dtype(x.dtype())?.contiguous()?);
        let dx = x
            .track_op()
            .then(|| {
                xd.apply_op3_no_bwd(
                    &weight.detach().to_dtype(x.dtype())?.contiguous()?,
                    &g,
                    &LayerNormInputGrad { eps: self.eps },
                )
            })
            .transpose()?;
        let (dw, db) = if weight.track_op() || bias.track_op() {
            // [blocks, 2, n] partial sums -> [2, n]: Σ g·x̂ (the weight's) and Σ g (the bias').
            let partial = xd.apply_op2_no_bwd(&g, &LayerNormParamGrads { eps: self.eps })?;
            let (blocks, _, n) = partial.dims3()?;
            let sums = column_sum(&partial.reshape((blocks, 2 * n))?)?.reshape((2, n))?;
            let take = |i: usize, p: &Tensor| sums.get(i)?.reshape(p.shape())?.to_dtype(p.dtype());
            (
                weight.track_op().then(|| take(0, weight)).transpose()?,
                bias.track_op().then(|| take(1, bias)).transpose()?,
            )
        } else {
            (None, None)
        };
        Ok((dx, dw, db))
    }
}

/// `(y ⊙ (g − Σ g⊙y))·scale`: the gradient of the scores of `y = softmax(scores·scale + mask)` from
/// the output gradient `g`, in one pass per row (sums in f32 for half precision), in `y`'s dtype.
fn softmax_backward(y: &Tensor, g: &Tensor, scale: f64) -> Result<Tensor> {
    let y = y.detach().contiguous()?;
    y.apply_op2_no_bwd(&g.detach().to_dtype(y.dtype())?.contiguous()?, &SoftmaxBackward { scale })
}

struct SoftmaxBackward {
    scale: f64,
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "ctxalign-softmax-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        use CpuStorage as S;
        macro_rules! rows {
            ($y:expr, $g:expr) => {
                RowPair::new($y, l1, $g, l2, "softmax backward")?.softmax_backward(self.scale)
            };
        }
        let out = match (s1, s2) {
            (S::F32(y), S::F32(g)) => rows!(y, g),
            (S::F64(y), S::F64(g)) => rows!(y, g),
            (S::BF16(y), S::BF16(g)) => rows!(y, g),
            (S::F16(y), S::F16(g)) => rows!(y, g),
            _ => candle_core::bail!("softmax backward: unsupported dtypes {:?}, {:?}", s1.dtype(), s2.dtype()),
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((crate::cuda_kernels::softmax_bwd(s1, l1, s2, l2, self.scale as f32)?, l1.shape().clone()))
    }
}

/// LayerNorm's input gradient `(g·w − mean(g·w) − x̂·mean(g·w·x̂)) / σ` per row, from `x`, the
/// weight and the output gradient (one dtype), the statistics recomputed from `x`.
struct LayerNormInputGrad {
    eps: f64,
}

impl CustomOp3 for LayerNormInputGrad {
    fn name(&self) -> &'static str {
        "ctxalign-layer-norm-input-grad"
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
        macro_rules! rows {
            ($x:expr, $w:expr, $g:expr) => {
                RowPair::new($x, l1, $g, l3, "layer_norm backward")?
                    .layer_norm_input_grad(contiguous_slice($w, l2, "layer_norm weight")?, self.eps)
            };
        }
        let out = match (s1, s2, s3) {
            (S::F32(x), S::F32(w), S::F32(g)) => rows!(x, w, g),
            (S::F64(x), S::F64(w), S::F64(g)) => rows!(x, w, g),
            (S::BF16(x), S::BF16(w), S::BF16(g)) => rows!(x, w, g),
            (S::F16(x), S::F16(w), S::F16(g)) => rows!(x, w, g),
            _ => candle_core::bail!(
                "layer_norm backward: unsupported dtypes {:?}, {:?}, {:?}",
                s1.dtype(),
                s2.dtype(),
                s3.dtype()
            ),
        }?;
        Ok((out, l1.shape().clone()))
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
        let dx = crate::cuda_kernels::layer_norm_bwd_x((s1, l1), (s2, l2), (s3, l3), self.eps as f32)?;
        Ok((dx, l1.shape().clone()))
    }
}

/// LayerNorm's weight and bias gradients as partial sums over blocks of [`LN_ROWS_PER_BLOCK`] rows,
/// `[blocks, 2, n]` (`Σ g·x̂`, then `Σ g`) in f32 (f64 for f64), from `x` and the output gradient;
/// the caller sums the blocks, in a fixed order, so the result does not depend on threads.
struct LayerNormParamGrads {
    eps: f64,
}

/// Rows per partial sum of [`LayerNormParamGrads`] on the CPU (the CUDA kernel uses its own).
const LN_ROWS_PER_BLOCK: usize = 64;

impl CustomOp2 for LayerNormParamGrads {
    fn name(&self) -> &'static str {
        "ctxalign-layer-norm-param-grads"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        use CpuStorage as S;
        macro_rules! rows {
            ($x:expr, $g:expr) => {
                Ok(RowPair::new($x, l1, $g, l2, "layer_norm backward")?.layer_norm_param_grads(self.eps))
            };
        }
        match (s1, s2) {
            (S::F32(x), S::F32(g)) => rows!(x, g),
            (S::F64(x), S::F64(g)) => rows!(x, g),
            (S::BF16(x), S::BF16(g)) => rows!(x, g),
            (S::F16(x), S::F16(g)) => rows!(x, g),
            _ => candle_core::bail!("layer_norm backward: unsupported dtypes {:?}, {:?}", s1.dtype(), s2.dtype()),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda_kernels::layer_norm_bwd_params((s1, l1), (s2, l2), self.eps as f32)
    }
}

/// The sum over the rows of a `[rows, n]` tensor, `[n]` in its dtype, outside the graph (for the
/// gradients of biases and norms). Candle's CPU `sum(0)` walks each column down its stride one
/// element at a time (7 % of a ContextCLIP step went there, for the bias gradients alone); here whole
/// rows are added (vectorised), blocks of [`COLUMN_SUM_ROWS_PER_BLOCK`] rows in parallel, and the
/// blocks' sums in a fixed order, so the result does not depend on the threads. Sums in f32 for half
/// precision (f64 for f64). Other devices keep Candle's reduction.
pub fn column_sum(xs: &Tensor) -> Result<Tensor> {
    xs.dims2()?;
    let xs = xs.detach();
    if !xs.device().is_cpu() {
        return xs.sum(0);
    }
    xs.contiguous()?.apply_op1_no_bwd(&ColumnSum)
}

/// Rows per partial sum of [`column_sum`] on the CPU.
const COLUMN_SUM_ROWS_PER_BLOCK: usize = 64;

struct ColumnSum;

impl CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "ctxalign-column-sum"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        fn sum<T: Element>(data: &[T], layout: &Layout) -> Result<CpuStorage> {
            let (rows, n) = layout.shape().dims2()?;
            let data = contiguous_slice(data, layout, "column_sum")?;
            let zero = <T::Acc as num_traits::Zero>::zero();
            let mut total = vec![zero; n];
            if rows > 0 && n > 0 {
                let partial: Vec<Vec<T::Acc>> = data
                    .par_chunks(COLUMN_SUM_ROWS_PER_BLOCK * n)
                    .map(|block| {
                        let mut sums = vec![zero; n];
                        for row in block.chunks(n) {
                            sums.iter_mut().zip(row).for_each(|(s, &x)| *s += x.widen());
                        }
                        sums
                    })
                    .collect();
                for sums in partial {
                    total.iter_mut().zip(sums).for_each(|(t, s)| *t += s);
                }
            }
            Ok(T::to_cpu_storage_owned(total.into_iter().map(T::narrow).collect()))
        }
        use CpuStorage as S;
        let summed = match storage {
            S::F32(x) => sum(x, layout)?,
            S::F64(x) => sum(x, layout)?,
            S::BF16(x) => sum(x, layout)?,
            S::F16(x) => sum(x, layout)?,
            _ => candle_core::bail!("column_sum: unsupported dtype {:?}", storage.dtype()),
        };
        Ok((summed, Shape::from(layout.shape().dims2()?.1)))
    }
}

/// Two contiguous `[rows, n]` operands of one dtype (an output or input, and a gradient) for the
/// row-wise backward passes on the CPU.
struct RowPair<'a, T> {
    a: &'a [T],
    g: &'a [T],
    n: usize,
}

impl<'a, T: Element> RowPair<'a, T> {
    fn new(a: &'a [T], al: &Layout, g: &'a [T], gl: &Layout, what: &str) -> Result<Self> {
        let (a, g) = (contiguous_slice(a, al, what)?, contiguous_slice(g, gl, what)?);
        if a.len() != g.len() {
            candle_core::bail!("{what}: operands of {:?} and {:?} differ in size", al.dims(), gl.dims())
        }
        Ok(Self { a, g, n: al.dims().last().copied().unwrap_or(1).max(1) })
    }

    fn acc(v: f64) -> T::Acc {
        <T::Acc as num_traits::NumCast>::from(v).expect("the constant fits the accumulator type")
    }

    /// The row's mean and 1/σ, two passes as the forward.
    fn stats(row: &[T], eps: T::Acc) -> (T::Acc, T::Acc) {
        let zero = <T::Acc as num_traits::Zero>::zero();
        let count = Self::acc(row.len() as f64);
        let mean = row.iter().fold(zero, |s, &x| s + x.widen()) / count;
        let var = row.iter().fold(zero, |s, &x| {
            let c = x.widen() - mean;
            s + c * c
        }) / count;
        (mean, (var + eps).sqrt().recip())
    }

    fn softmax_backward(&self, scale: f64) -> CpuStorage {
        let (n, scale) = (self.n, Self::acc(scale));
        let zero = <T::Acc as num_traits::Zero>::zero();
        let mut dst = vec![T::narrow(zero); self.a.len()];
        self.a.par_chunks(n).zip(self.g.par_chunks(n)).zip(dst.par_chunks_mut(n)).for_each(|((y, g), out)| {
            let dot = y.iter().zip(g).fold(zero, |s, (&y, &g)| s + y.widen() * g.widen());
            for ((o, &y), &g) in out.iter_mut().zip(y).zip(g) {
                *o = T::narrow((g.widen() - dot) * y.widen() * scale);
            }
        });
        T::to_cpu_storage_owned(dst)
    }

    fn layer_norm_input_grad(&self, weight: &[T], eps: f64) -> Result<CpuStorage> {
        let (n, eps) = (self.n, Self::acc(eps));
        if weight.len() != n {
            candle_core::bail!("layer_norm backward: a weight of {} for rows of {n}", weight.len())
        }
        let zero = <T::Acc as num_traits::Zero>::zero();
        let count = Self::acc(n as f64);
        let mut dst = vec![T::narrow(zero); self.a.len()];
        self.a.par_chunks(n).zip(self.g.par_chunks(n)).zip(dst.par_chunks_mut(n)).for_each(|((x, g), out)| {
            let (mean, rstd) = Self::stats(x, eps);
            let (mut sum_gw, mut sum_gw_xhat) = (zero, zero);
            for ((&x, &g), &w) in x.iter().zip(g).zip(weight) {
                let gw = g.widen() * w.widen();
                sum_gw += gw;
                sum_gw_xhat += gw * (x.widen() - mean) * rstd;
            }
            let (mean_gw, mean_gw_xhat) = (sum_gw / count, sum_gw_xhat / count);
            for (((o, &x), &g), &w) in out.iter_mut().zip(x).zip(g).zip(weight) {
                let gw = g.widen() * w.widen();
                let xhat = (x.widen() - mean) * rstd;
                *o = T::narrow((gw - mean_gw - xhat * mean_gw_xhat) * rstd);
            }
        });
        Ok(T::to_cpu_storage_owned(dst))
    }

    fn layer_norm_param_grads(&self, eps: f64) -> (CpuStorage, Shape) {
        let (n, eps) = (self.n, Self::acc(eps));
        let zero = <T::Acc as num_traits::Zero>::zero();
        let block = LN_ROWS_PER_BLOCK * n;
        let blocks = self.a.len().div_ceil(block).max(1);
        let mut partial = vec![zero; blocks * 2 * n];
        partial.par_chunks_mut(2 * n).zip(self.a.par_chunks(block)).zip(self.g.par_chunks(block)).for_each(
            |((sums, x), g)| {
                let (dw, db) = sums.split_at_mut(n);
                for (x, g) in x.chunks(n).zip(g.chunks(n)) {
                    let (mean, rstd) = Self::stats(x, eps);
                    for (((dw, db), &x), &g) in dw.iter_mut().zip(db.iter_mut()).zip(x).zip(g) {
                        *dw += g.widen() * (x.widen() - mean) * rstd;
                        *db += g.widen();
                    }
                }
            },
        );
        (<T::Acc as candle_core::WithDType>::to_cpu_storage_owned(partial), Shape::from((blocks, 2, n)))
    }
}

/// True for the float dtypes these ops accept.
pub fn supports(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F64 | DType::BF16 | DType::F16)
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

    /// `column_sum` against the sum written out in f64, in every dtype, with error bounds.
    #[test]
    fn column_sum_adds_the_rows_in_every_dtype() -> Result<()> {
        // 200 rows: three full blocks of 64 and a partial one; a strided input (the transpose);
        // deterministic values in [-1, 1).
        let dev = Device::Cpu;
        let values: Vec<f64> = (0..7 * 200).map(|i| ((i * 37) % 101) as f64 / 50.5 - 1.0).collect();
        let x = Tensor::from_vec(values, (7, 200), &dev)?.t()?;
        // Error bounds: the sum's rounding in the accumulator (f32 for f32 and half precision, f64
        // for f64) relative to Σ|x|, plus the result's rounding to its dtype (2⁻⁸ for bf16, 2⁻¹¹ for
        // f16) relative to the sum: not 200 roundings in half precision.
        for (dtype, acc, out) in
            [(DType::F64, 1e-14, 0.0), (DType::F32, 1e-6, 0.0), (DType::BF16, 1e-6, 4e-3), (DType::F16, 1e-6, 5e-4)]
        {
            let xs = x.to_dtype(dtype)?;
            let rows = xs.to_dtype(DType::F64)?.to_vec2::<f64>()?;
            let summed = column_sum(&xs)?;
            assert_eq!(summed.dtype(), dtype);
            assert_eq!(summed.dims(), &[7]);
            for (j, got) in summed.to_dtype(DType::F64)?.to_vec1::<f64>()?.iter().enumerate() {
                let want: f64 = rows.iter().map(|r| r[j]).sum();
                let scale: f64 = rows.iter().map(|r| r[j].abs()).sum();
                let bound = acc * scale + out * want.abs();
                assert!((got - want).abs() <= bound, "{dtype:?} column {j}: {got} vs {want} (bound {bound})");
            }
        }
        assert_eq!(column_sum(&Tensor::zeros((0, 3), DType::F32, &dev)?)?.to_vec1::<f32>()?, vec![0.0; 3]);
        assert!(column_sum(&Tensor::zeros((2, 3, 4), DType::F32, &dev)?).is_err());
        Ok(())
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
        // 155 rows: LayerNorm's parameter gradients sum three blocks of rows, the last one partial.
        let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (5, 31, 33), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.3, 33, &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.3, 33, &dev)?)?;
        let probe = Tensor::randn(0f32, 1.0, (5, 31, 33), &dev)?;
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

    /// `softmax(x·scale + mask)` and GELU written out element by element in f64, with a mask that
    /// broadcasts over heads and queries (a padding mask) and one that varies per query.
    #[test]
    fn scaled_masked_softmax_and_gelu_match_the_formulas() -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, q, k) = (2, 3, 4, 5);
        let x = Tensor::randn(0f64, 2.0, (b, h, q, k), &dev)?;
        let pad = Tensor::new(&[[0f64, 0., 0., -1e4, -1e4], [0., 0., 0., 0., -1e4]], &dev)?.reshape((b, 1, 1, k))?;
        let per_query = Tensor::randn(0f64, 1.0, (1, 1, q, k), &dev)?;
        let flat = x.flatten_to(1)?.to_vec3::<f64>()?; // [b·h, q, k]
        for (mask, name) in [(&pad, "padding"), (&per_query, "per query")] {
            let got = scaled_masked_softmax(&x, Some(mask), 0.125)?.flatten_to(1)?.to_vec3::<f64>()?;
            let m = mask.broadcast_as((b, h, q, k))?.flatten_to(1)?.to_vec3::<f64>()?;
            for bh in 0..b * h {
                for i in 0..q {
                    let z: Vec<f64> = (0..k).map(|j| flat[bh][i][j] * 0.125 + m[bh][i][j]).collect();
                    let max = z.iter().cloned().fold(f64::MIN, f64::max);
                    let total: f64 = z.iter().map(|v| (v - max).exp()).sum();
                    for j in 0..k {
                        let want = (z[j] - max).exp() / total;
                        assert!((got[bh][i][j] - want).abs() < 1e-12, "{name} [{bh}, {i}, {j}]");
                    }
                }
            }
        }
        let unmasked = scaled_masked_softmax(&x, None, 0.5)?.flatten_to(1)?.to_vec3::<f64>()?;
        for (row, got) in flat.iter().flatten().zip(unmasked.iter().flatten()) {
            let total: f64 = row.iter().map(|v| (v * 0.5).exp()).sum();
            for (v, g) in row.iter().zip(got) {
                assert!((g - (v * 0.5).exp() / total).abs() < 1e-12);
            }
        }
        let values: Vec<f64> = (-80..=80).map(|i| i as f64 * 0.1).collect();
        let t = Tensor::new(values.as_slice(), &dev)?;
        for (dtype, tol) in [(DType::F64, 1e-15), (DType::F32, 1e-6)] {
            let got = gelu_erf(&t.to_dtype(dtype)?)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            for (&v, g) in values.iter().zip(got) {
                let want = 0.5 * v * (1.0 + candle_core::cpu::erf::erf_f64(v / 2f64.sqrt()));
                assert!((g - want).abs() <= tol * want.abs().max(1.0), "{dtype:?} gelu({v}) = {g}, want {want}");
            }
        }
        Ok(())
    }

    /// Central differences in f64 through the scores, a trainable broadcast mask and GELU.
    #[test]
    fn scaled_masked_softmax_and_gelu_gradients_match_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let scores = Var::from_tensor(&Tensor::randn(0f64, 1.5, (2, 2, 3, 4), &dev)?)?;
        let mask = Var::from_tensor(&Tensor::randn(0f64, 1.0, (2, 1, 1, 4), &dev)?)?;
        let x = Var::from_tensor(&Tensor::randn(0f64, 2.0, (3, 7), &dev)?)?;
        let probe = Tensor::randn(0f64, 1.0, (2, 2, 3, 4), &dev)?;
        let probe_x = Tensor::randn(0f64, 1.0, (3, 7), &dev)?;
        let vars = vec![
            ("scores".to_string(), scores.clone()),
            ("mask".to_string(), mask.clone()),
            ("x".to_string(), x.clone()),
        ];
        let loss = || {
            let p = scaled_masked_softmax(scores.as_tensor(), Some(mask.as_tensor()), 0.7)?;
            let unmasked = scaled_masked_softmax(scores.as_tensor(), None, 1.3)?;
            (p * &probe)?.sum_all()?
                + (unmasked * &probe)?.sum_all()?
                + (gelu_erf(x.as_tensor())? * &probe_x)?.sum_all()?
        };
        check_gradients(&vars, &loss, 1e-5, 1e-6, 1)
    }

    /// Forward and backward equal Candle's composed forms in f32 (its `gelu_erf`, whose backward is
    /// Candle's own; scale, broadcast add and softmax as separate ops).
    #[test]
    fn scaled_masked_softmax_and_gelu_agree_with_the_composed_forms() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (3, 4, 33), &dev)?)?;
        let mask = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 1, 33), &dev)?)?;
        let probe = Tensor::randn(0f32, 1.0, (3, 4, 33), &dev)?;
        let (xt, mt) = (x.as_tensor(), mask.as_tensor());
        let ours = |x: &Tensor, m: &Tensor| scaled_masked_softmax(&gelu_erf(x)?, Some(m), 0.3);
        let composed =
            |x: &Tensor, m: &Tensor| candle_nn::ops::softmax(&(x.gelu_erf()? * 0.3)?.broadcast_add(m)?, D::Minus1);
        let (y1, y2) = (ours(xt, mt)?, composed(xt, mt)?);
        assert!(max_diff(&y1, &y2) < 1e-6, "forward differs by {}", max_diff(&y1, &y2));
        let g1 = (y1 * &probe)?.sum_all()?.backward()?;
        let g2 = (y2 * &probe)?.sum_all()?.backward()?;
        for (name, v) in [("x", xt), ("mask", mt)] {
            let (a, c) = (g1.get(v).expect("fused gradient"), g2.get(v).expect("composed gradient"));
            assert_eq!(a.dims(), v.dims(), "{name}: the gradient has the variable's shape");
            let scale = c.abs()?.max_all()?.to_scalar::<f32>()? as f64;
            assert!(max_diff(a, c) <= 1e-5 * scale.max(1.0), "{name}: gradients differ by {}", max_diff(a, c));
        }
        Ok(())
    }

    /// The device check, run on the CPU in f32 and bf16 (on a GPU it runs from `xtask grad-check`).
    #[test]
    fn the_cpu_agrees_with_itself_in_f64() -> Result<()> {
        for dtype in [DType::F32, DType::BF16] {
            for report in device_agreement(&Device::Cpu, dtype)? {
                assert!(report.passed(), "{report:?}");
                assert!(report.forward_error > 0.0 || dtype == DType::F64, "{report:?}: rounding must show");
            }
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
            let mask = Tensor::randn(0f32, 1.0, (1, 768), &dev)?.to_dtype(dtype)?;
            let msm = scaled_masked_softmax(&xh, Some(&mask), 0.5)?;
            let msm_ref = scaled_masked_softmax(&xr, Some(&mask.to_dtype(DType::F32)?), 0.5)?;
            assert!(max_diff(&msm, &msm_ref) <= unit, "{dtype:?} masked softmax: {}", max_diff(&msm, &msm_ref));
            let ge = gelu_erf(&xh)?;
            let ge_ref = gelu_erf(&xr)?;
            let scale = ge_ref.abs()?.max_all()?.to_scalar::<f32>()? as f64;
            assert!(max_diff(&ge, &ge_ref) <= unit * scale, "{dtype:?} gelu: {}", max_diff(&ge, &ge_ref));
            let v = Var::from_tensor(&xh)?;
            let y = softmax_last_dim(&layer_norm(&gelu_erf(v.as_tensor())?, &wh, &bh, 1e-5)?)?;
            let g = (y * xh.sin()?)?.sum_all()?.backward()?;
            assert_eq!(g.get(v.as_tensor()).expect("gradient").dtype(), dtype);
        }
        Ok(())
    }
}

//! The Adam/AdamW update as two in-place passes over a parameter (and a third that rounds a
//! half-precision parameter from its f32 master), where the tensor-op form takes about fifteen
//! kernels and as many temporaries per parameter. The optimizer itself (parameter groups, step
//! counts, checkpoints) is `ctxalign-train`'s `Adam`; this is its arithmetic:
//! ```text
//! g ← g + l2·θ                          (Adam's L2 term; l2 = 0 for AdamW)
//! m ← β1·m + (1−β1)·g;   v ← β2·v + (1−β2)·g²
//! θ ← θ·decay − (m / (√v·inv_bias2 + ε))·step_size
//! ```
//! with `decay = 1 − lr·wd` (AdamW; 1 for Adam), `inv_bias2 = 1/√(1−β2ᵗ)` and
//! `step_size = lr/(1−β1ᵗ)`: PyTorch's non-fused `torch.optim.Adam`/`AdamW`, operation for operation.
//! The moments live in one `[2, n]` tensor (m, then v) in the parameter's precision (f32 or f64).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::fused::{contiguous_slice, contiguous_slice_mut};

/// The coefficients of one step for one parameter (see the module's formula).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamCoefficients {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Adam's L2 coefficient (added to the gradient); 0 for AdamW.
    pub l2: f64,
    /// `1 − lr·wd` for AdamW; 1 for Adam.
    pub decay: f64,
    /// `1/√(1−β2ᵗ)`.
    pub inv_bias2: f64,
    /// `lr/(1−β1ᵗ)`.
    pub step_size: f64,
}

/// Updates `moments` (`[2, n]`) and then `theta` (f32 or f64, `n` elements, contiguous) in place
/// from `grad` (any float dtype for an f32 `theta`, f64 for f64).
pub fn adam_update(theta: &Tensor, moments: &Tensor, grad: &Tensor, c: &AdamCoefficients) -> Result<()> {
    let n = theta.elem_count();
    if !matches!(theta.dtype(), DType::F32 | DType::F64) {
        candle_core::bail!("adam: the updated parameter must be f32 or f64 (a master copy), not {:?}", theta.dtype())
    }
    if moments.dims() != [2, n] || moments.dtype() != theta.dtype() {
        candle_core::bail!(
            "adam: moments {:?} {:?} do not fit a {:?} parameter of {n}",
            moments.dims(),
            moments.dtype(),
            theta.dtype()
        )
    }
    if grad.elem_count() != n {
        candle_core::bail!("adam: a gradient of {:?} for a parameter of {:?}", grad.dims(), theta.dims())
    }
    if !(theta.is_contiguous() && moments.is_contiguous()) {
        candle_core::bail!("adam: the parameter and its moments must be contiguous")
    }
    moments.inplace_op3(&grad.contiguous()?, theta, &AdamMoments(*c))?;
    theta.inplace_op2(moments, &AdamStep(*c))
}

/// Sets the half-precision `param` to the rounded value of its f32 `master`, in place.
pub fn round_from_master(param: &Tensor, master: &Tensor) -> Result<()> {
    if param.elem_count() != master.elem_count() || !param.is_contiguous() || !master.is_contiguous() {
        candle_core::bail!(
            "round: parameter {:?} and master {:?} must match and be contiguous",
            param.dims(),
            master.dims()
        )
    }
    param.inplace_op2(master, &RoundFromMaster)
}

/// Three AdamW steps on `device` (f32 state and master, `grad_dtype` gradients, a `grad_dtype`
/// parameter rounded from the master when that is half precision) against the same in f64 on the
/// CPU, from the same gradients: the check that the device's update kernels compute what the CPU
/// tests prove. Part of [`crate::fused::device_agreement`].
pub fn device_agreement(device: &candle_core::Device, grad_dtype: DType) -> Result<crate::fused::OpAgreement> {
    use candle_core::Device;
    let host = Device::Cpu;
    let n = 3 * 100_003;
    let theta0 = Tensor::randn(0f64, 1.0, n, &host)?.to_dtype(DType::F32)?.to_dtype(DType::F64)?;
    let grads: Vec<Tensor> = (0..3)
        .map(|_| Tensor::randn(0f64, 0.1, n, &host)?.to_dtype(grad_dtype)?.to_dtype(DType::F64))
        .collect::<Result<_>>()?;
    let run = |device: &Device, state: DType, grad: DType| -> Result<(Tensor, Tensor, Option<Tensor>)> {
        // A copy: the update is in place, and `to_dtype`/`to_device` to the same return `theta0` itself.
        let theta = theta0.to_dtype(state)?.to_device(device)?.copy()?;
        let moments = Tensor::zeros((2, n), state, device)?;
        let half = matches!(grad, DType::BF16 | DType::F16);
        let param = if half { Some(Tensor::zeros(n, grad, device)?) } else { None };
        for (t, g) in grads.iter().enumerate() {
            let t = t as i32 + 1;
            let c = AdamCoefficients {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                l2: 0.0,
                decay: 1.0 - 3e-4 * 0.05,
                inv_bias2: 1.0 / (1.0 - 0.999f64.powi(t)).sqrt(),
                step_size: 3e-4 / (1.0 - 0.9f64.powi(t)),
            };
            adam_update(&theta, &moments, &g.to_dtype(grad)?.to_device(device)?, &c)?;
            if let Some(p) = &param {
                round_from_master(p, &theta)?;
            }
        }
        let to_host = |t: &Tensor| t.to_device(&host)?.to_dtype(DType::F64);
        Ok((to_host(&theta)?, to_host(&moments)?, param.as_ref().map(to_host).transpose()?))
    };
    let (theta_ref, moments_ref, _) = run(&host, DType::F64, DType::F64)?;
    let (theta, moments, param) = run(device, DType::F32, grad_dtype)?;
    let error = |a: &Tensor, reference: &Tensor| -> Result<f64> {
        let scale = reference.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-30);
        Ok((a - reference)?.abs()?.max_all()?.to_scalar::<f64>()? / scale)
    };
    let mut errors = vec![
        ("exp_avg", error(&moments.get(0)?, &moments_ref.get(0)?)?),
        ("exp_avg_sq", error(&moments.get(1)?, &moments_ref.get(1)?)?),
    ];
    if let Some(param) = param {
        // The rounded parameter against the device's own master, rounded on the host.
        let want = theta.to_dtype(DType::F32)?.to_dtype(grad_dtype)?.to_dtype(DType::F64)?;
        errors.push(("rounded parameter", error(&param, &want)?));
    }
    Ok(crate::fused::OpAgreement {
        op: "adamw (3 steps, f32 state)",
        dtype: format!("{grad_dtype:?} gradients"),
        forward_error: error(&theta, &theta_ref)?,
        gradient_errors: errors,
        tolerance: 1e-5,
    })
}

const CHUNK: usize = 16 * 1024;

/// The state type's arithmetic, with the gradient types it takes.
trait State: num_traits::Float + Send + Sync {
    fn of(v: f64) -> Self;
}
impl State for f32 {
    fn of(v: f64) -> Self {
        v as f32
    }
}
impl State for f64 {
    fn of(v: f64) -> Self {
        v
    }
}

fn moments_cpu<S: State, G: Copy + Sync>(
    moments: &mut [S],
    grad: &[G],
    theta: &[S],
    c: &AdamCoefficients,
    widen: impl Fn(G) -> S + Sync,
) {
    let n = theta.len();
    let (m, v) = moments.split_at_mut(n);
    let (b1, one_b1, b2, one_b2, l2) =
        (S::of(c.beta1), S::of(1.0 - c.beta1), S::of(c.beta2), S::of(1.0 - c.beta2), S::of(c.l2));
    m.par_chunks_mut(CHUNK)
        .zip(v.par_chunks_mut(CHUNK))
        .zip(grad.par_chunks(CHUNK))
        .zip(theta.par_chunks(CHUNK))
        .for_each(|(((m, v), g), t)| {
            for (((m, v), &g), &t) in m.iter_mut().zip(v.iter_mut()).zip(g).zip(t) {
                let mut g = widen(g);
                if l2 != S::zero() {
                    g = g + t * l2;
                }
                *m = *m * b1 + g * one_b1;
                *v = *v * b2 + (g * g) * one_b2;
            }
        });
}

fn step_cpu<S: State>(theta: &mut [S], moments: &[S], c: &AdamCoefficients) {
    let n = theta.len();
    let (m, v) = moments.split_at(n);
    let (decay, inv_bias2, eps, step) = (S::of(c.decay), S::of(c.inv_bias2), S::of(c.eps), S::of(c.step_size));
    theta.par_chunks_mut(CHUNK).zip(m.par_chunks(CHUNK)).zip(v.par_chunks(CHUNK)).for_each(|((t, m), v)| {
        for ((t, &m), &v) in t.iter_mut().zip(m).zip(v) {
            let mut x = *t;
            if decay != S::one() {
                x = x * decay;
            }
            *t = x - (m / (v.sqrt() * inv_bias2 + eps)) * step;
        }
    });
}

#[cfg(feature = "cuda")]
fn constants(c: &AdamCoefficients) -> crate::cuda_kernels::AdamConstants<f64> {
    crate::cuda_kernels::AdamConstants {
        beta1: c.beta1,
        one_minus_beta1: 1.0 - c.beta1,
        beta2: c.beta2,
        one_minus_beta2: 1.0 - c.beta2,
        l2: c.l2,
        decay: c.decay,
        inv_bias2: c.inv_bias2,
        eps: c.eps,
        step_size: c.step_size,
    }
}

/// In place on the moments: reads the gradient and the parameter.
struct AdamMoments(AdamCoefficients);

impl InplaceOp3 for AdamMoments {
    fn name(&self) -> &'static str {
        "ctxalign-adam-moments"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        use CpuStorage as S;
        let c = &self.0;
        match (s1, s2, s3) {
            (S::F32(m), S::F32(g), S::F32(t)) => moments_cpu(
                contiguous_slice_mut(m, l1, "adam: the moments")?,
                contiguous_slice(g, l2, "adam: the gradient")?,
                contiguous_slice(t, l3, "adam: the parameter")?,
                c,
                |g| g,
            ),
            (S::F32(m), S::BF16(g), S::F32(t)) => moments_cpu(
                contiguous_slice_mut(m, l1, "adam: the moments")?,
                contiguous_slice(g, l2, "adam: the gradient")?,
                contiguous_slice(t, l3, "adam: the parameter")?,
                c,
                bf16::to_f32,
            ),
            (S::F32(m), S::F16(g), S::F32(t)) => moments_cpu(
                contiguous_slice_mut(m, l1, "adam: the moments")?,
                contiguous_slice(g, l2, "adam: the gradient")?,
                contiguous_slice(t, l3, "adam: the parameter")?,
                c,
                f16::to_f32,
            ),
            (S::F64(m), S::F64(g), S::F64(t)) => moments_cpu(
                contiguous_slice_mut(m, l1, "adam: the moments")?,
                contiguous_slice(g, l2, "adam: the gradient")?,
                contiguous_slice(t, l3, "adam: the parameter")?,
                c,
                |g| g,
            ),
            (m, g, t) => candle_core::bail!(
                "adam: no update for {:?} moments, {:?} gradients and a {:?} parameter",
                m.dtype(),
                g.dtype(),
                t.dtype()
            ),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<()> {
        crate::cuda_kernels::adam_moments((s1, l1), (s2, l2), (s3, l3), &constants(&self.0))
    }
}

/// In place on the parameter: reads the updated moments.
struct AdamStep(AdamCoefficients);

impl InplaceOp2 for AdamStep {
    fn name(&self) -> &'static str {
        "ctxalign-adam-step"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        use CpuStorage as S;
        match (s1, s2) {
            (S::F32(t), S::F32(m)) => step_cpu(
                contiguous_slice_mut(t, l1, "adam: the parameter")?,
                contiguous_slice(m, l2, "adam: the moments")?,
                &self.0,
            ),
            (S::F64(t), S::F64(m)) => step_cpu(
                contiguous_slice_mut(t, l1, "adam: the parameter")?,
                contiguous_slice(m, l2, "adam: the moments")?,
                &self.0,
            ),
            (t, m) => candle_core::bail!("adam: no step for a {:?} parameter with {:?} moments", t.dtype(), m.dtype()),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        crate::cuda_kernels::adam_step((s1, l1), (s2, l2), &constants(&self.0))
    }
}

/// In place on a half-precision parameter: reads its f32 master.
struct RoundFromMaster;

impl InplaceOp2 for RoundFromMaster {
    fn name(&self) -> &'static str {
        "ctxalign-round-from-master"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        use CpuStorage as S;
        match (s1, s2) {
            (S::BF16(p), S::F32(m)) => {
                let (p, m) = (
                    contiguous_slice_mut(p, l1, "round: the parameter")?,
                    contiguous_slice(m, l2, "round: the master")?,
                );
                p.par_iter_mut().zip(m).for_each(|(p, &m)| *p = bf16::from_f32(m));
            }
            (S::F16(p), S::F32(m)) => {
                let (p, m) = (
                    contiguous_slice_mut(p, l1, "round: the parameter")?,
                    contiguous_slice(m, l2, "round: the master")?,
                );
                p.par_iter_mut().zip(m).for_each(|(p, &m)| *p = f16::from_f32(m));
            }
            (p, m) => {
                candle_core::bail!("round: no rounding of a {:?} master into a {:?} parameter", m.dtype(), p.dtype())
            }
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        crate::cuda_kernels::round_to((s1, l1), (s2, l2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The update as the tensor ops it replaces (and as PyTorch writes it), one op at a time.
    fn composed(theta: &Tensor, m: &Tensor, v: &Tensor, grad: &Tensor, c: &AdamCoefficients) -> Result<[Tensor; 3]> {
        let mut g = grad.to_dtype(theta.dtype())?;
        if c.l2 != 0.0 {
            g = (g + (theta * c.l2)?)?;
        }
        let m = ((m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
        let v = ((v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
        let theta = if c.decay != 1.0 { (theta * c.decay)? } else { theta.clone() };
        let denom = ((v.sqrt()? * c.inv_bias2)? + c.eps)?;
        let theta = (theta - ((&m / denom)? * c.step_size)?)?;
        Ok([theta, m, v])
    }

    /// Over more elements than one CPU chunk, for AdamW and for Adam's L2 term, with f32, bf16 and
    /// f16 gradients on f32 state and f64 throughout: the in-place passes equal the tensor ops.
    #[test]
    fn equals_the_tensor_op_form() -> Result<()> {
        let dev = Device::Cpu;
        let n = 40_003;
        for (state, grad_dtype) in
            [(DType::F32, DType::F32), (DType::F32, DType::BF16), (DType::F32, DType::F16), (DType::F64, DType::F64)]
        {
            for (l2, decay) in [(0.0, 1.0 - 1e-3 * 0.05), (0.01, 1.0)] {
                let c = AdamCoefficients {
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                    l2,
                    decay,
                    inv_bias2: 1.0 / (1.0 - 0.999f64.powi(3)).sqrt(),
                    step_size: 1e-3 / (1.0 - 0.9f64.powi(3)),
                };
                let theta = Tensor::randn(0f64, 1.0, (7, n / 7 + 1), &dev)?.to_dtype(state)?;
                let grad = Tensor::randn(0f64, 0.1, theta.shape(), &dev)?.to_dtype(grad_dtype)?;
                let m = Tensor::randn(0f64, 0.01, theta.shape(), &dev)?.to_dtype(state)?;
                let v = Tensor::randn(0f64, 1e-4, theta.shape(), &dev)?.abs()?.to_dtype(state)?;
                let [want_theta, want_m, want_v] = composed(&theta, &m, &v, &grad, &c)?;
                let moments = Tensor::stack(&[m.flatten_all()?, v.flatten_all()?], 0)?;
                let theta = theta.copy()?;
                adam_update(&theta, &moments, &grad, &c)?;
                let tolerance = if state == DType::F64 { 1e-15 } else { 1e-7 };
                for (name, got, want) in [
                    ("θ", theta.clone(), want_theta),
                    ("m", moments.get(0)?.reshape(want_m.shape())?, want_m),
                    ("v", moments.get(1)?.reshape(want_v.shape())?, want_v),
                ] {
                    let diff = (got.to_dtype(DType::F64)? - want.to_dtype(DType::F64)?)?.abs()?.max_all()?;
                    let scale = want.to_dtype(DType::F64)?.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-30);
                    let diff = diff.to_scalar::<f64>()?;
                    assert!(
                        diff <= tolerance * scale,
                        "{state:?}/{grad_dtype:?} l2={l2}: {name} differs by {diff} (scale {scale})"
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn rounding_from_the_master_equals_a_cast() -> Result<()> {
        let dev = Device::Cpu;
        let master = Tensor::randn(0f32, 1.0, 20_000, &dev)?;
        for dtype in [DType::BF16, DType::F16] {
            let param = Tensor::zeros(20_000, dtype, &dev)?;
            round_from_master(&param, &master)?;
            let want = master.to_dtype(dtype)?;
            assert_eq!(param.to_dtype(DType::F32)?.to_vec1::<f32>()?, want.to_dtype(DType::F32)?.to_vec1::<f32>()?);
        }
        Ok(())
    }

    #[test]
    fn mismatched_operands_are_refused() -> Result<()> {
        let dev = Device::Cpu;
        let c = AdamCoefficients {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            l2: 0.0,
            decay: 1.0,
            inv_bias2: 1.0,
            step_size: 1.0,
        };
        let theta = Tensor::zeros(8, DType::F32, &dev)?;
        let half = Tensor::zeros(8, DType::BF16, &dev)?;
        let moments = Tensor::zeros((2, 8), DType::F32, &dev)?;
        let err = adam_update(&half, &moments, &half, &c).unwrap_err().to_string();
        assert!(err.contains("must be f32 or f64"), "{err}");
        let err = adam_update(&theta, &Tensor::zeros((2, 7), DType::F32, &dev)?, &theta, &c).unwrap_err().to_string();
        assert!(err.contains("do not fit"), "{err}");
        let err = adam_update(&theta, &moments, &Tensor::zeros(9, DType::F32, &dev)?, &c).unwrap_err().to_string();
        assert!(err.contains("a gradient of"), "{err}");
        Ok(())
    }
}

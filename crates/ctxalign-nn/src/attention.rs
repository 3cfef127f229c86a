//! Scaled dot-product attention that returns its probabilities and keeps gradients.

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use crate::matmul::batched_matmul;
use crate::ops::scaled_masked_softmax;

/// Context vectors, and the attention probabilities that produced them when asked for.
#[derive(Debug, Clone)]
pub struct AttentionOutput {
    /// `[batch, heads, queries, head_dim]`
    pub context: Tensor,
    /// `[batch, heads, queries, keys]`, when requested. On a gradient path they are computed apart
    /// from the context and carry no gradient (ContextBLIP reads them to choose patches to mask).
    pub probs: Option<Tensor>,
}

/// `softmax(q kᵀ · scale + mask) v` over `[batch, heads, len, head_dim]` tensors.
///
/// `additive_mask` is broadcast onto the scores (`[batch, 1, 1, keys]` for padding masks; 0 keeps,
/// a large negative value removes). The batch dimensions of `q` and `k`/`v` may differ when one of
/// them is 1: one text against N images (or one image against N texts) then shares the single side
/// instead of copying it N times.
///
/// On a gradient path with equal batch dimensions and a constant mask, attention runs as one op
/// ([`crate::fused::fused_attention`]) that keeps neither the scores nor the probabilities for
/// backward; otherwise it is composed from a product, the fused softmax and a product.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    additive_mask: Option<&Tensor>,
    scale: f64,
    want_probs: bool,
) -> Result<AttentionOutput> {
    let tracked = q.track_op() || k.track_op() || v.track_op();
    let fusable = q.rank() == 4
        && q.dims()[..2] == k.dims()[..2]
        && k.dims() == v.dims()
        && additive_mask.is_none_or(|m| !m.track_op())
        && crate::fused::supports(q.dtype());
    if tracked && fusable {
        let context = crate::fused::fused_attention(q, k, v, additive_mask, scale)?;
        let probs = want_probs.then(|| attention_probabilities(q, k, additive_mask, scale)).transpose()?;
        return Ok(AttentionOutput { context, probs });
    }
    // The scale and the mask are applied inside the softmax's single pass over the scores, so the
    // graph keeps one scores-sized tensor (the raw scores) besides the probabilities.
    let scores = batched_matmul(q, &k.t()?)?;
    let probs = scaled_masked_softmax(&scores, additive_mask, scale)?;
    let context = batched_matmul(&probs, v)?;
    Ok(AttentionOutput { context, probs: want_probs.then_some(probs) })
}

/// The attention probabilities `softmax(q kᵀ · scale + mask)`, outside any gradient graph.
pub fn attention_probabilities(q: &Tensor, k: &Tensor, additive_mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let scores = batched_matmul(&q.detach(), &k.detach().t()?)?;
    scaled_masked_softmax(&scores, additive_mask.map(Tensor::detach).as_ref(), scale)
}

/// `[batch, tokens, heads·head_dim]` → `[batch, heads, tokens, head_dim]`, contiguous: a projection's
/// output split into attention heads. One op (a strided copy) whose backward is the inverse copy;
/// the composed reshape → transpose → copy puts three nodes on a gradient path, and Candle's
/// backward gives each a zero-filled gradient and an addition (the transposed one strided).
pub fn split_heads(xs: &Tensor, heads: usize) -> Result<Tensor> {
    let (_, _, width) = xs.dims3()?;
    if heads == 0 || width % heads != 0 {
        candle_core::bail!("split_heads: a width of {width} does not split into {heads} heads")
    }
    xs.contiguous()?.apply_op1(Heads::Split { heads })
}

/// `[batch, heads, tokens, head_dim]` → `[batch, tokens, heads·head_dim]`, contiguous: attention's
/// context merged for the output projection; the inverse of [`split_heads`], one op likewise.
pub fn merge_heads(xs: &Tensor) -> Result<Tensor> {
    xs.dims4()?;
    xs.contiguous()?.apply_op1(Heads::Merge)
}

/// The heads' split and merge as one op each (also the last step of [`crate::Linear::forward_heads`]).
pub(crate) enum Heads {
    Split { heads: usize },
    Merge,
}

impl Heads {
    /// The input seen through the permuted layout that a contiguous copy turns into the output.
    fn source_view(&self, layout: &Layout) -> Result<Layout> {
        let offset = layout.start_offset();
        match (self, layout.dims()) {
            (Heads::Split { heads }, &[b, t, w]) => {
                Layout::contiguous_with_offset((b, t, *heads, w / heads), offset).transpose(1, 2)
            }
            (Heads::Merge, &[b, h, t, d]) => Layout::contiguous_with_offset((b, h, t, d), offset).transpose(1, 2),
            (_, dims) => candle_core::bail!("heads: unexpected input {dims:?}"),
        }
    }

    pub(crate) fn run<S: BackendStorage>(&self, storage: &S, layout: &Layout) -> Result<(S, Shape)>
    where
        S::Device: BackendDevice<Storage = S>,
    {
        if !layout.is_contiguous() {
            candle_core::bail!("heads: the input must be contiguous")
        }
        let view = self.source_view(layout)?;
        // SAFETY: the copy below writes every element.
        let mut dst = unsafe { storage.device().alloc_uninit(view.shape(), storage.dtype())? };
        storage.copy_strided_src(&mut dst, 0, &view)?;
        let shape = match (self, view.dims()) {
            (Heads::Merge, &[b, t, h, d]) => Shape::from((b, t, h * d)),
            _ => view.shape().clone(),
        };
        Ok((dst, shape))
    }
}

impl CustomOp1 for Heads {
    fn name(&self) -> &'static str {
        match self {
            Heads::Split { .. } => "ctxalign-split-heads",
            Heads::Merge => "ctxalign-merge-heads",
        }
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(storage, layout)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.run(storage, layout)
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.detach().contiguous()?;
        let inverse = match self {
            Heads::Split { .. } => Heads::Merge,
            Heads::Merge => Heads::Split { heads: arg.dim(1)? },
        };
        Ok(Some(grad.apply_op1_no_bwd(&inverse)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    #[test]
    fn matches_explicit_formula_and_masks_keys() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, 2, 3, 4), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (1, 2, 5, 4), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (1, 2, 5, 4), &dev)?;
        let mask = Tensor::new(&[0f32, 0., 0., -10000., -10000.], &dev)?.reshape((1, 1, 1, 5))?;
        let out = scaled_dot_product_attention(&q, &k, &v, Some(&mask), 0.5, true)?;
        // Independent computation, element by element.
        let qf = q.flatten_to(1)?.to_vec3::<f32>()?;
        let kf = k.flatten_to(1)?.to_vec3::<f32>()?;
        let vf = v.flatten_to(1)?.to_vec3::<f32>()?;
        let ctx = out.context.flatten_to(1)?.to_vec3::<f32>()?;
        for h in 0..2 {
            for i in 0..3 {
                let s: Vec<f32> = (0..5)
                    .map(|j| {
                        let dot: f32 = (0..4).map(|d| qf[h][i][d] * kf[h][j][d]).sum();
                        dot * 0.5 + if j >= 3 { -10000.0 } else { 0.0 }
                    })
                    .collect();
                let m = s.iter().cloned().fold(f32::MIN, f32::max);
                let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f32 = e.iter().sum();
                for d in 0..4 {
                    let want: f32 = (0..5).map(|j| e[j] / z * vf[h][j][d]).sum();
                    assert!((want - ctx[h][i][d]).abs() < 1e-5);
                }
            }
        }
        let masked = out.probs.unwrap().narrow(D::Minus1, 3, 2)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(masked < 1e-6);
        Ok(())
    }

    /// The copies equal the composed reshapes and transposes, invert each other, and their
    /// gradients match central differences (f64).
    #[test]
    fn heads_split_and_merge() -> Result<()> {
        let dev = Device::Cpu;
        let x = candle_core::Var::from_tensor(&Tensor::randn(0f64, 1.0, (2, 5, 12), &dev)?)?;
        let split = split_heads(x.as_tensor(), 3)?;
        let composed = x.as_tensor().reshape((2, 5, 3, 4))?.transpose(1, 2)?.contiguous()?;
        assert_eq!(split.dims(), [2, 3, 5, 4]);
        assert_eq!(split.flatten_all()?.to_vec1::<f64>()?, composed.flatten_all()?.to_vec1::<f64>()?);
        let merged = merge_heads(&split)?;
        assert_eq!(merged.flatten_all()?.to_vec1::<f64>()?, x.as_tensor().flatten_all()?.to_vec1::<f64>()?);
        // A non-contiguous input is copied first.
        let narrowed = Tensor::randn(0f64, 1.0, (2, 5, 16), &dev)?.narrow(2, 2, 12)?;
        let want = narrowed.reshape((2, 5, 3, 4))?.transpose(1, 2)?.contiguous()?;
        assert_eq!(split_heads(&narrowed, 3)?.flatten_all()?.to_vec1::<f64>()?, want.flatten_all()?.to_vec1::<f64>()?);
        assert!(split_heads(x.as_tensor(), 5).is_err());

        let probe = Tensor::randn(0f64, 1.0, (2, 3, 5, 4), &dev)?;
        let probe2 = Tensor::randn(0f64, 1.0, (2, 5, 12), &dev)?;
        let loss = || -> Result<Tensor> {
            let s = split_heads(x.as_tensor(), 3)?;
            let m = merge_heads(&(s.sqr()? * &probe)?)?;
            (m * &probe2)?.sum_all()
        };
        crate::gradcheck::check_gradients(&[("x".to_string(), x.clone())], &loss, 1e-5, 1e-7, 1)?;
        Ok(())
    }

    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?;
        candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(v)
    }

    fn padding_mask(dtype: candle_core::DType) -> Result<Tensor> {
        let mask = Tensor::new(&[0f32, 0., 0., 0., -1e4, 0., 0., -1e4, -1e4, -1e4], &Device::Cpu)?;
        mask.reshape((2, 1, 1, 5))?.to_dtype(dtype)
    }

    /// On a gradient path attention is one op; its gradients for q, k and v match central
    /// differences (f64, with a padding mask).
    #[test]
    fn fused_gradients_match_finite_differences() -> Result<()> {
        use crate::gradcheck::check_gradients;
        let dev = Device::Cpu;
        let var = |t: usize| candle_core::Var::from_tensor(&Tensor::randn(0f64, 1.0, (2, 3, t, 4), &dev)?);
        let (q, k, v) = (var(3)?, var(5)?, var(5)?);
        let mask = padding_mask(candle_core::DType::F64)?;
        let probe = Tensor::randn(0f64, 1.0, (2, 3, 3, 4), &dev)?;
        let loss = || {
            let out =
                scaled_dot_product_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), Some(&mask), 0.5, false)?;
            (out.context.sqr()? * &probe)?.sum_all()
        };
        let vars = [("q".to_string(), q.clone()), ("k".to_string(), k.clone()), ("v".to_string(), v.clone())];
        check_gradients(&vars, &loss, 1e-5, 1e-6, 1)
    }

    /// The fused op's context, gradients and (detached) probabilities equal the composed form's in
    /// f32; an operand that is not tracked gets no gradient.
    #[test]
    fn fused_agrees_with_the_composed_form() -> Result<()> {
        let dev = Device::Cpu;
        let q = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 4, 8), &dev)?)?;
        let k = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev)?)?;
        let v = Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev)?; // constant
        let mask = padding_mask(candle_core::DType::F32)?;
        let probe = Tensor::randn(0f32, 1.0, (2, 3, 4, 8), &dev)?;
        let fused = scaled_dot_product_attention(q.as_tensor(), k.as_tensor(), &v, Some(&mask), 0.3, true)?;
        let reference = composed(q.as_tensor(), k.as_tensor(), &v, &mask, 0.3)?;
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.max_all()?.to_scalar::<f32>() };
        assert!(diff(&fused.context, &reference)? < 1e-5);
        let probs = fused.probs.expect("asked for");
        assert!(!probs.track_op(), "probabilities beside a fused op carry no gradient");
        let p_ref = candle_nn::ops::softmax(
            &(q.as_tensor().matmul(&k.as_tensor().t()?)? * 0.3)?.broadcast_add(&mask)?,
            D::Minus1,
        )?;
        assert!(diff(&probs, &p_ref)? < 1e-6);
        let g = (fused.context * &probe)?.sum_all()?.backward()?;
        let g_ref = (reference * &probe)?.sum_all()?.backward()?;
        for t in [q.as_tensor(), k.as_tensor()] {
            let (a, b) = (g.get(t).unwrap(), g_ref.get(t).unwrap());
            assert!(diff(a, b)? < 1e-5, "{:?}", diff(a, b));
            assert!(!a.track_op());
        }
        assert!(g.get(&v).is_none(), "v is a constant");
        // One query batch against many keys (not fusable) still runs, composed.
        let one = q.as_tensor().narrow(0, 0, 1)?;
        let out = scaled_dot_product_attention(&one, k.as_tensor(), &v, None, 0.3, true)?;
        assert_eq!(out.context.dims(), &[2, 3, 4, 8]);
        Ok(())
    }
}

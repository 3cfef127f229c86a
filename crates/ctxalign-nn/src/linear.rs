//! A linear layer whose backward computes only the gradients that are asked for.
//!
//! Candle's matmul backward computes a gradient for both operands whether or not anything reads
//! it. For a frozen weight (a plain tensor, not a `Var`) on the gradient path that is a full matrix
//! product per layer, and its result stays in the gradient store until the step ends: in S0, where
//! the adapter's gradient crosses the frozen BERT of every ITM pass, that was half of the step's
//! peak memory on the CPU (8.3 GiB with Candle's `Linear`, 4.2 GiB with this one) and 12–20 % of its
//! time (BENCHMARKS.md). Candle also keeps the matmul's output alive as the bias addition's input,
//! and reaches a weight's gradient through its transposed view.
//!
//! [`Linear`] has Candle's `Linear` forward. On the gradient path it runs as one op, `x·Wᵀ + b`,
//! whose backward returns `g·W` for a tracked input, `gᵀ·x` for a trainable weight and the row sum
//! of `g` for a trainable bias, and nothing for a frozen one, as PyTorch does for
//! `requires_grad=False`. Inference (nothing tracked) runs the same product without recording
//! anything on the CPU, and Candle's `Linear` on other devices. On the CPU the product is
//! [`crate::matmul`]'s, which keeps every core busy where Candle's call into `gemm` packs the
//! weight on one thread first (see there).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;

/// `y = x·Wᵀ + b` with `weight` `[out, in]` (PyTorch's and HF's layout).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The input and the weight in one dtype the op takes.
    fn takes_op(&self, x: &Tensor) -> bool {
        crate::fused::supports(x.dtype()) && x.dtype() == self.weight.dtype()
    }

    /// On a gradient path (anything tracked) in a dtype the op takes: the op applies.
    fn on_gradient_path(&self, x: &Tensor) -> bool {
        let tracked = x.track_op() || self.weight.track_op() || self.bias.as_ref().is_some_and(Tensor::track_op);
        tracked && self.takes_op(x)
    }
}

impl Linear {
    /// `x·Wᵀ + b` split into attention heads, `[batch, tokens, in]` → `[batch, heads, tokens,
    /// out/heads]` (as [`crate::split_heads`] after [`Module::forward`]). On the gradient path this
    /// is one op, so the projection's `[batch, tokens, out]` output is never a graph tensor: the
    /// graph keeps one copy of the projection where the two ops kept two (for the cross-attention
    /// keys and values over 197 image tokens, 2 × 0.6 MB per image and layer in f32).
    pub fn forward_heads(&self, x: &Tensor, heads: usize) -> Result<Tensor> {
        let out = self.weight.dim(0)?;
        if heads == 0 || out % heads != 0 || x.rank() != 3 {
            candle_core::bail!("linear: {out} outputs of a {:?} input do not split into {heads} heads", x.dims())
        }
        if !self.on_gradient_path(x) {
            return crate::attention::split_heads(&self.forward(x)?, heads);
        }
        self.apply(x, LinearOp { heads: Some(heads) }, true)
    }

    /// The op, recording its backward or not.
    fn apply(&self, x: &Tensor, op: LinearOp, record: bool) -> Result<Tensor> {
        let x = x.contiguous()?;
        match (&self.bias, record) {
            (Some(bias), true) => x.apply_op3(&self.weight, bias, op),
            (Some(bias), false) => x.apply_op3_no_bwd(&self.weight, bias, &op),
            (None, true) => x.apply_op2(&self.weight, op),
            (None, false) => x.apply_op2_no_bwd(&self.weight, &op),
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.on_gradient_path(x) {
            return self.apply(x, LinearOp { heads: None }, true);
        }
        // Inference on the CPU: the same op, recording nothing (its product keeps every core busy,
        // see `matmul::cpu_linear`); elsewhere Candle's `Linear`.
        if x.device().is_cpu() && self.takes_op(x) {
            return self.apply(x, LinearOp { heads: None }, false);
        }
        candle_nn::Linear::new(self.weight.clone(), self.bias.clone()).forward(x)
    }
}

/// [`candle_nn::linear`]'s parameters (names `weight`, `bias`; its initialisation) as a [`Linear`].
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let l = candle_nn::linear(in_dim, out_dim, vb)?;
    Ok(Linear::new(l.weight().clone(), l.bias().cloned()))
}

/// [`candle_nn::linear_no_bias`]'s parameters as a [`Linear`].
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let l = candle_nn::linear_no_bias(in_dim, out_dim, vb)?;
    Ok(Linear::new(l.weight().clone(), None))
}

/// `x·Wᵀ (+ b)` whose backward differentiates only the tracked operands; with `heads`, its output
/// split into attention heads (`[batch, heads, tokens, out/heads]`).
struct LinearOp {
    heads: Option<usize>,
}

impl LinearOp {
    /// The product, then the heads' split when asked for.
    fn run<S: BackendStorage>(
        &self,
        x: &S,
        x_layout: &Layout,
        w: &S,
        w_layout: &Layout,
        bias: Option<(&S, &Layout)>,
    ) -> Result<(S, Shape)>
    where
        S::Device: candle_core::backend::BackendDevice<Storage = S>,
    {
        self.split(Self::fwd(x, x_layout, w, w_layout, bias)?)
    }

    /// [`Self::run`] on the CPU, with ctxalign's product where it handles the dtype.
    fn run_cpu(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        match crate::matmul::cpu_linear(x, x_layout, w, w_layout, bias)? {
            Some(product) => self.split(product),
            None => self.run(x, x_layout, w, w_layout, bias),
        }
    }

    /// The heads' split of the product `[.., out]`, when asked for.
    fn split<S: BackendStorage>(&self, (y, shape): (S, Shape)) -> Result<(S, Shape)>
    where
        S::Device: candle_core::backend::BackendDevice<Storage = S>,
    {
        match self.heads {
            Some(heads) => crate::attention::Heads::Split { heads }.run(&y, &Layout::contiguous(shape)),
            None => Ok((y, shape)),
        }
    }

    /// The output gradient at the product's shape (`[.., out]`), the heads merged back.
    fn product_grad(&self, grad: &Tensor) -> Result<Tensor> {
        match self.heads {
            Some(_) => grad.detach().contiguous()?.apply_op1_no_bwd(&crate::attention::Heads::Merge),
            None => Ok(grad.clone()),
        }
    }

    /// The forward on any backend: one matrix product over `[rows, in]` and `Wᵀ` (a transposed view
    /// of the stored weight, as Candle's `Linear` uses it), then the bias added row by row.
    fn fwd<S: BackendStorage>(
        x: &S,
        x_layout: &Layout,
        w: &S,
        w_layout: &Layout,
        bias: Option<(&S, &Layout)>,
    ) -> Result<(S, Shape)> {
        let dims = x_layout.dims();
        let (Some(&k), [n, k_w]) = (dims.last(), w_layout.dims()) else {
            candle_core::bail!("linear: weight {:?} for input {:?}", w_layout.dims(), dims)
        };
        if k != *k_w || !x_layout.is_contiguous() {
            candle_core::bail!("linear: a contiguous input [.., {k_w}] is needed, got {dims:?}")
        }
        let m = x_layout.shape().elem_count() / k.max(1);
        let rows = Layout::contiguous_with_offset((m, k), x_layout.start_offset());
        let mut y = x.matmul(w, (1, m, *n, k), &rows, &w_layout.transpose(0, 1)?)?;
        if let Some((b, b_layout)) = bias {
            y = y.binary_impl::<candle_core::op::Add>(
                b,
                &Layout::contiguous((m, *n)),
                &b_layout.broadcast_as((m, *n))?,
            )?;
        }
        let mut out = dims[..dims.len() - 1].to_vec();
        out.push(*n);
        Ok((y, Shape::from(out)))
    }

    /// The gradients of the tracked operands: `g·W` shaped like `x`, `gᵀ·x` `[out, in]`, and the
    /// column sums of `g` `[out]`, with `g` as `[rows, out]`; none of them records a graph.
    fn grads(
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, k) = w.dims2()?;
        let g = grad.detach().reshape((grad.elem_count() / n.max(1), n))?;
        // Computed from detached operands: a gradient that recorded its own graph would keep the
        // whole forward pass alive in the gradient store (and, through the optimizer's moments,
        // from step to step).
        let dx = x.track_op().then(|| g.matmul(&w.detach())?.reshape(x.shape())).transpose()?;
        let rows = x.detach().reshape((x.elem_count() / k.max(1), k))?;
        let dw = w.track_op().then(|| g.t()?.matmul(&rows)).transpose()?;
        let db = b.filter(|b| b.track_op()).map(|_| crate::fused::column_sum(&g)).transpose()?;
        Ok((dx, dw, db))
    }
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "ctxalign-linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout, w: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run_cpu(x, xl, w, wl, None)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.run(x, xl, w, wl, None)
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = Self::grads(x, w, None, &self.product_grad(grad)?)?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "ctxalign-linear-bias"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run_cpu(x, xl, w, wl, Some((b, bl)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.run(x, xl, w, wl, Some((b, bl)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Self::grads(x, w, Some(b), &self.product_grad(grad)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::check_gradients;
    use candle_core::{DType, Device, Var};

    fn frozen(dtype: DType, bias: bool) -> Result<Linear> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.5, (5, 7), &dev)?.to_dtype(dtype)?;
        let b = bias.then(|| Tensor::randn(0f32, 0.5, 5, &dev)?.to_dtype(dtype)).transpose()?;
        Ok(Linear::new(w, b))
    }

    /// Central differences for the input, the weight and the bias on a 3-D input, with and without
    /// bias, and for the input alone through frozen weights.
    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        for bias in [true, false] {
            let layer = frozen(DType::F64, bias)?;
            let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (2, 3, 7), &dev)?)?;
            let probe = Tensor::randn(0f64, 1.0, (2, 3, 5), &dev)?;
            let loss = |l: &Linear| (l.forward(x.as_tensor())?.sqr()? * &probe)?.sum_all();
            check_gradients(&[("x".to_string(), x.clone())], &|| loss(&layer), 1e-5, 1e-7, 1)?;
            let w = Var::from_tensor(layer.weight())?;
            let b = layer.bias().map(Var::from_tensor).transpose()?;
            let trainable = Linear::new(w.as_tensor().clone(), b.as_ref().map(|b| b.as_tensor().clone()));
            let mut vars = vec![("x".to_string(), x.clone()), ("weight".to_string(), w)];
            vars.extend(b.map(|b| ("bias".to_string(), b)));
            check_gradients(&vars, &|| loss(&trainable), 1e-5, 1e-7, 1)?;
        }
        Ok(())
    }

    /// Forward and gradients equal Candle's `Linear` (composed from matmul and add); for frozen
    /// weights no gradient is computed for them (Candle's computes both).
    /// `forward_heads` is the projection split into heads, on and off the gradient path, and its
    /// gradients (input, weight, bias; and the input alone through frozen weights) match central
    /// differences.
    #[test]
    fn projection_into_heads() -> Result<()> {
        use crate::gradcheck::check_gradients;
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::randn(0f64, 0.5, (6, 4), &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f64, 0.5, 6, &dev)?)?;
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (2, 3, 4), &dev)?)?;
        let trainable = Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone()));
        let want = crate::split_heads(&trainable.forward(&x.as_tensor().detach())?, 3)?;
        for input in [x.as_tensor().clone(), x.as_tensor().detach()] {
            let got = trainable.forward_heads(&input, 3)?;
            assert_eq!(got.dims(), [2, 3, 3, 2]);
            let diff = (got - &want)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(diff < 1e-12, "differs by {diff}");
        }
        assert!(trainable.forward_heads(x.as_tensor(), 4).is_err());
        let probe = Tensor::randn(0f64, 1.0, (2, 3, 3, 2), &dev)?;
        let loss = |l: &Linear| (l.forward_heads(x.as_tensor(), 3)?.sqr()? * &probe)?.sum_all();
        let vars = [("x".to_string(), x.clone()), ("weight".to_string(), w.clone()), ("bias".to_string(), b.clone())];
        check_gradients(&vars, &|| loss(&trainable), 1e-5, 1e-7, 1)?;
        let frozen = Linear::new(w.as_tensor().detach(), Some(b.as_tensor().detach()));
        check_gradients(&[("x".to_string(), x.clone())], &|| loss(&frozen), 1e-5, 1e-7, 1)?;
        Ok(())
    }

    #[test]
    fn agrees_with_candle_and_leaves_frozen_weights_alone() -> Result<()> {
        let dev = Device::Cpu;
        let layer = frozen(DType::F32, true)?;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 3, 7), &dev)?)?;
        let probe = Tensor::randn(0f32, 1.0, (4, 3, 5), &dev)?;
        let close = |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.max_all()?.to_scalar::<f32>() };

        let reference = candle_nn::Linear::new(layer.weight().clone(), layer.bias().cloned());
        let (ours, theirs) = (layer.forward(x.as_tensor())?, reference.forward(x.as_tensor())?);
        assert!(close(&ours, &theirs)? < 1e-6);
        let g_ours = (ours * &probe)?.sum_all()?.backward()?;
        let g_theirs = (theirs * &probe)?.sum_all()?.backward()?;
        assert!(close(g_ours.get(x.as_tensor()).unwrap(), g_theirs.get(x.as_tensor()).unwrap())? < 1e-5);
        // Both keep gradients for x and the (untracked) probe of the product; Candle's also for the
        // weight's transposed view and the bias.
        assert_eq!(g_ours.get_ids().count(), 2, "x and the probe");
        assert!(g_theirs.get_ids().count() >= 4, "Candle differentiates the frozen weight and bias");

        let (w, b) = (Var::from_tensor(layer.weight())?, Var::from_tensor(layer.bias().unwrap())?);
        let trainable = Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone()));
        let reference = candle_nn::Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone()));
        let g_ours = (trainable.forward(x.as_tensor())? * &probe)?.sum_all()?.backward()?;
        let g_theirs = (reference.forward(x.as_tensor())? * &probe)?.sum_all()?.backward()?;
        for t in [x.as_tensor(), w.as_tensor(), b.as_tensor()] {
            let g = g_ours.get(t).unwrap();
            assert!(close(g, g_theirs.get(t).unwrap())? < 1e-5);
            assert!(!g.track_op(), "a gradient must not keep the forward graph alive");
        }
        // Inference (nothing tracked) records nothing and computes the same.
        let plain = layer.forward(&x.as_tensor().detach())?;
        assert!(!plain.track_op() && close(&plain, &reference.forward(&x.as_tensor().detach())?)? < 1e-6);
        Ok(())
    }

    /// The CPU product (`matmul::cpu_linear`) against the formula in f64, in every way it splits
    /// the work: column and row tiles (4 threads: 2 × 2, the last column tile narrower; 3 threads:
    /// row tiles only), `gemm`'s own threading (a shallow product, a transposed weight), one
    /// thread; 2-D and 3-D inputs, with a bias read through a stride and without one, f32, f64 and
    /// f16, tracked and not.
    #[test]
    fn cpu_product_matches_the_formula_at_every_split() -> Result<()> {
        let dev = Device::Cpu;
        let cases: [(&[usize], usize, bool); 5] = [
            (&[70, 300], 260, false),   // 2 column × 2 row tiles on 4 threads, 3 row tiles on 3
            (&[2, 3, 300], 200, false), // 1 column tile, rows fewer than a tile
            (&[40, 64], 300, false),    // shallow: gemm's threading
            (&[9, 300], 260, true),     // a transposed (column-major) weight: gemm's threading
            (&[33, 257], 129, false),   // odd sizes
        ];
        for threads in [4, 3, 1] {
            let pool =
                rayon::ThreadPoolBuilder::new().num_threads(threads).build().map_err(candle_core::Error::wrap)?;
            for &(x_dims, n, transposed) in &cases {
                let k = *x_dims.last().unwrap();
                let x64 = Tensor::randn(0f64, 1.0, x_dims, &dev)?;
                let w64 = if transposed {
                    Tensor::randn(0f64, 0.1, (k, n), &dev)?.t()?
                } else {
                    Tensor::randn(0f64, 0.1, (n, k), &dev)?
                };
                let b64 = Tensor::randn(0f64, 1.0, (n, 3), &dev)?.narrow(1, 1, 1)?.squeeze(1)?; // stride 3
                for bias in [true, false] {
                    let mut want = x64.broadcast_matmul(&w64.t()?)?;
                    if bias {
                        want = want.broadcast_add(&b64)?;
                    }
                    for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-4), (DType::F16, 0.1)] {
                        let w = w64.to_dtype(dtype)?;
                        let b = bias.then(|| b64.to_dtype(dtype)).transpose()?;
                        let x = x64.to_dtype(dtype)?;
                        for layer in [
                            Linear::new(w.clone(), b.clone()),
                            Linear::new(Var::from_tensor(&w)?.as_tensor().clone(), b),
                        ] {
                            let got = pool.install(|| layer.forward(&x))?;
                            assert_eq!(got.dims(), want.dims());
                            let diff = (got.to_dtype(DType::F64)? - &want)?.abs()?.max_all()?.to_scalar::<f64>()?;
                            assert!(diff <= tol, "{x_dims:?}→{n} {dtype:?} bias {bias} {threads} threads: {diff}");
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Half precision runs the same op (bf16 matrix products and bias) and matches f32 to rounding.
    #[test]
    fn bf16_matches_f32() -> Result<()> {
        let layer = frozen(DType::F32, true)?;
        let bf16 = |t: &Tensor| t.to_dtype(DType::BF16);
        let w = Var::from_tensor(&bf16(layer.weight())?)?;
        let half = Linear::new(w.as_tensor().clone(), layer.bias().map(bf16).transpose()?);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (6, 7), &Device::Cpu)?)?;
        let xh = Var::from_tensor(&bf16(x.as_tensor())?)?;
        let y = layer.forward(x.as_tensor())?;
        let yh = half.forward(xh.as_tensor())?;
        assert_eq!(yh.dtype(), DType::BF16);
        let diff = (y - yh.to_dtype(DType::F32)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 0.05, "bf16 differs by {diff}");
        let g = yh.sum_all()?.backward()?;
        assert_eq!(g.get(xh.as_tensor()).unwrap().dims(), &[6, 7]);
        assert_eq!(g.get(w.as_tensor()).unwrap().dtype(), DType::BF16);
        Ok(())
    }
}

//! Finite-difference gradient checks: central differences on variables against Candle's backward.
//! Used by the tests of every custom layer and loss; public so code built on ctxalign can check its
//! own layers the same way.

use candle_core::{DType, Result, Tensor, Var};

/// Parameters whose gradient is zero by construction, so "every tensor gets a gradient" must not
/// count them: an attention key bias adds `q·b` to every score of a query alike, and softmax is
/// shift-invariant, so the bias never changes the output (its backward value is rounding noise).
pub fn gradient_free_by_construction(name: &str) -> bool {
    // A key bias adds the same score to every key of a query: softmax cancels it. Batch-norm
    // running statistics are state, detached by the model.
    name.ends_with(".key.bias")
        || name.ends_with(".k_proj.bias")
        || name.ends_with(".running_mean")
        || name.ends_with(".running_var")
}

/// Checks `∂loss/∂v` of every variable in `vars` at every `stride`-th entry: the analytic gradient
/// from `loss().backward()` against `(loss(v + h) − loss(v − h)) / 2h`. Variables should be f64.
/// Returns an error naming the first mismatch, or a variable that gets no (or an all-zero) gradient
/// unless [`gradient_free_by_construction`].
pub fn check_gradients(
    vars: &[(String, Var)],
    loss: &dyn Fn() -> Result<Tensor>,
    step: f64,
    tolerance: f64,
    stride: usize,
) -> Result<()> {
    let grads = loss()?.backward()?;
    for (name, var) in vars {
        if var.dtype() != DType::F64 {
            candle_core::bail!("{name}: finite differences need f64 variables, got {:?}", var.dtype())
        }
        let Some(g) = grads.get(var.as_tensor()) else { candle_core::bail!("{name}: no gradient") };
        let g = g.flatten_all()?.to_vec1::<f64>()?;
        if g.iter().all(|v| *v == 0.0) && !gradient_free_by_construction(name) {
            candle_core::bail!("{name}: all-zero gradient")
        }
        let base = var.as_tensor().flatten_all()?.to_vec1::<f64>()?;
        let eval_at = |values: Vec<f64>| -> Result<f64> {
            var.set(&Tensor::from_vec(values, var.shape(), var.device())?)?;
            loss()?.to_dtype(DType::F64)?.to_scalar::<f64>()
        };
        for i in (0..base.len()).step_by(stride.max(1)) {
            let mut p = base.clone();
            p[i] += step;
            let plus = eval_at(p.clone())?;
            p[i] -= 2.0 * step;
            let minus = eval_at(p)?;
            let numeric = (plus - minus) / (2.0 * step);
            if (numeric - g[i]).abs() > tolerance * (1.0 + numeric.abs()) {
                var.set(&Tensor::from_vec(base.clone(), var.shape(), var.device())?)?;
                candle_core::bail!("{name}[{i}]: finite difference {numeric} vs backward {}", g[i])
            }
        }
        var.set(&Tensor::from_vec(base, var.shape(), var.device())?)?;
    }
    Ok(())
}

/// The variables of a `VarMap`, sorted by name.
pub fn varmap_vars(vm: &candle_nn::VarMap) -> Vec<(String, Var)> {
    let mut vars: Vec<(String, Var)> =
        vm.data().lock().expect("not poisoned").iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

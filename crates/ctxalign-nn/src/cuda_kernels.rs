//! The CUDA sides of ctxalign's ops. The forwards of the fused softmax and LayerNorm launch Candle's
//! own `softmax_*` and `layernorm_*` kernels, as `candle-nn` 0.11 launches them (its op structs are
//! private, its kernels public). The backward passes of the fused softmax, LayerNorm and GELU and
//! the fused Adam update are ctxalign's kernels (`kernels/ctxalign.cu`, compiled to PTX by
//! build.rs); each replaces a chain of Candle kernels (and the f32 temporaries between them) by one
//! pass.
//!
//! Every operand must be contiguous (an offset is fine); the callers make them so.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{kernel_name, kernels, CudaDType, CudaStorage, Map1, Map3, WrapErr};
use candle_core::{CudaDevice, DType, Layout, Result, Shape, WithDType};
use half::{bf16, f16};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/ctxalign.ptx"));
/// Threads per block of the row kernels (one block per row).
const ROW_THREADS: u32 = 256;
/// Rows each block of `layer_norm_bwd_params` sums.
const LN_ROWS_PER_BLOCK: usize = 64;

/// The kernel `$name` of ctxalign's PTX module (loaded once per device). A macro because Candle
/// does not export the type of a loaded function.
macro_rules! kernel {
    ($dev:expr, $name:expr) => {
        $dev.get_or_load_custom_func(&$name, "ctxalign", PTX)?
    };
}

fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::F64 => "f64",
        other => candle_core::bail!("ctxalign kernels: unsupported dtype {other:?}"),
    })
}

fn part<'a, T>(s: &'a CudaSlice<T>, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.slice(a..b)),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
    part(s.as_cuda_slice::<T>()?, l, what)
}

fn view_mut<'a, T: CudaDType>(s: &'a mut CudaStorage, l: &Layout, what: &str) -> Result<CudaViewMut<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.as_cuda_slice_mut::<T>()?.slice_mut(a..b)),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

fn rows_cols(layout: &Layout) -> (usize, usize) {
    let cols = layout.dims().last().copied().unwrap_or(1).max(1);
    (layout.shape().elem_count() / cols, cols)
}

fn rows_config(rows: usize, shared_mem_bytes: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (ROW_THREADS, 1, 1), shared_mem_bytes }
}

/// Grid-stride kernels: enough blocks to fill the GPU, at most one per 256 elements.
fn elementwise_config(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 4096) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

fn check_same_len(a: &Layout, b: &Layout, what: &str) -> Result<()> {
    if a.shape().elem_count() != b.shape().elem_count() {
        candle_core::bail!("{what}: operands of {:?} and {:?} differ in size", a.dims(), b.dims())
    }
    Ok(())
}

/// Runs `$body` with `$t` bound to the Rust type of `$dtype` (f32, bf16, f16, f64).
macro_rules! with_float_type {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::BF16 => {
                type $t = bf16;
                $body
            }
            DType::F16 => {
                type $t = f16;
                $body
            }
            DType::F64 => {
                type $t = f64;
                $body
            }
            other => candle_core::bail!("ctxalign kernels: unsupported dtype {other:?}"),
        }
    };
}

/// `(y ⊙ (g − Σ g⊙y))·scale` per row of the softmax output `y` and its gradient `g` (same dtype).
pub fn softmax_bwd(y: &CudaStorage, yl: &Layout, g: &CudaStorage, gl: &Layout, scale: f32) -> Result<CudaStorage> {
    check_same_len(yl, gl, "softmax backward")?;
    let dev = y.device().clone();
    let (rows, cols) = rows_cols(yl);
    let f = kernel!(dev, format!("softmax_bwd_{}", suffix(y.dtype())?));
    with_float_type!(y.dtype(), T => {
        let (yv, gv) = (view::<T>(y, yl, "softmax backward: y")?, view::<T>(g, gl, "softmax backward: g")?);
        // SAFETY: the kernel writes every element.
        let dst = unsafe { dev.alloc::<T>(rows * cols)? };
        let cols = cols as i32;
        let mut b = f.builder();
        b.arg(&yv).arg(&gv).arg(&dst).arg(&cols).arg(&scale);
        // SAFETY: the arguments match `softmax_bwd_*` in kernels/ctxalign.cu.
        unsafe { b.launch(rows_config(rows, 0)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(dst, dev))
    })
}

/// LayerNorm's input gradient, per row of `x` (`[rows, cols]`), from the weight `w` (`[cols]`) and
/// the output gradient `g`.
pub fn layer_norm_bwd_x(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    g: (&CudaStorage, &Layout),
    eps: f32,
) -> Result<CudaStorage> {
    check_same_len(x.1, g.1, "layer_norm backward")?;
    let dev = x.0.device().clone();
    let (rows, cols) = rows_cols(x.1);
    if w.1.shape().elem_count() != cols {
        candle_core::bail!("layer_norm backward: weight {:?} does not fit rows of {cols}", w.1.dims())
    }
    let f = kernel!(dev, format!("layer_norm_bwd_x_{}", suffix(x.0.dtype())?));
    with_float_type!(x.0.dtype(), T => {
        let xv = view::<T>(x.0, x.1, "layer_norm backward: x")?;
        let wv = view::<T>(w.0, w.1, "layer_norm backward: weight")?;
        let gv = view::<T>(g.0, g.1, "layer_norm backward: gradient")?;
        // SAFETY: the kernel writes every element.
        let dst = unsafe { dev.alloc::<T>(rows * cols)? };
        let cols = cols as i32;
        let mut b = f.builder();
        b.arg(&xv).arg(&wv).arg(&gv).arg(&dst).arg(&cols).arg(&eps);
        // SAFETY: the arguments match `layer_norm_bwd_x_*` in kernels/ctxalign.cu.
        unsafe { b.launch(rows_config(rows, 0)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(dst, dev))
    })
}

/// LayerNorm's weight and bias gradients as per-block partial sums, `[blocks, 2, cols]` (`Σ g·x̂`,
/// then `Σ g`) in f32 (f64 for f64 input); the caller sums the blocks.
pub fn layer_norm_bwd_params(
    x: (&CudaStorage, &Layout),
    g: (&CudaStorage, &Layout),
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    check_same_len(x.1, g.1, "layer_norm backward")?;
    let dev = x.0.device().clone();
    let (rows, cols) = rows_cols(x.1);
    let blocks = rows.div_ceil(LN_ROWS_PER_BLOCK).max(1);
    let f = kernel!(dev, format!("layer_norm_bwd_params_{}", suffix(x.0.dtype())?));
    let shape = Shape::from((blocks, 2, cols));
    macro_rules! launch {
        ($t:ty, $acc:ty) => {{
            let xv = view::<$t>(x.0, x.1, "layer_norm backward: x")?;
            let gv = view::<$t>(g.0, g.1, "layer_norm backward: gradient")?;
            // SAFETY: every block writes its whole partial row (rows past the end sum to zero).
            let dst = unsafe { dev.alloc::<$acc>(blocks * 2 * cols)? };
            let (rows_i, cols_i, per_block) = (rows as i32, cols as i32, LN_ROWS_PER_BLOCK as i32);
            let shared = (2 * cols * std::mem::size_of::<$acc>()) as u32;
            let cfg = LaunchConfig {
                grid_dim: (blocks as u32, 1, 1),
                block_dim: (ROW_THREADS, 1, 1),
                shared_mem_bytes: shared,
            };
            let mut b = f.builder();
            b.arg(&xv).arg(&gv).arg(&dst).arg(&rows_i).arg(&cols_i).arg(&per_block).arg(&eps);
            // SAFETY: the arguments match `layer_norm_bwd_params_*` in kernels/ctxalign.cu; the
            // shared memory holds the block's 2·cols sums (≤ 48 KiB for rows up to 6144 in f32).
            unsafe { b.launch(cfg) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(dst, dev), shape))
        }};
    }
    let acc_bytes = if x.0.dtype() == DType::F64 { 8 } else { 4 };
    if 2 * cols * acc_bytes > 48 * 1024 {
        candle_core::bail!("layer_norm backward: rows of {cols} are longer than the kernel's shared memory holds")
    }
    match x.0.dtype() {
        DType::F32 => launch!(f32, f32),
        DType::BF16 => launch!(bf16, f32),
        DType::F16 => launch!(f16, f32),
        DType::F64 => launch!(f64, f64),
        other => candle_core::bail!("layer_norm backward: unsupported dtype {other:?}"),
    }
}

/// `g·gelu'(x)` elementwise (same dtype).
pub fn gelu_bwd(x: &CudaStorage, xl: &Layout, g: &CudaStorage, gl: &Layout) -> Result<CudaStorage> {
    check_same_len(xl, gl, "gelu backward")?;
    let dev = x.device().clone();
    let n = xl.shape().elem_count();
    let f = kernel!(dev, format!("gelu_bwd_{}", suffix(x.dtype())?));
    with_float_type!(x.dtype(), T => {
        let (xv, gv) = (view::<T>(x, xl, "gelu backward: x")?, view::<T>(g, gl, "gelu backward: g")?);
        // SAFETY: the kernel writes every element.
        let dst = unsafe { dev.alloc::<T>(n)? };
        let mut b = f.builder();
        b.arg(&n).arg(&xv).arg(&gv).arg(&dst);
        // SAFETY: the arguments match `gelu_bwd_*` in kernels/ctxalign.cu.
        unsafe { b.launch(elementwise_config(n)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(dst, dev))
    })
}

/// The constants of one Adam step for one parameter, in the state's precision.
#[derive(Debug, Clone, Copy)]
pub struct AdamConstants<S> {
    pub beta1: S,
    pub one_minus_beta1: S,
    pub beta2: S,
    pub one_minus_beta2: S,
    pub l2: S,
    pub decay: S,
    pub inv_bias2: S,
    pub eps: S,
    pub step_size: S,
}

impl AdamConstants<f64> {
    fn to_f32(self) -> AdamConstants<f32> {
        AdamConstants {
            beta1: self.beta1 as f32,
            one_minus_beta1: self.one_minus_beta1 as f32,
            beta2: self.beta2 as f32,
            one_minus_beta2: self.one_minus_beta2 as f32,
            l2: self.l2 as f32,
            decay: self.decay as f32,
            inv_bias2: self.inv_bias2 as f32,
            eps: self.eps as f32,
            step_size: self.step_size as f32,
        }
    }
}

/// Adam's moments (`[2, n]`: m then v, f32 or f64) updated in place from `grad` (any float dtype
/// for f32 moments, f64 for f64) and, for Adam's L2 term, `theta` (the moments' dtype).
pub fn adam_moments(
    moments: (&mut CudaStorage, &Layout),
    grad: (&CudaStorage, &Layout),
    theta: (&CudaStorage, &Layout),
    c: &AdamConstants<f64>,
) -> Result<()> {
    let n = theta.1.shape().elem_count();
    check_same_len(grad.1, theta.1, "adam")?;
    if moments.1.shape().elem_count() != 2 * n {
        candle_core::bail!("adam: moments {:?} do not hold two of {n}", moments.1.dims())
    }
    let dev = theta.0.device().clone();
    let (state, gd) = (moments.0.dtype(), grad.0.dtype());
    let f = kernel!(dev, format!("adam_moments_{}_{}", suffix(state)?, suffix(gd)?));
    macro_rules! launch {
        ($s:ty, $g:ty, $c:expr) => {{
            let c = $c;
            let mut m = view_mut::<$s>(moments.0, moments.1, "adam: moments")?;
            let gv = view::<$g>(grad.0, grad.1, "adam: gradient")?;
            let tv = view::<$s>(theta.0, theta.1, "adam: parameter")?;
            let mut b = f.builder();
            b.arg(&n).arg(&mut m).arg(&gv).arg(&tv);
            b.arg(&c.beta1).arg(&c.one_minus_beta1).arg(&c.beta2).arg(&c.one_minus_beta2).arg(&c.l2);
            // SAFETY: the arguments match `adam_moments_*` in kernels/ctxalign.cu.
            unsafe { b.launch(elementwise_config(n)) }.w()?;
            Ok(())
        }};
    }
    match (state, gd) {
        (DType::F32, DType::F32) => launch!(f32, f32, c.to_f32()),
        (DType::F32, DType::BF16) => launch!(f32, bf16, c.to_f32()),
        (DType::F32, DType::F16) => launch!(f32, f16, c.to_f32()),
        (DType::F64, DType::F64) => launch!(f64, f64, *c),
        (s, g) => candle_core::bail!("adam: no kernel for {s:?} state with {g:?} gradients"),
    }
}

/// Adam's step on `theta` in place from the updated moments (both f32 or both f64).
pub fn adam_step(
    theta: (&mut CudaStorage, &Layout),
    moments: (&CudaStorage, &Layout),
    c: &AdamConstants<f64>,
) -> Result<()> {
    let n = theta.1.shape().elem_count();
    if moments.1.shape().elem_count() != 2 * n {
        candle_core::bail!("adam: moments {:?} do not hold two of {n}", moments.1.dims())
    }
    let dev = moments.0.device().clone();
    let f = kernel!(dev, format!("adam_step_{}", suffix(theta.0.dtype())?));
    macro_rules! launch {
        ($s:ty, $c:expr) => {{
            let c = $c;
            let mut t = view_mut::<$s>(theta.0, theta.1, "adam: parameter")?;
            let mv = view::<$s>(moments.0, moments.1, "adam: moments")?;
            let mut b = f.builder();
            b.arg(&n).arg(&mut t).arg(&mv).arg(&c.decay).arg(&c.inv_bias2).arg(&c.eps).arg(&c.step_size);
            // SAFETY: the arguments match `adam_step_*` in kernels/ctxalign.cu.
            unsafe { b.launch(elementwise_config(n)) }.w()?;
            Ok(())
        }};
    }
    match theta.0.dtype() {
        DType::F32 => launch!(f32, c.to_f32()),
        DType::F64 => launch!(f64, *c),
        other => candle_core::bail!("adam: no kernel for a {other:?} parameter"),
    }
}

/// A half-precision `param` set in place to its f32 `master`'s rounded value.
pub fn round_to(param: (&mut CudaStorage, &Layout), master: (&CudaStorage, &Layout)) -> Result<()> {
    check_same_len(param.1, master.1, "round_to")?;
    let n = param.1.shape().elem_count();
    let dev = master.0.device().clone();
    fn launch<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        n: usize,
        param: (&mut CudaStorage, &Layout),
        master: (&CudaStorage, &Layout),
    ) -> Result<()> {
        let f = kernel!(dev, format!("round_to_{}", suffix(param.0.dtype())?));
        let mut p = view_mut::<T>(param.0, param.1, "round_to: parameter")?;
        let mv = view::<f32>(master.0, master.1, "round_to: master")?;
        let mut b = f.builder();
        b.arg(&n).arg(&mut p).arg(&mv);
        // SAFETY: the arguments match `round_to_*` in kernels/ctxalign.cu.
        unsafe { b.launch(elementwise_config(n)) }.w()?;
        Ok(())
    }
    match (param.0.dtype(), master.0.dtype()) {
        (DType::BF16, DType::F32) => launch::<bf16>(&dev, n, param, master),
        (DType::F16, DType::F32) => launch::<f16>(&dev, n, param, master),
        (p, m) => candle_core::bail!("round_to: no kernel for a {p:?} parameter from a {m:?} master"),
    }
}

/// `softmax(x·scale + mask)`: Candle's affine and (broadcasting) add kernels, then its softmax
/// kernel; the two temporaries are freed when this returns.
pub fn scaled_masked_softmax(
    storage: &CudaStorage,
    layout: &Layout,
    mask: Option<(&CudaStorage, &Layout)>,
    scale: f64,
) -> Result<(CudaStorage, Shape)> {
    let contiguous = Layout::contiguous(layout.shape());
    let scaled;
    let (z, z_layout) = match (scale == 1.0, mask) {
        (true, None) => (storage, layout),
        (_, mask) => {
            let mut z = storage.affine(layout, scale, 0.0)?;
            if let Some((mask, mask_layout)) = mask {
                z = z.binary_impl::<candle_core::op::Add>(mask, &contiguous, mask_layout)?;
            }
            scaled = z;
            (&scaled, &contiguous)
        }
    };
    softmax(z, z_layout)
}

fn softmax(storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
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

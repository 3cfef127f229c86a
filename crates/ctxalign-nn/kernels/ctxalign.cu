// ctxalign's own CUDA kernels: the backward passes of the fused ops (softmax, LayerNorm, GELU) and
// the fused Adam/AdamW update. Compiled to PTX by build.rs (feature `cuda`) and loaded by
// src/cuda_kernels.rs. Every kernel's math is the CPU path's, so `xtask grad-check` compares both
// with an f64 reference on the device.
//
// Rows are contiguous `[rows, cols]`; one block of ROW_THREADS threads per row. Sums run in float
// for f32/bf16/f16 and in double for f64.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

template <typename T> struct Acc { typedef float type; };
template <> struct Acc<double> { typedef double type; };

__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float widen(__half x) { return __half2float(x); }
__device__ __forceinline__ double widen(double x) { return x; }

template <typename T> __device__ __forceinline__ T narrow(typename Acc<T>::type x);
template <> __device__ __forceinline__ float narrow<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half narrow<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ double narrow<double>(double x) { return x; }

__device__ __forceinline__ float erf_(float x) { return erff(x); }
__device__ __forceinline__ double erf_(double x) { return erf(x); }
__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float sqrt_(float x) { return sqrtf(x); }
__device__ __forceinline__ double sqrt_(double x) { return sqrt(x); }

// The sum of `v` over the block, returned to every thread. `scratch` holds 32 values; the leading
// barrier lets a caller use it again right after the previous call.
template <typename A> __device__ A block_sum(A v, A *scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? scratch[lane] : A(0);
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  return scratch[0];
}

// softmax backward: dx = (y ⊙ (g − Σ g⊙y)) · scale, per row.
template <typename T>
__device__ void softmax_bwd(const T *y, const T *g, T *dx, int cols, float scale) {
  typedef typename Acc<T>::type A;
  __shared__ A scratch[32];
  const size_t base = (size_t)blockIdx.x * cols;
  A dot = 0;
  for (int j = threadIdx.x; j < cols; j += blockDim.x) dot += widen(y[base + j]) * widen(g[base + j]);
  dot = block_sum(dot, scratch);
  for (int j = threadIdx.x; j < cols; j += blockDim.x)
    dx[base + j] = narrow<T>((widen(g[base + j]) - dot) * widen(y[base + j]) * A(scale));
}

// The row's mean and 1/σ (two passes, as the CPU forward).
template <typename T, typename A>
__device__ void row_stats(const T *x, int cols, A eps, A *scratch, A &mean, A &rstd) {
  A s = 0;
  for (int j = threadIdx.x; j < cols; j += blockDim.x) s += widen(x[j]);
  mean = block_sum(s, scratch) / A(cols);
  A s2 = 0;
  for (int j = threadIdx.x; j < cols; j += blockDim.x) {
    const A d = widen(x[j]) - mean;
    s2 += d * d;
  }
  const A var = block_sum(s2, scratch) / A(cols);
  rstd = A(1) / sqrt_(var + eps);
}

// LayerNorm backward for the input: dx = (g·w − mean(g·w) − x̂·mean(g·w·x̂)) / σ, per row.
template <typename T>
__device__ void layer_norm_bwd_x(const T *x, const T *w, const T *g, T *dx, int cols, float eps) {
  typedef typename Acc<T>::type A;
  __shared__ A scratch[32];
  const size_t base = (size_t)blockIdx.x * cols;
  A mean, rstd;
  row_stats(x + base, cols, A(eps), scratch, mean, rstd);
  A a = 0, b = 0;
  for (int j = threadIdx.x; j < cols; j += blockDim.x) {
    const A gw = widen(g[base + j]) * widen(w[j]);
    a += gw;
    b += gw * (widen(x[base + j]) - mean) * rstd;
  }
  const A mean_gw = block_sum(a, scratch) / A(cols);
  const A mean_gw_xhat = block_sum(b, scratch) / A(cols);
  for (int j = threadIdx.x; j < cols; j += blockDim.x) {
    const A gw = widen(g[base + j]) * widen(w[j]);
    const A xhat = (widen(x[base + j]) - mean) * rstd;
    dx[base + j] = narrow<T>((gw - mean_gw - xhat * mean_gw_xhat) * rstd);
  }
}

// LayerNorm backward for weight and bias: block b sums g·x̂ and g over rows
// [b·rows_per_block, (b+1)·rows_per_block) into partial[b] = [Σ g·x̂ (cols), Σ g (cols)]; the caller
// adds the blocks' partials (a deterministic order, unlike atomics). Each thread owns the columns
// j ≡ threadIdx.x (mod blockDim.x), so the shared sums need no barrier of their own.
template <typename T>
__device__ void layer_norm_bwd_params(const T *x, const T *g, typename Acc<T>::type *partial, int rows, int cols,
                                      int rows_per_block, float eps) {
  typedef typename Acc<T>::type A;
  __shared__ A scratch[32];
  extern __shared__ unsigned char shared_bytes[];
  A *sums = reinterpret_cast<A *>(shared_bytes);  // [2 · cols]
  for (int j = threadIdx.x; j < cols; j += blockDim.x) sums[j] = sums[cols + j] = A(0);
  const int first = blockIdx.x * rows_per_block;
  const int last = min(rows, first + rows_per_block);
  for (int r = first; r < last; ++r) {
    const size_t base = (size_t)r * cols;
    A mean, rstd;
    row_stats(x + base, cols, A(eps), scratch, mean, rstd);
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
      const A gj = widen(g[base + j]);
      sums[j] += gj * (widen(x[base + j]) - mean) * rstd;
      sums[cols + j] += gj;
    }
  }
  A *out = partial + (size_t)blockIdx.x * 2 * cols;
  for (int j = threadIdx.x; j < cols; j += blockDim.x) {
    out[j] = sums[j];
    out[cols + j] = sums[cols + j];
  }
}

// Exact GELU's backward: dx = g·(Φ(x) + x·φ(x)).
template <typename T> __device__ void gelu_bwd(size_t n, const T *x, const T *g, T *dx) {
  typedef typename Acc<T>::type A;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)blockDim.x * gridDim.x) {
    const A xv = widen(x[i]);
    const A cdf = A(0.5) * (A(1) + erf_(xv * A(0.70710678118654752440)));
    const A pdf = exp_(A(-0.5) * xv * xv) * A(0.39894228040143267794);
    dx[i] = narrow<T>(widen(g[i]) * (cdf + xv * pdf));
  }
}

// Adam's moments in place: moments = [m (n), v (n)] in the state type S, the gradient in G;
// g ← g + l2·θ (Adam's L2; 0 for AdamW), m ← β1·m + (1−β1)·g, v ← β2·v + (1−β2)·g².
template <typename S, typename G>
__device__ void adam_moments(size_t n, S *moments, const G *grad, const S *theta, S beta1, S one_minus_beta1,
                             S beta2, S one_minus_beta2, S l2) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)blockDim.x * gridDim.x) {
    S g = S(widen(grad[i]));
    if (l2 != S(0)) g = g + theta[i] * l2;
    moments[i] = moments[i] * beta1 + g * one_minus_beta1;
    moments[n + i] = moments[n + i] * beta2 + (g * g) * one_minus_beta2;
  }
}

// Adam's step on θ in place: θ ← θ·decay − (m / (√v·inv_bias2 + ε))·step_size.
template <typename S>
__device__ void adam_step(size_t n, S *theta, const S *moments, S decay, S inv_bias2, S eps, S step_size) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)blockDim.x * gridDim.x) {
    S t = theta[i];
    if (decay != S(1)) t = t * decay;
    const S denom = sqrt_(moments[n + i]) * inv_bias2 + eps;
    theta[i] = t - (moments[i] / denom) * step_size;
  }
}

// A half-precision parameter set to its f32 master's rounded value, in place.
template <typename T> __device__ void round_to(size_t n, T *param, const float *master) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)blockDim.x * gridDim.x)
    param[i] = narrow<T>(master[i]);
}

#define ROW_KERNELS(SUFFIX, T)                                                                                       \
  extern "C" __global__ void softmax_bwd_##SUFFIX(const T *y, const T *g, T *dx, int cols, float scale) {           \
    softmax_bwd(y, g, dx, cols, scale);                                                                              \
  }                                                                                                                  \
  extern "C" __global__ void layer_norm_bwd_x_##SUFFIX(const T *x, const T *w, const T *g, T *dx, int cols,         \
                                                       float eps) {                                                  \
    layer_norm_bwd_x(x, w, g, dx, cols, eps);                                                                        \
  }                                                                                                                  \
  extern "C" __global__ void layer_norm_bwd_params_##SUFFIX(const T *x, const T *g, Acc<T>::type *partial, int rows, \
                                                            int cols, int rows_per_block, float eps) {               \
    layer_norm_bwd_params(x, g, partial, rows, cols, rows_per_block, eps);                                           \
  }                                                                                                                  \
  extern "C" __global__ void gelu_bwd_##SUFFIX(size_t n, const T *x, const T *g, T *dx) { gelu_bwd(n, x, g, dx); }

ROW_KERNELS(f32, float)
ROW_KERNELS(bf16, __nv_bfloat16)
ROW_KERNELS(f16, __half)
ROW_KERNELS(f64, double)

#define ADAM_MOMENTS(SUFFIX, S, G)                                                                                   \
  extern "C" __global__ void adam_moments_##SUFFIX(size_t n, S *moments, const G *grad, const S *theta, S beta1,    \
                                                   S one_minus_beta1, S beta2, S one_minus_beta2, S l2) {           \
    adam_moments(n, moments, grad, theta, beta1, one_minus_beta1, beta2, one_minus_beta2, l2);                      \
  }

ADAM_MOMENTS(f32_f32, float, float)
ADAM_MOMENTS(f32_bf16, float, __nv_bfloat16)
ADAM_MOMENTS(f32_f16, float, __half)
ADAM_MOMENTS(f64_f64, double, double)

extern "C" __global__ void adam_step_f32(size_t n, float *theta, const float *moments, float decay, float inv_bias2,
                                         float eps, float step_size) {
  adam_step(n, theta, moments, decay, inv_bias2, eps, step_size);
}
extern "C" __global__ void adam_step_f64(size_t n, double *theta, const double *moments, double decay,
                                         double inv_bias2, double eps, double step_size) {
  adam_step(n, theta, moments, decay, inv_bias2, eps, step_size);
}
extern "C" __global__ void round_to_bf16(size_t n, __nv_bfloat16 *param, const float *master) {
  round_to(n, param, master);
}
extern "C" __global__ void round_to_f16(size_t n, __half *param, const float *master) { round_to(n, param, master); }

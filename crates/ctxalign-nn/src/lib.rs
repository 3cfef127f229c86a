//! Layers for ctxalign that keep gradients.
//!
//! Candle's fused `LayerNorm` kernel and `softmax_last_dim` record no backward op: a model built on
//! them "trains" with the parameters behind those ops silently frozen (the repository's
//! docs/reference-notes.md §6), and the composed forms Candle can differentiate cost a kernel and a
//! kept tensor per elementwise step.
//! [`fused`] gives both ops, and exact GELU, one fused forward (Candle's CUDA kernels on the GPU,
//! vectorised `exp`/`erf` from [`simd`] on the CPU) and an analytic backward, used for inference and
//! training alike; attention's scale and mask are folded into its softmax.
//!
//! Also here: scaled dot-product attention returning its probabilities (the ContextBLIP mask is
//! built from them), the heads' split and merge as one op each, ContextBLIP's multi-scale adapter,
//! and the Adam/AdamW update in place ([`adam`], the arithmetic of `ctxalign-train`'s optimizer).
//! ctxalign's own CUDA kernels (`kernels/ctxalign.cu`, feature `cuda`) are the backward passes and
//! the Adam update.

pub mod adam;
pub mod adapter;
pub mod attention;
#[cfg(feature = "cuda")]
mod cuda_kernels;
pub mod fused;
pub mod gradcheck;
pub mod linear;
pub mod matmul;
pub mod ops;
pub mod precision;
pub mod simd;

pub use adapter::{AdapterAggregation, AdapterConfig, MultiScaleAdapter};
pub use attention::{merge_heads, scaled_dot_product_attention, split_heads, AttentionOutput};
pub use linear::{linear, linear_no_bias, Linear};
pub use ops::{
    dropout, first_token, gelu, l2_normalize, layer_norm, max_pool2d, quick_gelu, scaled_masked_softmax,
    softmax_last_dim, upcast_half, LayerNorm,
};
pub use precision::Precision;
pub mod contrastive;
pub mod losses;
pub use contrastive::{clip_loss, contextual_loss, ClipLoss, ClipLossConfig, ContextualMode, Similarity, Targets};
pub use losses::{identity_targets, itc_loss, itm_loss, sample_hard_negatives, ItcLoss};

/// The README's example, run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

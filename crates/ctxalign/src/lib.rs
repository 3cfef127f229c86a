//! # ctxalign
//!
//! Contextual image–text alignment on [Candle](https://github.com/huggingface/candle), in pure Rust.
//! This crate is the front door: it re-exports the workspace crates and offers [`BlipScorer`], which
//! loads a BLIP image-text matching checkpoint (an HF folder or hub id), preprocesses images and text
//! exactly as the reference does, and scores descriptions against images.
//!
//! ```no_run
//! use ctxalign::{BlipScorer, Device};
//!
//! # fn main() -> Result<(), ctxalign::Error> {
//! let scorer = BlipScorer::from_pretrained("Salesforce/blip-itm-base-coco", &Device::Cpu)?;
//! let images = scorer.encode_image_files(&["a.jpg", "b.jpg"])?;
//! let report = scorer.score("a dog jumps over a red ball", &images)?;
//! println!("best image: {}", report.best);
//! for s in &report.scores {
//!     println!("ITM p(match) {:.3}  ITC cosine {:.3}", s.itm_probability, s.itc_similarity);
//! }
//! # Ok(()) }
//! ```
//!
//! The crates behind it:
//! - [`nn`]: gradient-keeping LayerNorm/softmax/attention and ContextBLIP's multi-scale adapter;
//! - [`models`]: BLIP, CLIP, BERT, ResNet, ContextBLIP and ContextCLIP, and checkpoint loading with
//!   typed errors;
//! - [`data`]: image decoding and Pillow-exact preprocessing, caption cleaning, tokenization;
//! - [`eval`]: retrieval ranking, recall@k, grouped accuracy, tables;
//! - [`device`]: devices, dtypes, precisions and the [`Runtime`] every recipe takes;
//! - [`contextblip`], [`contextclip`]: inference and evaluation of both methods, and their training
//!   recipes; [`ContextBlipPredictor`] and [`contextclip::ClipEncoder`]: one-call predictors that
//!   load from a folder or a hub id; [`index`]: an embedding index for apps.
//!
//! Features:
//! - by default, inference — scoring, evaluation, the index, the pictures — with no training crate
//!   and no command-line, allocator, signal or progress-bar crate;
//! - `hub` (default): models named by hub id, downloaded through hf-hub (which links its own
//!   download bars); without it models load from local folders only;
//! - `train`: the training recipes and the `ctxalign-train` crate (re-exported as `train`);
//! - `progress-bar`: progress bars on a terminal (plain periodic lines without it);
//! - `cuda`, `nccl`: Candle's CUDA kernels, data-parallel training through NCCL;
//! - `dev` (ctxalign's own tests and tools): `fixtures`, the parity runner that checks models
//!   against reference outputs, `steps`, its training-run fixtures, and `reach`, the
//!   every-trainable-tensor-gets-a-gradient check.
//!
//! The library has no process-wide side effects: it installs no signal handler (a run stops when
//! the caller raises [`RunControl`]'s `interrupt`), writes no environment variable and never exits
//! the process. The `ctxalign` command (crate `ctxalign-cli`) does those for itself.

#![warn(missing_docs)]

#[cfg(feature = "train")]
pub mod backbone;
pub mod contextblip;
pub mod contextclip;
pub mod device;
pub mod evaluate;
#[cfg(feature = "dev")]
pub mod fixtures;
pub mod home;
pub mod index;
mod predict;
#[cfg(feature = "dev")]
pub mod reach;
#[cfg(feature = "train")]
mod recipe;
mod scorer;
#[cfg(feature = "dev")]
pub mod steps;
pub mod visualize;

pub use candle_core::{DType, Device, Tensor};
/// The `image` crate ctxalign decodes with: its `DynamicImage` and `RgbImage` are what
/// [`data::ImageInput`] takes.
pub use image;
pub use ctxalign_data as data;
pub use ctxalign_eval as eval;
pub use ctxalign_models as models;
pub use ctxalign_nn as nn;
#[cfg(feature = "train")]
pub use ctxalign_train as train;
pub use device::{DeviceSpec, Precision, Runtime};
#[cfg(feature = "train")]
pub use recipe::{caption_items_fingerprint, CaptionSource, RunControl, RunOutcome, ShardSource};
pub use predict::{ContextBlipPredictor, ModelSummary, Pick};
pub use scorer::{AdapterSource, BlipScorer, PairScore, ScoreReport, ScorerOptions};

/// The default model: the small BLIP that ctxalign trains itself (`cargo xtask
/// train-default-backbone`) and ships in this workspace's `models/` (and inside the `ctxalign`
/// binary) — HF layout, loaded like any hub checkpoint. It knows only the built-in Vignettes world;
/// for real images pass a real BLIP.
pub use home::default_model_dir;

/// The README's Rust examples, compiled and run as this crate's doctests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;

/// What apps share across threads is `Send + Sync`: a model loaded once serves every thread
/// (checked when the crate compiles).
const _: () = {
    const fn shared<T: Send + Sync + ?Sized>() {}
    shared::<BlipScorer>();
    shared::<ContextBlipPredictor>();
    shared::<contextclip::ClassifierHead>();
    shared::<index::EmbeddingIndex>();
    shared::<contextclip::ClipEncoder>();
    shared::<contextclip::HfClip>();
    shared::<dyn contextclip::JointEmbedder>();
    shared::<models::blip::BlipItm>();
    shared::<models::blip::ImageStates>();
    shared::<models::contextblip::ContextBlip>();
    shared::<models::contextclip::ContextClip>();
};

/// Any failure of the high-level API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    /// A model or artifact folder that could not be loaded (names the file and key).
    Load(#[from] models::LoadError),
    #[error(transparent)]
    /// An image that could not be read or decoded (names the input).
    Image(#[from] data::ImageError),
    #[error(transparent)]
    /// A tokenizer that could not be loaded or does not fit the model.
    Text(#[from] data::TextError),
    #[error(transparent)]
    /// A data file or folder in the wrong format (names the file and line, key or set).
    Data(#[from] data::DataError),
    #[error(transparent)]
    /// A tensor operation Candle refused (a shape, a dtype, a device error).
    Tensor(#[from] candle_core::Error),
    /// Scores or rankings an evaluation protocol refused (mismatched counts, NaN, nothing to rank).
    #[error(transparent)]
    Eval(#[from] eval::EvalError),
    #[cfg(feature = "train")]
    #[error(transparent)]
    /// A training run that failed (its checkpoint state is described in the error).
    Train(#[from] train::TrainError),
    /// A score or embedding that is NaN or infinite (weights or activations overflowed the dtype):
    /// nothing is ranked from it.
    #[error("non-finite {what} (NaN or ±inf): nothing was ranked; the weights or the inputs overflow the dtype in use (try f32)")]
    NonFinite {
        /// What was not finite ("ITM logits", "image embeddings", …).
        what: String,
    },
    /// A device that cannot be used: CUDA in a build without the `cuda` feature, or one the driver
    /// refuses.
    #[error("device {device}: {reason}")]
    Device {
        /// The device as asked for (`cuda:1`).
        device: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// A file or folder that could not be read, written, created or listed.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: std::path::PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A file whose content is not what it must be (a model folder's settings, an index), and why.
    #[error("{path}: {message}")]
    Format {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// An argument or option out of its range, or inconsistent with another.
    #[error("{0}")]
    Invalid(String),
    /// A saved artifact made by another model than the one given (an embedding index whose vectors
    /// live in another model's space).
    #[error(
        "{path}: made by model {}, not by the model given ({given}): rebuild it with this model",
        recorded.as_deref().unwrap_or("(not recorded)")
    )]
    ModelMismatch {
        /// The artifact's folder.
        path: std::path::PathBuf,
        /// The fingerprint it records, if any.
        recorded: Option<String>,
        /// The fingerprint of the model it was loaded for.
        given: String,
    },
}

impl Error {
    /// `map_err(Error::io(path))` for a failed file operation on `path`.
    pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| Self::Io { path: path.to_owned(), source }
    }

    pub(crate) fn format(path: &std::path::Path, message: impl Into<String>) -> Self {
        Self::Format { path: path.to_owned(), message: message.into() }
    }
}

/// ctxalign's result: [`Error`] unless said otherwise.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// FNV-1a, fed in pieces: a stable fingerprint of settings, file lists and pixels (not a security
/// hash).
pub(crate) struct Fingerprint(u64);

impl Fingerprint {
    pub(crate) fn new() -> Self {
        Self(0xcbf29ce484222325)
    }

    pub(crate) fn update(&mut self, bytes: &[u8]) {
        self.0 = bytes.iter().fold(self.0, |h, &b| (h ^ b as u64).wrapping_mul(0x100000001b3));
    }

    pub(crate) fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

/// [`Fingerprint`] of `text`, hex.
pub(crate) fn fingerprint(text: &str) -> String {
    let mut f = Fingerprint::new();
    f.update(text.as_bytes());
    f.hex()
}

/// `Err(Error::NonFinite)` naming `what` unless every value is finite.
pub(crate) fn ensure_finite(values: &[f32], what: &str) -> Result<()> {
    match values.iter().all(|v| v.is_finite()) {
        true => Ok(()),
        false => Err(Error::NonFinite { what: what.into() }),
    }
}

/// As [`ensure_finite`] for a tensor (checked on its device).
pub(crate) fn ensure_finite_tensor(t: &Tensor, what: &str) -> Result<()> {
    match models::loading::all_finite(t)? {
        true => Ok(()),
        false => Err(Error::NonFinite { what: what.into() }),
    }
}

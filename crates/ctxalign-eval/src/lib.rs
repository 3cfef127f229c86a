//! Evaluation for ctxalign: BLIP's two-stage retrieval ranking, recall@k and rank statistics (one
//! [`RetrievalReport`] for every retrieval protocol), grouped accuracy (counted once, in
//! [`accuracy::count_by_group`]), IMAGECODE's zero-shot protocol ([`imagecode`]), CLIP's zero-shot
//! classification protocol (templates, metrics, CLIP_benchmark records), the logistic-regression
//! linear probe, and plain-text result tables.

pub mod accuracy;
pub mod error;
pub mod imagecode;
pub mod linear_probe;
pub mod plot;
pub mod progress;
pub mod ranking;
pub mod table;
pub mod zeroshot;

pub use accuracy::{count_by_group, GroupCounts};
pub use error::EvalError;
pub use linear_probe::{linear_probe, LogisticRegression, ProbeReport};
pub use ranking::{argmax, rerank_top_k, top_k, RankedCandidate, RerankedRetrieval, RetrievalMetrics, RetrievalReport};
pub use table::Table;
pub use zeroshot::{BenchmarkRecord, ClassificationMetrics};

/// The README's example, run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

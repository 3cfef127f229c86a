//! Evaluation for ctxalign: BLIP's two-stage retrieval ranking, recall@k and rank statistics,
//! grouped accuracy, CLIP's zero-shot classification protocol (templates, metrics, CLIP_benchmark
//! records), the logistic-regression linear probe, and plain-text result tables.

pub mod accuracy;
pub mod linear_probe;
pub mod plot;
pub mod progress;
pub mod ranking;
pub mod table;
pub mod zeroshot;

pub use accuracy::GroupCounts;
pub use linear_probe::{linear_probe, LogisticRegression, ProbeReport};
pub use ranking::{rerank_top_k, retrieval_from_similarity, top_k, RankedCandidate, RetrievalMetrics};
pub use table::Table;
pub use zeroshot::{BenchmarkRecord, ClassificationMetrics};

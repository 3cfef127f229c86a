//! Evaluation for ctxalign: BLIP's two-stage retrieval ranking, recall@k and rank statistics,
//! grouped accuracy, and plain-text result tables.

pub mod ranking;
pub mod table;

pub use ranking::{rerank_top_k, top_k, GroupedAccuracy, RankedCandidate, RetrievalMetrics};
pub use table::Table;

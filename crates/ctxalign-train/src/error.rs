//! The typed error of training runs.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The NaN/Inf guard: training stops at the first non-finite loss term or gradient norm, naming
    /// it, before the optimizer touches the weights (the last checkpoint stays good).
    #[error("step {step}: {term} is {value} (not finite); stopped before the update — last checkpoint is intact")]
    NonFinite { step: u64, term: String, value: f64 },
    #[error("{path}: checkpoint problem: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("invalid training setting: {0}")]
    Config(String),
    #[error(transparent)]
    Load(#[from] ctxalign_models::LoadError),
    #[error(transparent)]
    Data(#[from] ctxalign_data::DataError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl TrainError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io { path: path.to_owned(), source }
    }
    pub(crate) fn checkpoint(path: &std::path::Path, message: impl Into<String>) -> Self {
        Self::Checkpoint { path: path.to_owned(), message: message.into() }
    }
}

pub type Result<T> = std::result::Result<T, TrainError>;

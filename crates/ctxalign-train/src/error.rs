//! The typed error of training runs.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The NaN/Inf guard: training stops at the first non-finite loss term or gradient norm, naming
    /// it, before the optimizer touches the weights (the last checkpoint stays good).
    #[error(
        "step {step}: {term} is {value} (not finite); stopped before the update — {}",
        checkpoint_note(last_checkpoint)
    )]
    NonFinite { step: u64, term: String, value: f64, last_checkpoint: Option<PathBuf> },
    /// A sample failed to load mid-run (a missing or corrupt image). The steps done so far are
    /// saved first, so fixing the data and resuming loses nothing.
    #[error("step {step}: {source}; {}", checkpoint_note(checkpoint))]
    DataDuringTraining { step: u64, checkpoint: Option<PathBuf>, source: Box<ctxalign_data::DataError> },
    #[error("{path}: checkpoint problem: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("invalid training setting: {0}")]
    Config(String),
    /// A fresh run (no resume) into a folder that holds another run's checkpoints: they would be
    /// taken for this run's on the next resume.
    #[error(
        "{dir} holds the checkpoints of an earlier run (latest: step {latest_step}); resume it, or \
         start over with the overwrite option (which deletes them)"
    )]
    UsedFolder { dir: PathBuf, latest_step: u64 },
    /// Resuming with settings other than the checkpoint's run: the data position and the record
    /// would no longer describe one run.
    #[error(
        "{checkpoint}: this run's settings differ from the checkpoint's run: {}; resume with the same \
         settings, or accept the change explicitly (it is then recorded)",
        differences.join("; ")
    )]
    SettingsChanged { checkpoint: PathBuf, differences: Vec<String> },
    /// Between the ranks of a data-parallel run (a rank that stopped, a timeout, a disagreement).
    #[error(transparent)]
    Distributed(#[from] crate::dist::DistError),
    #[error(transparent)]
    Load(#[from] ctxalign_models::LoadError),
    #[error(transparent)]
    Data(#[from] ctxalign_data::DataError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

fn checkpoint_note(checkpoint: &Option<PathBuf>) -> String {
    match checkpoint {
        Some(path) => format!("the last checkpoint, {}, is intact", path.display()),
        None => "no checkpoint had been written yet".into(),
    }
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

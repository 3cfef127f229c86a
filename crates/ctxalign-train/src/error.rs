//! The typed error of training runs.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The NaN/Inf guard: training stops at the first non-finite loss term or gradient norm, naming
    /// it, before the optimizer touches the weights. `step` is the 1-based number of the step that
    /// failed, as `metrics.jsonl` and checkpoint names count (step N's record follows its update):
    /// `step - 1` steps were done. No checkpoint is written: weights that led to a non-finite loss
    /// (an absurd learning rate's first update, say) are suspect, so the last checkpoint stays the
    /// newest.
    #[error(
        "step {step}: {term} is {value} (not finite); stopped before its update, {} step(s) done — {}",
        step.saturating_sub(1),
        checkpoint_note(last_checkpoint)
    )]
    NonFinite { step: u64, term: String, value: f64, last_checkpoint: Option<PathBuf> },
    /// A sample failed to load mid-run (a missing or corrupt image). The steps done so far (`step`)
    /// are saved first, so fixing the data and resuming loses nothing; the failure was in step
    /// `step + 1`.
    #[error("step {}: {source}; {}", step + 1, checkpoint_note(checkpoint))]
    DataDuringTraining { step: u64, checkpoint: Option<PathBuf>, source: Box<ctxalign_data::DataError> },
    /// Training failed mid-run for any other reason (a device or tensor error, an objective that
    /// failed or panicked, a failed write, another rank that stopped). The `step` steps done were
    /// checkpointed first wherever the weights were consistent — that is, unless the failure came
    /// during the optimizer's update (`not_saved` says why not).
    #[error("step {}: {source}; {}", step + 1, failure_note(checkpoint, not_saved))]
    StoppedMidRun { step: u64, checkpoint: Option<PathBuf>, not_saved: Option<String>, source: Box<TrainError> },
    /// `--resume` into a folder that does not exist (a typo, most often): nothing would be resumed
    /// and a fresh run would start in a new folder without a word.
    #[error(
        "{dir}: no such folder, so there is no run to resume; check the path (without resume, a fresh run \
         starts there)"
    )]
    NothingToResume { dir: PathBuf },
    /// A resumed run asked for fewer steps (or epochs) in all than its checkpoint has done: it would
    /// train nothing and report the old run as this one.
    #[error(
        "{checkpoint}: the run is at step {done}, this run asks for {asked} steps in all; ask for more to \
         continue it, or start over with the overwrite option"
    )]
    AlreadyPast { checkpoint: PathBuf, done: u64, asked: u64 },
    /// An objective that panicked (a bug, or an input it did not expect), turned into an error so
    /// that the steps done are checkpointed before the run stops.
    #[error("the objective panicked: {0}")]
    Panicked(String),
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

fn failure_note(checkpoint: &Option<PathBuf>, not_saved: &Option<String>) -> String {
    match (checkpoint, not_saved) {
        (checkpoint, Some(why)) => {
            format!("no checkpoint of this step was written ({why}); {}", checkpoint_note(checkpoint))
        }
        (Some(path), None) => format!("the steps done are saved in {}; fix the cause and resume", path.display()),
        (None, None) => "no step had been done, so there was nothing to save".into(),
    }
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

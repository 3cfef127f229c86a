//! Why an evaluation refused its input: a metric computed from mismatched, empty or non-finite
//! scores would be a number that reads as measured, so the protocols check and say what is wrong.

/// Input an evaluation protocol cannot turn into a sound number.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EvalError {
    /// Two inputs that must pair up one to one do not (scores and descriptions, rankings and
    /// queries, a set's scores and its descriptions).
    #[error("{what}: {found} given for {expected}")]
    Length { what: String, expected: usize, found: usize },
    /// A score that is NaN or ±inf: nothing is ranked or chosen from it.
    #[error("{what}: score {value} of candidate {candidate} is not finite (NaN or ±inf); nothing was ranked")]
    NonFinite { what: String, candidate: usize, value: f32 },
    /// A query with no candidate to choose among, or no positive to find.
    #[error("{what}: {message}")]
    Empty { what: String, message: String },
    /// An index (a target, an owner, a prediction) outside the candidates it refers to.
    #[error("{what}: index {index} is outside the {candidates} candidates")]
    OutOfRange { what: String, index: usize, candidates: usize },
    /// A cut-off `k` of 0: recall@0 is 0 for every model.
    #[error("recall@k needs k ≥ 1 (k = 0 counts nothing)")]
    ZeroK,
}

impl EvalError {
    pub(crate) fn length(what: impl Into<String>, expected: usize, found: usize) -> Self {
        Self::Length { what: what.into(), expected, found }
    }

    pub(crate) fn empty(what: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Empty { what: what.into(), message: message.into() }
    }

    pub(crate) fn out_of_range(what: impl Into<String>, index: usize, candidates: usize) -> Self {
        Self::OutOfRange { what: what.into(), index, candidates }
    }
}

/// `Err(NonFinite)` at the first score that is NaN or ±inf; `what` names the scores in the error.
pub(crate) fn check_finite(scores: &[f32], what: impl FnOnce() -> String) -> Result<(), EvalError> {
    match scores.iter().position(|s| !s.is_finite()) {
        None => Ok(()),
        Some(candidate) => Err(EvalError::NonFinite { what: what(), candidate, value: scores[candidate] }),
    }
}

//! Ctrl-C handling: the first Ctrl-C asks the training loop to write a checkpoint and stop after the
//! current step; a second one exits at once (status 130).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use crate::error::{Result, TrainError};

/// The exit status of a command whose run was interrupted (after saving its checkpoint), as a
/// shell reports SIGINT: non-zero, so `pretrain && zero-shot` does not go on with a half-trained
/// model.
pub const INTERRUPTED_EXIT_CODE: i32 = 130;

static PROCESS_FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// A stop request shared between a signal handler (or the embedding app) and the training loop.
#[derive(Debug, Clone, Default)]
pub struct Interrupt(Arc<AtomicBool>);

impl Interrupt {
    /// A flag only the program itself can raise (for embedding apps and tests).
    pub fn manual() -> Self {
        Self::default()
    }

    /// The process-wide Ctrl-C flag; installs the handler on first use.
    pub fn ctrl_c() -> Result<Self> {
        if let Some(flag) = PROCESS_FLAG.get() {
            return Ok(Self(flag.clone()));
        }
        let flag = Arc::new(AtomicBool::new(false));
        let handler_flag = flag.clone();
        ctrlc::set_handler(move || {
            if handler_flag.swap(true, Ordering::SeqCst) {
                eprintln!("\nsecond interrupt: exiting without a checkpoint");
                std::process::exit(130);
            }
            eprintln!("\ninterrupt: writing a checkpoint after this step (Ctrl-C again to quit at once)");
        })
        .map_err(|e| TrainError::Config(format!("cannot install the Ctrl-C handler: {e}")))?;
        let _ = PROCESS_FLAG.set(flag.clone());
        Ok(Self(PROCESS_FLAG.get().cloned().unwrap_or(flag)))
    }

    pub fn request(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn requested(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

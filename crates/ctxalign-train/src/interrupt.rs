//! Ctrl-C handling: during a training loop the first Ctrl-C asks it to write a checkpoint and stop
//! after the current step, and a second one exits at once (status 130); outside a loop Ctrl-C exits
//! at once (status 130).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use crate::error::{Result, TrainError};

/// The exit status of a command whose run was interrupted (after saving its checkpoint), as a
/// shell reports SIGINT: non-zero, so `pretrain && zero-shot` does not go on with a half-trained
/// model.
pub const INTERRUPTED_EXIT_CODE: i32 = 130;

static PROCESS_FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// How many training loops are running: only while one is does Ctrl-C ask for a checkpoint. At any
/// other time (loading, evaluating after training) it ends the process at once with status 130, as
/// it would without the handler.
static LOOPS_RUNNING: AtomicUsize = AtomicUsize::new(0);

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
        // One installer at a time: the ranks of a data-parallel run are threads that all get here at
        // once, and a second `set_handler` fails ("already registered").
        static INSTALLING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _installing = INSTALLING.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(flag) = PROCESS_FLAG.get() {
            return Ok(Self(flag.clone()));
        }
        let flag = Arc::new(AtomicBool::new(false));
        let handler_flag = flag.clone();
        ctrlc::set_handler(move || {
            if LOOPS_RUNNING.load(Ordering::SeqCst) == 0 {
                eprintln!("\ninterrupted");
                std::process::exit(INTERRUPTED_EXIT_CODE);
            }
            if handler_flag.swap(true, Ordering::SeqCst) {
                eprintln!("\nsecond interrupt: exiting without a checkpoint");
                std::process::exit(INTERRUPTED_EXIT_CODE);
            }
            eprintln!("\ninterrupt: writing a checkpoint after this step (Ctrl-C again to quit at once)");
        })
        .map_err(|e| TrainError::Config(format!("cannot install the Ctrl-C handler: {e}")))?;
        let _ = PROCESS_FLAG.set(flag.clone());
        Ok(Self(PROCESS_FLAG.get().cloned().unwrap_or(flag)))
    }

    /// Marks a training loop as running until the guard drops, which also clears the request: one
    /// run's interrupt, once handled, does not stop the next run in the same process.
    pub(crate) fn loop_running(&self) -> LoopGuard<'_> {
        LOOPS_RUNNING.fetch_add(1, Ordering::SeqCst);
        LoopGuard(self)
    }

    pub fn request(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn requested(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// See [`Interrupt::loop_running`].
pub(crate) struct LoopGuard<'a>(&'a Interrupt);

impl Drop for LoopGuard<'_> {
    fn drop(&mut self) {
        LOOPS_RUNNING.fetch_sub(1, Ordering::SeqCst);
        self.0 .0.store(false, Ordering::SeqCst);
    }
}

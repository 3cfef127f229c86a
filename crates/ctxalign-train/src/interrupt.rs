//! A stop request for a training loop, raised by whoever owns the process: a command's Ctrl-C
//! handler, an app's own shutdown path, a test. The library installs no signal handler and never
//! exits the process; the loop that sees the request writes a checkpoint after the current step
//! and returns with `interrupted` set.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// A stop request shared between its raiser and the training loops it is passed to. Clones share
/// the same flag.
///
/// ```
/// use ctxalign_train::Interrupt;
///
/// let interrupt = Interrupt::new();
/// let handle = interrupt.clone(); // give this one to a signal handler or a shutdown hook
/// assert!(!interrupt.requested() && !interrupt.in_loop());
/// handle.request();
/// assert!(interrupt.requested());
/// ```
#[derive(Debug, Clone, Default)]
pub struct Interrupt(Arc<State>);

#[derive(Debug, Default)]
struct State {
    requested: AtomicBool,
    /// Loops running with this flag: a handler asks [`Interrupt::in_loop`] whether a request will
    /// be seen (a checkpoint follows) or whether to stop the program some other way.
    loops_running: AtomicUsize,
}

impl Interrupt {
    /// A flag nobody has raised yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks every loop running with this flag to checkpoint and stop after its current step.
    pub fn request(&self) {
        self.0.requested.store(true, Ordering::SeqCst);
    }

    /// Whether a stop was requested (and not yet handled by a loop).
    pub fn requested(&self) -> bool {
        self.0.requested.load(Ordering::SeqCst)
    }

    /// Whether a training loop is running with this flag now, so that a request will be handled.
    pub fn in_loop(&self) -> bool {
        self.0.loops_running.load(Ordering::SeqCst) > 0
    }

    /// Marks a training loop as running until the guard drops, which also clears the request: one
    /// run's interrupt, once handled, does not stop the next run.
    pub(crate) fn loop_running(&self) -> LoopGuard<'_> {
        self.0.loops_running.fetch_add(1, Ordering::SeqCst);
        LoopGuard(self)
    }
}

/// See [`Interrupt::loop_running`].
pub(crate) struct LoopGuard<'a>(&'a Interrupt);

impl Drop for LoopGuard<'_> {
    fn drop(&mut self) {
        self.0 .0.loops_running.fetch_sub(1, Ordering::SeqCst);
        self.0 .0.requested.store(false, Ordering::SeqCst);
    }
}

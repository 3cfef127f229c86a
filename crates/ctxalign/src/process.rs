//! The process-wide settings ctxalign's programs make once, at the start of `main`, before any
//! thread is spawned: [`configure`].
//!
//! In a binary:
//! ```no_run
//! #[global_allocator]
//! static GLOBAL: ctxalign::alloc::MiMalloc = ctxalign::alloc::MiMalloc;
//!
//! fn main() {
//!     ctxalign::process::configure();
//!     // ...
//! }
//! ```

/// The environment variable Candle reads, once, when its CPU worker pool starts.
pub const CANDLE_SPIN_LIMIT_VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";

/// Everything below: the allocator keeps freed memory ([`crate::alloc::retain_freed_memory`]) and
/// Candle's idle CPU workers sleep at once ([`park_idle_candle_workers`]).
pub fn configure() {
    crate::alloc::retain_freed_memory();
    park_idle_candle_workers();
}

/// Makes Candle's idle CPU workers sleep as soon as they run out of work, unless the user set
/// [`CANDLE_SPIN_LIMIT_VAR`] themselves (their value is kept).
///
/// Why: Candle 0.11 runs elementwise ops of 64 Ki elements or more on a pool of its own
/// (threads − 1 workers), whose workers spin for 25,000 iterations after each op before they
/// sleep; the matrix products run on rayon's pool, with all the threads. Between two elementwise
/// ops there is nearly always a product, so the spinning workers take cores from it: on 2 cores,
/// a ContextCLIP training step spent 23 % of its time in them, and sleeping at once took the step
/// from 132 to 195 samples/s and ITM inference from 0.290 to 0.305 sets/s (BENCHMARKS.md,
/// 2026-11-27, fourth). Waking a sleeping worker costs a few microseconds per op.
///
/// Call it before any thread is spawned (it sets an environment variable, which is not safe to
/// do while other threads read the environment) and before the first Candle op.
pub fn park_idle_candle_workers() {
    if std::env::var_os(CANDLE_SPIN_LIMIT_VAR).is_none() {
        std::env::set_var(CANDLE_SPIN_LIMIT_VAR, "0");
    }
}

//! The process-wide settings ctxalign's programs make once, at the start of `main`, before any
//! thread is spawned: [`configure`].
//!
//! In a binary:
//! ```no_run
//! #[global_allocator]
//! static GLOBAL: ctxalign_cli::alloc::MiMalloc = ctxalign_cli::alloc::MiMalloc;
//!
//! fn main() {
//!     ctxalign_cli::process::configure();
//!     // ...
//! }
//! ```

/// The environment variable Candle reads, once, when its CPU worker pool starts.
pub const CANDLE_SPIN_LIMIT_VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
/// The thread count rayon's pool and Candle's CPU kernels use.
pub const THREADS_VAR: &str = "RAYON_NUM_THREADS";

/// Everything below: the allocator keeps freed memory ([`crate::alloc::retain_freed_memory`]),
/// the thread count is counted once ([`count_threads_once`]) and Candle's idle CPU workers sleep
/// at once ([`park_idle_candle_workers`]).
pub fn configure() {
    crate::alloc::retain_freed_memory();
    count_threads_once();
    park_idle_candle_workers();
}

/// Sets [`THREADS_VAR`] to the thread count Candle chooses (the physical cores), unless the user
/// set it (their value is kept).
///
/// Why: Candle 0.11 asks for its thread count in every CPU matrix product, and without this
/// variable it counts the physical cores by parsing `/proc/cpuinfo`, every time: on the 2-core
/// development machine 2–3 % of a ContextCLIP training step went to reading the file and to the
/// kernel writing it, and on a many-core server the file is a hundred times longer. With the
/// variable set, Candle reads it instead, and rayon's pool (ctxalign's own parallel ops) gets the
/// same count: the physical cores, where rayon alone would take the logical ones.
///
/// Call it before any thread is spawned, as [`park_idle_candle_workers`].
pub fn count_threads_once() {
    default_env(THREADS_VAR, || candle_core::utils::get_num_threads().to_string());
}

/// Makes Candle's idle CPU workers sleep as soon as they run out of work, unless the user set
/// [`CANDLE_SPIN_LIMIT_VAR`] themselves (their value is kept).
///
/// Why: Candle 0.11 runs elementwise ops of 64 Ki elements or more on a pool of its own
/// (threads − 1 workers), whose workers spin for 25,000 iterations after each op before they
/// sleep; the matrix products run on rayon's pool, with all the threads. Between two elementwise
/// ops there is nearly always a product, so the spinning workers take cores from it: on 2 cores,
/// 23 % of a ContextCLIP training step's CPU time went to them; sleeping at once made the step
/// 10–30 % faster and ITM inference 5 % (BENCHMARKS.md, 2026-11-27, fourth). Waking a sleeping
/// worker costs a few microseconds per op.
///
/// Call it before any thread is spawned (it sets an environment variable, which is not safe to
/// do while other threads read the environment) and before the first Candle op.
pub fn park_idle_candle_workers() {
    default_env(CANDLE_SPIN_LIMIT_VAR, || "0".to_string());
}

/// Sets `var` to `value()` unless the environment already has it (the user's value is kept).
fn default_env(var: &str, value: impl FnOnce() -> String) {
    if std::env::var_os(var).is_none() {
        std::env::set_var(var, value());
    }
}

//! The allocator ctxalign's programs use.
//!
//! Every tensor op allocates a fresh output buffer. glibc's malloc returns large blocks to the
//! kernel, and mimalloc by default purges freed memory after 10 ms; either way the next allocation
//! page-faults and the kernel zeroes the pages again. Measured on a BLIP-base forward (10 images,
//! 2 cores): 40–50 % of the time was `clear_page`. mimalloc with purging disabled reuses the memory.
//!
//! In a binary:
//! ```no_run
//! #[global_allocator]
//! static GLOBAL: ctxalign_cli::alloc::MiMalloc = ctxalign_cli::alloc::MiMalloc;
//!
//! fn main() {
//!     // The allocator's setting and the others ctxalign's programs make (`process`).
//!     ctxalign_cli::process::configure();
//!     // ...
//! }
//! ```

pub use mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc 2.x and 3.x (`include/mimalloc.h`); the Rust bindings do not
/// name it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Tells mimalloc to keep freed memory for reuse instead of handing it back to the OS. Call it at
/// the start of `main` in programs that use [`MiMalloc`] as their global allocator; peak memory is
/// unchanged, only its release is deferred to exit.
pub fn retain_freed_memory() {
    // SAFETY: setting an option is thread-safe in mimalloc and takes plain integers.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

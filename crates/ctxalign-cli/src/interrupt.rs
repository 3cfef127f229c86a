//! The command's Ctrl-C handling: during a training loop the first Ctrl-C asks it to write a
//! checkpoint and stop after the current step, and a second one exits at once; outside a loop
//! Ctrl-C exits at once. Both exits have status [`INTERRUPTED_EXIT_CODE`].
//!
//! The library installs no handler: the command owns the process, so it installs one here and
//! passes its flag to every recipe through `RunControl::interrupt`.

use std::sync::{Mutex, OnceLock};

use ctxalign::train::Interrupt;

/// The exit status of a command whose run was interrupted (after saving its checkpoint), as a
/// shell reports SIGINT: non-zero, so `pretrain && zero-shot` does not go on with a half-trained
/// model.
pub const INTERRUPTED_EXIT_CODE: i32 = 130;

static PROCESS_FLAG: OnceLock<Interrupt> = OnceLock::new();

/// The process's Ctrl-C flag; installs the handler on first use.
pub fn ctrl_c() -> anyhow::Result<Interrupt> {
    // One installer at a time: the ranks of a data-parallel run are threads that all get here at
    // once, and a second `set_handler` fails ("already registered").
    static INSTALLING: Mutex<()> = Mutex::new(());
    let _installing = INSTALLING.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(flag) = PROCESS_FLAG.get() {
        return Ok(flag.clone());
    }
    let flag = Interrupt::new();
    let handler_flag = flag.clone();
    ctrlc::set_handler(move || {
        if !handler_flag.in_loop() {
            eprintln!("\ninterrupted");
            std::process::exit(INTERRUPTED_EXIT_CODE);
        }
        if handler_flag.requested() {
            eprintln!("\nsecond interrupt: exiting without a checkpoint");
            std::process::exit(INTERRUPTED_EXIT_CODE);
        }
        handler_flag.request();
        eprintln!("\ninterrupt: writing a checkpoint after this step (Ctrl-C again to quit at once)");
    })
    .map_err(|e| anyhow::anyhow!("cannot install the Ctrl-C handler: {e}"))?;
    Ok(PROCESS_FLAG.get_or_init(|| flag).clone())
}

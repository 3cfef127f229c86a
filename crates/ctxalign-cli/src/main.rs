//! `ctxalign`: every user job as a subcommand (the jobs themselves are `ctxalign_cli`).

use std::process::ExitCode;

use clap::Parser;
use ctxalign::home::{EmbeddedFolder, DEFAULT_MODEL_NAME, DEFAULT_TOKENIZER_NAME};

/// See `ctxalign_cli::alloc`: reusing freed memory avoids re-zeroing pages on every tensor op.
#[global_allocator]
static GLOBAL: ctxalign_cli::alloc::MiMalloc = ctxalign_cli::alloc::MiMalloc;

/// A file of the `models/` folder that `build.rs` found (`CTXALIGN_CLI_MODELS`), as bytes.
macro_rules! shipped {
    ($file:literal) => {
        include_bytes!(concat!(env!("CTXALIGN_CLI_MODELS"), "/", $file))
    };
}

/// The default model and tokenizer travel inside the binary, so an installed `ctxalign` has them
/// wherever it runs; each is written to `$CTXALIGN_HOME/models/` the first time it is needed outside
/// the source checkout (`ctxalign::home`). `CTXALIGN_CLI_MODELS` is the `models/` folder that
/// `build.rs` found: the crate's own `models` (a link to the repository's, so that the published
/// crate carries the model and builds on its own), else the repository's.
static DEFAULT_MODEL: EmbeddedFolder = EmbeddedFolder {
    name: DEFAULT_MODEL_NAME,
    files: &[
        ("config.json", shipped!("blip-vignettes-small/config.json")),
        ("model.safetensors", shipped!("blip-vignettes-small/model.safetensors")),
        ("tokenizer.json", shipped!("blip-vignettes-small/tokenizer.json")),
        ("preprocessor_config.json", shipped!("blip-vignettes-small/preprocessor_config.json")),
    ],
};

static DEFAULT_TOKENIZER: EmbeddedFolder = EmbeddedFolder {
    name: DEFAULT_TOKENIZER_NAME,
    files: &[("tokenizer.json", shipped!("bert-base-uncased-tokenizer/tokenizer.json"))],
};

static SHIPPED: [&EmbeddedFolder; 2] = [&DEFAULT_MODEL, &DEFAULT_TOKENIZER];

#[derive(Parser)]
#[command(
    name = "ctxalign",
    version,
    about = "Contextual image-text alignment: BLIP ITM/ITC scoring, ContextBLIP (S0 pre-training, S1/S2 \
             fine-tuning, zero-shot IMAGECODE) and ContextCLIP (training, classification, retrieval)",
    after_help = "Data, runs and results default to $CTXALIGN_HOME (else the user cache folder, e.g. ~/.cache/ctxalign)."
)]
struct Cli {
    #[command(subcommand)]
    command: ctxalign_cli::Command,
}

fn main() -> ExitCode {
    ctxalign_cli::process::configure();
    ctxalign::home::register_embedded(&SHIPPED);
    match ctxalign_cli::run(Cli::parse().command) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

//! Finds the shipped `models/` folder that `src/main.rs` embeds, and hands its path to the
//! compiler as `CTXALIGN_CLI_MODELS`.
//!
//! The folder lives at the repository root (`models/`, read by the checkout's own builds and
//! tests). `crates/ctxalign-cli/models` is a link to it so that `cargo package`, which keeps only
//! files under the crate's folder but follows links, puts the model into the published crate; there
//! it is a real folder. A checkout made without symbolic links (Git for Windows with
//! `core.symlinks=false` writes the link as a small text file) has no folder there, so the build
//! falls back to the repository's `models/`.

use std::path::{Path, PathBuf};

/// One file of each embedded folder: the folder that has both is complete enough to embed from
/// (`include_bytes!` names every file and fails on a missing one with its path).
const PROBES: [&str; 2] = ["blip-vignettes-small/model.safetensors", "bert-base-uncased-tokenizer/tokenizer.json"];

fn main() {
    let crate_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let candidates = [crate_dir.join("models"), crate_dir.join("..").join("..").join("models")];
    for dir in &candidates {
        // Re-run when the link or the folder appears, disappears or changes.
        println!("cargo:rerun-if-changed={}", dir.display());
    }
    println!("cargo:rerun-if-changed=build.rs");
    let complete = |dir: &Path| PROBES.iter().all(|f| dir.join(f).is_file());
    let Some(found) = candidates.iter().find(|d| complete(d)) else {
        panic!(
            "ctxalign-cli embeds the default model, but neither {} nor {} holds {}: restore the \
             repository's models/ folder (git checkout -- models)",
            candidates[0].display(),
            candidates[1].display(),
            PROBES.join(" and ")
        );
    };
    println!("cargo:rustc-env=CTXALIGN_CLI_MODELS={}", found.display());
}

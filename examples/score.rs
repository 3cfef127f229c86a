//! Score a description against images with the library API.
//!
//! `cargo run --release --example score -- <model dir | hub id> "<description>" a.jpg b.jpg ... [--device cuda --dtype bf16]`

use clap::Parser;
use ctxalign_cli::runtime_args::InferenceArgs;
use ctxalign::{BlipScorer, ScorerOptions};

/// See `ctxalign_cli::alloc`: reusing freed memory avoids re-zeroing pages on every tensor op.
#[global_allocator]
static GLOBAL: ctxalign_cli::alloc::MiMalloc = ctxalign_cli::alloc::MiMalloc;

#[derive(Parser)]
#[command(about = "Score one description against images with a BLIP ITM model")]
struct Args {
    /// Model folder (HF layout) or hub id.
    model: String,
    /// The description.
    text: String,
    /// Image files.
    #[arg(required = true)]
    images: Vec<String>,
    #[command(flatten)]
    runtime: InferenceArgs,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    ctxalign_cli::process::configure();
    let a = Args::parse();
    let files = ctxalign::models::ModelSource::parse(&a.model).resolve()?;
    let options = ScorerOptions { dtype: a.runtime.dtype, ..Default::default() };
    let scorer = BlipScorer::from_files(&files, options, &a.runtime.open()?)?;
    let encoded = scorer.encode_image_files(&a.images)?;
    let report = scorer.score(&a.text, &encoded)?;
    for (path, s) in a.images.iter().zip(&report.scores) {
        println!("{path}: p(match) {:.4}, ITC {:.4}", s.itm_probability, s.itc_similarity);
    }
    println!("best: {}", a.images[report.best]);
    Ok(())
}

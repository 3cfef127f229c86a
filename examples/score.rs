//! Score a description against images with the library API.
//!
//! `cargo run --release --example score -- <model dir | hub id> "<description>" a.jpg b.jpg ...`

use ctxalign::{BlipScorer, Device};

/// See `ctxalign::alloc`: reusing freed memory avoids re-zeroing pages on every tensor op.
#[global_allocator]
static GLOBAL: ctxalign::alloc::MiMalloc = ctxalign::alloc::MiMalloc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    ctxalign::alloc::retain_freed_memory();
    let mut args = std::env::args().skip(1);
    let usage = "usage: score <model dir | hub id> <description> <image>...";
    let model = args.next().ok_or(usage)?;
    let text = args.next().ok_or(usage)?;
    let images: Vec<String> = args.collect();
    if images.is_empty() {
        return Err(usage.into());
    }

    let scorer = BlipScorer::from_pretrained(&model, &Device::Cpu)?;
    let encoded = scorer.encode_image_files(&images)?;
    let report = scorer.score(&text, &encoded)?;
    for (path, s) in images.iter().zip(&report.scores) {
        println!("{path}: p(match) {:.4}, ITC {:.4}", s.itm_probability, s.itc_similarity);
    }
    println!("best: {}", images[report.best]);
    Ok(())
}

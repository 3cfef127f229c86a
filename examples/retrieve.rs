//! Text→image search with a trained ContextCLIP: index a folder of images once, then query it.
//! The same job as `ctxalign retrieve`.
//!
//! ```text
//! cargo run --release --example retrieve -- --model <ContextCLIP folder> --images photos/ \
//!     --query "a red circle left of a blue square" --k 5
//! ```
//! The index is saved to `--index` (default `<images>/.contextclip-index`) and reused only while
//! the model folder and the images (names, sizes, modification times) are unchanged; otherwise it
//! is rebuilt, with a message saying why. The steps are `ctxalign_cli::contextclip::retrieve`:
//! `ClipEncoder::load`, an `EmbeddingIndex` (loaded or built and saved), `EmbeddingIndex::search`.

use clap::Parser;

#[global_allocator]
static GLOBAL: ctxalign_cli::alloc::MiMalloc = ctxalign_cli::alloc::MiMalloc;

#[derive(Parser)]
#[command(about = "Index a folder of images with a ContextCLIP and search it by text")]
struct Args {
    #[command(flatten)]
    retrieve: ctxalign_cli::contextclip::RetrieveArgs,
}

fn main() -> anyhow::Result<()> {
    ctxalign_cli::process::configure();
    ctxalign_cli::contextclip::retrieve(Args::parse().retrieve)?;
    Ok(())
}

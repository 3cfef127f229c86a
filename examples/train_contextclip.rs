//! ContextCLIP training: a dual encoder learns from captioned images with `L_CLIP + α·L_CX`
//! (InfoNCE with λ-weighted directions, plus the contextual loss). α = 0 is the plain CLIP baseline.
//! The same job as `ctxalign train-contextclip`, with the same options.
//!
//! ```text
//! cargo run --release --example train_contextclip                       # built-in captions, α 0.5
//! cargo run --release --example train_contextclip -- --alpha 0          # the CLIP baseline
//! cargo run --release --example train_contextclip -- --flickr8k Flickr8k.token.txt \
//!     --image-root Flicker8k_Dataset --config base-code.json --paper
//! cargo run --release --example train_contextclip -- --captions coco_train.json --image-root /data/coco \
//!     --image-checkpoint resnet50/model.safetensors --text-checkpoint bert-base-uncased/model.safetensors
//! ```
//! Writes a model folder (`contextclip.json`, `model.safetensors`, `tokenizer.json`,
//! `training.json`, `metrics.jsonl`, `loss.png`) to `--out` (default
//! `$CTXALIGN_HOME/runs/contextclip`), then evaluates it: retrieval R@k on the held-out captions and
//! zero-shot classification on the built-in classes. The steps are
//! `ctxalign_cli::contextclip::train`: fill `TrainOptions`, call
//! `ctxalign::contextclip::train_contextclip`, evaluate with a `ClipEncoder`.

use clap::Parser;

#[global_allocator]
static GLOBAL: ctxalign_cli::alloc::MiMalloc = ctxalign_cli::alloc::MiMalloc;

#[derive(Parser)]
#[command(about = "Train ContextCLIP (L_CLIP + α·L_CX); α = 0 trains the CLIP baseline")]
struct Args {
    #[command(flatten)]
    train: ctxalign_cli::contextclip::TrainArgs,
}

fn main() -> anyhow::Result<()> {
    ctxalign_cli::process::configure();
    ctxalign_cli::contextclip::train(Args::parse().train)?;
    Ok(())
}

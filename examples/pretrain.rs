//! ContextBLIP S0 pre-training: the adapter, the TMIM decoder and the text adapter learn on
//! captioned images while BLIP stays frozen (loss `L_itm + L_tmim`). The same job as
//! `ctxalign pretrain`, with the same options.
//!
//! ```text
//! cargo run --release --example pretrain                      # shipped BLIP + built-in captions
//! cargo run --release --example pretrain -- --model Salesforce/blip-itm-base-coco \
//!     --captions coco_karpathy_train.json --captions vg.json --image-root /data/images \
//!     --batch-size 64 --steps 20000 --warmup-steps 3000 --crop-min 0.2 \
//!     --device cuda --precision bf16                          # a CUDA build (--features cuda)
//! ```
//! Writes `contextblip.json` + `contextblip.safetensors` (keys `adapter.*`, `decoder.*`,
//! `text_adapter.*`) to `--out` (default `$CTXALIGN_HOME/runs/contextblip-s0`); evaluate with
//! `ctxalign zero-shot --contextblip <out>`.
//!
//! What it runs, step by step, is `ctxalign_cli::contextblip::pretrain`: read the captions, build
//! a `ContextBlipConfig` for the BLIP, fill `PretrainOptions`, call `ctxalign::contextblip::pretrain`.

use clap::Parser;

#[global_allocator]
static GLOBAL: ctxalign_cli::alloc::MiMalloc = ctxalign_cli::alloc::MiMalloc;

#[derive(Parser)]
#[command(about = "ContextBLIP S0 pre-training (BLIP frozen; adapter + TMIM decoder + text adapter train)")]
struct Args {
    #[command(flatten)]
    pretrain: ctxalign_cli::contextblip::PretrainArgs,
}

fn main() -> anyhow::Result<()> {
    ctxalign_cli::process::configure();
    ctxalign_cli::contextblip::pretrain(Args::parse().pretrain)?;
    Ok(())
}

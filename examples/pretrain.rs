//! ContextBLIP S0 pre-training: the adapter, the TMIM decoder and the text adapter learn on
//! captioned images while BLIP stays frozen (loss `L_itm + L_tmim`).
//!
//! ```text
//! cargo run --release --example pretrain                      # shipped BLIP + built-in captions
//! cargo run --release --example pretrain -- --model Salesforce/blip-itm-base-coco \
//!     --captions coco_karpathy_train.json --captions vg.json --image-root /data/images \
//!     --batch-size 64 --steps 20000 --warmup-steps 3000 --crop-min 0.2 \
//!     --device cuda --precision bf16                          # a CUDA build (--features cuda)
//! ```
//! Writes `contextblip.json` + `contextblip.safetensors` (keys `adapter.*`, `decoder.*`,
//! `text_adapter.*`) to `--out`; evaluate with `cargo xtask zero-shot --contextblip <out>`.

use std::path::PathBuf;

use clap::Parser;
use ctxalign::contextblip::{pretrain, read_caption_files, PretrainOptions};
use ctxalign::data::captions::read_caption_json;
use ctxalign::data::vignettes::{ensure_benchmark, VignettesConfig};
use ctxalign::device::TrainingArgs;
use ctxalign::eval::Table;
use ctxalign::models::blip::BlipItm;
use ctxalign::models::contextblip::{ContextBlipConfig, MaskSelection, TokenChoice};
use ctxalign::models::ModelSource;
use ctxalign::nn::AdapterAggregation;
use ctxalign::Runtime;

#[global_allocator]
static GLOBAL: ctxalign::alloc::MiMalloc = ctxalign::alloc::MiMalloc;

#[derive(Parser)]
#[command(about = "ContextBLIP S0 pre-training (BLIP frozen; adapter + TMIM decoder + text adapter train)")]
struct Args {
    /// BLIP checkpoint: a folder or a hub id (default: the shipped models/blip-vignettes-small).
    #[arg(long)]
    model: Option<String>,
    /// BLIP-format caption JSON files (repeatable); default: the built-in benchmark's captions.
    #[arg(long)]
    captions: Vec<PathBuf>,
    /// Folder the caption files' image paths are relative to.
    #[arg(long)]
    image_root: Option<PathBuf>,
    /// Where the built-in benchmark is generated (once) when no --captions are given.
    #[arg(long, default_value = "target/vignettes-default")]
    data_dir: PathBuf,
    /// Output folder: contextblip.json, contextblip.safetensors, training.json, metrics.jsonl, loss.png, checkpoints/.
    #[arg(long, default_value = "target/contextblip-pretrain")]
    out: PathBuf,
    /// Optimizer steps.
    #[arg(long, default_value_t = 300, value_parser = ctxalign::args::positive_steps)]
    steps: u64,
    /// Captioned images per step (each also gets a hard-negative image and caption).
    #[arg(long, default_value_t = 32, value_parser = ctxalign::args::positive_count)]
    batch_size: usize,
    /// AdamW learning rate (reference 3e-4).
    #[arg(long, default_value_t = 3e-4, value_parser = ctxalign::args::learning_rate)]
    lr: f64,
    /// AdamW weight decay (reference 0.05).
    #[arg(long, default_value_t = 0.05, value_parser = ctxalign::args::non_negative)]
    weight_decay: f64,
    /// Linear warm-up steps (reference 3000, for 20 epochs of COCO + VG).
    #[arg(long, default_value_t = 30)]
    warmup_steps: u64,
    /// Learning-rate factor per epoch (reference 0.9).
    #[arg(long, default_value_t = 0.9, value_parser = ctxalign::args::unit_fraction)]
    epoch_decay: f64,
    /// Smallest RandomResizedCrop area (reference 0.2); 1 turns cropping off. Off by default on
    /// the built-in data, whose captions name every object (a crop would make them false).
    #[arg(long, default_value_t = 1.0, value_parser = ctxalign::args::unit_fraction)]
    crop_min: f64,
    /// Mask ratio π (reference 0.25).
    #[arg(long, default_value_t = 0.25, value_parser = ctxalign::args::proportion)]
    mask_ratio: f64,
    /// Mask random patches instead of text-guided ones (the ablation).
    #[arg(long)]
    random_mask: bool,
    /// Guide the mask by one random position per batch, as the authors' code (may pick padding).
    #[arg(long)]
    reference_token_choice: bool,
    /// Tapped ViT layers, 1-based, comma-separated (default: quarters of the depth, [3,6,9,12] for 12).
    #[arg(long, value_delimiter = ',')]
    taps: Option<Vec<usize>>,
    /// Adapter reduction δ (reference 2).
    #[arg(long, default_value_t = 2)]
    reduction: usize,
    /// Sum the taps instead of concatenating them.
    #[arg(long)]
    add_taps: bool,
    /// Sample hard negatives without temperature and allow other captions of the same image, as the
    /// authors' code does.
    #[arg(long)]
    reference_negatives: bool,
    /// Random seed (shuffling, crops, masks, hard negatives, initialisation).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Continue from the latest checkpoint in --out (the settings must be the same).
    #[arg(long)]
    resume: bool,
    /// Start over in an --out that holds an earlier run's checkpoints, deleting them.
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// With --resume: continue although settings differ from the checkpoint's run (the differences
    /// are recorded).
    #[arg(long, requires = "resume")]
    accept_changed_settings: bool,
    #[command(flatten)]
    bad_input: ctxalign::args::BadInputArgs,
    #[command(flatten)]
    runtime: TrainingArgs,
}

fn main() -> anyhow::Result<()> {
    ctxalign::alloc::retain_freed_memory();
    let a = Args::parse();
    let rt = Runtime::new(a.runtime.open()?, a.runtime.precision);
    let blip = match &a.model {
        Some(spec) => ModelSource::parse(spec).resolve()?,
        None => ctxalign::models::ModelFiles::from_dir(&ctxalign::default_model_dir())?,
    };
    let items = if a.captions.is_empty() {
        let data = ensure_benchmark(&VignettesConfig::default(), &a.data_dir)?;
        let dir = data.join("captions");
        read_caption_json(&dir.join("train.json"), &dir)?
    } else {
        let root = a.image_root.clone().ok_or_else(|| anyhow::anyhow!("--captions needs --image-root"))?;
        read_caption_files(&a.captions, &root)?
    };
    let blip_cfg = BlipItm::read_config(&blip.config)?;
    let mut config = ContextBlipConfig::for_blip(&blip_cfg);
    config.masking.ratio = a.mask_ratio;
    if a.random_mask {
        config.masking.selection = MaskSelection::Random;
    }
    if a.reference_token_choice {
        config.masking.token_choice = TokenChoice::SharedPosition;
    }
    if let Some(taps) = &a.taps {
        config.adapter.taps = taps.clone();
    }
    config.adapter.reduction = a.reduction;
    if a.add_taps {
        config.adapter.aggregation = AdapterAggregation::Add;
    }
    config.validate_for(&blip_cfg).map_err(anyhow::Error::msg)?;
    let mut opts = PretrainOptions::paper_schedule(a.out.clone(), config, a.steps);
    opts.batch_size = a.batch_size;
    opts.lr = a.lr;
    opts.weight_decay = a.weight_decay;
    opts.warmup_steps = a.warmup_steps;
    opts.epoch_decay = a.epoch_decay;
    opts.crop_scale = (a.crop_min < 1.0).then_some((a.crop_min, 1.0));
    opts.seed = a.seed;
    (opts.resume, opts.overwrite, opts.accept_changed_settings) = (a.resume, a.overwrite, a.accept_changed_settings);
    opts.bad_input = a.bad_input.policy();
    if a.reference_negatives {
        opts.negatives.temperature = None;
        opts.negatives.mask_same_image = false;
    }
    println!(
        "ContextBLIP S0 on {} captioned images ({}, {}); BLIP frozen ({}); adapter taps {:?}, δ {}, mask π {}",
        items.len(),
        a.runtime.device,
        rt.precision,
        blip.config.display(),
        opts.config.adapter.taps,
        opts.config.adapter.reduction,
        opts.config.masking.ratio
    );
    let total = items.len();
    let report = pretrain(&blip, items, &opts, &rt)?;
    let left_out: Vec<String> = report.left_out.iter().map(|s| s.error.clone()).collect();
    ctxalign::args::warn_left_out(&format!("{} of {total} captioned images left out", left_out.len()), &left_out);
    let mut table = Table::new(["", "value"]);
    table.row(["steps".to_string(), report.steps.to_string()]);
    for (k, v) in &report.final_terms {
        table.row([format!("final {k} loss"), format!("{v:.4}")]);
    }
    table.row(["trainable parameters".into(), report.trainable_parameters.to_string()]);
    table.row(["adapter parameters".into(), report.adapter_parameters.to_string()]);
    table.row(["time".into(), format!("{:.0} s ({:.1} samples/s)", report.seconds, report.samples_per_second)]);
    table.row(["saved to".into(), report.out_dir.display().to_string()]);
    println!("{table}");
    if report.interrupted {
        eprintln!("interrupted: the checkpoint is in {}; continue with --resume", report.out_dir.display());
        std::process::exit(ctxalign::train::INTERRUPTED_EXIT_CODE);
    }
    Ok(())
}

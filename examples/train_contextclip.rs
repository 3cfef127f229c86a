//! ContextCLIP training: a dual encoder learns from captioned images with `L_CLIP + α·L_CX`
//! (InfoNCE with λ-weighted directions, plus the contextual loss). α = 0 is the plain CLIP baseline.
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
//! `training.json`, `metrics.jsonl`, `loss.png`) to `--out`, then evaluates it: retrieval R@k on the
//! held-out captions and zero-shot classification on the built-in classes.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use ctxalign::contextclip::{retrieval, train_contextclip, zero_shot, ClipEncoder, TrainOptions};
use ctxalign::data::captions::{read_caption_json, read_flickr8k};
use ctxalign::data::classification::read_image_folder;
use ctxalign::data::vignettes::{ensure_benchmark, VignettesConfig};
use ctxalign::device::TrainingArgs;
use ctxalign::eval::zeroshot::builtin_templates;
use ctxalign::eval::Table;
use ctxalign::models::contextclip::ContextClipConfig;
use ctxalign::nn::{ContextualMode, Similarity, Targets};
use ctxalign::Runtime;

#[global_allocator]
static GLOBAL: ctxalign::alloc::MiMalloc = ctxalign::alloc::MiMalloc;

#[derive(Clone, Copy, ValueEnum)]
enum SimilarityArg {
    Dot,
    Cosine,
}

#[derive(Clone, Copy, ValueEnum)]
enum TargetsArg {
    Hard,
    Soft,
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    Samples,
    Dims,
    PaperCode,
}

#[derive(Parser)]
#[command(about = "Train ContextCLIP (L_CLIP + α·L_CX); α = 0 trains the CLIP baseline")]
struct Args {
    /// BLIP-format caption JSON files (repeatable); default: the built-in benchmark's captions.
    #[arg(long)]
    captions: Vec<PathBuf>,
    /// Flickr8k's `Flickr8k.token.txt` (with --image-root = `Flicker8k_Dataset`).
    #[arg(long)]
    flickr8k: Option<PathBuf>,
    /// Folder the caption files' image paths are relative to.
    #[arg(long)]
    image_root: Option<PathBuf>,
    /// Held-out caption JSON for the final retrieval evaluation (default: the built-in val split;
    /// with real data and no --val-captions, the last 10 % of the images are held out).
    #[arg(long)]
    val_captions: Option<PathBuf>,
    /// Where the built-in benchmark is generated (once).
    #[arg(long, default_value = "target/vignettes-default")]
    data_dir: PathBuf,
    /// Output folder: the model (contextclip.json, model.safetensors, tokenizer.json) and its run record.
    #[arg(long, default_value = "target/contextclip")]
    out: PathBuf,
    /// A `contextclip.json` describing the towers (default: the small CPU model).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Tokenizer of the text tower (default: the shipped bert-base-uncased one).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Continue from a trained ContextCLIP folder (its config, weights and learned τ; fresh
    /// optimiser and schedule).
    #[arg(long)]
    init_from: Option<PathBuf>,
    /// Start the image tower from a checkpoint in its own layout (timm ResNet, HF CLIP).
    #[arg(long)]
    image_checkpoint: Option<PathBuf>,
    /// Start the text tower from a checkpoint in its own layout (HF BERT, HF CLIP).
    #[arg(long)]
    text_checkpoint: Option<PathBuf>,
    /// The paper's optimisation (Adam wd 1e-3; lr 1e-4 image / 1e-6 text / 1e-3 heads; 30 epochs
    /// of 32) instead of the from-scratch CPU settings.
    #[arg(long)]
    paper: bool,
    /// Weight α of the contextual loss (paper 0.5; 0 = CLIP baseline).
    #[arg(long, default_value_t = 0.5)]
    alpha: f64,
    /// Weight λ of the image→text direction (paper 0.75).
    #[arg(long, default_value_t = 0.75)]
    lambda: f64,
    /// Temperature τ (paper 1.0; CPU default 0.07, learned).
    #[arg(long)]
    temperature: Option<f64>,
    /// Learn τ (CPU default) or keep it fixed (--paper).
    #[arg(long)]
    learn_temperature: Option<bool>,
    /// Similarity (paper: dot; CPU default: cosine).
    #[arg(long, value_enum)]
    similarity: Option<SimilarityArg>,
    /// InfoNCE targets (paper: soft; CPU default: hard).
    #[arg(long, value_enum)]
    targets: Option<TargetsArg>,
    /// What the contextual loss's points are.
    #[arg(long, value_enum, default_value = "samples")]
    mode: ModeArg,
    /// Band width h of the contextual loss (paper 0.5).
    #[arg(long, default_value_t = 0.5)]
    band_width: f64,
    /// Optimizer steps (overrides --epochs).
    #[arg(long, value_parser = ctxalign::args::positive_steps)]
    steps: Option<u64>,
    /// Epochs (default: 30 with --paper, else the CPU default).
    #[arg(long, value_parser = ctxalign::args::positive_steps)]
    epochs: Option<u64>,
    /// Captioned images per step.
    #[arg(long, value_parser = ctxalign::args::positive_count)]
    batch_size: Option<usize>,
    /// One learning rate for every group (overrides the defaults).
    #[arg(long, value_parser = ctxalign::args::learning_rate)]
    lr: Option<f64>,
    /// Random seed (shuffling, crops, initialisation).
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
    /// Train on all captions of the built-in data (default: each image's first caption, which lists
    /// every object; the relational ones keep a model from scratch on the ln B plateau for longer
    /// than a CPU run lasts). Real data always uses all captions.
    #[arg(long)]
    all_captions: bool,
    /// Skip the evaluation after training.
    #[arg(long)]
    no_eval: bool,
    #[command(flatten)]
    bad_input: ctxalign::args::BadInputArgs,
    #[command(flatten)]
    runtime: TrainingArgs,
}

fn main() -> anyhow::Result<()> {
    ctxalign::alloc::retain_freed_memory();
    let a = Args::parse();
    let rt = Runtime::new(a.runtime.open()?, a.runtime.precision);
    let builtin = a.captions.is_empty() && a.flickr8k.is_none();
    let data = ensure_benchmark(&VignettesConfig::default(), &a.data_dir)?;
    let (train_items, val_items) = if builtin {
        let dir = data.join("captions");
        (read_caption_json(&dir.join("train.json"), &dir)?, read_caption_json(&dir.join("val.json"), &dir)?)
    } else {
        let root = a.image_root.clone().ok_or_else(|| anyhow::anyhow!("--captions / --flickr8k need --image-root"))?;
        let mut items = match &a.flickr8k {
            Some(f) => read_flickr8k(f, &root)?,
            None => ctxalign::contextblip::read_caption_files(&a.captions, &root)?,
        };
        match &a.val_captions {
            Some(v) => (items, read_caption_json(v, &root)?),
            None => {
                let val = items.split_off(items.len() * 9 / 10);
                (items, val)
            }
        }
    };
    let train_items = if builtin && !a.all_captions {
        train_items.iter().map(|i| i.first_caption_only()).collect()
    } else {
        train_items
    };
    let mut opts = TrainOptions::cpu_default(a.out.clone());
    if let Some(c) = &a.config {
        opts.config = ContextClipConfig::read(c)?;
    }
    if a.paper {
        opts = TrainOptions::paper(a.out.clone(), opts.config.clone(), opts.tokenizer.clone());
    }
    if let Some(t) = &a.tokenizer {
        opts.tokenizer = t.clone();
    }
    if let Some(dir) = &a.init_from {
        opts.config = ContextClipConfig::read(&dir.join(ctxalign::models::contextclip::CONFIG_FILE))?;
        opts.init.checkpoint = Some(dir.join(ctxalign::models::contextclip::WEIGHTS_FILE));
    }
    opts.init.towers = a.image_checkpoint.iter().chain(&a.text_checkpoint).cloned().collect();
    if let Some(t) = &a.text_checkpoint {
        opts.init.bert_prefix = ctxalign::models::loading::CheckedSafetensors::open(
            std::slice::from_ref(t),
            ctxalign::models::loading::RenameTable::identity(),
        )
        .map(|st| ctxalign::models::bert::BertModel::checkpoint_prefix(st.keys()) == "bert.")?;
    }
    opts.loss.alpha = a.alpha;
    opts.loss.clip.lambda = a.lambda;
    if let Some(t) = a.temperature {
        opts.loss.temperature = t;
    }
    if let Some(l) = a.learn_temperature {
        opts.loss.learn_temperature = l;
    }
    if let Some(s) = a.similarity {
        opts.loss.clip.similarity = match s {
            SimilarityArg::Dot => Similarity::Dot,
            SimilarityArg::Cosine => Similarity::Cosine,
        };
    }
    if let Some(t) = a.targets {
        opts.loss.clip.targets = match t {
            TargetsArg::Hard => Targets::Hard,
            TargetsArg::Soft => Targets::Soft,
        };
    }
    opts.loss.mode = match a.mode {
        ModeArg::Samples => ContextualMode::Samples,
        ModeArg::Dims => ContextualMode::Dims,
        ModeArg::PaperCode => ContextualMode::PaperCode,
    };
    opts.loss.band_width = a.band_width;
    if a.steps.is_some() || a.epochs.is_some() {
        opts.steps = a.steps;
    }
    if let Some(e) = a.epochs {
        opts.epochs = e;
    }
    if let Some(b) = a.batch_size {
        opts.batch_size = b;
    }
    if let Some(lr) = a.lr {
        (opts.image_lr, opts.text_lr, opts.head_lr) = (lr, lr, lr);
    }
    opts.seed = a.seed;
    (opts.resume, opts.overwrite, opts.accept_changed_settings) = (a.resume, a.overwrite, a.accept_changed_settings);
    opts.bad_input = a.bad_input.policy();
    println!(
        "ContextCLIP on {} captioned images ({}, {}): α {}, λ {}, τ {}{}, {:?} similarity, {:?} targets, L_CX {:?} h {}",
        train_items.len(),
        a.runtime.device,
        rt.precision,
        opts.loss.alpha,
        opts.loss.clip.lambda,
        opts.loss.temperature,
        if opts.loss.learn_temperature { " (learned)" } else { "" },
        opts.loss.clip.similarity,
        opts.loss.clip.targets,
        opts.loss.mode,
        opts.loss.band_width
    );
    let total = train_items.len();
    let report = train_contextclip(train_items, &opts, &rt)?;
    let left_out: Vec<String> = report.left_out.iter().map(|s| s.error.clone()).collect();
    ctxalign::args::warn_left_out(&format!("{} of {total} captioned images left out", left_out.len()), &left_out);
    if report.interrupted {
        eprintln!(
            "interrupted at step {}: the checkpoint is in {}; continue with --resume",
            report.steps,
            a.out.display()
        );
        std::process::exit(ctxalign::train::INTERRUPTED_EXIT_CODE);
    }
    let mut table = Table::new(["", "value"]);
    table.row(["steps".to_string(), report.steps.to_string()]);
    table.row(["parameters".to_string(), report.parameters.to_string()]);
    for (k, v) in &report.final_terms {
        table.row([format!("final {k} loss"), format!("{v:.4}")]);
    }
    table.row(["samples/s".to_string(), format!("{:.1}", report.samples_per_second)]);
    if !a.no_eval {
        // Evaluated in the precision it trained in (the saved weights are the f32 masters).
        let encoder = ClipEncoder::load(&a.out, rt.dtype(), &rt.device)?;
        let r = retrieval(&encoder, &val_items)?;
        for (name, m) in [("text→image", &r.text_to_image), ("image→text", &r.image_to_text)] {
            let recalls: Vec<String> = m.recall_at.iter().map(|(k, v)| format!("R@{k} {:.1}", 100.0 * v)).collect();
            table.row([format!("{name} ({} queries)", m.queries), recalls.join("  ")]);
        }
        if builtin {
            let classes = read_image_folder(&data.join("classes").join("val"))?;
            let m = zero_shot(&encoder, &classes, &builtin_templates("photo").expect("built in"))?;
            table.row([
                format!("zero-shot, {} built-in classes", classes.classes.len()),
                format!("top-1 {:.1}  top-5 {:.1}", 100.0 * m.acc1, 100.0 * m.acc5),
            ]);
        }
    }
    println!("{table}");
    println!("model: {}  (loss curve: {})", a.out.display(), a.out.join("loss.png").display());
    Ok(())
}

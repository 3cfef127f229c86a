//! ContextBLIP jobs: `pretrain` (S0), `zero-shot`, `finetune-s1`, `finetune-s2`, `sweep`, `mmvp`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
#[cfg(feature = "train")]
use clap::ValueEnum;

use super::{blip_files, or_default, write_json};
use crate::args::{check_output_file, BadInputArgs};
use ctxalign::data::imagecode::{write_submission, ImageCodeSplit, LeftOutSet};
use ctxalign::data::vignettes::imagecode_root;
use ctxalign::data::DecodeOptions;
use crate::runtime_args::InferenceArgs;
use ctxalign::eval::accuracy::{counts_json, group_table, percent, GroupCounts};
use ctxalign::eval::progress::Progress;
use ctxalign::eval::Table;
use ctxalign::evaluate::imagecode_zero_shot;
use ctxalign::models::contextblip::{require_stage, Stage};
use ctxalign::models::ModelFiles;
#[cfg(feature = "train")]
use crate::runtime_args::TrainingArgs;
#[cfg(feature = "train")]
use ctxalign::{
    contextblip::{evaluate_finetuned, FinetuneOptions, InterContextOptions, PretrainOptions},
    eval::accuracy::{mean_spread, share},
    models::blip::BlipItm,
    models::contextblip::ContextBlipConfig,
    RunControl, Runtime,
};
use ctxalign::{BlipScorer, Device, ScorerOptions};

/// Where IMAGECODE-format data comes from.
#[derive(Args, Clone)]
pub struct DataArgs {
    /// IMAGECODE root (`train_data.json`, `valid_data.json`, `test_data_unlabeled.json`,
    /// `image-sets/`); default: the built-in benchmark, generated once into --data-dir.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Where the built-in benchmark is generated (once) when no --data is given; default:
    /// `vignettes-default` in ctxalign's home folder (`$CTXALIGN_HOME`, else the user cache folder).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[command(flatten)]
    pub bad_input: BadInputArgs,
}

impl DataArgs {
    /// The built-in benchmark's folder (generated on first use).
    fn builtin(&self) -> anyhow::Result<PathBuf> {
        super::builtin_benchmark(&self.data_dir)
    }

    fn root(&self) -> anyhow::Result<PathBuf> {
        Ok(match &self.data {
            Some(d) => d.clone(),
            None => imagecode_root(&self.builtin()?),
        })
    }

    /// Reads split `name` under `root` and checks every set before anything is scored or trained
    /// (under --skip-bad, bad sets are left out and reported); the sets left out are returned for
    /// the record.
    fn open_split(&self, root: &Path, name: &str) -> anyhow::Result<(ImageCodeSplit, Vec<LeftOutSet>)> {
        let split = ImageCodeSplit::open(root, name)?;
        let sets = split.sets().len();
        let (split, left_out) = split.checked(DecodeOptions::default(), self.bad_input.policy())?;
        warn_sets_left_out(name, sets, &left_out);
        Ok((split, left_out))
    }
}

/// "2 of 40 train sets (12 descriptions) left out", and why, when any were.
fn warn_sets_left_out(split: &str, sets: usize, left_out: &[LeftOutSet]) {
    let errors: Vec<String> = left_out.iter().map(|l| l.error.clone()).collect();
    let descriptions: usize = left_out.iter().map(|l| l.descriptions).sum();
    let summary = format!("{} of {sets} {split} sets ({descriptions} descriptions) left out", left_out.len());
    crate::args::warn_left_out(&summary, &errors);
}

/// Plain BLIP, then BLIP with each ContextBLIP adapter, named for tables.
fn scorers(
    files: &ModelFiles,
    options: &ScorerOptions,
    contextblip: &[PathBuf],
    device: &Device,
) -> anyhow::Result<Vec<(String, BlipScorer)>> {
    let blip = BlipScorer::from_files(files, options.clone(), device)?;
    let mut out = vec![("BLIP".to_string(), blip.clone())];
    for dir in contextblip {
        let purpose =
            "zero-shot scoring with a ContextBLIP adapter (give a fine-tuned folder as --model to score its BLIP)";
        require_stage(dir, &[Stage::S0], purpose)?;
        out.push((format!("ContextBLIP {}", dir.display()), blip.clone().with_contextblip(dir)?));
    }
    Ok(out)
}

fn bar(len: usize, what: &str) -> Progress {
    Progress::new(len as u64, what)
}

#[cfg(feature = "train")]
#[derive(Args)]
pub struct PretrainArgs {
    /// BLIP checkpoint: a folder or a hub id (default: the shipped small BLIP).
    #[arg(long)]
    model: Option<String>,
    #[command(flatten)]
    captions: CaptionArgs,
    /// Where the built-in benchmark is generated (once) when no --captions are given; default:
    /// `vignettes-default` in ctxalign's home folder.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Output folder: contextblip.json, contextblip.safetensors, training.json, metrics.jsonl,
    /// loss.png, checkpoints/; default: `runs/contextblip-s0` in ctxalign's home folder.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Optimizer steps.
    #[arg(long, default_value_t = 300, value_parser = crate::args::positive_steps)]
    steps: u64,
    /// Captioned images per step (each also gets a hard-negative image and caption).
    #[arg(long, default_value_t = 32, value_parser = crate::args::positive_count)]
    batch_size: usize,
    /// AdamW learning rate (reference 3e-4).
    #[arg(long, default_value_t = 3e-4, value_parser = crate::args::learning_rate)]
    lr: f64,
    /// AdamW weight decay (reference 0.05).
    #[arg(long, default_value_t = 0.05, value_parser = crate::args::non_negative)]
    weight_decay: f64,
    /// Linear warm-up steps (reference 3000, for 20 epochs of COCO + VG).
    #[arg(long, default_value_t = 30)]
    warmup_steps: u64,
    /// Learning-rate factor per epoch (reference 0.9).
    #[arg(long, default_value_t = 0.9, value_parser = crate::args::unit_fraction)]
    epoch_decay: f64,
    /// Smallest RandomResizedCrop area (reference 0.2); 1 turns cropping off. Off by default on
    /// the built-in data, whose captions name every object (a crop would make them false).
    #[arg(long, default_value_t = 1.0, value_parser = crate::args::unit_fraction)]
    crop_min: f64,
    /// Mask ratio π (reference 0.25).
    #[arg(long, default_value_t = 0.25, value_parser = crate::args::proportion)]
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
    #[command(flatten)]
    shards: super::ShardArgs,
    #[command(flatten)]
    run: super::RunArgs,
    #[command(flatten)]
    bad_input: crate::args::BadInputArgs,
    #[command(flatten)]
    runtime: TrainingArgs,
}

/// The captioned images S0 pre-trains on.
#[cfg(feature = "train")]
#[derive(Args, Clone)]
pub struct CaptionArgs {
    /// BLIP-format caption JSON files to pre-train on (repeatable); default: the built-in
    /// benchmark's captions.
    #[arg(long)]
    captions: Vec<PathBuf>,
    /// Folder the caption files' image paths are relative to.
    #[arg(long)]
    image_root: Option<PathBuf>,
}

/// "3600 captioned images" or "the shards data/shards-{…}.tar", for a job's header.
#[cfg(feature = "train")]
pub(super) fn source_name(data: &ctxalign::CaptionSource) -> String {
    match data {
        ctxalign::CaptionSource::Files(items) => format!("{} captioned images", items.len()),
        ctxalign::CaptionSource::Shards(s) => format!("the shards {}", s.spec),
    }
}

#[cfg(feature = "train")]
impl CaptionArgs {
    /// The shards when given (not together with --captions), else the caption files or the
    /// built-in captions.
    fn source(&self, data_dir: &Option<PathBuf>, shards: &super::ShardArgs) -> anyhow::Result<ctxalign::CaptionSource> {
        match shards.source() {
            Some(_) if !self.captions.is_empty() => anyhow::bail!("give --captions or --shards, not both"),
            Some(s) => Ok(ctxalign::CaptionSource::Shards(s)),
            None => Ok(ctxalign::CaptionSource::Files(self.read(data_dir)?)),
        }
    }

    /// The given caption files, else the built-in benchmark's training captions (generated into
    /// `data_dir` on first use).
    fn read(&self, data_dir: &Option<PathBuf>) -> anyhow::Result<Vec<ctxalign::data::captions::CaptionedImage>> {
        if self.captions.is_empty() {
            let dir = super::builtin_benchmark(data_dir)?.join("captions");
            return Ok(ctxalign::data::captions::read_caption_json(&dir.join("train.json"), &dir)?);
        }
        let root = self.image_root.clone().ok_or_else(|| anyhow::anyhow!("--captions needs --image-root"))?;
        Ok(ctxalign::contextblip::read_caption_files(&self.captions, &root)?)
    }
}

/// S0 pre-training from the command line's settings; prints a summary table.
#[cfg(feature = "train")]
pub fn pretrain(a: PretrainArgs) -> anyhow::Result<bool> {
    use ctxalign::models::contextblip::{MaskSelection, TokenChoice};
    use ctxalign::nn::AdapterAggregation;
    if super::launch::launch_ranks(&a.runtime)? {
        return Ok(true);
    }
    let out = or_default(&a.out, || ctxalign::home::run_dir("contextblip-s0"))?;
    let blip = blip_files(&a.model)?;
    let data = a.captions.source(&a.data_dir, &a.shards)?;
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
    let mut opts = PretrainOptions::paper_schedule(out, config, a.steps);
    opts.batch_size = a.batch_size;
    opts.lr = a.lr;
    opts.weight_decay = a.weight_decay;
    opts.warmup_steps = a.warmup_steps;
    opts.epoch_decay = a.epoch_decay;
    opts.crop_scale = (a.crop_min < 1.0).then_some((a.crop_min, 1.0));
    opts.run = a.run.control(a.bad_input.policy())?;
    if a.reference_negatives {
        opts.negatives.temperature = None;
        opts.negatives.mask_same_image = false;
    }
    if super::launch::reports(&a.runtime) {
        println!(
            "ContextBLIP S0 on {} ({}, {}{}); BLIP frozen ({}); adapter taps {:?}, δ {}, mask π {}",
            source_name(&data),
            a.runtime.device,
            a.runtime.precision,
            ranks_note(&a.runtime),
            blip.config.display(),
            opts.config.adapter.taps,
            opts.config.adapter.reduction,
            opts.config.masking.ratio
        );
    }
    let trained = super::launch::run_training(&a.runtime, |rt, comm| {
        let opts = PretrainOptions { run: RunControl { dist: comm, ..opts.run.clone() }, ..opts.clone() };
        Ok(ctxalign::contextblip::pretrain(&blip, data.clone(), &opts, &rt)?)
    })?;
    let Some((report, _)) = trained else { return Ok(true) };
    super::print_notices(&report.outcome);
    let left_out: Vec<String> = report.left_out.iter().map(|s| s.error.clone()).collect();
    crate::args::warn_left_out(&format!("{} captioned images left out", left_out.len()), &left_out);
    let mut table = Table::new(["", "value"]);
    table.row(["steps".to_string(), report.outcome.steps.to_string()]);
    for (k, v) in &report.outcome.final_terms {
        table.row([format!("final {k} loss"), format!("{v:.4}")]);
    }
    table.row(["trainable parameters".into(), report.trainable_parameters.to_string()]);
    table.row(["adapter parameters".into(), report.adapter_parameters.to_string()]);
    table.row([
        "time".into(),
        format!("{:.0} s ({:.1} samples/s)", report.outcome.seconds, report.outcome.samples_per_second),
    ]);
    super::ranks_rows(&mut table, &report.outcome);
    table.row(["saved to".into(), report.out_dir.display().to_string()]);
    println!("{table}");
    if report.outcome.interrupted {
        super::exit_interrupted(report.outcome.steps, &report.out_dir, "continue with --resume");
    }
    Ok(true)
}

/// `, 2 ranks` after the device in a job's header, when it runs data-parallel.
#[cfg(feature = "train")]
pub(super) fn ranks_note(args: &TrainingArgs) -> String {
    match (args.nproc_per_node, ctxalign::train::DistEnv::from_env()) {
        (_, Ok(Some(env))) => format!(", {} ranks", env.world_size),
        (Some(n), _) if n > 1 => format!(", {n} ranks"),
        _ => String::new(),
    }
}

#[derive(Args)]
pub struct ZeroShotArgs {
    /// BLIP checkpoint (folder or hub id); default: the shipped small BLIP.
    #[arg(long)]
    model: Option<String>,
    /// ContextBLIP folders (from `--example pretrain`) to compare against plain BLIP (repeatable).
    #[arg(long)]
    contextblip: Vec<PathBuf>,
    /// Dual encoders scored by cosine (repeatable): an HF CLIP (folder or hub id, e.g.
    /// `openai/clip-vit-base-patch32`) — the paper's CLIP baseline — or a ContextCLIP folder.
    #[arg(long)]
    clip: Vec<String>,
    #[command(flatten)]
    data: DataArgs,
    /// `valid` (labeled) or `test` (unlabeled: writes leaderboard submissions).
    #[arg(long, default_value = "valid")]
    split: String,
    /// Word limit of descriptions (BLIP: 30; truncates ~20 % of IMAGECODE).
    #[arg(long, default_value_t = 30, value_parser = crate::args::positive_count)]
    max_words: usize,
    /// Token limit including [ENC] and [SEP].
    #[arg(long, default_value_t = 35, value_parser = crate::args::token_budget)]
    max_tokens: usize,
    /// Whose bicubic resize and center crop to reproduce: pillow (the authors' code), torchvision
    /// (HF's fast processors) or transformers-pil (HF's PIL processors, transformers 4.x's
    /// default); default: what the model's preprocessor config says.
    #[arg(long)]
    resize_mode: Option<ctxalign::data::ResizeMode>,
    /// Results JSON (and, for the test split, `<stem>-<model>-submission.json` beside it);
    /// default: `results/zero-shot.json` in ctxalign's home folder.
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    runtime: InferenceArgs,
}

/// Zero-shot IMAGECODE: BLIP, then each ContextBLIP; a set's images are encoded once per model.
pub fn zero_shot(a: ZeroShotArgs) -> anyhow::Result<bool> {
    let out = or_default(&a.out, || ctxalign::home::results_file("zero-shot.json"))?;
    check_output_file(&out)?;
    let device = a.runtime.open()?;
    let files = blip_files(&a.model)?;
    let (split, left_out) = a.data.open_split(&a.data.root()?, &a.split)?;
    let options = ScorerOptions {
        dtype: a.runtime.dtype,
        cleaning: ctxalign::data::CaptionCleaning::blip(a.max_words),
        max_tokens: a.max_tokens,
        resize_mode: a.resize_mode,
        ..Default::default()
    };
    let truncated = truncated_descriptions(&files, &options, &split)?;
    // Every model loads before any is evaluated: a bad folder fails in seconds, not after BLIP.
    let embedders = a
        .clip
        .iter()
        .map(|spec| Ok((spec, ctxalign::contextclip::load_embedder(spec, a.runtime.dtype, &device)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut results = serde_json::Map::new();
    let mut accs = vec![];
    for (name, scorer) in scorers(&files, &options, &a.contextblip, &device)? {
        let sets = split.sets().len();
        let b = bar(sets, &format!("sets · {name}"));
        let report = imagecode_zero_shot(&scorer, &split, &|n| b.set_position(n as u64))?;
        b.finish();
        if split.examples.iter().all(|e| e.target.is_none()) {
            let stem = out.file_stem().and_then(|s| s.to_str()).unwrap_or("zero-shot");
            let tag = if scorer.adapter.is_some() { format!("contextblip{}", accs.len()) } else { "blip".into() };
            let path = out.with_file_name(format!("{stem}-{tag}-submission.json"));
            write_submission(&path, &split, &report.itm.predictions)?;
            println!("{name}: submission written to {}", path.display());
        }
        results.insert(
            name.clone(),
            serde_json::json!({"itm": counts_json(&report.itm.accuracy), "itc": counts_json(&report.itc.accuracy), "predictions": report.itm.predictions}),
        );
        accs.push((name.clone(), report.itm.accuracy));
    }
    for (spec, embedder) in &embedders {
        let name = format!("CLIP cosine ({spec})");
        let b = bar(split.sets().len(), &format!("sets · {name}"));
        let ctxalign::eval::imagecode::Selection { predictions, accuracy } =
            ctxalign::contextclip::imagecode_zero_shot(embedder.as_ref(), &split, &|n| b.set_position(n as u64))?;
        b.finish();
        if split.examples.iter().all(|e| e.target.is_none()) {
            let stem = out.file_stem().and_then(|s| s.to_str()).unwrap_or("zero-shot");
            let path = out.with_file_name(format!("{stem}-clip{}-submission.json", accs.len()));
            write_submission(&path, &split, &predictions)?;
            println!("{name}: submission written to {}", path.display());
        }
        results.insert(name.clone(), serde_json::json!({"cosine": counts_json(&accuracy), "predictions": predictions}));
        accs.push((name, accuracy));
    }
    if accs.iter().any(|(_, a)| !a.is_empty()) {
        let rows: Vec<(String, &GroupCounts)> = accs.iter().map(|(n, a)| (n.clone(), a)).collect();
        let title = format!("zero-shot (BLIP: ITM; CLIP: cosine), {} split (chance 10 %)", a.split);
        println!("{}", group_table(&title, &rows));
    }
    println!(
        "{} descriptions in {} sets; {truncated} cut by the {}-word / {}-token limit",
        split.examples.len(),
        split.sets().len(),
        a.max_words,
        a.max_tokens
    );
    let record = serde_json::json!({
        "split": a.split,
        "descriptions": split.examples.len(),
        "truncated": truncated,
        "left_out": left_out,
        "device": a.runtime.device.to_string(),
        "dtype": format!("{:?}", a.runtime.dtype).to_lowercase(),
        "models": results,
    });
    write_json(&out, &record)?;
    println!("results: {}", out.display());
    Ok(true)
}

fn truncated_descriptions(
    files: &ModelFiles,
    options: &ScorerOptions,
    split: &ImageCodeSplit,
) -> anyhow::Result<usize> {
    let tok = ctxalign::data::TextTokenizer::from_file(
        files.tokenizer.as_ref().context("the model has no tokenizer.json")?,
        options.cleaning.clone(),
        options.max_tokens,
    )?;
    let texts: Vec<&str> = split.examples.iter().map(|e| e.description.as_str()).collect();
    Ok(tok.encode_batch(&texts, 0)?.truncated_count())
}

#[cfg(feature = "train")]
#[derive(Args)]
pub struct FinetuneS1Args {
    /// BLIP checkpoint (folder or hub id); default: the shipped small BLIP.
    #[arg(long)]
    model: Option<String>,
    /// The pre-trained ContextBLIP folder to start from.
    #[arg(long)]
    contextblip: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    /// Output folder: the complete fine-tuned model folder and its run record; default:
    /// `runs/contextblip-s1` in ctxalign's home folder.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Training epochs.
    #[arg(long, default_value_t = 40, value_parser = crate::args::positive_steps)]
    epochs: u64,
    /// Stop after this many optimizer steps (default: all epochs; `--max-steps` is the old name).
    #[arg(long, alias = "max-steps", value_parser = crate::args::positive_steps)]
    steps: Option<u64>,
    /// Descriptions per batch (each with its 10 candidates).
    #[arg(long, default_value_t = 36, value_parser = crate::args::positive_count)]
    batch_size: usize,
    /// BLIP + adapter learning rate (reference 2e-6).
    #[arg(long, default_value_t = 2e-6, value_parser = crate::args::learning_rate)]
    backbone_lr: f64,
    /// Candidate head learning rate (reference 1e-4).
    #[arg(long, default_value_t = 1e-4, value_parser = crate::args::learning_rate)]
    head_lr: f64,
    /// Keep the ViT frozen (the reference fine-tunes it).
    #[arg(long)]
    freeze_vision: bool,
    /// Train on IMAGECODE set shards (`ctxalign shards --imagecode …`) instead of the train split.
    #[command(flatten)]
    shards: super::ShardArgs,
    #[command(flatten)]
    run: super::RunArgs,
    #[command(flatten)]
    runtime: TrainingArgs,
}

#[cfg(feature = "train")]
pub fn finetune_s1(a: FinetuneS1Args) -> anyhow::Result<bool> {
    if super::launch::launch_ranks(&a.runtime)? {
        return Ok(true);
    }
    let out = or_default(&a.out, || ctxalign::home::run_dir("contextblip-s1"))?;
    let files = blip_files(&a.model)?;
    let root = a.data.root()?;
    // The recipe checks the training sets (once each, or every shard) before it builds anything.
    let (data, what, train_sets) = match a.shards.source() {
        Some(shards) => {
            let what = format!("the set shards {}", shards.spec);
            (ctxalign::contextblip::ImageCodeSource::Shards(shards), what, None)
        }
        None => {
            let train = ImageCodeSplit::open(&root, "train")?;
            let what = format!("{} training descriptions", train.examples.len());
            let sets = train.sets().len();
            (train.into(), what, Some(sets))
        }
    };
    // The valid split is checked now too: a bad set must not surface after the training.
    let (valid, _) = a.data.open_split(&root, "valid")?;
    let mut opts = FinetuneOptions {
        out_dir: out.clone(),
        epochs: a.epochs,
        max_steps: a.steps,
        batch_size: a.batch_size,
        backbone_lr: a.backbone_lr,
        head_lr: a.head_lr,
        train_vision: !a.freeze_vision,
        run: a.run.control(a.data.bad_input.policy())?,
        ..Default::default()
    };
    // The folder stays locked through the evaluation that writes its eval.json, not only the
    // training (the process of rank 0 holds it; the recipe uses this lock).
    opts.run.held_lock = claim_for_job(&a.runtime, &opts.run, &out, "finetune-s1 (ContextBLIP S1)")?;
    if super::launch::reports(&a.runtime) {
        println!(
            "S1 on {what} ({}, {}{}) → {}",
            a.runtime.device,
            a.runtime.precision,
            ranks_note(&a.runtime),
            out.display()
        );
    }
    let trained = super::launch::run_training(&a.runtime, |rt, comm| {
        let opts = FinetuneOptions { run: RunControl { dist: comm, ..opts.run.clone() }, ..opts.clone() };
        Ok(ctxalign::contextblip::finetune_s1(&files, &a.contextblip, data.clone(), &opts, &rt)?)
    })?;
    let Some((report, rt)) = trained else { return Ok(true) };
    match train_sets {
        Some(sets) => warn_sets_left_out("train", sets, &report.left_out),
        None => {
            let errors: Vec<String> = report.left_out.iter().map(|l| l.error.clone()).collect();
            crate::args::warn_left_out(&format!("{} shard samples left out", errors.len()), &errors);
        }
    }
    print_outcome("S1", &report.outcome, &out);
    report_finetuned(&out, &valid, &rt)
}

#[cfg(feature = "train")]
#[derive(Args)]
pub struct FinetuneS2Args {
    /// The S1 folder (from `finetune-s1`).
    #[arg(long)]
    s1: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    /// Output folder: the complete fine-tuned model folder and its run record; default:
    /// `runs/contextblip-s2` in ctxalign's home folder.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Training epochs.
    #[arg(long, default_value_t = 20, value_parser = crate::args::positive_steps)]
    epochs: u64,
    /// Descriptions per batch (each with its 10 candidates).
    #[arg(long, default_value_t = 36, value_parser = crate::args::positive_count)]
    batch_size: usize,
    /// Learning rate of the inter-context encoder (reference 1e-4).
    #[arg(long, default_value_t = 1e-4, value_parser = crate::args::learning_rate)]
    lr: f64,
    #[command(flatten)]
    run: super::RunArgs,
    #[command(flatten)]
    runtime: TrainingArgs,
}

#[cfg(feature = "train")]
pub fn finetune_s2(a: FinetuneS2Args) -> anyhow::Result<bool> {
    if super::launch::launch_ranks(&a.runtime)? {
        return Ok(true);
    }
    let out = or_default(&a.out, || ctxalign::home::run_dir("contextblip-s2"))?;
    let root = a.data.root()?;
    let (train, _) = a.data.open_split(&root, "train")?;
    let (valid, _) = a.data.open_split(&root, "valid")?;
    require_stage(&a.s1, &[Stage::S1], "S2 (it trains on an S1 folder's features)")?;
    let mut opts = InterContextOptions {
        out_dir: out.clone(),
        epochs: a.epochs,
        batch_size: a.batch_size,
        lr: a.lr,
        run: a.run.control(a.data.bad_input.policy())?,
        ..Default::default()
    };
    opts.run.held_lock = claim_for_job(&a.runtime, &opts.run, &out, "finetune-s2 (ContextBLIP S2)")?;
    let reporting = super::launch::reports(&a.runtime);
    let trained = super::launch::run_training(&a.runtime, |rt, comm| {
        // The frozen S1 features, in the training precision; each rank computes its share of the
        // training sets and the ranks exchange them.
        let options = ScorerOptions { dtype: rt.dtype(), ..Default::default() };
        let scorer =
            BlipScorer::from_files(&ModelFiles::from_dir(&a.s1)?, options, &rt.device)?.with_contextblip(&a.s1)?;
        let b = if reporting && comm.is_primary() {
            bar(train.sets().len(), "training sets: frozen S1 features")
        } else {
            Progress::hidden()
        };
        let features =
            ctxalign::contextblip::candidate_features_shared(&scorer, &train, &comm, &|n| b.set_position(n as u64))?;
        b.finish();
        let opts = InterContextOptions { run: RunControl { dist: comm, ..opts.run.clone() }, ..opts.clone() };
        Ok(ctxalign::contextblip::finetune_s2(&a.s1, features, &opts, &rt)?)
    })?;
    let Some((outcome, rt)) = trained else { return Ok(true) };
    print_outcome("S2", &outcome, &out);
    report_finetuned(&out, &valid, &rt)
}

/// The lock of a job's output folder, taken by the process that reports (rank 0's) for the whole
/// job ([`RunControl::claim_output`]), with the notice of a stale lock it took over printed now.
#[cfg(feature = "train")]
fn claim_for_job(
    runtime: &TrainingArgs,
    run: &RunControl,
    dir: &Path,
    job: &str,
) -> anyhow::Result<Option<std::sync::Arc<ctxalign::data::lock::FolderLock>>> {
    if !super::launch::reports(runtime) {
        return Ok(None);
    }
    let lock = run.claim_output(dir, job)?;
    if let Some(notice) = lock.as_ref().and_then(|l| l.notice()) {
        eprintln!("note: {notice}");
    }
    Ok(lock)
}

/// Prints how a fine-tuning run ended; an interrupted one is not evaluated and exits with status
/// 130 (its checkpoint is saved under `out`).
#[cfg(feature = "train")]
fn print_outcome(stage: &str, outcome: &ctxalign::RunOutcome, out: &Path) {
    super::print_notices(outcome);
    println!("{stage}: {} steps in {:.0} s, final {:?}", outcome.steps, outcome.seconds, outcome.final_terms);
    if outcome.interrupted {
        super::exit_interrupted(outcome.steps, out, "continue with --resume");
    }
}

/// Evaluates a fine-tuned folder on the (checked) valid split in the precision it trained in;
/// prints S1 (and S2) and writes `eval.json`.
#[cfg(feature = "train")]
fn report_finetuned(dir: &Path, valid: &ImageCodeSplit, rt: &Runtime) -> anyhow::Result<bool> {
    let b = bar(valid.sets().len(), "valid sets");
    let r = evaluate_finetuned(dir, valid, &|n| b.set_position(n as u64), rt.dtype(), &rt.device)?;
    b.finish();
    let mut rows = vec![("S1 (candidate head)".to_string(), &r.s1_accuracy)];
    if let Some(acc) = &r.s2_accuracy {
        rows.push(("S2 (+ inter-context encoder)".to_string(), acc));
    }
    println!("{}", group_table("fine-tuned, valid split", &rows));
    let json = serde_json::json!({
        "s1": counts_json(&r.s1_accuracy),
        "s2": r.s2_accuracy.as_ref().map(counts_json),
    });
    write_json(&dir.join("eval.json"), &json)?;
    Ok(true)
}

#[cfg(feature = "train")]
#[derive(Clone, Copy, ValueEnum)]
pub enum SweepKind {
    /// π ∈ {0.25, 0.5, 0.75}
    MaskRatio,
    /// taps ∈ {[last], quarters ([3,6,9,12] for 12 layers), every layer}
    Taps,
    /// δ ∈ {1, 2, 4, 8}
    Reduction,
}

#[cfg(feature = "train")]
#[derive(Args)]
pub struct SweepArgs {
    /// The setting to sweep.
    #[arg(value_enum)]
    kind: SweepKind,
    /// BLIP checkpoint (folder or hub id); default: the shipped small BLIP.
    #[arg(long)]
    model: Option<String>,
    /// IMAGECODE data each setting is evaluated on.
    #[command(flatten)]
    data: DataArgs,
    /// Captions each setting is pre-trained on (needed with --data: the built-in captions belong
    /// to the built-in benchmark).
    #[command(flatten)]
    captions: CaptionArgs,
    /// S0 steps per setting.
    #[arg(long, default_value_t = 200, value_parser = crate::args::positive_steps)]
    steps: u64,
    /// Captioned images per S0 step.
    #[arg(long, default_value_t = 32, value_parser = crate::args::positive_count)]
    batch_size: usize,
    /// Seeds to run each setting with (comma-separated); the table shows mean ± std.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    seeds: Vec<u64>,
    /// Run folders go under here (`<kind>-<value>-seed<s>`). A finished run is reused only when it
    /// was made with these settings (model, captions, steps, batch size, seed, precision): one made
    /// with others is trained again (its folder overwritten, saying why), an interrupted one
    /// continues. Default: `runs/contextblip-sweeps` in ctxalign's home folder.
    #[arg(long)]
    runs: Option<PathBuf>,
    #[command(flatten)]
    runtime: TrainingArgs,
}

/// Pre-trains one ContextBLIP per setting (and seed) and evaluates each zero-shot on the valid
/// split; prints the paper's table layout and writes `<runs>/<kind>.json`.
#[cfg(feature = "train")]
pub fn sweep(a: SweepArgs) -> anyhow::Result<bool> {
    if super::launch::launch_ranks(&a.runtime)? {
        return Ok(true);
    }
    // Every rank pre-trains; the process of rank 0 evaluates and writes the tables. The ranks
    // decide which runs to reuse from the run folders: on several machines, they must share them.
    let reporting = super::launch::reports(&a.runtime);
    let runs = or_default(&a.runs, || ctxalign::home::run_dir("contextblip-sweeps"))?;
    let rt = super::launch::local_runtime(&a.runtime)?;
    let files = blip_files(&a.model)?;
    let blip_cfg = BlipItm::read_config(&files.config)?;
    let layers = blip_cfg.vision_config.num_hidden_layers;
    let base = ContextBlipConfig::for_blip(&blip_cfg);
    // Labels name the run folders: `0.25`, `[1,2,3,4]`, `2`.
    let settings = match a.kind {
        SweepKind::MaskRatio => variants(&base, vec![0.25, 0.5, 0.75], |c, r| c.masking.ratio = *r),
        SweepKind::Taps => {
            variants(&base, vec![vec![layers], base.adapter.taps.clone(), (1..=layers).collect()], |c, t| {
                c.adapter.taps = t.clone()
            })
        }
        SweepKind::Reduction => variants(&base, vec![1, 2, 4, 8], |c, d| c.adapter.reduction = *d),
    };
    let kind = match a.kind {
        SweepKind::MaskRatio => "mask-ratio",
        SweepKind::Taps => "taps",
        SweepKind::Reduction => "reduction",
    };
    let data_root = a.data.root()?;
    if a.data.data.is_some() && a.captions.captions.is_empty() {
        anyhow::bail!(
            "with --data, give the captions to pre-train on (--captions, --image-root): the built-in captions \
             describe the built-in benchmark's images, not yours"
        );
    }
    let items = a.captions.read(&a.data.data_dir)?;
    let (valid, _) = a.data.open_split(&data_root, "valid")?;
    let world_size = super::launch::world_size(&a.runtime)?;
    // The process that reports (rank 0's) holds the runs folder for the whole sweep: a second sweep
    // into it would otherwise write the same tables; each run folder has its own lock besides.
    let _lock = if reporting {
        let lock = ctxalign::data::lock::FolderLock::acquire(&runs, "sweep")?;
        if let Some(notice) = lock.notice() {
            eprintln!("note: {notice}");
        }
        Some(lock)
    } else {
        None
    };
    // BLIP is loaded once; each setting's scorer shares its weights.
    let options = ScorerOptions { dtype: rt.dtype(), ..Default::default() };
    let blip = if reporting { Some(BlipScorer::from_files(&files, options, &rt.device)?) } else { None };
    let mut rows: Vec<(String, Vec<GroupCounts>, usize)> = vec![];
    let mut records = vec![];
    for (label, cfg) in settings {
        let mut per_seed = vec![];
        let mut params = 0;
        for &seed in &a.seeds {
            let dir = runs.join(format!("{kind}-{label}-seed{seed}"));
            let mut opts = PretrainOptions::paper_schedule(dir.clone(), cfg.clone(), a.steps);
            (opts.batch_size, opts.warmup_steps, opts.crop_scale) = (a.batch_size, 30, None);
            opts.run = RunControl {
                seed,
                bad_input: a.data.bad_input.policy(),
                interrupt: crate::interrupt::ctrl_c()?,
                ..RunControl::default()
            };
            // A run is reused only when its recorded settings are this sweep's (the resume check's
            // settings and the steps); the ranks all read the same folder, so they decide alike.
            let existing = ctxalign::contextblip::existing_pretrain_run(&files, &items, &opts, &rt, world_size)?;
            let train = match &existing {
                ctxalign::contextblip::ExistingRun::Finished => false,
                ctxalign::contextblip::ExistingRun::Nothing => true,
                ctxalign::contextblip::ExistingRun::Unfinished { step } => {
                    // Interrupted (or fewer steps than asked now): it continues where it stopped.
                    if reporting {
                        println!("{kind} = {label}, seed {seed}: continuing {} from step {step}", dir.display());
                    }
                    opts.run.resume = true;
                    true
                }
                ctxalign::contextblip::ExistingRun::Different { differences } => {
                    if reporting {
                        println!(
                            "{kind} = {label}, seed {seed}: {} was made with other settings ({}); training it again",
                            dir.display(),
                            differences.join("; ")
                        );
                    }
                    opts.run.overwrite = true;
                    true
                }
            };
            records.push(serde_json::json!({
                "setting": label,
                "seed": seed,
                "run": dir,
                "reused": !train,
            }));
            if train {
                if reporting {
                    println!("{kind} = {label}, seed {seed}: pre-training → {}", dir.display());
                }
                let trained = super::launch::run_training(&a.runtime, |rt, comm| {
                    let opts = PretrainOptions { run: RunControl { dist: comm, ..opts.run.clone() }, ..opts.clone() };
                    Ok(ctxalign::contextblip::pretrain(&files, items.clone(), &opts, &rt)?)
                })?;
                if trained.is_some_and(|(report, _)| report.outcome.interrupted) {
                    eprintln!("interrupted: {} keeps its checkpoint; run the sweep again to continue", dir.display());
                    std::process::exit(crate::interrupt::INTERRUPTED_EXIT_CODE);
                }
            }
            let Some(blip) = &blip else { continue };
            let scorer = blip.clone().with_contextblip(&dir)?;
            params = scorer.adapter.as_ref().map_or(0, |c| c.adapter.num_parameters());
            let b = bar(valid.sets().len(), &format!("valid sets · {kind} {label} seed {seed}"));
            per_seed.push(imagecode_zero_shot(&scorer, &valid, &|n| b.set_position(n as u64))?.itm.accuracy);
            b.finish();
        }
        rows.push((label, per_seed, params));
    }
    if !reporting {
        return Ok(true);
    }
    let cell = |accs: &[GroupCounts], g: &str| -> String {
        let v: Vec<f64> = accs.iter().filter_map(|a| share(a, g)).map(|x| 100.0 * x).collect();
        mean_spread(&v)
    };
    let table = match a.kind {
        SweepKind::Reduction => {
            let mut header = vec!["Type".to_string()];
            header.extend(rows.iter().map(|r| r.0.clone()));
            let mut t = Table::new(header);
            for (name, g) in [("All", "all"), ("Video", "video"), ("Static", "static")] {
                let mut cells = vec![name.to_string()];
                cells.extend(rows.iter().map(|r| cell(&r.1, g)));
                t.row(cells);
            }
            t
        }
        _ => {
            let first = if matches!(a.kind, SweepKind::Taps) { "Layer" } else { "Mask Ratio" };
            let mut header = vec![first, "All", "Video", "Image"];
            if matches!(a.kind, SweepKind::Taps) {
                header.push("Adapter params");
            }
            let mut t = Table::new(header);
            for (label, accs, params) in &rows {
                let mut cells = vec![label.clone(), cell(accs, "all"), cell(accs, "video"), cell(accs, "static")];
                if matches!(a.kind, SweepKind::Taps) {
                    cells.push(params.to_string());
                }
                t.row(cells);
            }
            t
        }
    };
    println!("{table}");
    println!("zero-shot ITM accuracy (%) on the valid split, mean ± std over seeds {:?}", a.seeds);
    let json: Vec<serde_json::Value> = rows
        .iter()
        .map(|(label, accs, params)| serde_json::json!({"setting": label, "adapter_parameters": params, "seeds": a.seeds, "accuracy": accs.iter().map(counts_json).collect::<Vec<_>>()}))
        .collect();
    // What every run of the table was made with: a table is only comparable to one of the same
    // settings.
    let captions: Vec<String> = match a.captions.captions.is_empty() {
        true => vec!["built-in".into()],
        false => a.captions.captions.iter().map(|p| p.display().to_string()).collect(),
    };
    let record = serde_json::json!({
        "kind": kind,
        "settings": {
            "model": files.config.parent().map(|p| p.display().to_string()),
            "captions": captions,
            "captions_fingerprint": ctxalign::caption_items_fingerprint(&items),
            "data": data_root,
            "steps": a.steps,
            "batch_size": a.batch_size,
            "world_size": world_size,
            "seeds": a.seeds,
            "precision": rt.precision,
        },
        "runs": records,
        "rows": json,
    });
    write_json(&runs.join(format!("{kind}.json")), &record)?;
    ctxalign::data::write_atomic(&runs.join(format!("{kind}.md")), table.to_string().as_bytes())?;
    Ok(true)
}

/// One configuration per value, labelled by the value (`Debug`, spaces removed).
#[cfg(feature = "train")]
fn variants<T: std::fmt::Debug>(
    base: &ContextBlipConfig,
    values: Vec<T>,
    set: impl Fn(&mut ContextBlipConfig, &T),
) -> Vec<(String, ContextBlipConfig)> {
    values
        .into_iter()
        .map(|v| {
            let mut c = base.clone();
            set(&mut c, &v);
            (format!("{v:?}").replace(' ', ""), c)
        })
        .collect()
}

#[derive(Args)]
pub struct MmvpArgs {
    /// MMVP-VLM root (`Questions.csv`, `MMVP_VLM_Images/`).
    #[arg(long)]
    data: PathBuf,
    /// BLIP checkpoint (folder or hub id); default: the shipped small BLIP.
    #[arg(long)]
    model: Option<String>,
    /// ContextBLIP folders to evaluate besides plain BLIP (repeatable).
    #[arg(long)]
    contextblip: Vec<PathBuf>,
    #[command(flatten)]
    bad_input: BadInputArgs,
    #[command(flatten)]
    runtime: InferenceArgs,
}

pub fn mmvp(a: MmvpArgs) -> anyhow::Result<bool> {
    use ctxalign::data::image::check_image;
    use ctxalign::data::loader::find_unusable;
    let device = a.runtime.open()?;
    let pairs = ctxalign::data::mmvp::read_mmvp(&a.data)?;
    // Both images of every pair are checked before the first score.
    let bad = find_unusable(
        &pairs,
        "pairs",
        a.bad_input.policy(),
        |p| format!("pair {}/{}", p.qids[0], p.qids[1]),
        |p| p.images.iter().try_for_each(|i| check_image(i, DecodeOptions::default()).map(drop)).map_err(Into::into),
    )?;
    let total = pairs.len();
    let errors: Vec<String> = bad.iter().map(|s| s.error.clone()).collect();
    crate::args::warn_left_out(&format!("{} of {total} pairs left out", bad.len()), &errors);
    let pairs = ctxalign::data::loader::without_unusable(pairs, &bad);
    let files = blip_files(&a.model)?;
    let mut reports = vec![];
    let options = ScorerOptions { dtype: a.runtime.dtype, ..Default::default() };
    for (name, scorer) in scorers(&files, &options, &a.contextblip, &device)? {
        let report = ctxalign::evaluate::mmvp(&scorer, &pairs)?;
        reports.push((name, report));
    }
    let mut patterns: Vec<String> = reports[0].1.accuracy.keys().filter(|k| *k != "all").cloned().collect();
    patterns.sort();
    let mut header = vec!["MMVP-VLM (pairs both right, %)".to_string(), "all".into()];
    header.extend(patterns.iter().cloned());
    let mut t = Table::new(header);
    for (name, r) in &reports {
        let mut cells = vec![name.clone(), percent(&r.accuracy, "all")];
        cells.extend(patterns.iter().map(|p| percent(&r.accuracy, p)));
        t.row(cells);
    }
    println!("{t}");
    Ok(true)
}

//! `score` and `show-mask`: one description against a few images with BLIP (and a ContextBLIP
//! adapter).

use std::path::PathBuf;

use clap::Args;

use super::{blip_files, or_default};
use crate::runtime_args::InferenceArgs;
use ctxalign::data::CaptionCleaning;
use ctxalign::eval::Table;
use ctxalign::models::contextblip::{require_stage, Stage};
use ctxalign::{visualize, BlipScorer, ScorerOptions};

#[derive(Args)]
pub struct ScoreArgs {
    /// Model folder (HF layout) or hub id, e.g. Salesforce/blip-itm-base-coco. Default: the
    /// small self-trained model shipped with ctxalign (knows only Vignettes scenes).
    #[arg(long)]
    pub model: Option<String>,
    /// An image file; repeat for several.
    #[arg(long = "image", required = true)]
    pub images: Vec<PathBuf>,
    /// The description.
    #[arg(long)]
    pub text: String,
    /// Keep at most this many words of the description (BLIP's pre_caption).
    #[arg(long, default_value_t = 30, value_parser = crate::args::positive_count)]
    pub max_words: usize,
    /// Keep at most this many tokens, [CLS] and [SEP] included.
    #[arg(long, default_value_t = 35, value_parser = crate::args::token_budget)]
    pub max_tokens: usize,
    /// Whose bicubic resize and center crop to reproduce: pillow (the authors' code), torchvision
    /// (HF's fast processors) or transformers-pil (HF's PIL processors, transformers 4.x's
    /// default); default: what the model's preprocessor config says.
    #[arg(long)]
    pub resize_mode: Option<ctxalign::data::ResizeMode>,
    #[command(flatten)]
    pub runtime: InferenceArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn score(a: ScoreArgs) -> anyhow::Result<bool> {
    let device = a.runtime.open()?;
    let options = ScorerOptions {
        dtype: a.runtime.dtype,
        cleaning: CaptionCleaning::blip(a.max_words),
        max_tokens: a.max_tokens,
        resize_mode: a.resize_mode,
        ..Default::default()
    };
    let scorer = BlipScorer::from_files(&blip_files(&a.model)?, options, &device)?;
    let (encoded, warnings) = scorer.encode_image_files_reporting(&a.images)?;
    crate::args::warn_decoded(&warnings);
    let report = scorer.score(&a.text, &encoded)?;
    if a.json {
        let rows: Vec<_> =
            a.images.iter().zip(&report.scores).map(|(p, s)| serde_json::json!({"image": p, "score": s})).collect();
        let out = serde_json::json!({"text": a.text, "truncated": report.truncated, "best": a.images[report.best], "images": rows});
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(true);
    }
    let mut table = Table::new(["image", "ITM p(match)", "ITC cosine", ""]);
    for (i, (path, s)) in a.images.iter().zip(&report.scores).enumerate() {
        let mark = if i == report.best { "<- best" } else { "" };
        table.row([
            path.display().to_string(),
            format!("{:.4}", s.itm_probability),
            format!("{:.4}", s.itc_similarity),
            mark.to_string(),
        ]);
    }
    print!("{table}");
    if report.truncated {
        println!("note: the description was truncated to {} words / {} tokens", a.max_words, a.max_tokens);
    }
    println!("best image: {}", a.images[report.best].display());
    Ok(true)
}

#[derive(Args)]
pub struct ShowMaskArgs {
    /// BLIP folder or hub id (default: the shipped small BLIP).
    #[arg(long)]
    pub model: Option<String>,
    /// A ContextBLIP folder whose adapter to apply (plain BLIP when absent).
    #[arg(long)]
    pub contextblip: Option<PathBuf>,
    /// The candidate images (repeat), or one image.
    #[arg(long = "image", required = true)]
    pub images: Vec<PathBuf>,
    /// The description.
    #[arg(long)]
    pub text: String,
    /// The word whose attention guides the mask (its first WordPiece token).
    #[arg(long)]
    pub word: String,
    /// Which candidate gets the mask view (default: the best by ITM).
    #[arg(long)]
    pub target: Option<usize>,
    /// Mask ratio π, in [0, 1).
    #[arg(long, default_value_t = 0.25, value_parser = crate::args::proportion)]
    pub ratio: f64,
    /// The picture to write (PNG, or the format its extension names); default: mask.png in
    /// ctxalign's results folder (`$CTXALIGN_HOME/results`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub runtime: InferenceArgs,
}

pub fn show_mask(a: ShowMaskArgs) -> anyhow::Result<bool> {
    let out = or_default(&a.out, || ctxalign::home::results_file("mask.png"))?;
    crate::args::check_output_file(&out)?;
    let format = image::ImageFormat::from_path(&out).unwrap_or(image::ImageFormat::Png);
    if let Some(t) = a.target.filter(|&t| t >= a.images.len()) {
        anyhow::bail!("--target {t}: there are only {} images (0..{})", a.images.len(), a.images.len() - 1);
    }
    let device = a.runtime.open()?;
    let options = ScorerOptions { dtype: a.runtime.dtype, ..Default::default() };
    let mut scorer = BlipScorer::from_files(&blip_files(&a.model)?, options, &device)?;
    if let Some(dir) = &a.contextblip {
        require_stage(dir, &[Stage::S0], "the mask picture (it applies a pre-trained adapter to --model's BLIP)")?;
        scorer = scorer.with_contextblip(dir)?;
    }
    let report = scorer.score(&a.text, &scorer.encode_image_files(&a.images)?)?;
    let chosen = a.target.unwrap_or(report.best);
    let image = &a.images[chosen];
    let mask = visualize::word_mask(&scorer, image, &a.text, &a.word, a.ratio)?;
    let title = format!("\"{}\" on image {chosen}: attention (red) and masked patches (hatched)", a.word);
    let mut parts = vec![visualize::render_mask(image, &mask, &title)?];
    if a.images.len() > 1 {
        let paths: Vec<&std::path::Path> = a.images.iter().map(PathBuf::as_path).collect();
        let scores: Vec<f32> = report.scores.iter().map(|s| s.itm_probability).collect();
        parts.push(visualize::render_candidates(&paths, &scores, a.target)?);
    }
    let mut encoded = std::io::Cursor::new(Vec::new());
    visualize::stack(&parts).write_to(&mut encoded, format)?;
    ctxalign::data::write_atomic(&out, encoded.get_ref())?;
    println!("{} (masked patches {:?}; best by ITM: image {})", out.display(), mask.masked, report.best);
    Ok(true)
}

/// `ctxalign train-backbone`: a BLIP from scratch (ITC, then ITC + ITM on hard negatives).
#[cfg(feature = "train")]
#[derive(Args)]
pub struct TrainBackboneArgs {
    /// BLIP-format caption JSON files (repeatable); default: the built-in benchmark's training
    /// captions.
    #[arg(long)]
    pub captions: Vec<PathBuf>,
    /// Folder the caption files' image paths are relative to.
    #[arg(long)]
    pub image_root: Option<PathBuf>,
    /// Where the built-in benchmark is generated (once) when no --captions are given; default:
    /// `vignettes-default` in ctxalign's home folder.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The model folder to write (HF layout); default: `runs/blip-backbone` in ctxalign's home
    /// folder.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The stages' run folders (checkpoints, metrics); default: `training/` inside --out.
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Steps of stage 1: ITC alone, on each image's first caption (0 skips it).
    #[arg(long, default_value_t = 300)]
    pub itc_steps: u64,
    /// Steps of stage 2: ITC + hard-negative ITM (0 skips it).
    #[arg(long, default_value_t = 300)]
    pub steps: u64,
    /// Steps of stage 3: ITC + hard-negative ITM on every image, groups of near-identical images
    /// kept together in a batch (stages 1 and 2 train on the images in no group). Needs grouped
    /// images: --contrast-groups, or `"group"` fields in the --captions files.
    #[arg(long, default_value_t = 0)]
    pub contrast_steps: u64,
    /// Multiplies the ITC logits stages 2 and 3 draw ITM's negatives from: 1 is BLIP's
    /// softmax(sim/τ), 0 uniform among the batch's other images and texts (easy negatives, which a
    /// matcher from scratch needs to start learning; in stage 3 a group's other images are still
    /// among them).
    #[arg(long, default_value_t = 1.0, value_parser = crate::args::non_negative)]
    pub negative_sharpness: f64,
    /// Train stages 2 and 3 on every caption of each image (a random one per epoch), not the first
    /// only.
    #[arg(long)]
    pub all_captions: bool,
    /// Start from this BLIP folder (HF layout, with its tokenizer.json) instead of from scratch:
    /// its shape, vocabulary, weights and temperature (set --itc-steps 0 to skip the warm-up).
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Add the built-in benchmark's contrast corpus of this many groups to its training captions
    /// (generated once, beside them): groups of ten near-identical scenes, each image described by
    /// statements false of the other nine. Batches keep a group together, so ITM's hard negatives
    /// are the group's other images. 0: none. (With --captions, give groups in the caption files'
    /// `"group"` fields instead.)
    #[arg(long, default_value_t = 0)]
    pub contrast_groups: usize,
    /// Descriptions per image of the contrast corpus, at most.
    #[arg(long, default_value_t = 3, value_parser = crate::args::positive_count)]
    pub contrast_descriptions: usize,
    /// Tokens kept per caption (the model's text positions are the limit).
    #[arg(long, default_value_t = 40, value_parser = crate::args::positive_count)]
    pub max_tokens: usize,
    /// Captioned images per step (per rank).
    #[arg(long, default_value_t = 32, value_parser = crate::args::positive_count)]
    pub batch_size: usize,
    /// Peak AdamW learning rate of each stage, reached after the warm-up, cosine-decayed to 10 %.
    #[arg(long, default_value_t = 3e-4, value_parser = crate::args::learning_rate)]
    pub lr: f64,
    /// Peak learning rate of the parts only ITM trains (cross-attention, ITM head).
    #[arg(long, default_value_t = 1e-3, value_parser = crate::args::learning_rate)]
    pub itm_lr: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.05, value_parser = crate::args::non_negative)]
    pub weight_decay: f64,
    /// Linear warm-up steps at the start of each stage.
    #[arg(long, default_value_t = 20)]
    pub warmup_steps: u64,
    #[command(flatten)]
    pub shards: super::ShardArgs,
    #[command(flatten)]
    pub run: super::RunArgs,
    #[command(flatten)]
    pub bad_input: crate::args::BadInputArgs,
    #[command(flatten)]
    pub runtime: crate::runtime_args::TrainingArgs,
}

#[cfg(feature = "train")]
impl TrainBackboneArgs {
    /// The recipe's options from these arguments (the model shape: the shipped default's).
    pub fn options(&self) -> anyhow::Result<ctxalign::backbone::BackboneOptions> {
        let out = or_default(&self.out, || ctxalign::home::run_dir("blip-backbone"))?;
        let run_dir = self.run_dir.clone().unwrap_or_else(|| out.join("training"));
        Ok(ctxalign::backbone::BackboneOptions {
            itc_steps: self.itc_steps,
            steps: self.steps,
            contrast_steps: self.contrast_steps,
            negative_sharpness: self.negative_sharpness,
            all_captions: self.all_captions,
            init: self.init.clone(),
            batch_size: self.batch_size,
            lr: self.lr,
            itm_lr: self.itm_lr,
            weight_decay: self.weight_decay,
            warmup_steps: self.warmup_steps,
            max_tokens: self.max_tokens,
            run: self.run.control(self.bad_input.policy())?,
            ..ctxalign::backbone::BackboneOptions::vignettes_small(out, run_dir)
        })
    }

    /// The shards, the given caption files, else the built-in benchmark's training captions.
    pub fn data(&self) -> anyhow::Result<ctxalign::CaptionSource> {
        match self.shards.source() {
            Some(_) if !self.captions.is_empty() => anyhow::bail!("give --captions or --shards, not both"),
            Some(_) if self.contrast_groups > 0 => {
                anyhow::bail!("--contrast-groups adds to the built-in captions, not to --shards")
            }
            Some(shards) => Ok(ctxalign::CaptionSource::Shards(shards)),
            None => Ok(ctxalign::CaptionSource::Files(self.items()?)),
        }
    }

    /// The given caption files, else the built-in benchmark's training captions (and its contrast
    /// corpus with --contrast-groups).
    pub fn items(&self) -> anyhow::Result<Vec<ctxalign::data::captions::CaptionedImage>> {
        use ctxalign::data::captions::read_caption_json;
        use ctxalign::data::vignettes::{ensure_contrast_captions, read_config};
        if self.captions.is_empty() {
            let benchmark = super::builtin_benchmark(&self.data_dir)?;
            let dir = benchmark.join("captions");
            let mut items = read_caption_json(&dir.join("train.json"), &dir)?;
            if self.contrast_groups > 0 {
                let config = read_config(&benchmark)?;
                let bar = ctxalign::eval::progress::Progress::new(self.contrast_groups as u64, "contrast groups");
                let file =
                    ensure_contrast_captions(&config, self.contrast_groups, self.contrast_descriptions, &dir, &|n| {
                        bar.set_position(n as u64)
                    })?;
                bar.finish();
                items.extend(read_caption_json(&file, &dir)?);
            }
            return Ok(items);
        }
        if self.contrast_groups > 0 {
            anyhow::bail!("--contrast-groups adds to the built-in captions; with --captions, give groups in the files' `group` fields");
        }
        let root = self.image_root.clone().ok_or_else(|| anyhow::anyhow!("--captions needs --image-root"))?;
        Ok(ctxalign::contextblip::read_caption_files(&self.captions, &root)?)
    }
}

/// Trains the backbone (on every rank this process holds) and returns rank 0's report, or `None`
/// in a process without rank 0.
#[cfg(feature = "train")]
pub fn run_backbone(a: &TrainBackboneArgs) -> anyhow::Result<Option<ctxalign::backbone::BackboneReport>> {
    use ctxalign::backbone::{train_backbone, BackboneOptions};
    let opts = a.options()?;
    let data = a.data()?;
    if super::launch::reports(&a.runtime) {
        println!(
            "training BLIP {} on {} ({}, {}{}), batch {}: {} ITC steps, then {} ITC + ITM, then {} ITC + ITM with groups",
            a.init.as_ref().map_or("from scratch".to_string(), |dir| format!("from {}", dir.display())),
            super::contextblip::source_name(&data),
            a.runtime.device,
            a.runtime.precision,
            super::contextblip::ranks_note(&a.runtime),
            a.batch_size,
            a.itc_steps,
            a.steps,
            a.contrast_steps
        );
    }
    let trained = super::launch::run_training(&a.runtime, |rt, comm| {
        let opts = BackboneOptions { run: ctxalign::RunControl { dist: comm, ..opts.run.clone() }, ..opts.clone() };
        Ok(train_backbone(data.clone(), &opts, &rt)?)
    })?;
    let Some((report, _)) = trained else { return Ok(None) };
    let left_out: Vec<String> = report.left_out.iter().map(|s| s.error.clone()).collect();
    crate::args::warn_left_out(&format!("{} captioned images left out", left_out.len()), &left_out);
    for s in &report.stages {
        super::print_notices(&s.outcome);
    }
    let mut table = Table::new(["stage", "steps", "final loss terms", "samples/s"]);
    for s in &report.stages {
        let terms: Vec<String> = s.outcome.final_terms.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
        table.row([
            s.stage.clone(),
            s.outcome.steps.to_string(),
            terms.join(", "),
            format!("{:.1}", s.outcome.samples_per_second),
        ]);
    }
    println!("{table}");
    if report.interrupted {
        super::exit_interrupted(
            report.stages.last().map_or(0, |s| s.outcome.steps),
            &opts.run_dir,
            "continue with --resume",
        );
    }
    println!(
        "BLIP with {} parameters ({} ids), final temperature {:?}: {}",
        report.parameters,
        report.vocab_size,
        report.final_temperature,
        report.out_dir.display()
    );
    Ok(Some(report))
}

/// `ctxalign train-backbone`.
#[cfg(feature = "train")]
pub fn train_backbone(a: TrainBackboneArgs) -> anyhow::Result<bool> {
    if super::launch::launch_ranks(&a.runtime)? {
        return Ok(true);
    }
    run_backbone(&a)?;
    Ok(true)
}

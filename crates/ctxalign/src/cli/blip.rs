//! `score` and `show-mask`: one description against a few images with BLIP (and a ContextBLIP
//! adapter).

use std::path::PathBuf;

use clap::Args;

use super::{blip_files, or_default};
use crate::data::CaptionCleaning;
use crate::device::InferenceArgs;
use crate::eval::Table;
use crate::models::contextblip::{require_stage, Stage};
use crate::{visualize, BlipScorer, ScorerOptions};

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
    /// Whose bicubic resize to reproduce: pillow (the authors' code) or torchvision (HF's fast
    /// processors); default: what the model's preprocessor config says.
    #[arg(long)]
    pub resize_mode: Option<crate::data::ResizeMode>,
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
    let encoded = scorer.encode_image_files(&a.images)?;
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
    let out = or_default(&a.out, || crate::home::results_file("mask.png"))?;
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
    crate::data::write_atomic(&out, encoded.get_ref())?;
    println!("{} (masked patches {:?}; best by ITM: image {})", out.display(), mask.masked, report.best);
    Ok(true)
}

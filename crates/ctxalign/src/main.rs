//! `ctxalign`: the user command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// See `ctxalign::alloc`: reusing freed memory avoids re-zeroing pages on every tensor op.
#[global_allocator]
static GLOBAL: ctxalign::alloc::MiMalloc = ctxalign::alloc::MiMalloc;
use ctxalign::data::CaptionCleaning;
use ctxalign::device::InferenceArgs;
use ctxalign::eval::Table;
use ctxalign::models::ModelSource;
use ctxalign::{visualize, BlipScorer, ScorerOptions};

#[derive(Parser)]
#[command(
    name = "ctxalign",
    version,
    about = "Contextual image-text alignment (BLIP ITM/ITC, ContextBLIP, ContextCLIP)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Score one description against images: ITM match probability, ITC similarity, best image.
    Score {
        /// Model folder (HF layout) or hub id, e.g. Salesforce/blip-itm-base-coco. Default: the
        /// small self-trained model in models/blip-vignettes-small (knows only Vignettes scenes).
        #[arg(long)]
        model: Option<String>,
        /// An image file; repeat for several.
        #[arg(long = "image", required = true)]
        images: Vec<PathBuf>,
        /// The description.
        #[arg(long)]
        text: String,
        /// Keep at most this many words of the description (BLIP's pre_caption).
        #[arg(long, default_value_t = 30, value_parser = ctxalign::args::positive_count)]
        max_words: usize,
        /// Keep at most this many tokens, [CLS] and [SEP] included.
        #[arg(long, default_value_t = 35, value_parser = ctxalign::args::token_budget)]
        max_tokens: usize,
        /// Whose bicubic resize to reproduce: pillow (the authors' code) or torchvision (HF's fast
        /// processors); default: what the model's preprocessor config says.
        #[arg(long)]
        resize_mode: Option<ctxalign::data::ResizeMode>,
        #[command(flatten)]
        runtime: InferenceArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Draw ContextBLIP's text-guided mask of one word over an image, and the candidates of a set
    /// with their ITM scores, into one PNG.
    ShowMask {
        /// BLIP folder or hub id (default: the shipped small BLIP).
        #[arg(long)]
        model: Option<String>,
        /// A ContextBLIP folder whose adapter to apply (plain BLIP when absent).
        #[arg(long)]
        contextblip: Option<PathBuf>,
        /// The candidate images (repeat), or one image.
        #[arg(long = "image", required = true)]
        images: Vec<PathBuf>,
        /// The description.
        #[arg(long)]
        text: String,
        /// The word whose attention guides the mask (its first WordPiece token).
        #[arg(long)]
        word: String,
        /// Which candidate gets the mask view (default: the best by ITM).
        #[arg(long)]
        target: Option<usize>,
        /// Mask ratio π, in [0, 1).
        #[arg(long, default_value_t = 0.25, value_parser = ctxalign::args::proportion)]
        ratio: f64,
        /// The picture to write (PNG, or the format its extension names).
        #[arg(long, default_value = "mask.png")]
        out: PathBuf,
        #[command(flatten)]
        runtime: InferenceArgs,
    },
}

fn main() -> ExitCode {
    ctxalign::alloc::retain_freed_memory();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    match cli.command {
        Command::Score { model, images, text, max_words, max_tokens, resize_mode, runtime, json } => {
            let device = runtime.open()?;
            let options = ScorerOptions {
                dtype: runtime.dtype,
                cleaning: CaptionCleaning::blip(max_words),
                max_tokens,
                resize_mode,
                ..Default::default()
            };
            let source = match &model {
                Some(spec) => ModelSource::parse(spec),
                None => ModelSource::Dir(ctxalign::default_model_dir()),
            };
            let files = source.resolve()?;
            let scorer = BlipScorer::from_files(&files, options, &device)?;
            let encoded = scorer.encode_image_files(&images)?;
            let report = scorer.score(&text, &encoded)?;
            if json {
                let rows: Vec<_> = images
                    .iter()
                    .zip(&report.scores)
                    .map(|(p, s)| serde_json::json!({"image": p, "score": s}))
                    .collect();
                let out = serde_json::json!({"text": text, "truncated": report.truncated, "best": images[report.best], "images": rows});
                println!("{}", serde_json::to_string_pretty(&out)?);
                return Ok(());
            }
            let mut table = Table::new(["image", "ITM p(match)", "ITC cosine", ""]);
            for (i, (path, s)) in images.iter().zip(&report.scores).enumerate() {
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
                println!("note: the description was truncated to {max_words} words / {max_tokens} tokens");
            }
            println!("best image: {}", images[report.best].display());
            Ok(())
        }
        Command::ShowMask { model, contextblip, images, text, word, target, ratio, out, runtime } => {
            ctxalign::args::check_output_file(&out)?;
            let format = image::ImageFormat::from_path(&out).unwrap_or(image::ImageFormat::Png);
            if let Some(t) = target.filter(|&t| t >= images.len()) {
                return Err(
                    format!("--target {t}: there are only {} images (0..{})", images.len(), images.len() - 1).into()
                );
            }
            let device = runtime.open()?;
            let source = match &model {
                Some(spec) => ModelSource::parse(spec),
                None => ModelSource::Dir(ctxalign::default_model_dir()),
            };
            let options = ScorerOptions { dtype: runtime.dtype, ..Default::default() };
            let mut scorer = BlipScorer::from_files(&source.resolve()?, options, &device)?;
            if let Some(dir) = &contextblip {
                let purpose = "the mask picture (it applies a pre-trained adapter to --model's BLIP)";
                ctxalign::models::contextblip::require_stage(
                    dir,
                    &[ctxalign::models::contextblip::Stage::S0],
                    purpose,
                )?;
                scorer = scorer.with_contextblip(dir)?;
            }
            let report = scorer.score(&text, &scorer.encode_image_files(&images)?)?;
            let chosen = target.unwrap_or(report.best);
            let image = &images[chosen];
            let mask = visualize::word_mask(&scorer, image, &text, &word, ratio)?;
            let title = format!("\"{word}\" on image {chosen}: attention (red) and masked patches (hatched)");
            let mut parts = vec![visualize::render_mask(image, &mask, &title)?];
            if images.len() > 1 {
                let paths: Vec<&std::path::Path> = images.iter().map(PathBuf::as_path).collect();
                let scores: Vec<f32> = report.scores.iter().map(|s| s.itm_probability).collect();
                parts.push(visualize::render_candidates(&paths, &scores, target)?);
            }
            let mut encoded = std::io::Cursor::new(Vec::new());
            visualize::stack(&parts).write_to(&mut encoded, format)?;
            ctxalign::data::write_atomic(&out, encoded.get_ref())?;
            println!("{} (masked patches {:?}; best by ITM: image {})", out.display(), mask.masked, report.best);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every option and argument of every subcommand says what it is in `--help`.
    #[test]
    fn every_option_has_help_text() {
        let out = ctxalign::args::options_without_help(&super::Cli::command());
        assert!(out.is_empty(), "options without help text: {out:#?}");
    }
}

//! `cargo xtask synth`: writes the Vignettes benchmark (see `ctxalign::data::vignettes`).

use std::path::PathBuf;

use clap::Args;
use ctxalign::data::vignettes::{write_benchmark, Difficulty, VignettesConfig};
use ctxalign::eval::progress::Progress;
use ctxalign::eval::Table;

#[derive(Args)]
pub struct SynthArgs {
    /// Output folder (created).
    #[arg(long)]
    out: PathBuf,
    /// Random seed of the scenes, descriptions and captions.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Image side in pixels.
    #[arg(long, default_value_t = 96)]
    size: u32,
    /// easy | medium | hard
    #[arg(long, default_value = "medium")]
    difficulty: Difficulty,
    /// IMAGECODE-format training sets (10 images each).
    #[arg(long, default_value_t = 1000)]
    train_sets: usize,
    /// Validation sets.
    #[arg(long, default_value_t = 200)]
    valid_sets: usize,
    /// Test sets (descriptions unlabeled; labels in test_labels.json).
    #[arg(long, default_value_t = 200)]
    test_sets: usize,
    /// Share of video sets; the rest are static.
    #[arg(long, default_value_t = 0.5)]
    video_share: f64,
    /// Descriptions written per set, each of a different target image.
    #[arg(long, default_value_t = 2)]
    descriptions_per_set: usize,
    /// Captioned images (BLIP caption JSON), for pre-training and retrieval.
    #[arg(long, default_value_t = 4000)]
    caption_images: usize,
    /// Images per class of the classification folders.
    #[arg(long, default_value_t = 60)]
    class_images: usize,
}

pub fn run(a: SynthArgs) -> anyhow::Result<bool> {
    let cfg = VignettesConfig {
        seed: a.seed,
        image_size: a.size,
        difficulty: a.difficulty,
        train_sets: a.train_sets,
        valid_sets: a.valid_sets,
        test_sets: a.test_sets,
        video_share: a.video_share,
        descriptions_per_set: a.descriptions_per_set,
        caption_images: a.caption_images,
        captions_per_image: 5,
        class_images: a.class_images,
    };
    let total = (cfg.train_sets + cfg.valid_sets + cfg.test_sets) * 10 + cfg.caption_images + cfg.class_images * 24;
    let bar = Progress::new(total as u64, "images");
    let report = write_benchmark(&cfg, &a.out, &|n| bar.set_position(n as u64))?;
    bar.finish();

    let mut t = Table::new(["split", "sets", "descriptions"]);
    for (split, n) in &report.sets {
        t.row([split.clone(), n.to_string(), report.descriptions.get(split).copied().unwrap_or(0).to_string()]);
    }
    println!("{t}");
    let mut t = Table::new(["category", "descriptions"]);
    for (c, n) in &report.categories {
        t.row([c.clone(), n.to_string()]);
    }
    println!("{t}");
    println!(
        "sets: {} video, {} static; description words: mean {:.1}, min {}, max {}",
        report.video_sets, report.static_sets, report.words_mean, report.words_min, report.words_max
    );
    println!(
        "caption images: {}, classification images: {}; {} images in {:.1} s ({:.0} images/s)",
        report.caption_images,
        report.class_images,
        report.images_written,
        report.seconds,
        report.images_written as f64 / report.seconds
    );
    println!("written to {} (report.json, config.json)", a.out.display());
    Ok(true)
}

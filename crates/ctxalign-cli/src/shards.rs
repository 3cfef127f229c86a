//! `ctxalign shards`: writes captioned images or an IMAGECODE split as WebDataset tar shards, the
//! form large training sets are streamed in.

use std::path::PathBuf;

use clap::Args;

use crate::args::{positive_count, warn_left_out, BadInputArgs};
use ctxalign::data::imagecode::ImageCodeSplit;
use ctxalign::data::shards::{write_caption_shards, write_imagecode_shards, ShardOptions, ShardWriteReport};
use ctxalign::eval::Table;

/// What to shard and how.
#[derive(Args)]
pub struct ShardsArgs {
    /// BLIP-format caption JSON files to shard, one sample per image (repeatable; needs
    /// --image-root); default: the built-in benchmark's training captions.
    #[arg(long, conflicts_with = "imagecode")]
    captions: Vec<PathBuf>,
    /// Folder the caption files' image paths are relative to (each sample's json records the image
    /// path relative to it).
    #[arg(long, conflicts_with = "imagecode")]
    image_root: Option<PathBuf>,
    /// An IMAGECODE root (`train_data.json`, `image-sets/`, …) to shard instead, one sample per set:
    /// its ten images and its descriptions.
    #[arg(long)]
    imagecode: Option<PathBuf>,
    /// The IMAGECODE split to shard: train, valid or test (default: train).
    #[arg(long, requires = "imagecode", value_parser = ["train", "valid", "test"])]
    split: Option<String>,
    /// Where the built-in benchmark is generated (once) when no data is given; default:
    /// `vignettes-default` in ctxalign's home folder.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Output folder of the shards (created): `<prefix>-000000.tar`, `<prefix>-000001.tar`, ….
    #[arg(long)]
    out: PathBuf,
    /// Shard file names start with this.
    #[arg(long, default_value = "shards")]
    prefix: String,
    /// Samples per shard at most (data-parallel training needs at least one shard per rank, better
    /// several per reader thread).
    #[arg(long, default_value_t = 1000, value_parser = positive_count)]
    max_count: usize,
    /// Megabytes (10^6 bytes) per shard at most; a larger sample gets a shard of its own.
    #[arg(long, default_value_t = 1024, value_parser = positive_count)]
    max_size: usize,
    /// Replace the shards with this prefix already in --out (those numbered past the new last one
    /// are removed).
    #[arg(long)]
    overwrite: bool,
    #[command(flatten)]
    bad_input: BadInputArgs,
}

/// Writes the shards; prints what was written, what was left out and the pattern to train on.
pub fn shards(a: ShardsArgs) -> anyhow::Result<bool> {
    let options = ShardOptions {
        prefix: a.prefix.clone(),
        max_count: a.max_count,
        max_bytes: (a.max_size as u64).saturating_mul(1_000_000),
        overwrite: a.overwrite,
        policy: a.bad_input.policy(),
        ..Default::default()
    };
    let (what, inputs, report): (&str, usize, ShardWriteReport) = match &a.imagecode {
        Some(root) => {
            let split_name = a.split.as_deref().unwrap_or("train");
            let split = ImageCodeSplit::open(root, split_name)?;
            let sets = split.sets().len();
            println!(
                "sharding {sets} IMAGECODE {split_name} sets ({} descriptions) into {}",
                split.examples.len(),
                a.out.display()
            );
            ("sets", sets, write_imagecode_shards(&split, &a.out, &options)?)
        }
        None => {
            let (items, root) = if a.captions.is_empty() {
                let dir = super::builtin_benchmark(&a.data_dir)?.join("captions");
                (ctxalign::data::captions::read_caption_json(&dir.join("train.json"), &dir)?, dir)
            } else {
                let root = a.image_root.clone().ok_or_else(|| anyhow::anyhow!("--captions needs --image-root"))?;
                let mut items = vec![];
                for file in &a.captions {
                    items.extend(ctxalign::data::captions::read_caption_json(file, &root)?);
                }
                (items, root)
            };
            println!("sharding {} captioned images into {}", items.len(), a.out.display());
            ("captioned images", items.len(), write_caption_shards(&items, &root, &a.out, &options)?)
        }
    };
    let errors: Vec<String> = report.left_out.iter().map(|s| s.error.clone()).collect();
    warn_left_out(&format!("{} of {inputs} {what} left out", errors.len()), &errors);
    let written = &report.written;
    let mut table = Table::new(["", "value"]);
    table.row(["shards".to_string(), written.shards.len().to_string()]);
    table.row([format!("samples ({what})"), written.samples().to_string()]);
    table.row(["bytes".to_string(), format!("{} ({:.1} MB)", written.bytes(), written.bytes() as f64 / 1e6)]);
    table.row(["left out".to_string(), report.left_out.len().to_string()]);
    table.row(["folder".to_string(), written.dir.display().to_string()]);
    println!("{table}");
    let pattern = written.pattern().replace('\'', "'\\''");
    println!("train on: --shards '{pattern}'");
    Ok(true)
}

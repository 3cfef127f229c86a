//! Text→image search with a trained ContextCLIP: index a folder of images once, then query it.
//!
//! ```text
//! cargo run --release --example retrieve -- --model target/contextclip --images photos/ \
//!     --query "a red circle left of a blue square" --k 5
//! ```
//! The index is saved to `--index` (default `<images>/.contextclip-index`) and reused only while
//! the model folder and the images (names, sizes, modification times) are unchanged; otherwise it
//! is rebuilt, with a message saying why.

use std::path::{Path, PathBuf};

use clap::Parser;
use ctxalign::contextclip::ClipEncoder;
use ctxalign::device::InferenceArgs;
use ctxalign::eval::Table;
use ctxalign::index::{files_fingerprint, EmbeddingIndex};

#[global_allocator]
static GLOBAL: ctxalign::alloc::MiMalloc = ctxalign::alloc::MiMalloc;

#[derive(Parser)]
#[command(about = "Index a folder of images with a ContextCLIP and search it by text")]
struct Args {
    /// A trained model folder (`train_contextclip --out`).
    #[arg(long, default_value = "target/contextclip")]
    model: PathBuf,
    /// Folder of images (searched recursively; jpg, png, webp, bmp, gif, tiff).
    #[arg(long)]
    images: PathBuf,
    /// Text queries (repeatable).
    #[arg(long, required = true)]
    query: Vec<String>,
    /// How many images to show per query.
    #[arg(long, default_value_t = 5, value_parser = ctxalign::args::positive_count)]
    k: usize,
    /// Where the index is kept.
    #[arg(long)]
    index: Option<PathBuf>,
    #[command(flatten)]
    runtime: InferenceArgs,
}

fn image_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            if !path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) {
                image_files(&path, out)?;
            }
        } else if path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
            ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"].contains(&e.to_lowercase().as_str())
        }) {
            out.push(path);
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let device = a.runtime.open()?;
    let encoder = ClipEncoder::load(&a.model, a.runtime.dtype, &device)?;
    let mut files = vec![];
    image_files(&a.images, &mut files).map_err(|e| anyhow::anyhow!("{}: {e}", a.images.display()))?;
    files.sort();
    if files.is_empty() {
        anyhow::bail!("{}: no image files", a.images.display());
    }
    let ids: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
    let index_dir = a.index.clone().unwrap_or_else(|| a.images.join(".contextclip-index"));
    // What the embeddings depend on: the model folder's files and every image, as they are now.
    let mut model_files: Vec<PathBuf> = std::fs::read_dir(&a.model)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()?
        .into_iter()
        .filter(|p| p.is_file())
        .collect();
    model_files.sort();
    let provenance = files_fingerprint(&[model_files, files.clone()].concat())?;
    let index = match EmbeddingIndex::load(&index_dir, &device) {
        Ok(index) if index.ids() == ids.as_slice() && index.provenance() == Some(provenance.as_str()) => index,
        saved => {
            match saved {
                Ok(_) => eprintln!(
                    "the saved index in {} was made by another model or for changed images: re-indexing {} images …",
                    index_dir.display(),
                    files.len()
                ),
                Err(_) => eprintln!("indexing {} images …", files.len()),
            }
            let mut index =
                EmbeddingIndex::new(encoder.model.config.projection_dim, &device)?.with_provenance(provenance);
            index.add(ids, &encoder.encode_image_files(&files)?)?;
            index.save(&index_dir)?;
            index
        }
    };
    let queries: Vec<&str> = a.query.iter().map(String::as_str).collect();
    let hits = index.search(&encoder.encode_texts(&queries)?, a.k)?;
    for (query, hits) in a.query.iter().zip(hits) {
        println!("\n{query}");
        let mut table = Table::new(["rank", "cosine", "image"]);
        for (rank, hit) in hits.iter().enumerate() {
            table.row([(rank + 1).to_string(), format!("{:.3}", hit.score), hit.id.clone()]);
        }
        println!("{table}");
    }
    Ok(())
}

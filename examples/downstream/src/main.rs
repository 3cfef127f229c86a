//! Image search with ctxalign inside another Rust program.
//!
//! ```text
//! ctxalign-downstream <BLIP folder> <image folder> <query>...
//! ```
//!
//! 1. loads a BLIP ITM model once and shares it between threads (`BlipScorer` is `Send + Sync`);
//! 2. reads every image of the folder as bytes and embeds them on 4 threads (ITC embeddings only:
//!    no cross-attention memory is kept per image);
//! 3. builds an [`EmbeddingIndex`] that records the model's fingerprint, saves it, and loads it
//!    back for this model only ([`EmbeddingIndex::load_for`]);
//! 4. answers each query: the index's top k by cosine, re-ranked by BLIP's ITM head
//!    ([`BlipScorer::retrieve_states`] builds keys and values for those k images only).
//!
//! Every step is the documented library API; nothing comes from the command-line crate.

use std::error::Error;
use std::path::{Path, PathBuf};

use ctxalign::index::EmbeddingIndex;
use ctxalign::{BlipScorer, Device, ScorerOptions, Tensor};

/// Threads that embed images side by side.
const THREADS: usize = 4;
/// Images the index proposes per query for the ITM re-rank.
const TOP_K: usize = 3;

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        let mut cause = e.source();
        while let Some(c) = cause {
            eprintln!("  caused by: {c}");
            cause = c.source();
        }
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, images, queries @ ..] = args.as_slice() else {
        return Err("usage: ctxalign-downstream <BLIP folder> <image folder> <query>...".into());
    };
    if queries.is_empty() {
        return Err("no query: pass at least one description to search for".into());
    }
    let device = Device::Cpu;
    let scorer = BlipScorer::load(model, ScorerOptions { batch_size: 2, ..Default::default() }, &device)?;
    println!("loaded {}", scorer.summary());

    let paths = image_files(Path::new(images))?;
    if paths.is_empty() {
        return Err(format!("{images}: no .jpg, .jpeg, .png or .webp files").into());
    }
    let bytes: Vec<Vec<u8>> =
        paths.iter().map(|p| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))).collect::<Result<_, _>>()?;
    let ids: Vec<String> =
        paths.iter().map(|p| p.file_name().unwrap_or_default().to_string_lossy().into_owned()).collect();

    // Each thread embeds a contiguous share of the images with the one loaded model.
    let share = bytes.len().div_ceil(THREADS);
    let scorer = &scorer;
    let parts: Vec<Tensor> = std::thread::scope(|scope| {
        let handles: Vec<_> =
            bytes.chunks(share).map(|chunk| scope.spawn(move || scorer.embed_images(chunk))).collect();
        handles.into_iter().map(|h| h.join().expect("an embedding thread panicked")).collect::<Result<_, _>>()
    })?;
    println!("embedded {} images on {} threads", bytes.len(), parts.len());

    let mut index = EmbeddingIndex::for_model(scorer.embedding_dim(), scorer.fingerprint(), &device)?;
    let mut next = 0;
    for part in &parts {
        let rows = part.dim(0)?;
        index.add(ids[next..next + rows].to_vec(), part)?;
        next += rows;
    }
    let dir = std::env::temp_dir().join(format!("ctxalign-downstream-{}", std::process::id()));
    index.save(&dir)?;
    let index = EmbeddingIndex::load_for(&dir, &scorer.fingerprint(), &device);
    std::fs::remove_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let index = index?;
    println!("index of {} images saved and loaded back for this model", index.len());

    let query_embeddings = scorer.embed_texts(&queries.iter().map(String::as_str).collect::<Vec<_>>())?;
    let proposals = index.search(&query_embeddings, TOP_K)?;
    for (query, hits) in queries.iter().zip(proposals) {
        // The proposed images' states (tokens and ITC features), re-ranked by ITM + ITC.
        let chosen: Vec<&[u8]> = hits.iter().map(|h| bytes[h.index].as_slice()).collect();
        let states = scorer.image_states(chosen)?;
        let reranked = scorer.retrieve_states(query, &states, hits.len())?;
        println!("\n{query}");
        println!("{:>4}  {:>8}  {:>8}  image", "rank", "ITC", "ITM+ITC");
        for (rank, candidate) in reranked.iter().enumerate() {
            let hit = &hits[candidate.index];
            println!("{:>4}  {:>8.4}  {:>8.4}  {}", rank + 1, hit.score, candidate.score, hit.id);
        }
    }
    Ok(())
}

/// The image files directly in `dir`, sorted by name.
fn image_files(dir: &Path) -> Result<Vec<PathBuf>, Box<dyn Error>> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut files = vec![];
    for entry in entries {
        let path = entry.map_err(|e| format!("{}: {e}", dir.display()))?.path();
        let extension = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
        if path.is_file() && matches!(extension.as_deref(), Some("jpg" | "jpeg" | "png" | "webp")) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

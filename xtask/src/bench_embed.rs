//! `cargo xtask bench embed`: ITC-only BLIP image embedding (ViT → `[CLS]` → `vision_proj` → L2
//! normalise, `BlipItm::image_states`), images/s on preprocessed pixels at each batch size, against
//! PyTorch's `BlipForImageTextRetrieval` vision tower + projection (`xtask/bench_embed_torch.py`,
//! launched here on the same random BLIP-base weights, the same thread count, the two sides
//! alternating round by round); then the peak memory of embedding and indexing `--index-images`
//! images into an `EmbeddingIndex`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use ctxalign::device::device_name;
use ctxalign::index::EmbeddingIndex;
use ctxalign::models::blip::{BlipConfig, BlipItm};
use ctxalign_cli::runtime_args::InferenceArgs;

use crate::bench::{dtype_name, machine, median, peak_rss_bytes, random_blip, random_blip_base, write_record};

#[derive(Debug, Clone, clap::Args)]
pub struct EmbedArgs {
    /// Image side in pixels of the timed part (BLIP-base: 224).
    #[arg(long, default_value_t = 224)]
    size: usize,
    /// Batch sizes timed.
    #[arg(long, value_delimiter = ',', default_value = "1,16", value_parser = ctxalign_cli::args::positive_count)]
    batches: Vec<usize>,
    /// Images embedded per batch size and round (rounded up to whole batches).
    #[arg(long, default_value_t = 32, value_parser = ctxalign_cli::args::positive_count)]
    images: usize,
    /// Timed rounds; ctxalign and PyTorch alternate (each round, the other one first). 0: only the
    /// memory measurement.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The Python with torch and transformers that runs the PyTorch side.
    #[arg(long, default_value = "python3")]
    python: String,
    /// Time ctxalign only.
    #[arg(long)]
    no_torch: bool,
    /// Where the random BLIP-base checkpoint both sides load is written once and reused (≈ 0.9 GB;
    /// default: the temporary folder, shared with `bench s0-step`).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Images embedded and added to the index for the memory measurement (0: skip it).
    #[arg(long, default_value_t = 10_000)]
    index_images: usize,
    /// Image side of the memory measurement (BLIP-base widths, random weights). The index keeps
    /// 256 floats an image whatever the side; a smaller side only makes the run shorter.
    #[arg(long, default_value_t = 224)]
    index_size: usize,
    /// Images per forward pass of the memory measurement.
    #[arg(long, default_value_t = 16, value_parser = ctxalign_cli::args::positive_count)]
    index_batch: usize,
    /// What keeps the embeddings in the memory measurement: the library's `EmbeddingIndex`, or a
    /// plain `Vec<f32>` and `Vec<String>` (the floor an index can be compared with).
    #[arg(long, value_enum, default_value = "index")]
    keep: Keep,
    #[command(flatten)]
    runtime: InferenceArgs,
    /// Folder for the JSON record of the run (CPU model and SIMD level included).
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

/// Where the memory measurement keeps the embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Keep {
    Index,
    Vec,
}

/// The embeddings kept so far and their ids.
enum Kept {
    Index(EmbeddingIndex),
    Vec { floats: Vec<f32>, ids: Vec<String> },
}

impl Kept {
    fn len(&self) -> usize {
        match self {
            Kept::Index(index) => index.len(),
            Kept::Vec { ids, .. } => ids.len(),
        }
    }

    fn add(&mut self, ids: Vec<String>, features: &Tensor) -> anyhow::Result<()> {
        match self {
            Kept::Index(index) => index.add(ids, features)?,
            Kept::Vec { floats, ids: all } => {
                floats.extend(features.flatten_all()?.to_vec1::<f32>()?);
                all.extend(ids);
            }
        }
        Ok(())
    }
}

/// One side's timing of one batch size in one round.
#[derive(Debug, Clone, Copy)]
struct Timing {
    batch: usize,
    images: usize,
    seconds: f64,
}

impl Timing {
    fn images_per_s(&self) -> f64 {
        self.images as f64 / self.seconds
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({"batch": self.batch, "images": self.images, "seconds": self.seconds,
                           "images_per_s": self.images_per_s()})
    }
}

/// The 1-, 5- and 15-minute load averages (Linux).
fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = text.split_whitespace().map(|v| v.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

/// Resident memory of this process now (Linux `VmRSS`), bytes.
fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

fn mib(bytes: Option<u64>) -> String {
    bytes.map(|b| format!("{:.0} MiB", b as f64 / (1u64 << 20) as f64)).unwrap_or_else(|| "?".into())
}

/// ITC-only embeddings `[n, 256]` of a pixel batch, read back (which also waits for the device).
fn embed(model: &BlipItm, pixels: &Tensor) -> anyhow::Result<Tensor> {
    let features = model.image_states(pixels)?.itc_features.to_dtype(DType::F32)?;
    features.to_device(&Device::Cpu).map_err(Into::into)
}

/// The PyTorch side, a process serving one timed round per request.
struct Torch {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Torch {
    fn start(a: &EmbedArgs, weights: &Path, probe: &Path, threads: usize, device: &Device) -> anyhow::Result<Self> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench_embed_torch.py");
        let batches: Vec<String> = a.batches.iter().map(usize::to_string).collect();
        let mut child = Command::new(&a.python)
            .arg(&script)
            .arg("--serve")
            .args(["--weights", &weights.display().to_string(), "--probe", &probe.display().to_string()])
            .args(["--size", &a.size.to_string(), "--batches", &batches.join(","), "--images", &a.images.to_string()])
            .args(["--threads", &threads.to_string(), "--device", &device_name(device)])
            .args(["--dtype", &dtype_name(a.runtime.dtype)])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| {
                format!("starting {} {} (pip install torch transformers, or --no-torch)", a.python, script.display())
            })?;
        let stdin = child.stdin.take().context("the PyTorch side's stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("the PyTorch side's stdout")?);
        Ok(Self { child, stdin, stdout })
    }

    /// The next JSON line of the script (other lines are echoed).
    fn message(&mut self) -> anyhow::Result<serde_json::Value> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.stdout.read_line(&mut line)? == 0 {
                anyhow::bail!("the PyTorch side ended early (its error is above)");
            }
            if line.starts_with('{') {
                return Ok(serde_json::from_str(&line)?);
            }
            print!("torch: {line}");
        }
    }

    /// One timed round at `batch`.
    fn round(&mut self, batch: usize) -> anyhow::Result<Timing> {
        writeln!(self.stdin, "round {batch}")?;
        self.stdin.flush()?;
        let msg = self.message()?;
        let r = msg["round"].get(0).context("the PyTorch side's round has no timing")?;
        Ok(Timing {
            batch: r["batch"].as_u64().context("batch")? as usize,
            images: r["images"].as_u64().context("images")? as usize,
            seconds: r["seconds"].as_f64().context("seconds")?,
        })
    }

    fn finish(self) -> anyhow::Result<()> {
        let Self { mut child, stdin, stdout } = self;
        drop(stdin);
        drop(stdout);
        let status = child.wait()?;
        anyhow::ensure!(status.success(), "the PyTorch side exited with {status}");
        Ok(())
    }
}

pub fn run(a: EmbedArgs) -> anyhow::Result<bool> {
    let device = a.runtime.open()?;
    let dtype = a.runtime.dtype;
    // The memory first, in a process that has built nothing else yet (its peak is the indexing's).
    let memory = if a.index_images > 0 { Some(index_memory(&a, &device)?) } else { None };
    let speed = if a.rounds > 0 { Some(speed(&a, &device)?) } else { None };
    let record = serde_json::json!({
        "workload": "BLIP ITC-only image embedding (ViT-B/16 -> [CLS] -> vision_proj -> L2), random BLIP-base weights, preprocessed pixels",
        "dtype": dtype_name(dtype),
        "machine": machine(&device),
        "speed": speed,
        "index_memory": memory,
        "command": std::env::args().collect::<Vec<_>>().join(" "),
    });
    let file = format!("embed-{}-{}.json", device_name(&device).replace(':', ""), dtype_name(dtype));
    write_record(&a.out, &file, &record)?;
    Ok(true)
}

/// The timed rounds, ctxalign and PyTorch alternating.
fn speed(a: &EmbedArgs, device: &Device) -> anyhow::Result<serde_json::Value> {
    let (device, dtype) = (device.clone(), a.runtime.dtype);
    let threads = candle_core::utils::get_num_threads();
    let cache =
        a.cache.clone().unwrap_or_else(|| std::env::temp_dir().join(format!("ctxalign-bench-blip-base-{}", a.size)));
    let files = random_blip_base(&cache, a.size)?;
    let model = BlipItm::load(&files, dtype, &device).context("loading the random BLIP-base")?;

    // The same probe pixels through both sides: the speed compared is of the same function.
    std::fs::create_dir_all(&a.out)?;
    let probe_path = a.out.join("embed-probe.safetensors");
    let probe = Tensor::randn(0f32, 1.0, (2, 3, a.size, a.size), &Device::Cpu)?;
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("pixels".to_string(), probe.clone())]),
        &probe_path,
    )?;
    let ours_probe = embed(&model, &probe.to_device(&device)?.to_dtype(dtype)?)?;

    let pixels: Vec<Tensor> = a
        .batches
        .iter()
        .map(|&b| Tensor::randn(0f32, 1.0, (b, 3, a.size, a.size), &device)?.to_dtype(dtype))
        .collect::<candle_core::Result<_>>()?;
    let ours_round = |i: usize| -> anyhow::Result<Timing> {
        let batch = a.batches[i];
        let steps = a.images.div_ceil(batch);
        let start = Instant::now();
        for _ in 0..steps {
            embed(&model, &pixels[i])?;
        }
        Ok(Timing { batch, images: steps * batch, seconds: start.elapsed().as_secs_f64() })
    };
    for pixels in &pixels {
        embed(&model, pixels)?; // warm-up
    }

    let mut torch = None;
    let mut torch_header = serde_json::Value::Null;
    let mut parity = None;
    if !a.no_torch {
        let mut t = Torch::start(a, &cache, &probe_path, threads, &device)?;
        torch_header = t.message()?["ready"].clone();
        let theirs = candle_core::safetensors::load(a.out.join("embed-probe.torch.safetensors"), &Device::Cpu)?;
        let theirs = theirs.get("embeddings").context("the PyTorch side's probe embeddings")?;
        let diff = (&ours_probe - theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
        println!("embed: probe embeddings, ctxalign vs PyTorch: max |diff| {diff:.2e}");
        parity = Some(diff);
        torch = Some(t);
    }

    println!(
        "embed: BLIP-base ViT-B/16 @{} px, batches {:?}, {} images per batch size and round, {} rounds, {} threads, {} {}",
        a.size,
        a.batches,
        a.images,
        a.rounds,
        threads,
        device_name(&device),
        dtype_name(dtype)
    );
    // Each round times each batch size on both sides back to back, the side that goes first
    // alternating, so a change of the machine's load falls on both sides alike.
    let mut rounds = vec![];
    let (mut ours_all, mut torch_all): (Vec<Vec<Timing>>, Vec<Vec<Timing>>) = (vec![], vec![]);
    for r in 0..a.rounds {
        let (mut ours, mut theirs) = (vec![], vec![]);
        for (i, &batch) in a.batches.iter().enumerate() {
            let torch_first = (r + i) % 2 == 1;
            let load_before = load_average();
            let mut t = None;
            if torch_first {
                t = torch.as_mut().map(|t| t.round(batch)).transpose()?;
            }
            let o = ours_round(i)?;
            if !torch_first {
                t = torch.as_mut().map(|t| t.round(batch)).transpose()?;
            }
            let load_after = load_average();
            println!(
                "round {r} batch {batch:>3}: ctxalign {:7.2} images/s{}  (load average {} -> {})",
                o.images_per_s(),
                t.map(|t| format!(
                    ", PyTorch {:7.2} images/s, ratio {:.2}x",
                    t.images_per_s(),
                    o.images_per_s() / t.images_per_s()
                ))
                .unwrap_or_default(),
                load_before.map(|l| format!("{:.2}", l[0])).unwrap_or_else(|| "?".into()),
                load_after.map(|l| format!("{:.2}", l[0])).unwrap_or_else(|| "?".into()),
            );
            rounds.push(serde_json::json!({
                "round": r, "batch": batch, "torch_first": torch_first,
                "load_average_before": load_before, "load_average_after": load_after,
                "ctxalign": o.json(), "torch": t.as_ref().map(Timing::json),
            }));
            ours.push(o);
            theirs.extend(t);
        }
        ours_all.push(ours);
        if !theirs.is_empty() {
            torch_all.push(theirs);
        }
    }
    if let Some(t) = torch {
        t.finish()?;
    }
    drop(model);

    let mut summary = vec![];
    for (i, &batch) in a.batches.iter().enumerate() {
        let ours = median(ours_all.iter().map(|r| r[i].images_per_s()).collect());
        let theirs = (!torch_all.is_empty()).then(|| median(torch_all.iter().map(|r| r[i].images_per_s()).collect()));
        let paired = (!torch_all.is_empty()).then(|| {
            median(ours_all.iter().zip(&torch_all).map(|(o, t)| o[i].images_per_s() / t[i].images_per_s()).collect())
        });
        println!(
            "embed batch {batch:>3}: ctxalign {ours:.2} images/s (median of {} rounds){}",
            a.rounds,
            theirs
                .map(|t| format!(
                    ", PyTorch {t:.2} -> ratio {:.2}x (median of the rounds' ratios {:.2}x)",
                    ours / t,
                    paired.unwrap_or(f64::NAN)
                ))
                .unwrap_or_default()
        );
        summary.push(serde_json::json!({
            "batch": batch, "ctxalign_images_per_s": ours, "torch_images_per_s": theirs,
            "speed_ratio_ctxalign_over_torch": theirs.map(|t| ours / t), "median_round_ratio": paired,
        }));
    }

    Ok(serde_json::json!({
        "image_size": a.size, "images_per_round": a.images, "rounds": a.rounds, "threads": threads,
        "torch": torch_header,
        "probe_max_abs_diff": parity,
        "results": summary,
        "round_timings": rounds,
    }))
}

/// Embeds `index_images` random images at `index_size` px (BLIP-base, random weights) `index_batch`
/// at a time, each batch's ITC features added to an `EmbeddingIndex` (or a `Vec`, `--keep vec`) and
/// the ViT's tokens dropped; resident memory sampled along the way. Only `EmbeddingIndex::new`, `add`
/// and `len` are used.
fn index_memory(a: &EmbedArgs, device: &Device) -> anyhow::Result<serde_json::Value> {
    let n = a.index_images;
    let mut cfg = BlipConfig::itm_base_224();
    cfg.vision_config.image_size = a.index_size;
    let dim = cfg.image_text_hidden_size;
    let model = random_blip(&cfg, a.runtime.dtype, device)?;
    let pixels =
        Tensor::randn(0f32, 1.0, (a.index_batch, 3, a.index_size, a.index_size), device)?.to_dtype(a.runtime.dtype)?;
    let mut index = match a.keep {
        Keep::Index => Kept::Index(EmbeddingIndex::new(dim, device)?),
        Keep::Vec => Kept::Vec { floats: vec![], ids: vec![] },
    };
    let rss_model = rss_bytes();
    println!(
        "embed: indexing {n} images at {} px, {} per pass (model built: RSS {})",
        a.index_size,
        a.index_batch,
        mib(rss_model)
    );
    let start = Instant::now();
    let mut samples = vec![];
    let mut next_sample = 0;
    while index.len() < n {
        let take = a.index_batch.min(n - index.len());
        let batch = if take == a.index_batch { pixels.clone() } else { pixels.narrow(0, 0, take)? };
        let features = embed(&model, &batch)?;
        let first = index.len();
        index.add((first..first + take).map(|i| format!("image-{i:06}")).collect(), &features)?;
        if index.len() >= next_sample || index.len() == n {
            let rss = rss_bytes();
            samples.push(
                serde_json::json!({"images": index.len(), "rss_bytes": rss, "seconds": start.elapsed().as_secs_f64()}),
            );
            if next_sample > 0 {
                println!(
                    "  {:>6} images, {:.1} images/s, RSS {}",
                    index.len(),
                    index.len() as f64 / start.elapsed().as_secs_f64(),
                    mib(rss)
                );
            }
            next_sample = (next_sample + n.div_ceil(10)).min(n);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let peak = peak_rss_bytes();
    let at = |s: &serde_json::Value| s["rss_bytes"].as_u64().map(|r| (s["images"].as_u64().unwrap_or(0), r));
    // Growth per image from the 10 % mark on: the first passes bring the passes' working memory
    // (activations, the allocator's pools), which later passes reuse.
    let first = samples.get(1).or(samples.first()).and_then(at);
    let last = samples.last().and_then(at);
    let per_image = match (first, last) {
        (Some((n0, r0)), Some((n1, r1))) if n1 > n0 => Some((r1 as f64 - r0 as f64) / (n1 - n0) as f64),
        _ => None,
    };
    let payload = index.len() * dim * 4;
    println!(
        "embed: indexed {} images in {secs:.0} s; peak RSS {} (model built: {}), growth from the 10 % mark {} \
         per image; the index's embeddings {} B per image",
        index.len(),
        mib(peak),
        mib(rss_model),
        per_image.map(|b| format!("{b:.0} B")).unwrap_or_else(|| "?".into()),
        dim * 4,
    );
    Ok(serde_json::json!({
        "images": index.len(), "image_size": a.index_size, "batch": a.index_batch, "dim": dim,
        "kept_in": if a.keep == Keep::Index { "EmbeddingIndex" } else { "Vec<f32> + Vec<String>" },
        "model": "BLIP-base (ViT-B/16 widths), random weights",
        "seconds": secs,
        "rss_after_model_bytes": rss_model,
        "peak_rss_bytes": peak,
        "peak_minus_model_bytes": peak.zip(rss_model).map(|(p, m)| p.saturating_sub(m)),
        "rss_growth_per_image_bytes": per_image,
        "rss_growth_from_images": first.map(|f| f.0),
        "index_embedding_bytes": payload,
        "rss_samples": samples,
    }))
}

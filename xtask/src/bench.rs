//! Benchmarks (not tests; run them on a quiet machine). Each writes a JSON record — the workload,
//! device, dtype, the CPU model and SIMD level, timings and peak memory — to `--out` (default
//! `target/bench/`), and each has a PyTorch counterpart in `xtask/` that runs the same workload and
//! prints the ratio against that JSON:
//! - `bench itm`: BLIP-base ITM + ITC on IMAGECODE-sized sets (1 description vs 10 images) at 224
//!   and 384 px, random weights (`xtask/bench_itm_torch.py`);
//! - `bench s0-step`: a ContextBLIP S0 training step at BLIP-base sizes (`xtask/bench_s0_torch.py`);
//! - `bench contextclip-step`: a ContextCLIP training step of the small model
//!   (`xtask/bench_contextclip_torch.py`);
//! - `bench loader`: decode + augmentation + preprocessing (`xtask/bench_loader_torch.py`);
//! - `bench embed`: ITC-only BLIP image embedding, images/s, and the peak memory of indexing
//!   10,000 images (`xtask/bench_embed_torch.py`, which the xtask launches itself);
//! - `bench linear`: one projection `x·Wᵀ + b` at the workloads' shapes, Candle's `Linear` against
//!   ctxalign's (CPU; no PyTorch counterpart: the comparison is within Candle).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use clap::Subcommand;
use ctxalign::device::device_name;
use ctxalign_cli::runtime_args::{InferenceArgs, TrainingArgs};
use ctxalign::models::blip::{BlipConfig, BlipItm};

#[derive(Subcommand)]
pub enum Bench {
    /// One description vs 10 images through BLIP-base ITM + ITC.
    Itm {
        /// Image sizes to run.
        #[arg(long, value_delimiter = ',', default_value = "224,384")]
        sizes: Vec<usize>,
        /// Timed sets per size (after one warm-up set).
        #[arg(long, default_value_t = 3, value_parser = ctxalign_cli::args::positive_count)]
        sets: usize,
        /// Description length in tokens ([CLS]/[ENC] and [SEP] included).
        #[arg(long, default_value_t = 35)]
        tokens: usize,
        #[command(flatten)]
        runtime: InferenceArgs,
        /// Folder of the JSON record.
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
    },
    /// ContextBLIP S0 training steps at BLIP-base sizes (ViT-B/16 and BERT frozen, random weights;
    /// the default adapter, 4-layer TMIM decoder and text adapter train): forward, `L_itm` on hard
    /// negatives + `L_tmim`, backward, AdamW. Median s/step and peak memory.
    S0Step {
        /// Timed steps (after one warm-up step).
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// Samples per step (loader: images per batch).
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Image side in pixels.
        #[arg(long, default_value_t = 224)]
        size: usize,
        /// Caption length in tokens ([CLS]/[ENC] and [SEP] included).
        #[arg(long, default_value_t = 30)]
        tokens: usize,
        /// A WordPiece tokenizer with BERT's vocabulary.
        #[arg(long, default_value = "models/bert-base-uncased-tokenizer/tokenizer.json")]
        tokenizer: PathBuf,
        /// Where the random BLIP-base checkpoint is written once and reused (≈ 0.9 GB).
        #[arg(long)]
        cache: Option<PathBuf>,
        #[command(flatten)]
        runtime: TrainingArgs,
        /// Folder for the JSON record of the run (CPU model and SIMD level included).
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
        /// On a CUDA device, bracket the timed steps with `cuProfilerStart`/`cuProfilerStop`, so a
        /// profiler started with `--profile-from-start off` (`ncu`) sees them and not the set-up or
        /// the warm-up step (scripts/gpu-profile.sh).
        #[arg(long)]
        cuda_profiler_range: bool,
    },
    /// ContextCLIP training steps (the small CPU model: forward, `L_CLIP + 0.5·L_CX`, backward,
    /// Adam update) on random pixels and fixed captions, samples/s.
    ContextclipStep {
        /// Timed steps (after one warm-up step).
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Samples per step (loader: images per batch).
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Caption length in tokens ([CLS] and [SEP] included).
        #[arg(long, default_value_t = 24)]
        tokens: usize,
        #[command(flatten)]
        runtime: TrainingArgs,
        /// Folder for the JSON record of the run (CPU model and SIMD level included).
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
    },
    /// One projection `x·Wᵀ + b` (forward, f32, nothing tracked) at the shapes of the workloads
    /// above, Candle's `Linear` against ctxalign's, GFLOP/s.
    Linear {
        /// `rows:in:out` triples.
        #[arg(long, value_delimiter = ',', default_values_t = [
            "1576:768:768".to_string(), "1576:3072:768".to_string(), "1576:768:3072".to_string(),
            "240:768:768".to_string(), "240:3072:768".to_string(), "1970:768:768".to_string(),
            "32:768:256".to_string(), "2080:128:384".to_string(), "2080:512:128".to_string(),
        ])]
        shapes: Vec<String>,
        /// Folder for the JSON record of the run (CPU model and SIMD level included).
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
    },
    /// All-reduce bandwidth against buffer size, and ContextBLIP S0's gradients averaged in the
    /// training loop's buckets, on `--nproc-per-node` ranks.
    Allreduce(crate::dist::AllreduceArgs),
    /// ITC-only BLIP image embedding, images/s against PyTorch in alternating rounds, and the peak
    /// memory of embedding and indexing `--index-images` images.
    Embed(crate::bench_embed::EmbedArgs),
    /// Data loader throughput: decode + augmentation + preprocessing, images/s.
    Loader {
        /// Caption images generated and loaded (two epochs are timed).
        #[arg(long, default_value_t = 2000)]
        images: usize,
        /// Side of the JPEGs read.
        #[arg(long, default_value_t = 256)]
        source_size: u32,
        /// Side of the model input.
        #[arg(long, default_value_t = 224)]
        size: u32,
        /// Samples per step (loader: images per batch).
        #[arg(long, default_value_t = 64)]
        batch: usize,
    },
}

pub fn run(which: Bench) -> anyhow::Result<bool> {
    match which {
        Bench::Itm { sizes, sets, tokens, runtime, out } => itm(&sizes, sets, tokens, &runtime, &out),
        Bench::S0Step { steps, batch, size, tokens, tokenizer, cache, runtime, out, cuda_profiler_range } => {
            let workload = S0Workload { steps, batch, size, tokens, cuda_profiler_range };
            s0_step(&workload, &tokenizer, cache, &runtime, &out)
        }
        Bench::ContextclipStep { steps, batch, tokens, runtime, out } => {
            contextclip_step(steps, batch, tokens, &runtime, &out)
        }
        Bench::Linear { shapes, out } => linear(&shapes, &out),
        Bench::Allreduce(args) => crate::dist::allreduce(args),
        Bench::Embed(args) => crate::bench_embed::run(args),
        Bench::Loader { images, source_size, size, batch } => {
            crate::bench_loader::run(images, source_size, size, batch)
        }
    }
}

/// The machine a benchmark ran on: CPU model, SIMD level, threads (and the device it used).
pub(crate) fn machine(device: &Device) -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let simd = simd_level();
    serde_json::json!({
        "cpu": model,
        "simd": simd,
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "device": device_name(device),
    })
}

/// The widest x86 vector extension this CPU has (what gemm's runtime dispatch can use).
fn simd_level() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return "avx512";
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return "avx2+fma";
        }
        if std::arch::is_x86_feature_detected!("sse4.2") {
            return "sse4.2";
        }
        "sse2"
    }
    #[cfg(target_arch = "aarch64")]
    {
        "neon"
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        "unknown"
    }
}

/// Peak resident memory of this process (Linux `VmHWM`), bytes.
pub(crate) fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 =
        status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

/// Waits for queued device work (so a timer measures it).
fn synchronize(device: &Device) -> anyhow::Result<()> {
    device.synchronize()?;
    Ok(())
}

/// Starts (`on`) or stops the CUDA profiler's range on a CUDA device; nothing elsewhere.
fn cuda_profiler_range(device: &Device, on: bool) -> anyhow::Result<()> {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        use candle_core::cuda_backend::cudarc::driver::sys;
        device.synchronize()?;
        // SAFETY: plain driver calls with no arguments; Candle has made its context current on this
        // thread (the synchronize above ran on it).
        unsafe {
            if on {
                sys::cuProfilerStart()
            } else {
                sys::cuProfilerStop()
            }
        }
        .result()?;
    }
    #[cfg(not(feature = "cuda"))]
    let _ = (device, on);
    Ok(())
}

pub(crate) fn write_record(out: &Path, file: &str, record: &serde_json::Value) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let path = out.join(file);
    std::fs::write(&path, serde_json::to_string_pretty(record)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

pub(crate) fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        0.5 * (xs[n / 2 - 1] + xs[n / 2])
    }
}

pub(crate) fn dtype_name(dtype: DType) -> String {
    format!("{dtype:?}").to_lowercase()
}

const IMAGES_PER_SET: usize = 10;

/// A BLIP of `cfg` with random weights, held as plain tensors.
pub(crate) fn random_blip(cfg: &BlipConfig, dtype: DType, device: &Device) -> anyhow::Result<BlipItm> {
    let varmap = VarMap::new();
    BlipItm::new(cfg, VarBuilder::from_varmap(&varmap, dtype, device)).context("drawing BLIP weights")?;
    // Inference runs on plain tensors, as a loaded model does: were the weights `Var`s, every
    // op would record its backward and keep its inputs alive (measured on an H100: 17 GiB).
    let weights: std::collections::HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("the weight map's lock is poisoned"))?
        .iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().detach()))
        .collect();
    drop(varmap);
    BlipItm::new(cfg, VarBuilder::from_tensors(weights, dtype, device)).context("building BLIP")
}

fn itm(sizes: &[usize], sets: usize, tokens: usize, runtime: &InferenceArgs, out: &Path) -> anyhow::Result<bool> {
    let device = runtime.open()?;
    let dtype = runtime.dtype;
    let mut results = vec![];
    for &size in sizes {
        let mut cfg = BlipConfig::itm_base_224();
        cfg.vision_config.image_size = size;
        let model = random_blip(&cfg, dtype, &device)?;
        let pixels = Tensor::randn(0f32, 1.0, (IMAGES_PER_SET, 3, size, size), &device)?.to_dtype(dtype)?;
        let ids: Vec<u32> = (0..tokens as u32).map(|i| if i == 0 { 101 } else { 1000 + i }).collect();
        let ids = Tensor::new(ids, &device)?.unsqueeze(0)?;
        let enc_ids = ids.slice_assign(&[0..1, 0..1], &Tensor::new(&[[30523u32]], &device)?)?;
        let mask = Tensor::ones((1, tokens), DType::U32, &device)?;
        let one_set = || -> anyhow::Result<f32> {
            let images = model.encode_images(&pixels)?;
            let text = model.text_features(&ids, &mask)?;
            let itc = BlipItm::itc_similarity(&images.itc_features, &text)?;
            let itm = model.itm(&images.memory, &enc_ids, &mask, false)?.match_probability()?;
            // Reading the values back synchronises the device.
            let total = (itc.to_dtype(DType::F32)?.sum_all()? + itm.to_dtype(DType::F32)?.sum_all()?)?;
            Ok(total.to_scalar::<f32>()?)
        };
        one_set()?;
        synchronize(&device)?;
        let start = Instant::now();
        for _ in 0..sets {
            one_set()?;
        }
        synchronize(&device)?;
        let secs = start.elapsed().as_secs_f64();
        let sets_per_s = sets as f64 / secs;
        println!(
            "itm {size}px: {sets} sets of 1 text x {IMAGES_PER_SET} images in {secs:.2} s -> {sets_per_s:.3} sets/s ({:.1} images/s)",
            sets_per_s * IMAGES_PER_SET as f64
        );
        results.push(serde_json::json!({"image_size": size, "sets": sets, "seconds": secs, "sets_per_s": sets_per_s}));
    }
    let record = serde_json::json!({
        "workload": "BLIP-base ITM+ITC, 1 description vs 10 images",
        "tokens": tokens,
        "dtype": dtype_name(dtype),
        "machine": machine(&device),
        "peak_rss_bytes": peak_rss_bytes(),
        "results": results,
    });
    write_record(out, &format!("itm-{}-{}.json", device_name(&device).replace(':', ""), dtype_name(dtype)), &record)?;
    Ok(true)
}

/// `bench linear`: each shape timed for about half a second per layer, best of three.
fn linear(shapes: &[String], out: &Path) -> anyhow::Result<bool> {
    let device = Device::Cpu;
    let mut results = vec![];
    println!("{:>16} {:>14} {:>14} {:>7}", "rows:in:out", "Candle GFLOP/s", "ctxalign", "ratio");
    for shape in shapes {
        let dims: Vec<usize> = shape
            .split(':')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("--shapes: {shape:?} is not rows:in:out"))?;
        let &[rows, inp, outp] = dims.as_slice() else { anyhow::bail!("--shapes: {shape:?} is not rows:in:out") };
        let x = Tensor::randn(0f32, 1.0, (rows, inp), &device)?;
        let w = Tensor::randn(0f32, 0.05, (outp, inp), &device)?;
        let b = Tensor::randn(0f32, 0.05, outp, &device)?;
        let flop = 2.0 * (rows * inp * outp) as f64;
        let reps = ((2e10 / flop) as usize).clamp(3, 2000);
        let rate = |layer: &dyn candle_core::Module| -> anyhow::Result<f64> {
            layer.forward(&x)?;
            let mut best = 0f64;
            for _ in 0..3 {
                let start = Instant::now();
                for _ in 0..reps {
                    layer.forward(&x)?;
                }
                best = best.max(flop * reps as f64 / start.elapsed().as_secs_f64() / 1e9);
            }
            Ok(best)
        };
        let candle = rate(&candle_nn::Linear::new(w.clone(), Some(b.clone())))?;
        let ours = rate(&ctxalign::nn::Linear::new(w, Some(b)))?;
        println!("{shape:>16} {candle:>14.0} {ours:>14.0} {:>6.2}x", ours / candle);
        results.push(serde_json::json!({"shape": shape, "candle_gflops": candle, "ctxalign_gflops": ours}));
    }
    let record = serde_json::json!({
        "workload": "x·Wᵀ + b forward, f32, untracked: candle_nn::Linear vs ctxalign_nn::Linear",
        "machine": machine(&device),
        "results": results,
    });
    write_record(out, "linear-cpu-f32.json", &record)?;
    Ok(true)
}

fn contextclip_step(
    steps: usize,
    batch: usize,
    tokens: usize,
    runtime: &TrainingArgs,
    out: &Path,
) -> anyhow::Result<bool> {
    use ctxalign::models::contextclip::ContextClipConfig;
    use ctxalign::nn::{clip_loss, contextual_loss, ClipLossConfig, ContextualMode, Similarity, Targets};
    use ctxalign::train::contextclip::{build_contextclip, ContextClipInit, ContextClipLossConfig};
    use ctxalign::train::{group_params, Adam, AdamConfig, GroupSpec};

    let device = runtime.open()?;
    let dtype = runtime.precision.compute_dtype();
    let cfg = ContextClipConfig::small(64);
    let loss_cfg = ContextClipLossConfig { learn_temperature: true, temperature: 0.07, ..Default::default() };
    let (model, params, temperature) =
        build_contextclip(&cfg, &ContextClipInit::default(), &loss_cfg, dtype, &device, 0)?;
    let mut optimizer = Adam::new(AdamConfig::adamw(), group_params(&params, &[GroupSpec::rest("all", 5e-4, 0.05)])?)?;
    let pixels = Tensor::randn(0f32, 1.0, (batch, 3, 64, 64), &device)?.to_dtype(dtype)?;
    let ids: Vec<u32> = (0..batch * tokens)
        .map(|i| match i % tokens {
            0 => 101,
            t if t == tokens - 1 => 102,
            t => 1000 + ((i / tokens) * 7 + t) as u32 % 20000,
        })
        .collect();
    let ids = Tensor::from_vec(ids, (batch, tokens), &device)?;
    let mask = Tensor::ones((batch, tokens), DType::U32, &device)?;
    let image_ids: Vec<usize> = (0..batch).collect();
    let clip_cfg = ClipLossConfig { lambda: 0.75, similarity: Similarity::Cosine, targets: Targets::Hard };
    let mut step = |seed: u64| -> anyhow::Result<f32> {
        // One dropout seed per sample, as the training objective draws them.
        let seeds: Vec<u64> = (0..batch as u64).map(|i| seed.wrapping_mul(1_000_003) + i).collect();
        let image = model.encode_images(&pixels, Some(&seeds))?;
        let text = model.encode_texts(&ids, &mask, Some(&seeds))?;
        let clip = clip_loss(&image, &text, &temperature.tensor(), &image_ids, &clip_cfg)?.loss;
        let loss = (clip + (contextual_loss(&image, &text, ContextualMode::Samples, 0.5)? * 0.5)?)?;
        optimizer.step(&loss.backward()?, 1.0)?;
        Ok(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?)
    };
    step(0)?;
    synchronize(&device)?;
    let start = Instant::now();
    for s in 0..steps {
        step(s as u64 + 1)?;
    }
    synchronize(&device)?;
    let secs = start.elapsed().as_secs_f64();
    let samples_per_s = (steps * batch) as f64 / secs;
    println!("contextclip step: {steps} steps of {batch} in {secs:.2} s -> {samples_per_s:.1} samples/s");
    let record = serde_json::json!({
        "workload": "ContextCLIP small (ViT 4x128 on 64 px, BERT 2x128), L_CLIP + 0.5 L_CX, AdamW step",
        "batch": batch, "tokens": tokens, "steps": steps, "seconds": secs, "samples_per_s": samples_per_s,
        "precision": runtime.precision.as_str(),
        "machine": machine(&device),
        "peak_rss_bytes": peak_rss_bytes(),
    });
    let file = format!("contextclip_step-{}-{}.json", device_name(&device).replace(':', ""), runtime.precision);
    write_record(out, &file, &record)?;
    Ok(true)
}

/// The sizes of the S0 benchmark.
struct S0Workload {
    steps: usize,
    batch: usize,
    size: usize,
    tokens: usize,
    cuda_profiler_range: bool,
}

/// A random BLIP-base folder (`config.json`, `model.safetensors`) at `size` px, written once.
pub(crate) fn random_blip_base(dir: &Path, size: usize) -> anyhow::Result<ctxalign::models::ModelFiles> {
    let mut cfg = BlipConfig::itm_base_224();
    cfg.vision_config.image_size = size;
    let weights = dir.join("model.safetensors");
    let config = dir.join("config.json");
    let current = std::fs::read_to_string(&config).ok() == Some(serde_json::to_string_pretty(&cfg)?);
    if !(current && weights.is_file()) {
        std::fs::create_dir_all(dir)?;
        println!("writing a random BLIP-base ({size} px) to {} …", dir.display());
        let varmap = VarMap::new();
        BlipItm::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
        // Written under a name of its own, then renamed: the ranks of a multi-process run may
        // write it at once, and none must read a half-written file.
        let tmp = dir.join(format!(".model-{}.safetensors", std::process::id()));
        varmap.save(&tmp)?;
        std::fs::rename(&tmp, &weights)?;
        ctxalign::data::write_atomic(&config, serde_json::to_string_pretty(&cfg)?.as_bytes())?;
    }
    Ok(ctxalign::models::ModelFiles::from_dir(dir)?)
}

fn s0_step(
    w: &S0Workload,
    tokenizer: &Path,
    cache: Option<PathBuf>,
    runtime: &TrainingArgs,
    out: &Path,
) -> anyhow::Result<bool> {
    use ctxalign_cli::launch::{launch_ranks, run_training};

    if launch_ranks(runtime)? {
        return Ok(true);
    }
    let cache = cache.unwrap_or_else(|| std::env::temp_dir().join(format!("ctxalign-bench-blip-base-{}", w.size)));
    // One writer of the random checkpoint: the ranks of a run share it (threads: the first writes
    // it before they start; processes: they are started on a machine where it exists, or each
    // writes the same bytes).
    let files = random_blip_base(&cache, w.size)?;
    // Writing the random checkpoint is set-up, not the workload: restart the peak-RSS count (Linux;
    // best effort elsewhere).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let Some((r, rt)) = run_training(runtime, |rt, comm| s0_rank(w, &files, tokenizer, &rt, &comm))? else {
        return Ok(true);
    };
    let device = rt.device;
    let world = r.world_size;
    let per_step = median(r.times.clone());
    let reduce = median(r.reduce_times.clone());
    let peak = peak_rss_bytes();
    let global = w.batch * world;
    println!(
        "s0-step: median {per_step:.3} s/step over {} steps ({:.1} samples/s over {world} rank(s)), gradient \
         averaging {:.1} ms, loss {:.4}, peak RSS {}",
        w.steps,
        global as f64 / per_step,
        1000.0 * reduce,
        r.last_loss,
        peak.map(|b| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)).unwrap_or_else(|| "?".into())
    );
    let record = serde_json::json!({
        "workload": "ContextBLIP S0 step: BLIP-base frozen, adapter + TMIM decoder + text adapter, L_itm (hard negatives) + L_tmim, AdamW",
        "image_size": w.size, "batch": w.batch, "tokens": w.tokens, "steps": w.steps,
        "world_size": world, "global_batch": global, "communicator": r.communicator,
        "trainable_parameters": r.parameters,
        "precision": runtime.precision.as_str(),
        "seconds_per_step": per_step, "step_seconds": r.times,
        "gradient_allreduce_seconds": reduce, "gradient_allreduce_share": reduce / per_step,
        "samples_per_s": global as f64 / per_step,
        "last_loss": r.last_loss,
        "machine": machine(&device),
        "peak_rss_bytes": peak,
    });
    let ranks = if world > 1 { format!("-x{world}") } else { String::new() };
    let file = format!("s0_step-{}-{}{ranks}.json", device_name(&device).replace(':', ""), runtime.precision);
    write_record(out, &file, &record)?;
    Ok(true)
}

/// What one rank of the S0 benchmark measured.
struct S0Rank {
    times: Vec<f64>,
    /// Per timed step, the bucketed gradient all-reduce alone (0 on one rank).
    reduce_times: Vec<f64>,
    last_loss: f64,
    parameters: usize,
    world_size: usize,
    communicator: String,
}

/// The S0 step on one rank: its own batch of `w.batch`, the objective gathering from the other
/// ranks, the gradients averaged in buckets (as the training loop does), AdamW.
fn s0_rank(
    w: &S0Workload,
    files: &ctxalign::models::ModelFiles,
    tokenizer: &Path,
    rt: &ctxalign::Runtime,
    comm: &ctxalign::train::Communicator,
) -> anyhow::Result<S0Rank> {
    use ctxalign::data::{CaptionCleaning, TextTokenizer};
    use ctxalign::models::contextblip::ContextBlipConfig;
    use ctxalign::train::contextblip::{build_pretraining, PretrainObjective};
    use ctxalign::train::dist::GradientBuckets;
    use ctxalign::train::{group_params, Adam, AdamConfig, GroupSpec, SampleDraws};

    let device = &rt.device;
    let dtype = rt.dtype();
    let blip_cfg = BlipItm::read_config(&files.config)?;
    let cfg = ContextBlipConfig::for_blip(&blip_cfg);
    let (model, tmim, params) = build_pretraining(files, &cfg, None, dtype, device, 0)?;
    let tokenizer = TextTokenizer::from_file(tokenizer, CaptionCleaning::blip(w.tokens), w.tokens)
        .with_context(|| format!("--tokenizer {}", tokenizer.display()))?;
    let mut objective = PretrainObjective::new(model, tmim, tokenizer, device, 0)?;
    objective.comm = comm.clone();
    let mut optimizer = Adam::new(AdamConfig::adamw(), group_params(&params, &[GroupSpec::rest("all", 3e-4, 0.05)])?)?;
    let vars: Vec<candle_core::Var> = optimizer.vars().map(|(_, v)| v.clone()).collect();
    let buckets = GradientBuckets::new(&vars, ctxalign::train::dist::DEFAULT_BUCKET_BYTES);
    // `tokens − 2` one-token words, so each caption is exactly `tokens` long with [CLS]/[SEP].
    const WORDS: [&str; 12] =
        ["red", "blue", "green", "circle", "square", "left", "right", "small", "large", "above", "below", "near"];
    let first = comm.rank() * w.batch;
    let captions: Vec<String> = (first..first + w.batch)
        .map(|i| (0..w.tokens - 2).map(|t| WORDS[(i * 5 + t * 7) % WORDS.len()]).collect::<Vec<_>>().join(" "))
        .collect();
    let captions: Vec<&str> = captions.iter().map(String::as_str).collect();
    let image_ids: Vec<usize> = (first..first + w.batch).collect();
    let pixels = Tensor::randn(0f32, 1.0, (w.batch, 3, w.size, w.size), device)?.to_dtype(dtype)?;
    let mut step = |seed: u64| -> anyhow::Result<(f64, f64)> {
        let draws = SampleDraws::new(0, seed, (first as u64..(first + w.batch) as u64).collect());
        let losses = objective.losses(&pixels, &captions, &image_ids, &draws)?;
        let loss = (losses.itm + losses.tmim)?;
        let mut grads = loss.backward()?;
        let mut reduce = 0.0;
        if comm.is_distributed() {
            synchronize(device)?;
            let start = Instant::now();
            buckets.all_reduce_mean(comm, &mut grads, &vars)?;
            synchronize(device)?;
            reduce = start.elapsed().as_secs_f64();
        }
        optimizer.step(&grads, 1.0)?;
        Ok((loss.to_dtype(DType::F64)?.to_scalar::<f64>()?, reduce))
    };
    if comm.is_primary() {
        println!(
            "s0-step: BLIP-base @{} px, batch {} on each of {} rank(s), {} tokens, {} trainable parameters, {} {}",
            w.size,
            w.batch,
            comm.world_size(),
            w.tokens,
            params.numel(),
            device_name(device),
            rt.precision
        );
    }
    step(0)?;
    let (mut times, mut reduce_times) = (vec![], vec![]);
    let mut last_loss = f64::NAN;
    if w.cuda_profiler_range && comm.is_primary() {
        cuda_profiler_range(device, true)?;
    }
    for s in 0..w.steps {
        synchronize(device)?;
        comm.barrier()?;
        let start = Instant::now();
        let (loss, reduce) = step(s as u64 + 1)?;
        synchronize(device)?;
        times.push(start.elapsed().as_secs_f64());
        reduce_times.push(reduce);
        last_loss = loss;
    }
    if w.cuda_profiler_range && comm.is_primary() {
        cuda_profiler_range(device, false)?;
    }
    Ok(S0Rank {
        times,
        reduce_times,
        last_loss,
        parameters: params.numel(),
        world_size: comm.world_size(),
        communicator: comm.describe(),
    })
}

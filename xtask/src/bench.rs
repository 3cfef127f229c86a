//! `cargo xtask bench itm`: BLIP-base ITM throughput on IMAGECODE-sized sets (one description
//! against 10 images), at 224 and 384 px, with random weights. Not a test: run it on a quiet
//! machine. `xtask/bench_itm_torch.py` runs the same workload through HF transformers and prints
//! the ratio against the JSON this writes (`target/bench/itm.json`).

use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use clap::Subcommand;
use ctxalign::models::blip::{BlipConfig, BlipItm};

#[derive(Subcommand)]
pub enum Bench {
    /// One description vs 10 images through BLIP-base ITM + ITC.
    Itm {
        /// Image sizes to run.
        #[arg(long, value_delimiter = ',', default_value = "224,384")]
        sizes: Vec<usize>,
        /// Timed sets per size (after one warm-up set).
        #[arg(long, default_value_t = 3)]
        sets: usize,
        /// Description length in tokens ([CLS]/[ENC] and [SEP] included).
        #[arg(long, default_value_t = 35)]
        tokens: usize,
        /// Run on CUDA device 0 (build with `--features cuda`).
        #[arg(long)]
        cuda: bool,
    },
    /// ContextCLIP training steps (the small CPU model: forward, `L_CLIP + 0.5·L_CX`, backward,
    /// Adam update) on random pixels and fixed captions, samples/s.
    ContextclipStep {
        #[arg(long, default_value_t = 10)]
        steps: usize,
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Caption length in tokens ([CLS] and [SEP] included).
        #[arg(long, default_value_t = 24)]
        tokens: usize,
        #[arg(long)]
        cuda: bool,
    },
    /// Data loader throughput: decode + augmentation + preprocessing, images/s.
    Loader {
        #[arg(long, default_value_t = 2000)]
        images: usize,
        /// Side of the JPEGs read.
        #[arg(long, default_value_t = 256)]
        source_size: u32,
        /// Side of the model input.
        #[arg(long, default_value_t = 224)]
        size: u32,
        #[arg(long, default_value_t = 64)]
        batch: usize,
    },
}

pub fn run(which: Bench) -> anyhow::Result<bool> {
    match which {
        Bench::Itm { sizes, sets, tokens, cuda } => itm(&sizes, sets, tokens, cuda),
        Bench::ContextclipStep { steps, batch, tokens, cuda } => contextclip_step(steps, batch, tokens, cuda),
        Bench::Loader { images, source_size, size, batch } => {
            crate::bench_loader::run(images, source_size, size, batch)
        }
    }
}

const IMAGES_PER_SET: usize = 10;

fn itm(sizes: &[usize], sets: usize, tokens: usize, cuda: bool) -> anyhow::Result<bool> {
    let device = if cuda { Device::new_cuda(0)? } else { Device::Cpu };
    let mut results = vec![];
    for &size in sizes {
        let mut cfg = BlipConfig::itm_base_224();
        cfg.vision_config.image_size = size;
        let varmap = VarMap::new();
        let model =
            BlipItm::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &device)).context("building BLIP-base")?;
        let pixels = Tensor::randn(0f32, 1.0, (IMAGES_PER_SET, 3, size, size), &device)?;
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
            Ok(itc.sum_all()?.to_scalar::<f32>()? + itm.sum_all()?.to_scalar::<f32>()?)
        };
        one_set()?;
        let start = Instant::now();
        for _ in 0..sets {
            one_set()?;
        }
        let secs = start.elapsed().as_secs_f64();
        let sets_per_s = sets as f64 / secs;
        println!(
            "itm {size}px: {sets} sets of 1 text x {IMAGES_PER_SET} images in {secs:.2} s -> {sets_per_s:.3} sets/s ({:.1} images/s)",
            sets_per_s * IMAGES_PER_SET as f64
        );
        results.push(serde_json::json!({"image_size": size, "sets": sets, "seconds": secs, "sets_per_s": sets_per_s}));
    }
    let out = serde_json::json!({
        "workload": "BLIP-base ITM+ITC, 1 description vs 10 images",
        "tokens": tokens,
        "device": if cuda { "cuda:0" } else { "cpu" },
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "results": results,
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("itm.json"), serde_json::to_string_pretty(&out)?)?;
    println!("wrote {}", dir.join("itm.json").display());
    Ok(true)
}

fn contextclip_step(steps: usize, batch: usize, tokens: usize, cuda: bool) -> anyhow::Result<bool> {
    use ctxalign::models::contextclip::ContextClipConfig;
    use ctxalign::nn::{clip_loss, contextual_loss, ClipLossConfig, ContextualMode, Similarity, Targets};
    use ctxalign::train::contextclip::{build_contextclip, ContextClipInit, ContextClipLossConfig};
    use ctxalign::train::{group_params, Adam, AdamConfig, GroupSpec};

    let device = if cuda { Device::new_cuda(0)? } else { Device::Cpu };
    let cfg = ContextClipConfig::small(64);
    let loss_cfg = ContextClipLossConfig { learn_temperature: true, temperature: 0.07, ..Default::default() };
    let (model, params, temperature) = build_contextclip(&cfg, &ContextClipInit::default(), &loss_cfg, &device, 0)?;
    let mut optimizer = Adam::new(AdamConfig::adamw(), group_params(&params, &[GroupSpec::rest("all", 5e-4, 0.05)])?)?;
    let pixels = Tensor::randn(0f32, 1.0, (batch, 3, 64, 64), &device)?;
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
        let image = model.encode_images(&pixels, Some(seed))?;
        let text = model.encode_texts(&ids, &mask, Some(seed))?;
        let clip = clip_loss(&image, &text, &temperature.tensor(), &image_ids, &clip_cfg)?.loss;
        let loss = (clip + (contextual_loss(&image, &text, ContextualMode::Samples, 0.5)? * 0.5)?)?;
        optimizer.step(&loss.backward()?, 1.0)?;
        Ok(loss.to_scalar::<f32>()?)
    };
    step(0)?;
    let start = Instant::now();
    for s in 0..steps {
        step(s as u64 + 1)?;
    }
    let secs = start.elapsed().as_secs_f64();
    let samples_per_s = (steps * batch) as f64 / secs;
    println!("contextclip step: {steps} steps of {batch} in {secs:.2} s -> {samples_per_s:.1} samples/s");
    let out = serde_json::json!({
        "workload": "ContextCLIP small (ViT 4x128 on 64 px, BERT 2x128), L_CLIP + 0.5 L_CX, AdamW step",
        "batch": batch, "tokens": tokens, "steps": steps, "seconds": secs, "samples_per_s": samples_per_s,
        "device": if cuda { "cuda:0" } else { "cpu" },
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("contextclip_step.json"), serde_json::to_string_pretty(&out)?)?;
    println!("wrote {}", dir.join("contextclip_step.json").display());
    Ok(true)
}

//! bf16 mixed precision against f32 on the CPU (Candle runs bf16 there too): the same training step
//! in both precisions must give the same losses and gradients within the tolerances stated below,
//! every trainable tensor must still receive a gradient in bf16, and the optimizer must keep f32
//! master weights that accumulate updates bf16 would round away.
//!
//! Tolerances (bf16 keeps 8 significant bits, a relative rounding step of 2⁻⁸ ≈ 0.4 %, and the
//! error grows through the layers):
//! - each loss term: |bf16 − f32| ≤ 2 % of |f32| + 1e-3;
//! - all gradients together, flattened: cosine ≥ 0.99 and norm ratio within 5 % of 1.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use ctxalign::data::{CaptionCleaning, DecodeOptions, ImageProcessor, TextTokenizer};
use ctxalign::models::blip::BlipItm;
use ctxalign::models::contextblip::{ContextBlipConfig, MaskSelection};
use ctxalign::models::contextclip::ContextClipConfig;
use ctxalign::models::ModelFiles;
use ctxalign::nn::gradcheck::gradient_free_by_construction;
use ctxalign::train::contextblip::{build_pretraining, PretrainObjective};
use ctxalign::train::contextclip::{build_contextclip, ContextClipInit, ContextClipLossConfig, ContextClipObjective};
use ctxalign::train::Communicator;
use ctxalign::train::SampleDraws;
use ctxalign::train::{group_params, Adam, AdamConfig, GroupSpec, TrainableParams};

const LOSS_RELATIVE: f64 = 0.02;
const LOSS_ABSOLUTE: f64 = 1e-3;
const GRAD_COSINE: f64 = 0.99;
const GRAD_NORM_RATIO: f64 = 0.05;

/// The first `n` shipped example images (the gradient-reach check's own), preprocessed at `size`.
fn pixels(size: u32, n: usize) -> Tensor {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let images = ctxalign::reach::ReachInputs::shipped(&root).unwrap().images;
    ImageProcessor::blip(size).load_batch(&images[..n], DecodeOptions::default(), &Device::Cpu).unwrap()
}

/// Every trainable tensor's gradient as f64 values (a tensor without one is an empty entry).
fn gradients(params: &TrainableParams, loss: &Tensor) -> BTreeMap<String, Vec<f64>> {
    let grads = loss.backward().unwrap();
    params
        .vars
        .iter()
        .map(|(k, v)| {
            let g = grads
                .get(v.as_tensor())
                .map(|g| g.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap());
            (k.clone(), g.unwrap_or_default())
        })
        .collect()
}

fn close(name: &str, f32_value: f64, bf16_value: f64) {
    let allowed = LOSS_RELATIVE * f32_value.abs() + LOSS_ABSOLUTE;
    assert!(
        (f32_value - bf16_value).abs() <= allowed,
        "{name}: f32 {f32_value:.6} vs bf16 {bf16_value:.6} (allowed ±{allowed:.2e})"
    );
}

/// Compares the gradients of the two precisions and checks that every tensor got one in bf16.
fn compare_gradients(full: &BTreeMap<String, Vec<f64>>, mixed: &BTreeMap<String, Vec<f64>>) {
    let missing: Vec<&String> = mixed
        .iter()
        .filter(|(k, _)| !gradient_free_by_construction(k))
        .filter(|(_, g)| g.is_empty() || !g.iter().all(|x| x.is_finite()) || g.iter().all(|&x| x == 0.0))
        .map(|(k, _)| k)
        .collect();
    assert!(missing.is_empty(), "bf16: {} tensors without a finite non-zero gradient: {missing:?}", missing.len());
    let (mut dot, mut n_full, mut n_mixed) = (0.0, 0.0, 0.0);
    for (k, a) in full {
        let b = &mixed[k];
        assert_eq!(a.len(), b.len(), "{k}: gradient present in one precision only");
        for (x, y) in a.iter().zip(b) {
            dot += x * y;
            n_full += x * x;
            n_mixed += y * y;
        }
    }
    let cosine = dot / (n_full.sqrt() * n_mixed.sqrt());
    let ratio = (n_mixed / n_full).sqrt();
    println!("gradients bf16 vs f32: cosine {cosine:.5}, norm ratio {ratio:.4}");
    assert!(cosine >= GRAD_COSINE, "gradient cosine {cosine:.5} < {GRAD_COSINE}");
    assert!((ratio - 1.0).abs() <= GRAD_NORM_RATIO, "gradient norm ratio {ratio:.4}");
}

/// One S0 step's losses and gradients in `dtype`. Two images with distinct identities: each text's
/// only allowed hard negative is the other image, and random masking draws from the seed alone, so
/// both precisions make the same discrete choices.
fn s0_step(dtype: DType) -> (f64, f64, BTreeMap<String, Vec<f64>>, TrainableParams) {
    let files = ModelFiles::from_dir(&ctxalign::default_model_dir().unwrap()).unwrap();
    let blip_cfg = BlipItm::read_config(&files.config).unwrap();
    let mut cfg = ContextBlipConfig::for_blip(&blip_cfg);
    cfg.masking.selection = MaskSelection::Random;
    let (model, tmim, params) = build_pretraining(&files, &cfg, None, dtype, &Device::Cpu, 7).unwrap();
    let tokenizer = TextTokenizer::from_file(&files.tokenizer.clone().unwrap(), CaptionCleaning::blip(30), 35).unwrap();
    let objective = PretrainObjective::new(model, tmim, tokenizer, &Device::Cpu, 7).unwrap();
    let captions = ["a red circle and a blue square on a green background", "a yellow triangle on a gray background"];
    let size = blip_cfg.vision_config.image_size as u32;
    let px = pixels(size, 2).to_dtype(dtype).unwrap();
    let losses = objective.losses(&px, &captions, &[0, 1], &SampleDraws::sequential(3, captions.len())).unwrap();
    let scalar = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
    let (itm, tmim) = (scalar(&losses.itm), scalar(&losses.tmim));
    let grads = gradients(&params, &(&losses.itm + &losses.tmim).unwrap());
    (itm, tmim, grads, params)
}

#[test]
fn s0_step_in_bf16_matches_f32() {
    let (itm32, tmim32, g32, _) = s0_step(DType::F32);
    let (itm16, tmim16, g16, params) = s0_step(DType::BF16);
    println!("S0 itm {itm32:.5} / {itm16:.5}, tmim {tmim32:.5} / {tmim16:.5}");
    close("L_itm", itm32, itm16);
    close("L_tmim", tmim32, tmim16);
    compare_gradients(&g32, &g16);
    // The model computes in bf16; each trainable tensor has an f32 master of the same value.
    for (name, var) in &params.vars {
        assert_eq!(var.dtype(), DType::BF16, "{name}");
        let master = params.master(name).unwrap_or_else(|| panic!("{name} has no master"));
        assert_eq!(master.dtype(), DType::F32);
        let rounded = master.as_tensor().to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap();
        let diff = (rounded - var.as_tensor().to_dtype(DType::F32).unwrap()).unwrap().abs().unwrap();
        assert_eq!(diff.max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0, "{name}: parameter ≠ rounded master");
    }
    assert!(params.tensors().values().all(|t| t.dtype() == DType::F32), "exports must be the f32 masters");
}

fn contextclip_step(dtype: DType) -> (f64, f64, BTreeMap<String, Vec<f64>>) {
    let cfg = ContextClipConfig::small(32);
    // The CPU default's loss (cosine, hard targets, learned τ from 0.07; α 0.5). The paper's literal
    // form — dot products divided by τ — turns bf16's 0.4 % embedding error into logit errors of
    // the logits' own size (hundreds at τ 0.07): train that form in f32.
    let loss = ContextClipLossConfig {
        clip: ctxalign::nn::ClipLossConfig {
            similarity: ctxalign::nn::Similarity::Cosine,
            targets: ctxalign::nn::Targets::Hard,
            ..Default::default()
        },
        learn_temperature: true,
        temperature: 0.07,
        alpha: 0.5,
        ..Default::default()
    };
    let (model, params, temperature) =
        build_contextclip(&cfg, &ContextClipInit::default(), &loss, dtype, &Device::Cpu, 5).unwrap();
    let tokenizer = TextTokenizer::from_file(
        &ctxalign::contextclip::default_tokenizer().unwrap(),
        CaptionCleaning::none(),
        cfg.max_length,
    )
    .unwrap();
    let objective = ContextClipObjective {
        model,
        tokenizer,
        loss,
        temperature,
        device: Device::Cpu,
        seed: 5,
        comm: Communicator::single(),
    };
    let px = pixels(32, 4).to_dtype(dtype).unwrap();
    let captions = ["a red circle", "a blue square on green", "two yellow triangles", "a gray star left of a circle"];
    let losses = objective.losses(&px, &captions, &[0, 1, 2, 3], Some(&SampleDraws::sequential(9, 4))).unwrap();
    let cx = losses.contextual.unwrap();
    let scalar = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
    let (clip, cx_value) = (scalar(&losses.clip.loss), scalar(&cx));
    let total = (losses.clip.loss + (cx * 0.5).unwrap()).unwrap();
    (clip, cx_value, gradients(&params, &total))
}

#[test]
fn contextclip_step_in_bf16_matches_f32() {
    let (clip32, cx32, g32) = contextclip_step(DType::F32);
    let (clip16, cx16, g16) = contextclip_step(DType::BF16);
    println!("ContextCLIP clip {clip32:.5} / {clip16:.5}, cx {cx32:.5} / {cx16:.5}");
    close("L_CLIP", clip32, clip16);
    close("L_CX", cx32, cx16);
    compare_gradients(&g32, &g16);
}

/// An update far below bf16's resolution at the parameter's magnitude (2⁻⁷ at 1.0) must accumulate
/// in the f32 master rather than vanish, and the bf16 parameter must follow the rounded master.
#[test]
fn bf16_updates_accumulate_in_f32_masters() {
    let dev = Device::Cpu;
    let mut params = TrainableParams::default();
    let w = Var::from_tensor(&Tensor::ones(4, DType::BF16, &dev).unwrap()).unwrap();
    params.insert("w", w.clone()).unwrap();
    let groups = group_params(&params, &[GroupSpec::rest("all", 1e-4, 0.0)]).unwrap();
    let mut adam = Adam::new(AdamConfig::adamw(), groups).unwrap();
    for _ in 0..30 {
        let loss = w.as_tensor().to_dtype(DType::F32).unwrap().sum_all().unwrap();
        adam.step(&loss.backward().unwrap(), 1.0).unwrap();
    }
    // Adam moves each step by ≈ lr: 30 steps of 1e-4 → 0.997, which bf16 cannot hold apart from 1.
    let master = params.master("w").unwrap().as_tensor().to_vec1::<f32>().unwrap();
    assert!(master.iter().all(|&m| (m - 0.997).abs() < 1e-4), "master {master:?}");
    let value = w.as_tensor().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
    let rounded: Vec<f32> = Tensor::new(master.as_slice(), &dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(value, rounded);
    // Optimizer state is f32 too.
    let (moments, _) = adam.state_dict().unwrap();
    assert!(moments.values().all(|t| t.dtype() == DType::F32));
    assert_eq!(params.tensors()["w"].dtype(), DType::F32);
}

/// Every trainable tensor of every model (BLIP, ContextBLIP S0/S1/S2, ContextCLIP with both image
/// towers) gets a finite, non-zero gradient in f32 and in bf16 mixed precision.
#[test]
fn every_model_gets_every_gradient_in_f32_and_bf16() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let inputs = ctxalign::reach::ReachInputs::shipped(&root).unwrap();
    for precision in [ctxalign::Precision::F32, ctxalign::Precision::Bf16] {
        let reports =
            ctxalign::reach::gradient_reach(&inputs, &ctxalign::Runtime::new(Device::Cpu, precision)).unwrap();
        assert_eq!(reports.len(), 6);
        for r in &reports {
            println!("{precision} {}: {} tensors, loss {:.4}, {:.1} s", r.model, r.trainable, r.loss, r.seconds);
            assert!(r.trainable > 0 && r.passed(), "{precision} {}: loss {} missing {:?}", r.model, r.loss, r.missing);
        }
    }
}

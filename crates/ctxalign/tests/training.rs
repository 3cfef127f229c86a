//! Training machinery and BLIP's retrieval objective, end to end on generated data:
//! gradients reach every trainable tensor, resume is bit-exact, the NaN guard and Ctrl-C path work,
//! the objective's losses agree with an independent recomputation and with finite differences.

use ctxalign::nn::gradcheck::gradient_free_by_construction;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use ctxalign::data::captions::read_caption_json;
use ctxalign::data::loader::{Augment, Batch, CaptionDataset, DataLoader, Dataset, LoaderConfig};
use ctxalign::data::rng::Rng;
use ctxalign::data::vignettes::{write_benchmark, VignettesConfig};
use ctxalign::data::{CaptionCleaning, DataError, DecodeOptions, ImageProcessor, TextTokenizer};
use ctxalign::models::blip::{BlipConfig, BlipItm};
use ctxalign::train::blip::{BlipRetrievalObjective, INITIAL_TEMPERATURE, TEMPERATURE_KEY};
use ctxalign::train::SampleDraws;
use ctxalign::train::{
    build_for_training, group_params, train, transformer_init, Adam, AdamConfig, Checkpoint, GroupSpec, Interrupt,
    LossTerms, Objective, ParamSource, Schedule, ScheduleConfig, TrainConfig, TrainError, TrainableParams,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

/// A small caption set in the real BLIP caption-JSON format, written by the Vignettes generator.
fn caption_data(dir: &Path, images: usize) -> Vec<ctxalign::data::captions::CaptionedImage> {
    let cfg = VignettesConfig {
        seed: 5,
        image_size: 64,
        train_sets: 1,
        valid_sets: 1,
        test_sets: 1,
        caption_images: images,
        class_images: 1,
        ..Default::default()
    };
    write_benchmark(&cfg, dir, &|_| {}).unwrap();
    let mut items = read_caption_json(&dir.join("captions/train.json"), &dir.join("captions")).unwrap();
    assert!(items.len() >= images * 8 / 10, "the generator keeps about 90 % for training");
    items.truncate(images * 8 / 10);
    items
}

/// The tiny fixture's architecture, trained from scratch.
fn blip_objective(dtype: DType, seed: u64) -> (BlipRetrievalObjective, TrainableParams) {
    let dev = Device::Cpu;
    let cfg: BlipConfig = BlipItm::read_config(&fixture("blip_itm_tiny/config.json")).unwrap();
    let (model, mut params) =
        build_for_training(ParamSource::from_scratch(transformer_init(0.02), seed), dtype, &dev, |vb| {
            BlipItm::new(&cfg, vb)
        })
        .unwrap();
    let temperature = Var::new(INITIAL_TEMPERATURE, &dev).unwrap().to_dtype(dtype).unwrap();
    let temperature = Var::from_tensor(&temperature).unwrap();
    params.insert(TEMPERATURE_KEY, temperature.clone()).unwrap();
    let tokenizer =
        TextTokenizer::from_file(&fixture("blip_itm_tiny/tokenizer.json"), CaptionCleaning::blip(30), 35).unwrap();
    (BlipRetrievalObjective::new(model, tokenizer, temperature, seed).unwrap(), params)
}

/// The images of `items`, decoded and preprocessed as the scorer does (`[n, 3, 64, 64]`).
fn pixels_of(items: &[ctxalign::data::captions::CaptionedImage]) -> Tensor {
    let paths: Vec<&Path> = items.iter().map(|it| it.image.as_path()).collect();
    ImageProcessor::blip(64).load_batch(&paths, DecodeOptions::default(), &Device::Cpu).unwrap()
}

fn caption_loader(items: Vec<ctxalign::data::captions::CaptionedImage>, batch: usize) -> DataLoader<CaptionDataset> {
    let dataset = CaptionDataset {
        text: None,
        items,
        processor: ImageProcessor::blip(64),
        augment: Some(Augment::default()),
        decode: DecodeOptions::default(),
    };
    DataLoader::new(
        dataset,
        LoaderConfig { batch_size: batch, shuffle: true, seed: 3, prefetch: 2, drop_last: true, ..Default::default() },
    )
}

fn first_batch(loader: &DataLoader<CaptionDataset>) -> Batch<ctxalign::data::loader::CaptionSample> {
    loader.epoch(0, 0).next().unwrap().unwrap()
}

/// `‖∂loss/∂var‖²`, 0 when the variable received no gradient.
fn grad_norm_sq(grads: &candle_core::backprop::GradStore, var: &Var) -> f32 {
    grads.get(var).map_or(0.0, |g| g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap())
}

#[test]
fn every_trainable_tensor_gets_a_gradient_from_scratch() {
    let dir = tempfile::tempdir().unwrap();
    let loader = caption_loader(caption_data(dir.path(), 8), 4);
    let (mut objective, params) = blip_objective(DType::F32, 1);
    let batch = first_batch(&loader);
    let LossTerms { terms, .. } = objective.loss(&batch, 0).unwrap();
    let total = terms.iter().map(|(_, t)| t.clone()).reduce(|a, b| (a + b).unwrap()).unwrap();
    let grads = total.backward().unwrap();
    let mut missing = vec![];
    // Attention key biases cancel in the softmax: their "gradient" is rounding noise either way.
    for (name, var) in params.vars.iter().filter(|(k, _)| !gradient_free_by_construction(k)) {
        let norm = grad_norm_sq(&grads, var);
        if !(norm > 0.0 && norm.is_finite()) {
            missing.push(format!("{name}: gradient norm² {norm}"));
        }
    }
    // Every BLIP tensor plus the temperature.
    assert_eq!(
        params.len(),
        1 + candle_core::safetensors::load(fixture("blip_itm_tiny/model.safetensors"), &Device::Cpu).unwrap().len()
    );
    assert!(missing.is_empty(), "{} of {} without a gradient:\n{}", missing.len(), params.len(), missing.join("\n"));
}

/// Stage 1 of the default backbone's recipe (`with_itm = false`): one `itc` term, equal to the full
/// objective's, whose gradient reaches every tensor ITC uses — all but the cross-attention layers and
/// the ITM head, which only the ITM passes touch.
#[test]
fn itc_only_objective_matches_the_full_one_and_reaches_its_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let loader = caption_loader(caption_data(dir.path(), 8), 4);
    let (mut objective, params) = blip_objective(DType::F32, 1);
    let batch = first_batch(&loader);
    let full = objective.loss(&batch, 0).unwrap().terms;
    objective.with_itm = false;
    let LossTerms { terms, .. } = objective.loss(&batch, 0).unwrap();
    assert_eq!(terms.len(), 1);
    assert_eq!(terms[0].0, "itc");
    let value = |t: &Tensor| t.to_scalar::<f32>().unwrap();
    assert_eq!(value(&terms[0].1), value(&full.iter().find(|(n, _)| n == "itc").unwrap().1));
    let grads = terms[0].1.backward().unwrap();
    let itm_only = |name: &str| name.contains("crossattention") || name.starts_with("itm_head");
    let mut wrong = vec![];
    for (name, var) in params.vars.iter().filter(|(k, _)| !gradient_free_by_construction(k)) {
        let norm = grad_norm_sq(&grads, var);
        let expected = !itm_only(name);
        if (norm > 0.0 && norm.is_finite()) != expected {
            wrong.push(format!("{name}: gradient norm² {norm}, expected {}", if expected { "> 0" } else { "none" }));
        }
    }
    assert!(params.vars.keys().any(|n| itm_only(n)), "the test model has cross-attention and an ITM head");
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The objective's ITM loss recomputed from the model's own ITM logits for the pairs it drew, and
/// its ITC loss from the features: the wiring (which text meets which image, which label) is right.
#[test]
fn objective_losses_match_an_independent_recomputation() {
    let dir = tempfile::tempdir().unwrap();
    let items = caption_data(dir.path(), 8);
    assert_eq!(items.len(), 6);
    let (objective, _) = blip_objective(DType::F32, 2);
    let pixels = pixels_of(&items);
    let captions: Vec<&str> = items.iter().map(|it| it.captions[0].as_str()).collect();
    let ids = [0usize, 1, 2, 3, 4, 4]; // the last two share an identity: never each other's negative
    let losses = objective.losses(&pixels, &captions, &ids, &SampleDraws::sequential(9, captions.len())).unwrap();

    let model = &objective.model;
    let enc = model.encode_images(&pixels).unwrap();
    let scorer_nll = |img: usize, txt: usize, label: usize| -> f64 {
        let batch = objective.tokenizer.encode_batch(&[captions[txt]], 0).unwrap();
        let itm_ids = Tensor::new(batch.with_first_token(objective.enc_token_id), &Device::Cpu).unwrap();
        let mask = Tensor::new(batch.attention_mask.clone(), &Device::Cpu).unwrap();
        let logits = model.itm(&enc.memory.select(img).unwrap(), &itm_ids, &mask, false).unwrap().logits;
        let l: Vec<f32> = logits.i(0).unwrap().to_vec1().unwrap();
        let lse = ((l[0] as f64).exp() + (l[1] as f64).exp()).ln();
        lse - l[label] as f64
    };
    let mut nll = vec![];
    for t in 0..6 {
        nll.push(scorer_nll(t, t, 1));
    }
    for (t, (neg_image, _)) in losses.negatives.iter().enumerate() {
        let i = neg_image.unwrap();
        assert_ne!(ids[i], ids[t]);
        nll.push(scorer_nll(i, t, 0));
    }
    for (i, (_, neg_text)) in losses.negatives.iter().enumerate() {
        let t = neg_text.unwrap();
        assert_ne!(ids[i], ids[t]);
        nll.push(scorer_nll(i, t, 0));
    }
    let expected = nll.iter().sum::<f64>() / nll.len() as f64;
    let ours = losses.itm.to_scalar::<f32>().unwrap() as f64;
    assert!((ours - expected).abs() < 1e-4, "ITM {ours} vs recomputed {expected}");

    // ITC from the scorer-side features, with the identity targets written out.
    let text_batch = objective.tokenizer.encode_batch(&captions, 0).unwrap();
    let (tid, tmask) = text_batch.to_tensors(&Device::Cpu).unwrap();
    let tf: Vec<Vec<f32>> = model.text_features(&tid, &tmask).unwrap().to_vec2().unwrap();
    let vf: Vec<Vec<f32>> = enc.itc_features.to_vec2().unwrap();
    let sim =
        |i: usize, t: usize| vf[i].iter().zip(&tf[t]).map(|(a, b)| (*a * *b) as f64).sum::<f64>() / INITIAL_TEMPERATURE;
    let mut itc = 0.0;
    for (rows, cols) in [(true, false), (false, true)] {
        for a in 0..6 {
            let logit = |b: usize| if rows { sim(a, b) } else { sim(b, a) };
            let lse = (0..6).map(|b| logit(b).exp()).sum::<f64>().ln();
            let pos: Vec<usize> = (0..6).filter(|&b| ids[b] == ids[a]).collect();
            itc -= pos.iter().map(|&b| logit(b) - lse).sum::<f64>() / pos.len() as f64 / 6.0;
        }
        let _ = cols;
    }
    itc /= 2.0;
    let ours = losses.itc.loss.to_scalar::<f32>().unwrap() as f64;
    assert!((ours - itc).abs() < 1e-4, "ITC {ours} vs recomputed {itc}");
}

/// Central differences of the whole objective (f64, negatives fixed by the RNG) with respect to
/// entries of the temperature, the ITM head, a text cross-attention weight and a ViT weight.
#[test]
fn objective_finite_difference_gradients() {
    let dir = tempfile::tempdir().unwrap();
    let items = caption_data(dir.path(), 5);
    assert_eq!(items.len(), 4);
    let (objective, params) = blip_objective(DType::F64, 4);
    let pixels = pixels_of(&items).to_dtype(DType::F64).unwrap();
    let captions: Vec<&str> = items.iter().map(|it| it.captions[1].as_str()).collect();
    let ids = [0usize, 1, 2, 3];
    let total = || {
        let l = objective.losses(&pixels, &captions, &ids, &SampleDraws::sequential(11, captions.len())).unwrap();
        ((l.itc.loss.to_dtype(DType::F64).unwrap() + l.itm.to_dtype(DType::F64).unwrap()).unwrap(), l.negatives)
    };
    let (loss, negatives) = total();
    let grads = loss.backward().unwrap();
    for (name, flat_index) in [
        (TEMPERATURE_KEY, 0usize),
        ("itm_head.weight", 5),
        ("text_encoder.encoder.layer.1.crossattention.self.key.weight", 17),
        ("vision_model.encoder.layers.3.mlp.fc1.weight", 40),
    ] {
        let var = &params.vars[name];
        let base: Vec<f64> = var.flatten_all().unwrap().to_vec1().unwrap();
        let analytic: f64 = grads.get(var).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()[flat_index];
        let eps = 1e-5;
        let at = |delta: f64| {
            let mut v = base.clone();
            v[flat_index] += delta;
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap()).unwrap();
            let (l, n) = total();
            assert_eq!(n, negatives, "the perturbation changed the drawn negatives");
            l.to_scalar::<f64>().unwrap()
        };
        let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
        var.set(&Tensor::from_vec(base, var.shape(), &Device::Cpu).unwrap()).unwrap();
        let tol = 1e-6 * (1.0 + analytic.abs());
        assert!((numeric - analytic).abs() < tol, "{name}[{flat_index}]: numeric {numeric} vs analytic {analytic}");
        assert!(analytic != 0.0, "{name}: zero gradient");
    }
}

fn blip_run(out: &Path, data: &Path, max_steps: u64, resume: bool, dtype: DType) -> (TrainableParams, Adam) {
    let items = read_caption_json(&data.join("captions/train.json"), &data.join("captions")).unwrap();
    let loader = caption_loader(items, 2);
    let (mut objective, params) = blip_objective(dtype, 7);
    let groups = group_params(
        &params,
        &[
            GroupSpec::new("heads", 2e-3, 0.0, |n| n.starts_with("itm_head") || n == TEMPERATURE_KEY),
            GroupSpec::rest("backbone", 1e-3, 0.05),
        ],
    )
    .unwrap();
    let mut optimizer = Adam::new(AdamConfig::adamw(), groups).unwrap();
    let mut schedule = Schedule::new(ScheduleConfig::warmup_cosine(2, 8, 0.1));
    let cfg = TrainConfig {
        epochs: 2,
        max_steps: Some(max_steps),
        accumulate: 2,
        clip_norm: Some(1.0),
        checkpoint_every: 2,
        seed: 7,
        resume,
        progress: false,
        ..TrainConfig::new(out)
    };
    let summary =
        train(&cfg, &loader, &mut objective, &params, &mut optimizer, &mut schedule, &Interrupt::new()).unwrap();
    assert_eq!(summary.steps, max_steps);
    assert_eq!(summary.resumed_from.is_some(), resume);
    (params, optimizer)
}

/// 2N steps straight and N + resume + N give identical weights and optimizer state (bit for bit),
/// across an epoch boundary, with accumulation, clipping, warm-up + cosine and hard-negative draws;
/// in f32 and in bf16 mixed precision (where the f32 masters and the bf16 weights must both match).
#[test]
fn resume_is_bit_exact() {
    for dtype in [DType::F32, DType::BF16] {
        let data = tempfile::tempdir().unwrap();
        // 10 images → 5 micro-batches of 2 per epoch → 3 optimizer steps (the last one of a single
        // micro-batch): the split at step 2 falls mid-epoch, step 4 in the second epoch.
        caption_data(data.path(), 13);
        let (straight_dir, split_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (p1, o1) = blip_run(straight_dir.path(), data.path(), 4, false, dtype);
        blip_run(split_dir.path(), data.path(), 2, false, dtype);
        let (p2, o2) = blip_run(split_dir.path(), data.path(), 4, true, dtype);
        let values =
            |t: &Tensor| -> Vec<f32> { t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap() };
        for (name, v1) in &p1.vars {
            assert!(values(v1) == values(&p2.vars[name]), "{dtype:?}: parameter {name} differs after resume");
        }
        let (m1, m2) = (p1.tensors(), p2.tensors());
        assert!(m1.values().all(|t| t.dtype() == DType::F32), "checkpoints hold full-precision values");
        for (name, t) in &m1 {
            assert!(values(t) == values(&m2[name]), "{dtype:?}: master of {name} differs after resume");
        }
        let ((t1, m1), (t2, m2)) = (o1.state_dict().unwrap(), o2.state_dict().unwrap());
        assert_eq!(m1, m2, "optimizer step counts and groups");
        assert_eq!(t1.len(), t2.len());
        for (k, a) in &t1 {
            assert_eq!(a.dtype(), DType::F32, "{k}: optimizer state is f32");
            assert!(values(a) == values(&t2[k]), "{dtype:?}: {k}");
        }
        // The metrics file reads as one run: steps 1..=4 once each.
        let series = ctxalign::train::metrics::read_series(&split_dir.path().join("metrics.jsonl"), &["loss"]).unwrap();
        assert_eq!(series[0].iter().map(|p| p.0 as u64).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        assert!(split_dir.path().join("loss.png").is_file());
    }
}

// --- the loop itself, on a model small enough to reason about ---

/// y = 2·x0 − x1 + 0.5, one sample per index; a NaN at `nan_at` (if any).
struct Line {
    n: usize,
}
impl Dataset for Line {
    type Item = (f64, f64, f64);
    fn len(&self) -> usize {
        self.n
    }
    fn load(&self, index: usize, _rng: &mut Rng) -> Result<Self::Item, DataError> {
        let (x0, x1) = ((index % 7) as f64 / 7.0, (index % 5) as f64 / 5.0);
        Ok((x0, x1, 2.0 * x0 - x1 + 0.5))
    }
    fn check(&self, _index: usize) -> Result<(), DataError> {
        Ok(())
    }
}

struct LineFit {
    w: Var,
    nan_at: Option<u64>,
    interrupt_at: Option<(u64, Interrupt)>,
    /// Fails (an error, or a panic) at this step index: a device error, a bug.
    fail_at: Option<(u64, bool)>,
}
impl Objective for LineFit {
    type Item = (f64, f64, f64);
    fn loss(&mut self, batch: &Batch<Self::Item>, step: u64) -> ctxalign::train::Result<LossTerms> {
        if let Some((at, i)) = &self.interrupt_at {
            if step == *at {
                i.request(); // what the Ctrl-C handler does
            }
        }
        match self.fail_at {
            Some((at, false)) if at == step => {
                return Err(TrainError::Config(format!("the device failed at step index {step}")))
            }
            Some((at, true)) if at == step => panic!("index out of range at step index {step}"),
            _ => {}
        }
        let x: Vec<f64> = batch.items.iter().flat_map(|(a, b, _)| [*a, *b, 1.0]).collect();
        let y: Vec<f64> = batch.items.iter().map(|(_, _, y)| *y).collect();
        let x = Tensor::from_vec(x, (batch.items.len(), 3), &Device::Cpu)?;
        let pred = x.matmul(&self.w.as_tensor().unsqueeze(1)?)?.squeeze(1)?;
        let mut mse = (pred - Tensor::new(y, &Device::Cpu)?)?.sqr()?.mean_all()?;
        if self.nan_at == Some(step) {
            mse = (mse * f64::NAN)?;
        }
        Ok(LossTerms { terms: vec![("mse".into(), mse)], samples: batch.items.len() })
    }
}

fn line_setup(nan_at: Option<u64>, interrupt_at: Option<(u64, Interrupt)>) -> (LineFit, TrainableParams, Adam) {
    let w = Var::zeros(3, DType::F64, &Device::Cpu).unwrap();
    let mut params = TrainableParams::default();
    params.insert("w", w.clone()).unwrap();
    let opt =
        Adam::new(AdamConfig::adam(), group_params(&params, &[GroupSpec::rest("all", 0.05, 0.0)]).unwrap()).unwrap();
    (LineFit { w, nan_at, interrupt_at, fail_at: None }, params, opt)
}

#[test]
fn the_loop_learns_and_the_nan_guard_names_step_and_term() {
    let out = tempfile::tempdir().unwrap();
    let loader = DataLoader::new(Line { n: 64 }, LoaderConfig { batch_size: 8, ..Default::default() });
    let (mut fit, params, mut opt) = line_setup(None, None);
    let cfg = TrainConfig { epochs: 40, progress: false, ..TrainConfig::new(out.path()) };
    let mut schedule = Schedule::new(ScheduleConfig::constant());
    let summary = train(&cfg, &loader, &mut fit, &params, &mut opt, &mut schedule, &Interrupt::new()).unwrap();
    let w: Vec<f64> = fit.w.to_vec1().unwrap();
    assert!((w[0] - 2.0).abs() < 0.05 && (w[1] + 1.0).abs() < 0.05 && (w[2] - 0.5).abs() < 0.05, "{w:?}");
    assert_eq!(summary.steps, 40 * 8);

    let out = tempfile::tempdir().unwrap();
    let (mut fit, params, mut opt) = line_setup(Some(5), None);
    let cfg = TrainConfig { checkpoint_every: 2, progress: false, ..TrainConfig::new(out.path()) };
    let err = train(&cfg, &loader, &mut fit, &params, &mut opt, &mut schedule, &Interrupt::new()).unwrap_err();
    // Numbered as metrics.jsonl and checkpoints count: the loss of the 6th step (index 5) is NaN,
    // 5 steps are done.
    let msg = err.to_string();
    match err {
        TrainError::NonFinite { step, term, .. } => assert_eq!((step, term.as_str()), (6, "mse")),
        other => panic!("expected the NaN guard, got {other}"),
    }
    assert!(msg.starts_with("step 6: mse is NaN") && msg.contains("5 step(s) done"), "{msg}");
    // The last good checkpoint (step 4) is intact and no newer one was written.
    let ckpts = ctxalign::train::Checkpointer::new(out.path().join("checkpoints"), 2).list().unwrap();
    assert_eq!(ckpts.last().unwrap().0, 4);
}

#[test]
fn interrupt_writes_a_checkpoint_that_resumes() {
    let out = tempfile::tempdir().unwrap();
    let loader = DataLoader::new(Line { n: 40 }, LoaderConfig { batch_size: 8, ..Default::default() });
    let interrupt = Interrupt::new();
    let (mut fit, params, mut opt) = line_setup(None, Some((6, interrupt.clone())));
    let cfg = TrainConfig { epochs: 3, progress: false, ..TrainConfig::new(out.path()) };
    let mut schedule = Schedule::new(ScheduleConfig::constant());
    let summary = train(&cfg, &loader, &mut fit, &params, &mut opt, &mut schedule, &interrupt).unwrap();
    assert!(summary.interrupted);
    assert_eq!(summary.steps, 7);
    assert!(!interrupt.requested(), "a handled interrupt is cleared: it does not stop the next run");
    let ckpt = Checkpoint::load(summary.checkpoint.as_ref().unwrap()).unwrap();
    assert_eq!((ckpt.state.step, ckpt.state.epoch, ckpt.state.batch_in_epoch), (7, 1, 2));

    let (mut fit, params, mut opt) = line_setup(None, None);
    let cfg = TrainConfig { resume: true, ..cfg };
    let summary = train(&cfg, &loader, &mut fit, &params, &mut opt, &mut schedule, &Interrupt::new()).unwrap();
    assert_eq!(summary.steps, 15);
    assert!(!summary.interrupted);
}

#[test]
fn checkpoint_problems_name_the_file_and_tensor() {
    let out = tempfile::tempdir().unwrap();
    let loader = DataLoader::new(Line { n: 16 }, LoaderConfig { batch_size: 8, ..Default::default() });
    let (mut fit, params, mut opt) = line_setup(None, None);
    let cfg = TrainConfig { progress: false, ..TrainConfig::new(out.path()) };
    let mut schedule = Schedule::new(ScheduleConfig::constant());
    let summary = train(&cfg, &loader, &mut fit, &params, &mut opt, &mut schedule, &Interrupt::new()).unwrap();
    let ckpt = Checkpoint::load(summary.checkpoint.as_ref().unwrap()).unwrap();

    let mut other = TrainableParams::default();
    other.insert("v", Var::zeros(3, DType::F64, &Device::Cpu).unwrap()).unwrap();
    let msg = ckpt.restore_params(&other).unwrap_err().to_string();
    assert!(msg.contains("model.safetensors") && msg.contains("`v` is missing"), "{msg}");
    let mut wide = TrainableParams::default();
    wide.insert("w", Var::zeros(4, DType::F64, &Device::Cpu).unwrap()).unwrap();
    let msg = ckpt.restore_params(&wide).unwrap_err().to_string();
    assert!(msg.contains("`w` has shape [3]") && msg.contains("[4]"), "{msg}");
    // A checkpoint holding tensors the model being resumed does not have (a run of a larger
    // model): refused, naming them, not resumed with them dropped.
    let dir = summary.checkpoint.as_ref().unwrap();
    let mut saved = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    saved.insert("layer.9.w".into(), Tensor::zeros(3, DType::F64, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&saved, dir.join("model.safetensors")).unwrap();
    let msg = Checkpoint::load(dir).unwrap().restore_params(&params).unwrap_err().to_string();
    assert!(
        msg.contains("model.safetensors") && msg.contains("`layer.9.w`") && msg.contains("not parameters"),
        "{msg}"
    );
    // A different seed is not the same run.
    let cfg = TrainConfig { resume: true, seed: 99, ..cfg };
    let (mut fit, params, mut opt) = line_setup(None, None);
    let msg =
        train(&cfg, &loader, &mut fit, &params, &mut opt, &mut schedule, &Interrupt::new()).unwrap_err().to_string();
    assert!(msg.contains("seed 0") && msg.contains("seed 99"), "{msg}");
}

/// A fresh run into a folder holding another run's checkpoints is refused (it would be "resumed"
/// from the old run later); `overwrite` starts over, deleting them. A resume whose settings differ
/// from the checkpoint's run is refused naming each difference, unless accepted (then reported).
#[test]
fn used_folders_and_changed_settings_are_refused() {
    let out = tempfile::tempdir().unwrap();
    let loader = DataLoader::new(Line { n: 16 }, LoaderConfig { batch_size: 8, ..Default::default() });
    let mut schedule = Schedule::new(ScheduleConfig::constant());
    let settings = serde_json::json!({ "options": { "lr": 0.05, "batch_size": 8 }, "inputs": "a1" });
    let cfg = TrainConfig { epochs: 2, progress: false, settings: settings.clone(), ..TrainConfig::new(out.path()) };
    let (mut fit, params, mut opt) = line_setup(None, None);
    train(&cfg, &loader, &mut fit, &params, &mut opt, &mut schedule, &Interrupt::new()).unwrap();

    let (mut fit, params, mut opt) = line_setup(None, None);
    let err = train(&cfg, &loader, &mut fit, &params, &mut opt, &mut schedule, &Interrupt::new()).unwrap_err();
    assert!(matches!(err, TrainError::UsedFolder { latest_step: 4, .. }), "{err}");
    assert!(err.to_string().contains("overwrite"), "{err}");

    let changed = serde_json::json!({ "options": { "lr": 0.1, "batch_size": 8 }, "inputs": "b2" });
    let resume = TrainConfig { resume: true, epochs: 3, settings: changed, ..cfg.clone() };
    let (mut fit, params, mut opt) = line_setup(None, None);
    let err = train(&resume, &loader, &mut fit, &params, &mut opt, &mut schedule, &Interrupt::new()).unwrap_err();
    match &err {
        TrainError::SettingsChanged { differences, .. } => {
            assert_eq!(differences, &["inputs: \"a1\" → \"b2\"", "options.lr: 0.05 → 0.1"], "{err}")
        }
        other => panic!("expected SettingsChanged, got {other}"),
    }
    let accepted = TrainConfig { accept_changed_settings: true, ..resume };
    let (mut fit, params, mut opt) = line_setup(None, None);
    let summary = train(&accepted, &loader, &mut fit, &params, &mut opt, &mut schedule, &Interrupt::new()).unwrap();
    assert_eq!((summary.steps, summary.settings_changed.len()), (6, 2));

    let fresh = TrainConfig { overwrite: true, ..cfg };
    let (mut fit, params, mut opt) = line_setup(None, None);
    let summary = train(&fresh, &loader, &mut fit, &params, &mut opt, &mut schedule, &Interrupt::new()).unwrap();
    assert_eq!((summary.steps, summary.resumed_from.is_none()), (4, true));
    let steps: Vec<u64> = ctxalign::train::Checkpointer::new(out.path().join("checkpoints"), 2)
        .list()
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(steps, vec![4], "the earlier run's step-6 checkpoint is gone");
}

/// A sample that fails to load mid-run (a deleted image) stops the run with the steps done saved
/// first; once the data is fixed, `--resume` continues from there.
#[test]
fn a_data_error_mid_run_saves_the_steps_done_first() {
    struct Flaky {
        bad: Option<usize>,
    }
    impl Dataset for Flaky {
        type Item = (f64, f64, f64);
        fn len(&self) -> usize {
            32
        }
        fn load(&self, index: usize, rng: &mut Rng) -> Result<Self::Item, DataError> {
            if Some(index) == self.bad {
                return Err(DataError::NotFound { path: PathBuf::from(format!("images/sample {index}.jpg")) });
            }
            Line { n: 32 }.load(index, rng)
        }
        fn check(&self, _index: usize) -> Result<(), DataError> {
            Ok(()) // the file disappears after the check: found only when drawn
        }
    }
    let out = tempfile::tempdir().unwrap();
    let config = LoaderConfig { batch_size: 8, shuffle: false, ..Default::default() };
    let mut schedule = Schedule::new(ScheduleConfig::constant());
    let cfg = TrainConfig { epochs: 1, progress: false, ..TrainConfig::new(out.path()) };
    // Sample 20 is in the third batch: two steps are done when it fails.
    let flaky = DataLoader::new(Flaky { bad: Some(20) }, config.clone());
    let (mut fit, params, mut opt) = line_setup(None, None);
    let err = train(&cfg, &flaky, &mut fit, &params, &mut opt, &mut schedule, &Interrupt::new()).unwrap_err();
    match &err {
        TrainError::DataDuringTraining { step: 2, checkpoint: Some(path), .. } => {
            assert!(path.ends_with("step-00000002"), "{err}");
            assert!(err.to_string().contains("sample 20") && err.to_string().contains("is intact"), "{err}");
        }
        other => panic!("expected DataDuringTraining at step 2 with a checkpoint, got {other}"),
    }
    let fixed = DataLoader::new(Flaky { bad: None }, config);
    let (mut fit, params, mut opt) = line_setup(None, None);
    let resume = TrainConfig { resume: true, ..cfg };
    let summary = train(&resume, &fixed, &mut fit, &params, &mut opt, &mut schedule, &Interrupt::new()).unwrap();
    assert_eq!(summary.steps, 4);
}

/// Temporary folders of a killed or failed save (a full disk) are removed before the next save,
/// so they never accumulate and `--resume` never meets one.
#[test]
fn stale_temporary_checkpoint_folders_are_removed_before_saving() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("checkpoints");
    let (_, params, opt) = line_setup(None, None);
    let state = ctxalign::train::checkpoint::TrainerState {
        step: 1,
        epoch: 0,
        batch_in_epoch: 1,
        seed: 0,
        schedule: Schedule::new(ScheduleConfig::constant()),
        optimizer: opt.meta(),
        extra: serde_json::Value::Null,
        world_size: 1,
    };
    // One left by another process, one by this process (a failed earlier save of the same step).
    std::fs::create_dir_all(dir.join(".tmp-step-00000009-1")).unwrap();
    std::fs::create_dir_all(dir.join(format!(".tmp-step-00000001-{}", std::process::id())).join("junk")).unwrap();
    ctxalign::train::Checkpointer::new(&dir, 2).save(&params, &opt, &state).unwrap();
    let mut names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, vec!["latest.json", "step-00000001"], "the checkpoint and the record of the newest");
    let saved = std::fs::read_dir(dir.join("step-00000001")).unwrap().count();
    assert_eq!(saved, 3, "model, optimizer and trainer state, nothing left over");
}

/// Frozen parameters are loaded as plain tensors: only the trainable ones become `Var`s.
#[test]
fn frozen_weights_are_not_variables() {
    let dir = fixture("blip_itm_tiny");
    let cfg: BlipConfig = BlipItm::read_config(&dir.join("config.json")).unwrap();
    let source = ParamSource {
        checkpoint: Some((vec![dir.join("model.safetensors")], ctxalign::models::loading::RenameTable::identity())),
        allowed_unused: BlipItm::allowed_unused(),
        trainable: Box::new(|n| n.starts_with("itm_head")),
        init: Box::new(transformer_init(0.02)),
        seed: 0,
    };
    let (model, params) = build_for_training(source, DType::F32, &Device::Cpu, |vb| BlipItm::new(&cfg, vb)).unwrap();
    assert_eq!(params.vars.keys().collect::<Vec<_>>(), vec!["itm_head.bias", "itm_head.weight"]);
    assert!(!model.vision_proj.weight().is_variable());
    assert!(model.itm_head.weight().is_variable());
    // …and carry the checkpoint's values.
    let stored = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let a: Vec<f32> = stored["itm_head.weight"].to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = params.vars["itm_head.weight"].flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a, b);
}

/// The evaluators on the test model: every caption is a query, every description gets a prediction
/// in its set, and the reported counts add up.
#[test]
fn evaluators_cover_every_query_and_description() {
    let dir = tempfile::tempdir().unwrap();
    caption_data(dir.path(), 20);
    let files = ctxalign::models::ModelFiles::from_dir(&fixture("blip_itm_tiny")).unwrap();
    let scorer = ctxalign::BlipScorer::from_files(&files, Default::default(), &Device::Cpu).unwrap();
    let captions = dir.path().join("captions");
    let val = read_caption_json(&captions.join("val.json"), &captions).unwrap();
    let report = ctxalign::evaluate::caption_retrieval(&scorer, &val, 3, &|_| {}).unwrap();
    let queries: usize = val.iter().map(|i| i.captions.len()).sum();
    assert_eq!(report.text_to_image.queries, queries);
    assert_eq!(report.image_to_text.queries, val.len());
    let reranked = report.reranked.as_ref().expect("caption_retrieval re-ranks");
    assert_eq!((reranked.k, reranked.text_to_image.queries), (3, queries));
    let r = &reranked.text_to_image.recall_at;
    assert!(r[0].1 <= r[1].1 && r[1].1 <= r[2].1);
    // With every image among the top 10 candidates, R@10 is 1.
    assert_eq!(r[2].1, 1.0);

    let split = ctxalign::data::imagecode::ImageCodeSplit::open(&dir.path().join("imagecode"), "valid").unwrap();
    let zs = ctxalign::evaluate::imagecode_zero_shot(&scorer, &split, &|_| {}).unwrap();
    assert_eq!(zs.itm.predictions.len(), split.examples.len());
    assert!(zs.itm.predictions.iter().chain(&zs.itc.predictions).all(|&p| p < 10));
    let (_, total) = zs.itm.accuracy["all"];
    assert_eq!(total, split.examples.len());
    let (v, s) = (zs.itm.accuracy.get("video").map_or(0, |x| x.1), zs.itm.accuracy.get("static").map_or(0, |x| x.1));
    assert_eq!(v + s, total);
}

/// A run that fails mid-way for a reason that is not the data — an objective's error, a panic —
/// checkpoints the steps done before it returns the error, and `resume` continues from there to the
/// same weights as a run that never failed.
#[test]
fn any_failure_mid_run_checkpoints_the_steps_done_first() {
    let loader = DataLoader::new(Line { n: 32 }, LoaderConfig { batch_size: 8, ..Default::default() });
    let mut schedule = Schedule::new(ScheduleConfig::constant());
    let straight = tempfile::tempdir().unwrap();
    let (mut fit, params, mut opt) = line_setup(None, None);
    let cfg = TrainConfig { epochs: 2, progress: false, ..TrainConfig::new(straight.path()) };
    train(&cfg, &loader, &mut fit, &params, &mut opt, &mut schedule, &Interrupt::new()).unwrap();
    let expected: Vec<f64> = fit.w.to_vec1().unwrap();

    for panics in [false, true] {
        let out = tempfile::tempdir().unwrap();
        let cfg = TrainConfig { epochs: 2, progress: false, ..TrainConfig::new(out.path()) };
        let (mut fit, params, mut opt) = line_setup(None, None);
        fit.fail_at = Some((5, panics));
        let err = train(&cfg, &loader, &mut fit, &params, &mut opt, &mut schedule, &Interrupt::new()).unwrap_err();
        let msg = err.to_string();
        match &err {
            TrainError::StoppedMidRun { step: 5, checkpoint: Some(path), not_saved: None, source } => {
                assert!(path.ends_with("step-00000005"), "{msg}");
                assert!(msg.starts_with("step 6: ") && msg.contains("saved in"), "{msg}");
                match (panics, source.as_ref()) {
                    (false, TrainError::Config(m)) => assert!(m.contains("device failed"), "{msg}"),
                    (true, TrainError::Panicked(m)) => assert!(m.contains("index out of range"), "{msg}"),
                    _ => panic!("panics {panics}: {msg}"),
                }
            }
            _ => panic!("expected a checkpoint of the 5 steps done: {msg}"),
        }
        let (mut fit, params, mut opt) = line_setup(None, None);
        let resume = TrainConfig { resume: true, ..cfg };
        let summary =
            train(&resume, &loader, &mut fit, &params, &mut opt, &mut schedule, &Interrupt::new()).unwrap();
        assert_eq!(summary.steps, 8);
        assert_eq!(fit.w.to_vec1::<f64>().unwrap(), expected, "panics {panics}: resumed exactly");
    }
    // A failure before any step has nothing to save, and says so.
    let out = tempfile::tempdir().unwrap();
    let cfg = TrainConfig { progress: false, ..TrainConfig::new(out.path()) };
    let (mut fit, params, mut opt) = line_setup(None, None);
    fit.fail_at = Some((0, false));
    let err = train(&cfg, &loader, &mut fit, &params, &mut opt, &mut schedule, &Interrupt::new()).unwrap_err();
    assert!(matches!(err, TrainError::StoppedMidRun { step: 0, checkpoint: None, .. }), "{err}");
    assert!(err.to_string().contains("nothing to save"), "{err}");
    assert!(!out.path().join("checkpoints").exists());
}

/// How `resume` starts, in every case that used to pass silently: a folder that does not exist is
/// an error; one without checkpoints starts fresh and says so; a newest checkpoint that was deleted
/// is named; fewer steps than done is an error and as many trains nothing, saying so; a schedule
/// whose length follows the total steps is a changed setting (accepted, it follows the new total).
#[test]
fn resume_says_what_it_resumes() {
    let loader = DataLoader::new(Line { n: 16 }, LoaderConfig { batch_size: 8, ..Default::default() });
    let cosine = |total| Schedule::new(ScheduleConfig::warmup_cosine(0, total, 0.1));
    let tmp = tempfile::tempdir().unwrap();
    let run = |dir: &Path, steps: u64, resume: bool, accept: bool, schedule: &mut Schedule| {
        let cfg = TrainConfig {
            epochs: 100,
            max_steps: Some(steps),
            checkpoint_every: 1,
            keep_last: 3,
            resume,
            accept_changed_settings: accept,
            progress: false,
            ..TrainConfig::new(dir)
        };
        let (mut fit, params, mut opt) = line_setup(None, None);
        train(&cfg, &loader, &mut fit, &params, &mut opt, schedule, &Interrupt::new())
    };
    let typo = tmp.path().join("no-such-run");
    let err = run(&typo, 4, true, false, &mut cosine(4)).unwrap_err();
    assert!(matches!(err, TrainError::NothingToResume { .. }) && err.to_string().contains("no-such-run"), "{err}");
    assert!(!typo.exists(), "nothing created");

    let dir = tmp.path().join("run");
    std::fs::create_dir_all(&dir).unwrap();
    let summary = run(&dir, 4, true, false, &mut cosine(4)).unwrap();
    assert_eq!((summary.steps, summary.resumed_from.is_none()), (4, true));
    assert!(summary.notices.iter().any(|n| n.contains("holds no checkpoint") && n.contains("from scratch")));

    // The newest checkpoint deleted: continued from the older one, and said so.
    std::fs::remove_dir_all(dir.join("checkpoints/step-00000004")).unwrap();
    let summary = run(&dir, 4, true, false, &mut cosine(4)).unwrap();
    assert!(summary.resumed_from.as_ref().unwrap().ends_with("step-00000003"));
    assert!(
        summary.notices.iter().any(|n| n.contains("step 4, is gone") && n.contains("steps 4–4")),
        "{:?}",
        summary.notices
    );
    // As many steps as done: nothing to train, said; fewer: an error naming both.
    let summary = run(&dir, 4, true, false, &mut cosine(4)).unwrap();
    assert!(summary.notices.iter().any(|n| n.contains("nothing left to train")), "{:?}", summary.notices);
    let err = run(&dir, 2, true, false, &mut cosine(2)).unwrap_err();
    match &err {
        TrainError::AlreadyPast { done: 4, asked: 2, .. } => assert!(err.to_string().contains("at step 4"), "{err}"),
        other => panic!("{other}"),
    }
    // More steps under a cosine over the total: the schedule would change, so it is refused unless
    // accepted; accepted, the rate follows the new total (not the old one's floor).
    let err = run(&dir, 8, true, false, &mut cosine(8)).unwrap_err();
    match &err {
        TrainError::SettingsChanged { differences, .. } => {
            assert!(differences[0].starts_with("schedule.decay.total_steps: 4 → 8"), "{differences:?}")
        }
        other => panic!("{other}"),
    }
    let mut schedule = cosine(8);
    let summary = run(&dir, 8, true, true, &mut schedule).unwrap();
    assert_eq!(summary.steps, 8);
    assert_eq!(schedule.config, ScheduleConfig::warmup_cosine(0, 8, 0.1));
    let lrs: Vec<f64> = std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["lr/all"].as_f64().unwrap())
        .collect();
    // Step 5 (index 4) at the new cosine's midpoint, not at the old schedule's floor of 10 %.
    assert!((lrs[4] - 0.05 * cosine(8).factor(4, 0)).abs() < 1e-12 && lrs[4] > 0.05 * 0.5, "{lrs:?}");
}

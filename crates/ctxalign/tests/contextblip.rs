//! ContextBLIP end to end on the shipped small BLIP: gradients reach every trainable tensor through
//! the frozen BERT (S0) and through the whole model (S1); the recipes write folders that load,
//! score, fine-tune and evaluate; bad ContextBLIP folders give errors that name file and key.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ctxalign::contextblip::{
    evaluate_finetuned, finetune_s1, finetune_s2, pretrain, FinetuneOptions, InterContextOptions, PretrainOptions,
};
use ctxalign::data::captions::read_caption_json;
use ctxalign::data::imagecode::ImageCodeSplit;
use ctxalign::data::vignettes::{write_benchmark, VignettesConfig};
use ctxalign::data::{CaptionCleaning, DecodeOptions, ImageProcessor, TextTokenizer};
use ctxalign::evaluate::imagecode_zero_shot;
use ctxalign::models::blip::BlipItm;
use ctxalign::models::contextblip::{
    candidate_cross_entropy, ContextBlip, ContextBlipConfig, ContextBlipRecord, Stage,
};
use ctxalign::models::{LoadError, ModelFiles};
use ctxalign::train::contextblip::{build_finetuning, build_pretraining, FinetuneObjective, PretrainObjective};
use ctxalign::train::SampleDraws;
use ctxalign::train::TrainableParams;
use ctxalign::{BlipScorer, ContextBlipPredictor, Error, Runtime, ScorerOptions};

fn default_files() -> ModelFiles {
    ModelFiles::from_dir(&ctxalign::default_model_dir().unwrap()).unwrap()
}

fn scene_pixels(n: usize) -> Tensor {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/images");
    let paths: Vec<PathBuf> = ["scene-1.jpg", "scene-2.jpg", "scene-4.jpg", "scene-7.jpg"]
        .iter()
        .cycle()
        .take(n)
        .map(|f| dir.join(f))
        .collect();
    ImageProcessor::blip(96).load_batch(&paths, DecodeOptions::default(), &Device::Cpu).unwrap()
}

fn tokenizer() -> TextTokenizer {
    TextTokenizer::from_file(&default_files().tokenizer.unwrap(), CaptionCleaning::blip(30), 35).unwrap()
}

/// Names of trainable tensors whose gradient is missing, zero or not finite (attention key biases,
/// gradient-free by construction, are not counted).
fn without_gradient(params: &TrainableParams, loss: &Tensor) -> Vec<String> {
    let grads = loss.backward().unwrap();
    params
        .vars
        .iter()
        .filter(|(k, _)| !ctxalign::nn::gradcheck::gradient_free_by_construction(k))
        .filter(|(_, v)| {
            grads.get(v.as_tensor()).is_none_or(|g| {
                let n = g.to_dtype(DType::F32).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
                !(n > 0.0 && n.is_finite())
            })
        })
        .map(|(k, _)| k.clone())
        .collect()
}

#[test]
fn s0_gradients_reach_adapter_decoder_and_text_adapter_through_frozen_bert() {
    let files = default_files();
    let blip_cfg = BlipItm::read_config(&files.config).unwrap();
    let cfg = ContextBlipConfig::for_blip(&blip_cfg);
    let (model, tmim, params) = build_pretraining(&files, &cfg, None, DType::F32, &Device::Cpu, 3).unwrap();
    assert!(params.vars.keys().all(|k| ["adapter.", "decoder.", "text_adapter."].iter().any(|p| k.starts_with(p))));
    assert!(
        params.vars.keys().any(|k| k.starts_with("adapter."))
            && params.vars.keys().any(|k| k.starts_with("text_adapter."))
    );
    let objective = PretrainObjective::new(model, tmim, tokenizer(), &Device::Cpu, 3).unwrap();
    let captions = [
        "a red circle and a blue square on a green background",
        "a yellow triangle on a gray background",
        "two blue squares on a white background",
        "a green star left of a red circle",
    ];
    let losses = objective
        .losses(&scene_pixels(4), &captions, &[0, 1, 2, 3], &SampleDraws::sequential(5, captions.len()))
        .unwrap();
    assert_eq!(losses.mask.masked_count(), 16, "int(0.25 · 64) patches");
    let total = (&losses.itm + &losses.tmim).unwrap();
    let missing = without_gradient(&params, &total);
    assert!(missing.is_empty(), "{} of {} tensors without gradient: {missing:?}", missing.len(), params.len());
    // The adapter alone is reached by ITM only, i.e. through the frozen text encoder.
    let itm_only = without_gradient(&params, &losses.itm);
    assert!(itm_only.iter().all(|k| !k.starts_with("adapter.")), "adapter cut off from ITM: {itm_only:?}");
}

#[test]
fn s1_gradients_reach_every_trainable_tensor() {
    let files = default_files();
    let blip_cfg = BlipItm::read_config(&files.config).unwrap();
    let cfg = ContextBlipConfig::for_blip(&blip_cfg);
    let dir = tempfile::tempdir().unwrap();
    let (_, _, s0) = build_pretraining(&files, &cfg, None, DType::F32, &Device::Cpu, 1).unwrap();
    ContextBlip::save(dir.path(), &ContextBlipRecord::new(Stage::S0, cfg.clone()), &s0.tensors()).unwrap();
    let (model, head, params) =
        build_finetuning(&files, &dir.path().join("contextblip.safetensors"), &cfg, true, DType::F32, &Device::Cpu, 1)
            .unwrap();
    assert!(
        params.vars.contains_key("head.weight") && params.vars.contains_key("vision_model.embeddings.class_embedding")
    );
    assert!(!params.vars.keys().any(|k| k.starts_with("decoder.") || k.starts_with("itm_head.")));
    let objective = FinetuneObjective::new(model, head, tokenizer(), true, &Device::Cpu).unwrap();
    let logits = objective.logits(&scene_pixels(10), "a red circle and a blue square").unwrap();
    assert_eq!(logits.dims(), &[10]);
    let loss = candidate_cross_entropy(&logits.unsqueeze(0).unwrap(), &[3]).unwrap();
    let missing = without_gradient(&params, &loss);
    assert!(missing.is_empty(), "{} of {} tensors without gradient: {missing:?}", missing.len(), params.len());
}

/// S0 → zero-shot → S1 → S2 → evaluation on a small generated benchmark, in a temporary folder.
#[test]
fn recipes_run_end_to_end_and_write_loadable_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let cfg = VignettesConfig {
        seed: 11,
        train_sets: 6,
        valid_sets: 4,
        test_sets: 2,
        caption_images: 40,
        class_images: 1,
        ..Default::default()
    };
    write_benchmark(&cfg, &data, &|_| {}).unwrap();
    let files = default_files();
    let blip_cfg = BlipItm::read_config(&files.config).unwrap();
    let captions = read_caption_json(&data.join("captions/train.json"), &data.join("captions")).unwrap();

    let s0 = tmp.path().join("s0");
    let mut opts = PretrainOptions::paper_schedule(s0.clone(), ContextBlipConfig::for_blip(&blip_cfg), 3);
    (opts.batch_size, opts.warmup_steps, opts.run.progress) = (8, 1, false);
    let report = pretrain(&files, captions, &opts, &Runtime::cpu()).unwrap();
    assert_eq!(report.outcome.steps, 3);
    assert!(report.outcome.final_terms["itm"].is_finite() && report.outcome.final_terms["tmim"].is_finite());
    let saved = candle_core::safetensors::load(s0.join("contextblip.safetensors"), &Device::Cpu).unwrap();
    assert!(saved.contains_key("adapter.down.0.weight") && saved.contains_key("decoder.recon_head.weight"));

    // Zero-shot with the adapter differs from plain BLIP (the adapter is active).
    let valid = ImageCodeSplit::open(&data.join("imagecode"), "valid").unwrap();
    let plain = BlipScorer::from_files(&files, ScorerOptions::default(), &Device::Cpu).unwrap();
    let adapted =
        BlipScorer::from_files(&files, ScorerOptions::default(), &Device::Cpu).unwrap().with_contextblip(&s0).unwrap();
    let set = valid.sets()[0];
    let imgs = valid.set_images(set).unwrap();
    let p = plain.score(&valid.examples[0].description, &plain.encode_image_files(&imgs).unwrap()).unwrap();
    let a = adapted.score(&valid.examples[0].description, &adapted.encode_image_files(&imgs).unwrap()).unwrap();
    assert!(p.scores.iter().zip(&a.scores).any(|(x, y)| (x.itm_probability - y.itm_probability).abs() > 1e-6));
    let zs = imagecode_zero_shot(&adapted, &valid, &|_| {}).unwrap();
    assert_eq!(zs.itm.predictions.len(), valid.examples.len());

    // S1 for two steps, then S2 on its frozen features.
    let train = ImageCodeSplit::open(&data.join("imagecode"), "train").unwrap();
    let s1 = tmp.path().join("s1");
    let s1_opts = FinetuneOptions {
        out_dir: s1.clone(),
        max_steps: Some(2),
        batch_size: 4,
        run: ctxalign::RunControl { progress: false, ..Default::default() },
        ..Default::default()
    };
    assert_eq!(finetune_s1(&files, &s0, train.clone(), &s1_opts, &Runtime::cpu()).unwrap().outcome.steps, 2);
    for f in ["config.json", "tokenizer.json", "model.safetensors", "contextblip.json", "contextblip.safetensors"] {
        assert!(s1.join(f).is_file(), "{f} missing from the S1 folder");
    }
    let s1_scorer = BlipScorer::from_files(&ModelFiles::from_dir(&s1).unwrap(), ScorerOptions::default(), &Device::Cpu)
        .unwrap()
        .with_contextblip(&s1)
        .unwrap();
    let features = ctxalign::contextblip::candidate_features(&s1_scorer, &train, &|_| {}).unwrap();
    assert_eq!(features.len(), train.examples.len());
    let s2 = tmp.path().join("s2");
    let quiet = ctxalign::RunControl { progress: false, ..Default::default() };
    let s2_opts =
        InterContextOptions { out_dir: s2.clone(), epochs: 1, batch_size: 4, run: quiet.clone(), ..Default::default() };
    std::fs::write(s1.join("eval.json"), "{}").unwrap(); // S1's own record, not its model's
    let first = finetune_s2(&s1, features.clone(), &s2_opts, &Runtime::cpu()).unwrap();
    for f in ["config.json", "tokenizer.json", "model.safetensors", "contextblip.json", "contextblip.safetensors"] {
        assert!(s2.join(f).is_file(), "{f} missing from the S2 folder");
    }
    assert!(!s2.join("eval.json").exists(), "S1's evaluation is not S2's");
    // S2 resumes like the other stages: a second epoch continues from the first one's checkpoint.
    let s2_opts = InterContextOptions { epochs: 2, run: ctxalign::RunControl { resume: true, ..quiet }, ..s2_opts };
    let second = finetune_s2(&s1, features.clone(), &s2_opts, &Runtime::cpu()).unwrap();
    assert!(second.resumed_from.is_some(), "resumed");
    assert_eq!(second.steps, 2 * first.steps);
    let r = evaluate_finetuned(&s2, &valid, &|_| {}, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(r.s1_predictions.len(), valid.examples.len());
    assert_eq!(r.s2_predictions.as_ref().map(Vec::len), Some(valid.examples.len()));
    let r1 = evaluate_finetuned(&s1, &valid, &|_| {}, DType::F32, &Device::Cpu).unwrap();
    assert!(r1.s2_predictions.is_none());

    // One-call predictors at each stage pick what the evaluations pick, from images in memory.
    let options = ScorerOptions::default;
    let blip_dir = files.config.parent().unwrap().to_str().unwrap().to_string();
    let s0_predictor = ContextBlipPredictor::from_pretrained(s0.to_str().unwrap(), None, options(), &Device::Cpu)
        .unwrap();
    let given_blip =
        ContextBlipPredictor::from_pretrained(s0.to_str().unwrap(), Some(&blip_dir), options(), &Device::Cpu)
            .unwrap();
    assert_eq!(s0_predictor.summary(), given_blip.summary());
    assert_eq!(s0_predictor.summary().kind, "ContextBLIP S0");
    assert_eq!(s0_predictor.summary().fingerprint, adapted.fingerprint());
    // An S0 folder whose recorded BLIP is gone says so and what to pass instead.
    let moved = tmp.path().join("s0-base-gone");
    std::fs::create_dir_all(&moved).unwrap();
    for f in ["contextblip.json", "contextblip.safetensors"] {
        std::fs::copy(s0.join(f), moved.join(f)).unwrap();
    }
    let mut record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(moved.join("contextblip.json")).unwrap()).unwrap();
    record["base_model"]["source"] = "no/such/blip-folder".into();
    std::fs::write(moved.join("contextblip.json"), record.to_string()).unwrap();
    let msg = ContextBlipPredictor::from_pretrained(moved.to_str().unwrap(), None, options(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("no/such/blip-folder") && msg.contains("is not there"), "{msg}");
    let s1_predictor =
        ContextBlipPredictor::from_pretrained(s1.to_str().unwrap(), None, options(), &Device::Cpu).unwrap();
    let s2_predictor =
        ContextBlipPredictor::from_pretrained(s2.to_str().unwrap(), None, options(), &Device::Cpu).unwrap();
    let msg = ContextBlipPredictor::from_pretrained(s1.to_str().unwrap(), Some(&blip_dir), options(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("holds its own fine-tuned BLIP"), "{msg}");
    let first_set = valid.sets()[0];
    let bytes: Vec<Vec<u8>> = valid.set_images(first_set).unwrap().iter().map(|p| std::fs::read(p).unwrap()).collect();
    let expected_s0 = adapted.score(&valid.examples[0].description, &adapted.encode_image_files(&imgs).unwrap()).unwrap();
    for (e, example) in valid.examples.iter().enumerate().filter(|(_, ex)| ex.set == first_set) {
        let s1_pick = s1_predictor.pick(&example.description, &bytes, example.kind).unwrap();
        let s2_pick = s2_predictor.pick(&example.description, &bytes, example.kind).unwrap();
        assert_eq!((s1_pick.stage, s1_pick.scores.len()), (Stage::S1, bytes.len()));
        assert_eq!(s1_pick.best, r1.s1_predictions[e], "S1, description {e}");
        assert_eq!(s2_pick.best, r.s2_predictions.as_ref().unwrap()[e], "S2, description {e}");
        if e == 0 {
            let s0_pick = s0_predictor.pick(&example.description, &bytes, example.kind).unwrap();
            assert_eq!(s0_pick.best, expected_s0.best);
            for (got, want) in s0_pick.scores.iter().zip(&expected_s0.scores) {
                assert!((got - want.itm_probability).abs() < 1e-5, "{got} vs {}", want.itm_probability);
            }
        }
    }
    let msg = s1_predictor.pick("anything", Vec::<&[u8]>::new(), valid.examples[0].kind).unwrap_err().to_string();
    assert!(msg.contains("at least one image"), "{msg}");

    // Each folder records its stage, and a folder of the wrong stage is refused saying what it is.
    use ctxalign::models::contextblip::folder_stage;
    assert_eq!([&s0, &s1, &s2].map(|d| folder_stage(d).unwrap()), [Stage::S0, Stage::S1, Stage::S2]);
    let msg = evaluate_finetuned(&s0, &valid, &|_| {}, DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(msg.contains("this is an S0 folder") && msg.contains("fine-tuned evaluation needs an S1"), "{msg}");
    let again = FinetuneOptions { out_dir: tmp.path().join("s1-from-s1"), ..s1_opts };
    let msg = finetune_s1(&files, &s1, train.clone(), &again, &Runtime::cpu()).unwrap_err().to_string();
    assert!(msg.contains("this is an S1 folder") && msg.contains("S1 fine-tuning"), "{msg}");
    assert!(!tmp.path().join("s1-from-s1").exists(), "refused before any work");
    let msg = finetune_s2(&s0, vec![], &s2_opts, &Runtime::cpu()).unwrap_err().to_string();
    assert!(msg.contains("this is an S0 folder") && msg.contains("S2"), "{msg}");

    // A damaged training set stops S1 before anything is written, naming it; under Skip it is
    // left out, and the report and the run record say so.
    let bad_set = train.examples[0].set.clone();
    std::fs::write(&train.set_images(&bad_set).unwrap()[3], b"\xff\xd8 not a JPEG").unwrap();
    let damaged = FinetuneOptions { out_dir: tmp.path().join("s1-damaged"), max_steps: Some(1), ..again };
    let msg = finetune_s1(&files, &s0, train.clone(), &damaged, &Runtime::cpu()).unwrap_err().to_string();
    assert!(msg.contains("1 of") && msg.contains(&bad_set), "{msg}");
    assert!(!damaged.out_dir.exists(), "refused before any work");
    let skip = FinetuneOptions {
        run: ctxalign::RunControl { bad_input: ctxalign::data::loader::BadInputPolicy::Skip, ..damaged.run.clone() },
        ..damaged
    };
    let report = finetune_s1(&files, &s0, train.clone(), &skip, &Runtime::cpu()).unwrap();
    let descriptions = train.examples.iter().filter(|e| e.set == bad_set).count();
    assert_eq!(
        report.left_out.iter().map(|l| (l.set.as_str(), l.descriptions)).collect::<Vec<_>>(),
        [(bad_set.as_str(), descriptions)]
    );
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(skip.out_dir.join("training.json")).unwrap()).unwrap();
    assert_eq!(record["report"]["left_out"][0]["set"], bad_set.as_str());
}

#[test]
fn bad_contextblip_folders_name_file_and_key() {
    let files = default_files();
    let blip_cfg = BlipItm::read_config(&files.config).unwrap();
    let mut cfg = ContextBlipConfig::for_blip(&blip_cfg);
    let dir = tempfile::tempdir().unwrap();
    let (_, _, params) = build_pretraining(&files, &cfg, None, DType::F32, &Device::Cpu, 1).unwrap();
    let mut tensors = params.tensors();
    tensors.remove("adapter.up.weight");
    ContextBlip::save(dir.path(), &ContextBlipRecord::new(Stage::S0, cfg.clone()), &tensors).unwrap();
    let load =
        || BlipScorer::from_files(&files, ScorerOptions::default(), &Device::Cpu).unwrap().with_contextblip(dir.path());
    match load() {
        Err(Error::Load(LoadError::MissingTensor { key, file, .. })) => {
            assert_eq!(key, "adapter.up.weight");
            assert!(file.ends_with("contextblip.safetensors"));
        }
        other => panic!("expected a missing-tensor error, got {:?}", other.err()),
    }
    // A configuration for another ViT width.
    cfg.adapter.hidden_size = 768;
    ContextBlip::save(dir.path(), &ContextBlipRecord::new(Stage::S0, cfg.clone()), &params.tensors()).unwrap();
    let err = load().err().expect("mismatched config").to_string();
    assert!(err.contains("contextblip.json") && err.contains("768"), "{err}");
    // Malformed JSON.
    std::fs::write(dir.path().join("contextblip.json"), "{\"adapter\": [").unwrap();
    let err = load().err().expect("malformed JSON").to_string();
    assert!(err.contains("contextblip.json"), "{err}");
}

/// MMVP pair scoring on an MMVP-format folder: a pair counts only when both statements pick their
/// own image, so a pair of two identical images can never count.
#[test]
fn mmvp_counts_a_pair_only_when_both_statements_are_right() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let img = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/images");
    std::fs::create_dir_all(root.join("MMVP_VLM_Images/Color")).unwrap();
    std::fs::create_dir_all(root.join("MMVP_VLM_Images/Count")).unwrap();
    for (q, dir, file) in [
        (1, "Color", "scene-1.jpg"),
        (2, "Color", "scene-2.jpg"),
        (3, "Count", "scene-4.jpg"),
        (4, "Count", "scene-4.jpg"),
    ] {
        std::fs::copy(img.join(file), root.join(format!("MMVP_VLM_Images/{dir}/{q}.jpg"))).unwrap();
    }
    std::fs::write(
        root.join("Questions.csv"),
        "Question ID,Type,Statement\n1,Color,a red circle\n2,Color,a blue square\n3,Count,two triangles\n4,Count,one triangle\n",
    )
    .unwrap();
    let pairs = ctxalign::data::mmvp::read_mmvp(root).unwrap();
    let scorer = BlipScorer::from_files(&default_files(), ScorerOptions::default(), &Device::Cpu).unwrap();
    let report = ctxalign::evaluate::mmvp(&scorer, &pairs).unwrap();
    assert_eq!(report.accuracy["all"].1, 2);
    assert_eq!(report.accuracy["Count"], (0, 1), "identical images: one statement must be wrong");
    assert!(!(report.pairs[1][0] && report.pairs[1][1]));
}

#[test]
fn show_mask_masks_the_quarter_most_attended_patches_of_a_word() {
    let scorer = BlipScorer::from_files(&default_files(), ScorerOptions::default(), &Device::Cpu).unwrap();
    let image = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/images/scene-1.jpg");
    let text = "a red circle left of a blue square";
    let m = ctxalign::visualize::word_mask(&scorer, &image, text, "circle", 0.25).unwrap();
    assert_eq!((m.grid, m.masked.len()), (8, 16));
    let min_masked = m.masked.iter().map(|&p| m.attention[p]).fold(f32::MAX, f32::min);
    let max_visible = (0..64).filter(|p| !m.masked.contains(p)).map(|p| m.attention[p]).fold(f32::MIN, f32::max);
    assert!(min_masked >= max_visible, "the masked patches are the most attended");
    let err = ctxalign::visualize::word_mask(&scorer, &image, text, "hexagon", 0.25).unwrap_err().to_string();
    assert!(err.contains("hexagon"), "{err}");
    let png = ctxalign::visualize::render_mask(&image, &m, "circle").unwrap();
    assert_eq!(png.width(), 2 * 288 + 8);
}

/// Out-of-range options given to the library (which bypasses the command line's parsers) are
/// refused before any step, naming the setting and its range; nothing is written.
#[test]
fn pretrain_refuses_out_of_range_options_before_any_work() {
    let files = default_files();
    let blip_cfg = BlipItm::read_config(&files.config).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("s0");
    let base = PretrainOptions::paper_schedule(out.clone(), ContextBlipConfig::for_blip(&blip_cfg), 3);
    let cases: Vec<(PretrainOptions, &str)> = vec![
        (PretrainOptions { batch_size: 0, ..base.clone() }, "batch size"),
        (PretrainOptions { epoch_decay: -0.9, ..base.clone() }, "per-epoch decay"),
        (PretrainOptions { crop_scale: Some((0.8, 0.2)), ..base.clone() }, "crop scale"),
        (PretrainOptions { lr: f64::NAN, batch_size: 2, ..base.clone() }, "learning rate NaN"),
        (PretrainOptions { weight_decay: -0.05, batch_size: 2, ..base.clone() }, "weight decay -0.05"),
    ];
    for (opts, expect) in cases {
        let msg = pretrain(&files, vec![], &opts, &Runtime::cpu()).unwrap_err().to_string();
        assert!(msg.contains(expect), "expected `{expect}` in: {msg}");
        assert!(!out.join("checkpoints").exists(), "{expect}: nothing is written");
    }
}

/// The base-model fingerprint covers every byte: a BLIP whose tensor in the middle of the file
/// changed (where the older fingerprint, first and last MiB, never looked) is not the BLIP an S0
/// adapter was pre-trained on, and is refused; the BLIP it was pre-trained on is accepted.
#[test]
fn a_base_changed_in_the_middle_of_its_weights_is_refused() {
    use ctxalign::models::artifact::{sampled_fingerprint, BaseModel};
    let files = default_files();
    let blip_cfg = BlipItm::read_config(&files.config).unwrap();
    let cfg = ContextBlipConfig::for_blip(&blip_cfg);
    let tmp = tempfile::tempdir().unwrap();
    let (_, _, params) = build_pretraining(&files, &cfg, None, DType::F32, &Device::Cpu, 1).unwrap();
    let s0 = tmp.path().join("s0");
    let record = ContextBlipRecord {
        base_model: Some(BaseModel::of(&files).unwrap()),
        ..ContextBlipRecord::new(Stage::S0, cfg)
    };
    ContextBlip::save(&s0, &record, &params.tensors()).unwrap();

    // A copy of the BLIP with one value of a tensor in the middle of its file changed.
    let copy = tmp.path().join("blip");
    BlipItm::copy(&files, &copy).unwrap();
    let weights = copy.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mib = 1 << 20;
    let (key, start) = header
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| (k.clone(), 8 + n + v["data_offsets"][0].as_u64().unwrap() as usize))
        .find(|&(_, at)| at > mib + 8 && at + mib + 8 < bytes.len())
        .expect("a tensor in the middle of the file");
    bytes[start] ^= 1; // the lowest mantissa bit: still finite
    std::fs::write(&weights, &bytes).unwrap();
    let changed = ModelFiles::from_dir(&copy).unwrap();
    let sampled = |f: &ModelFiles| sampled_fingerprint(Some(&f.config), &[f.weights[0].as_path()]).unwrap();
    assert_eq!(sampled(&files), sampled(&changed), "`{key}` lies outside what the sampled fingerprint read");

    let scorer = |f: &ModelFiles| BlipScorer::from_files(f, ScorerOptions::default(), &Device::Cpu).unwrap();
    match scorer(&changed).with_contextblip(&s0) {
        Err(Error::Load(e @ LoadError::Config { .. })) => {
            assert!(e.to_string().contains("pre-trained on the BLIP in"), "{e}");
        }
        other => panic!("expected the changed BLIP to be refused, got {:?}", other.err()),
    }
    scorer(&files).with_contextblip(&s0).expect("the BLIP it was pre-trained on");
    // The fingerprint taken while the scorer loaded equals a separate pass over the files.
    assert_eq!(scorer(&changed).base, BaseModel::of(&changed).unwrap());
}

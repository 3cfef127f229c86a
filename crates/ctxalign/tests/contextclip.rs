//! ContextCLIP end to end: every trainable tensor of every tower combination receives a gradient;
//! towers load from their own checkpoints (CLIP, timm ResNet, BERT fixtures) and compute what the
//! standalone models compute; a trained folder round-trips through the encoder, zero-shot
//! classification, the linear probe, fine-tuning, retrieval, IMAGECODE zero-shot and the index; bad
//! folders name the file and key.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use ctxalign::contextclip::{
    finetune_classifier, imagecode_zero_shot, linear_probe_sets, retrieval, stratified_split, train_contextclip,
    zero_shot, ClipEncoder, FinetuneOptions, TrainOptions,
};
use ctxalign::data::captions::read_caption_json;
use ctxalign::data::classification::read_image_folder;
use ctxalign::data::imagecode::ImageCodeSplit;
use ctxalign::data::vignettes::{write_benchmark, VignettesConfig};
use ctxalign::data::{CaptionCleaning, TextTokenizer};
use ctxalign::eval::zeroshot::builtin_templates;
use ctxalign::index::EmbeddingIndex;
use ctxalign::models::artifact::BaseModel;
use ctxalign::models::bert::{BertConfig, BertModel};
use ctxalign::models::clip::{ClipModel, ClipTextConfig, ClipVisionConfig};
use ctxalign::models::contextclip::{
    ContextClipConfig, ContextClipRecord, ImageEncoderConfig, TextEncoderConfig, TextPooling, CONFIG_FILE, WEIGHTS_FILE,
};
use ctxalign::models::resnet::{ResNet, ResNetConfig};
use ctxalign::models::ModelFiles;
use ctxalign::nn::gradcheck::gradient_free_by_construction;
use ctxalign::nn::ContextualMode;
use ctxalign::train::contextclip::{
    build_contextclip, ContextClipInit, ContextClipLossConfig, ContextClipObjective, TEMPERATURE_KEY,
};
use ctxalign::train::Communicator;
use ctxalign::train::SampleDraws;
use ctxalign::Runtime;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn tokenizer(max_tokens: usize) -> TextTokenizer {
    TextTokenizer::from_file(&fixtures().join("bert_tiny/tokenizer.json"), CaptionCleaning::none(), max_tokens).unwrap()
}

fn tiny_bert() -> BertConfig {
    BertConfig { vocab_size: 30522, ..BertConfig::small(16, 1, 32) }
}

fn tiny_clip_text() -> ClipTextConfig {
    // With the BERT tokenizer: [SEP] (102) ends every text, [PAD] is 0.
    ClipTextConfig {
        vocab_size: 30522,
        hidden_size: 16,
        intermediate_size: 32,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        max_position_embeddings: 32,
        eos_token_id: 102,
        pad_token_id: 0,
        ..ClipTextConfig::default()
    }
}

fn config(image: ImageEncoderConfig, text: TextEncoderConfig, pooling: TextPooling) -> ContextClipConfig {
    ContextClipConfig {
        image_encoder: image,
        text_encoder: text,
        text_pooling: pooling,
        projection_dim: 8,
        dropout: 0.1,
        image_size: 32,
        max_length: 32,
        ..ContextClipConfig::small(32)
    }
}

fn tower_combinations() -> Vec<(&'static str, ContextClipConfig)> {
    let resnet = ImageEncoderConfig::Resnet(ResNetConfig::small(2, 32));
    let vit = ImageEncoderConfig::ClipVision(ClipVisionConfig::small(32, 8, 16, 1));
    vec![
        ("resnet + bert cls", config(resnet.clone(), TextEncoderConfig::Bert(tiny_bert()), TextPooling::Cls)),
        ("resnet + bert pooler", config(resnet, TextEncoderConfig::Bert(tiny_bert()), TextPooling::Pooled)),
        ("vit + clip text eos", config(vit, TextEncoderConfig::ClipText(tiny_clip_text()), TextPooling::Pooled)),
    ]
}

const CAPTIONS: [&str; 4] = ["a red circle", "two blue squares on grey", "a small green triangle", "an orange diamond"];

#[test]
fn every_trainable_tensor_receives_a_gradient() {
    let dev = Device::Cpu;
    for (name, cfg) in tower_combinations() {
        for mode in [ContextualMode::Samples, ContextualMode::Dims, ContextualMode::PaperCode] {
            let loss_cfg = ContextClipLossConfig { learn_temperature: true, mode, ..Default::default() };
            let (model, params, temperature) =
                build_contextclip(&cfg, &ContextClipInit::default(), &loss_cfg, DType::F32, &dev, 3).unwrap();
            assert!(params.vars.contains_key(TEMPERATURE_KEY));
            let objective = ContextClipObjective {
                model,
                tokenizer: tokenizer(cfg.max_length),
                loss: loss_cfg,
                temperature,
                device: dev.clone(),
                seed: 0,
                comm: Communicator::single(),
            };
            let pixels = Tensor::randn(0f32, 1.0, (4, 3, 32, 32), &dev).unwrap();
            let losses =
                objective.losses(&pixels, &CAPTIONS, &[0, 1, 2, 3], Some(&SampleDraws::sequential(7, 4))).unwrap();
            let total = (losses.clip.loss + (losses.contextual.unwrap() * 0.5).unwrap()).unwrap();
            let grads = total.backward().unwrap();
            let missing: Vec<&String> = params
                .vars
                .iter()
                .filter(|(k, _)| !gradient_free_by_construction(k))
                .filter(|(_, v)| {
                    grads.get(v.as_tensor()).is_none_or(|g| {
                        let n = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
                        !(n > 0.0 && n.is_finite())
                    })
                })
                .map(|(k, _)| k)
                .collect();
            assert!(missing.is_empty(), "{name}, {mode:?}: no gradient for {missing:?}");
            // The batch-norm statistics are state: they must get no gradient at all.
            for (k, v) in &params.vars {
                if k.ends_with("running_mean") || k.ends_with("running_var") {
                    assert!(grads.get(v.as_tensor()).is_none(), "{name}: {k} received a gradient");
                }
            }
        }
    }
}

/// A ContextCLIP whose towers load from the fixtures' own checkpoints must compute what the
/// standalone (fixture-verified) models compute.
#[test]
fn towers_load_from_their_own_checkpoints() {
    let dev = Device::Cpu;
    let clip_files = ModelFiles::from_dir(&fixtures().join("clip_tiny")).unwrap();
    let clip = ClipModel::load(&clip_files, DType::F32, &dev).unwrap();
    let resnet_files = ModelFiles::from_dir(&fixtures().join("resnet_tiny")).unwrap();
    let resnet = ResNet::load(&resnet_files, DType::F32, &dev).unwrap();
    let bert_files = ModelFiles::from_dir(&fixtures().join("bert_tiny")).unwrap();
    let bert = BertModel::load(&bert_files, DType::F32, &dev).unwrap();

    // CLIP vision + CLIP text from one CLIPModel file.
    let cfg = ContextClipConfig {
        image_encoder: ImageEncoderConfig::ClipVision(clip.config.vision_config.clone()),
        text_encoder: TextEncoderConfig::ClipText(clip.config.text_config.clone()),
        text_pooling: TextPooling::Pooled,
        image_size: 32,
        ..ContextClipConfig::small(32)
    };
    let init = ContextClipInit { towers: clip_files.weights.clone(), ..Default::default() };
    let (model, _, _) = build_contextclip(&cfg, &init, &Default::default(), DType::F32, &dev, 0).unwrap();
    let expected = candle_core::safetensors::load(fixtures().join("clip_tiny/expected.safetensors"), &dev).unwrap();
    let pixels = &expected["pixel_values"];
    let ids = expected["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = expected["attention_mask"].to_dtype(DType::U32).unwrap();
    let diff = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff(&model.image_encoder.forward(pixels).unwrap(), &clip.vision_model.forward(pixels).unwrap()) < 1e-6);
    let text = model.text_encoder.forward(&ids, &mask, TextPooling::Pooled).unwrap();
    assert!(diff(&text, &clip.text_model.forward(&ids, &mask).unwrap()) < 1e-6);

    // timm ResNet + BERT (f16 file, pooler) from two files.
    let resnet_cfg = ResNetConfig::read(&resnet_files.config, &resnet_files.weights).unwrap();
    let bert_cfg = BertConfig::read(&bert_files.config).unwrap();
    let cfg = ContextClipConfig {
        image_encoder: ImageEncoderConfig::Resnet(resnet_cfg),
        text_encoder: TextEncoderConfig::Bert(bert_cfg),
        text_pooling: TextPooling::Pooled,
        image_size: 64,
        max_length: 32,
        ..ContextClipConfig::small(64)
    };
    let towers = vec![resnet_files.weights[0].clone(), bert_files.weights[0].clone()];
    let init = ContextClipInit { towers, ..Default::default() };
    let (model, _, _) = build_contextclip(&cfg, &init, &Default::default(), DType::F32, &dev, 0).unwrap();
    let expected = candle_core::safetensors::load(fixtures().join("resnet_tiny/expected.safetensors"), &dev).unwrap();
    let pixels = &expected["pixel_values"];
    assert!(diff(&model.image_encoder.forward(pixels).unwrap(), &resnet.forward(pixels).unwrap()) < 1e-6);
    let expected = candle_core::safetensors::load(fixtures().join("bert_tiny/expected.safetensors"), &dev).unwrap();
    let ids = expected["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = expected["attention_mask"].to_dtype(DType::U32).unwrap();
    let ours = model.text_encoder.forward(&ids, &mask, TextPooling::Pooled).unwrap();
    let theirs = bert.forward(&ids, &mask, None).unwrap().pooler_output.unwrap();
    assert!(diff(&ours, &theirs) < 1e-6);
}

fn tiny_benchmark(dir: &Path) -> PathBuf {
    let cfg = VignettesConfig {
        image_size: 32,
        train_sets: 0,
        valid_sets: 0,
        test_sets: 0,
        caption_images: 40,
        captions_per_image: 2,
        class_images: 5,
        ..VignettesConfig::default()
    };
    write_benchmark(&cfg, dir, &|_| {}).unwrap();
    dir.to_owned()
}

/// A caption whose image is missing or damaged is found before the model is built: the run fails
/// at once, naming it, with nothing written; with `Skip` it is left out and reported.
#[test]
fn bad_training_images_are_found_before_the_first_step() {
    use ctxalign::data::loader::BadInputPolicy;
    let tmp = tempfile::tempdir().unwrap();
    let data = tiny_benchmark(&tmp.path().join("data"));
    let caps = data.join("captions");
    let items = read_caption_json(&caps.join("train.json"), &caps).unwrap();
    std::fs::remove_file(&items[5].image).unwrap();
    std::fs::write(&items[17].image, b"\x89PNG\r\n\x1a\n not really").unwrap();
    let out = tmp.path().join("model");
    let mut opts = TrainOptions::cpu_default(out.clone()).unwrap();
    opts.config = tower_combinations().remove(0).1;
    (opts.steps, opts.batch_size, opts.run.progress) = (Some(1), 8, false);
    opts.tokenizer = fixtures().join("bert_tiny/tokenizer.json");
    let err = train_contextclip(items.clone(), &opts, &Runtime::cpu()).unwrap_err();
    let msg = err.to_string();
    let expected = format!("2 of {} samples cannot be used", items.len());
    assert!(msg.contains(&expected) && msg.contains("--skip-bad"), "{msg}");
    for bad in [&items[5].image, &items[17].image] {
        assert!(msg.contains(&bad.display().to_string()), "{msg}");
    }
    assert!(!out.exists(), "nothing written: {msg}");
    opts.run.bad_input = BadInputPolicy::Skip;
    let report = train_contextclip(items, &opts, &Runtime::cpu()).unwrap();
    let mut left_out: Vec<usize> = report.left_out.iter().map(|s| s.index).collect();
    left_out.sort();
    assert_eq!((report.outcome.steps, left_out), (1, vec![5, 17]));
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("training.json")).unwrap()).unwrap();
    assert_eq!(record["report"]["left_out"].as_array().unwrap().len(), 2, "the record lists what was left out");
    assert_eq!(record["options"]["bad_input"], "skip");
}

#[test]
fn a_trained_folder_serves_every_evaluation() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tiny_benchmark(&tmp.path().join("data"));
    let caps = data.join("captions");
    let train_items = read_caption_json(&caps.join("train.json"), &caps).unwrap();
    let val_items = read_caption_json(&caps.join("val.json"), &caps).unwrap();
    let out = tmp.path().join("model");
    let mut opts = TrainOptions::cpu_default(out.clone()).unwrap();
    opts.config = tower_combinations().remove(0).1;
    opts.steps = Some(3);
    opts.batch_size = 8;
    opts.run.progress = false;
    opts.tokenizer = fixtures().join("bert_tiny/tokenizer.json");
    let report = train_contextclip(train_items.clone(), &opts, &Runtime::cpu()).unwrap();
    assert_eq!(report.outcome.steps, 3);
    assert!(report.outcome.final_terms.contains_key("cx") && report.outcome.final_terms.contains_key("clip"));
    // The folder records its settings and that it started from nothing …
    let record = ContextClipRecord::read(&out).unwrap();
    assert_eq!((&record.config, record.initialized_from.as_deref()), (&opts.config, Some(&[][..])));
    // … and a model trained on from it names that checkpoint and its fingerprint.
    let continued = TrainOptions {
        out_dir: tmp.path().join("continued"),
        init: ContextClipInit { checkpoint: Some(out.join(WEIGHTS_FILE)), ..Default::default() },
        steps: Some(1),
        ..opts.clone()
    };
    train_contextclip(train_items, &continued, &Runtime::cpu()).unwrap();
    let from = ContextClipRecord::read(&continued.out_dir).unwrap().initialized_from.unwrap();
    assert_eq!(from, vec![BaseModel::of_weights(&out.join(WEIGHTS_FILE)).unwrap()]);

    let dev = Device::Cpu;
    let encoder = ClipEncoder::load(&out, DType::F32, &dev).unwrap();
    // Embeddings are unit vectors.
    let t = encoder.encode_texts(&["a red circle", "a blue square"]).unwrap();
    let norms: Vec<f32> = t.sqr().unwrap().sum(1).unwrap().to_vec1().unwrap();
    assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-5));

    let classes = read_image_folder(&data.join("classes").join("val")).unwrap();
    let m = zero_shot(&encoder, &classes, &builtin_templates("cifar10").unwrap()).unwrap();
    assert!((0.0..=1.0).contains(&m.acc1) && m.acc5 >= m.acc1);
    let r = retrieval(&encoder, &val_items).unwrap();
    assert_eq!(r.text_to_image.queries, val_items.iter().map(|i| i.captions.len()).sum::<usize>());
    assert_eq!(r.image_to_text.queries, val_items.len());
    assert!(r.reranked.is_none(), "a cosine ranking is not re-ranked");

    // IMAGECODE zero-shot by cosine, through the eval crate's protocol: each set is scored once,
    // every description chooses among its set's 10 by its row of cosines, and each labeled
    // description counts once in "all" and once in its kind.
    let ic = tmp.path().join("imagecode-data");
    let ic_cfg = VignettesConfig {
        image_size: 32,
        train_sets: 0,
        valid_sets: 2,
        test_sets: 0,
        caption_images: 0,
        class_images: 0,
        ..VignettesConfig::default()
    };
    write_benchmark(&ic_cfg, &ic, &|_| {}).unwrap();
    let split = ImageCodeSplit::open(&ic.join("imagecode"), "valid").unwrap();
    let sets_done = std::cell::Cell::new(0);
    let s = imagecode_zero_shot(&encoder, &split, &|n| sets_done.set(n)).unwrap();
    assert_eq!(sets_done.get(), split.sets().len());
    assert_eq!(s.predictions.len(), split.examples.len());
    // The first set's choices, recomputed here as its [descriptions, 10] cosines.
    let first = split.sets()[0];
    let members: Vec<usize> = (0..split.examples.len()).filter(|&e| split.examples[e].set == first).collect();
    let texts: Vec<&str> = members.iter().map(|&e| split.examples[e].description.as_str()).collect();
    let images = encoder.encode_image_files(&split.set_images(first).unwrap()).unwrap();
    let cosines: Vec<Vec<f32>> =
        encoder.encode_texts(&texts).unwrap().matmul(&images.t().unwrap()).unwrap().to_vec2().unwrap();
    for (&e, row) in members.iter().zip(&cosines) {
        assert_eq!(s.predictions[e], ctxalign::eval::argmax(row).unwrap(), "description {e}");
    }
    let correct = split.examples.iter().zip(&s.predictions).filter(|(ex, &p)| ex.target == Some(p)).count();
    assert_eq!(s.accuracy["all"], (correct, split.examples.len()));
    let kinds: usize = ["video", "static"].iter().filter_map(|k| s.accuracy.get(*k)).map(|c| c.1).sum();
    assert_eq!(kinds, split.examples.len());

    let digits = ctxalign::data::classification::embedded_uci_digits();
    let small = stratified_split(&digits, 0.95, 0).0; // ~90 images: fast
    let (train, test) = stratified_split(&small, 0.3, 1);
    assert_eq!(train.items.len() + test.items.len(), small.items.len());
    let probe = linear_probe_sets(&encoder, &train, &test, 0).unwrap();
    assert!(probe.metrics.acc1 > 0.0);

    let fin = finetune_classifier(
        &out,
        &train,
        &test,
        &FinetuneOptions {
            out_dir: tmp.path().join("finetune"),
            templates: builtin_templates("mnist").unwrap(),
            steps: 2,
            batch_size: 8,
            lr: 1e-4,
            classifier_lr: 1e-3,
            weight_decay: 0.0,
            run: ctxalign::RunControl { progress: false, ..Default::default() },
        },
        &Runtime::cpu(),
    )
    .unwrap();
    assert_eq!(fin.outcome.steps, 2);
    assert!(!fin.outcome.interrupted && fin.finetuned.is_some());
    // The fine-tuned model is a ContextCLIP folder that records where it started.
    let finetuned = tmp.path().join("finetune");
    let from = ContextClipRecord::read(&finetuned).unwrap().initialized_from.unwrap();
    assert_eq!(from, vec![BaseModel::of_weights(&out.join(WEIGHTS_FILE)).unwrap()]);
    let tuned = ClipEncoder::from_pretrained(finetuned.to_str().unwrap(), DType::F32, &dev).unwrap();
    assert_eq!(tuned.summary().kind, "ContextCLIP");
    assert_ne!(tuned.fingerprint(), encoder.fingerprint(), "fine-tuning moved the image side");

    // Classification of in-memory images with the fine-tuned head equals `100 · cos` against
    // `classifier.weight` computed here, and the zero-shot head equals the zero-shot classifier.
    let head = tuned.trained_head().unwrap();
    assert_eq!(head.classes, train.classes);
    let pixels: Vec<std::sync::Arc<image::RgbImage>> = test
        .items
        .iter()
        .map(|item| match &item.source {
            ctxalign::data::classification::ImageSource::Pixels(p) => p.clone(),
            other => panic!("UCI digits are held in memory, got {other:?}"),
        })
        .collect();
    let inputs: Vec<&image::RgbImage> = pixels.iter().map(|p| p.as_ref()).collect();
    let expected_labels = |encoder: &ClipEncoder, weight: &Tensor| -> Vec<usize> {
        let (embeddings, _) = encoder.encode_set(&test).unwrap();
        let logits: Vec<Vec<f32>> = embeddings.matmul(&weight.t().unwrap()).unwrap().to_vec2().unwrap();
        logits.iter().map(|row| ctxalign::eval::argmax(row).unwrap()).collect()
    };
    let saved = candle_core::safetensors::load(finetuned.join(WEIGHTS_FILE), &dev).unwrap();
    let classifier = &saved["classifier.weight"];
    let got = tuned.classify_images(&head, inputs.iter().copied()).unwrap();
    assert_eq!(got.iter().map(|c| c.label).collect::<Vec<_>>(), expected_labels(&tuned, classifier));
    for c in &got {
        assert_eq!(c.class, head.classes[c.label]);
        assert!((c.probabilities.iter().sum::<f32>() - 1.0).abs() < 1e-4);
    }
    let templates = builtin_templates("mnist").unwrap();
    let zs_head = encoder.zero_shot_head(&test.classes, &templates).unwrap();
    let zs = encoder.classify_images(&zs_head, inputs.iter().copied()).unwrap();
    let zs_weight = encoder.zero_shot_classifier(&test.classes, &templates).unwrap();
    assert_eq!(zs.iter().map(|c| c.label).collect::<Vec<_>>(), expected_labels(&encoder, &zs_weight));
    let err = encoder.trained_head().unwrap_err().to_string();
    assert!(err.contains("finetune.json") && err.contains("not fine-tuned"), "{err}");

    // Embeddings do not depend on the batch size.
    let paths: Vec<&Path> = val_items.iter().map(|i| i.image.as_path()).collect();
    let embeddings = encoder.encode_image_files(&paths).unwrap();
    let small_batches = ClipEncoder { batch_size: 3, ..ClipEncoder::load(&out, DType::F32, &dev).unwrap() };
    let bytes: Vec<Vec<u8>> = paths.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let from_bytes = small_batches.encode_images(&bytes).unwrap();
    let diff = (&from_bytes - &embeddings).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 1e-5, "batches of 3 from bytes differ by {diff}");

    // The index finds an image by its own embedding first, and records the model it was made by.
    let mut index = EmbeddingIndex::for_model(embeddings.dim(1).unwrap(), encoder.fingerprint(), &dev).unwrap();
    index.add(paths.iter().map(|p| p.display().to_string()).collect(), &embeddings).unwrap();
    index.save(&tmp.path().join("index")).unwrap();
    let index = EmbeddingIndex::load_for(&tmp.path().join("index"), &encoder.fingerprint(), &dev).unwrap();
    let hits = index.search(&embeddings.narrow(0, 2, 1).unwrap(), 3).unwrap();
    assert_eq!(hits[0][0].index, 2);
    assert!((hits[0][0].score - 1.0).abs() < 1e-5 && hits[0][1].score <= hits[0][0].score);
    let err = EmbeddingIndex::load_for(&tmp.path().join("index"), &tuned.fingerprint(), &dev).unwrap_err();
    assert!(matches!(err, ctxalign::Error::ModelMismatch { .. }), "{err}");

    // Bad folders: a malformed config names the file; a missing tensor names the key.
    std::fs::write(out.join(CONFIG_FILE), "{\"image_encoder\": 3}").unwrap();
    let err = ClipEncoder::load(&out, DType::F32, &dev).err().unwrap().to_string();
    assert!(err.contains("contextclip.json") && err.contains("image_encoder"), "{err}");
    let cfg = ContextClipConfig { projection_dim: 12, ..opts.config.clone() };
    std::fs::write(out.join(CONFIG_FILE), serde_json::to_string(&cfg).unwrap()).unwrap();
    let err = ClipEncoder::load(&out, DType::F32, &dev).err().unwrap().to_string();
    assert!(err.contains("model.safetensors") && err.contains("image_projection.projection.weight"), "{err}");
}

/// An HF CLIP folder (config, weights, tokenizer) serves as a `JointEmbedder`: its texts are pooled at
/// the first end-of-text id and its embeddings equal `CLIPModel`'s normalised features.
#[test]
fn hf_clip_folders_embed_texts_and_images() {
    use ctxalign::contextclip::{load_embedder, HfClip};
    let dev = Device::Cpu;
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures().join("clip_eos_interp");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    // A WordPiece vocabulary small enough for the fixture's 500 ids; its [SEP] is id 3, the
    // fixture's eos_token_id.
    let corpus = ["a red circle", "two blue squares", "a small green triangle"];
    let (json, vocab) = ctxalign::data::text::build_wordpiece_tokenizer_json(&corpus, 1);
    assert!(vocab <= 500, "vocabulary {vocab}");
    std::fs::write(tmp.path().join("tokenizer.json"), json).unwrap();
    let files = ModelFiles::from_dir(tmp.path()).unwrap();
    let clip = HfClip::load(&files, DType::F32, &dev).unwrap();
    let texts = ["a red circle", "two blue squares on a small green triangle"];
    let ours = ctxalign::contextclip::JointEmbedder::encode_texts(&clip, &texts).unwrap();
    let (ids, mask) = clip.tokenizer.encode_batch(&texts, 0).unwrap().to_tensors(&dev).unwrap();
    let want = ctxalign::nn::l2_normalize(&clip.model.get_text_features(&ids, &mask).unwrap()).unwrap();
    let diff = (ours - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 1e-6, "{diff}");
    let embedder = load_embedder(tmp.path().to_str().unwrap(), DType::F32, &dev).unwrap();
    let images: Vec<PathBuf> = ["scene-1.jpg", "scene-2.jpg"]
        .iter()
        .map(|f| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/images").join(f))
        .collect();
    let e = embedder.encode_image_files(&images).unwrap();
    assert_eq!(e.dims(), &[2, 12]);
    let norms: Vec<f32> = e.sqr().unwrap().sum(1).unwrap().to_vec1().unwrap();
    assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-5));
}

//! ContextCLIP recipes: training (`L_CLIP + α·L_CX`), the inference encoder, zero-shot
//! classification with template ensembles, the linear probe, classification fine-tuning and
//! text↔image retrieval. The examples `train_contextclip` / `retrieve` and `xtask contextclip`
//! are thin wrappers over these functions.
//!
//! A trained model is a folder: `contextclip.json`, `model.safetensors`, `tokenizer.json`,
//! `training.json` (options and final losses), plus the loop's `metrics.jsonl`, `loss.png` and
//! `checkpoints/`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ctxalign_data::captions::CaptionedImage;
use ctxalign_data::classification::ClassificationSet;
use ctxalign_data::loader::{
    stack_pixels, Augment, BadInputPolicy, CaptionDataset, ClassificationDataset, Dataset, Skipped,
};
use ctxalign_data::rng::Rng;
use ctxalign_data::{write_atomic, CaptionCleaning, DecodeOptions, ImageProcessor, Resize, ResizeMode, TextTokenizer};
use ctxalign_eval::zeroshot::{fill, prompt_name, ClassificationMetrics};
use ctxalign_eval::{linear_probe, ProbeReport, RetrievalMetrics};
use ctxalign_models::contextclip::{ContextClip, ContextClipConfig, CONFIG_FILE, WEIGHTS_FILE};
use ctxalign_nn::l2_normalize;
use ctxalign_train::contextclip::{
    build_contextclip, tokenize, ClassifierObjective, ContextClipInit, ContextClipLossConfig, ContextClipObjective,
    CLASSIFIER_KEY,
};
use ctxalign_train::{
    group_params, Adam, AdamConfig, GroupSpec, Schedule, ScheduleConfig, TrainConfig, TrainableParams,
};
use serde::Serialize;

use crate::recipe::{batched_loader, check_options, recipe_config, run, run_settings, write_record};
use crate::{Error, Result, Runtime};

/// The tokenizer file a trained folder carries.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// The bert-base-uncased tokenizer shipped in `models/`, used by the default model.
pub fn default_tokenizer() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/bert-base-uncased-tokenizer/tokenizer.json")
}

/// The image processor of a model: resize to `image_size`², scale to [0, 1], normalise (the base
/// code's `A.Resize` + `A.Normalize`).
pub fn processor_for(cfg: &ContextClipConfig) -> ImageProcessor {
    let size = cfg.image_size as u32;
    ImageProcessor {
        resize: Some(Resize::Exact { height: size, width: size }),
        resize_mode: ResizeMode::Pillow,
        center_crop: None,
        rescale_factor: 1.0 / 255.0,
        mean: cfg.image_mean,
        std: cfg.image_std,
    }
}

/// Captions are lower-cased and stripped of punctuation only by the WordPiece tokenizer itself;
/// truncation happens at `max_length` tokens.
fn tokenizer_for(path: &Path, cfg: &ContextClipConfig) -> Result<TextTokenizer> {
    Ok(TextTokenizer::from_file(path, CaptionCleaning::none(), cfg.max_length)?)
}

/// Settings of a training run.
#[derive(Debug, Clone, Serialize)]
pub struct TrainOptions {
    pub out_dir: PathBuf,
    pub config: ContextClipConfig,
    #[serde(skip)]
    pub init: ContextClipInit,
    pub tokenizer: PathBuf,
    pub loss: ContextClipLossConfig,
    /// Optimizer steps; `None` runs `epochs` epochs.
    pub steps: Option<u64>,
    pub epochs: u64,
    pub batch_size: usize,
    /// Learning rates of the image tower, the text tower and the heads (+ a learned τ).
    pub image_lr: f64,
    pub text_lr: f64,
    pub head_lr: f64,
    /// Weight decay (the paper's 1e-3).
    pub weight_decay: f64,
    /// Decoupled decay (AdamW) instead of Adam's L2 term. Adam's L2 gradient is normalised like any
    /// other: where the loss gradient is still tiny (a model from scratch) it shrinks every weight by
    /// ~lr per step and the towers collapse to constant outputs within a few hundred steps.
    pub decoupled_weight_decay: bool,
    /// Linear warm-up, then cosine decay to 10 % over the run.
    pub warmup_steps: u64,
    /// RandomResizedCrop scale range; `None` resizes the whole image (the base code).
    pub crop_scale: Option<(f64, f64)>,
    pub seed: u64,
    /// Captions whose image is missing or unreadable, found before the first step: fail (the
    /// default) or leave them out and report them.
    pub bad_input: BadInputPolicy,
    pub resume: bool,
    /// Start over in a folder that holds an earlier run's checkpoints (deleting them).
    pub overwrite: bool,
    /// Resume although the settings differ from the checkpoint's run (recorded in the record).
    pub accept_changed_settings: bool,
    pub progress: bool,
}

impl TrainOptions {
    /// The paper's optimisation: Adam, weight decay 1e-3, lr 1e-4 (image) / 1e-6 (text), the base
    /// code's 1e-3 for the heads, batch 32, 30 epochs, τ = 1, λ = 0.75, α = 0.5.
    pub fn paper(out_dir: PathBuf, config: ContextClipConfig, tokenizer: PathBuf) -> Self {
        Self {
            out_dir,
            config,
            init: ContextClipInit::default(),
            tokenizer,
            loss: ContextClipLossConfig::default(),
            steps: None,
            epochs: 30,
            batch_size: 32,
            image_lr: 1e-4,
            text_lr: 1e-6,
            head_lr: 1e-3,
            weight_decay: 1e-3,
            decoupled_weight_decay: false,
            warmup_steps: 0,
            crop_scale: None,
            seed: 0,
            bad_input: BadInputPolicy::Fail,
            resume: false,
            overwrite: false,
            accept_changed_settings: false,
            progress: true,
        }
    }

    /// From scratch on 2 CPU cores: the small model, AdamW (decay 0.05) at 5e-4 for both towers (a
    /// text tower trained from nothing cannot learn at the paper's 1e-6), 300 steps of 32 with a
    /// 30-step warm-up; CLIP's InfoNCE form (cosine, hard targets, learned τ from 0.07) with the
    /// paper's λ and α. The paper's literal form (dot products, soft targets through which the
    /// gradient flows, τ = 1) has a collapsed fixed point — every embedding equal, targets uniform,
    /// loss ln B — that a model from scratch falls into and never leaves (measured: 100 steps at
    /// exactly ln 32); it stays available through `loss`.
    pub fn cpu_default(out_dir: PathBuf) -> Self {
        let loss = ContextClipLossConfig {
            clip: ctxalign_nn::ClipLossConfig {
                similarity: ctxalign_nn::Similarity::Cosine,
                targets: ctxalign_nn::Targets::Hard,
                ..Default::default()
            },
            temperature: 0.07,
            learn_temperature: true,
            ..Default::default()
        };
        Self {
            loss,
            steps: Some(300),
            weight_decay: 0.05,
            decoupled_weight_decay: true,
            image_lr: 5e-4,
            text_lr: 5e-4,
            head_lr: 5e-4,
            warmup_steps: 30,
            ..Self::paper(out_dir, ContextClipConfig::small(64), default_tokenizer())
        }
    }
}

/// What a training run produced.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    pub out_dir: PathBuf,
    pub parameters: usize,
    pub steps: u64,
    pub final_terms: BTreeMap<String, f64>,
    pub seconds: f64,
    pub samples_per_second: f64,
    pub interrupted: bool,
    /// Settings that differed from the resumed checkpoint's run, accepted explicitly.
    pub settings_changed_on_resume: Vec<String>,
    /// Captions left out as unusable (only under [`BadInputPolicy::Skip`]).
    pub left_out: Vec<Skipped>,
}

/// The optimizer's parameter groups: image tower, text tower, the rest (heads, τ).
fn group_specs(opts: &TrainOptions) -> [GroupSpec; 4] {
    let wd = opts.weight_decay;
    [
        GroupSpec::new("image_encoder", opts.image_lr, wd, |n| n.starts_with("image_encoder.")),
        GroupSpec::new("text_encoder", opts.text_lr, wd, |n| n.starts_with("text_encoder.")),
        GroupSpec::new("temperature", opts.head_lr, 0.0, |n| n == ctxalign_train::contextclip::TEMPERATURE_KEY),
        GroupSpec::rest("heads", opts.head_lr, wd),
    ]
}

fn optimizer(params: &TrainableParams, opts: &TrainOptions) -> Result<Adam> {
    let groups = group_params(params, &group_specs(opts))?;
    let config = if opts.decoupled_weight_decay { AdamConfig::adamw() } else { AdamConfig::adam() };
    Ok(Adam::new(config, groups)?)
}

/// Trains a ContextCLIP on `items` on `rt`'s device and precision and writes the model folder to
/// `opts.out_dir`.
pub fn train_contextclip(items: Vec<CaptionedImage>, opts: &TrainOptions, rt: &Runtime) -> Result<TrainReport> {
    check_options(opts.batch_size, None, opts.crop_scale)?;
    ctxalign_train::check_group_specs(&group_specs(opts))?;
    let dev = rt.device.clone();
    opts.config.validate().map_err(Error::Invalid)?;
    let tokenizer = tokenizer_for(&opts.tokenizer, &opts.config)?;
    let dataset = CaptionDataset {
        items,
        processor: processor_for(&opts.config),
        augment: Some(Augment { crop_scale: opts.crop_scale, hflip: false }),
        decode: DecodeOptions::default(),
    };
    let (loader, left_out) = batched_loader(dataset, opts.batch_size, opts.seed, opts.bad_input)?;
    let (model, params, temperature) =
        build_contextclip(&opts.config, &opts.init, &opts.loss, rt.dtype(), &dev, opts.seed)?;
    let mut optimizer = optimizer(&params, opts)?;
    let steps = opts.steps.unwrap_or(opts.epochs * loader.batches_per_epoch() as u64);
    let mut schedule = Schedule::new(ScheduleConfig::warmup_cosine(opts.warmup_steps, steps, 0.1));
    let mut objective =
        ContextClipObjective { model, tokenizer, loss: opts.loss, temperature, device: dev, seed: opts.seed };
    let cfg = TrainConfig {
        max_steps: Some(steps),
        seed: opts.seed,
        resume: opts.resume,
        overwrite: opts.overwrite,
        accept_changed_settings: opts.accept_changed_settings,
        settings: run_settings(opts, &(&opts.init, &loader.dataset.items)),
        progress: opts.progress,
        ..recipe_config(&opts.out_dir)
    };
    let summary = run(cfg, &loader, &mut objective, &params, &mut optimizer, &mut schedule)?;
    save_model(&opts.out_dir, &opts.config, &params, &opts.tokenizer)?;
    let report = TrainReport {
        out_dir: opts.out_dir.clone(),
        parameters: params.numel(),
        steps: summary.steps,
        final_terms: summary.last_terms.iter().cloned().collect(),
        seconds: summary.seconds,
        samples_per_second: summary.samples_per_second,
        interrupted: summary.interrupted,
        settings_changed_on_resume: summary.settings_changed.clone(),
        left_out,
    };
    write_record(&opts.out_dir.join("training.json"), opts, rt, &report)?;
    Ok(report)
}

/// Writes `contextclip.json`, `model.safetensors` (atomically) and a copy of the tokenizer.
pub fn save_model(dir: &Path, cfg: &ContextClipConfig, params: &TrainableParams, tokenizer: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Invalid(format!("{}: {e}", dir.display())))?;
    write_atomic(&dir.join(CONFIG_FILE), serde_json::to_string_pretty(cfg).expect("JSON").as_bytes())?;
    ctxalign_train::checkpoint::write_safetensors(&dir.join(WEIGHTS_FILE), &params.tensors())?;
    let bytes = std::fs::read(tokenizer).map_err(|e| Error::Invalid(format!("{}: {e}", tokenizer.display())))?;
    write_atomic(&dir.join(TOKENIZER_FILE), &bytes)?;
    Ok(())
}

/// A trained ContextCLIP for inference: embeds images and texts into its joint space
/// (L2-normalised, so dot products are cosines).
pub struct ClipEncoder {
    pub model: ContextClip,
    pub tokenizer: TextTokenizer,
    pub processor: ImageProcessor,
    pub device: Device,
    /// The model's weight and activation dtype; embeddings are returned in f32.
    pub dtype: DType,
}

/// Images and texts are embedded in chunks of this many.
const CHUNK: usize = 64;

impl ClipEncoder {
    /// Loads a model folder written by [`train_contextclip`] (or by hand: `contextclip.json`,
    /// `model.safetensors`, `tokenizer.json`) in `dtype` on `device`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let model = ContextClip::load(dir, dtype, device)?;
        let tokenizer = tokenizer_for(&dir.join(TOKENIZER_FILE), &model.config)?;
        let processor = processor_for(&model.config);
        Ok(Self { model, tokenizer, processor, device: device.clone(), dtype })
    }

    /// Normalised f32 embeddings of processed pixels `[n, 3, S, S]` → `[n, projection_dim]`.
    pub fn encode_pixels(&self, pixels: &Tensor) -> Result<Tensor> {
        let pixels = pixels.to_dtype(self.dtype)?;
        Ok(l2_normalize(&self.model.encode_images(&pixels, None)?.to_dtype(DType::F32)?)?)
    }

    /// Normalised embeddings of image files.
    pub fn encode_image_files<P: AsRef<Path> + Sync>(&self, paths: &[P]) -> Result<Tensor> {
        embed_in_chunks(paths, self.model.config.projection_dim, &self.device, |chunk| {
            let pixels = self.processor.load_batch(chunk, DecodeOptions::default(), &self.device)?;
            Ok(self.model.encode_images(&pixels.to_dtype(self.dtype)?, None)?)
        })
    }

    /// Normalised embeddings of texts.
    pub fn encode_texts(&self, texts: &[&str]) -> Result<Tensor> {
        embed_in_chunks(texts, self.model.config.projection_dim, &self.device, |chunk| {
            let (ids, mask) = tokenize(&self.tokenizer, &self.model, chunk, &self.device)?;
            Ok(self.model.encode_texts(&ids, &mask, None)?)
        })
    }

    /// Normalised embeddings and labels of every item of a classification set, in order.
    pub fn encode_set(&self, set: &ClassificationSet) -> Result<(Tensor, Vec<usize>)> {
        let dataset = ClassificationDataset {
            set: set.clone(),
            processor: self.processor.clone(),
            augment: None,
            decode: DecodeOptions::default(),
        };
        let size = self.model.config.image_size;
        let mut rng = Rng::new(0);
        let mut labels = vec![];
        let indices: Vec<usize> = (0..dataset.len()).collect();
        let embeddings = embed_in_chunks(&indices, self.model.config.projection_dim, &self.device, |chunk| {
            let items = chunk.iter().map(|&i| dataset.load(i, &mut rng)).collect::<Result<Vec<_>, _>>()?;
            labels.extend(items.iter().map(|item| item.label));
            let pixels = stack_pixels(items.iter().map(|item| item.pixels.as_slice()), size, &self.device)?;
            Ok(self.model.encode_images(&pixels.to_dtype(self.dtype)?, None)?)
        })?;
        Ok((embeddings, labels))
    }

    /// CLIP's zero-shot classifier `[classes, projection_dim]`: per class, every template filled with
    /// its name (`_` read as a space), embedded, normalised, averaged and normalised again.
    pub fn zero_shot_classifier(&self, classes: &[String], templates: &[String]) -> Result<Tensor> {
        if templates.is_empty() {
            return Err(Error::Invalid("no prompt templates".into()));
        }
        let mut rows = vec![];
        for class in classes {
            let prompts: Vec<String> = templates.iter().map(|t| fill(t, &prompt_name(class))).collect();
            let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
            let mean = self.encode_texts(&refs)?.mean_keepdim(0)?;
            rows.push(l2_normalize(&mean)?);
        }
        Ok(Tensor::cat(&rows, 0)?)
    }
}

/// Embeds `items` `CHUNK` at a time with `embed` and returns the L2-normalised rows in f32, in
/// order (`[0, width]` for no items).
fn embed_in_chunks<T>(
    items: &[T],
    width: usize,
    device: &Device,
    mut embed: impl FnMut(&[T]) -> Result<Tensor>,
) -> Result<Tensor> {
    let parts = items
        .chunks(CHUNK)
        .map(|chunk| {
            let embeddings = l2_normalize(&embed(chunk)?.to_dtype(DType::F32)?)?;
            crate::ensure_finite_tensor(&embeddings, "embeddings")?;
            Ok(embeddings)
        })
        .collect::<Result<Vec<_>>>()?;
    if parts.is_empty() {
        return Ok(Tensor::zeros((0, width), DType::F32, device)?);
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// CLIP's logit scale for zero-shot classification (`100 · cos`); it does not change the ranking.
pub const ZERO_SHOT_SCALE: f64 = 100.0;

/// Zero-shot classification of `set` with its class names and `templates`.
pub fn zero_shot(
    encoder: &ClipEncoder,
    set: &ClassificationSet,
    templates: &[String],
) -> Result<ClassificationMetrics> {
    classify(encoder, set, &encoder.zero_shot_classifier(&set.classes, templates)?)
}

/// Metrics of `classifier` (`[classes, projection_dim]`, unit rows) on `set`: `100 · cos` logits.
pub fn classify(encoder: &ClipEncoder, set: &ClassificationSet, classifier: &Tensor) -> Result<ClassificationMetrics> {
    let (images, labels) = encoder.encode_set(set)?;
    let classifier = classifier.to_dtype(DType::F32)?;
    let scores: Vec<Vec<f32>> = (images.matmul(&classifier.t()?)? * ZERO_SHOT_SCALE)?.to_vec2()?;
    Ok(ClassificationMetrics::compute(&scores, &labels))
}

/// Linear probe: logistic regression on the frozen image embeddings of `train`, its L2 strength
/// chosen on 20 % of `train`, evaluated on `test` (whose classes must be `train`'s).
pub fn linear_probe_sets(
    encoder: &ClipEncoder,
    train: &ClassificationSet,
    test: &ClassificationSet,
    seed: u64,
) -> Result<ProbeReport> {
    if train.classes != test.classes {
        return Err(Error::Invalid("linear probe: the train and test sets name different classes".into()));
    }
    let (train_x, train_y) = encoder.encode_set(train)?;
    let (test_x, test_y) = encoder.encode_set(test)?;
    Ok(linear_probe(&train_x.to_vec2()?, &train_y, &test_x.to_vec2()?, &test_y, train.classes.len(), 0.2, seed))
}

/// Deterministic stratified split of a set into `(train, test)` with `test_share` of each class
/// in the test part (for sets that ship without a split, such as the UCI digits).
pub fn stratified_split(set: &ClassificationSet, test_share: f64, seed: u64) -> (ClassificationSet, ClassificationSet) {
    let mut by_class: Vec<Vec<usize>> = vec![vec![]; set.classes.len()];
    for (i, item) in set.items.iter().enumerate() {
        by_class[item.label].push(i);
    }
    let mut rng = Rng::new(seed);
    let (mut train, mut test) = (vec![], vec![]);
    for mut members in by_class {
        rng.shuffle(&mut members);
        let n_test = (members.len() as f64 * test_share).round() as usize;
        test.extend(members[..n_test].iter().map(|&i| set.items[i].clone()));
        train.extend(members[n_test..].iter().map(|&i| set.items[i].clone()));
    }
    (
        ClassificationSet { classes: set.classes.clone(), items: train },
        ClassificationSet { classes: set.classes.clone(), items: test },
    )
}

/// Text→image and image→text retrieval over captioned images (every caption a query; its image
/// the positive; an image's positives are all its captions).
#[derive(Debug, Clone, Serialize)]
pub struct RetrievalReport {
    pub text_to_image: RetrievalMetrics,
    pub image_to_text: RetrievalMetrics,
}

pub fn retrieval(encoder: &dyn JointEmbedder, items: &[CaptionedImage]) -> Result<RetrievalReport> {
    let paths: Vec<PathBuf> = items.iter().map(|i| i.image.clone()).collect();
    let images = encoder.encode_image_files(&paths)?;
    let (queries, owners) = crate::evaluate::caption_queries(items);
    let texts = encoder.encode_texts(&queries)?;
    let similarity: Vec<Vec<f32>> = texts.matmul(&images.t()?)?.to_vec2()?;
    let (text_to_image, image_to_text) = ctxalign_eval::retrieval_from_similarity(&similarity, &owners, &[1, 5, 10]);
    Ok(RetrievalReport { text_to_image, image_to_text })
}

/// Settings of classification fine-tuning.
#[derive(Debug, Clone, Serialize)]
pub struct FinetuneOptions {
    pub out_dir: PathBuf,
    pub templates: Vec<String>,
    pub steps: u64,
    pub batch_size: usize,
    /// Image tower and image head.
    pub lr: f64,
    /// The classifier (initialised from the zero-shot weights).
    pub classifier_lr: f64,
    pub weight_decay: f64,
    pub seed: u64,
    /// Training images that are missing or unreadable, found before the first step: fail (the
    /// default) or leave them out and report them.
    pub bad_input: BadInputPolicy,
    /// Continue the run whose checkpoints are in `out_dir`.
    pub resume: bool,
    /// Start over in a folder that holds an earlier run's checkpoints (deleting them).
    pub overwrite: bool,
    /// Resume although the settings differ from the checkpoint's run (recorded in the record).
    pub accept_changed_settings: bool,
    pub progress: bool,
}

/// What fine-tuning reached on the test set, next to the zero-shot start.
#[derive(Debug, Clone, Serialize)]
pub struct FinetuneReport {
    pub zero_shot: ClassificationMetrics,
    /// `None` when the run was interrupted: a half-trained model is not evaluated nor exported
    /// (its checkpoint is kept; `resume` continues it).
    pub finetuned: Option<ClassificationMetrics>,
    pub steps: u64,
    pub seconds: f64,
    pub interrupted: bool,
    /// Settings that differed from the resumed checkpoint's run, accepted explicitly.
    pub settings_changed_on_resume: Vec<String>,
    /// Training images left out as unusable (only under [`BadInputPolicy::Skip`]).
    pub left_out: Vec<Skipped>,
}

/// A digest of a classification set's labels and images (the paths of files, the pixels of images
/// held in memory) for a run's settings; formatting every pixel of CIFAR would take hundreds of MB.
fn class_items_digest(set: &ClassificationSet) -> String {
    let mut digest = crate::Fingerprint::new();
    for item in &set.items {
        digest.update(&(item.label as u64).to_le_bytes());
        match &item.source {
            ctxalign_data::classification::ImageSource::File(path) => {
                digest.update(path.as_os_str().as_encoded_bytes())
            }
            ctxalign_data::classification::ImageSource::Pixels(image) => {
                digest.update(&image.width().to_le_bytes());
                digest.update(image.as_raw());
            }
        }
    }
    digest.hex()
}

/// End-to-end fine-tuning for classification: image tower + image head + a classifier initialised
/// from the zero-shot class embeddings, cross-entropy on `100 · cos`; the text tower is not used
/// after initialisation. Runs on `rt`'s device and precision; writes the fine-tuned weights (with
/// `classifier.weight`, in f32) to `opts.out_dir`.
pub fn finetune_classifier(
    model_dir: &Path,
    train_set: &ClassificationSet,
    test_set: &ClassificationSet,
    opts: &FinetuneOptions,
    rt: &Runtime,
) -> Result<FinetuneReport> {
    check_options(opts.batch_size, None, None)?;
    let specs = [
        GroupSpec::new("classifier", opts.classifier_lr, 0.0, |n| n == CLASSIFIER_KEY),
        GroupSpec::rest("image", opts.lr, opts.weight_decay),
    ];
    ctxalign_train::check_group_specs(&specs)?;
    let dev = rt.device.clone();
    if train_set.classes != test_set.classes {
        return Err(Error::Invalid("fine-tuning: the train and test sets name different classes".into()));
    }
    let encoder = ClipEncoder::load(model_dir, rt.dtype(), &dev)?;
    // The training images are checked before anything is computed; the test images are read (and
    // any bad one reported) by the zero-shot evaluation that comes first.
    let dataset = ClassificationDataset {
        set: train_set.clone(),
        processor: encoder.processor.clone(),
        augment: Some(Augment { crop_scale: Some((0.8, 1.0)), hflip: false }),
        decode: DecodeOptions::default(),
    };
    let (loader, left_out) = batched_loader(dataset, opts.batch_size, opts.seed, opts.bad_input)?;
    let zero_shot_weights = encoder.zero_shot_classifier(&train_set.classes, &opts.templates)?;
    let zero_shot = classify(&encoder, test_set, &zero_shot_weights)?;
    let cfg = encoder.model.config.clone();
    let init = ContextClipInit { checkpoint: Some(model_dir.join(WEIGHTS_FILE)), ..Default::default() };
    let (model, mut params, _) =
        build_contextclip(&cfg, &init, &ContextClipLossConfig::default(), rt.dtype(), &dev, opts.seed)?;
    // Only the image side trains: the text tower and head stay out of the optimiser.
    params.retain(|name| name.starts_with("image_"));
    let classifier = candle_core::Var::from_tensor(&zero_shot_weights.to_dtype(rt.dtype())?)?;
    params.insert(CLASSIFIER_KEY, classifier.clone())?;
    let groups = group_params(&params, &specs)?;
    let mut optimizer = Adam::new(AdamConfig::adamw(), groups)?;
    let mut objective = ClassifierObjective {
        model,
        classifier: classifier.as_tensor().clone(),
        logit_scale: ZERO_SHOT_SCALE,
        device: dev.clone(),
        seed: opts.seed,
    };
    let mut schedule = Schedule::new(ScheduleConfig::warmup_cosine(opts.steps / 10, opts.steps, 0.1));
    let cfg = TrainConfig {
        max_steps: Some(opts.steps),
        seed: opts.seed,
        resume: opts.resume,
        overwrite: opts.overwrite,
        accept_changed_settings: opts.accept_changed_settings,
        settings: run_settings(opts, &(model_dir, class_items_digest(train_set))),
        progress: opts.progress,
        ..recipe_config(&opts.out_dir)
    };
    let summary = run(cfg, &loader, &mut objective, &params, &mut optimizer, &mut schedule)?;
    let finetuned = if summary.interrupted {
        None
    } else {
        // Evaluate the fine-tuned image side against the trained classifier.
        let finetuned_encoder = ClipEncoder { model: objective.model, ..encoder };
        let metrics = classify(&finetuned_encoder, test_set, classifier.as_tensor())?;
        let weights = opts.out_dir.join("finetuned.safetensors");
        ctxalign_train::checkpoint::write_safetensors(&weights, &params.tensors())?;
        Some(metrics)
    };
    let report = FinetuneReport {
        zero_shot,
        finetuned,
        steps: summary.steps,
        seconds: summary.seconds,
        interrupted: summary.interrupted,
        settings_changed_on_resume: summary.settings_changed,
        left_out,
    };
    write_record(&opts.out_dir.join("finetune.json"), opts, rt, &report)?;
    Ok(report)
}

/// Anything that embeds images and texts into one space with unit-norm rows (a ContextCLIP
/// folder, an HF CLIP checkpoint).
pub trait JointEmbedder {
    fn encode_image_files(&self, paths: &[PathBuf]) -> Result<Tensor>;
    fn encode_texts(&self, texts: &[&str]) -> Result<Tensor>;
}

impl JointEmbedder for ClipEncoder {
    fn encode_image_files(&self, paths: &[PathBuf]) -> Result<Tensor> {
        ClipEncoder::encode_image_files(self, paths)
    }
    fn encode_texts(&self, texts: &[&str]) -> Result<Tensor> {
        ClipEncoder::encode_texts(self, texts)
    }
}

/// An HF `CLIPModel` checkpoint (`openai/clip-vit-base-patch32`, a local folder) with its own
/// tokenizer (77 tokens) and image processor (`preprocessor_config.json`, else CLIP's defaults).
pub struct HfClip {
    pub model: ctxalign_models::clip::ClipModel,
    pub tokenizer: TextTokenizer,
    pub processor: ImageProcessor,
    pub device: Device,
    /// The model's weight and activation dtype; embeddings are returned in f32.
    pub dtype: DType,
}

impl HfClip {
    pub fn load(files: &ctxalign_models::ModelFiles, dtype: DType, device: &Device) -> Result<Self> {
        let model = ctxalign_models::clip::ClipModel::load(files, dtype, device)?;
        let tokenizer_path = files.tokenizer.as_ref().ok_or_else(|| {
            Error::Invalid(format!("{}: the CLIP model has no tokenizer.json", files.config.display()))
        })?;
        let max = model.config.text_config.max_position_embeddings;
        let tokenizer = TextTokenizer::from_file(tokenizer_path, CaptionCleaning::none(), max)?;
        let processor = match &files.preprocessor_config {
            Some(p) => ImageProcessor::from_hf_json(p)?,
            None => ImageProcessor::clip(model.config.vision_config.image_size as u32),
        };
        Ok(Self { model, tokenizer, processor, device: device.clone(), dtype })
    }
}

impl JointEmbedder for HfClip {
    fn encode_image_files(&self, paths: &[PathBuf]) -> Result<Tensor> {
        embed_in_chunks(paths, self.model.config.projection_dim, &self.device, |chunk| {
            let pixels = self.processor.load_batch(chunk, DecodeOptions::default(), &self.device)?;
            Ok(self.model.get_image_features(&pixels.to_dtype(self.dtype)?)?)
        })
    }
    fn encode_texts(&self, texts: &[&str]) -> Result<Tensor> {
        let pad = self.model.config.text_config.pad_token_id;
        embed_in_chunks(texts, self.model.config.projection_dim, &self.device, |chunk| {
            let (ids, mask) = self.tokenizer.encode_batch(chunk, pad)?.to_tensors(&self.device)?;
            Ok(self.model.get_text_features(&ids, &mask)?)
        })
    }
}

/// Loads a ContextCLIP folder (it has `contextclip.json`) or an HF CLIP (folder or hub id), in
/// `dtype` on `device`.
pub fn load_embedder(spec: &str, dtype: DType, device: &Device) -> Result<Box<dyn JointEmbedder>> {
    let dir = Path::new(spec);
    if dir.join(CONFIG_FILE).is_file() {
        return Ok(Box::new(ClipEncoder::load(dir, dtype, device)?));
    }
    let files = ctxalign_models::ModelSource::parse(spec).resolve()?;
    Ok(Box::new(HfClip::load(&files, dtype, device)?))
}

/// Zero-shot IMAGECODE by cosine.
#[derive(Debug, Clone, Serialize)]
pub struct ImageCodeCosineReport {
    /// Predicted image index per description, in file order.
    pub predictions: Vec<usize>,
    /// `group → (correct, total)`: `all`, `video`, `static` and each category.
    pub accuracy: BTreeMap<String, (usize, usize)>,
}

/// Zero-shot IMAGECODE with a dual encoder: per description, the set image of highest cosine.
/// `progress` receives the number of finished sets.
pub fn imagecode_zero_shot(
    embedder: &dyn JointEmbedder,
    split: &ctxalign_data::imagecode::ImageCodeSplit,
    progress: &dyn Fn(usize),
) -> Result<ImageCodeCosineReport> {
    let mut predictions = vec![0; split.examples.len()];
    for (s, set) in split.sets().into_iter().enumerate() {
        let images = embedder.encode_image_files(&split.set_images(set)?)?;
        let members: Vec<usize> = (0..split.examples.len()).filter(|&e| split.examples[e].set == set).collect();
        let texts: Vec<&str> = members.iter().map(|&e| split.examples[e].description.as_str()).collect();
        let scores: Vec<Vec<f32>> = embedder.encode_texts(&texts)?.matmul(&images.t()?)?.to_vec2()?;
        for (&e, row) in members.iter().zip(&scores) {
            predictions[e] = ctxalign_eval::top_k(row, 1)[0];
        }
        progress(s + 1);
    }
    let accuracy = ctxalign_data::imagecode::accuracy_by_kind(split, &predictions);
    Ok(ImageCodeCosineReport { predictions, accuracy })
}

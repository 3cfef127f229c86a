//! ContextCLIP training (`L_CLIP + α·L_CX`) and classification fine-tuning (feature `train`).

use std::path::{Path, PathBuf};

use ctxalign_data::classification::ClassificationSet;
use ctxalign_data::loader::{Augment, BatchSource, ClassificationDataset, LabeledImage, Skipped};
use ctxalign_data::DecodeOptions;
use ctxalign_eval::zeroshot::ClassificationMetrics;
use ctxalign_models::artifact::BaseModel;
use ctxalign_models::contextclip::{ContextClip, ContextClipConfig, ContextClipRecord, WEIGHTS_FILE};
use ctxalign_train::contextclip::{
    build_contextclip, ClassifierObjective, ContextClipInit, ContextClipLossConfig, ContextClipObjective,
    CLASSIFIER_KEY,
};
use ctxalign_train::{
    group_params, Adam, AdamConfig, GroupSpec, Schedule, ScheduleConfig, TrainConfig, TrainableParams,
};
use serde::Serialize;

use super::{classify, default_tokenizer, processor_for, tokenizer_for, ClipEncoder, TOKENIZER_FILE, ZERO_SHOT_SCALE};
use crate::recipe::{
    batched_loader, caption_data, check_options, replayed_data, run, run_settings, write_record, CaptionSource,
    RunControl, RunOutcome,
};
use crate::{Error, Result, Runtime};

/// Settings of a training run.
#[derive(Debug, Clone, Serialize)]
pub struct TrainOptions {
    /// The model folder written: `contextclip.json`, `model.safetensors`, `tokenizer.json`, plus
    /// `training.json`, metrics and checkpoints.
    pub out_dir: PathBuf,
    /// The model's shape: image tower (ViT or ResNet), BERT text tower, heads, image size, caption length.
    pub config: ContextClipConfig,
    /// Where the weights start: a ContextCLIP checkpoint and/or the towers' own (default: from scratch).
    #[serde(skip)]
    pub init: ContextClipInit,
    /// The BERT WordPiece `tokenizer.json` for the captions, copied into the model folder; its ids
    /// must fit the text tower's vocabulary.
    pub tokenizer: PathBuf,
    /// The loss: `L_CLIP`'s form, the weight α of `L_CX`, its mode and band width, τ.
    pub loss: ContextClipLossConfig,
    /// Optimizer steps; `None` runs `epochs` epochs.
    pub steps: Option<u64>,
    /// Epochs to run when `steps` is `None`.
    pub epochs: u64,
    /// Captioned images per step (per rank in a data-parallel run).
    pub batch_size: usize,
    /// Learning rates of the image tower, the text tower and the heads (+ a learned τ).
    pub image_lr: f64,
    /// Learning rate of the text tower.
    pub text_lr: f64,
    /// Learning rate of the projection heads and of a learned τ (τ without weight decay).
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
    /// Seed, bad-input policy (of the captioned images), resume/overwrite, progress.
    #[serde(flatten)]
    pub run: RunControl,
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
            run: RunControl::default(),
        }
    }

    /// From scratch on 2 CPU cores: the small model, AdamW (decay 0.05) at 5e-4 for both towers (a
    /// text tower trained from nothing cannot learn at the paper's 1e-6), 300 steps of 32 with a
    /// 30-step warm-up; CLIP's InfoNCE form (cosine, hard targets, learned τ from 0.07) with the
    /// paper's λ and α. The paper's literal form (dot products, soft targets through which the
    /// gradient flows, τ = 1) has a collapsed fixed point — every embedding equal, targets uniform,
    /// loss ln B — that a model from scratch falls into and never leaves (measured: 100 steps at
    /// exactly ln 32); it stays available through `loss`.
    pub fn cpu_default(out_dir: PathBuf) -> crate::Result<Self> {
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
        Ok(Self {
            loss,
            steps: Some(300),
            weight_decay: 0.05,
            decoupled_weight_decay: true,
            image_lr: 5e-4,
            text_lr: 5e-4,
            head_lr: 5e-4,
            warmup_steps: 30,
            ..Self::paper(out_dir, ContextClipConfig::small(64), default_tokenizer()?)
        })
    }
}

/// What a training run produced.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    /// The model folder written ([`TrainOptions::out_dir`]).
    pub out_dir: PathBuf,
    /// Trainable parameters (a learned τ included).
    pub parameters: usize,
    /// How the training loop ended: steps, final loss terms, timing, notices.
    #[serde(flatten)]
    pub outcome: RunOutcome,
    /// Captions left out as unusable (only under [`ctxalign_data::loader::BadInputPolicy::Skip`]).
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
pub fn train_contextclip(data: impl Into<CaptionSource>, opts: &TrainOptions, rt: &Runtime) -> Result<TrainReport> {
    check_options(opts.batch_size, None, opts.crop_scale)?;
    ctxalign_train::check_group_specs(&group_specs(opts))?;
    let lock = opts.run.claim_output(&opts.out_dir, "train-contextclip")?;
    let dev = rt.device.clone();
    opts.config.validate().map_err(Error::Invalid)?;
    // The settings come from the options (a --config file, or built in): named as such.
    let tokenizer = tokenizer_for(&opts.tokenizer, &opts.config, Path::new("the ContextCLIP settings (--config)"))?;
    let augment = Some(Augment { crop_scale: opts.crop_scale, hflip: false });
    let data =
        caption_data(data.into(), processor_for(&opts.config), augment, false, opts.batch_size, &opts.run, &tokenizer)?;
    let loader = data.loader.as_ref();
    let (model, params, temperature) =
        build_contextclip(&opts.config, &opts.init, &opts.loss, rt.dtype(), &dev, opts.run.seed)?;
    let mut optimizer = optimizer(&params, opts)?;
    let steps = opts.steps.unwrap_or(opts.epochs * loader.batches_per_epoch() as u64);
    let mut schedule = Schedule::new(ScheduleConfig::warmup_cosine(opts.warmup_steps, steps, 0.1));
    let mut objective = ContextClipObjective {
        model,
        tokenizer,
        loss: opts.loss,
        temperature,
        device: dev,
        seed: opts.run.seed,
        comm: opts.run.dist.clone(),
    };
    let inputs = (&opts.init, &data.fingerprint);
    let cfg = TrainConfig {
        max_steps: Some(steps),
        ..opts.run.train_config(&opts.out_dir, run_settings(opts, &inputs, rt, opts.run.dist.world_size()))
    };
    let summary = run(cfg, &opts.run.interrupt, loader, &mut objective, &params, &mut optimizer, &mut schedule)?;
    let report = TrainReport {
        out_dir: opts.out_dir.clone(),
        parameters: params.numel(),
        outcome: RunOutcome::from(&summary).with_lock_notice(&lock),
        left_out: data.left_out,
    };
    if opts.run.is_primary() {
        save_model(&opts.out_dir, &opts.config, &opts.init, &params, &opts.tokenizer)?;
        write_record(&opts.out_dir.join("training.json"), opts, rt, &opts.run, &report)?;
    }
    Ok(report)
}

/// Saves the trained model as a ContextCLIP folder ([`ContextClip::save`]): its settings, the
/// checkpoints `init` started it from (with their fingerprints), the weights and the tokenizer.
pub fn save_model(
    dir: &Path,
    cfg: &ContextClipConfig,
    init: &ContextClipInit,
    params: &TrainableParams,
    tokenizer: &Path,
) -> Result<()> {
    let initialized_from = init
        .checkpoint
        .iter()
        .chain(&init.towers)
        .map(|path| BaseModel::of_weights(path))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let record = ContextClipRecord { config: cfg.clone(), initialized_from: Some(initialized_from) };
    let tokenizer_json = std::fs::read(tokenizer).map_err(Error::io(tokenizer))?;
    Ok(ContextClip::save(dir, &record, &params.tensors(), &tokenizer_json)?)
}

/// Settings of classification fine-tuning.
#[derive(Debug, Clone, Serialize)]
pub struct FinetuneOptions {
    /// The fine-tuned ContextCLIP folder (its weights add `classifier.weight`) and its `finetune.json`.
    pub out_dir: PathBuf,
    /// Prompt templates (`a photo of a {}.`) of the zero-shot classifier the fine-tuning starts from.
    pub templates: Vec<String>,
    /// Optimizer steps (a tenth of them warm-up, then cosine decay to 10 %).
    pub steps: u64,
    /// Training images per step (per rank in a data-parallel run).
    pub batch_size: usize,
    /// Image tower and image head.
    pub lr: f64,
    /// The classifier (initialised from the zero-shot weights).
    pub classifier_lr: f64,
    /// AdamW weight decay of the image side (the classifier has none).
    pub weight_decay: f64,
    /// Seed, bad-input policy (of the training images), resume/overwrite, progress.
    #[serde(flatten)]
    pub run: RunControl,
}

/// What fine-tuning reached on the test set, next to the zero-shot start.
#[derive(Debug, Clone, Serialize)]
pub struct FinetuneReport {
    /// The classes, in the order of `classifier.weight`'s rows.
    pub classes: Vec<String>,
    /// The zero-shot classifier on the test set (`None` on the ranks other than 0 of a
    /// data-parallel run: rank 0 evaluates).
    pub zero_shot: Option<ClassificationMetrics>,
    /// `None` when the run was interrupted: a half-trained model is not evaluated nor exported
    /// (its checkpoint is kept; `resume` continues it); and on the ranks other than 0.
    pub finetuned: Option<ClassificationMetrics>,
    /// How the training loop ended: steps, final loss terms, timing, notices.
    #[serde(flatten)]
    pub outcome: RunOutcome,
    /// Training images left out as unusable (only under [`ctxalign_data::loader::BadInputPolicy::Skip`]).
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
/// after initialisation. Runs on `rt`'s device and precision; writes the fine-tuned model to
/// `opts.out_dir` as a ContextCLIP folder whose weights add `classifier.weight`.
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
    let lock = opts.run.claim_output(&opts.out_dir, "classify --task finetune")?;
    // Both before any model loads: an empty test set would be "evaluated" at 0 % after training.
    train_set.require_items("the fine-tuning training set")?;
    test_set.require_items("the fine-tuning test set")?;
    let encoder = ClipEncoder::load(model_dir, rt.dtype(), &dev)?;
    // The training images are checked before anything is computed; the test images are read (and
    // any bad one reported) by the zero-shot evaluation that comes first.
    let dataset = ClassificationDataset {
        set: train_set.clone(),
        processor: encoder.processor.clone(),
        augment: Some(Augment { crop_scale: Some((0.8, 1.0)), hflip: false }),
        decode: DecodeOptions::default(),
    };
    let (loader, left_out): (Box<dyn BatchSource<Item = LabeledImage>>, Vec<Skipped>) = match &opts.run.replay {
        Some(replay) => {
            let data = replayed_data(replay)?;
            (data.loader, data.left_out)
        }
        None => {
            let (loader, left_out) = batched_loader(dataset, opts.batch_size, &opts.run)?;
            (Box::new(loader), left_out)
        }
    };
    // The classifier starts from zero-shot weights computed in f32 whatever the training precision:
    // it is trained at a logit scale of 100, where a bf16 text pass's rounding of the class
    // embeddings would start it measurably elsewhere (one pass over the prompts, then dropped).
    let zero_shot_weights = match rt.dtype() {
        candle_core::DType::F32 => encoder.zero_shot_classifier(&train_set.classes, &opts.templates)?,
        _ => ClipEncoder::load(model_dir, candle_core::DType::F32, &dev)?
            .zero_shot_classifier(&train_set.classes, &opts.templates)?,
    };
    // The test set is evaluated once, by rank 0 (the others only train).
    let primary = opts.run.is_primary();
    let zero_shot = if primary { Some(classify(&encoder, test_set, &zero_shot_weights)?) } else { None };
    let cfg = encoder.model.config.clone();
    let init_weights = model_dir.join(WEIGHTS_FILE);
    let init = ContextClipInit { checkpoint: Some(init_weights.clone()), ..Default::default() };
    let (model, mut params, _) =
        build_contextclip(&cfg, &init, &ContextClipLossConfig::default(), rt.dtype(), &dev, opts.run.seed)?;
    // Only the image side trains: the text tower and head stay out of the optimiser.
    params.retain(|name| name.starts_with("image_"));
    // f32 whatever the model's dtype: the logits are 100 · cos, so a bf16 classifier's rounding
    // (2⁻⁹ of each weight) would move them by tenths.
    let classifier = candle_core::Var::from_tensor(&zero_shot_weights.to_dtype(candle_core::DType::F32)?)?;
    params.insert(CLASSIFIER_KEY, classifier.clone())?;
    let groups = group_params(&params, &specs)?;
    let mut optimizer = Adam::new(AdamConfig::adamw(), groups)?;
    let mut objective = ClassifierObjective {
        model,
        classifier: classifier.as_tensor().clone(),
        logit_scale: ZERO_SHOT_SCALE,
        device: dev.clone(),
        seed: opts.run.seed,
    };
    let mut schedule = Schedule::new(ScheduleConfig::warmup_cosine(opts.steps / 10, opts.steps, 0.1));
    let cfg = TrainConfig {
        max_steps: Some(opts.steps),
        ..opts.run.train_config(
            &opts.out_dir,
            run_settings(opts, &(model_dir, class_items_digest(train_set)), rt, opts.run.dist.world_size()),
        )
    };
    let summary = run(cfg, &opts.run.interrupt, loader.as_ref(), &mut objective, &params, &mut optimizer, &mut schedule)?;
    let finetuned = if summary.interrupted || !primary {
        None
    } else {
        // Evaluate the fine-tuned image side against the trained classifier.
        let finetuned_encoder = ClipEncoder { model: objective.model, ..encoder };
        let metrics = classify(&finetuned_encoder, test_set, classifier.as_tensor())?;
        // A ContextCLIP folder like any other: the start's weights with the fine-tuned image side,
        // plus `classifier.weight` (one row per class, in the order of `finetune.json`'s `classes`).
        let mut tensors = ctxalign_train::checkpoint::read_all(std::slice::from_ref(&init_weights))?;
        tensors.extend(params.tensors());
        let record = ContextClipRecord {
            config: finetuned_encoder.model.config.clone(),
            initialized_from: Some(vec![BaseModel::of_weights(&init_weights)?]),
        };
        let tokenizer_json = std::fs::read(model_dir.join(TOKENIZER_FILE)).map_err(Error::io(model_dir))?;
        ContextClip::save(&opts.out_dir, &record, &tensors, &tokenizer_json)?;
        Some(metrics)
    };
    let report = FinetuneReport {
        classes: train_set.classes.clone(),
        zero_shot,
        finetuned,
        outcome: RunOutcome::from(&summary).with_lock_notice(&lock),
        left_out,
    };
    if primary {
        write_record(&opts.out_dir.join("finetune.json"), opts, rt, &opts.run, &report)?;
    }
    Ok(report)
}

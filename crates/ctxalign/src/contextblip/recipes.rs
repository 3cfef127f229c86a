//! ContextBLIP's recipes: S0 pre-training, S1 / S2 fine-tuning on IMAGECODE (feature `train`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ctxalign_data::imagecode::{ImageCodeSplit, LeftOutSet};
use ctxalign_data::loader::{
    Augment, BatchSource, DataLoader, DescriptionSample, ImageCodeDataset, LoaderConfig, Skipped,
};
use ctxalign_data::shards::ImageCodeShards;
use ctxalign_data::DecodeOptions;
use ctxalign_models::artifact::BaseModel;
use ctxalign_models::blip::{BlipFolderFiles, BlipItm};
use ctxalign_models::contextblip::{
    require_stage, weights_path as contextblip_weights, ContextBlip, ContextBlipConfig, ContextBlipRecord,
    InterContextConfig, InterContextEncoder, Stage, WEIGHTS_FILE,
};
use ctxalign_models::ModelFiles;
use ctxalign_train::contextblip::{
    build_finetuning, build_pretraining, CandidateFeatures, FeatureDataset, FinetuneObjective, HardNegativeConfig,
    InterContextObjective, PretrainObjective,
};
use ctxalign_train::{
    group_params, Adam, AdamConfig, GroupSpec, ParamSource, Schedule, ScheduleConfig, TrainConfig, TrainableParams,
};
use serde::Serialize;

use super::load_head;
use crate::recipe::{
    caption_data, check_options, replayed_data, run, run_settings, shard_loader, write_record, CaptionSource,
    RunControl, RunOutcome, ShardSource, TrainingData,
};
use crate::{Error, Result, Runtime, ScorerOptions};

/// Settings of an S0 run (defaults: the reference's optimiser, sized for a CPU run on the
/// built-in data; see `PretrainOptions::paper_schedule` for the reference's schedule).
#[derive(Debug, Clone, Serialize)]
pub struct PretrainOptions {
    /// The S0 folder written: `contextblip.{json,safetensors}`, the run record, metrics, loss plot, checkpoints.
    pub out_dir: PathBuf,
    /// The adapter, TMIM decoder, text adapter and masking settings ([`ContextBlipConfig::for_blip`]);
    /// the decoder's image size must be the BLIP preprocessor's.
    pub config: ContextBlipConfig,
    /// Start from the adapter, TMIM decoder and text adapter of this S0 folder (its
    /// `contextblip.safetensors`, which must hold every one of them) instead of a fresh
    /// initialisation.
    pub init: Option<PathBuf>,
    /// How ITM's hard negatives are drawn from the frozen BLIP's ITC similarities.
    pub negatives: HardNegativeConfig,
    /// Optimizer steps in all (a resumed run's earlier steps count).
    pub steps: u64,
    /// Captioned images per step (per rank in a data-parallel run).
    pub batch_size: usize,
    /// AdamW learning rate (reference 3e-4) and weight decay (0.05).
    pub lr: f64,
    /// AdamW weight decay (reference 0.05).
    pub weight_decay: f64,
    /// Linear warm-up (reference 3000 steps), then ×`epoch_decay` per epoch (reference 0.9).
    pub warmup_steps: u64,
    /// Learning-rate factor per epoch after the warm-up (reference 0.9).
    pub epoch_decay: f64,
    /// RandomResizedCrop scale range (reference (0.2, 1.0)); `None` turns cropping off.
    pub crop_scale: Option<(f64, f64)>,
    /// Seed, bad-input policy, resume/overwrite, progress.
    #[serde(flatten)]
    pub run: RunControl,
}

impl PretrainOptions {
    /// The reference's optimisation for `config`: AdamW 3e-4, wd 0.05, 3000 warm-up steps, ×0.9
    /// per epoch, crops (0.2, 1), batch 256 (per GPU; 4 GPUs in the paper).
    pub fn paper_schedule(out_dir: PathBuf, config: ContextBlipConfig, steps: u64) -> Self {
        Self {
            out_dir,
            config,
            init: None,
            negatives: HardNegativeConfig::default(),
            steps,
            batch_size: 256,
            lr: 3e-4,
            weight_decay: 0.05,
            warmup_steps: 3000,
            epoch_decay: 0.9,
            crop_scale: Some((0.2, 1.0)),
            run: RunControl::default(),
        }
    }
}

/// What an S0 run produced.
#[derive(Debug, Clone, Serialize)]
pub struct PretrainReport {
    /// The S0 folder written ([`PretrainOptions::out_dir`]).
    pub out_dir: PathBuf,
    /// Parameters trained: adapter, TMIM decoder and text adapter (BLIP stays frozen).
    pub trainable_parameters: usize,
    /// Parameters of the adapter alone, the part S1 keeps.
    pub adapter_parameters: usize,
    /// How the training loop ended: steps, final loss terms, timing, notices.
    #[serde(flatten)]
    pub outcome: RunOutcome,
    /// Captions left out as unusable (only under [`ctxalign_data::loader::BadInputPolicy::Skip`]).
    pub left_out: Vec<Skipped>,
}

/// S0: trains the adapter, TMIM decoder and text adapter on `items` with `blip` frozen, on `rt`'s
/// device and precision; writes `contextblip.json` + `contextblip.safetensors` (plus
/// `training.json`, `metrics.jsonl`, `loss.png`, `checkpoints/`) to `opts.out_dir`.
pub fn pretrain(
    blip: &ModelFiles,
    data: impl Into<CaptionSource>,
    opts: &PretrainOptions,
    rt: &Runtime,
) -> Result<PretrainReport> {
    check_options(opts.batch_size, Some(opts.epoch_decay), opts.crop_scale)?;
    let lock = opts.run.claim_output(&opts.out_dir, "pretrain (ContextBLIP S0)")?;
    let groups = [GroupSpec::rest("contextblip", opts.lr, opts.weight_decay)];
    ctxalign_train::check_group_specs(&groups)?;
    let dev = &rt.device;
    // The data is checked before the model is built: a missing image fails in seconds.
    let processor = crate::scorer::processor_for(blip, &BlipItm::read_config(&blip.config)?.vision_config)?;
    // The TMIM decoder reconstructs a fixed patch grid: the images must come at its size.
    let side = opts.config.decoder.image_size as u32;
    if let (Some(path), Some(size)) = (&blip.preprocessor_config, processor.fixed_output_size()) {
        if size != (side, side) {
            return Err(ctxalign_data::ImageError::Config {
                path: path.clone(),
                message: format!(
                    "gives {}×{} images; ContextBLIP's TMIM decoder was sized for {side}×{side} (contextblip settings)",
                    size.0, size.1
                ),
            }
            .into());
        }
    }
    let augment = Some(Augment { crop_scale: opts.crop_scale, hflip: false });
    // The captions are checked with the tokenizer they train with (cleaned and tokenized).
    let vocab = BlipItm::read_config(&blip.config)?.text_config.vocab_size;
    let tokenizer = crate::scorer::tokenizer_for(blip, &ScorerOptions::default(), vocab)?;
    let data = caption_data(data.into(), processor, augment, false, opts.batch_size, &opts.run, &tokenizer)?;
    if let Some(dir) = &opts.init {
        require_stage(dir, &[Stage::S0], "S0 pre-training from earlier S0 weights")?;
    }
    let init = opts.init.as_deref().map(contextblip_weights);
    let (model, tmim, params) = build_pretraining(blip, &opts.config, init.as_deref(), rt.dtype(), dev, opts.run.seed)?;
    if let Some(path) = &init {
        // A tensor the folder lacks would start from a fresh draw, silently: refuse.
        let keys = ctxalign_train::checkpoint::read_all(std::slice::from_ref(path))?;
        if let Some(name) = params.vars.keys().find(|name| !keys.contains_key(*name)) {
            return Err(Error::Invalid(format!("{}: the S0 weights to start from lack `{name}`", path.display())));
        }
    }
    let adapter_parameters = model.adapter.num_parameters();
    let mut objective = PretrainObjective::new(model, tmim, tokenizer, dev, opts.run.seed)?;
    objective.negatives = opts.negatives.clone();
    objective.comm = opts.run.dist.clone();
    objective.replay = opts.run.replay.clone();
    let groups = group_params(&params, &groups)?;
    let mut optimizer = Adam::new(AdamConfig::adamw(), groups)?;
    let mut schedule = Schedule::new(ScheduleConfig::warmup_per_epoch(opts.warmup_steps, opts.epoch_decay));
    let settings = pretrain_settings(blip, &data.fingerprint, opts, rt, opts.run.dist.world_size());
    let summary = run(
        TrainConfig { max_steps: Some(opts.steps), ..opts.run.train_config(&opts.out_dir, settings) },
        &opts.run.interrupt,
        data.loader.as_ref(),
        &mut objective,
        &params,
        &mut optimizer,
        &mut schedule,
    )?;
    let report = PretrainReport {
        out_dir: opts.out_dir.clone(),
        trainable_parameters: params.numel(),
        adapter_parameters,
        outcome: RunOutcome::from(&summary).with_lock_notice(&lock),
        left_out: data.left_out,
    };
    if opts.run.is_primary() {
        let record = ContextBlipRecord {
            base_model: Some(BaseModel::of(blip)?),
            ..ContextBlipRecord::new(Stage::S0, opts.config.clone())
        };
        ContextBlip::save(&opts.out_dir, &record, &params.tensors())?;
        write_record(&opts.out_dir.join("training.json"), opts, rt, &opts.run, &report)?;
    }
    Ok(report)
}

/// The settings an S0 run records in its checkpoints and a resume must match: the options, the BLIP
/// files and the captions' fingerprint, the precision, the global batch.
fn pretrain_settings(
    blip: &ModelFiles,
    captions_fingerprint: &str,
    opts: &PretrainOptions,
    rt: &Runtime,
    world_size: usize,
) -> serde_json::Value {
    run_settings(opts, &(blip, captions_fingerprint), rt, world_size)
}

/// What an output folder holds for a caller that reuses finished S0 runs (the sweep), judged by the
/// settings its newest checkpoint recorded — the resume check's — and its steps.
#[derive(Debug, Clone, PartialEq)]
pub enum ExistingRun {
    /// No run: no checkpoint and no model.
    Nothing,
    /// The run of these options (same BLIP, captions, batch, seed, precision, …), every step done
    /// and its model saved: reusable as it is.
    Finished,
    /// The same settings with fewer steps done (interrupted, or more asked for now): resuming
    /// continues it exactly.
    Unfinished {
        /// Steps its newest checkpoint recorded.
        step: u64,
    },
    /// Made with other settings, or with more steps than asked: its results are not this run's.
    Different {
        /// What differs, one line each (`steps: 400 → 300`).
        differences: Vec<String>,
    },
}

/// What `opts.out_dir` holds for an S0 run of `opts` on `items` with `blip`, on `world_size` ranks
/// in `rt`'s precision ([`ExistingRun`]).
pub fn existing_pretrain_run(
    blip: &ModelFiles,
    items: &[ctxalign_data::captions::CaptionedImage],
    opts: &PretrainOptions,
    rt: &Runtime,
    world_size: usize,
) -> Result<ExistingRun> {
    let model_saved = opts.out_dir.join(WEIGHTS_FILE).is_file();
    let Some(latest) = ctxalign_train::Checkpointer::new(opts.out_dir.join("checkpoints"), 1).latest()? else {
        return Ok(match model_saved {
            true => ExistingRun::Different { differences: vec!["no checkpoint records its settings".into()] },
            false => ExistingRun::Nothing,
        });
    };
    let file = latest.join("trainer_state.json");
    let state: ctxalign_train::TrainerState = serde_json::from_slice(&std::fs::read(&file).map_err(Error::io(&file))?)
        .map_err(|e| Error::format(&file, format!("malformed trainer state: {e}")))?;
    let expected = pretrain_settings(blip, &crate::recipe::caption_items_fingerprint(items), opts, rt, world_size);
    let mut differences = match state.extra.get("settings") {
        Some(saved) => ctxalign_train::trainer::resume_differences(saved, &expected),
        None => vec!["its checkpoint records no settings".into()],
    };
    if state.step > opts.steps {
        differences.push(format!("steps: {} → {}", state.step, opts.steps));
    }
    Ok(match (differences.is_empty(), state.step == opts.steps && model_saved) {
        (false, _) => ExistingRun::Different { differences },
        (true, true) => ExistingRun::Finished,
        (true, false) => ExistingRun::Unfinished { step: state.step },
    })
}

/// Settings of an S1 run. Defaults: the reference's (Adam(0.9, 0.98), eps 1e-6, wd 0.2, backbone
/// lr 2e-6, head lr 1e-4, ×0.95 per epoch, batch 36).
#[derive(Debug, Clone, Serialize)]
pub struct FinetuneOptions {
    /// The S1 model folder written (BLIP files, `contextblip.*`, run record, checkpoints); default
    /// `runs/contextblip-s1` in ctxalign's home folder.
    pub out_dir: PathBuf,
    /// Epochs over the training descriptions (default 40).
    pub epochs: u64,
    /// Stop after this many steps (all epochs when `None`).
    pub max_steps: Option<u64>,
    /// Descriptions per step, each with its set's candidates (default 36; per rank in a data-parallel run).
    pub batch_size: usize,
    /// Learning rate of BLIP and the adapter (default 2e-6).
    pub backbone_lr: f64,
    /// Learning rate of the new candidate head (default 1e-4).
    pub head_lr: f64,
    /// Weight decay as Adam's L2 term, not decoupled (default 0.2).
    pub weight_decay: f64,
    /// Learning-rate factor per epoch, with no warm-up (default 0.95).
    pub epoch_decay: f64,
    /// Fine-tune the ViT too (reference: yes).
    pub train_vision: bool,
    /// Start the candidate head from `head.weight` of this safetensors file (a reference run's
    /// head, say) instead of drawing it from the seed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub head_init: Option<PathBuf>,
    /// Seed, bad-input policy (of the split's sets), resume/overwrite, progress.
    #[serde(flatten)]
    pub run: RunControl,
}

impl Default for FinetuneOptions {
    fn default() -> Self {
        Self {
            out_dir: default_run_dir("contextblip-s1"),
            epochs: 40,
            max_steps: None,
            batch_size: 36,
            backbone_lr: 2e-6,
            head_lr: 1e-4,
            weight_decay: 0.2,
            epoch_decay: 0.95,
            train_vision: true,
            head_init: None,
            run: RunControl::default(),
        }
    }
}

/// `runs/<kind>` in ctxalign's home folder ([`crate::home::run_dir`]); where no home folder can be
/// found (no `CTXALIGN_HOME`, `HOME` or cache folder), `<kind>` in the current folder.
fn default_run_dir(kind: &str) -> PathBuf {
    crate::home::run_dir(kind).unwrap_or_else(|_| PathBuf::from(kind))
}

fn finetune_adam() -> AdamConfig {
    AdamConfig { beta1: 0.9, beta2: 0.98, eps: 1e-6, decoupled_weight_decay: false }
}

/// S1: fine-tunes BLIP + the adapter of `contextblip_dir` with a new candidate head on `split`, on
/// `rt`'s device and precision. Writes a complete model folder to `opts.out_dir`: the BLIP files
/// (fine-tuned `model.safetensors`, config, tokenizer, preprocessor) and
/// `contextblip.{json,safetensors}` with adapter and head.
pub fn finetune_s1(
    blip: &ModelFiles,
    contextblip_dir: &Path,
    data: impl Into<ImageCodeSource>,
    opts: &FinetuneOptions,
    rt: &Runtime,
) -> Result<FinetuneReport> {
    check_options(opts.batch_size, Some(opts.epoch_decay), None)?;
    require_stage(contextblip_dir, &[Stage::S0], "S1 fine-tuning (it starts from a pre-trained adapter)")?;
    let lock = opts.run.claim_output(&opts.out_dir, "finetune-s1 (ContextBLIP S1)")?;
    let s0 = ContextBlipRecord::read(contextblip_dir)?;
    let base = BaseModel::of(blip)?;
    s0.check_base_model(contextblip_dir, &base, blip)?;
    // The descriptions are checked with the tokenizer they train with.
    let vocab = BlipItm::read_config(&blip.config)?.text_config.vocab_size;
    let tokenizer = crate::scorer::tokenizer_for(blip, &ScorerOptions::default(), vocab)?;
    let data = match &opts.run.replay {
        Some(replay) => replayed_data(replay)?,
        None => imagecode_data(
            data.into(),
            crate::scorer::processor_for(blip, &BlipItm::read_config(&blip.config)?.vision_config)?,
            opts.batch_size,
            &opts.run,
            &tokenizer,
        )?,
    };
    let dev = &rt.device;
    let blip_cfg = BlipItm::read_config(&blip.config)?;
    let cfg = s0.config_for(contextblip_dir, &blip_cfg)?;
    let (model, head, params) = build_finetuning(
        blip,
        &contextblip_dir.join(WEIGHTS_FILE),
        &cfg,
        opts.train_vision,
        rt.dtype(),
        dev,
        opts.run.seed,
    )?;
    if let Some(file) = &opts.head_init {
        start_from(&params, file, "head.")?;
    }
    let mut objective = FinetuneObjective::new(model, head, tokenizer, opts.train_vision, dev)?;
    // Each description's loss is its own: the ranks share nothing but the gradient mean, which the
    // objective turns into the sum over the global batch.
    objective.world_size = opts.run.dist.world_size();
    let groups = group_params(
        &params,
        &[
            GroupSpec::new("head", opts.head_lr, opts.weight_decay, |n| n.starts_with("head.")),
            GroupSpec::rest("backbone", opts.backbone_lr, opts.weight_decay),
        ],
    )?;
    let mut optimizer = Adam::new(finetune_adam(), groups)?;
    let mut schedule = Schedule::new(ScheduleConfig::warmup_per_epoch(0, opts.epoch_decay));
    let summary = run(
        TrainConfig {
            epochs: opts.epochs,
            max_steps: opts.max_steps,
            ..opts.run.train_config(
                &opts.out_dir,
                run_settings(opts, &(blip, contextblip_dir, &data.fingerprint), rt, opts.run.dist.world_size()),
            )
        },
        &opts.run.interrupt,
        data.loader.as_ref(),
        &mut objective,
        &params,
        &mut optimizer,
        &mut schedule,
    )?;
    let report =
        FinetuneReport { outcome: RunOutcome::from(&summary).with_lock_notice(&lock), left_out: data.left_out };
    if !opts.run.is_primary() {
        return Ok(report);
    }
    // The complete folder: BLIP files with the fine-tuned weights, then ContextBLIP's.
    let mut weights = ctxalign_train::checkpoint::read_all(&blip.weights)?;
    let (mut contextblip, mut backbone) = (BTreeMap::new(), BTreeMap::new());
    for (k, v) in params.tensors() {
        if k.starts_with("adapter.") || k.starts_with("head.") {
            contextblip.insert(k, v);
        } else {
            backbone.insert(k, v);
        }
    }
    weights.extend(backbone);
    BlipItm::save(&opts.out_dir, &BlipFolderFiles::read(blip)?, &weights)?;
    let record = ContextBlipRecord { base_model: Some(base), ..ContextBlipRecord::new(Stage::S1, cfg) };
    ContextBlip::save(&opts.out_dir, &record, &contextblip)?;
    write_record(&opts.out_dir.join("training.json"), opts, rt, &opts.run, &report)?;
    Ok(report)
}

/// Where S1 reads its IMAGECODE training descriptions.
#[derive(Debug, Clone)]
pub enum ImageCodeSource {
    /// A split's JSON and its image folders; every set is checked once before anything is built.
    Split(ImageCodeSplit),
    /// WebDataset shards of sets (`ctxalign shards --imagecode`), streamed.
    Shards(ShardSource),
}

impl From<ImageCodeSplit> for ImageCodeSource {
    fn from(split: ImageCodeSplit) -> Self {
        Self::Split(split)
    }
}

/// S1's loader: the split's descriptions (each set checked once; under `BadInputPolicy::Skip` bad
/// sets are left out and reported), or a stream of set shards (bad samples reported by shard and
/// key). This rank's share in a data-parallel run.
fn imagecode_data(
    source: ImageCodeSource,
    processor: ctxalign_data::ImageProcessor,
    batch_size: usize,
    run: &RunControl,
    text: &ctxalign_data::TextTokenizer,
) -> Result<TrainingData<DescriptionSample, LeftOutSet>> {
    match source {
        ImageCodeSource::Split(split) => {
            let (mut split, mut left_out) = split.checked(DecodeOptions::default(), run.bad_input)?;
            // Every description is cleaned and tokenized as training will: one that leaves no
            // token fails the run now (or is left out under --skip-bad), not at the step that
            // draws it.
            let bad = ctxalign_data::loader::find_unusable(
                &split.examples,
                "descriptions",
                run.bad_input,
                |e| format!("{}: {}", split.source.display(), e.at()),
                |e| {
                    text.check_text(&e.description)
                        .map_err(|source| ctxalign_data::DataError::Text { what: e.at(), source: Box::new(source) })
                },
            )?;
            for skipped in &bad {
                let set = split.examples[skipped.index].set.clone();
                left_out.push(LeftOutSet { set, descriptions: 1, error: skipped.error.clone() });
            }
            split.examples = ctxalign_data::loader::without_unusable(std::mem::take(&mut split.examples), &bad);
            let fingerprint = crate::fingerprint(&format!("{split:?}"));
            let dataset = ImageCodeDataset { split, processor, decode: DecodeOptions::default(), text: None };
            let config = LoaderConfig {
                batch_size,
                seed: run.seed,
                policy: run.bad_input,
                shard: run.shard(),
                ..Default::default()
            };
            let loader = DataLoader::new(dataset, config);
            Ok(TrainingData { samples: loader.len(), loader: Box::new(loader), left_out, fingerprint })
        }
        ImageCodeSource::Shards(shards) => {
            let format = ImageCodeShards { processor, decode: DecodeOptions::default(), text: Some(text.clone()) };
            let (loader, skipped) = shard_loader(&shards, format, batch_size, run)?;
            let left_out = skipped
                .into_iter()
                .map(|s| LeftOutSet { set: format!("sample {}", s.index), descriptions: 0, error: s.error })
                .collect();
            let (fingerprint, samples) = (loader.fingerprint(), loader.index().len());
            Ok(TrainingData { fingerprint, samples, loader: Box::new(loader), left_out })
        }
    }
}

/// What an S1 run produced.
#[derive(Debug, Clone, Serialize)]
pub struct FinetuneReport {
    /// How the training loop ended: steps, final loss terms, timing, notices.
    #[serde(flatten)]
    pub outcome: RunOutcome,
    /// Training sets left out as unusable, with their descriptions (only under
    /// [`ctxalign_data::loader::BadInputPolicy::Skip`]).
    pub left_out: Vec<LeftOutSet>,
}

/// Settings of an S2 run (reference: 20 epochs; the S1 optimiser settings with lr 1e-4).
#[derive(Debug, Clone, Serialize)]
pub struct InterContextOptions {
    /// The S2 folder written: the S1 folder's files plus `inter_context.*` (default
    /// `runs/contextblip-s2` in ctxalign's home folder).
    pub out_dir: PathBuf,
    /// Epochs over the features (default 20).
    pub epochs: u64,
    /// Descriptions per step (default 36; per rank in a data-parallel run).
    pub batch_size: usize,
    /// Learning rate of the inter-context encoder (default 1e-4; ×0.95 per epoch).
    pub lr: f64,
    /// Weight decay as Adam's L2 term, not decoupled (default 0.2).
    pub weight_decay: f64,
    /// Start the encoder from `inter_context.*` of this safetensors file (a reference run's start,
    /// say) instead of drawing it from the seed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init: Option<PathBuf>,
    /// Seed, resume/overwrite, progress (the bad-input policy does not apply: S2 trains on features
    /// in memory, computed from sets the caller checked). With a replay ([`RunControl::replay`]),
    /// its recorded steps pick the descriptions of each batch from `features` by index.
    #[serde(flatten)]
    pub run: RunControl,
}

impl Default for InterContextOptions {
    fn default() -> Self {
        Self {
            out_dir: default_run_dir("contextblip-s2"),
            epochs: 20,
            batch_size: 36,
            lr: 1e-4,
            weight_decay: 0.2,
            init: None,
            run: RunControl::default(),
        }
    }
}

/// S2: trains the inter-context encoder on frozen S1 `features` (from [`candidate_features`](super::candidate_features)),
/// scored by the frozen S1 `head`, on `rt`'s device and precision. Writes the S1 folder's files
/// plus `inter_context.*`.
pub fn finetune_s2(
    s1_dir: &Path,
    features: Vec<CandidateFeatures>,
    opts: &InterContextOptions,
    rt: &Runtime,
) -> Result<RunOutcome> {
    check_options(opts.batch_size, None, None)?;
    require_stage(s1_dir, &[Stage::S1], "S2 (it trains on an S1 folder's features)")?;
    let lock = opts.run.claim_output(&opts.out_dir, "finetune-s2 (ContextBLIP S2)")?;
    let dev = &rt.device;
    let d = features.first().ok_or_else(|| Error::Invalid("no training descriptions".into()))?.features.len()
        / features[0].candidates;
    let ic_cfg = InterContextConfig::reference(d);
    let head = load_head(s1_dir, d, rt.dtype(), dev)?;
    let source = ParamSource::from_scratch(ctxalign_train::transformer_init(0.02), opts.run.seed);
    let (encoder, params) = ctxalign_train::build_for_training(source, rt.dtype(), dev, |vb| {
        InterContextEncoder::new(&ic_cfg, vb.pp("inter_context"))
    })?;
    if let Some(file) = &opts.init {
        start_from(&params, file, "inter_context.")?;
    }
    let world_size = opts.run.dist.world_size();
    let mut objective = InterContextObjective { encoder, head, device: dev.clone(), dtype: rt.dtype(), world_size };
    let groups = group_params(&params, &[GroupSpec::rest("inter_context", opts.lr, opts.weight_decay)])?;
    let mut optimizer = Adam::new(finetune_adam(), groups)?;
    // What a resume must match besides the options: the S1 folder (its weights' fingerprint) and the
    // examples the features were computed for (the features follow from both).
    let s1_files = ModelFiles::from_dir(s1_dir)?;
    let s1_weights = BaseModel::of(&s1_files)?.fingerprint;
    let examples: Vec<(usize, Option<usize>, bool)> =
        features.iter().map(|f| (f.candidates, f.target, f.video)).collect();
    let inputs = (s1_dir, s1_weights, examples);
    let loader: Box<dyn BatchSource<Item = CandidateFeatures>> = match &opts.run.replay {
        Some(replay) => Box::new(replay.indexed_loader(&features)?),
        None => Box::new(DataLoader::new(
            FeatureDataset(features),
            LoaderConfig {
                batch_size: opts.batch_size,
                seed: opts.run.seed,
                shard: opts.run.shard(),
                ..Default::default()
            },
        )),
    };
    let mut schedule = Schedule::new(ScheduleConfig::warmup_per_epoch(0, 0.95));
    let summary = run(
        TrainConfig {
            epochs: opts.epochs,
            ..opts.run.train_config(&opts.out_dir, run_settings(opts, &inputs, rt, opts.run.dist.world_size()))
        },
        &opts.run.interrupt,
        loader.as_ref(),
        &mut objective,
        &params,
        &mut optimizer,
        &mut schedule,
    )?;
    let outcome = RunOutcome::from(&summary).with_lock_notice(&lock);
    if !opts.run.is_primary() {
        return Ok(outcome);
    }
    // S2 folder = S1's BLIP and ContextBLIP weights + the encoder. S1's run record and evaluation
    // are S1's and stay behind.
    BlipItm::copy(&s1_files, &opts.out_dir)?;
    let mut tensors = ctxalign_train::checkpoint::read_all(&[s1_dir.join(WEIGHTS_FILE)])?;
    tensors.extend(params.tensors());
    let s1 = ContextBlipRecord::read(s1_dir)?;
    let record = ContextBlipRecord { stage: Stage::S2, inter_context: Some(ic_cfg), ..s1 };
    ContextBlip::save(&opts.out_dir, &record, &tensors)?;
    write_record(&opts.out_dir.join("training.json"), opts, rt, &opts.run, &outcome)?;
    Ok(outcome)
}

/// Sets every trainable parameter whose name starts with `prefix` from the tensor of that name in
/// the safetensors `file` (a recipe's `head_init` / `init`); each must be there with its shape.
fn start_from(params: &TrainableParams, file: &Path, prefix: &str) -> Result<()> {
    let tensors = candle_core::safetensors::load(file, &candle_core::Device::Cpu)
        .map_err(|e| Error::Invalid(format!("{}: cannot read the initial weights: {e}", file.display())))?;
    for (name, var) in params.vars.iter().filter(|(n, _)| n.starts_with(prefix)) {
        let t = tensors
            .get(name)
            .ok_or_else(|| Error::Invalid(format!("{}: no `{name}` to start from", file.display())))?;
        if t.dims() != var.dims() {
            return Err(Error::Invalid(format!(
                "{}: `{name}` is {:?}, the model's is {:?}",
                file.display(),
                t.dims(),
                var.dims()
            )));
        }
        params.set(name, t)?;
    }
    Ok(())
}

//! The BLIP backbone recipe (feature `train`): a BLIP trained from scratch by BLIP's retrieval
//! objective — ITC with a learned temperature plus ITM on hard negatives — on captioned images,
//! exported as a BLIP folder in HF's layout. What trains `models/blip-vignettes-small`
//! (`cargo xtask train-default-backbone` calls it, then evaluates and writes the model card), and the
//! `ctxalign train-backbone` job.
//!
//! Up to three stages, each a run of the training loop with its own AdamW, schedule and run folder:
//! 1. ITC alone on each image's first caption (of the images in no group, when some are grouped:
//!    [`ctxalign_data::captions::CaptionedImage::group`]). From scratch, hard negatives drawn from random
//!    similarities are random and relational captions ("the square is above the circle") carry no
//!    signal until the encoders can see and read the objects; with the full objective on all
//!    captions from step 0, ITC stayed near ln(batch) for hundreds of steps.
//! 2. ITC + ITM on hard negatives (on every caption with [`BackboneOptions::all_captions`]), on the
//!    same images.
//! 3. With groups of near-identical images in the data (the Vignettes contrast corpus:
//!    [`ctxalign_data::vignettes::ensure_contrast_captions`]), ITC + ITM on every image, batches
//!    keeping a group together so that a caption's negatives include the images of its group. Its
//!    own stage: ITM on groups whose images ITC cannot yet tell apart has nothing to learn from.
//!
//! From scratch, the matcher (cross-attention and ITM head) needs easy negatives first
//! ([`BackboneOptions::negative_sharpness`] 0, uniform): with BLIP's hard negatives its loss was
//! still 0.630 after 800 steps of 40 in stage 2 (the constant predictor's is 0.637) and fell back
//! to the plateau in stage 3; with uniform ones it fell to 0.50 in 500 steps and kept learning on
//! the groups.
//!
//! Data-parallel like every recipe ([`RunControl::dist`]): ITC over the global batch and hard
//! negatives from every rank ([`ctxalign_train::blip`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Var;
use ctxalign_data::loader::{Augment, Skipped};
use ctxalign_data::text::build_wordpiece_tokenizer_json;
use ctxalign_data::{CaptionCleaning, ImageProcessor, TextTokenizer};
use ctxalign_models::blip::{BlipConfig, BlipFolderFiles, BlipItm};
use ctxalign_models::loading::RenameTable;
use ctxalign_models::ModelFiles;
use ctxalign_train::blip::{BlipRetrievalObjective, INITIAL_TEMPERATURE, TEMPERATURE_KEY};
use ctxalign_train::{
    build_for_training, group_params, transformer_init, Adam, AdamConfig, GroupSpec, ParamSource, Schedule,
    ScheduleConfig, TrainConfig,
};
use serde::Serialize;

use crate::recipe::{
    caption_data, check_options, run, run_settings, write_record, CaptionSource, RunControl, RunOutcome,
};
use crate::{Error, Result, Runtime};

/// Settings of a backbone run (defaults: [`BackboneOptions::vignettes_small`]).
#[derive(Debug, Clone, Serialize)]
pub struct BackboneOptions {
    /// The model folder written at the end (`config.json`, `model.safetensors`, `tokenizer.json`,
    /// `preprocessor_config.json`, `training.json`, the stages' loss curves).
    pub out_dir: PathBuf,
    /// The stages' run folders (`stage1-itc/`, `stage2-itc-itm/`: checkpoints, metrics).
    pub run_dir: PathBuf,
    /// The model's shape. Its vocabulary is the WordPiece tokenizer built from the training
    /// captions: `text_config.vocab_size` and `bos_token_id` (`[DEC]`, the second-to-last id) are
    /// set from it. Unused with `init`.
    pub config: BlipConfig,
    /// Start from this BLIP folder (HF layout: `config.json`, `model.safetensors`,
    /// `tokenizer.json`) instead of from scratch: its shape, vocabulary and weights, and its
    /// temperature when the weights carry BLIP's `temp` (else BLIP's initial 0.07).
    pub init: Option<PathBuf>,
    /// Steps of stage 1 (ITC alone, first captions); a stage of 0 steps is skipped (stage 1, say,
    /// when starting from a trained `init`).
    pub itc_steps: u64,
    /// Steps of stage 2 (ITC + ITM on hard negatives); 0 skips it.
    pub steps: u64,
    /// Steps of stage 3 (ITC + ITM on every image, groups of near-identical images kept together);
    /// 0 skips it. More than 0 needs grouped images in the data.
    pub contrast_steps: u64,
    /// Multiplies the ITC logits stages 2 and 3 draw ITM's negatives from: 1 is BLIP's
    /// `softmax(sim/τ)`, 0 uniform among the batch's other images and texts. A matcher from scratch
    /// whose first negatives are the hardest ones stays near the constant predictor's loss (0.630
    /// after 800 steps of 40 against 0.637, where uniform negatives reach 0.50 in 500); so does one
    /// that met only easy negatives when its batches turn to groups of near-identical scenes.
    pub negative_sharpness: f64,
    /// Stages 2 and 3 on every caption of each image (a random one per epoch) instead of the first.
    pub all_captions: bool,
    /// Captioned images per step (per rank in a data-parallel run).
    pub batch_size: usize,
    /// Peak AdamW learning rate of each stage, after the warm-up, cosine-decayed to 10 %.
    pub lr: f64,
    /// Peak learning rate of what only ITM trains (cross-attention, ITM head): they start from
    /// scratch in stage 2, after the rest learnt for a whole stage.
    pub itm_lr: f64,
    /// AdamW's decoupled weight decay of every parameter but the temperature.
    pub weight_decay: f64,
    /// Linear warm-up steps at the start of each stage.
    pub warmup_steps: u64,
    /// Tokens kept per caption.
    pub max_tokens: usize,
    /// Seed, bad-input policy, resume/overwrite, progress, ranks.
    #[serde(flatten)]
    pub run: RunControl,
}

impl BackboneOptions {
    /// The shipped default's recipe: `BlipConfig::vignettes_small`, 300 + 300 steps of 32, AdamW
    /// 3e-4 (1e-3 for the ITM-only parts), weight decay 0.05, 20 warm-up steps per stage, 40 tokens.
    pub fn vignettes_small(out_dir: PathBuf, run_dir: PathBuf) -> Self {
        Self {
            out_dir,
            run_dir,
            config: BlipConfig::vignettes_small(2),
            init: None,
            itc_steps: 300,
            steps: 300,
            contrast_steps: 0,
            negative_sharpness: 1.0,
            all_captions: false,
            batch_size: 32,
            lr: 3e-4,
            itm_lr: 1e-3,
            weight_decay: 0.05,
            warmup_steps: 20,
            max_tokens: 40,
            run: RunControl::default(),
        }
    }
}

/// How one stage ended.
#[derive(Debug, Clone, Serialize)]
pub struct StageReport {
    /// The stage's run folder name ([`STAGE1`] or [`STAGE2`]).
    pub stage: String,
    /// Whether ITM trained in it.
    pub itm: bool,
    /// How its training loop ended: steps, final loss terms, timing, notices.
    #[serde(flatten)]
    pub outcome: RunOutcome,
}

/// What a backbone run produced.
#[derive(Debug, Clone, Serialize)]
pub struct BackboneReport {
    /// The model folder ([`BackboneOptions::out_dir`]); written only when the run was not interrupted.
    pub out_dir: PathBuf,
    /// Trainable parameters (the temperature excluded).
    pub parameters: usize,
    /// Size of the model's vocabulary (the WordPiece built from the captions, or `init`'s).
    pub vocab_size: usize,
    /// Usable captioned images of the last stage that ran (stage 3 trains on every image, stages 1
    /// and 2 on those in no group when some are grouped).
    pub train_images: usize,
    /// The stages that ran, in order (the last one interrupted when `interrupted`).
    pub stages: Vec<StageReport>,
    /// Stopped by Ctrl-C: nothing was exported; `resume` continues.
    pub interrupted: bool,
    /// The learned ITC temperature at the end (saved as BLIP's `temp`); `None` when interrupted.
    pub final_temperature: Option<f32>,
    /// Wall-clock seconds of the stages' training loops, summed.
    pub seconds: f64,
    /// Captioned images left out as unusable (only under [`ctxalign_data::loader::BadInputPolicy::Skip`]).
    pub left_out: Vec<Skipped>,
}

/// Run folders of the two stages, inside [`BackboneOptions::run_dir`].
pub const STAGE1: &str = "stage1-itc";
/// Run folder of stage 2 (ITC + ITM), inside [`BackboneOptions::run_dir`].
pub const STAGE2: &str = "stage2-itc-itm";
/// Run folder of stage 3 (ITC + ITM with the groups), inside [`BackboneOptions::run_dir`].
pub const STAGE3: &str = "stage3-contrast";

/// Parameters only the ITM passes use (HF key names of `BlipForImageTextRetrieval`).
pub fn is_itm_only(name: &str) -> bool {
    name.contains(".crossattention.") || name.starts_with("itm_head.")
}

/// BLIP's image processor settings for `size` px, as `preprocessor_config.json`.
pub fn preprocessor_config(size: usize) -> String {
    serde_json::to_string_pretty(&serde_json::json!({
        "image_processor_type": "BlipImageProcessor",
        "do_resize": true,
        "size": {"height": size, "width": size},
        "resample": 3,
        "do_rescale": true,
        "rescale_factor": 1.0 / 255.0,
        "do_normalize": true,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": true
    }))
    .expect("JSON")
}

/// Trains a BLIP from scratch (or from the folder `opts.init`) on `items` (two stages, see the module)
/// on `rt`'s device and precision, and writes the model folder to `opts.out_dir`. With
/// [`RunControl::replay`] one stage replays a recorded reference run (the step fixture
/// `steps_blip_backbone`): its batches, and its hard negatives in place of the objective's draws.
pub fn train_backbone(data: impl Into<CaptionSource>, opts: &BackboneOptions, rt: &Runtime) -> Result<BackboneReport> {
    let data = data.into();
    check_options(opts.batch_size, None, None)?;
    if opts.max_tokens < 3 {
        return Err(Error::Invalid(format!("max_tokens {} leaves no room for a word", opts.max_tokens)));
    }
    // The stages' run folder (which a resume needs) and the model folder, written after the stages
    // (often one inside the other: separate lock files).
    let locks = [
        opts.run.claim_output(&opts.run_dir, "train-backbone")?,
        opts.run.lock_output(&opts.out_dir, "train-backbone")?,
    ];
    let specs = stage_groups(opts);
    ctxalign_train::check_group_specs(&specs)?;
    if opts.run.replay.is_some()
        && [opts.itc_steps, opts.steps, opts.contrast_steps].iter().filter(|&&n| n > 0).count() > 1
    {
        return Err(Error::Invalid("a replayed run records one stage: set the others' steps to 0".into()));
    }
    if !(0.0..=1.0).contains(&opts.negative_sharpness) {
        return Err(Error::Invalid(format!("negative_sharpness {} is outside [0, 1]", opts.negative_sharpness)));
    }
    if opts.itc_steps + opts.steps + opts.contrast_steps == 0 {
        return Err(Error::Invalid("every stage has 0 steps: nothing to train".into()));
    }
    if opts.contrast_steps > 0 && !has_groups(&data) {
        return Err(Error::Invalid(format!(
            "{} contrast steps, but no image of the data is in a group (caption JSON's `group`; the \
             Vignettes contrast corpus has them)",
            opts.contrast_steps
        )));
    }
    let start = match &opts.init {
        Some(dir) => Start::from_folder(dir)?,
        None => Start::from_captions(&data, &opts.config)?,
    };
    let Start { cfg, tokenizer_json, vocab_size, weights, temperature } = start;
    let size = cfg.vision_config.image_size;
    let tokenizer = TextTokenizer::from_bytes(
        tokenizer_json.as_bytes(),
        &opts.out_dir.join("tokenizer.json"),
        CaptionCleaning::blip(50),
        opts.max_tokens,
    )?;

    let init_weights = weights.clone();
    let source = match weights {
        Some(files) => ParamSource {
            checkpoint: Some((files, RenameTable::identity())),
            // A BLIP folder's extras (its `temp`, read above; HF's position ids) as for scoring.
            allowed_unused: BlipItm::allowed_unused(),
            ..ParamSource::from_scratch(transformer_init(0.02), opts.run.seed)
        },
        None => ParamSource::from_scratch(transformer_init(0.02), opts.run.seed),
    };
    let (model, mut params) = build_for_training(source, rt.dtype(), &rt.device, |vb| BlipItm::new(&cfg, vb))?;
    if let (Some(dir), Some(paths)) = (&opts.init, &init_weights) {
        // A tensor the folder lacks would start random, silently: refuse.
        let weights = open_weights(paths)?;
        if let Some(name) = params.vars.keys().find(|name| weights.get(name).is_err()) {
            return Err(Error::Invalid(format!("{}: the BLIP to start from lacks `{name}`", dir.display())));
        }
    }
    let temperature = Var::new(temperature as f32, &rt.device)?;
    params.insert(TEMPERATURE_KEY, temperature.clone())?;
    let mut objective = BlipRetrievalObjective::new(model, tokenizer, temperature, opts.run.seed)?;
    objective.comm = opts.run.dist.clone();
    objective.replay = opts.run.replay.clone();

    // Stage 1 on each image's first caption; stages 2 and 3 on all of them with `all_captions`.
    // Stages 1 and 2 on the images in no group (all when every one is grouped), stage 3 on all.
    let first_caption_only = !opts.all_captions;
    let stages = [
        (STAGE1, true, false, opts.itc_steps),
        (STAGE2, first_caption_only, true, opts.steps),
        (STAGE3, first_caption_only, true, opts.contrast_steps),
    ];
    let mut report = BackboneReport {
        out_dir: opts.out_dir.clone(),
        parameters: params.numel() - 1,
        vocab_size,
        train_images: 0,
        stages: vec![],
        interrupted: false,
        final_temperature: None,
        seconds: 0.0,
        left_out: vec![],
    };
    for (name, first_caption_only, with_itm, steps) in stages.into_iter().filter(|stage| stage.3 > 0) {
        objective.with_itm = with_itm;
        objective.negative_sharpness = opts.negative_sharpness;
        let run_dir = opts.run_dir.join(name);
        // A resumed run interrupted in stage 1 has no stage-2 folder yet: the run folder was checked
        // to exist (`claim_output`), the stage's is made here so that it starts fresh, not as a typo.
        if opts.run.resume && opts.run.is_primary() {
            std::fs::create_dir_all(&run_dir).map_err(Error::io(&run_dir))?;
        }
        // No random crops: a crop can cut an object out and make its caption false. `augment` draws
        // a caption of the image per epoch.
        let augment = Some(Augment { crop_scale: None, hflip: false });
        let processor = ImageProcessor::blip(size as u32);
        let stage_data = match name {
            STAGE3 => data.clone(),
            _ => warm_up_data(&data),
        };
        let training = caption_data(
            stage_data,
            processor,
            augment,
            first_caption_only,
            opts.batch_size,
            &opts.run,
            &objective.tokenizer,
        )?;
        // The latest stage's counts: at the end, the last stage's, which trains on the most (stage 3
        // on every image, 1 and 2 on the same).
        (report.left_out, report.train_images) = (training.left_out.clone(), training.samples);
        let loader = training.loader.as_ref();
        let mut optimizer = Adam::new(AdamConfig::adamw(), group_params(&params, &stage_groups(opts))?)?;
        let mut schedule = Schedule::new(ScheduleConfig::warmup_cosine(opts.warmup_steps, steps, 0.1));
        let inputs = (name, &training.fingerprint, &tokenizer_json);
        let cfg_loop = TrainConfig {
            max_steps: Some(steps),
            ..opts.run.train_config(&run_dir, run_settings(opts, &inputs, rt, opts.run.dist.world_size()))
        };
        let summary =
            run(cfg_loop, &opts.run.interrupt, loader, &mut objective, &params, &mut optimizer, &mut schedule)?;
        report.seconds += summary.seconds;
        if let (Some(plot), true) = (&summary.plot, opts.run.is_primary()) {
            std::fs::create_dir_all(&opts.out_dir).map_err(Error::io(&opts.out_dir))?;
            let copy = opts.out_dir.join(format!("loss-{name}.png"));
            std::fs::copy(plot, &copy).map_err(Error::io(&copy))?;
        }
        let interrupted = summary.interrupted;
        let mut outcome = RunOutcome::from(&summary);
        if report.stages.is_empty() {
            for lock in &locks {
                outcome = outcome.with_lock_notice(lock);
            }
        }
        report.stages.push(StageReport { stage: name.into(), itm: with_itm, outcome });
        if interrupted {
            report.interrupted = true;
            return Ok(report);
        }
    }
    let mut weights = params.tensors();
    report.final_temperature = weights.remove(TEMPERATURE_KEY).map(|t| t.to_scalar::<f32>()).transpose()?;
    if opts.run.is_primary() {
        let files =
            BlipFolderFiles::new(&cfg, Some(tokenizer_json.into_bytes()), Some(preprocessor_config(size).into_bytes()));
        BlipItm::save(&opts.out_dir, &files, &weights)?;
        write_record(&opts.out_dir.join("training.json"), opts, rt, &opts.run, &report)?;
    }
    Ok(report)
}

/// Whether some image of `data` is in a group ([`ctxalign_data::captions::CaptionedImage::group`]).
fn has_groups(data: &CaptionSource) -> bool {
    matches!(data, CaptionSource::Files(items) if items.iter().any(|i| i.group.is_some()))
}

/// The data of stages 1 and 2: the images in no group
/// ([`ctxalign_data::captions::CaptionedImage::group`]) when there are some besides grouped ones. A
/// group's images differ in one detail and its captions name details, so from scratch a batch of
/// groups leaves ITC near ln(batch) (3.3 after 300 steps of 40, where the listings of ungrouped
/// images reach 0.76): the first stages learn to see, name and match objects.
fn warm_up_data(data: &CaptionSource) -> CaptionSource {
    match data {
        CaptionSource::Files(items) if items.iter().any(|i| i.group.is_none()) => {
            CaptionSource::Files(items.iter().filter(|i| i.group.is_none()).cloned().collect())
        }
        other => other.clone(),
    }
}

/// What a run starts from: the model's shape, its tokenizer, the weights to load (none: from
/// scratch) and the initial temperature.
struct Start {
    cfg: BlipConfig,
    tokenizer_json: String,
    vocab_size: usize,
    weights: Option<Vec<PathBuf>>,
    temperature: f64,
}

impl Start {
    /// A new model of `shape` whose vocabulary is built from the training captions.
    fn from_captions(data: &CaptionSource, shape: &BlipConfig) -> Result<Self> {
        // The words of the training captions, plus characters so that any other word still
        // tokenises. Every rank builds the same from the same captions.
        let captions = match data {
            CaptionSource::Files(items) => items.iter().flat_map(|i| i.captions.iter().cloned()).collect(),
            CaptionSource::Shards(shards) => shard_captions(&shards.spec)?,
        };
        if captions.is_empty() {
            return Err(Error::Invalid("no captioned images to train on".into()));
        }
        let corpus: Vec<&str> = captions.iter().map(String::as_str).collect();
        let (tokenizer_json, vocab_size) = build_wordpiece_tokenizer_json(&corpus, 2);
        let mut cfg = shape.clone();
        cfg.text_config.vocab_size = vocab_size;
        cfg.text_config.bos_token_id = vocab_size as u32 - 2;
        cfg.validate().map_err(Error::Invalid)?;
        Ok(Self { cfg, tokenizer_json, vocab_size, weights: None, temperature: INITIAL_TEMPERATURE })
    }

    /// The BLIP of folder `dir`: its config, tokenizer and weights, and the `temp` its weights
    /// carry (BLIP's checkpoints do; HF's retrieval models do not: then 0.07).
    fn from_folder(dir: &Path) -> Result<Self> {
        let files = ModelFiles::from_dir(dir)?;
        let cfg = BlipItm::read_config(&files.config)?;
        let tokenizer = files.tokenizer.clone().ok_or_else(|| {
            Error::Invalid(format!("{}: the BLIP to start from has no tokenizer.json", dir.display()))
        })?;
        let tokenizer_json = std::fs::read_to_string(&tokenizer).map_err(Error::io(&tokenizer))?;
        let weights = open_weights(&files.weights)?;
        let temperature = match weights.get(TEMPERATURE_KEY) {
            Ok(view) => {
                let t = candle_core::safetensors::Load::load(&view, &candle_core::Device::Cpu)?;
                t.to_dtype(candle_core::DType::F64)?
                    .flatten_all()?
                    .to_vec1::<f64>()?
                    .first()
                    .copied()
                    .ok_or_else(|| Error::Invalid(format!("{}: `{TEMPERATURE_KEY}` is empty", dir.display())))?
            }
            Err(_) => INITIAL_TEMPERATURE,
        };
        let vocab_size = cfg.text_config.vocab_size;
        Ok(Self { cfg, tokenizer_json, vocab_size, weights: Some(files.weights), temperature })
    }
}

/// The weight files of a BLIP folder, memory-mapped (to look keys up without reading them).
fn open_weights(paths: &[PathBuf]) -> Result<candle_core::safetensors::MmapedSafetensors> {
    // SAFETY: read-only maps of files nothing else writes while the run starts.
    unsafe { candle_core::safetensors::MmapedSafetensors::multi(paths) }.map_err(|e| {
        Error::Invalid(format!(
            "{}: cannot read the weights: {e}",
            paths.first().map_or(String::new(), |p| p.display().to_string())
        ))
    })
}

/// Every caption of every sample of the shards in `spec` (one pass over them, images unread beyond
/// the archive's framing).
fn shard_captions(spec: &str) -> Result<Vec<String>> {
    let mut captions = vec![];
    for path in ctxalign_data::shards::expand_shards(spec)? {
        // A bad sample (or the rest of a damaged shard) is the scan's to report or skip; its
        // captions are left out here.
        for sample in ctxalign_data::shards::SampleReader::open(&path)?.flatten() {
            if let Ok(c) = sample.captioned() {
                captions.extend(c.captions);
            }
        }
    }
    Ok(captions)
}

/// The optimizer's groups: the temperature (no decay), what only ITM trains, the rest.
fn stage_groups(opts: &BackboneOptions) -> [GroupSpec; 3] {
    [
        GroupSpec::new("temperature", opts.lr, 0.0, |n| n == TEMPERATURE_KEY),
        GroupSpec::new("itm", opts.itm_lr, opts.weight_decay, is_itm_only),
        GroupSpec::rest("model", opts.lr, opts.weight_decay),
    ]
}

/// The final mean loss terms of each stage, for records (`{"stage1-itc": {"itc": …}, …}`).
pub fn final_terms(report: &BackboneReport) -> BTreeMap<String, BTreeMap<String, f64>> {
    report.stages.iter().map(|s| (s.stage.clone(), s.outcome.final_terms.clone())).collect()
}

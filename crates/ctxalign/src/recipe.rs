//! What every training recipe (ContextBLIP's S0/S1/S2, ContextCLIP's training and fine-tuning)
//! shares: the loop settings, running the loop for a number of steps, whole-batch loaders, and the
//! `training.json` record.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ctxalign_data::captions::CaptionedImage;
use ctxalign_data::loader::{
    Augment, BadInputPolicy, BatchSource, CaptionDataset, CaptionSample, DataLoader, Dataset, LoaderConfig, Shard,
    Skipped,
};
use ctxalign_data::lock::FolderLock;
use ctxalign_data::shards::{
    expand_shards, CaptionShards, ScanPart, ShardFormat, ShardIndex, ShardLoader, ShardLoaderConfig,
};
use ctxalign_data::{write_atomic, DecodeOptions, ImageProcessor, TextTokenizer};
use ctxalign_train::replay::FromRecord;
use ctxalign_train::{
    train, Adam, Communicator, Interrupt, Objective, Replay, Schedule, TrainConfig, TrainSummary, TrainableParams,
};
use serde::Serialize;

use crate::{Error, Result, Runtime};

/// The loop settings every recipe shares (gradient norm clipped at 5, a checkpoint every 100
/// steps); callers set `max_steps` or `epochs`, and the [`RunControl`] switches.
pub(crate) fn recipe_config(out_dir: &Path) -> TrainConfig {
    TrainConfig { clip_norm: Some(5.0), checkpoint_every: 100, ..TrainConfig::new(out_dir) }
}

/// How a run starts, continues and reports: the same switches in the options of every recipe that
/// resumes (S0, S1, ContextCLIP training and fine-tuning). Flattened into their JSON, so records
/// keep `seed`, `resume`, … at the top level of `options`.
#[derive(Debug, Clone, Serialize)]
pub struct RunControl {
    /// Seeds every random draw (shuffling, crops, masks, hard negatives, initialisation).
    pub seed: u64,
    /// Samples that cannot be used, found before the first step: fail (the default) or leave them
    /// out and report them.
    pub bad_input: BadInputPolicy,
    /// Continue from the latest checkpoint in the output folder (the settings must be the same).
    pub resume: bool,
    /// Start over in a folder that holds an earlier run's checkpoints (deleting them).
    pub overwrite: bool,
    /// Resume although the settings differ from the checkpoint's run (recorded in the report).
    pub accept_changed_settings: bool,
    /// Progress bar on a terminal, periodic log lines otherwise.
    pub progress: bool,
    /// The ranks of a data-parallel run ([`Communicator::single`] by default). Every rank calls the
    /// recipe with the same options and its own communicator and device; the batch size is per
    /// rank (the global batch is W × it); rank 0 alone writes the run folder.
    #[serde(skip)]
    pub dist: Communicator,
    /// Replay a recorded reference run (a step fixture, [`Replay`]): its micro-batches replace the
    /// data's loader and its random draws replace the objective's; the data still provides
    /// everything else (classes, evaluation sets). Everything else — loop, optimizer, schedule,
    /// clipping — is the recipe's own.
    #[serde(skip)]
    pub replay: Option<Replay>,
    /// The lock of the output folder when the caller holds it already (a command that writes into
    /// the folder after the recipe returns: an evaluation, say); the recipe then uses it instead of
    /// locking the folder again ([`RunControl::claim_output`]).
    #[serde(skip)]
    pub held_lock: Option<Arc<FolderLock>>,
    /// The stop request the loop watches: raised (by the caller's Ctrl-C handler, its shutdown
    /// path, another thread), the run writes a checkpoint after the current step and returns with
    /// `interrupted` set. The library installs no signal handler of its own.
    #[serde(skip)]
    pub interrupt: Interrupt,
}

impl Default for RunControl {
    fn default() -> Self {
        Self {
            seed: 0,
            bad_input: BadInputPolicy::Fail,
            resume: false,
            overwrite: false,
            accept_changed_settings: false,
            progress: true,
            dist: Communicator::single(),
            replay: None,
            held_lock: None,
            interrupt: Interrupt::new(),
        }
    }
}

impl RunControl {
    /// The loop settings of a run into `out_dir` under these switches; `settings` is what a resume
    /// must match ([`run_settings`]). Callers add `max_steps` or `epochs`.
    pub(crate) fn train_config(&self, out_dir: &Path, settings: serde_json::Value) -> TrainConfig {
        TrainConfig {
            seed: self.seed,
            resume: self.resume,
            overwrite: self.overwrite,
            accept_changed_settings: self.accept_changed_settings,
            settings,
            progress: self.progress,
            comm: self.dist.clone(),
            ..recipe_config(out_dir)
        }
    }

    /// Claims the folder a run writes, before anything is read or built: with `resume`, a folder
    /// that does not exist is [`ctxalign_train::TrainError::NothingToResume`] (a typo would
    /// otherwise start a fresh run elsewhere, without a word; checked before the lock creates the
    /// folder); then rank 0 (or the only process) locks it ([`FolderLock`], `job` names the holder
    /// to whoever finds it locked) — unless [`RunControl::held_lock`] is that folder's lock
    /// already (then `None`: the caller holds it). The lock is released when dropped: at the recipe's
    /// end, on its error, or by the caller that passed it in. Other ranks get `None`: only rank 0
    /// writes.
    pub fn claim_output(&self, dir: &Path, job: &str) -> Result<Option<Arc<FolderLock>>> {
        if self.is_primary() && self.resume && !dir.exists() && !self.held_lock.as_ref().is_some_and(|l| l.covers(dir))
        {
            return Err(ctxalign_train::TrainError::NothingToResume { dir: dir.to_owned() }.into());
        }
        self.lock_output(dir, job)
    }

    /// [`RunControl::claim_output`] without the resume check: for a folder a run writes that need
    /// not exist yet when it resumes (the backbone's model folder, written after its stages).
    pub fn lock_output(&self, dir: &Path, job: &str) -> Result<Option<Arc<FolderLock>>> {
        if !self.is_primary() || self.held_lock.as_ref().is_some_and(|l| l.covers(dir)) {
            // Another rank (rank 0 writes), or the caller holds the lock (and reports on it).
            return Ok(None);
        }
        Ok(Some(Arc::new(FolderLock::acquire(dir, job)?)))
    }

    /// Rank 0 of a data-parallel run (or the only process): the one that writes.
    pub fn is_primary(&self) -> bool {
        self.dist.is_primary()
    }

    /// This rank's share of each epoch.
    pub(crate) fn shard(&self) -> Shard {
        Shard::new(self.dist.rank(), self.dist.world_size())
    }
}

/// What a resume must match, saved in every checkpoint: the recipe's `options` without those that
/// may change between the parts of one run (the output folder, the resume/overwrite switches, the
/// step or epoch target, the progress bar), a fingerprint of everything else the run reads
/// (`inputs`: the model files, the data items), and the training precision (a bf16 run resumed in
/// f32 computes other steps). The per-rank batch size is recorded as the global batch (×
/// `world_size`): a data-parallel run continues on another number of ranks when the global batch
/// is the same — it sees the same batches and draws the same.
pub(crate) fn run_settings(
    options: &impl Serialize,
    inputs: &impl std::fmt::Debug,
    rt: &Runtime,
    world_size: usize,
) -> serde_json::Value {
    let mut options = serde_json::to_value(options).expect("options serialise to JSON");
    if let Some(map) = options.as_object_mut() {
        for key in
            ["out_dir", "resume", "overwrite", "accept_changed_settings", "progress", "steps", "max_steps", "epochs"]
        {
            map.remove(key);
        }
        if let Some(b) = map.remove("batch_size").and_then(|b| b.as_u64()) {
            map.insert("global_batch_size".into(), (b * world_size as u64).into());
        }
    }
    serde_json::json!({
        "options": options,
        "inputs": crate::fingerprint(&format!("{inputs:?}")),
        "precision": rt.precision,
    })
}

/// The checks every recipe makes of its options before any work starts (library callers bypass
/// the command line's parsers): a batch of at least 1, a per-epoch decay in (0, 1], crop areas with
/// 0 < min ≤ max ≤ 1. Learning rates and weight decays are checked by `group_params`.
pub(crate) fn check_options(batch_size: usize, epoch_decay: Option<f64>, crop_scale: Option<(f64, f64)>) -> Result<()> {
    if batch_size == 0 {
        return Err(Error::Invalid("the batch size must be at least 1".into()));
    }
    if let Some(d) = epoch_decay.filter(|d| !(*d > 0.0 && *d <= 1.0)) {
        return Err(Error::Invalid(format!("the per-epoch decay must be in (0, 1], not {d}")));
    }
    if let Some((lo, hi)) = crop_scale.filter(|(lo, hi)| !(*lo > 0.0 && lo <= hi && *hi <= 1.0)) {
        return Err(Error::Invalid(format!("the crop scale must satisfy 0 < min ≤ max ≤ 1, not ({lo}, {hi})")));
    }
    Ok(())
}

/// Runs the loop for `cfg.max_steps` steps (enough epochs to reach them), or `cfg.epochs` epochs;
/// a raised `interrupt` writes a checkpoint and stops.
pub(crate) fn run<O: Objective>(
    mut cfg: TrainConfig,
    interrupt: &Interrupt,
    loader: &dyn BatchSource<Item = O::Item>,
    objective: &mut O,
    params: &TrainableParams,
    optimizer: &mut Adam,
    schedule: &mut Schedule,
) -> Result<TrainSummary> {
    let steps = cfg.max_steps.unwrap_or(cfg.epochs * loader.batches_per_epoch() as u64);
    cfg.epochs = steps.div_ceil(loader.batches_per_epoch().max(1) as u64);
    Ok(train(&cfg, loader, objective, params, optimizer, schedule, interrupt)?)
}

/// A shuffled loader of whole batches whose every sample was checked before the first step
/// ([`preflight`]: under `run.bad_input` bad samples fail the run or are left out and returned); an
/// error when the usable data does not fill one global batch. In a data-parallel run the loader
/// serves this rank's share ([`Shard`]).
pub(crate) fn batched_loader<D: Dataset>(
    dataset: D,
    batch_size: usize,
    run: &RunControl,
) -> Result<(DataLoader<D>, Vec<Skipped>)> {
    let config = LoaderConfig {
        batch_size,
        seed: run.seed,
        drop_last: true,
        policy: run.bad_input,
        shard: run.shard(),
        ..Default::default()
    };
    let mut loader = DataLoader::new(dataset, config);
    let left_out = preflight(&mut loader, &run.dist)?;
    if loader.batches_per_epoch() == 0 {
        let world = run.dist.world_size();
        let global = match world {
            1 => format!("one batch of {batch_size}"),
            _ => format!("one global batch of {world} ranks × {batch_size}"),
        };
        return Err(Error::Invalid(format!("{} usable training examples, fewer than {global}", loader.len())));
    }
    Ok((loader, left_out))
}

/// [`DataLoader::preflight`] shared by the ranks of a data-parallel run: each checks its share of
/// the samples, and all apply the findings of all, so that every rank leaves out the same samples.
pub(crate) fn preflight<D: Dataset>(loader: &mut DataLoader<D>, comm: &Communicator) -> Result<Vec<Skipped>> {
    let mine = loader.check_share(Shard::new(comm.rank(), comm.world_size()));
    let all = if comm.is_distributed() {
        let bytes = serde_json::to_vec(&mine).expect("skipped samples serialise");
        let mut all = vec![];
        for part in comm.all_gather_bytes(&bytes).map_err(ctxalign_train::TrainError::from)? {
            let part: Vec<Skipped> =
                serde_json::from_slice(&part).map_err(|e| Error::Invalid(format!("another rank's data check: {e}")))?;
            all.extend(part);
        }
        all
    } else {
        mine
    };
    Ok(loader.apply_checks(all)?)
}

/// Where a recipe that trains on captioned images reads them.
#[derive(Debug, Clone)]
pub enum CaptionSource {
    /// Image files with their captions (caption JSON, Flickr8k, the built-in data), indexed: every
    /// sample is checked before the first step, each epoch is a shuffle of all.
    Files(Vec<CaptionedImage>),
    /// WebDataset tar shards, streamed ([`ctxalign_data::shards`]).
    Shards(ShardSource),
}

impl From<Vec<CaptionedImage>> for CaptionSource {
    fn from(items: Vec<CaptionedImage>) -> Self {
        Self::Files(items)
    }
}

/// Training data in WebDataset shards and how to stream them.
#[derive(Debug, Clone, Serialize)]
pub struct ShardSource {
    /// The shards, in brace notation: `data/shards-{000000..000127}.tar` (`::` between patterns).
    pub spec: String,
    /// Reader threads per rank.
    pub workers: usize,
    /// Samples in the shuffle buffer.
    pub shuffle_buffer: usize,
    /// Draw shards with replacement, without end (open_clip's `--dataset-resampled`).
    pub resampled: bool,
}

impl ShardSource {
    /// `spec` with 2 reader threads and a shuffle buffer of 1000 samples, without resampling.
    pub fn new(spec: impl Into<String>) -> Self {
        Self { spec: spec.into(), workers: 2, shuffle_buffer: 1000, resampled: false }
    }
}

/// A recipe's training data, ready for the loop.
pub(crate) struct TrainingData<T, L = Skipped> {
    pub loader: Box<dyn BatchSource<Item = T>>,
    /// Samples (or sets) left out as unusable (under [`BadInputPolicy::Skip`]).
    pub left_out: Vec<L>,
    /// What a resume must find again: the items (files) or the shards' sizes, times and counts.
    pub fingerprint: String,
    /// Usable samples (items of the shards).
    pub samples: usize,
}

/// The loader of a captioned-image recipe: `augment` applies to every sample; with
/// `first_caption_only` each image trains with its first caption (else a random one per epoch when
/// augmenting). `text` is the tokenizer the objective will use: the check before the first step
/// cleans and tokenizes every caption with it, under the same bad-input policy as the images.
pub(crate) fn caption_data(
    source: CaptionSource,
    processor: ImageProcessor,
    augment: Option<Augment>,
    first_caption_only: bool,
    batch_size: usize,
    run: &RunControl,
    text: &TextTokenizer,
) -> Result<TrainingData<CaptionSample>> {
    if let Some(replay) = &run.replay {
        return replayed_data(replay);
    }
    match source {
        CaptionSource::Files(items) => {
            let items: Vec<CaptionedImage> = match first_caption_only {
                true => items.iter().map(CaptionedImage::first_caption_only).collect(),
                false => items,
            };
            let fingerprint = caption_items_fingerprint(&items);
            let dataset = CaptionDataset {
                items,
                processor,
                augment,
                decode: DecodeOptions::default(),
                text: Some(text.clone()),
            };
            let (loader, left_out) = batched_loader(dataset, batch_size, run)?;
            Ok(TrainingData { samples: loader.len(), loader: Box::new(loader), left_out, fingerprint })
        }
        CaptionSource::Shards(shards) => {
            // A shard sample's first caption is what it trains on when nothing is drawn.
            let augment = if first_caption_only { None } else { augment };
            let format =
                CaptionShards { processor, augment, decode: DecodeOptions::default(), text: Some(text.clone()) };
            let (loader, left_out) = shard_loader(&shards, format, batch_size, run)?;
            let (fingerprint, samples) = (loader.fingerprint(), loader.index().len());
            Ok(TrainingData { loader: Box::new(loader), left_out, fingerprint, samples })
        }
    }
}

/// What a resume finds again of captioned images read from files: their paths and captions.
pub fn caption_items_fingerprint(items: &[CaptionedImage]) -> String {
    crate::fingerprint(&format!("{items:?}"))
}

/// The micro-batches of a recorded run ([`RunControl::replay`]) as a recipe's training data.
pub(crate) fn replayed_data<T: FromRecord, L>(replay: &Replay) -> Result<TrainingData<T, L>> {
    let loader = replay.loader::<T>()?;
    let samples = loader.batches_per_epoch() * replay_batch_size(replay)?;
    let fingerprint = format!("replay of {}", replay.dir.display());
    Ok(TrainingData { loader: Box::new(loader), left_out: vec![], fingerprint, samples })
}

fn replay_batch_size(replay: &Replay) -> Result<usize> {
    Ok(replay.step_tensor(0, "indices")?.dims1()?)
}

/// A stream over the shards of `source`, scanned before the first step — each rank its share of the
/// shards, the findings exchanged — and split across the ranks ([`ShardLoader`]).
pub(crate) fn shard_loader<F: ShardFormat>(
    source: &ShardSource,
    format: F,
    batch_size: usize,
    run: &RunControl,
) -> Result<(ShardLoader<F>, Vec<Skipped>)> {
    let paths = expand_shards(&source.spec)?;
    let comm = &run.dist;
    let mine = ShardIndex::scan_share(&paths, run.shard(), &format);
    let parts = if comm.is_distributed() {
        let bytes = serde_json::to_vec(&mine).expect("a scan serialises");
        let mut parts = vec![];
        for part in comm.all_gather_bytes(&bytes).map_err(ctxalign_train::TrainError::from)? {
            let part: ScanPart = serde_json::from_slice(&part)
                .map_err(|e| Error::Invalid(format!("another rank's scan of the shards: {e}")))?;
            parts.push(part);
        }
        parts
    } else {
        vec![mine]
    };
    let (index, left_out) = ShardIndex::from_parts(parts, run.bad_input)?;
    let config = ShardLoaderConfig {
        batch_size,
        seed: run.seed,
        shard: run.shard(),
        workers: source.workers.max(1),
        shuffle_buffer: source.shuffle_buffer,
        resampled: source.resampled,
        policy: run.bad_input,
        ..Default::default()
    };
    Ok((ShardLoader::new(index, format, config)?, left_out))
}

/// How a run of the loop ended: what every recipe's report and `training.json` keep of it
/// (flattened into the reports, so their JSON keeps these keys at its top level).
#[derive(Debug, Clone, Serialize)]
pub struct RunOutcome {
    /// Optimizer steps taken in all, resumed ones included.
    pub steps: u64,
    /// Mean of each loss term over the last epoch's (or the run's last) steps.
    pub final_terms: BTreeMap<String, f64>,
    /// Wall-clock seconds of this process's loop (a resumed run's earlier part not included).
    pub seconds: f64,
    /// Training samples per second, over all ranks.
    pub samples_per_second: f64,
    /// Stopped by Ctrl-C; the checkpoint is kept and `--resume` continues it.
    pub interrupted: bool,
    /// The checkpoint the run continued from.
    pub resumed_from: Option<PathBuf>,
    /// Settings that differed from the resumed checkpoint's run, accepted explicitly.
    pub settings_changed_on_resume: Vec<String>,
    /// Ranks that trained (1: one process).
    pub world_size: usize,
    /// Set when the run resumed on another number of ranks with the same global batch: `(was,
    /// now)`; it continued exactly (same batches, same draws).
    pub world_size_changed_on_resume: Option<(usize, usize)>,
    /// Mean seconds per step the ranks spent averaging gradients (0 on one process).
    pub communication_seconds_per_step: f64,
    /// What the user should be told about the run besides its results: a resume that started
    /// fresh, a newest checkpoint that was gone, nothing left to train, a stale lock taken over.
    pub notices: Vec<String>,
}

impl RunOutcome {
    /// With the notice of `lock` (a stale lock it took over), if any.
    pub(crate) fn with_lock_notice(mut self, lock: &Option<Arc<FolderLock>>) -> Self {
        self.notices.extend(lock.as_ref().and_then(|l| l.notice()));
        self
    }
}

impl From<&TrainSummary> for RunOutcome {
    fn from(summary: &TrainSummary) -> Self {
        Self {
            steps: summary.steps,
            final_terms: summary.last_terms.iter().cloned().collect(),
            seconds: summary.seconds,
            samples_per_second: summary.samples_per_second,
            interrupted: summary.interrupted,
            resumed_from: summary.resumed_from.clone(),
            settings_changed_on_resume: summary.settings_changed.clone(),
            world_size: summary.world_size,
            world_size_changed_on_resume: summary.world_size_changed,
            communication_seconds_per_step: summary.communication_seconds_per_step,
            notices: summary.notices.clone(),
        }
    }
}

/// Writes a run's options, device and precision, ranks, and report to `file` (atomically;
/// `training.json` by convention).
pub(crate) fn write_record(
    file: &Path,
    options: &impl Serialize,
    runtime: &Runtime,
    run: &RunControl,
    report: &impl Serialize,
) -> Result<()> {
    let mut runtime = runtime.record();
    runtime["world_size"] = run.dist.world_size().into();
    runtime["communicator"] = run.dist.describe().into();
    let record = serde_json::json!({ "options": options, "runtime": runtime, "report": report });
    write_atomic(file, serde_json::to_string_pretty(&record).expect("JSON").as_bytes())?;
    Ok(())
}

//! The `ctxalign` command line: one [`Command`] per user job, each a clap `Args` struct and a
//! function that parses nothing further and calls the `ctxalign` library. This crate owns the
//! process: the allocator ([`alloc`]), the environment settings ([`process`]), the Ctrl-C handler
//! ([`interrupt`]), exit codes and progress bars; the library has none of them. The `ctxalign` binary
//! runs them; `cargo xtask` keeps its old names for some as aliases; the examples use the same
//! argument structs, so `cargo run --example pretrain -- --steps 3` and `ctxalign pretrain --steps
//! 3` are one program.
//!
//! Defaults never depend on the current folder: data, runs and results default to places under
//! [`ctxalign::home::home_dir`], and the default model is [`ctxalign::home::default_model_dir`].
//!
//! Each job returns `Ok(true)` on success, `Ok(false)` when it ran but its result is a failure,
//! and exits the process with status 130 (`INTERRUPTED_EXIT_CODE`) after a Ctrl-C that left a
//! checkpoint.

use std::path::{Path, PathBuf};

use clap::Subcommand;

pub mod alloc;
pub mod args;
pub mod blip;
pub mod contextblip;
pub mod contextclip;
#[cfg(feature = "train")]
pub mod interrupt;
#[cfg(feature = "train")]
pub mod launch;
pub mod process;
pub mod runtime_args;
pub mod shards;

/// Every user job.
#[derive(Subcommand)]
pub enum Command {
    /// Score one description against images: ITM match probability, ITC similarity, best image.
    Score(blip::ScoreArgs),
    /// Draw ContextBLIP's text-guided mask of one word over an image, and the candidates of a set
    /// with their ITM scores, into one PNG.
    ShowMask(blip::ShowMaskArgs),
    /// Train a BLIP from scratch on captioned images: ITC, then ITC + ITM on hard negatives (the
    /// recipe of the shipped default model).
    #[cfg(feature = "train")]
    TrainBackbone(blip::TrainBackboneArgs),
    /// ContextBLIP S0 pre-training: BLIP frozen; the adapter, TMIM decoder and text adapter learn
    /// from captioned images (`L_itm + L_tmim`).
    #[cfg(feature = "train")]
    Pretrain(contextblip::PretrainArgs),
    /// Zero-shot IMAGECODE: BLIP, then ContextBLIP adapters and CLIP-style dual encoders, on the
    /// valid split (accuracy by category) or the test split (leaderboard submissions).
    ZeroShot(contextblip::ZeroShotArgs),
    /// ContextBLIP S1: fine-tune BLIP + adapter with the candidate head on IMAGECODE's train split.
    #[cfg(feature = "train")]
    FinetuneS1(contextblip::FinetuneS1Args),
    /// ContextBLIP S2: train the inter-context encoder on frozen S1 features.
    #[cfg(feature = "train")]
    FinetuneS2(contextblip::FinetuneS2Args),
    /// ContextBLIP sensitivity sweeps (mask ratio, adapter taps, reduction δ), zero-shot.
    #[cfg(feature = "train")]
    Sweep(contextblip::SweepArgs),
    /// MMVP-VLM pair scoring for BLIP and ContextBLIP models.
    Mmvp(contextblip::MmvpArgs),
    /// Train ContextCLIP (`L_CLIP + α·L_CX`; α = 0 trains the CLIP baseline), then evaluate it.
    #[cfg(feature = "train")]
    TrainContextclip(contextclip::TrainArgs),
    /// ContextCLIP classification: zero-shot (template ensembles), linear probe or fine-tuning, with
    /// CLIP_benchmark's JSON record.
    Classify(contextclip::ClassifyArgs),
    /// Text→image search with a ContextCLIP: index a folder of images once, then query it.
    Retrieve(contextclip::RetrieveArgs),
    /// Write captioned images or an IMAGECODE split as WebDataset tar shards (numbered, each of at
    /// most a count of samples and a size), every input checked first; prints the pattern to train on.
    Shards(shards::ShardsArgs),
}

/// Runs one job.
pub fn run(command: Command) -> anyhow::Result<bool> {
    match command {
        Command::Score(a) => blip::score(a),
        Command::ShowMask(a) => blip::show_mask(a),
        #[cfg(feature = "train")]
        Command::TrainBackbone(a) => blip::train_backbone(a),
        #[cfg(feature = "train")]
        Command::Pretrain(a) => contextblip::pretrain(a),
        Command::ZeroShot(a) => contextblip::zero_shot(a),
        #[cfg(feature = "train")]
        Command::FinetuneS1(a) => contextblip::finetune_s1(a),
        #[cfg(feature = "train")]
        Command::FinetuneS2(a) => contextblip::finetune_s2(a),
        #[cfg(feature = "train")]
        Command::Sweep(a) => contextblip::sweep(a),
        Command::Mmvp(a) => contextblip::mmvp(a),
        #[cfg(feature = "train")]
        Command::TrainContextclip(a) => contextclip::train(a),
        Command::Classify(a) => contextclip::classify(a),
        Command::Retrieve(a) => contextclip::retrieve(a),
        Command::Shards(a) => shards::shards(a),
    }
}

/// How a training run starts and continues: `--seed`, `--resume`, `--overwrite`,
/// `--accept-changed-settings` (every job that trains and can resume).
#[derive(clap::Args, Clone)]
pub struct RunArgs {
    /// Random seed (shuffling, crops, masks, initialisation; the split of data sets without one).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Continue the run in the output folder from its latest checkpoint (the settings must be the
    /// same).
    #[arg(long)]
    pub resume: bool,
    /// Start over in an output folder that holds an earlier run's checkpoints, deleting them.
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// With --resume: continue although settings differ from the checkpoint's run (the differences
    /// are printed and recorded).
    #[arg(long, requires = "resume")]
    pub accept_changed_settings: bool,
}

impl RunArgs {
    /// These switches with the job's bad-input policy, for a recipe's options.
    /// Ctrl-C stops the run after a checkpoint ([`interrupt::ctrl_c`]).
    #[cfg(feature = "train")]
    pub fn control(&self, bad_input: ctxalign::data::loader::BadInputPolicy) -> anyhow::Result<ctxalign::RunControl> {
        Ok(ctxalign::RunControl {
            seed: self.seed,
            bad_input,
            resume: self.resume,
            overwrite: self.overwrite,
            accept_changed_settings: self.accept_changed_settings,
            progress: true,
            interrupt: interrupt::ctrl_c()?,
            ..Default::default()
        })
    }
}

/// Training data in WebDataset shards instead of files (`--shards`, on every job that trains on
/// captioned images or IMAGECODE sets).
#[cfg(feature = "train")]
#[derive(clap::Args, Clone)]
pub struct ShardArgs {
    /// Train on WebDataset tar shards (as `ctxalign shards` writes them), in brace notation:
    /// 'data/shards-{000000..000127}.tar' (`::` between patterns); streamed, each rank and reader
    /// thread its own shards.
    #[arg(long)]
    pub shards: Option<String>,
    /// Reader threads per rank for --shards.
    #[arg(long, default_value_t = 2, value_parser = crate::args::positive_count)]
    pub shard_workers: usize,
    /// Samples in the shuffle buffer of --shards.
    #[arg(long, default_value_t = 1000)]
    pub shuffle_buffer: usize,
    /// Draw the --shards with replacement, without end (open_clip's --dataset-resampled).
    #[arg(long, requires = "shards")]
    pub resampled: bool,
}

#[cfg(feature = "train")]
impl ShardArgs {
    /// The shards to train on, if given.
    pub fn source(&self) -> Option<ctxalign::ShardSource> {
        self.shards.as_ref().map(|spec| ctxalign::ShardSource {
            spec: spec.clone(),
            workers: self.shard_workers,
            shuffle_buffer: self.shuffle_buffer,
            resampled: self.resampled,
        })
    }
}

/// `given`, else the default (a place under ctxalign's home folder).
fn or_default(given: &Option<PathBuf>, default: impl FnOnce() -> ctxalign::Result<PathBuf>) -> anyhow::Result<PathBuf> {
    Ok(match given {
        Some(p) => p.clone(),
        None => default()?,
    })
}

/// The BLIP of `--model` (a folder or hub id), else the default model.
fn blip_files(model: &Option<String>) -> anyhow::Result<ctxalign::models::ModelFiles> {
    Ok(match model {
        Some(spec) => ctxalign::models::ModelSource::parse(spec).resolve()?,
        None => ctxalign::models::ModelFiles::from_dir(&ctxalign::home::default_model_dir()?)?,
    })
}

/// The built-in benchmark under `data_dir` (else the home folder's), generated on first use.
fn builtin_benchmark(data_dir: &Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let dir = or_default(data_dir, ctxalign::home::builtin_data_dir)?;
    Ok(ctxalign::data::vignettes::ensure_benchmark(&ctxalign::data::vignettes::VignettesConfig::default(), &dir)?)
}

/// After an interrupted training run: says where its checkpoint is and how to go on, and exits
/// with status 130.
#[cfg(feature = "train")]
fn exit_interrupted(step: u64, checkpoint: &Path, how_to_continue: &str) -> ! {
    eprintln!("interrupted at step {step}: the checkpoint is in {}; {how_to_continue}", checkpoint.display());
    std::process::exit(interrupt::INTERRUPTED_EXIT_CODE)
}

/// Prints what a run's outcome asks to tell the user (a resume that started fresh, a checkpoint
/// that was gone, nothing left to train, a stale lock taken over), on standard error.
#[cfg(feature = "train")]
fn print_notices(outcome: &ctxalign::RunOutcome) {
    for notice in &outcome.notices {
        eprintln!("note: {notice}");
    }
}

/// The rows a data-parallel run adds to a job's results table: ranks, time spent averaging
/// gradients, and a resume on another number of ranks.
#[cfg(feature = "train")]
fn ranks_rows(table: &mut ctxalign::eval::Table, outcome: &ctxalign::RunOutcome) {
    if outcome.world_size > 1 {
        table.row(["ranks".to_string(), outcome.world_size.to_string()]);
        table.row([
            "gradient averaging".to_string(),
            format!("{:.1} ms per step", 1000.0 * outcome.communication_seconds_per_step),
        ]);
    }
    if let Some((was, now)) = outcome.world_size_changed_on_resume {
        table.row(["resumed on".to_string(), format!("{now} ranks (was {was}; same global batch)")]);
    }
}

/// Writes a results JSON atomically and says where.
fn write_json(path: &Path, value: &serde_json::Value) -> anyhow::Result<()> {
    ctxalign::data::write_atomic(path, serde_json::to_string_pretty(value)?.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        command: super::Command,
    }

    /// Every option and argument of every subcommand says what it is in `--help`.
    #[test]
    fn every_option_has_help_text() {
        let out = crate::args::options_without_help(&Cli::command());
        assert!(out.is_empty(), "options without help text: {out:#?}");
    }

    /// Step counts are `--steps` (and epochs `--epochs`) wherever a job has them; a job of several
    /// stages names the others' (`train-backbone --itc-steps`, `--contrast-steps`).
    #[test]
    fn step_options_have_one_name() {
        let cmd = Cli::command();
        for sub in cmd.get_subcommands() {
            for arg in sub.get_arguments() {
                let long = arg.get_long().unwrap_or_default();
                assert!(
                    !long.contains("step") || ["steps", "warmup-steps", "itc-steps", "contrast-steps"].contains(&long),
                    "{} --{long}: step counts are --steps",
                    sub.get_name()
                );
            }
        }
    }
}

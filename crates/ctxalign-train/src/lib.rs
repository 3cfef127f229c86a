//! Training machinery for ctxalign.
//!
//! Candle's own optimizers have one learning rate and private state; this crate adds what training
//! runs need (see docs/reference-notes.md §5–6):
//! - [`optim`]: Adam/AdamW with parameter groups, exact state save/restore, gradient clipping and
//!   accumulation;
//! - [`schedule`]: warm-up, cosine/linear/per-epoch decay, reduce-on-plateau;
//! - [`params`]: building a model whose trainable parameters are `Var`s and whose frozen ones are
//!   plain tensors, with seeded per-name initialisation;
//! - [`precision`]: f32 or bf16 mixed precision (f32 master weights and optimizer state);
//! - [`checkpoint`]: atomic checkpoints (model, optimizer, schedule, seed, data position), keep-last-N;
//! - [`metrics`]: JSONL metrics and loss-curve PNGs;
//! - [`dist`]: data-parallel training: the communicator (NCCL or in-process threads), the launch
//!   environment, gradient buckets, gathers with a backward;
//! - [`trainer`]: the loop (progress bar, NaN/Inf guard, Ctrl-C → checkpoint, exact resume);
//! - [`replay`]: a reference run's batches and random draws, replayed through the loop (step
//!   fixtures);
//! - [`blip`]: BLIP's retrieval objective (ITC + ITM on hard negatives);
//! - [`contextblip`]: ContextBLIP's S0 pre-training, S1 and S2 fine-tuning objectives;
//! - [`contextclip`]: ContextCLIP's `L_CLIP + α·L_CX` and classification fine-tuning.

pub mod blip;
pub mod checkpoint;
pub mod contextblip;
pub mod contextclip;
pub mod dist;
pub mod draws;
pub mod error;
pub mod interrupt;
pub mod metrics;
pub mod optim;
pub mod params;
pub mod precision;
pub mod replay;
pub mod schedule;
pub mod trainer;

pub use checkpoint::{Checkpoint, Checkpointer, TrainerState};
pub use dist::{Communicator, DistEnv, DistError, ReduceOp};
pub use draws::{Purpose, SampleDraws};
pub use error::{Result, TrainError};
pub use interrupt::Interrupt;
pub use optim::{
    check_group_specs, clip_grad_norm, group_params, Adam, AdamConfig, GradAccumulator, GroupSpec, ParamGroup,
};
pub use params::{build_for_training, transformer_init, Init, ParamSource, TrainableParams};
pub use precision::Precision;
pub use replay::{FromRecord, RecordedBatches, Replay};
pub use schedule::{Decay, Plateau, Schedule, ScheduleConfig};
pub use trainer::{train, LossTerms, Objective, TrainConfig, TrainSummary};

//! `--device`, `--dtype`, `--precision` and the data-parallel options, as clap arguments over the
//! library's [`DeviceSpec`], [`Precision`] and [`parse_dtype`].

use candle_core::{DType, Device};
use ctxalign::device::{parse_dtype, DeviceSpec, Precision};
use ctxalign::Result;

/// `--device` and `--dtype` of an inference command.
#[derive(Debug, Clone, clap::Args)]
pub struct InferenceArgs {
    /// Device: cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu", value_parser = clap::value_parser!(DeviceSpec))]
    pub device: DeviceSpec,
    /// Weight and activation dtype: f32, bf16 or f16 (softmax and LayerNorm statistics stay f32).
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    pub dtype: DType,
}

impl InferenceArgs {
    pub fn open(&self) -> Result<Device> {
        self.device.open()
    }
}

/// `--device`, `--precision` and the data-parallel options of a training command.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainingArgs {
    /// Device: cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`). In a data-parallel
    /// run, `cuda` is each rank's own GPU (cuda:LOCAL_RANK) and `cuda:N` puts every rank on GPU N.
    #[arg(long, default_value = "cpu", value_parser = clap::value_parser!(DeviceSpec))]
    pub device: DeviceSpec,
    /// Training precision: f32, or bf16 mixed precision (bf16 compute, f32 master weights,
    /// optimizer state and reductions).
    #[arg(long, default_value = "f32", value_parser = clap::value_parser!(Precision))]
    pub precision: Precision,
    /// Data-parallel ranks to start on this machine: one process per GPU with NCCL (`--device
    /// cuda`; a build with `--features nccl`), or threads sharing memory on the CPU. --batch-size is
    /// per rank. Under torchrun or SLURM (WORLD_SIZE / SLURM_NTASKS set) leave it out: their ranks
    /// are used.
    #[arg(long, value_parser = crate::args::positive_count)]
    pub nproc_per_node: Option<usize>,
    /// Seconds a rank waits for the others (at start-up and in every collective) before it ends
    /// the run with an error naming the ranks it waited for.
    #[arg(long, default_value_t = 600, value_parser = crate::args::positive_seconds)]
    pub dist_timeout: u64,
}

impl TrainingArgs {
    pub fn open(&self) -> Result<Device> {
        self.device.open()
    }
}

//! Data-parallel training (DDP): a [`Communicator`] over the ranks of one run, and what the training
//! loop builds on it.
//!
//! Two backends:
//! - **NCCL** (feature `nccl`) for CUDA devices, one process per GPU, through cudarc's bindings —
//!   the engine PyTorch's DDP uses. The ranks meet at `MASTER_ADDR:MASTER_PORT` (torchrun's or
//!   SLURM's environment, [`DistEnv`]), where rank 0 hands out NCCL's unique id over TCP
//!   ([`rendezvous`]).
//! - **In-process** ([`Communicator::in_process`]): one thread per rank, sharing memory. For CPU
//!   users, and so that every distributed code path runs in the tests on machines without a GPU.
//!
//! Collectives: all-reduce (sum, mean, max), broadcast, all-gather, all-gather with a backward
//! ([`Communicator::all_gather_with_grad`], open_clip's `gather_with_grad`), barrier. Every one has
//! a timeout: a rank that died or hangs ends the others with [`DistError::Timeout`] or
//! [`DistError::PeerFailed`], never a hang.
//!
//! On top of them: [`GradientBuckets`] (gradients averaged in flat buffers, not one call per
//! tensor) and the host-side helpers the loop uses to keep every rank's decisions equal
//! ([`Communicator::all_reduce_f64`], [`Communicator::broadcast_bytes`]).
//!
//! Every rank must call the same collectives in the same order with the same shapes — the
//! training loop and the objectives take one code path on all ranks. The in-process backend checks
//! this and says which rank differed; NCCL cannot, so [`Communicator::all_gather`] exchanges shapes
//! first.

mod buckets;
mod env;
mod gather;
#[cfg(feature = "nccl")]
mod nccl;
pub mod rendezvous;
mod threads;

use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};

pub use buckets::GradientBuckets;
pub use env::{DistEnv, EnvSource};
pub use threads::run_in_process;

/// The time a collective waits for the other ranks by default (torch's `init_process_group`
/// default is 30 minutes; a training step of ours is seconds).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// DDP's default bucket size (`bucket_cap_mb=25`).
pub const DEFAULT_BUCKET_BYTES: usize = 25 << 20;

/// How an all-reduce combines the ranks' tensors (element-wise).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Sum,
    /// The sum divided by the world size.
    Mean,
    Max,
}

/// What goes wrong between ranks.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error(
        "rank {rank}: {op} timed out after {seconds:.0} s waiting for rank(s) {missing:?} (a rank that \
         died, hangs, or runs another code path); raise the timeout if the ranks are only slow"
    )]
    Timeout { rank: usize, op: String, seconds: f64, missing: Vec<usize> },
    #[error("rank {rank}: rank {failed} stopped ({reason}); this rank stops too")]
    PeerFailed { rank: usize, failed: usize, reason: String },
    /// The ranks called different collectives, or gave tensors of different shapes or dtypes.
    #[error("rank {rank}: {op}: the ranks disagree: {message}")]
    Mismatch { rank: usize, op: String, message: String },
    #[error("NCCL: {0}")]
    Nccl(String),
    #[error("rendezvous at {address}: {message}")]
    Rendezvous { address: String, message: String },
    /// The launch environment is incomplete or contradictory (torchrun's or SLURM's variables).
    #[error("{0}")]
    Environment(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, DistError>;

/// One backend's collectives; [`Communicator`] adds the checks and helpers common to all.
pub(crate) trait Backend: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    fn name(&self) -> &'static str;
    /// What else identifies the backend in a run's record (NCCL's version).
    fn detail(&self) -> Option<String> {
        None
    }
    /// Where the host-side helpers place their small tensors.
    fn device(&self) -> Device;
    /// `input` is contiguous; the result is a new tensor of the same shape and dtype.
    fn all_reduce(&self, input: &Tensor, op: ReduceOp) -> Result<Tensor>;
    /// `input` is contiguous and of the same shape on every rank; the root's values for all.
    fn broadcast(&self, input: &Tensor, root: usize) -> Result<Tensor>;
    /// `input` is contiguous and of the same shape on every rank; the ranks' tensors concatenated
    /// along dimension 0 in rank order.
    fn all_gather(&self, input: &Tensor) -> Result<Tensor>;
    /// Tells the other ranks this one stops, so that they end at once instead of at their timeout.
    fn abort(&self, reason: &str);
    /// An error when an earlier collective failed after it was started (NCCL runs them
    /// asynchronously: its watchdog aborts one that outlives the timeout). The host helpers call it
    /// after reading their result, so a failure surfaces there at the latest.
    fn health(&self) -> Result<()> {
        Ok(())
    }
}

/// The ranks of one data-parallel run, seen from one of them. Cloning shares the connection.
/// [`Communicator::single`] (the default) is a world of one, where every collective returns its
/// input and costs nothing: recipes take a communicator whether or not they run distributed.
#[derive(Clone)]
pub struct Communicator(Arc<dyn Backend>);

impl std::fmt::Debug for Communicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Communicator({} rank {} of {})", self.0.name(), self.rank(), self.world_size())
    }
}

impl Default for Communicator {
    fn default() -> Self {
        Self::single()
    }
}

/// The world of one process.
struct Single;

impl Backend for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn name(&self) -> &'static str {
        "single"
    }
    fn device(&self) -> Device {
        // A single process exchanges nothing (collectives return their input as is), so its
        // helpers' small tensors stay on the host whatever the model's device.
        Device::Cpu
    }
    fn all_reduce(&self, input: &Tensor, _op: ReduceOp) -> Result<Tensor> {
        Ok(input.clone())
    }
    fn broadcast(&self, input: &Tensor, _root: usize) -> Result<Tensor> {
        Ok(input.clone())
    }
    fn all_gather(&self, input: &Tensor) -> Result<Tensor> {
        Ok(input.clone())
    }
    fn abort(&self, _reason: &str) {}
}

impl Communicator {
    /// A world of one: no other rank, every collective the identity.
    pub fn single() -> Self {
        Self(Arc::new(Single))
    }

    /// `world_size` ranks in this process, one per thread (give communicator r to the thread of
    /// rank r). Tensors on any device are exchanged through host memory. [`run_in_process`] starts
    /// the threads and ends the group when one fails.
    pub fn in_process(world_size: usize, timeout: Duration) -> Vec<Communicator> {
        threads::group(world_size, timeout).into_iter().map(|b| Self(Arc::new(b))).collect()
    }

    /// This process's rank of an NCCL run described by `env` (torchrun's or SLURM's variables) on
    /// `device`, a CUDA device: rank 0 creates NCCL's unique id and hands it to the others over TCP
    /// ([`rendezvous`]), then every rank joins the communicator. Waits at most `timeout` for the
    /// others to arrive.
    #[cfg(feature = "nccl")]
    pub fn nccl(env: &DistEnv, device: &Device, timeout: Duration) -> Result<Self> {
        Ok(Self(Arc::new(nccl::NcclBackend::join(env, device, timeout)?)))
    }

    pub fn rank(&self) -> usize {
        self.0.rank()
    }

    pub fn world_size(&self) -> usize {
        self.0.world_size()
    }

    /// Rank 0: the one that writes checkpoints, metrics, plots and exports.
    pub fn is_primary(&self) -> bool {
        self.rank() == 0
    }

    /// More than one rank.
    pub fn is_distributed(&self) -> bool {
        self.world_size() > 1
    }

    /// `single`, `in-process` or `nccl`.
    pub fn backend(&self) -> &'static str {
        self.0.name()
    }

    /// The backend and its version, for records: `nccl (NCCL 2.30.5)`, `in-process`, `single`.
    pub fn describe(&self) -> String {
        match self.0.detail() {
            Some(d) => format!("{} ({d})", self.0.name()),
            None => self.0.name().to_string(),
        }
    }

    /// Element-wise `op` over the ranks' `t` (same shape and dtype on every rank). Half-precision
    /// tensors are reduced in f32 and returned in their dtype.
    pub fn all_reduce(&self, t: &Tensor, op: ReduceOp) -> Result<Tensor> {
        if !self.is_distributed() {
            return Ok(t.clone());
        }
        let dtype = t.dtype();
        let wide = match dtype {
            DType::BF16 | DType::F16 => t.to_dtype(DType::F32)?,
            _ => t.contiguous()?,
        };
        Ok(self.0.all_reduce(&wide.contiguous()?, op)?.to_dtype(dtype)?)
    }

    /// Rank `root`'s `t` on every rank (same shape and dtype on every rank).
    pub fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        if !self.is_distributed() {
            return Ok(t.clone());
        }
        self.check_root(root, "broadcast")?;
        self.0.broadcast(&t.contiguous()?, root)
    }

    /// The ranks' `t` concatenated along dimension 0, in rank order. The shapes must agree except
    /// in dimension 0, which must agree too (pad first where it may differ); a difference is a
    /// [`DistError::Mismatch`] naming both shapes.
    pub fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        if !self.is_distributed() {
            return Ok(t.clone());
        }
        self.check_same_shape(t, "all_gather")?;
        self.0.all_gather(&t.contiguous()?)
    }

    /// [`Communicator::all_gather`] whose backward returns to each rank its share of the gathered
    /// tensor's gradient, summed over the ranks (a reduce-scatter, as `torch.distributed.nn.
    /// all_gather` and BLIP's `all_gather_with_grad`). With the loop's gradient mean over ranks, a
    /// loss computed from gathered features trains exactly as the same loss on one process holding
    /// the whole batch.
    pub fn all_gather_with_grad(&self, t: &Tensor) -> Result<Tensor> {
        if !self.is_distributed() {
            return Ok(t.clone());
        }
        gather::all_gather_with_grad(self, t)
    }

    /// Waits until every rank has arrived.
    pub fn barrier(&self) -> Result<()> {
        if self.is_distributed() {
            let one = Tensor::ones(1, DType::F32, &self.0.device())?;
            // Reading the sum waits for it (NCCL's collectives are asynchronous).
            self.0.all_reduce(&one, ReduceOp::Sum)?.to_vec1::<f32>()?;
            self.0.health()?;
        }
        Ok(())
    }

    /// Tells the other ranks that this one stops (with why), so that they end at once with
    /// [`DistError::PeerFailed`] (in-process) or at their next collective (NCCL) instead of
    /// waiting for their timeout.
    pub fn abort(&self, reason: &str) {
        self.0.abort(reason)
    }

    /// Element-wise `op` of small host vectors (the loop's per-step agreement: loss terms, flags).
    pub fn all_reduce_f64(&self, values: &[f64], op: ReduceOp) -> Result<Vec<f64>> {
        if !self.is_distributed() || values.is_empty() {
            return Ok(values.to_vec());
        }
        let t = Tensor::new(values, &self.0.device())?;
        let out = self.0.all_reduce(&t, op)?.to_vec1::<f64>()?;
        self.0.health()?;
        Ok(out)
    }

    /// Every rank's `values` (the same count on every rank: it is not checked), in rank order.
    pub fn all_gather_f64(&self, values: &[f64]) -> Result<Vec<Vec<f64>>> {
        if !self.is_distributed() {
            return Ok(vec![values.to_vec()]);
        }
        let t = Tensor::new(values, &self.0.device())?;
        let gathered: Vec<f64> = self.0.all_gather(&t)?.to_vec1()?;
        self.0.health()?;
        Ok(gathered.chunks(values.len().max(1)).map(<[f64]>::to_vec).collect())
    }

    /// Every rank's `values`, in rank order. The count must be the same on every rank (it is not
    /// checked: callers send fixed-size records).
    pub fn all_gather_u64(&self, values: &[u64]) -> Result<Vec<Vec<u64>>> {
        if !self.is_distributed() {
            return Ok(vec![values.to_vec()]);
        }
        let as_i64: Vec<i64> = values.iter().map(|&v| v as i64).collect();
        let t = Tensor::from_vec(as_i64, values.len(), &self.0.device())?;
        // The backend directly: `all_gather` checks shapes through this function.
        let gathered: Vec<i64> = self.0.all_gather(&t)?.to_vec1()?;
        self.0.health()?;
        Ok(gathered.chunks(values.len().max(1)).map(|c| c.iter().map(|&v| v as u64).collect()).collect())
    }

    /// Rank `root`'s bytes on every rank (`bytes` is read on the root only; any length).
    pub fn broadcast_bytes(&self, bytes: &[u8], root: usize) -> Result<Vec<u8>> {
        if !self.is_distributed() {
            return Ok(bytes.to_vec());
        }
        self.check_root(root, "broadcast_bytes")?;
        let device = self.0.device();
        let len = Tensor::new(&[bytes.len() as i64], &device)?;
        let len = self.0.broadcast(&len, root)?.to_vec1::<i64>()?[0] as usize;
        if len == 0 {
            return Ok(vec![]);
        }
        let mine = if self.rank() == root { bytes.to_vec() } else { vec![0u8; len] };
        let t = Tensor::from_vec(mine, len, &device)?;
        let out = self.0.broadcast(&t, root)?.to_vec1::<u8>()?;
        self.0.health()?;
        Ok(out)
    }

    /// Every rank's bytes (any length each), in rank order.
    pub fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        if !self.is_distributed() {
            return Ok(vec![bytes.to_vec()]);
        }
        let lengths: Vec<usize> = self.all_gather_u64(&[bytes.len() as u64])?.iter().map(|l| l[0] as usize).collect();
        let longest = lengths.iter().copied().max().unwrap_or(0).max(1);
        let mut padded = bytes.to_vec();
        padded.resize(longest, 0);
        let t = Tensor::from_vec(padded, longest, &self.0.device())?;
        let all: Vec<u8> = self.0.all_gather(&t)?.to_vec1()?;
        self.0.health()?;
        Ok(all.chunks(longest).zip(&lengths).map(|(c, &n)| c[..n].to_vec()).collect())
    }

    fn check_root(&self, root: usize, op: &str) -> Result<()> {
        if root >= self.world_size() {
            return Err(DistError::Mismatch {
                rank: self.rank(),
                op: op.into(),
                message: format!("root {root} is not a rank of a world of {}", self.world_size()),
            });
        }
        Ok(())
    }

    /// NCCL would read past a shorter buffer: every rank's shape and dtype are compared first (the
    /// in-process backend compares what it receives anyway).
    fn check_same_shape(&self, t: &Tensor, op: &str) -> Result<()> {
        let mut desc: Vec<u64> = vec![t.dtype() as u64, t.rank() as u64];
        desc.extend(t.dims().iter().map(|&d| d as u64));
        desc.resize(10, u64::MAX);
        let all = self.all_gather_u64(&desc)?;
        if let Some((other, theirs)) = all.iter().enumerate().find(|(_, d)| **d != desc) {
            let show = |d: &[u64]| {
                let rank = d[1] as usize;
                format!("{:?} of {:?}", &d[2..2 + rank.min(8)], dtype_name(d[0]))
            };
            return Err(DistError::Mismatch {
                rank: self.rank(),
                op: op.into(),
                message: format!("rank {} has {}, rank {other} has {}", self.rank(), show(&desc), show(theirs)),
            });
        }
        Ok(())
    }
}

fn dtype_name(code: u64) -> String {
    [DType::U8, DType::U32, DType::I64, DType::BF16, DType::F16, DType::F32, DType::F64]
        .into_iter()
        .find(|d| *d as u64 == code)
        .map_or_else(|| format!("dtype #{code}"), |d| format!("{d:?}"))
}

/// Every rank's trainable parameters (and their f32 masters) set to rank 0's, as DDP does at
/// construction: the ranks start from one model whatever each built.
pub fn broadcast_parameters(comm: &Communicator, params: &crate::TrainableParams) -> Result<()> {
    if !comm.is_distributed() {
        return Ok(());
    }
    for var in params.vars.values().chain(params.masters.values()) {
        let value = comm.broadcast(var.as_tensor(), 0)?;
        if !comm.is_primary() {
            var.set(&value)?;
        }
    }
    Ok(())
}

impl From<DistError> for candle_core::Error {
    fn from(e: DistError) -> Self {
        candle_core::Error::wrap(e)
    }
}

//! The in-process backend: one thread per rank, exchanging tensors through shared host memory.
//!
//! Each collective is a numbered round (every rank counts its own calls, so round k of rank 0 meets
//! round k of rank 1). A rank leaves its tensor in the round; the last to arrive combines them in
//! rank order (so sums are bit-for-bit the same on every rank and every run) and wakes the others.
//! A rank that waits longer than the timeout, or learns that another rank stopped
//! ([`Backend::abort`]), returns an error and marks the group failed, so that nobody waits for a
//! dead rank.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::{Backend, Communicator, DistError, ReduceOp, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    AllReduce(ReduceOp),
    Broadcast(usize),
    AllGather,
}

impl Op {
    fn name(&self) -> String {
        match self {
            Op::AllReduce(op) => format!("all_reduce({op:?})"),
            Op::Broadcast(root) => format!("broadcast(root {root})"),
            Op::AllGather => "all_gather".into(),
        }
    }
}

struct Round {
    op: Op,
    inputs: Vec<Option<Tensor>>,
    arrived: usize,
    /// The combined result (every rank receives the same tensor: nothing writes into it), or why
    /// the inputs could not be combined.
    output: Option<std::result::Result<Tensor, String>>,
    taken: usize,
}

#[derive(Default)]
struct State {
    rounds: HashMap<u64, Round>,
    /// The first rank that stopped, and why.
    failed: Option<(usize, String)>,
}

struct Group {
    world: usize,
    timeout: Duration,
    state: Mutex<State>,
    changed: Condvar,
}

impl Group {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A rank that panicked while holding the lock leaves the state as it was: keep using it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(super) struct ThreadBackend {
    rank: usize,
    group: Arc<Group>,
    calls: AtomicU64,
}

pub(super) fn group(world: usize, timeout: Duration) -> Vec<ThreadBackend> {
    let group = Arc::new(Group { world: world.max(1), timeout, state: Mutex::default(), changed: Condvar::new() });
    (0..world.max(1)).map(|rank| ThreadBackend { rank, group: group.clone(), calls: AtomicU64::new(0) }).collect()
}

/// Combines the ranks' inputs of one round, in rank order.
fn combine(op: Op, inputs: &[Tensor]) -> std::result::Result<Tensor, String> {
    let first = &inputs[0];
    let differs = |i: usize, t: &Tensor| {
        format!("rank {i} gave {:?} {:?}, rank 0 gave {:?} {:?}", t.dims(), t.dtype(), first.dims(), first.dtype())
    };
    for (i, t) in inputs.iter().enumerate().skip(1) {
        let same = match op {
            Op::AllGather => t.dtype() == first.dtype() && t.dims() == first.dims(),
            _ => t.dtype() == first.dtype() && t.shape() == first.shape(),
        };
        if !same {
            return Err(differs(i, t));
        }
    }
    let result = match op {
        Op::Broadcast(root) => Ok(inputs[root].clone()),
        Op::AllGather => Tensor::cat(inputs, 0),
        Op::AllReduce(reduce) => match first.dtype() {
            DType::F32 => reduce_slices::<f32>(inputs, reduce),
            DType::F64 => reduce_slices::<f64>(inputs, reduce),
            // The communicator lifts half precision to f32 first; other dtypes through Candle.
            _ => {
                let mut acc = first.copy().map_err(|e| e.to_string())?;
                for t in &inputs[1..] {
                    acc = match reduce {
                        ReduceOp::Sum | ReduceOp::Mean => (acc + t).map_err(|e| e.to_string())?,
                        ReduceOp::Max => acc.maximum(t).map_err(|e| e.to_string())?,
                    };
                }
                match reduce {
                    ReduceOp::Mean => acc / inputs.len() as f64,
                    _ => Ok(acc),
                }
            }
        },
    };
    result.map_err(|e| e.to_string())
}

/// One pass over the ranks' buffers (contiguous host tensors), in parallel chunks, each element
/// combined in rank order: the gradient average of every step goes through here.
fn reduce_slices<T>(inputs: &[Tensor], op: ReduceOp) -> candle_core::Result<Tensor>
where
    T: candle_core::WithDType + num_traits::Float + Send + Sync,
{
    let guards: Vec<_> = inputs.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices: Vec<&[T]> = Vec::with_capacity(inputs.len());
    for (storage, layout) in &guards {
        let storage: &candle_core::Storage = storage;
        let candle_core::Storage::Cpu(cpu) = storage else {
            candle_core::bail!("in-process all-reduce: a tensor off the host")
        };
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("in-process all-reduce: a non-contiguous tensor".into()))?;
        slices.push(&cpu.as_slice::<T>()?[start..end]);
    }
    let n = slices[0].len();
    let ranks = T::from(inputs.len()).expect("a small count");
    let mut out = vec![T::zero(); n];
    out.par_chunks_mut(1 << 16).enumerate().for_each(|(c, chunk)| {
        let offset = c << 16;
        for (i, o) in chunk.iter_mut().enumerate() {
            let j = offset + i;
            let mut acc = slices[0][j];
            for s in &slices[1..] {
                acc = match op {
                    ReduceOp::Max => num_traits::Float::max(acc, s[j]),
                    _ => acc + s[j],
                };
            }
            *o = if op == ReduceOp::Mean { acc / ranks } else { acc };
        }
    });
    // The in-process backend's ranks are threads of one CPU process: their tensors live on the CPU.
    Tensor::from_vec(out, inputs[0].shape(), &Device::Cpu)
}

impl ThreadBackend {
    fn collective(&self, op: Op, input: &Tensor) -> Result<Tensor> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        let device = input.device().clone();
        // The root's tensor is copied: it may belong to a parameter its rank updates in place before
        // the others have read it.
        let host = match op {
            Op::Broadcast(root) if root == self.rank => input.to_device(&Device::Cpu)?.copy()?,
            _ => input.to_device(&Device::Cpu)?,
        };
        let group = &self.group;
        let mut state = group.lock();
        if let Some((failed, reason)) = &state.failed {
            return Err(DistError::PeerFailed { rank: self.rank, failed: *failed, reason: reason.clone() });
        }
        let round = state.rounds.entry(call).or_insert_with(|| Round {
            op,
            inputs: vec![None; group.world],
            arrived: 0,
            output: None,
            taken: 0,
        });
        if round.op != op {
            let message = format!(
                "collective #{call}: rank {} called {}, another rank {}",
                self.rank,
                op.name(),
                round.op.name()
            );
            let err = DistError::Mismatch { rank: self.rank, op: op.name(), message: message.clone() };
            state.failed = Some((self.rank, message));
            group.changed.notify_all();
            return Err(err);
        }
        round.inputs[self.rank] = Some(host);
        round.arrived += 1;
        if round.arrived == group.world {
            let inputs: Vec<Tensor> = round.inputs.iter_mut().map(|t| t.take().expect("every rank arrived")).collect();
            round.output = Some(combine(op, &inputs));
            group.changed.notify_all();
        }
        let deadline = Instant::now() + group.timeout;
        loop {
            let round = state.rounds.get_mut(&call).expect("a round stays until every rank took its output");
            if let Some(output) = &round.output {
                let output = output.clone();
                round.taken += 1;
                if round.taken == group.world {
                    state.rounds.remove(&call);
                }
                drop(state);
                return match output {
                    Ok(t) => Ok(t.to_device(&device)?),
                    Err(message) => Err(DistError::Mismatch { rank: self.rank, op: op.name(), message }),
                };
            }
            let missing: Vec<usize> = (0..group.world).filter(|&r| round.inputs[r].is_none()).collect();
            if let Some((failed, reason)) = &state.failed {
                return Err(DistError::PeerFailed { rank: self.rank, failed: *failed, reason: reason.clone() });
            }
            let now = Instant::now();
            if now >= deadline {
                let err = DistError::Timeout {
                    rank: self.rank,
                    op: format!("{} #{call}", op.name()),
                    seconds: group.timeout.as_secs_f64(),
                    missing,
                };
                state.failed = Some((self.rank, err.to_string()));
                group.changed.notify_all();
                return Err(err);
            }
            state = group.changed.wait_timeout(state, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

impl Backend for ThreadBackend {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.group.world
    }
    fn name(&self) -> &'static str {
        "in-process"
    }
    fn device(&self) -> Device {
        // The in-process backend serves ranks that are CPU threads (NCCL serves the GPU ones).
        Device::Cpu
    }
    fn all_reduce(&self, input: &Tensor, op: ReduceOp) -> Result<Tensor> {
        self.collective(Op::AllReduce(op), input)
    }
    fn broadcast(&self, input: &Tensor, root: usize) -> Result<Tensor> {
        self.collective(Op::Broadcast(root), input)
    }
    fn all_gather(&self, input: &Tensor) -> Result<Tensor> {
        self.collective(Op::AllGather, input)
    }
    fn abort(&self, reason: &str) {
        let mut state = self.group.lock();
        if state.failed.is_none() {
            state.failed = Some((self.rank, reason.to_string()));
        }
        self.group.changed.notify_all();
    }
}

/// What the ranks of [`run_in_process`] returned, in rank order.
#[derive(Debug)]
pub struct InProcessRun<T, E> {
    pub results: Vec<std::result::Result<T, E>>,
    /// The rank that stopped first (its error is the cause; the others' follow from it).
    pub first_failed: Option<usize>,
}

impl<T, E> InProcessRun<T, E> {
    /// Every rank's value, or the error of the rank that failed first.
    pub fn into_result(self) -> std::result::Result<Vec<T>, E> {
        let first = self.first_failed;
        let mut values = Vec::with_capacity(self.results.len());
        let mut errors: Vec<(usize, E)> = vec![];
        for (rank, r) in self.results.into_iter().enumerate() {
            match r {
                Ok(v) => values.push(v),
                Err(e) => errors.push((rank, e)),
            }
        }
        if errors.is_empty() {
            return Ok(values);
        }
        let pick = errors.iter().position(|(rank, _)| Some(*rank) == first).unwrap_or(0);
        Err(errors.swap_remove(pick).1)
    }
}

/// Runs `job` on `world_size` threads, one rank each, with in-process communicators. A rank whose
/// job fails (an error or a panic) aborts the group, so the others end at their next collective
/// instead of at the timeout; a panic is re-raised once every thread has ended.
pub fn run_in_process<T, E, F>(world_size: usize, timeout: Duration, job: F) -> InProcessRun<T, E>
where
    T: Send,
    E: Send + std::fmt::Display,
    F: Fn(Communicator) -> std::result::Result<T, E> + Sync,
{
    let backends = group(world_size, timeout);
    let group = backends[0].group.clone();
    let comms: Vec<Communicator> = backends.into_iter().map(|b| Communicator(Arc::new(b))).collect();
    let outcomes: Vec<std::thread::Result<std::result::Result<T, E>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                let job = &job;
                std::thread::Builder::new()
                    .name(format!("rank-{}", comm.rank()))
                    .spawn_scoped(scope, move || {
                        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(comm.clone())));
                        match &outcome {
                            Ok(Ok(_)) => {}
                            Ok(Err(e)) => comm.abort(&e.to_string()),
                            Err(_) => comm.abort("panicked"),
                        }
                        outcome
                    })
                    .expect("a thread starts")
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("the rank's panic is caught inside")).collect()
    });
    let mut results = Vec::with_capacity(outcomes.len());
    for outcome in outcomes {
        match outcome {
            Ok(r) => results.push(r),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
    // The group keeps the first rank that stopped (an error, a timeout, a disagreement).
    let first_failed = group.lock().failed.as_ref().map(|(rank, _)| *rank);
    InProcessRun { results, first_failed }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn run<T: Send>(world: usize, job: impl Fn(Communicator) -> Result<T> + Sync) -> Vec<T> {
        run_in_process(world, Duration::from_secs(20), job).into_result().unwrap()
    }

    #[test]
    fn collectives_combine_in_rank_order() {
        for world in [1, 2, 3] {
            let out = run(world, |comm| {
                let r = comm.rank() as f32;
                let t = Tensor::new(&[r, 10.0 + r], &Device::Cpu)?;
                let sum = comm.all_reduce(&t, ReduceOp::Sum)?.to_vec1::<f32>()?;
                let mean = comm.all_reduce(&t, ReduceOp::Mean)?.to_vec1::<f32>()?;
                let max = comm.all_reduce(&t, ReduceOp::Max)?.to_vec1::<f32>()?;
                let root = world - 1;
                let bcast = comm.broadcast(&t, root)?.to_vec1::<f32>()?;
                let gathered = comm.all_gather(&t.unsqueeze(0)?)?.to_vec2::<f32>()?;
                let bytes = comm.broadcast_bytes(format!("from {}", comm.rank()).as_bytes(), 0)?;
                let all_bytes = comm.all_gather_bytes(&vec![comm.rank() as u8; comm.rank() + 1])?;
                comm.barrier()?;
                Ok((sum, mean, max, bcast, gathered, bytes, all_bytes))
            });
            let w = world as f32;
            let total: f32 = (0..world).map(|r| r as f32).sum();
            for (sum, mean, max, bcast, gathered, bytes, all_bytes) in out {
                assert_eq!(sum, vec![total, 10.0 * w + total]);
                assert_eq!(mean, vec![total / w, (10.0 * w + total) / w]);
                assert_eq!(max, vec![w - 1.0, 10.0 + w - 1.0]);
                assert_eq!(bcast, vec![w - 1.0, 10.0 + w - 1.0]);
                assert_eq!(gathered, (0..world).map(|r| vec![r as f32, 10.0 + r as f32]).collect::<Vec<_>>());
                assert_eq!(bytes, b"from 0");
                assert_eq!(all_bytes, (0..world).map(|r| vec![r as u8; r + 1]).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn half_precision_is_reduced_in_f32() {
        let out = run(3, |comm| {
            // 1 + 2⁻⁸ + 2⁻⁸ is 1 + 2⁻⁷ (a bf16 value) in f32, but 1 when bf16 adds pairwise (each
            // 2⁻⁸ is half an ulp of bf16 at 1, rounded away to even).
            let v = if comm.rank() == 0 { 1.0f32 } else { 1.0 / 256.0 };
            let t = Tensor::new(&[v], &Device::Cpu)?.to_dtype(DType::BF16)?;
            Ok(comm.all_reduce(&t, ReduceOp::Sum)?.to_dtype(DType::F32)?.to_vec1::<f32>()?[0])
        });
        assert_eq!(out, vec![1.0 + 1.0 / 128.0; 3]);
    }

    #[test]
    fn disagreements_are_named() {
        // Different shapes in one all-gather.
        let run = run_in_process(2, Duration::from_secs(20), |comm| {
            let t = Tensor::zeros((1, 2 + comm.rank()), DType::F32, &Device::Cpu)?;
            comm.all_gather(&t).map(drop)
        });
        let err = run.into_result().unwrap_err().to_string();
        assert!(err.contains("rank 0 has [1, 2]") || err.contains("rank 1 has [1, 3]"), "{err}");
        // Different collectives at the same point.
        let run = run_in_process(2, Duration::from_secs(20), |comm| {
            let t = Tensor::zeros(2, DType::F32, &Device::Cpu)?;
            match comm.rank() {
                0 => comm.all_reduce(&t, ReduceOp::Sum).map(drop),
                _ => comm.broadcast(&t, 0).map(drop),
            }
        });
        let err = run.into_result().unwrap_err().to_string();
        assert!(err.contains("all_reduce(Sum)") && err.contains("broadcast(root 0)"), "{err}");
    }

    #[test]
    fn a_dead_rank_ends_the_others() {
        // Rank 1 fails before its first collective: rank 0 learns it at once, not at the timeout.
        let started = Instant::now();
        let run = run_in_process(3, Duration::from_secs(60), |comm| {
            if comm.rank() == 1 {
                return Err(DistError::Environment("rank 1 could not read its data".into()));
            }
            comm.barrier()
        });
        assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
        assert_eq!(run.first_failed, Some(1));
        for (rank, r) in run.results.iter().enumerate() {
            let err = r.as_ref().unwrap_err().to_string();
            match rank {
                1 => assert!(err.contains("could not read its data"), "{err}"),
                _ => assert!(err.contains("rank 1 stopped") && err.contains("could not read its data"), "{err}"),
            }
        }
        assert!(run.into_result().unwrap_err().to_string().contains("could not read its data"));
    }

    #[test]
    fn a_hanging_rank_times_out() {
        // Rank 1 never reaches the collective (it is stuck, not dead): rank 0 gives up after the
        // timeout, naming the rank it waited for.
        let started = Instant::now();
        let run = run_in_process(2, Duration::from_millis(300), |comm| {
            if comm.rank() == 1 {
                std::thread::sleep(Duration::from_millis(1500));
                return comm.barrier();
            }
            comm.barrier()
        });
        assert!(started.elapsed() < Duration::from_secs(5));
        let err = run.results[0].as_ref().unwrap_err().to_string();
        assert!(err.contains("timed out") && err.contains("[1]"), "{err}");
        let err = run.results[1].as_ref().unwrap_err().to_string();
        assert!(err.contains("rank 0 stopped"), "{err}");
    }

    #[test]
    fn a_panicking_rank_is_reraised_after_the_others_end() {
        let caught = std::panic::catch_unwind(|| {
            run_in_process(2, Duration::from_secs(60), |comm| {
                if comm.rank() == 0 {
                    panic!("boom");
                }
                comm.barrier()
            })
        });
        assert!(caught.is_err());
    }
}

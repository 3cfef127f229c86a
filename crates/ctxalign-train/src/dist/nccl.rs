//! The NCCL backend (feature `nccl`): one process per rank, each on its CUDA device, through
//! cudarc's NCCL bindings (the library PyTorch's DDP uses).
//!
//! Collectives run on the stream Candle computes on, so they are ordered with the kernels around
//! them and the host does not wait for them. A watchdog thread (as PyTorch's NCCL watchdog) follows
//! each collective from the moment the host calls NCCL (the first collective between two ranks
//! sets up their connection on the host, waiting for the peer) to an event recorded after it: one
//! that has not finished within the timeout, or an asynchronous error NCCL reports (a peer that
//! vanished), aborts the communicator — which ends the stuck kernels and calls — and this rank's
//! collective, or its next one, returns the reason.

use std::collections::VecDeque;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::cuda_backend::cudarc::driver::{CudaEvent, CudaStream, DevicePtr, DevicePtrMut};
use candle_core::cuda_backend::cudarc::nccl::{result as nccl, sys};
use candle_core::cuda_backend::CudaStorageSlice;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, Device, Shape, Storage, Tensor};

use super::{rendezvous, Backend, DistEnv, DistError, ReduceOp, Result};

/// NCCL's communicator handle; NCCL's calls on it are serialised by [`NcclBackend`], and
/// `ncclCommAbort` may be called from the watchdog thread (NCCL allows it from any thread).
struct RawComm(sys::ncclComm_t);
// SAFETY: see above; the handle is an opaque pointer NCCL owns.
unsafe impl Send for RawComm {}
unsafe impl Sync for RawComm {}

struct Pending {
    /// Recorded after the collective is enqueued; `None` while the host is still inside NCCL's call
    /// (its first collective sets up the connections to the peers, on the host, and waits for them).
    done: Option<CudaEvent>,
    op: String,
    since: Instant,
}

struct Watchdog {
    comm: Arc<RawComm>,
    timeout: Duration,
    rank: usize,
    pending: Mutex<VecDeque<Pending>>,
    /// Why the communicator was aborted; every later collective fails with it.
    failure: Mutex<Option<String>>,
    aborted: AtomicBool,
    stop: AtomicBool,
}

impl Watchdog {
    fn fail(&self, reason: String) {
        let mut failure = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        if failure.is_none() {
            *failure = Some(reason);
        }
        if !self.aborted.swap(true, Ordering::SeqCst) {
            // SAFETY: the handle is live until `NcclBackend` drops it, which stops this thread first.
            unsafe {
                let _ = nccl::comm_abort(self.comm.0);
            }
        }
    }

    fn check(&self) -> Result<()> {
        match self.failure.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            Some(reason) => Err(DistError::Nccl(format!("rank {}: the communicator was aborted: {reason}", self.rank))),
            None => Ok(()),
        }
    }

    fn watch(&self) {
        while !self.stop.load(Ordering::SeqCst) {
            if self.aborted.load(Ordering::SeqCst) {
                return;
            }
            let mut async_error = sys::ncclResult_t::ncclSuccess;
            // SAFETY: a live handle (see `fail`); NCCL documents this call as thread-safe.
            unsafe { sys::ncclCommGetAsyncError(self.comm.0, &mut async_error) };
            if !matches!(async_error, sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress) {
                self.fail(format!("NCCL reported {async_error:?} (a peer process died or lost its connection)"));
                return;
            }
            let overdue = {
                let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                while pending.front().is_some_and(|p| p.done.as_ref().is_some_and(CudaEvent::is_complete)) {
                    pending.pop_front();
                }
                pending.front().filter(|p| p.since.elapsed() > self.timeout).map(|p| p.op.clone())
            };
            if let Some(op) = overdue {
                self.fail(format!(
                    "{op} did not finish within {:.0} s (a rank that died, hangs, or runs another code path)",
                    self.timeout.as_secs_f64()
                ));
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

pub(super) struct NcclBackend {
    comm: Arc<RawComm>,
    rank: usize,
    world: usize,
    device: Device,
    cuda: CudaDevice,
    stream: Arc<CudaStream>,
    /// One NCCL call at a time on this communicator.
    enqueue: Mutex<()>,
    watchdog: Arc<Watchdog>,
    watcher: Option<std::thread::JoinHandle<()>>,
    version: String,
}

/// NCCL's result code and its own explanation of the last error (cudarc's error shows neither).
fn nccl_error(op: &str, e: nccl::NcclError) -> DistError {
    let text = |p: *const std::ffi::c_char| -> String {
        if p.is_null() {
            String::new()
        } else {
            // SAFETY: NCCL returns a NUL-terminated string it owns, valid until the next call.
            unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    };
    // SAFETY: plain queries; a null communicator asks for the last error of any.
    let (meaning, last) =
        unsafe { (text(sys::ncclGetErrorString(e.0)), text(sys::ncclGetLastError(std::ptr::null_mut()))) };
    DistError::Nccl(format!(
        "{op}: {:?} ({meaning}){}",
        e.0,
        if last.is_empty() { String::new() } else { format!(": {last}") }
    ))
}

fn driver_error(op: &str, e: impl std::fmt::Debug) -> DistError {
    DistError::Nccl(format!("{op}: CUDA {e:?}"))
}

impl NcclBackend {
    /// Meets the other ranks at the rendezvous, then joins the NCCL communicator on `device`.
    pub(super) fn join(env: &DistEnv, device: &Device, timeout: Duration) -> Result<Self> {
        let cuda =
            device.as_cuda_device().map_err(|e| DistError::Environment(format!("NCCL needs a CUDA device: {e}")))?;
        let stream = cuda.cuda_stream();
        let port = env.rendezvous_port(|k| std::env::var(k).ok())?;
        let id = if env.rank == 0 {
            let id = nccl::get_uniqueid().map_err(|e| nccl_error("ncclGetUniqueId", e))?;
            let bytes: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
            rendezvous::serve(port, env.world_size, &bytes, timeout)?;
            id
        } else {
            let bytes = rendezvous::join(&env.master_addr, port, env.rank, env.world_size, timeout)?;
            if bytes.len() != 128 {
                return Err(DistError::Nccl(format!("rank 0 sent a unique id of {} bytes, not 128", bytes.len())));
            }
            let mut internal = [0 as std::ffi::c_char; 128];
            for (dst, src) in internal.iter_mut().zip(&bytes) {
                *dst = *src as std::ffi::c_char;
            }
            sys::ncclUniqueId { internal }
        };
        stream.context().bind_to_thread().map_err(|e| driver_error("binding the CUDA context", e))?;
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` receives a new handle; every rank passes the same id and its own rank.
        unsafe { nccl::comm_init_rank(&mut comm, env.world_size as i32, id, env.rank as i32) }
            .map_err(|e| nccl_error("ncclCommInitRank", e))?;
        let version = nccl::get_nccl_version().map_or_else(
            |_| "unknown".into(),
            |v| {
                // 2.19+: major*10000 + minor*100 + patch.
                format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100)
            },
        );
        let comm = Arc::new(RawComm(comm));
        let watchdog = Arc::new(Watchdog {
            comm: comm.clone(),
            timeout,
            rank: env.rank,
            pending: Mutex::new(VecDeque::new()),
            failure: Mutex::new(None),
            aborted: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let watcher = {
            let w = watchdog.clone();
            std::thread::Builder::new()
                .name("nccl-watchdog".into())
                .spawn(move || w.watch())
                .map_err(|e| DistError::Nccl(format!("cannot start the watchdog: {e}")))?
        };
        Ok(Self {
            comm,
            rank: env.rank,
            world: env.world_size,
            device: device.clone(),
            cuda: cuda.clone(),
            stream,
            enqueue: Mutex::new(()),
            watchdog,
            watcher: Some(watcher),
            version,
        })
    }

    /// Runs one collective from `input` into a new tensor of `out_shape`: `call(send, recv, count,
    /// dtype, comm, stream)` enqueues it. The watchdog follows it from then on.
    fn collective(
        &self,
        op: &str,
        input: &Tensor,
        out_shape: Shape,
        call: impl FnOnce(
            *const c_void,
            *mut c_void,
            usize,
            sys::ncclDataType_t,
            sys::ncclComm_t,
            sys::cudaStream_t,
        ) -> std::result::Result<nccl::NcclStatus, nccl::NcclError>,
    ) -> Result<Tensor> {
        self.watchdog.check()?;
        let (storage, layout) = input.storage_and_layout();
        let Storage::Cuda(cs) = &*storage else {
            return Err(DistError::Nccl(format!(
                "{op}: NCCL exchanges CUDA tensors, this one is on {:?}",
                input.device()
            )));
        };
        let start = layout.start_offset();
        let count = layout.shape().elem_count();
        let out_count = out_shape.elem_count();
        let _one_at_a_time = self.enqueue.lock().unwrap_or_else(|e| e.into_inner());
        // Followed from before the call: a peer that never comes can hold the host inside it.
        let op_name = format!("{op} on rank {}", self.rank);
        self.watchdog.pending.lock().unwrap_or_else(|e| e.into_inner()).push_back(Pending {
            done: None,
            op: op_name,
            since: Instant::now(),
        });
        let stream = &self.stream;
        let raw_stream = stream.cu_stream() as sys::cudaStream_t;
        let comm = self.comm.0;
        macro_rules! run {
            ($slice:expr, $variant:ident, $nccl:ident) => {{
                let src = $slice.slice(start..start + count);
                // SAFETY: the collective writes every element of `out` before anything reads it.
                let mut out = unsafe { self.cuda.alloc(out_count) }?;
                {
                    let (src_ptr, _src_sync) = src.device_ptr(stream);
                    let (dst_ptr, _dst_sync) = out.device_ptr_mut(stream);
                    call(
                        src_ptr as *const c_void,
                        dst_ptr as *mut c_void,
                        count,
                        sys::ncclDataType_t::$nccl,
                        comm,
                        raw_stream,
                    )
                    // After an abort by the watchdog, its reason says more than NCCL's code.
                    .map_err(|e| self.watchdog.check().err().unwrap_or_else(|| nccl_error(op, e)))?;
                }
                CudaStorage { slice: CudaStorageSlice::$variant(out), device: self.cuda.clone() }
            }};
        }
        let out = match &cs.slice {
            CudaStorageSlice::F32(s) => run!(s, F32, ncclFloat32),
            CudaStorageSlice::F64(s) => run!(s, F64, ncclFloat64),
            CudaStorageSlice::BF16(s) => run!(s, BF16, ncclBfloat16),
            CudaStorageSlice::F16(s) => run!(s, F16, ncclFloat16),
            CudaStorageSlice::U8(s) => run!(s, U8, ncclUint8),
            CudaStorageSlice::U32(s) => run!(s, U32, ncclUint32),
            CudaStorageSlice::I64(s) => run!(s, I64, ncclInt64),
            _ => return Err(DistError::Nccl(format!("{op}: dtype {:?} is not exchanged", input.dtype()))),
        };
        let done = stream.record_event(None).map_err(|e| driver_error(op, e))?;
        if let Some(last) = self.watchdog.pending.lock().unwrap_or_else(|e| e.into_inner()).back_mut() {
            last.done = Some(done);
        }
        // An abort while the host was inside NCCL's call returns from it with an error or garbage.
        self.watchdog.check()?;
        Ok(Tensor::from_storage(Storage::Cuda(out), out_shape, BackpropOp::none(), false))
    }
}

impl Backend for NcclBackend {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn name(&self) -> &'static str {
        "nccl"
    }
    fn detail(&self) -> Option<String> {
        Some(format!("NCCL {}", self.version))
    }
    fn device(&self) -> Device {
        self.device.clone()
    }
    fn all_reduce(&self, input: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let red = match op {
            ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
            ReduceOp::Mean => sys::ncclRedOp_t::ncclAvg,
            ReduceOp::Max => sys::ncclRedOp_t::ncclMax,
        };
        self.collective("all_reduce", input, input.shape().clone(), |src, dst, n, dtype, comm, stream| unsafe {
            nccl::all_reduce(src, dst, n, dtype, red, comm, stream)
        })
    }
    fn broadcast(&self, input: &Tensor, root: usize) -> Result<Tensor> {
        self.collective("broadcast", input, input.shape().clone(), |src, dst, n, dtype, comm, stream| unsafe {
            nccl::broadcast(src, dst, n, dtype, root as i32, comm, stream)
        })
    }
    fn all_gather(&self, input: &Tensor) -> Result<Tensor> {
        let mut dims = input.dims().to_vec();
        if dims.is_empty() {
            dims.push(1);
        }
        dims[0] *= self.world;
        self.collective("all_gather", input, Shape::from(dims), |src, dst, n, dtype, comm, stream| unsafe {
            nccl::all_gather(src, dst, n, dtype, comm, stream)
        })
    }
    fn abort(&self, reason: &str) {
        self.watchdog.fail(format!("rank {} stopped: {reason}", self.rank));
    }
    fn health(&self) -> Result<()> {
        self.watchdog.check()
    }
}

impl Drop for NcclBackend {
    fn drop(&mut self) {
        self.watchdog.stop.store(true, Ordering::SeqCst);
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
        if !self.watchdog.aborted.load(Ordering::SeqCst) {
            // Outstanding collectives first: destroying a communicator under a running kernel is
            // undefined. A failed sync means the work is lost anyway: abort.
            let clean = self.stream.synchronize().is_ok();
            // SAFETY: the handle is live, and no other thread uses it any more.
            unsafe {
                let _ = if clean { nccl::comm_destroy(self.comm.0) } else { nccl::comm_abort(self.comm.0) };
            }
        }
    }
}

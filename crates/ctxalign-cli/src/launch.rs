//! How a training job runs on several ranks (`--nproc-per-node`, torchrun, SLURM).
//!
//! - No launcher and no `--nproc-per-node`: one process, as always.
//! - `--nproc-per-node N` on the CPU: N ranks as threads of this process, with the in-process
//!   communicator.
//! - `--nproc-per-node N` with `--device cuda`: this process starts N copies of itself, one per
//!   GPU, with torchrun's variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR=127.0.0.1`, a
//!   free `MASTER_PORT`), and waits for them; when one fails, the others are stopped after a grace
//!   period and the failing rank is named. `--device cuda:N` puts every rank on GPU N (NCCL ≥ 2.30
//!   allows it with `NCCL_MULTI_RANK_GPU_ENABLE=1`, which the children get unless it is set).
//! - Under torchrun or SLURM (`WORLD_SIZE` / `SLURM_NTASKS` in the environment): this process is one
//!   rank of their run; it joins the others through NCCL on `cuda:LOCAL_RANK`.
//!
//! Only the process holding rank 0 reports: [`run_training`] returns rank 0's result there and
//! `None` elsewhere; [`launch_ranks`] is the launcher's whole job.

use std::ffi::OsString;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use ctxalign::device::DeviceSpec;
use crate::runtime_args::TrainingArgs;
use ctxalign::train::dist::{run_in_process, DistEnv};
use ctxalign::train::Communicator;
use ctxalign::Runtime;

/// Set in the environment of the processes `--nproc-per-node` starts, so that they join the run
/// instead of starting ranks of their own.
pub const CHILD_MARKER: &str = "CTXALIGN_LAUNCHED";

/// How long the other ranks get to end on their own after one failed, before they are killed.
const GRACE: Duration = Duration::from_secs(15);

/// What this process is in the run `args` and the environment describe.
enum Plan {
    Single,
    Threads(usize),
    /// Start this many processes and wait for them.
    Processes(usize),
    /// One rank of a multi-process run.
    Rank(DistEnv),
}

fn plan(args: &TrainingArgs) -> anyhow::Result<Plan> {
    let env = DistEnv::from_env()?;
    let child = std::env::var_os(CHILD_MARKER).is_some();
    Ok(match (env, args.nproc_per_node) {
        (Some(env), Some(_)) if !child => bail!(
            "--nproc-per-node starts its own ranks, but this process is already rank {} of {} ({:?} set \
             WORLD_SIZE / SLURM_NTASKS): leave --nproc-per-node out under torchrun or SLURM",
            env.rank,
            env.world_size,
            env.source
        ),
        (Some(env), _) => {
            if !args.device.is_cuda() {
                bail!(
                    "this process is rank {} of {} processes, and ranks in separate processes meet through NCCL, \
                     which needs CUDA devices (--device cuda); on the CPU, --nproc-per-node N runs N ranks as \
                     threads of one process",
                    env.rank,
                    env.world_size
                );
            }
            Plan::Rank(env)
        }
        (None, Some(n)) if n > 1 && args.device.is_cuda() => Plan::Processes(n),
        (None, Some(n)) if n > 1 => Plan::Threads(n),
        (None, _) => Plan::Single,
    })
}

/// When this process is only the launcher of `--nproc-per-node` GPU ranks: starts them (each runs
/// the whole command as one rank), waits for them, and returns `true` — the job is done. Every
/// training job calls it first.
pub fn launch_ranks(args: &TrainingArgs) -> anyhow::Result<bool> {
    match plan(args)? {
        Plan::Processes(n) => launch_processes(n, args.device).map(|_| true),
        _ => Ok(false),
    }
}

/// Whether this process prints the job's header and results: the process of rank 0 (also the
/// only process, or the one holding the threads).
pub fn reports(args: &TrainingArgs) -> bool {
    !matches!(plan(args), Ok(Plan::Rank(env)) if env.rank != 0)
}

/// The number of ranks the run `args` and the environment describe (1 for one process).
pub fn world_size(args: &TrainingArgs) -> anyhow::Result<usize> {
    Ok(match plan(args)? {
        Plan::Single => 1,
        Plan::Threads(n) | Plan::Processes(n) => n,
        Plan::Rank(env) => env.world_size,
    })
}

/// The runtime of the first rank this process holds (its device: `cuda:LOCAL_RANK` under a
/// launcher), for the work around the training (loading models, evaluating).
pub fn local_runtime(args: &TrainingArgs) -> anyhow::Result<Runtime> {
    let device = match plan(args)? {
        Plan::Rank(env) => args.device.for_local_rank(env.local_rank),
        _ => args.device,
    };
    Ok(Runtime::new(device.open()?, args.precision))
}

/// Runs `job` on every rank this process holds, each with its runtime (its device, the
/// precision) and communicator. Returns rank 0's result and runtime where rank 0 ran in this
/// process (to report and evaluate with), else `None`.
pub fn run_training<R: Send>(
    args: &TrainingArgs,
    job: impl Fn(Runtime, Communicator) -> anyhow::Result<R> + Sync,
) -> anyhow::Result<Option<(R, Runtime)>> {
    let timeout = Duration::from_secs(args.dist_timeout);
    match plan(args)? {
        Plan::Single => {
            let rt = Runtime::new(args.device.open()?, args.precision);
            Ok(Some((job(rt.clone(), Communicator::single())?, rt)))
        }
        Plan::Threads(n) => {
            let rt = Runtime::new(args.device.open()?, args.precision);
            let ranks = run_in_process(n, timeout, |comm| {
                let rank = comm.rank();
                job(rt.clone(), comm).with_context(|| format!("rank {rank} of {n}"))
            });
            Ok(ranks.into_result()?.into_iter().next().map(|r| (r, rt)))
        }
        Plan::Processes(_) => {
            bail!("the launcher of --nproc-per-node ranks trains nothing itself (call launch_ranks first)")
        }
        Plan::Rank(env) => {
            let rt = Runtime::new(args.device.for_local_rank(env.local_rank).open()?, args.precision);
            let (rank, world) = (env.rank, env.world_size);
            let comm = nccl_communicator(&env, &rt.device, timeout)?;
            let result = job(rt.clone(), comm).with_context(|| format!("rank {rank} of {world}"))?;
            Ok((rank == 0).then_some((result, rt)))
        }
    }
}

#[cfg(feature = "nccl")]
fn nccl_communicator(env: &DistEnv, device: &candle_core::Device, timeout: Duration) -> anyhow::Result<Communicator> {
    Ok(Communicator::nccl(env, device, timeout)?)
}

#[cfg(not(feature = "nccl"))]
fn nccl_communicator(env: &DistEnv, _device: &candle_core::Device, _timeout: Duration) -> anyhow::Result<Communicator> {
    bail!(
        "rank {} of {}: this build of ctxalign has no NCCL support; rebuild with `--features nccl` (which \
         needs libnccl.so.2, e.g. from the nvidia-nccl-cu13 wheel)",
        env.rank,
        env.world_size
    )
}

/// A port nobody listens on now (the OS picks it).
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port for the ranks to meet")?;
    Ok(listener.local_addr()?.port())
}

/// Starts `n` copies of this command, one rank each, and waits for all of them; fails naming the
/// first rank that failed. A Ctrl-C reaches the children too (one process group): they write their
/// checkpoint and stop, and this process waits for them and exits as they did.
fn launch_processes(n: usize, device: DeviceSpec) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding this program to start its ranks")?;
    let argv: Vec<OsString> = std::env::args_os().skip(1).collect();
    let port = free_port()?;
    let shared_gpu = matches!(device, DeviceSpec::Cuda(_));
    eprintln!(
        "starting {n} ranks ({}), meeting at 127.0.0.1:{port}",
        if shared_gpu { format!("all on {device}") } else { "one per GPU: cuda:0 …".into() }
    );
    let mut children: Vec<(usize, Child)> = Vec::with_capacity(n);
    for rank in 0..n {
        let mut cmd = Command::new(&exe);
        cmd.args(&argv)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env(CHILD_MARKER, "1");
        if shared_gpu && std::env::var_os("NCCL_MULTI_RANK_GPU_ENABLE").is_none() {
            cmd.env("NCCL_MULTI_RANK_GPU_ENABLE", "1");
        }
        match cmd.spawn() {
            Ok(child) => children.push((rank, child)),
            Err(e) => {
                for (_, c) in &mut children {
                    let _ = c.kill();
                }
                return Err(e).with_context(|| format!("starting rank {rank}"));
            }
        }
    }
    // The launcher survives Ctrl-C to wait for its children (which checkpoint and stop).
    let _ = ctrlc::set_handler(|| {});
    let mut statuses: Vec<Option<ExitStatus>> = vec![None; n];
    let mut first_failure: Option<(usize, ExitStatus, Instant)> = None;
    loop {
        for (rank, child) in &mut children {
            if statuses[*rank].is_none() {
                if let Some(status) = child.try_wait().with_context(|| format!("waiting for rank {rank}"))? {
                    statuses[*rank] = Some(status);
                    if !status.success() && first_failure.is_none() {
                        first_failure = Some((*rank, status, Instant::now()));
                    }
                }
            }
        }
        if statuses.iter().all(Option::is_some) {
            break;
        }
        if let Some((_, _, since)) = first_failure {
            if since.elapsed() > GRACE {
                for (rank, child) in &mut children {
                    if statuses[*rank].is_none() {
                        let _ = child.kill();
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    match first_failure {
        None => Ok(()),
        // As torchrun: the run ends with the status of the rank that failed first (130 after a
        // Ctrl-C that left a checkpoint).
        Some((rank, status, _)) => {
            if status.code() != Some(crate::interrupt::INTERRUPTED_EXIT_CODE) {
                eprintln!("error: rank {rank} of {n} failed ({status}); the other ranks were stopped");
            }
            std::process::exit(status.code().unwrap_or(1))
        }
    }
}

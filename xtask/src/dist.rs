//! Data-parallel checks and benchmarks on the ranks `--nproc-per-node` starts (threads on the CPU,
//! NCCL processes on GPUs) or torchrun/SLURM launched:
//! - `xtask dist-check`: every collective against the value it must give, the all-gather's
//!   backward against its closed form, and — with `--hang-rank R` — that the other ranks end with
//!   a timeout error within `--dist-timeout` when rank R stops answering;
//! - `xtask bench allreduce`: all-reduce bandwidth against buffer size, and the bucketed average
//!   of ContextBLIP S0's gradients (41.5 M f32 at BLIP-base sizes) as the training loop does it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor, Var};
use clap::Args;
use ctxalign_cli::launch::{launch_ranks, run_training};
use ctxalign::device::device_name;
use ctxalign_cli::runtime_args::TrainingArgs;
use ctxalign::train::dist::GradientBuckets;
use ctxalign::train::{Communicator, ReduceOp};

#[derive(Args)]
pub struct DistCheckArgs {
    #[command(flatten)]
    runtime: TrainingArgs,
    /// This rank stops answering (sleeps 3 × --dist-timeout) before its first collective: the
    /// check then passes when the others end with a timeout error (exit status 3 when they do).
    #[arg(long)]
    hang_rank: Option<usize>,
    /// Rank 0's report (JSON).
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One check: its name, whether it passed, and what was compared.
fn check(out: &mut Vec<serde_json::Value>, name: &str, got: &[f32], want: &[f32]) -> bool {
    let ok = got.len() == want.len() && got.iter().zip(want).all(|(a, b)| (a - b).abs() <= 1e-6 * b.abs().max(1.0));
    out.push(serde_json::json!({ "check": name, "passed": ok, "got": got, "expected": want }));
    ok
}

fn values(t: &Tensor) -> anyhow::Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}

/// Every collective of one rank, each against its closed form.
fn collectives(comm: &Communicator, device: &Device) -> anyhow::Result<Vec<serde_json::Value>> {
    let (r, w) = (comm.rank() as f32, comm.world_size() as f32);
    let ranks: Vec<f32> = (0..comm.world_size()).map(|k| k as f32).collect();
    let mut out = vec![];
    for dtype in [DType::F32, DType::BF16, DType::F64] {
        let t = Tensor::new(&[r + 1.0, 2.0 * r], device)?.to_dtype(dtype)?;
        let sum: f32 = ranks.iter().map(|k| k + 1.0).sum();
        let twice: f32 = ranks.iter().map(|k| 2.0 * k).sum();
        check(
            &mut out,
            &format!("all_reduce sum {dtype:?}"),
            &values(&comm.all_reduce(&t, ReduceOp::Sum)?)?,
            &[sum, twice],
        );
        check(
            &mut out,
            &format!("all_reduce mean {dtype:?}"),
            &values(&comm.all_reduce(&t, ReduceOp::Mean)?)?,
            &[sum / w, twice / w],
        );
        check(
            &mut out,
            &format!("all_reduce max {dtype:?}"),
            &values(&comm.all_reduce(&t, ReduceOp::Max)?)?,
            &[w, 2.0 * (w - 1.0)],
        );
    }
    let root = comm.world_size() - 1;
    let t = Tensor::new(&[r, 10.0 + r], device)?;
    check(&mut out, "broadcast from the last rank", &values(&comm.broadcast(&t, root)?)?, &[w - 1.0, 9.0 + w]);
    let gathered: Vec<f32> = ranks.iter().flat_map(|k| [*k, 10.0 + k]).collect();
    check(&mut out, "all_gather", &values(&comm.all_gather(&t.unsqueeze(0)?)?)?, &gathered);
    // The backward of the gather: loss Σ c_j · G_j² over the gathered rows, the same on every rank,
    // gives rank r the world size × 2 c_r x_r.
    let x = Var::new(&[1.0 + r, 2.0 + r], device)?;
    let g = comm.all_gather_with_grad(&x.as_tensor().unsqueeze(0)?)?;
    let c: Vec<f32> = (0..2 * comm.world_size()).map(|i| 1.0 + i as f32).collect();
    let c = Tensor::from_vec(c, (comm.world_size(), 2), device)?;
    let grad = (g.sqr()? * &c)?.sum_all()?.backward()?;
    let grad = values(grad.get(x.as_tensor()).context("the gathered features got no gradient")?)?;
    let mine = 2 * comm.rank();
    let want = [w * 2.0 * (1.0 + mine as f32) * (1.0 + r), w * 2.0 * (2.0 + mine as f32) * (2.0 + r)];
    check(&mut out, "all_gather_with_grad backward", &grad, &want);
    let bytes = comm.broadcast_bytes(format!("rank {}", comm.rank()).as_bytes(), 0)?;
    out.push(serde_json::json!({ "check": "broadcast_bytes", "passed": bytes == b"rank 0" }));
    let all = comm.all_gather_bytes(&vec![comm.rank() as u8; comm.rank() + 1])?;
    let want: Vec<Vec<u8>> = (0..comm.world_size()).map(|k| vec![k as u8; k + 1]).collect();
    out.push(serde_json::json!({ "check": "all_gather_bytes (uneven lengths)", "passed": all == want }));
    comm.barrier()?;
    Ok(out)
}

pub fn dist_check(a: DistCheckArgs) -> anyhow::Result<bool> {
    if launch_ranks(&a.runtime)? {
        return Ok(true);
    }
    let timeout = Duration::from_secs(a.runtime.dist_timeout);
    let started = Instant::now();
    let outcome = run_training(&a.runtime, |rt, comm| {
        if a.hang_rank == Some(comm.rank()) {
            eprintln!("rank {}: not answering for {:?}", comm.rank(), 3 * timeout);
            std::thread::sleep(3 * timeout);
        }
        collectives(&comm, &rt.device).map(|checks| (checks, comm.describe(), comm.world_size()))
    });
    let elapsed = started.elapsed().as_secs_f64();
    if a.hang_rank.is_some() {
        // The expected outcome is an error naming the timeout, within it (plus start-up).
        let Err(e) = outcome else {
            bail!("rank {} stopped answering, yet the collectives completed", a.hang_rank.unwrap_or(0))
        };
        let message = format!("{e:#}");
        println!("dist-check --hang-rank: ended after {elapsed:.1} s (timeout {timeout:?}): {message}");
        let timed_out = message.contains("timed out") || message.contains("did not finish within");
        std::process::exit(if timed_out && elapsed < timeout.as_secs_f64() * 2.0 + 30.0 { 3 } else { 1 })
    }
    let Some(((checks, communicator, world), rt)) = outcome? else { return Ok(true) };
    let passed = checks.iter().all(|c| c["passed"] == true);
    for c in &checks {
        println!("{:>6}  {}", if c["passed"] == true { "ok" } else { "FAILED" }, c["check"].as_str().unwrap_or(""));
    }
    let record = serde_json::json!({
        "world_size": world, "communicator": communicator, "device": device_name(&rt.device),
        "passed": passed, "checks": checks, "seconds": elapsed,
    });
    if let Some(path) = &a.json {
        ctxalign::data::write_atomic(path, serde_json::to_string_pretty(&record)?.as_bytes())?;
    }
    println!(
        "dist-check: {} collectives on {world} ranks ({communicator}): {}",
        checks.len(),
        if passed { "all passed" } else { "FAILED" }
    );
    Ok(passed)
}

#[derive(Args)]
pub struct AllreduceArgs {
    #[command(flatten)]
    runtime: TrainingArgs,
    /// Buffer sizes in KiB (f32), each all-reduced (mean) on its own.
    #[arg(long, value_delimiter = ',', default_values_t = [4usize, 64, 1024, 16384, 65536, 262144])]
    sizes_kib: Vec<usize>,
    /// Timed repetitions per size (after two warm-ups).
    #[arg(long, default_value_t = 10)]
    repeat: usize,
    /// Bucket sizes (MB) to average S0's gradients in (the training loop's default: 25).
    #[arg(long, value_delimiter = ',', default_values_t = [25usize])]
    bucket_mb: Vec<usize>,
    /// Folder of the JSON record.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

/// ContextBLIP S0's trainable tensors at BLIP-base sizes (δ = 2): the default adapter (4 taps of
/// 768 → 384, 1536 → 768), the 4-layer TMIM decoder (self- and cross-attention, FFN 3072), the text
/// adapter, the embeddings and the reconstruction head — 41,500,032 values, what `bench s0-step`
/// trains (checked by `allreduce`).
fn s0_gradient_shapes() -> Vec<Vec<usize>> {
    let mut shapes = vec![];
    for _ in 0..4 {
        shapes.push(vec![384, 768]);
    }
    shapes.push(vec![768, 1536]);
    for _ in 0..4 {
        for _ in 0..2 {
            // self- and cross-attention: q, k, v, output (+ biases), LayerNorm
            for _ in 0..4 {
                shapes.push(vec![768, 768]);
                shapes.push(vec![768]);
            }
            shapes.push(vec![768]);
            shapes.push(vec![768]);
        }
        shapes.extend([vec![3072, 768], vec![3072], vec![768, 3072], vec![768], vec![768], vec![768]]);
    }
    // mask and position embeddings, the reconstruction head (768 → 16·16·3), the text adapter
    shapes.extend([vec![1, 1, 768], vec![1, 197, 768], vec![768, 768], vec![768]]);
    shapes.extend([vec![384, 768], vec![384], vec![768, 384], vec![768]]);
    shapes
}

pub fn allreduce(a: AllreduceArgs) -> anyhow::Result<bool> {
    if launch_ranks(&a.runtime)? {
        return Ok(true);
    }
    let outcome = run_training(&a.runtime, |rt, comm| -> anyhow::Result<serde_json::Value> {
        let device = &rt.device;
        let time = |f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<f64> {
            for _ in 0..2 {
                f()?;
            }
            let mut times = vec![];
            for _ in 0..a.repeat {
                device.synchronize()?;
                comm.barrier()?;
                let start = Instant::now();
                f()?;
                device.synchronize()?;
                times.push(start.elapsed().as_secs_f64());
            }
            times.sort_by(f64::total_cmp);
            Ok(times[times.len() / 2])
        };
        let mut rows = vec![];
        for &kib in &a.sizes_kib {
            let n = kib * 256;
            let t = Tensor::randn(0f32, 1.0, n, device)?;
            let seconds = time(&mut || {
                comm.all_reduce(&t, ReduceOp::Mean)?;
                Ok(())
            })?;
            // NCCL's "bus bandwidth" of an all-reduce: 2 (W−1)/W × bytes / time.
            let w = comm.world_size() as f64;
            let bytes = (4 * n) as f64;
            rows.push(serde_json::json!({
                "bytes": 4 * n, "seconds": seconds,
                "algorithm_gb_per_s": bytes / seconds / 1e9,
                "bus_gb_per_s": 2.0 * (w - 1.0) / w * bytes / seconds / 1e9,
            }));
        }
        // S0's gradients in the loop's buckets.
        let vars: Vec<Var> = s0_gradient_shapes()
            .iter()
            .map(|s| Var::from_tensor(&Tensor::zeros(s.as_slice(), DType::F32, device)?))
            .collect::<candle_core::Result<_>>()?;
        let values: usize = vars.iter().map(|v| v.elem_count()).sum();
        anyhow::ensure!(values == 41_500_032, "S0's gradient shapes add up to {values}, not 41,500,032");
        let grads: Vec<Tensor> =
            vars.iter().map(|v| Tensor::randn(0f32, 1.0, v.shape(), device)).collect::<candle_core::Result<_>>()?;
        let mut s0 = vec![];
        for &mb in &a.bucket_mb {
            let buckets = GradientBuckets::new(&vars, mb << 20);
            let seconds = time(&mut || {
                let mut store = candle_core::backprop::GradStore::default();
                for (v, g) in vars.iter().zip(&grads) {
                    store.insert(v.as_tensor(), g.clone());
                }
                buckets.all_reduce_mean(&comm, &mut store, &vars)?;
                Ok(())
            })?;
            s0.push(serde_json::json!({ "values": values, "buckets": buckets.len(), "bucket_bytes": mb << 20, "seconds": seconds }));
        }
        Ok(serde_json::json!({
            "world_size": comm.world_size(), "communicator": comm.describe(), "device": device_name(device),
            "sizes": rows,
            "s0_gradients": s0,
            "machine": crate::bench::machine(device),
        }))
    })?;
    let Some((record, rt)) = outcome else { return Ok(true) };
    println!("all-reduce (mean, f32) on {} ranks, {}:", record["world_size"], record["communicator"]);
    println!("{:>12} {:>10} {:>10} {:>10}", "bytes", "ms", "alg GB/s", "bus GB/s");
    for row in record["sizes"].as_array().into_iter().flatten() {
        println!(
            "{:>12} {:>10.3} {:>10.2} {:>10.2}",
            row["bytes"],
            1000.0 * row["seconds"].as_f64().unwrap_or(0.0),
            row["algorithm_gb_per_s"].as_f64().unwrap_or(0.0),
            row["bus_gb_per_s"].as_f64().unwrap_or(0.0)
        );
    }
    for s0 in record["s0_gradients"].as_array().into_iter().flatten() {
        println!(
            "S0's gradients ({} values in {} buckets of {} MB): {:.2} ms",
            s0["values"],
            s0["buckets"],
            s0["bucket_bytes"].as_u64().unwrap_or(0) >> 20,
            1000.0 * s0["seconds"].as_f64().unwrap_or(0.0)
        );
    }
    let file = format!("allreduce-{}-x{}.json", device_name(&rt.device).replace(':', ""), record["world_size"]);
    std::fs::create_dir_all(&a.out)?;
    ctxalign::data::write_atomic(&a.out.join(&file), serde_json::to_string_pretty(&record)?.as_bytes())?;
    println!("record: {}", a.out.join(file).display());
    Ok(true)
}

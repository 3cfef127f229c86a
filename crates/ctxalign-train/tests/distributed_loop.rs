//! The training loop on several in-process ranks, on a model small enough to run in milliseconds:
//! W ranks × b equal one process with batch W·b step for step; a rank that fails mid-run ends the
//! others at once; a stop request on any rank stops all at the same step, with one checkpoint.

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor, Var};
use ctxalign_data::loader::{Batch, DataLoader, Dataset, LoaderConfig, Shard};
use ctxalign_data::rng::Rng;
use ctxalign_data::DataError;
use ctxalign_train::dist::run_in_process;
use ctxalign_train::{
    group_params, train, Adam, AdamConfig, Communicator, GroupSpec, Interrupt, LossTerms, Objective, Result, Schedule,
    ScheduleConfig, TrainConfig, TrainError, TrainSummary, TrainableParams,
};

/// `y = 3x − 1` at 48 points.
struct Line;

impl Dataset for Line {
    type Item = (f32, f32);
    fn len(&self) -> usize {
        48
    }
    fn load(&self, index: usize, _rng: &mut Rng) -> std::result::Result<(f32, f32), DataError> {
        let x = index as f32 / 16.0 - 1.0;
        Ok((x, 3.0 * x - 1.0))
    }
    fn check(&self, _index: usize) -> std::result::Result<(), DataError> {
        Ok(())
    }
}

/// Least squares of `w·x + c` (a mean over the rank's samples); `fail` makes a rank's loss fail at a
/// step.
struct Fit {
    w: Var,
    c: Var,
    fail: Option<(usize, u64)>,
    rank: usize,
}

impl Objective for Fit {
    type Item = (f32, f32);
    fn loss(&mut self, batch: &Batch<(f32, f32)>, step: u64) -> Result<LossTerms> {
        if self.fail == Some((self.rank, step)) {
            return Err(TrainError::Config(format!("rank {} broke at step {step}", self.rank)));
        }
        let x: Vec<f32> = batch.items.iter().map(|p| p.0).collect();
        let y: Vec<f32> = batch.items.iter().map(|p| p.1).collect();
        let n = x.len();
        let x = Tensor::from_vec(x, n, &Device::Cpu)?;
        let y = Tensor::from_vec(y, n, &Device::Cpu)?;
        let pred = x.broadcast_mul(self.w.as_tensor())?.broadcast_add(self.c.as_tensor())?;
        let mse = (pred - y)?.sqr()?.mean_all()?;
        Ok(LossTerms { terms: vec![("mse".into(), mse)], samples: n })
    }
}

fn run(
    comm: Communicator,
    out: &std::path::Path,
    batch: usize,
    steps: u64,
    fail: Option<(usize, u64)>,
    interrupt: &Interrupt,
) -> Result<(TrainSummary, Vec<f32>)> {
    let w = Var::new(&[0.5f32], &Device::Cpu)?;
    let c = Var::new(&[0.0f32], &Device::Cpu)?;
    let mut params = TrainableParams::default();
    params.insert("w", w.clone())?;
    params.insert("c", c.clone())?;
    let mut optimizer = Adam::new(AdamConfig::adamw(), group_params(&params, &[GroupSpec::rest("all", 0.05, 0.01)])?)?;
    let loader = DataLoader::new(
        Line,
        LoaderConfig {
            batch_size: batch,
            drop_last: true,
            seed: 1,
            shard: Shard::new(comm.rank(), comm.world_size()),
            ..Default::default()
        },
    );
    let rank = comm.rank();
    let mut fit = Fit { w: w.clone(), c: c.clone(), fail, rank };
    let cfg = TrainConfig {
        epochs: 10,
        max_steps: Some(steps),
        clip_norm: Some(1.0),
        progress: false,
        comm,
        ..TrainConfig::new(out)
    };
    let mut schedule = Schedule::new(ScheduleConfig::warmup_cosine(2, steps, 0.1));
    let summary = train(&cfg, &loader, &mut fit, &params, &mut optimizer, &mut schedule, interrupt)?;
    let values = vec![w.as_tensor().to_vec1::<f32>()?[0], c.as_tensor().to_vec1::<f32>()?[0]];
    Ok((summary, values))
}

fn curve(dir: &std::path::Path) -> Vec<(f64, f64)> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|r| (r["mse"].as_f64().unwrap(), r["grad_norm"].as_f64().unwrap()))
        .collect()
}

#[test]
fn ranks_train_as_one_process_with_the_global_batch() {
    let tmp = tempfile::tempdir().unwrap();
    for world in [2usize, 3, 4] {
        let one = tmp.path().join(format!("one-{world}"));
        let (single, w1) = run(Communicator::single(), &one, 2 * world, 12, None, &Interrupt::new()).unwrap();
        let many = tmp.path().join(format!("many-{world}"));
        let results =
            run_in_process(world, Duration::from_secs(60), |comm| run(comm, &many, 2, 12, None, &Interrupt::new()))
                .into_result()
                .unwrap();
        // 48 samples, global batch 2W: the epochs turn over, the schedule warms up and decays.
        assert_eq!(single.steps, 12);
        for (summary, w) in &results {
            assert_eq!(summary.steps, 12);
            assert_eq!(summary.world_size, world);
            for (a, b) in w.iter().zip(&w1) {
                assert!((a - b).abs() < 1e-6, "world {world}: {w:?} vs {w1:?}");
            }
        }
        let (a, b) = (curve(&one), curve(&many));
        assert_eq!(a.len(), 12);
        assert_eq!(b.len(), 12, "rank 0 alone writes the metrics");
        for (step, (a, b)) in a.iter().zip(&b).enumerate() {
            assert!((a.0 - b.0).abs() < 1e-6 * a.0.max(1.0), "world {world}, step {step}: mse {a:?} vs {b:?}");
            assert!((a.1 - b.1).abs() < 1e-5 * a.1.max(1.0), "world {world}, step {step}: grad norm {a:?} vs {b:?}");
        }
    }
}

#[test]
fn a_rank_that_fails_mid_run_ends_the_others_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let run = run_in_process(3, Duration::from_secs(300), |comm| {
        run(comm, tmp.path(), 2, 12, Some((1, 4)), &Interrupt::new())
    });
    assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());
    assert_eq!(run.first_failed, Some(1));
    for (rank, r) in run.results.iter().enumerate() {
        let err = r.as_ref().map(drop).unwrap_err().to_string();
        assert!(err.contains("rank 1 broke at step 4"), "rank {rank}: {err}");
        if rank != 1 {
            assert!(err.contains("rank 1 stopped"), "rank {rank}: {err}");
        }
    }
    // Rank 0 kept the 4 steps done: the failure came before the update, on every rank.
    let saved = ctxalign_train::Checkpointer::new(tmp.path().join("checkpoints"), 2).list().unwrap();
    assert_eq!(saved.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [4]);
}

#[test]
fn a_stop_request_on_any_rank_stops_all_at_the_same_step() {
    let tmp = tempfile::tempdir().unwrap();
    let results = run_in_process(2, Duration::from_secs(60), |comm| {
        let interrupt = Interrupt::new();
        if comm.rank() == 1 {
            // Ctrl-C reached this rank only (another machine's terminal, say).
            interrupt.request();
        }
        run(comm, tmp.path(), 2, 12, None, &interrupt)
    })
    .into_result()
    .unwrap();
    for (summary, _) in &results {
        assert!(summary.interrupted);
        assert_eq!(summary.steps, 1);
    }
    assert_eq!(results[0].1, results[1].1, "the ranks stopped with the same weights");
    let saved = ctxalign_train::Checkpointer::new(tmp.path().join("checkpoints"), 2).list().unwrap();
    assert_eq!(saved.len(), 1);
}

#[test]
fn every_rank_starts_from_rank_zeros_parameters() {
    let results = run_in_process(3, Duration::from_secs(60), |comm| -> Result<Vec<f32>> {
        let v = Var::new(&[comm.rank() as f32, 7.0], &Device::Cpu)?;
        let mut params = TrainableParams::default();
        params.insert("v", v.clone())?;
        // A bf16 parameter and its f32 master, as under mixed precision.
        let h = Var::from_tensor(&Tensor::new(&[comm.rank() as f32 + 0.5], &Device::Cpu)?.to_dtype(DType::BF16)?)?;
        params.insert("h", h.clone())?;
        ctxalign_train::dist::broadcast_parameters(&comm, &params)?;
        let mut out = v.as_tensor().to_vec1::<f32>()?;
        out.extend(h.as_tensor().to_dtype(DType::F32)?.to_vec1::<f32>()?);
        out.extend(params.master("h").unwrap().as_tensor().to_vec1::<f32>()?);
        Ok(out)
    })
    .into_result()
    .unwrap();
    for r in results {
        assert_eq!(r, vec![0.0, 7.0, 0.5, 0.5]);
    }
}

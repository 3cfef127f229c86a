//! Data-parallel training through the recipes, with the in-process communicator (one thread per
//! rank): W ranks × batch b give the losses and weights of one process with batch W·b, for S0 (hard
//! negatives and TMIM over gathered features) and ContextCLIP (InfoNCE and the contextual loss over
//! the gathered batch), at W = 2 and 3, and for S1 and S2 (per-rank sums scaled by W) at W = 2; a
//! rank that dies ends the others at once; a distributed run
//! resumes exactly, on the same or (same global batch) another number of ranks, and another global
//! batch is refused naming the world size.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use ctxalign::contextblip::{pretrain, PretrainOptions};
use ctxalign::contextclip::{train_contextclip, TrainOptions};
use ctxalign::data::captions::{read_caption_json, CaptionedImage};
use ctxalign::data::vignettes::{write_benchmark, VignettesConfig};
use ctxalign::models::blip::BlipItm;
use ctxalign::models::contextblip::ContextBlipConfig;
use ctxalign::models::ModelFiles;
use ctxalign::nn::gradcheck::gradient_free_by_construction;
use ctxalign::train::dist::run_in_process;
use ctxalign::train::Communicator;
use ctxalign::{Error, RunControl, Runtime};

const TIMEOUT: Duration = Duration::from_secs(120);

fn captions(dir: &Path) -> Vec<CaptionedImage> {
    let cfg = VignettesConfig {
        seed: 5,
        train_sets: 1,
        valid_sets: 1,
        test_sets: 1,
        caption_images: 40,
        class_images: 1,
        ..Default::default()
    };
    write_benchmark(&cfg, dir, &|_| {}).unwrap();
    read_caption_json(&dir.join("captions/train.json"), &dir.join("captions")).unwrap()
}

fn blip() -> ModelFiles {
    ModelFiles::from_dir(&ctxalign::default_model_dir().unwrap()).unwrap()
}

/// Per step: every number `metrics.jsonl` records of the loss terms.
fn loss_curve(dir: &Path, terms: &[&str]) -> Vec<Vec<f64>> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r.get("loss").is_some())
        .map(|r| terms.iter().map(|t| r[*t].as_f64().unwrap()).collect())
        .collect()
}

fn weights(file: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(file, &Device::Cpu).unwrap()
}

/// Every loss term within 1e-5 (relative) at every step; every tensor within 1e-5 of its scale
/// (max |a − b| ≤ 1e-5 · max(1, max |a|)). Tensors whose gradient is rounding noise by construction
/// (attention key biases: softmax is shift-invariant) are left out: Adam normalises that noise to
/// full-size steps in both runs, whose roundings differ.
fn assert_same_run(a: &Path, b: &Path, terms: &[&str], weights_file: &str) {
    assert_same_run_but(a, b, terms, weights_file, |_| false);
}

/// [`assert_same_run`] leaving out also the tensors `free` names (gradient-free in this model).
fn assert_same_run_but(a: &Path, b: &Path, terms: &[&str], weights_file: &str, free: impl Fn(&str) -> bool) {
    let (ca, cb) = (loss_curve(a, terms), loss_curve(b, terms));
    assert_eq!(ca.len(), cb.len(), "steps");
    for (step, (x, y)) in ca.iter().zip(&cb).enumerate() {
        for (t, (u, v)) in terms.iter().zip(x.iter().zip(y)) {
            assert!((u - v).abs() <= 1e-5 * u.abs().max(1e-3), "step {}: {t} {u} vs {v}", step + 1);
        }
    }
    let (wa, wb) = (weights(&a.join(weights_file)), weights(&b.join(weights_file)));
    assert_eq!(wa.len(), wb.len());
    let mut compared = 0;
    for (name, x) in &wa {
        if gradient_free_by_construction(name) || free(name) {
            continue;
        }
        let y = &wb[name];
        let scale = x.abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
        let diff = (x - y).unwrap().abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap();
        let diff = diff.to_scalar::<f64>().unwrap();
        assert!(diff <= 1e-5 * scale.max(1.0), "{name}: max |Δ| {diff:e} (scale {scale:e})");
        compared += 1;
    }
    assert!(compared > 0);
}

/// Runs `job` as one process (`world` 1) or on `world` in-process ranks; rank 0's result.
fn ranks<T: Send>(world: usize, job: impl Fn(Communicator) -> ctxalign::Result<T> + Sync) -> ctxalign::Result<T> {
    if world == 1 {
        return job(Communicator::single());
    }
    Ok(run_in_process(world, TIMEOUT, job).into_result()?.swap_remove(0))
}

fn s0_options(out: PathBuf, batch: usize, steps: u64, comm: Communicator) -> PretrainOptions {
    let cfg = ContextBlipConfig::for_blip(&BlipItm::read_config(&blip().config).unwrap());
    let mut opts = PretrainOptions::paper_schedule(out, cfg, steps);
    (opts.batch_size, opts.warmup_steps, opts.crop_scale) = (batch, 2, Some((0.5, 1.0)));
    opts.run = RunControl { seed: 3, progress: false, dist: comm, ..Default::default() };
    opts
}

#[test]
fn s0_on_two_and_three_ranks_trains_as_one_process_with_the_global_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let items = captions(&tmp.path().join("data"));
    for world in [2, 3] {
        let per_rank = 2;
        let one = tmp.path().join(format!("s0-1x{}", world * per_rank));
        let many = tmp.path().join(format!("s0-{world}x{per_rank}"));
        let single = ranks(1, |comm| {
            pretrain(&blip(), items.clone(), &s0_options(one.clone(), world * per_rank, 4, comm), &Runtime::cpu())
        })
        .unwrap();
        let distributed = ranks(world, |comm| {
            pretrain(&blip(), items.clone(), &s0_options(many.clone(), per_rank, 4, comm), &Runtime::cpu())
        })
        .unwrap();
        assert_eq!((single.outcome.world_size, distributed.outcome.world_size), (1, world));
        assert_eq!(distributed.outcome.steps, 4);
        assert_same_run(&one, &many, &["itm", "tmim", "grad_norm"], "contextblip.safetensors");
        // Rank 0 alone wrote the run folder; the record names the ranks.
        let record: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(many.join("training.json")).unwrap()).unwrap();
        assert_eq!(record["runtime"]["world_size"], world);
        assert_eq!(record["runtime"]["communicator"], "in-process");
    }
}

fn clip_options(out: PathBuf, batch: usize, steps: u64, comm: Communicator) -> TrainOptions {
    let mut opts = TrainOptions::cpu_default(out).unwrap();
    (opts.batch_size, opts.steps, opts.warmup_steps) = (batch, Some(steps), 2);
    opts.run = RunControl { seed: 9, progress: false, dist: comm, ..Default::default() };
    opts
}

#[test]
fn contextclip_on_two_and_three_ranks_trains_as_one_process_with_the_global_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let items = captions(&tmp.path().join("data"));
    for world in [2, 3] {
        let per_rank = 3;
        let one = tmp.path().join(format!("cc-1x{}", world * per_rank));
        let many = tmp.path().join(format!("cc-{world}x{per_rank}"));
        ranks(1, |comm| {
            train_contextclip(items.clone(), &clip_options(one.clone(), world * per_rank, 5, comm), &Runtime::cpu())
        })
        .unwrap();
        ranks(world, |comm| {
            train_contextclip(items.clone(), &clip_options(many.clone(), per_rank, 5, comm), &Runtime::cpu())
        })
        .unwrap();
        assert_same_run(&one, &many, &["clip", "cx", "grad_norm"], "model.safetensors");
    }
}

/// The data check is shared between the ranks: bad samples found by one rank stop every rank before
/// the first step, each with the same error naming them.
#[test]
fn bad_data_seen_by_one_rank_stops_every_rank_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let mut items = captions(&tmp.path().join("data"));
    items[7].image = PathBuf::from("/nonexistent/image.jpg");
    let out = tmp.path().join("s0");
    let run = run_in_process(2, TIMEOUT, |comm| {
        pretrain(&blip(), items.clone(), &s0_options(out.clone(), 2, 3, comm), &Runtime::cpu())
    });
    for r in &run.results {
        let err = r.as_ref().map(drop).unwrap_err().to_string();
        assert!(err.contains("1 of 36 samples cannot be used") && err.contains("nonexistent"), "{err}");
    }
    assert!(!out.join("checkpoints").exists());
}

#[test]
fn a_distributed_run_resumes_exactly_on_the_same_or_another_number_of_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let items = captions(&tmp.path().join("data"));
    // Straight: 6 steps on 2 ranks × 3.
    let straight = tmp.path().join("straight");
    ranks(2, |comm| pretrain(&blip(), items.clone(), &s0_options(straight.clone(), 3, 6, comm), &Runtime::cpu()))
        .unwrap();
    for (resume_world, resume_batch) in [(2, 3), (3, 2)] {
        let split = tmp.path().join(format!("split-{resume_world}"));
        ranks(2, |comm| pretrain(&blip(), items.clone(), &s0_options(split.clone(), 3, 3, comm), &Runtime::cpu()))
            .unwrap();
        let report = ranks(resume_world, |comm| {
            let mut opts = s0_options(split.clone(), resume_batch, 6, comm);
            opts.run.resume = true;
            pretrain(&blip(), items.clone(), &opts, &Runtime::cpu())
        })
        .unwrap();
        assert_eq!(report.outcome.steps, 6);
        let changed = (resume_world != 2).then_some((2, resume_world));
        assert_eq!(report.outcome.world_size_changed_on_resume, changed);
        assert_same_run(&straight, &split, &["itm", "tmim"], "contextblip.safetensors");
    }
    // Another global batch (3 ranks × 3 after 2 × 3): refused, the world size named.
    let err = ranks(3, |comm| {
        let mut opts = s0_options(straight.clone(), 3, 8, comm);
        opts.run.resume = true;
        pretrain(&blip(), items.clone(), &opts, &Runtime::cpu())
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("global_batch_size: 6 → 9") && err.contains("world size: 2 → 3 ranks"), "{err}");
    assert!(matches!(
        ranks(1, |comm| {
            let mut opts = s0_options(straight.clone(), 3, 8, comm);
            opts.run.resume = true;
            pretrain(&blip(), items.clone(), &opts, &Runtime::cpu())
        }),
        Err(Error::Train(_))
    ));
}

/// S1 and S2 sum their cross-entropies over a batch's descriptions (as the reference sums their
/// gradients): each rank's sum is scaled by the number of ranks, so 2 ranks × batch 2 train as one
/// process with batch 4 — losses (the global sums), gradient norms and weights. On the tiny BLIP,
/// S0 folder, S1 folder and IMAGECODE split of the step fixtures.
#[test]
fn s1_and_s2_on_two_ranks_sum_as_one_process_with_the_global_batch() {
    use ctxalign::contextblip::{candidate_features, finetune_s1, finetune_s2, FinetuneOptions, InterContextOptions};
    use ctxalign::data::imagecode::ImageCodeSplit;
    use ctxalign::{BlipScorer, ScorerOptions};
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let s1_case = fixtures.join("steps_contextblip_s1");
    let s2_case = fixtures.join("steps_contextblip_s2");
    let split = ImageCodeSplit::open(&s2_case.join("imagecode"), "train").unwrap();
    assert_eq!(split.examples.len(), 8);
    let tmp = tempfile::tempdir().unwrap();
    let blip = ModelFiles::from_dir(&s1_case.join("blip")).unwrap();
    let s1_options = |out: PathBuf, batch: usize, comm: Communicator| FinetuneOptions {
        out_dir: out,
        epochs: 2,
        batch_size: batch,
        backbone_lr: 1e-3,
        head_lr: 1e-2,
        run: RunControl { seed: 4, progress: false, dist: comm, ..Default::default() },
        ..Default::default()
    };
    let (one, many) = (tmp.path().join("s1-1x4"), tmp.path().join("s1-2x2"));
    for (world, batch, out) in [(1, 4, &one), (2, 2, &many)] {
        let report = ranks(world, |comm| {
            finetune_s1(
                &blip,
                &s1_case.join("s0"),
                split.clone(),
                &s1_options(out.clone(), batch, comm),
                &Runtime::cpu(),
            )
        })
        .unwrap();
        assert_eq!(report.outcome.steps, 4);
    }
    assert_same_run(&one, &many, &["ce", "grad_norm"], "model.safetensors");
    assert_same_run(&one, &many, &["ce", "grad_norm"], "contextblip.safetensors");

    let s1 = s2_case.join("s1");
    let scorer = BlipScorer::from_files(&ModelFiles::from_dir(&s1).unwrap(), ScorerOptions::default(), &Device::Cpu)
        .unwrap()
        .with_contextblip(&s1)
        .unwrap();
    let features = candidate_features(&scorer, &split, &|_| {}).unwrap();
    let s2_options = |out: PathBuf, batch: usize, comm: Communicator| InterContextOptions {
        out_dir: out,
        epochs: 2,
        batch_size: batch,
        lr: 1e-3,
        run: RunControl { seed: 4, progress: false, dist: comm, ..Default::default() },
        ..Default::default()
    };
    let (one, many) = (tmp.path().join("s2-1x4"), tmp.path().join("s2-2x2"));
    for (world, batch, out) in [(1, 4, &one), (2, 2, &many)] {
        let outcome = ranks(world, |comm| {
            finetune_s2(&s1, features.clone(), &s2_options(out.clone(), batch, comm), &Runtime::cpu())
        })
        .unwrap();
        assert_eq!(outcome.steps, 4);
    }
    // The last layer's output LayerNorm bias adds one vector to all 10 candidates, which the
    // softmax over them cancels: its gradient is rounding noise (and it starts at zero, so no
    // weight decay outweighs the noise).
    let last_bias = "inter_context.layer.1.output.LayerNorm.bias";
    assert_same_run_but(&one, &many, &["ce", "grad_norm"], "contextblip.safetensors", |n| n == last_bias);
}

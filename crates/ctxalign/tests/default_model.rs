//! The shipped default model (`models/blip-vignettes-small`) loads through the same path as an HF
//! checkpoint and clearly beats chance on Vignettes data it has never seen: a benchmark generated
//! here with a seed other than its training data's.

use std::path::{Path, PathBuf};

use candle_core::Device;
use ctxalign::data::captions::{read_caption_json, CaptionedImage};
use ctxalign::data::imagecode::ImageCodeSplit;
use ctxalign::data::vignettes::{write_benchmark, VignettesConfig};
use ctxalign::eval::accuracy::share;
use ctxalign::evaluate::{caption_retrieval, imagecode_zero_shot};
use ctxalign::models::ModelSource;
use ctxalign::{BlipScorer, ScorerOptions};

fn default_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/blip-vignettes-small")
}

fn scorer() -> BlipScorer {
    let files = ModelSource::Dir(default_model()).resolve().expect("the shipped model resolves as a model folder");
    BlipScorer::from_files(&files, ScorerOptions { max_tokens: 64, ..Default::default() }, &Device::Cpu)
        .expect("the shipped model loads through the HF-checkpoint loader")
}

/// Unseen data: seed 2026, while the model was trained on seed 0.
fn fresh_benchmark(dir: &Path) {
    let cfg = VignettesConfig {
        seed: 2026,
        train_sets: 1,
        valid_sets: 150,
        test_sets: 1,
        caption_images: 300,
        class_images: 1,
        ..Default::default()
    };
    write_benchmark(&cfg, dir, &|_| {}).unwrap();
}

#[test]
fn default_model_retrieves_unseen_listing_captions_far_above_chance() {
    let dir = tempfile::tempdir().unwrap();
    fresh_benchmark(dir.path());
    let captions = dir.path().join("captions");
    let mut items = read_caption_json(&captions.join("train.json"), &captions).unwrap();
    items.extend(read_caption_json(&captions.join("val.json"), &captions).unwrap());
    // The listing caption (every object and the background) of each image; each image a candidate.
    let items: Vec<CaptionedImage> = items.iter().map(CaptionedImage::first_caption_only).collect();
    let n = items.len();
    assert_eq!(n, 300);
    let report = caption_retrieval(&scorer(), &items, 16, &|_| {}).unwrap();
    let recall = |m: &ctxalign::eval::ranking::RetrievalMetrics, k: usize| {
        m.recall_at.iter().find(|(kk, _)| *kk == k).map(|(_, r)| *r).unwrap()
    };
    let chance_r1 = 1.0 / n as f64;
    let reranked = &report.reranked.as_ref().expect("caption_retrieval re-ranks").text_to_image;
    let (r1, r10) = (recall(reranked, 1), recall(reranked, 10));
    let itc_r1 = recall(&report.text_to_image, 1);
    eprintln!("unseen listings, {n} candidates: R@1 {r1:.3} (ITC alone {itc_r1:.3}), R@10 {r10:.3}; chance R@1 {chance_r1:.4}");
    assert!(r1 >= THRESHOLD_R1, "R@1 {r1} (chance {chance_r1})");
    assert!(r10 >= THRESHOLD_R10, "R@10 {r10} (chance {})", 10.0 * chance_r1);
    assert!(itc_r1 >= THRESHOLD_ITC_R1, "ITC-only R@1 {itc_r1}");
}

/// Zero-shot on sets of a seed it never saw: ITM (what the model was trained to do on groups of
/// near-identical scenes) and ITC both clearly above chance.
#[test]
fn default_model_beats_chance_zero_shot_on_unseen_sets() {
    let dir = tempfile::tempdir().unwrap();
    fresh_benchmark(dir.path());
    let split = ImageCodeSplit::open(&dir.path().join("imagecode"), "valid").unwrap();
    let report = imagecode_zero_shot(&scorer(), &split, &|_| {}).unwrap();
    let itc = share(&report.itc.accuracy, "all").unwrap();
    let itm = share(&report.itm.accuracy, "all").unwrap();
    let (_, total) = report.itc.accuracy["all"];
    eprintln!("zero-shot on {total} unseen descriptions: ITC {itc:.3}, ITM {itm:.3} (chance 0.1)");
    assert!(total >= 250, "enough descriptions for the margin below: {total}");
    assert!(itc >= THRESHOLD_ZERO_SHOT_ITC, "zero-shot ITC {itc} over {total} descriptions (chance 0.1)");
    assert!(itm >= THRESHOLD_ZERO_SHOT_ITM, "zero-shot ITM {itm} over {total} descriptions (chance 0.1)");
}

// Below the shipped model's measured values on this data (R@1 0.363, ITC-alone R@1 0.400, R@10 0.983;
// chance R@1 0.0033, R@10 0.033), each still ≥ 60× chance.
const THRESHOLD_R1: f64 = 0.20;
const THRESHOLD_R10: f64 = 0.85;
const THRESHOLD_ITC_R1: f64 = 0.30;
// Measured: ITC 0.184, ITM 0.194 over 283 descriptions. Chance is 0.1; with ≥ 250 descriptions its
// standard deviation is under 0.019, so 0.14 is over two of them above it.
const THRESHOLD_ZERO_SHOT_ITC: f64 = 0.12;
const THRESHOLD_ZERO_SHOT_ITM: f64 = 0.14;

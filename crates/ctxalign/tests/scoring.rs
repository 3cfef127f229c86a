//! The high-level scorer: shared text work over N images must equal scoring each pair alone, and
//! retrieval must follow BLIP's ITC-then-ITM ranking.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use ctxalign::models::ModelFiles;
use ctxalign::{BlipScorer, ScorerOptions};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn images() -> Vec<PathBuf> {
    ["landscape.png", "portrait.jpg", "gray.png", "alpha.png"]
        .iter()
        .map(|f| root().join("preprocess").join(f))
        .collect()
}

fn scorer() -> BlipScorer {
    let files = ModelFiles::from_dir(&root().join("blip_itm_tiny")).unwrap();
    BlipScorer::from_files(&files, ScorerOptions::default(), &Device::Cpu).unwrap()
}

#[test]
fn one_text_against_n_images_equals_pairwise_scoring() {
    let s = scorer();
    assert_eq!(s.enc_token_id, 30523);
    let encoded = s.encode_image_files(&images()).unwrap();
    let text = "A red square to the left of two small circles; the circles do not overlap.";
    let report = s.score(text, &encoded).unwrap();
    assert_eq!(report.scores.len(), 4);
    for (i, path) in images().iter().enumerate() {
        let single = s.encode_image_files(&[path]).unwrap();
        let alone = s.score(text, &single).unwrap();
        let (a, b) = (&alone.scores[0], &report.scores[i]);
        assert!(
            (a.itm_logits[0] - b.itm_logits[0]).abs() < 1e-5 && (a.itm_logits[1] - b.itm_logits[1]).abs() < 1e-5,
            "image {i}"
        );
        assert!((a.itc_similarity - b.itc_similarity).abs() < 1e-6);
        let p = 1.0 / (1.0 + (a.itm_logits[0] - a.itm_logits[1]).exp());
        assert!((p - a.itm_probability).abs() < 1e-6);
    }
    let best =
        report.scores.iter().enumerate().max_by(|a, b| a.1.itm_probability.total_cmp(&b.1.itm_probability)).unwrap().0;
    assert_eq!(report.best, best);
}

#[test]
fn retrieval_reranks_the_itc_top_k_by_itm_plus_itc() {
    let s = scorer();
    let encoded = s.encode_image_files(&images()).unwrap();
    let text = "three blue triangles";
    let report = s.score(text, &encoded).unwrap();
    let ranked = s.retrieve(text, &encoded, 2).unwrap();
    assert_eq!(ranked.len(), 4);
    let mut by_itc: Vec<usize> = (0..4).collect();
    by_itc.sort_by(|&a, &b| report.scores[b].itc_similarity.total_cmp(&report.scores[a].itc_similarity));
    let head: std::collections::BTreeSet<usize> = ranked[..2].iter().map(|c| c.index).collect();
    assert_eq!(head, by_itc[..2].iter().copied().collect());
    for c in &ranked[..2] {
        let sc = &report.scores[c.index];
        assert!((c.score - (sc.itm_logits[1] + sc.itc_similarity)).abs() < 1e-5);
    }
    assert!(ranked[0].score >= ranked[1].score);
    assert_eq!(ranked[2..].iter().map(|c| c.index).collect::<Vec<_>>(), by_itc[2..].to_vec());
}

#[test]
fn long_descriptions_are_truncated_and_reported() {
    let s = scorer();
    let encoded = s.encode_image_files(&images()[..1]).unwrap();
    let long = "the small red circle is behind the big blue square ".repeat(6);
    assert!(s.score(&long, &encoded).unwrap().truncated);
    assert!(!s.score("a red circle", &encoded).unwrap().truncated);
    let pixels = Tensor::zeros((1, 3, 64, 64), DType::F32, &Device::Cpu).unwrap();
    let emb = s.model.encode_images(&pixels).unwrap().itc_features;
    let norm = emb.sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap();
    assert!((norm - 1.0).abs() < 1e-5);
    let t = s.text_embeddings(&["a", "b c"]).unwrap();
    assert_eq!(t.dims(), &[2, 256]);
    let _ = t.i(0).unwrap();
}

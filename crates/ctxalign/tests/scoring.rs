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

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Images from memory (encoded bytes, a decoded image) embed as their files do; ITC-only states and
/// embeddings equal the full encoding's ITC features whatever the batch size; texts batched equal
/// texts one by one.
#[test]
fn embeddings_from_any_input_and_batch_size_equal_the_full_encoding() {
    let s = scorer();
    let paths = images();
    let full = s.encode_image_files(&paths).unwrap();
    let bytes: Vec<Vec<u8>> = paths.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let from_bytes = s.embed_images(&bytes).unwrap();
    assert_eq!(from_bytes.dims(), &[4, s.embedding_dim()]);
    assert!(max_diff(&from_bytes, &full.itc_features) < 1e-6);
    let states = s.image_states(&paths).unwrap();
    assert_eq!(states.len(), 4);
    assert!(max_diff(&states.itc_features, &full.itc_features) < 1e-6);
    let mut one_at_a_time = s.clone();
    one_at_a_time.options.batch_size = 1;
    assert!(max_diff(&one_at_a_time.embed_images(&paths).unwrap(), &from_bytes) < 1e-5);
    let texts = ["a red square", "two small circles that do not overlap", "three blue triangles"];
    let together = one_at_a_time.embed_texts(&texts).unwrap();
    for (i, text) in texts.iter().enumerate() {
        assert!(max_diff(&s.embed_texts(&[text]).unwrap(), &together.narrow(0, i, 1).unwrap()) < 1e-5, "{text}");
    }
    let sims = s.itc_similarities(&texts, &states).unwrap();
    assert_eq!(sims.dims(), &[3, 4]);
    let expected = together.matmul(&full.itc_features.t().unwrap()).unwrap();
    assert!(max_diff(&sims, &expected) < 1e-5);
    let mut none = s.clone();
    none.options.batch_size = 0;
    assert!(none.embed_images(&paths).is_err());
    assert_eq!(s.embed_images(Vec::<&Path>::new()).unwrap().dims(), &[0, s.embedding_dim()]);
}

/// Re-ranking from states (keys and values built for the top k only) ranks as the full encoding.
#[test]
fn retrieval_from_states_equals_retrieval_from_the_full_encoding() {
    let s = scorer();
    let full = s.encode_image_files(&images()).unwrap();
    let states = s.image_states(&images()).unwrap();
    for k in [0, 1, 2, 4, 9] {
        let a = s.retrieve("three blue triangles", &full, k).unwrap();
        let b = s.retrieve_states("three blue triangles", &states, k).unwrap();
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.index, y.index, "k {k}");
            assert!((x.score - y.score).abs() < 1e-5, "k {k}");
        }
    }
}

/// One scorer shared by 8 threads gives each the answers it gives one thread.
#[test]
fn eight_threads_share_one_scorer_and_get_the_single_thread_answers() {
    let s = scorer();
    let paths = images();
    let texts: Vec<String> = (0..8).map(|i| format!("{} red squares left of a circle", i + 1)).collect();
    let alone: Vec<Vec<f32>> = texts
        .iter()
        .map(|t| {
            s.itc_similarities(&[t.as_str()], &s.image_states(&paths).unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect();
    let shared = std::thread::scope(|scope| {
        let handles: Vec<_> = texts
            .iter()
            .map(|t| {
                let (s, paths) = (&s, &paths);
                scope.spawn(move || {
                    let states = s.image_states(paths).unwrap();
                    s.itc_similarities(&[t.as_str()], &states).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
    });
    for (i, (a, b)) in alone.iter().zip(&shared).enumerate() {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-6, "thread {i}: {x} vs {y}");
        }
    }
}

//! Evaluations of a [`BlipScorer`]: caption retrieval (BLIP's ITC top-k + ITM re-rank protocol) and
//! IMAGECODE-style zero-shot selection of the described image among 10.

use candle_core::{DType, Tensor};
use ctxalign_data::captions::CaptionedImage;
use ctxalign_data::imagecode::{accuracy_by_kind, ImageCodeSplit};
use ctxalign_eval::ranking::{retrieval_from_similarity, top_k, RetrievalMetrics};
use ctxalign_eval::GroupCounts;
use serde::Serialize;

use crate::scorer::BlipScorer;
use crate::Result;

/// Text→image and image→text retrieval over a caption set.
#[derive(Debug, Clone, Serialize)]
pub struct RetrievalReport {
    /// Text→image by ITC cosine alone.
    pub text_to_image_itc: RetrievalMetrics,
    /// Text→image with the ITC top-`rerank_k` re-ranked by `itm_logit[1] + itc` (BLIP's protocol).
    pub text_to_image: RetrievalMetrics,
    /// Image→text by ITC cosine.
    pub image_to_text_itc: RetrievalMetrics,
    pub rerank_k: usize,
}

/// Retrieval over `items` (each image a candidate; each of its captions a query whose positive it
/// is). `progress` receives the number of finished queries.
pub fn caption_retrieval(
    scorer: &BlipScorer,
    items: &[CaptionedImage],
    rerank_k: usize,
    progress: &dyn Fn(usize),
) -> Result<RetrievalReport> {
    let paths: Vec<&std::path::Path> = items.iter().map(|i| i.image.as_path()).collect();
    let images = scorer.encode_image_files(&paths)?;
    let (queries, owners) = caption_queries(items);
    let mut text_features = vec![];
    for chunk in queries.chunks(256) {
        text_features.push(scorer.text_embeddings(chunk)?);
    }
    let text_features = Tensor::cat(&text_features, 0)?;
    // [texts, images]
    let sim: Vec<Vec<f32>> = text_features.matmul(&images.itc_features.t()?)?.to_dtype(DType::F32)?.to_vec2()?;
    let ks = [1, 5, 10];
    let (text_to_image_itc, image_to_text_itc) = retrieval_from_similarity(&sim, &owners, &ks);
    let positives: Vec<Vec<usize>> = owners.iter().map(|&o| vec![o]).collect();
    let mut reranked = Vec::with_capacity(queries.len());
    for (q, text) in queries.iter().enumerate() {
        reranked.push(scorer.retrieve(text, &images, rerank_k)?.into_iter().map(|c| c.index).collect());
        progress(q + 1);
    }
    let text_to_image = RetrievalMetrics::compute(&reranked, &positives, &ks);
    Ok(RetrievalReport { text_to_image_itc, text_to_image, image_to_text_itc, rerank_k })
}

/// Every caption of `items` as a retrieval query, and the index of the image it describes.
pub fn caption_queries(items: &[CaptionedImage]) -> (Vec<&str>, Vec<usize>) {
    items.iter().enumerate().flat_map(|(i, item)| item.captions.iter().map(move |c| (c.as_str(), i))).unzip()
}

/// Picks, for every description of an IMAGECODE split, the image of its set with the highest score.
#[derive(Debug, Clone, Serialize)]
pub struct ImageCodeReport {
    /// Predicted index per description (file order) by ITM match probability.
    pub itm_predictions: Vec<usize>,
    /// … and by ITC cosine.
    pub itc_predictions: Vec<usize>,
    /// `group → (correct, total)` for "all", "video", "static" and each category, by ITM.
    pub itm_accuracy: GroupCounts,
    pub itc_accuracy: GroupCounts,
}

/// Zero-shot IMAGECODE: each set's 10 images are encoded once and shared by its descriptions.
/// `progress` receives the number of finished sets.
pub fn imagecode_zero_shot(
    scorer: &BlipScorer,
    split: &ImageCodeSplit,
    progress: &dyn Fn(usize),
) -> Result<ImageCodeReport> {
    let n = split.examples.len();
    let (mut itm_predictions, mut itc_predictions) = (vec![0; n], vec![0; n]);
    for (s, set) in split.sets().into_iter().enumerate() {
        let images = scorer.encode_image_files(&split.set_images(set)?)?;
        for (e, ex) in split.examples.iter().enumerate().filter(|(_, ex)| ex.set == set) {
            let report = scorer.score(&ex.description, &images)?;
            itm_predictions[e] = report.best;
            let itc: Vec<f32> = report.scores.iter().map(|p| p.itc_similarity).collect();
            itc_predictions[e] = top_k(&itc, 1)[0];
        }
        progress(s + 1);
    }
    let itm_accuracy = accuracy_by_kind(split, &itm_predictions);
    let itc_accuracy = accuracy_by_kind(split, &itc_predictions);
    Ok(ImageCodeReport { itm_predictions, itc_predictions, itm_accuracy, itc_accuracy })
}

/// MMVP-VLM pair scoring (docs/reference-notes.md §3).
#[derive(Debug, Clone, Serialize)]
pub struct MmvpReport {
    /// `pattern → (pairs with both statements right, pairs)`, plus `"all"`.
    pub accuracy: GroupCounts,
    /// Per pair: whether statement 0 and statement 1 picked their own image.
    pub pairs: Vec<[bool; 2]>,
}

/// Each statement's prompt (`"a photo of " + statement`) is scored against the pair's two images;
/// the softmax over the two ITM match scores picks one. Statement 0 (odd question id) belongs to
/// image 0. A pair counts only when both statements pick their own image.
pub fn mmvp(scorer: &BlipScorer, pairs: &[ctxalign_data::mmvp::MmvpPair]) -> Result<MmvpReport> {
    let mut accuracy: GroupCounts = GroupCounts::new();
    let mut results = Vec::with_capacity(pairs.len());
    for pair in pairs {
        let images = scorer.encode_image_files(&pair.images)?;
        let prompts = pair.prompts();
        let mut right = [false; 2];
        for (j, prompt) in prompts.iter().enumerate() {
            let report = scorer.score(prompt, &images)?;
            // The softmax over the two images preserves the order of the match scores.
            let picked = ctxalign_eval::top_k(
                &report.scores.iter().map(|s| s.itm_logits[1] - s.itm_logits[0]).collect::<Vec<f32>>(),
                1,
            )[0];
            right[j] = picked == j;
        }
        let ok = (right[0] && right[1]) as usize;
        for key in ["all", pair.pattern.as_str()] {
            let e = accuracy.entry(key.to_string()).or_default();
            e.0 += ok;
            e.1 += 1;
        }
        results.push(right);
    }
    Ok(MmvpReport { accuracy, pairs: results })
}

//! Evaluations of a [`BlipScorer`]: caption retrieval (BLIP's ITC top-k + ITM re-rank protocol) and
//! IMAGECODE-style zero-shot selection of the described image among 10.

use ctxalign_data::captions::CaptionedImage;
use ctxalign_data::imagecode::ImageCodeSplit;
use ctxalign_eval::imagecode::{score_sets, select, Selection};
use ctxalign_eval::ranking::{argmax, RetrievalReport};
use ctxalign_eval::{count_by_group, GroupCounts};
use serde::Serialize;

use crate::scorer::BlipScorer;
use crate::Result;

/// Retrieval over `items` (each image a candidate; each of its captions a query whose positive it
/// is) by BLIP's protocol: text→image and image→text by ITC cosine, and text→image with each
/// query's ITC top-`rerank_k` re-ranked by `itm_logit[1] + itc` ([`RetrievalReport::reranked`]).
/// `progress` receives the number of finished queries.
pub fn caption_retrieval(
    scorer: &BlipScorer,
    items: &[CaptionedImage],
    rerank_k: usize,
    progress: &dyn Fn(usize),
) -> Result<RetrievalReport> {
    // Image states only (tokens and ITC features, no cross-attention memory: 14 MB an image at
    // 224 px in f32 would not fit for a 5,000-image test split); each query's re-rank builds keys
    // and values for its top k alone.
    let paths: Vec<&std::path::Path> = items.iter().map(|i| i.image.as_path()).collect();
    let images = scorer.image_states(&paths)?;
    let (queries, owners) = caption_queries(items);
    // [texts, images]
    let sim: Vec<Vec<f32>> = scorer.itc_similarities(&queries, &images)?.to_vec2()?;
    let report = RetrievalReport::from_similarity(&sim, &owners, &[1, 5, 10])?;
    let mut reranked = Vec::with_capacity(queries.len());
    for (q, text) in queries.iter().enumerate() {
        reranked.push(scorer.retrieve_states(text, &images, rerank_k)?.into_iter().map(|c| c.index).collect());
        progress(q + 1);
    }
    Ok(report.with_reranked(rerank_k, &reranked, &owners)?)
}

/// Every caption of `items` as a retrieval query, and the index of the image it describes.
pub fn caption_queries(items: &[CaptionedImage]) -> (Vec<&str>, Vec<usize>) {
    items.iter().enumerate().flat_map(|(i, item)| item.captions.iter().map(move |c| (c.as_str(), i))).unzip()
}

/// Zero-shot IMAGECODE with BLIP (or ContextBLIP): the image of each description's set chosen by
/// ITM match probability and, from the same pass, by ITC cosine.
#[derive(Debug, Clone, Serialize)]
pub struct ImageCodeReport {
    /// By ITM match probability: predictions in split order and accuracy by group.
    pub itm: Selection,
    /// By ITC cosine.
    pub itc: Selection,
}

/// Zero-shot IMAGECODE ([`ctxalign_eval::imagecode`]'s protocol): each set's 10 images are encoded
/// once and shared by its descriptions. `progress` receives the number of finished sets.
pub fn imagecode_zero_shot(
    scorer: &BlipScorer,
    split: &ImageCodeSplit,
    progress: &dyn Fn(usize),
) -> Result<ImageCodeReport> {
    // Per description: (ITM probabilities, ITC cosines), each [10].
    let scores = score_sets(split, progress, |set, descriptions| -> Result<Vec<(Vec<f32>, Vec<f32>)>> {
        let images = scorer.encode_image_files(&split.set_images(set)?)?;
        descriptions
            .iter()
            .map(|ex| {
                let report = scorer.score(&ex.description, &images)?;
                Ok(report.scores.iter().map(|p| (p.itm_probability, p.itc_similarity)).unzip())
            })
            .collect()
    })?;
    let (itm, itc): (Vec<Vec<f32>>, Vec<Vec<f32>>) = scores.into_iter().unzip();
    Ok(ImageCodeReport { itm: select(split, &itm)?, itc: select(split, &itc)? })
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
    let mut results = Vec::with_capacity(pairs.len());
    for pair in pairs {
        let images = scorer.encode_image_files(&pair.images)?;
        let prompts = pair.prompts();
        let mut right = [false; 2];
        for (j, prompt) in prompts.iter().enumerate() {
            let report = scorer.score(prompt, &images)?;
            // The softmax over the two images preserves the order of the match scores.
            let picked =
                argmax(&report.scores.iter().map(|s| s.itm_logits[1] - s.itm_logits[0]).collect::<Vec<f32>>())?;
            right[j] = picked == j;
        }
        results.push(right);
    }
    let accuracy = count_by_group(results.iter().zip(pairs).map(|(r, p)| (r[0] && r[1], [p.pattern.as_str()])));
    Ok(MmvpReport { accuracy, pairs: results })
}

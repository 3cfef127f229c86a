//! Ranking and retrieval metrics over plain score vectors (model-agnostic), and the one
//! [`RetrievalReport`]: similarity-ranked retrieval, with BLIP's re-ranked text→image as an
//! optional part.

use serde::Serialize;

use crate::error::{check_finite, EvalError};

/// One candidate after ranking.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RankedCandidate {
    pub index: usize,
    /// The score the order was decided by.
    pub score: f32,
}

/// Indices of the `k` highest scores, best first (ties keep the lower index first). NaN ranks last.
pub fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| {
        let (x, y) = (scores[a], scores[b]);
        match (x.is_nan(), y.is_nan()) {
            (true, false) => std::cmp::Ordering::Greater,
            (false, true) => std::cmp::Ordering::Less,
            _ => y.partial_cmp(&x).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b)),
        }
    });
    order.truncate(k);
    order
}

/// The index of the highest score; a tie goes to the lowest index (as in [`top_k`]). Unlike
/// [`top_k`], which ranks NaN last, a choice is refused when any score is NaN or ±inf (a model that
/// overflowed must not be scored as if it had picked something), and when there is no score.
pub fn argmax(scores: &[f32]) -> Result<usize, EvalError> {
    argmax_of(scores, || "scores".into())
}

/// [`argmax`] with `what` naming the scores in its errors.
pub(crate) fn argmax_of(scores: &[f32], what: impl Fn() -> String) -> Result<usize, EvalError> {
    check_finite(scores, &what)?;
    // Only a strictly higher score replaces the best so far, so the first of equal maxima stays.
    let (best, _) = scores
        .iter()
        .enumerate()
        .fold(None, |best: Option<(usize, f32)>, (i, &s)| match best {
            Some((_, b)) if s <= b => best,
            _ => Some((i, s)),
        })
        .ok_or_else(|| EvalError::empty(what(), "no candidate to choose among"))?;
    Ok(best)
}

/// BLIP's retrieval ranking: keep the `k` best candidates by ITC, score each with
/// `itm_score(index)` (BLIP: the ITM match logit) and order them by `itm + itc`; candidates outside
/// the top k follow in ITC order with their ITC score. `itm_score` is called once per kept candidate.
pub fn rerank_top_k<E>(
    itc: &[f32],
    k: usize,
    mut itm_score: impl FnMut(&[usize]) -> Result<Vec<f32>, E>,
) -> Result<Vec<RankedCandidate>, E> {
    let by_itc = top_k(itc, itc.len());
    let k = k.min(itc.len());
    let kept = &by_itc[..k];
    // k = 0 (or no candidates): nothing to re-rank, and a model asked to score an empty batch
    // may refuse it.
    let itm = if kept.is_empty() { vec![] } else { itm_score(kept)? };
    assert_eq!(itm.len(), kept.len(), "itm_score must return one score per candidate");
    let mut head: Vec<RankedCandidate> =
        kept.iter().zip(&itm).map(|(&index, &m)| RankedCandidate { index, score: m + itc[index] }).collect();
    let head_scores: Vec<f32> = head.iter().map(|c| c.score).collect();
    let order = top_k(&head_scores, head.len());
    let mut ranked: Vec<RankedCandidate> = order.into_iter().map(|i| head[i].clone()).collect();
    head.clear();
    ranked.extend(by_itc[k..].iter().map(|&index| RankedCandidate { index, score: itc[index] }));
    Ok(ranked)
}

/// Recall@k and rank statistics of a set of queries.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetrievalMetrics {
    /// `(k, recall)`: share of queries with at least one positive in the top k.
    pub recall_at: Vec<(usize, f64)>,
    /// Mean and median of the 1-based rank of the best-ranked positive.
    pub mean_rank: f64,
    pub median_rank: f64,
    pub queries: usize,
}

impl RetrievalMetrics {
    /// `rankings[q]` is query q's candidate order (best first); `positives[q]` its correct
    /// candidates. The rank of a query is the 1-based position of its best-ranked positive; a
    /// query whose positives are all absent from its ranking (a ranking cut short) is a miss at
    /// every k and enters the mean and median rank as `ranking.len() + 1`. A `k` beyond a
    /// ranking's length counts the whole ranking (recall@k is then the share of queries with a
    /// positive anywhere in it).
    ///
    /// Errors: `rankings` and `positives` of different lengths, no query, a query with no
    /// positive (it could not be found, and counting it as a miss would be a wrong number), or a
    /// `k` of 0.
    pub fn compute(rankings: &[Vec<usize>], positives: &[Vec<usize>], ks: &[usize]) -> Result<Self, EvalError> {
        if rankings.len() != positives.len() {
            return Err(EvalError::length("positive sets for the rankings", rankings.len(), positives.len()));
        }
        if rankings.is_empty() {
            return Err(EvalError::empty("retrieval", "no query to rank for"));
        }
        if ks.contains(&0) {
            return Err(EvalError::ZeroK);
        }
        if let Some(q) = positives.iter().position(Vec::is_empty) {
            return Err(EvalError::empty(format!("query {q}"), "it has no positive to find"));
        }
        // `None`: no positive in the ranking — a miss at every k, however large (its stand-in rank
        // `len + 1` would otherwise count at any k beyond the ranking).
        let found: Vec<Option<usize>> =
            rankings.iter().zip(positives).map(|(r, p)| r.iter().position(|c| p.contains(c)).map(|i| i + 1)).collect();
        let ranks: Vec<usize> = found.iter().zip(rankings).map(|(f, r)| f.unwrap_or(r.len() + 1)).collect();
        let n = ranks.len() as f64;
        let recall_at =
            ks.iter().map(|&k| (k, found.iter().filter(|f| f.is_some_and(|r| r <= k)).count() as f64 / n)).collect();
        let mut sorted = ranks.clone();
        sorted.sort_unstable();
        let l = sorted.len();
        let median_rank = match l % 2 {
            1 => sorted[l / 2] as f64,
            _ => (sorted[l / 2 - 1] + sorted[l / 2]) as f64 / 2.0,
        };
        Ok(Self { recall_at, mean_rank: ranks.iter().sum::<usize>() as f64 / n, median_rank, queries: l })
    }
}

/// Text→image and image→text retrieval over a caption set: each text is a query whose positive is
/// the image it describes; each image a query whose positives are all its texts. The one report
/// of both protocols: a plain similarity ranking (CLIP, ContextCLIP, BLIP's ITC), and BLIP's,
/// which re-ranks each text's top k by ITM and keeps the similarity numbers beside as "before".
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetrievalReport {
    /// Text→image, ranked by the similarity (BLIP: ITC cosine).
    pub text_to_image: RetrievalMetrics,
    /// Image→text, ranked by the similarity.
    pub image_to_text: RetrievalMetrics,
    /// Text→image after re-ranking; absent for a plain similarity ranking.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reranked: Option<RerankedRetrieval>,
}

/// Text→image after each query's `k` best candidates by similarity were re-scored (BLIP: by
/// `itm_logit[1] + itc`, [`rerank_top_k`]); the rest keep their similarity order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RerankedRetrieval {
    /// Candidates re-scored per query, as asked (a `k` beyond the candidates re-scores them all).
    pub k: usize,
    /// Recall@k (the same cut-offs as the similarity's) and ranks after re-ranking.
    pub text_to_image: RetrievalMetrics,
}

impl RetrievalReport {
    /// Both directions from a `[texts][images]` similarity matrix where text `q` describes image
    /// `owners[q]`, with recall at each of `ks`. Ties rank the lower index first ([`top_k`]).
    ///
    /// Errors: `owners` not one per row, no text, rows of different lengths or with no image, a
    /// NaN or infinite similarity, an owner outside the images, an image no text describes (it
    /// would be an image→text query with nothing to find), a `k` of 0.
    pub fn from_similarity(similarity: &[Vec<f32>], owners: &[usize], ks: &[usize]) -> Result<Self, EvalError> {
        if similarity.len() != owners.len() {
            return Err(EvalError::length(
                "owners for the similarity rows (one per text)",
                similarity.len(),
                owners.len(),
            ));
        }
        let n_images = similarity.first().map(Vec::len).ok_or_else(|| EvalError::empty("retrieval", "no text"))?;
        if n_images == 0 {
            return Err(EvalError::empty("retrieval", "no image"));
        }
        for (q, (row, &owner)) in similarity.iter().zip(owners).enumerate() {
            if row.len() != n_images {
                return Err(EvalError::length(format!("similarity row {q} (images)"), n_images, row.len()));
            }
            check_finite(row, || format!("similarity row {q}"))?;
            if owner >= n_images {
                return Err(EvalError::out_of_range(format!("owner of text {q}"), owner, n_images));
            }
        }
        let text_rankings: Vec<Vec<usize>> = similarity.iter().map(|row| top_k(row, n_images)).collect();
        let text_positives: Vec<Vec<usize>> = owners.iter().map(|&o| vec![o]).collect();
        let text_to_image = RetrievalMetrics::compute(&text_rankings, &text_positives, ks)?;
        let image_rankings: Vec<Vec<usize>> = (0..n_images)
            .map(|i| top_k(&similarity.iter().map(|row| row[i]).collect::<Vec<f32>>(), similarity.len()))
            .collect();
        let mut image_positives: Vec<Vec<usize>> = vec![vec![]; n_images];
        for (q, &o) in owners.iter().enumerate() {
            image_positives[o].push(q);
        }
        if let Some(i) = image_positives.iter().position(Vec::is_empty) {
            return Err(EvalError::empty(
                format!("image {i}"),
                "no text describes it (an image→text query with no positive)",
            ));
        }
        let image_to_text = RetrievalMetrics::compute(&image_rankings, &image_positives, ks)?;
        Ok(Self { text_to_image, image_to_text, reranked: None })
    }

    /// Adds text→image after re-ranking: `rankings[q]` is text q's image order once its top `k`
    /// by similarity were re-scored, `owners` the same as [`Self::from_similarity`]'s; recall is
    /// taken at the cut-offs of the similarity's numbers.
    ///
    /// Errors: not one ranking per text of this report, an image index outside its images.
    pub fn with_reranked(mut self, k: usize, rankings: &[Vec<usize>], owners: &[usize]) -> Result<Self, EvalError> {
        let texts = self.text_to_image.queries;
        let images = self.image_to_text.queries;
        if owners.len() != texts {
            return Err(EvalError::length("owners of the re-ranked texts", texts, owners.len()));
        }
        if rankings.len() != texts {
            return Err(EvalError::length("re-rankings (one per text)", texts, rankings.len()));
        }
        for (q, ranking) in rankings.iter().enumerate() {
            if let Some(&bad) = ranking.iter().find(|&&i| i >= images) {
                return Err(EvalError::out_of_range(format!("re-ranking of text {q}"), bad, images));
            }
        }
        let ks: Vec<usize> = self.text_to_image.recall_at.iter().map(|&(k, _)| k).collect();
        let positives: Vec<Vec<usize>> = owners.iter().map(|&o| vec![o]).collect();
        let text_to_image = RetrievalMetrics::compute(rankings, &positives, &ks)?;
        self.reranked = Some(RerankedRetrieval { k, text_to_image });
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_and_breaks_ties_by_index() {
        assert_eq!(top_k(&[0.1, 0.9, 0.5, 0.9, f32::NAN], 5), vec![1, 3, 2, 0, 4]);
        assert_eq!(top_k(&[3.0, 1.0], 1), vec![0]);
    }

    #[test]
    fn rerank_uses_itm_plus_itc_for_the_top_k_only() {
        let itc = [0.9f32, 0.8, 0.1, 0.7];
        let mut asked = vec![];
        let ranked = rerank_top_k::<()>(&itc, 3, |idx| {
            asked.extend_from_slice(idx);
            // ITM strongly prefers candidate 3.
            Ok(idx.iter().map(|&i| if i == 3 { 5.0 } else { 0.0 }).collect())
        })
        .unwrap();
        assert_eq!(asked, vec![0, 1, 3]);
        let order: Vec<usize> = ranked.iter().map(|c| c.index).collect();
        assert_eq!(order, vec![3, 0, 1, 2]);
        assert!((ranked[0].score - 5.7).abs() < 1e-6);
    }

    #[test]
    fn recall_counts_any_positive_and_ranks() {
        let rankings = vec![vec![2, 0, 1], vec![1, 2, 0], vec![0, 1, 2]];
        let positives = vec![vec![0], vec![0, 2], vec![5]];
        let m = RetrievalMetrics::compute(&rankings, &positives, &[1, 2, 10]).unwrap();
        // ranks: 2, 2, 4 (absent: a ranking of 3 plus one); k = 10 beyond the 3 candidates counts
        // every ranking whole, so only the query whose positive is absent misses.
        assert_eq!(m.recall_at, vec![(1, 0.0), (2, 2.0 / 3.0), (10, 2.0 / 3.0)]);
        assert!((m.mean_rank - 8.0 / 3.0).abs() < 1e-12);
        assert_eq!(m.median_rank, 2.0);
        assert_eq!(m.queries, 3);
        // Even count: the median is the mean of the middle two ranks (1 and 3).
        let m = RetrievalMetrics::compute(&[vec![0, 1, 2], vec![1, 2, 0]], &[vec![0], vec![0]], &[1]).unwrap();
        assert_eq!((m.median_rank, m.mean_rank, m.recall_at.clone()), (2.0, 2.0, vec![(1, 0.5)]));
    }

    #[test]
    fn recall_refuses_what_it_cannot_count() {
        let r = vec![vec![0, 1]];
        assert!(matches!(
            RetrievalMetrics::compute(&r, &[vec![0], vec![1]], &[1]),
            Err(EvalError::Length { expected: 1, found: 2, .. })
        ));
        assert!(matches!(RetrievalMetrics::compute(&[], &[], &[1]), Err(EvalError::Empty { .. })));
        assert_eq!(RetrievalMetrics::compute(&r, &[vec![0]], &[1, 0]), Err(EvalError::ZeroK));
        assert!(matches!(RetrievalMetrics::compute(&r, &[vec![]], &[1]), Err(EvalError::Empty { .. })));
    }

    #[test]
    fn argmax_takes_the_first_maximum_and_refuses_nan() {
        assert_eq!(argmax(&[0.2, 0.7, 0.7, 0.1]), Ok(1));
        assert_eq!(argmax(&[-3.0, -1.0, -2.0]), Ok(1));
        assert_eq!(argmax(&[5.0]), Ok(0));
        assert!(matches!(argmax(&[]), Err(EvalError::Empty { .. })));
        assert!(matches!(argmax(&[0.1, f32::NAN, 0.3]), Err(EvalError::NonFinite { candidate: 1, .. })));
        assert!(matches!(argmax(&[f32::INFINITY, 0.0]), Err(EvalError::NonFinite { candidate: 0, .. })));
    }

    /// 3 texts, 2 images; texts 0 and 1 describe image 0, text 2 image 1.
    fn similarity() -> (Vec<Vec<f32>>, Vec<usize>) {
        let sim = vec![
            vec![0.9, 0.1], // order [0, 1]: its image first → rank 1
            vec![0.2, 0.5], // order [1, 0] → rank 2
            vec![0.3, 0.3], // a tie ranks the lower index first: [0, 1] → rank 2
        ];
        (sim, vec![0, 0, 1])
    }

    #[test]
    fn report_from_similarity_by_hand() {
        let (sim, owners) = similarity();
        let r = RetrievalReport::from_similarity(&sim, &owners, &[1, 2, 5]).unwrap();
        // Text→image ranks 1, 2, 2; k = 5 beyond the 2 images counts every ranking whole.
        let t2i = &r.text_to_image;
        assert_eq!(t2i.recall_at, vec![(1, 1.0 / 3.0), (2, 1.0), (5, 1.0)]);
        assert!((t2i.mean_rank - 5.0 / 3.0).abs() < 1e-12);
        assert_eq!((t2i.median_rank, t2i.queries), (2.0, 3));
        // Image 0's column [0.9, 0.2, 0.3] orders texts [0, 2, 1]; text 0 is its → rank 1. Image 1's
        // [0.1, 0.5, 0.3] orders [1, 2, 0]; its text 2 → rank 2.
        let i2t = &r.image_to_text;
        assert_eq!(i2t.recall_at, vec![(1, 0.5), (2, 1.0), (5, 1.0)]);
        assert_eq!((i2t.mean_rank, i2t.median_rank, i2t.queries), (1.5, 1.5, 2));
        assert_eq!(r.reranked, None);
        let json = serde_json::to_value(&r).unwrap();
        assert!(json.get("reranked").is_none() && json["image_to_text"]["queries"] == 2, "{json}");

        // Re-ranking put every text's image first: R@1 1 at the similarity's cut-offs.
        let r = r.with_reranked(2, &[vec![0, 1], vec![0, 1], vec![1, 0]], &owners).unwrap();
        let re = r.reranked.as_ref().unwrap();
        assert_eq!(re.k, 2);
        assert_eq!(re.text_to_image.recall_at, vec![(1, 1.0), (2, 1.0), (5, 1.0)]);
        assert_eq!(re.text_to_image.mean_rank, 1.0);
        // The similarity ("before") numbers stay as they were.
        assert_eq!(r.text_to_image.recall_at[0], (1, 1.0 / 3.0));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["reranked"]["k"], 2);
        assert_eq!(json["reranked"]["text_to_image"]["mean_rank"], 1.0);
    }

    #[test]
    fn report_refuses_bad_similarity() {
        let (sim, owners) = similarity();
        let err = |sim: &[Vec<f32>], owners: &[usize]| RetrievalReport::from_similarity(sim, owners, &[1]).unwrap_err();
        assert!(matches!(err(&sim, &owners[..2]), EvalError::Length { expected: 3, found: 2, .. }));
        assert!(matches!(err(&[], &[]), EvalError::Empty { .. }));
        assert!(matches!(err(&[vec![]], &[0]), EvalError::Empty { .. }));
        let mut ragged = sim.clone();
        ragged[1].push(0.0);
        assert!(matches!(err(&ragged, &owners), EvalError::Length { expected: 2, found: 3, .. }));
        let mut nan = sim.clone();
        nan[2][1] = f32::NAN;
        assert!(matches!(err(&nan, &owners), EvalError::NonFinite { candidate: 1, .. }));
        assert!(matches!(err(&sim, &[0, 0, 2]), EvalError::OutOfRange { index: 2, candidates: 2, .. }));
        // Image 1 described by no text.
        assert!(matches!(err(&sim, &[0, 0, 0]), EvalError::Empty { .. }));

        let r = RetrievalReport::from_similarity(&sim, &owners, &[1]).unwrap();
        assert!(matches!(
            r.clone().with_reranked(2, &[vec![0, 1]], &owners),
            Err(EvalError::Length { expected: 3, found: 1, .. })
        ));
        assert!(matches!(
            r.clone().with_reranked(2, &[vec![0], vec![0], vec![1]], &owners[..1]),
            Err(EvalError::Length { expected: 3, found: 1, .. })
        ));
        assert!(matches!(
            r.with_reranked(2, &[vec![0, 1], vec![0, 7], vec![1, 0]], &owners),
            Err(EvalError::OutOfRange { index: 7, candidates: 2, .. })
        ));
    }
}

//! Ranking and retrieval metrics over plain score vectors (model-agnostic).

use serde::Serialize;

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
    /// candidates. A query whose positives are all absent from its ranking gets rank
    /// `ranking.len() + 1`.
    pub fn compute(rankings: &[Vec<usize>], positives: &[Vec<usize>], ks: &[usize]) -> Self {
        assert_eq!(rankings.len(), positives.len(), "one positive set per query");
        let ranks: Vec<usize> = rankings
            .iter()
            .zip(positives)
            .map(|(r, p)| r.iter().position(|c| p.contains(c)).map(|i| i + 1).unwrap_or(r.len() + 1))
            .collect();
        let n = ranks.len().max(1) as f64;
        let recall_at = ks.iter().map(|&k| (k, ranks.iter().filter(|&&r| r <= k).count() as f64 / n)).collect();
        let mut sorted = ranks.clone();
        sorted.sort_unstable();
        let median_rank = match sorted.len() {
            0 => f64::NAN,
            l if l % 2 == 1 => sorted[l / 2] as f64,
            l => (sorted[l / 2 - 1] + sorted[l / 2]) as f64 / 2.0,
        };
        Self {
            recall_at,
            mean_rank: if ranks.is_empty() { f64::NAN } else { ranks.iter().sum::<usize>() as f64 / n },
            median_rank,
            queries: ranks.len(),
        }
    }
}

/// Text→image and image→text retrieval from a `[texts][images]` similarity matrix where text `q`
/// describes image `owners[q]`: each text's positive is its image; each image's positives are all
/// its texts (a query counts at k when at least one positive is in its top k).
pub fn retrieval_from_similarity(
    similarity: &[Vec<f32>],
    owners: &[usize],
    ks: &[usize],
) -> (RetrievalMetrics, RetrievalMetrics) {
    let n_images = similarity.first().map_or(0, |r| r.len());
    let text_rankings: Vec<Vec<usize>> = similarity.iter().map(|row| top_k(row, row.len())).collect();
    let text_positives: Vec<Vec<usize>> = owners.iter().map(|&o| vec![o]).collect();
    let text_to_image = RetrievalMetrics::compute(&text_rankings, &text_positives, ks);
    let image_rankings: Vec<Vec<usize>> = (0..n_images)
        .map(|i| top_k(&similarity.iter().map(|row| row[i]).collect::<Vec<f32>>(), similarity.len()))
        .collect();
    let image_positives: Vec<Vec<usize>> =
        (0..n_images).map(|i| (0..owners.len()).filter(|&q| owners[q] == i).collect()).collect();
    (text_to_image, RetrievalMetrics::compute(&image_rankings, &image_positives, ks))
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
        let m = RetrievalMetrics::compute(&rankings, &positives, &[1, 2]);
        // ranks: 2, 2, 4 (absent)
        assert_eq!(m.recall_at, vec![(1, 0.0), (2, 2.0 / 3.0)]);
        assert!((m.mean_rank - 8.0 / 3.0).abs() < 1e-12);
        assert_eq!(m.median_rank, 2.0);
    }
}

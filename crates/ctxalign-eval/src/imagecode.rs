//! IMAGECODE's zero-shot protocol, once for every model: each description scores the 10 images of
//! its set, the highest score is the prediction, and accuracy is counted over the labeled
//! descriptions in `all`, by kind (`video` / `static`) and by category.
//!
//! How the scores are obtained is the caller's: [`zero_shot`] asks a closure for one set's scores
//! at a time (so a set's images are encoded once for all its descriptions), and [`select`] takes
//! scores already computed (a fine-tuned head's logits). BLIP, ContextBLIP and ContextCLIP all
//! reach the numbers through [`select`] and [`accuracy`].

use std::collections::HashMap;

use ctxalign_data::imagecode::{ImageCodeExample, ImageCodeSplit, SET_SIZE};
use serde::Serialize;

use crate::accuracy::{count_by_group, GroupCounts};
use crate::error::EvalError;
use crate::ranking::argmax_of;

/// Each description's chosen image and the accuracy of the choices.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Selection {
    /// The chosen image's index in its set (0..10), per description in split order.
    pub predictions: Vec<usize>,
    /// `group → (correct, total)` over the labeled descriptions: `all`, the kind, each category
    /// ([`accuracy`]); empty for an unlabeled split.
    pub accuracy: GroupCounts,
}

/// Scores every description of `split`, set by set, and returns one value per description in
/// split order. `score_set(set, descriptions)` is called once per set, in first-appearance order,
/// with the set's descriptions in split order, and returns one value per description (a row of 10
/// candidate scores, or several rows when one pass gives several scorings, as BLIP's ITM and ITC).
/// `progress` receives the number of finished sets.
///
/// Errors: the closure's, and [`EvalError::Length`] (converted to `E`) when it returns a number of
/// values other than the set's descriptions.
pub fn score_sets<T, E: From<EvalError>>(
    split: &ImageCodeSplit,
    progress: &dyn Fn(usize),
    mut score_set: impl FnMut(&str, &[&ImageCodeExample]) -> Result<Vec<T>, E>,
) -> Result<Vec<T>, E> {
    // One pass to group the descriptions; `sets()` gives the order.
    let mut members: HashMap<&str, Vec<usize>> = HashMap::new();
    for (e, ex) in split.examples.iter().enumerate() {
        members.entry(ex.set.as_str()).or_default().push(e);
    }
    let mut out: Vec<Option<T>> = std::iter::repeat_with(|| None).take(split.examples.len()).collect();
    for (s, set) in split.sets().into_iter().enumerate() {
        let indices = &members[set];
        let descriptions: Vec<&ImageCodeExample> = indices.iter().map(|&e| &split.examples[e]).collect();
        let values = score_set(set, &descriptions)?;
        if values.len() != indices.len() {
            return Err(EvalError::length(
                format!("set {set}: scores (one per description)"),
                indices.len(),
                values.len(),
            )
            .into());
        }
        for (&e, v) in indices.iter().zip(values) {
            out[e] = Some(v);
        }
        progress(s + 1);
    }
    Ok(out.into_iter().map(|v| v.expect("every description is in one of the split's sets")).collect())
}

/// The protocol with scores from `score_set` ([`score_sets`]), then [`select`].
pub fn zero_shot<E: From<EvalError>>(
    split: &ImageCodeSplit,
    progress: &dyn Fn(usize),
    score_set: impl FnMut(&str, &[&ImageCodeExample]) -> Result<Vec<Vec<f32>>, E>,
) -> Result<Selection, E> {
    let scores = score_sets(split, progress, score_set)?;
    Ok(select(split, &scores)?)
}

/// Chooses for each description the image of highest score (`scores[e]`: description e's scores of
/// its set's 10 images, `[descriptions][10]`); a tie goes to the lower index. Then [`accuracy`].
///
/// Errors: not one row per description, a row of other than 10 scores, a NaN or infinite score.
pub fn select(split: &ImageCodeSplit, scores: &[Vec<f32>]) -> Result<Selection, EvalError> {
    let examples = &split.examples;
    if scores.len() != examples.len() {
        return Err(EvalError::length("score rows (one per description)", examples.len(), scores.len()));
    }
    let predictions = examples
        .iter()
        .zip(scores)
        .map(|(ex, row)| {
            if row.len() != SET_SIZE {
                return Err(EvalError::length(
                    format!("description {}: candidate scores", ex.at()),
                    SET_SIZE,
                    row.len(),
                ));
            }
            argmax_of(row, || format!("description {}", ex.at()))
        })
        .collect::<Result<Vec<usize>, EvalError>>()?;
    let accuracy = accuracy(split, &predictions)?;
    Ok(Selection { predictions, accuracy })
}

/// Accuracy of `predictions` (one image index per description, split order) by group: each labeled
/// description counts in `all` and in each of its groups (its kind, then its categories:
/// [`ImageCodeExample::groups`]). Unlabeled descriptions (the test split) are not counted, so an
/// unlabeled split gives an empty map; a group no labeled description is in is absent, never 0/0.
///
/// Errors: not one prediction per description, a prediction outside the set's 10 images.
pub fn accuracy(split: &ImageCodeSplit, predictions: &[usize]) -> Result<GroupCounts, EvalError> {
    let examples = &split.examples;
    if predictions.len() != examples.len() {
        return Err(EvalError::length("predictions (one per description)", examples.len(), predictions.len()));
    }
    if let Some((ex, &p)) = examples.iter().zip(predictions).find(|(_, p)| **p >= SET_SIZE) {
        return Err(EvalError::out_of_range(format!("prediction for description {}", ex.at()), p, SET_SIZE));
    }
    let labeled = examples.iter().zip(predictions).filter_map(|(ex, &p)| Some((ex.target? == p, ex.groups())));
    Ok(count_by_group(labeled))
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::path::Path;

    use super::*;

    /// Four descriptions a, b, c, d: set `v` (video) with targets 3 and 0, set `open-images-s`
    /// (static) with target 9, set `w` (video) with target 5. Categories: description 0 `spatial`,
    /// description 2 `spatial` and `negation`.
    fn split() -> ImageCodeSplit {
        let text = r#"{"v": {"3": "a", "0": "b"}, "open-images-s": {"9": "c"}, "w": {"5": "d"}}"#;
        let mut split = ImageCodeSplit::parse(text, Path::new("valid.json"), Path::new("image-sets")).unwrap();
        split.examples[0].categories = vec!["spatial".into()];
        split.examples[2].categories = vec!["spatial".into(), "negation".into()];
        split
    }

    /// A row of 10 scores with `high` at `best`.
    fn row(best: usize, high: f32) -> Vec<f32> {
        let mut r = vec![0.0; SET_SIZE];
        r[best] = high;
        r
    }

    #[test]
    fn accuracy_by_group_by_hand() {
        let split = split();
        // Right: 0 (3), 2 (9); wrong: 1 (0 ≠ 4), 3 (5 ≠ 1).
        let acc = accuracy(&split, &[3, 4, 9, 1]).unwrap();
        let expected: GroupCounts =
            [("all", (2, 4)), ("video", (1, 3)), ("static", (1, 1)), ("spatial", (2, 2)), ("negation", (1, 1))]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
        assert_eq!(acc, expected);
        // A category no description has is absent, not 0/0.
        assert!(!acc.contains_key("co-reference"));
    }

    #[test]
    fn unlabeled_descriptions_are_predicted_but_not_counted() {
        let text = r#"{"v": ["a", "b"], "open-images-s": ["c"]}"#;
        let test = ImageCodeSplit::parse(text, Path::new("test.json"), Path::new("image-sets")).unwrap();
        let s = select(&test, &[row(2, 1.0), row(7, 1.0), row(0, 1.0)]).unwrap();
        assert_eq!(s.predictions, vec![2, 7, 0]);
        assert!(s.accuracy.is_empty());
        // No description at all: nothing to choose, nothing counted.
        let none = ImageCodeSplit::parse("{}", Path::new("empty.json"), Path::new("image-sets")).unwrap();
        assert_eq!(select(&none, &[]).unwrap(), Selection { predictions: vec![], accuracy: GroupCounts::new() });
    }

    #[test]
    fn select_takes_the_first_maximum_and_counts() {
        let split = split();
        // Description 1: a tie between 4 and 0 goes to 0 (its target); description 3 picks 1.
        let mut tied = row(4, 2.0);
        tied[0] = 2.0;
        let s = select(&split, &[row(3, 0.5), tied, row(9, 0.9), row(1, 3.0)]).unwrap();
        assert_eq!(s.predictions, vec![3, 0, 9, 1]);
        assert_eq!(s.accuracy["all"], (3, 4));
        assert_eq!(s.accuracy["video"], (2, 3));
        // All scores negative: the least negative wins.
        let mut negative = vec![-5.0; SET_SIZE];
        negative[6] = -0.5;
        let s = select(&split, &[negative.clone(), negative.clone(), negative.clone(), negative]).unwrap();
        assert_eq!(s.predictions, vec![6; 4]);
        assert_eq!(s.accuracy["all"], (0, 4));
    }

    #[test]
    fn bad_scores_are_errors_not_numbers() {
        let split = split();
        let good = || vec![row(0, 1.0); 4];
        assert!(matches!(select(&split, &good()[..3]), Err(EvalError::Length { expected: 4, found: 3, .. })));
        let mut short = good();
        short[2].pop();
        assert!(matches!(select(&split, &short), Err(EvalError::Length { expected: 10, found: 9, .. })));
        let mut nan = good();
        nan[1][4] = f32::NAN;
        match select(&split, &nan) {
            Err(EvalError::NonFinite { what, candidate: 4, .. }) => assert!(what.contains("v.0"), "{what}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(accuracy(&split, &[0, 0, 0]), Err(EvalError::Length { expected: 4, found: 3, .. })));
        assert!(matches!(
            accuracy(&split, &[0, 0, 10, 0]),
            Err(EvalError::OutOfRange { index: 10, candidates: 10, .. })
        ));
    }

    /// An error the scoring closure can return, and what the protocol's own errors become.
    #[derive(Debug, PartialEq)]
    enum Scoring {
        Eval(EvalError),
        Model(&'static str),
    }

    impl From<EvalError> for Scoring {
        fn from(e: EvalError) -> Self {
            Self::Eval(e)
        }
    }

    #[test]
    fn zero_shot_scores_each_set_once_in_order() {
        let split = split();
        let calls = RefCell::new(vec![]);
        let finished = RefCell::new(vec![]);
        // Each description's best image is its description letter's position in "abcd" times 3.
        let s = zero_shot(
            &split,
            &|n| finished.borrow_mut().push(n),
            |set, descriptions| -> Result<Vec<Vec<f32>>, Scoring> {
                let texts: Vec<&str> = descriptions.iter().map(|d| d.description.as_str()).collect();
                calls.borrow_mut().push((set.to_string(), texts.join(",")));
                Ok(descriptions.iter().map(|d| row(3 * (d.description.as_bytes()[0] - b'a') as usize, 1.0)).collect())
            },
        )
        .unwrap();
        assert_eq!(
            *calls.borrow(),
            [("v".to_string(), "a,b".to_string()), ("open-images-s".into(), "c".into()), ("w".into(), "d".into())]
        );
        assert_eq!(*finished.borrow(), [1, 2, 3]);
        // Predictions 0, 3, 6, 9 against targets 3, 0, 9, 5: none right.
        assert_eq!(s.predictions, vec![0, 3, 6, 9]);
        assert_eq!(s.accuracy["all"], (0, 4));

        // A split whose sets interleave (a, c, b, d): set `v` is still scored once, with a and b,
        // and each value lands at its description's place.
        let mut interleaved = split.clone();
        interleaved.examples.swap(1, 2);
        calls.borrow_mut().clear();
        let s = zero_shot(&interleaved, &|_| {}, |set, descriptions| -> Result<Vec<Vec<f32>>, Scoring> {
            calls.borrow_mut().push((set.to_string(), descriptions.len().to_string()));
            Ok(descriptions.iter().map(|d| row(3 * (d.description.as_bytes()[0] - b'a') as usize, 1.0)).collect())
        })
        .unwrap();
        assert_eq!(
            *calls.borrow(),
            [("v".to_string(), "2".to_string()), ("open-images-s".into(), "1".into()), ("w".into(), "1".into())]
        );
        assert_eq!(s.predictions, vec![0, 6, 3, 9]);
    }

    #[test]
    fn zero_shot_passes_errors_through_and_checks_counts() {
        let split = split();
        let failed =
            zero_shot(&split, &|_| {}, |_, _| -> Result<Vec<Vec<f32>>, Scoring> { Err(Scoring::Model("oom")) });
        assert_eq!(failed, Err(Scoring::Model("oom")));
        // One row for a set of two descriptions.
        let short = zero_shot(&split, &|_| {}, |_, _| -> Result<Vec<Vec<f32>>, Scoring> { Ok(vec![row(0, 1.0)]) });
        assert!(matches!(short, Err(Scoring::Eval(EvalError::Length { expected: 2, found: 1, .. }))));
        // Several scorings from one pass: each is selected on its own.
        type TwoRows = (Vec<f32>, Vec<f32>);
        let pairs = score_sets(&split, &|_| {}, |_, d| -> Result<Vec<TwoRows>, Scoring> {
            Ok(d.iter().map(|_| (row(9, 1.0), row(5, 1.0))).collect())
        })
        .unwrap();
        let (first, second): (Vec<_>, Vec<_>) = pairs.into_iter().unzip();
        assert_eq!(select(&split, &first).unwrap().accuracy["all"], (1, 4));
        assert_eq!(select(&split, &second).unwrap().accuracy["all"], (1, 4));
    }
}

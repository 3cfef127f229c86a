//! ContextBLIP: reading fine-tuned folders (the S1 candidate head, the S2 inter-context encoder),
//! the `[ENC]` candidate features S2 reads, and the fine-tuned evaluation on IMAGECODE. The recipes
//! (S0 pre-training, S1 / S2 fine-tuning) are in [`recipes`] (feature `train`, on by default),
//! re-exported here; the example `pretrain` and the `xtask` commands are thin wrappers over them.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use ctxalign_data::captions::{read_caption_json, CaptionedImage};
use ctxalign_data::imagecode::{accuracy_by_kind, ImageCodeSplit};
use ctxalign_models::contextblip::{
    require_stage, CandidateFeatures, CandidateHead, ContextBlipRecord, InterContextEncoder, Stage, WEIGHTS_FILE,
};
use ctxalign_models::loading::{build_from_safetensors, RenameTable};
use ctxalign_models::ModelFiles;
use serde::Serialize;

use crate::{BlipScorer, Result, ScorerOptions};

#[cfg(feature = "train")]
pub mod recipes;
#[cfg(feature = "train")]
pub use recipes::*;

/// Reads BLIP-format caption JSON files (`[{"image": …, "caption": …}]`) with images under `root`.
pub fn read_caption_files(files: &[PathBuf], root: &Path) -> Result<Vec<CaptionedImage>> {
    let mut items = vec![];
    for f in files {
        items.extend(read_caption_json(f, root)?);
    }
    Ok(items)
}

/// Normalised `[ENC]` features of every description of `split` against its set, from a scorer
/// with a ContextBLIP adapter. Sets are encoded once for all their descriptions.
pub fn candidate_features(
    scorer: &BlipScorer,
    split: &ImageCodeSplit,
    progress: &dyn Fn(usize),
) -> Result<Vec<CandidateFeatures>> {
    let mut out: Vec<Option<CandidateFeatures>> = vec![None; split.examples.len()];
    for (s, set) in split.sets().into_iter().enumerate() {
        let images = scorer.encode_image_files(&split.set_images(set)?)?;
        for (e, ex) in split.examples.iter().enumerate().filter(|(_, ex)| ex.set == set) {
            let f = scorer.candidate_features(&ex.description, &images)?;
            let (n, _) = f.dims2()?;
            out[e] = Some(CandidateFeatures {
                features: f.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
                candidates: n,
                target: ex.target,
                video: ex.kind == ctxalign_data::imagecode::SetKind::Video,
            });
        }
        progress(s + 1);
    }
    Ok(out.into_iter().map(|f| f.expect("every example belongs to a set")).collect())
}

/// The S1 candidate head of a fine-tuned folder.
pub fn load_head(dir: &Path, hidden_size: usize, dtype: DType, device: &Device) -> Result<CandidateHead> {
    let (head, _) = build_from_safetensors(&[dir.join(WEIGHTS_FILE)], RenameTable::identity(), dtype, device, |vb| {
        CandidateHead::new(hidden_size, vb.pp("head"))
    })?;
    Ok(head)
}

/// The S2 encoder of a folder written by [`finetune_s2`], if it has one.
pub fn load_inter_context(dir: &Path, dtype: DType, device: &Device) -> Result<Option<InterContextEncoder>> {
    let Some(ic_cfg) = ContextBlipRecord::read(dir)?.inter_context else { return Ok(None) };
    let (enc, _) = build_from_safetensors(&[dir.join(WEIGHTS_FILE)], RenameTable::identity(), dtype, device, |vb| {
        InterContextEncoder::new(&ic_cfg, vb.pp("inter_context"))
    })?;
    Ok(Some(enc))
}

/// Accuracy of fine-tuned predictions on a labeled split.
#[derive(Debug, Clone, Serialize)]
pub struct FinetunedReport {
    pub s1_predictions: Vec<usize>,
    pub s1_accuracy: ctxalign_eval::GroupCounts,
    /// Present when the folder has an S2 encoder.
    pub s2_predictions: Option<Vec<usize>>,
    pub s2_accuracy: Option<ctxalign_eval::GroupCounts>,
}

/// Evaluates the fine-tuned folder `dir` (S1, and S2 when present) on `split`, with weights and
/// activations in `dtype` on `device`.
pub fn evaluate_finetuned(
    dir: &Path,
    split: &ImageCodeSplit,
    progress: &dyn Fn(usize),
    dtype: DType,
    device: &Device,
) -> Result<FinetunedReport> {
    require_stage(dir, &[Stage::S1, Stage::S2], "the fine-tuned evaluation")?;
    let options = ScorerOptions { dtype, ..Default::default() };
    let scorer = BlipScorer::from_files(&ModelFiles::from_dir(dir)?, options, device)?.with_contextblip(dir)?;
    let features = candidate_features(&scorer, split, progress)?;
    let d = scorer.model.config.text_config.hidden_size;
    let head = load_head(dir, d, dtype, device)?;
    let inter = load_inter_context(dir, dtype, device)?;
    let argmax = |t: &Tensor| -> Result<Vec<usize>> {
        Ok(t.to_dtype(DType::F32)?.to_vec2::<f32>()?.iter().map(|row| ctxalign_eval::top_k(row, 1)[0]).collect())
    };
    let stacked = CandidateFeatures::stack(&features, device)?.to_dtype(dtype)?;
    let s1_predictions = argmax(&head.forward(&stacked)?)?;
    let s1_accuracy = accuracy_by_kind(split, &s1_predictions);
    let (s2_predictions, s2_accuracy) = match inter {
        Some(encoder) => {
            let video: Vec<bool> = features.iter().map(|f| f.video).collect();
            let p = argmax(&head.forward(&encoder.forward(&stacked, &video)?)?)?;
            let acc = accuracy_by_kind(split, &p);
            (Some(p), Some(acc))
        }
        None => (None, None),
    };
    Ok(FinetunedReport { s1_predictions, s1_accuracy, s2_predictions, s2_accuracy })
}

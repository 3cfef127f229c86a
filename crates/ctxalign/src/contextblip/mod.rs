//! ContextBLIP: reading fine-tuned folders (the S1 candidate head, the S2 inter-context encoder),
//! the `[ENC]` candidate features S2 reads, and the fine-tuned evaluation on IMAGECODE. The recipes
//! (S0 pre-training, S1 / S2 fine-tuning) are in [`recipes`] (feature `train`, on by default),
//! re-exported here; the example `pretrain` and the `xtask` commands are thin wrappers over them.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use ctxalign_data::captions::{read_caption_json, CaptionedImage};
use ctxalign_data::imagecode::ImageCodeSplit;
use ctxalign_eval::imagecode::{select, Selection};
use ctxalign_models::contextblip::{
    parts_read_elsewhere, require_stage, CandidateFeatures, CandidateHead, ContextBlipRecord, InterContextEncoder,
    Stage, PART_HEAD, PART_INTER_CONTEXT, WEIGHTS_FILE,
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
    let features = features_of_sets(scorer, split, |_| true, progress)?;
    Ok(features.into_iter().map(|(_, f)| f).collect())
}

/// [`candidate_features`] shared by the ranks of a data-parallel run: rank r computes the sets r,
/// r + W, …, and the ranks exchange what they computed; every rank gets all the features, in
/// split order.
#[cfg(feature = "train")]
pub fn candidate_features_shared(
    scorer: &BlipScorer,
    split: &ImageCodeSplit,
    comm: &ctxalign_train::Communicator,
    progress: &dyn Fn(usize),
) -> Result<Vec<CandidateFeatures>> {
    if !comm.is_distributed() {
        return candidate_features(scorer, split, progress);
    }
    let (rank, world) = (comm.rank(), comm.world_size());
    let mine = features_of_sets(scorer, split, |s| s % world == rank, progress)?;
    let mut all: Vec<Option<CandidateFeatures>> = vec![None; split.examples.len()];
    let parts = comm.all_gather_bytes(&encode_features(&mine)).map_err(ctxalign_train::TrainError::from)?;
    for part in parts {
        for (e, f) in decode_features(&part)? {
            all[e] = Some(f);
        }
    }
    all.into_iter()
        .enumerate()
        .map(|(e, f)| {
            f.ok_or_else(|| crate::Error::Invalid(format!("no rank computed the features of description {e}")))
        })
        .collect()
}

/// The features of the sets `keep` accepts (by index in `split.sets()`), with each description's
/// index in the split.
fn features_of_sets(
    scorer: &BlipScorer,
    split: &ImageCodeSplit,
    keep: impl Fn(usize) -> bool,
    progress: &dyn Fn(usize),
) -> Result<Vec<(usize, CandidateFeatures)>> {
    let mut out = vec![];
    for (s, set) in split.sets().into_iter().enumerate() {
        if keep(s) {
            let images = scorer.encode_image_files(&split.set_images(set)?)?;
            for (e, ex) in split.examples.iter().enumerate().filter(|(_, ex)| ex.set == set) {
                let f = scorer.candidate_features(&ex.description, &images)?;
                let (n, _) = f.dims2()?;
                let features = CandidateFeatures {
                    features: f.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
                    candidates: n,
                    target: ex.target,
                    video: ex.kind == ctxalign_data::imagecode::SetKind::Video,
                };
                out.push((e, features));
            }
        }
        progress(s + 1);
    }
    out.sort_by_key(|(e, _)| *e);
    Ok(out)
}

/// `[index u64][candidates u32][target u32, u32::MAX for none][video u8][values u32][f32 …]` per
/// description, little-endian: what the ranks exchange (bit-exact, unlike a decimal format).
#[cfg(feature = "train")]
fn encode_features(items: &[(usize, CandidateFeatures)]) -> Vec<u8> {
    let mut out = vec![];
    for (e, f) in items {
        out.extend((*e as u64).to_le_bytes());
        out.extend((f.candidates as u32).to_le_bytes());
        out.extend(f.target.map_or(u32::MAX, |t| t as u32).to_le_bytes());
        out.push(f.video as u8);
        out.extend((f.features.len() as u32).to_le_bytes());
        out.extend(f.features.iter().flat_map(|v| v.to_le_bytes()));
    }
    out
}

#[cfg(feature = "train")]
fn decode_features(mut bytes: &[u8]) -> Result<Vec<(usize, CandidateFeatures)>> {
    let short = || crate::Error::Invalid("another rank's candidate features are cut short".into());
    let mut take = |n: usize| -> Result<&[u8]> {
        let (head, rest) = bytes.split_at_checked(n).ok_or_else(short)?;
        bytes = rest;
        Ok(head)
    };
    let mut out = vec![];
    loop {
        let Ok(index) = take(8) else { break };
        let index = u64::from_le_bytes(index.try_into().expect("8 bytes")) as usize;
        let u32_of = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
        let candidates = u32_of(take(4)?) as usize;
        let target = match u32_of(take(4)?) {
            u32::MAX => None,
            t => Some(t as usize),
        };
        let video = take(1)?[0] != 0;
        let len = u32_of(take(4)?) as usize;
        let features = take(4 * len)?.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4"))).collect();
        out.push((index, CandidateFeatures { features, candidates, target, video }));
    }
    Ok(out)
}

/// The S1 candidate head of a fine-tuned folder.
pub fn load_head(dir: &Path, hidden_size: usize, dtype: DType, device: &Device) -> Result<CandidateHead> {
    let allowed = parts_read_elsewhere(ContextBlipRecord::read(dir)?.stage, PART_HEAD);
    let head =
        build_from_safetensors(&[dir.join(WEIGHTS_FILE)], RenameTable::identity(), &allowed, dtype, device, |vb| {
            CandidateHead::new(hidden_size, vb.pp("head"))
        })?;
    Ok(head)
}

/// The S2 encoder of a folder written by [`finetune_s2`], if it has one.
pub fn load_inter_context(dir: &Path, dtype: DType, device: &Device) -> Result<Option<InterContextEncoder>> {
    let record = ContextBlipRecord::read(dir)?;
    let Some(ic_cfg) = record.inter_context else { return Ok(None) };
    let allowed = parts_read_elsewhere(record.stage, PART_INTER_CONTEXT);
    let enc =
        build_from_safetensors(&[dir.join(WEIGHTS_FILE)], RenameTable::identity(), &allowed, dtype, device, |vb| {
            InterContextEncoder::new(&ic_cfg, vb.pp("inter_context"))
        })?;
    Ok(Some(enc))
}

/// Accuracy of fine-tuned predictions on a labeled split.
#[derive(Debug, Clone, Serialize)]
pub struct FinetunedReport {
    /// The S1 head's choice per description, in split order.
    pub s1_predictions: Vec<usize>,
    /// S1 accuracy by group (all, video, static, and the categories).
    pub s1_accuracy: ctxalign_eval::GroupCounts,
    /// Present when the folder has an S2 encoder.
    pub s2_predictions: Option<Vec<usize>>,
    /// S2 accuracy by group, when the folder has an S2 encoder.
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
    // Logits [descriptions, 10] → the protocol's choice and accuracy.
    let choose = |t: &Tensor| -> Result<Selection> { Ok(select(split, &t.to_dtype(DType::F32)?.to_vec2::<f32>()?)?) };
    let stacked = CandidateFeatures::stack(&features, device)?.to_dtype(dtype)?;
    let Selection { predictions: s1_predictions, accuracy: s1_accuracy } = choose(&head.forward(&stacked)?)?;
    let (s2_predictions, s2_accuracy) = match inter {
        Some(encoder) => {
            let video: Vec<bool> = features.iter().map(|f| f.video).collect();
            let s2 = choose(&head.forward(&encoder.forward(&stacked, &video)?)?)?;
            (Some(s2.predictions), Some(s2.accuracy))
        }
        None => (None, None),
    };
    Ok(FinetunedReport { s1_predictions, s1_accuracy, s2_predictions, s2_accuracy })
}

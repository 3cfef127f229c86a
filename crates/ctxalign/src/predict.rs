//! One-call predictors: [`ContextBlipPredictor`] picks the image of a set that a description
//! refers to, at any ContextBLIP stage, and [`ModelSummary`] says what a loaded model is. BLIP's own
//! scoring and retrieval are [`crate::BlipScorer`]; ContextCLIP's classification and embeddings are
//! [`crate::contextclip::ClipEncoder`].

use std::path::PathBuf;

use candle_core::{DType, Device, Module};
use ctxalign_data::imagecode::SetKind;
use ctxalign_data::ImageInput;
use ctxalign_models::contextblip::{CandidateHead, ContextBlipRecord, InterContextEncoder, Stage};
use ctxalign_models::{ModelFiles, ModelSource};
use serde::Serialize;

use crate::contextblip::{load_head, load_inter_context};
use crate::{BlipScorer, Error, Result, ScorerOptions};

/// What a loaded model is: printed when an app starts, recorded beside its results.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelSummary {
    /// "BLIP ITM", "ContextBLIP S1", "ContextCLIP", …
    pub kind: String,
    /// The folder it was read from (for a hub id, its cache snapshot, which names the repository).
    pub source: String,
    /// The model it is built on when that came from elsewhere (the BLIP under an S0 adapter).
    pub base: Option<String>,
    /// What its embeddings mean (see [`crate::BlipScorer::fingerprint`]); an
    /// [`crate::index::EmbeddingIndex`] records it.
    pub fingerprint: String,
    /// Width of its image and text embeddings.
    pub embedding_dim: usize,
    /// Side of the square images its vision tower takes, in pixels.
    pub image_size: usize,
    /// Its weights' and activations' dtype.
    #[serde(serialize_with = "serialize_dtype")]
    pub dtype: DType,
}

fn serialize_dtype<S: serde::Serializer>(dtype: &DType, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(dtype.as_str())
}

impl std::fmt::Display for ModelSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} from {}", self.kind, self.source)?;
        if let Some(base) = &self.base {
            write!(f, " on {base}")?;
        }
        write!(
            f,
            " ({}-d embeddings, {} px, {}, fingerprint {})",
            self.embedding_dim,
            self.image_size,
            self.dtype.as_str(),
            self.fingerprint
        )
    }
}

/// The image of a set a description refers to, as [`ContextBlipPredictor::pick`] chose it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Pick {
    /// Index of the chosen image in the set (the highest score; a tie goes to the earlier image).
    pub best: usize,
    /// One score per image, in the set's order: S0, the ITM match probability; S1 and S2, the
    /// candidate head's logit.
    pub scores: Vec<f32>,
    /// The stage that scored.
    pub stage: Stage,
    /// The description was cut by the word or token limit.
    pub truncated: bool,
}

/// A ContextBLIP folder ready to pick images, at its stage:
/// - S0: the pre-trained adapter over its frozen BLIP, picking by ITM match probability (the
///   zero-shot protocol);
/// - S1: the fine-tuned BLIP and adapter, and the candidate head over each image's `[ENC]` feature;
/// - S2: as S1, with the inter-context encoder relating the candidates of the set first.
pub struct ContextBlipPredictor {
    /// The BLIP with the folder's adapter applied.
    pub scorer: BlipScorer,
    /// The folder's stage.
    pub stage: Stage,
    /// S1 and S2: the candidate head.
    pub head: Option<CandidateHead>,
    /// S2: the inter-context encoder.
    pub inter_context: Option<InterContextEncoder>,
    /// The folder the predictor was read from (a hub id's cache snapshot).
    pub dir: PathBuf,
}

/// The files of a ContextBLIP folder: its own two, and a fine-tuned BLIP's when it has one.
const FOLDER_FILES: [&str; 2] = [ctxalign_models::contextblip::CONFIG_FILE, ctxalign_models::contextblip::WEIGHTS_FILE];
const BLIP_FILES: [&str; 4] = [
    ctxalign_models::blip::CONFIG_FILE,
    ctxalign_models::blip::WEIGHTS_FILE,
    ctxalign_models::blip::TOKENIZER_FILE,
    ctxalign_models::blip::PREPROCESSOR_FILE,
];

impl ContextBlipPredictor {
    /// Loads a ContextBLIP folder or hub id `spec` at whatever stage it holds. An S0 folder adapts
    /// a frozen BLIP that lives elsewhere: `blip` (a folder or hub id) when given, else the one the
    /// folder records; either way it must be the BLIP the adapter was pre-trained on (checked by
    /// fingerprint). S1 and S2 folders hold their own fine-tuned BLIP, so a `blip` is refused
    /// rather than silently ignored.
    pub fn from_pretrained(spec: &str, blip: Option<&str>, options: ScorerOptions, device: &Device) -> Result<Self> {
        let dir = ModelSource::parse(spec).resolve_folder(&FOLDER_FILES, &BLIP_FILES)?;
        let record = ContextBlipRecord::read(&dir)?;
        let stage = record.stage;
        let dtype = options.dtype;
        let scorer = match (stage, blip) {
            (Stage::S0, Some(blip)) => BlipScorer::load(blip, options, device)?,
            (Stage::S0, None) => {
                let base = record.base_model.as_ref().ok_or_else(|| {
                    Error::Invalid(format!(
                        "{}: this S0 folder records no BLIP; pass the BLIP its adapter was pre-trained on",
                        dir.display()
                    ))
                })?;
                if let ModelSource::Dir(recorded) = ModelSource::parse(&base.source) {
                    if !recorded.is_dir() {
                        return Err(Error::Invalid(format!(
                            "{}: the BLIP this S0 folder was pre-trained on, {}, is not there (a path relative \
                             to where it was trained, or moved?); pass that BLIP's folder or hub id",
                            dir.display(),
                            recorded.display()
                        )));
                    }
                }
                BlipScorer::load(&base.source, options, device)?
            }
            (_, Some(blip)) => {
                return Err(Error::Invalid(format!(
                    "{} is {}: it holds its own fine-tuned BLIP, which the BLIP `{blip}` cannot replace; \
                     load it without one",
                    dir.display(),
                    stage.describe()
                )))
            }
            (_, None) => BlipScorer::from_files(&ModelFiles::from_dir(&dir)?, options, device)?,
        }
        .with_contextblip(&dir)?;
        let hidden = scorer.model.config.text_config.hidden_size;
        let head = match stage {
            Stage::S0 => None,
            Stage::S1 | Stage::S2 => Some(load_head(&dir, hidden, dtype, device)?),
        };
        let inter_context = match stage {
            Stage::S2 => Some(load_inter_context(&dir, dtype, device)?.ok_or_else(|| {
                Error::format(&dir.join(ctxalign_models::contextblip::CONFIG_FILE), "an S2 folder without `inter_context`")
            })?),
            Stage::S0 | Stage::S1 => None,
        };
        Ok(Self { scorer, stage, head, inter_context, dir })
    }

    /// What was loaded.
    pub fn summary(&self) -> ModelSummary {
        self.scorer.summary()
    }

    /// Picks the image of `images` (a set of near-identical images, any [`ImageInput`]) that
    /// `description` refers to. `kind` says whether the set is a video's frames (S2's
    /// inter-context encoder treats them in order; the other stages ignore it).
    pub fn pick<'a, I>(&self, description: &str, images: I, kind: SetKind) -> Result<Pick>
    where
        I: IntoIterator,
        I::Item: Into<ImageInput<'a>>,
    {
        let inputs: Vec<ImageInput<'a>> = images.into_iter().map(Into::into).collect();
        if inputs.is_empty() {
            return Err(Error::Invalid("pick: a set needs at least one image".into()));
        }
        let encoded = self.scorer.encode_images(inputs)?;
        let (scores, truncated) = match (&self.head, &self.inter_context) {
            (None, _) => {
                let report = self.scorer.score(description, &encoded)?;
                (report.scores.iter().map(|s| s.itm_probability).collect::<Vec<f32>>(), report.truncated)
            }
            (Some(head), inter_context) => {
                // [n, d] → [1, n, d]: the set is one batch row, as in fine-tuning.
                let features = self.scorer.candidate_features(description, &encoded)?.unsqueeze(0)?;
                let features = features.to_dtype(self.scorer.options.dtype)?;
                let features = match inter_context {
                    Some(encoder) => encoder.forward(&features, &[kind == SetKind::Video])?,
                    None => features,
                };
                let logits = head.forward(&features)?.squeeze(0)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                (logits, self.scorer.is_truncated(description)?)
            }
        };
        let best = ctxalign_eval::argmax(&scores)?;
        Ok(Pick { best, scores, stage: self.stage, truncated })
    }
}

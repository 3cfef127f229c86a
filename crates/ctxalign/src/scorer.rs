//! [`BlipScorer`]: a loaded BLIP ITM model with its tokenizer and image processor.

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};
use ctxalign_data::{CaptionCleaning, DecodeOptions, ImageInput, ImageProcessor, ResizeMode, TextTokenizer};
use ctxalign_eval::{rerank_top_k, RankedCandidate};
use ctxalign_models::artifact::BaseModel;
use ctxalign_models::blip::{BlipItm, EncodedImages, ImageMemory, ImageStates};
use ctxalign_models::contextblip::{ContextBlip, ContextBlipRecord, Stage};
use ctxalign_models::{LoadError, ModelFiles, ModelSource};
use serde::Serialize;

use crate::{Error, Result};

/// Text and image settings of a scorer.
#[derive(Debug, Clone)]
pub struct ScorerOptions {
    /// Weights' and activations' dtype (f32 by default; bf16/f16 on a GPU).
    pub dtype: DType,
    /// Caption cleaning (BLIP's `pre_caption`, 30 words, by default).
    pub cleaning: CaptionCleaning,
    /// Token limit including `[CLS]`/`[SEP]` (BLIP retrieval: 35).
    pub max_tokens: usize,
    /// How images are decoded (damaged JPEGs, EXIF orientation).
    pub decode: DecodeOptions,
    /// Whose bicubic resize to reproduce; `None`: what the model folder's preprocessor config says
    /// (Pillow unless it names a fast HF processor).
    pub resize_mode: Option<ResizeMode>,
    /// Images decoded and encoded per forward pass by the batch methods
    /// ([`BlipScorer::image_states`], [`BlipScorer::embed_images`]); texts per pass by
    /// [`BlipScorer::embed_texts`]. Bounds the activations' memory, not the result's.
    pub batch_size: usize,
}

impl Default for ScorerOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            cleaning: CaptionCleaning::blip(30),
            max_tokens: 35,
            decode: DecodeOptions::default(),
            resize_mode: None,
            batch_size: 16,
        }
    }
}

/// Scores of one description against one image.
#[derive(Debug, Clone, Serialize)]
pub struct PairScore {
    /// `softmax(itm_logits)[1]`.
    pub itm_probability: f32,
    /// `[no match, match]` logits of the `[ENC]` fused feature.
    pub itm_logits: [f32; 2],
    /// Cosine of the ITC features.
    pub itc_similarity: f32,
}

/// One description scored against a set of images.
#[derive(Debug, Clone, Serialize)]
pub struct ScoreReport {
    /// One per image, in order.
    pub scores: Vec<PairScore>,
    /// Index of the image with the highest ITM probability.
    pub best: usize,
    /// The description was cut by the word or token limit.
    pub truncated: bool,
}

/// A ContextBLIP adapter a scorer applies: its folder's stage, the folder, and the fingerprint of
/// its weights.
#[derive(Debug, Clone)]
pub struct AdapterSource {
    /// The stage of the folder the adapter was read from.
    pub stage: Stage,
    /// The folder (`source`) and its weights' fingerprint.
    pub model: BaseModel,
}

/// A BLIP ITM model ready to score descriptions against images. Cloning shares the weights (a
/// scorer per ContextBLIP adapter over one loaded BLIP).
#[derive(Clone)]
pub struct BlipScorer {
    /// The BLIP ITM model (vision tower, text encoder, ITM and ITC heads).
    pub model: BlipItm,
    /// ContextBLIP's adapter, applied to every encoded image when present.
    pub adapter: Option<ContextBlip>,
    /// BLIP's caption cleaning and BERT tokenizer, cut at `max_tokens`.
    pub tokenizer: TextTokenizer,
    /// The folder's image processor (Pillow-exact resize and normalisation).
    pub processor: ImageProcessor,
    /// BLIP's `[ENC]`, which replaces `[CLS]` for ITM.
    pub enc_token_id: u32,
    /// The files the BLIP was loaded from (an S0 adapter must have been pre-trained on them).
    pub files: ModelFiles,
    /// Their fingerprint, hashed from the tensors as they were loaded (what an S0 folder records
    /// of the BLIP it was pre-trained on).
    pub base: BaseModel,
    /// The ContextBLIP folder whose adapter is applied (set by [`BlipScorer::with_contextblip`]).
    pub adapter_source: Option<AdapterSource>,
    /// The options it was loaded with.
    pub options: ScorerOptions,
    /// Where the weights live and scoring runs.
    pub device: Device,
}

impl BlipScorer {
    /// Loads from a folder or a hub id (`Salesforce/blip-itm-base-coco`) with default options.
    pub fn from_pretrained(spec: &str, device: &Device) -> Result<Self> {
        Self::load(spec, ScorerOptions::default(), device)
    }

    /// Loads from a folder or a hub id with `options`.
    pub fn load(spec: &str, options: ScorerOptions, device: &Device) -> Result<Self> {
        Self::from_files(&ModelSource::parse(spec).resolve()?, options, device)
    }

    /// What the embeddings of this scorer mean: the BLIP's fingerprint (its config and every byte
    /// of its weights) and, with an adapter, the adapter's. Equal fingerprints embed into the same
    /// space; what an [`crate::index::EmbeddingIndex`] records. Precision and resize mode are not
    /// part of it: they move embeddings by rounding, not into another space.
    pub fn fingerprint(&self) -> String {
        match &self.adapter_source {
            Some(adapter) => format!("blip {} + contextblip {}", self.base.fingerprint, adapter.model.fingerprint),
            None => format!("blip {}", self.base.fingerprint),
        }
    }

    /// What was loaded, for a log line or a results table.
    pub fn summary(&self) -> crate::ModelSummary {
        let vision = &self.model.config.vision_config;
        let (kind, source, base) = match &self.adapter_source {
            Some(adapter) => {
                (format!("ContextBLIP {:?}", adapter.stage), adapter.model.source.clone(), Some(self.base.source.clone()))
            }
            None => ("BLIP ITM".to_string(), self.base.source.clone(), None),
        };
        crate::ModelSummary {
            kind,
            source,
            base,
            fingerprint: self.fingerprint(),
            embedding_dim: self.embedding_dim(),
            image_size: vision.image_size,
            dtype: self.options.dtype,
        }
    }

    /// Loads the BLIP of `files` (resolved from a folder or hub id by [`ModelSource`]).
    pub fn from_files(files: &ModelFiles, options: ScorerOptions, device: &Device) -> Result<Self> {
        let (model, base) = BlipItm::load_fingerprinted(files, options.dtype, device)?;
        let tokenizer = tokenizer_for(files, &options, model.config.text_config.vocab_size)?;
        let mut processor = processor_for(files, &model.config.vision_config)?;
        processor.resize_mode = options.resize_mode.unwrap_or(processor.resize_mode);
        let t = &model.config.text_config;
        let enc_token_id = tokenizer.blip_enc_token_id(t.bos_token_id, t.vocab_size)?;
        let files = files.clone();
        Ok(Self {
            model,
            adapter: None,
            tokenizer,
            processor,
            enc_token_id,
            files,
            base,
            adapter_source: None,
            options,
            device: device.clone(),
        })
    }

    /// Adds the ContextBLIP adapter of folder `dir` (`contextblip.json` + `contextblip.safetensors`):
    /// images are then encoded as ContextBLIP encodes them. An S0 adapter that records another BLIP
    /// than this one is refused; S1/S2 folders hold their own BLIP (load the scorer from them).
    pub fn with_contextblip(mut self, dir: &Path) -> Result<Self> {
        let record = ContextBlipRecord::read(dir)?;
        if record.stage == Stage::S0 {
            record.check_base_model(dir, &self.base, &self.files)?;
        }
        let weights = BaseModel::of_weights(&dir.join(ctxalign_models::contextblip::WEIGHTS_FILE))?;
        let stage = record.stage;
        self.adapter =
            Some(ContextBlip::from_record(self.model.clone(), dir, record, self.options.dtype, &self.device)?);
        let model = BaseModel { source: dir.display().to_string(), ..weights };
        self.adapter_source = Some(AdapterSource { stage, model });
        Ok(self)
    }

    /// Preprocessed pixels `[n, 3, S, S]` → encoded images (through the adapter, if any).
    pub fn encode_pixels(&self, pixels: &Tensor) -> Result<EncodedImages> {
        Ok(match &self.adapter {
            Some(cb) => cb.encode_images(pixels)?,
            None => self.model.encode_images(pixels)?,
        })
    }

    /// Decodes, preprocesses (in parallel) and encodes image files.
    pub fn encode_image_files<P: AsRef<Path> + Sync>(&self, paths: &[P]) -> Result<EncodedImages> {
        self.encode_images(paths.iter().map(|p| p.as_ref()))
    }

    /// As [`BlipScorer::encode_image_files`], with the decoder's warnings (a damaged JPEG decoded
    /// as libjpeg decodes it), each `"<file>: <warning>"`.
    pub fn encode_image_files_reporting<P: AsRef<Path> + Sync>(
        &self,
        paths: &[P],
    ) -> Result<(EncodedImages, Vec<String>)> {
        let (pixels, warnings) = self.processor.load_batch_reporting(paths, self.options.decode, &self.device)?;
        Ok((self.encode_pixels(&pixels)?, warnings))
    }

    /// Tokens and ITC features of `images` (paths, encoded bytes, decoded images or processed
    /// pixels: anything that is [`ImageInput`]), through the adapter if any, `batch_size` images per
    /// pass, without the cross-attention memory: what an app keeps to rank by ITC and re-rank by ITM
    /// with [`BlipScorer::retrieve_states`].
    pub fn image_states<'a, I>(&self, images: I) -> Result<ImageStates>
    where
        I: IntoIterator,
        I::Item: Into<ImageInput<'a>>,
    {
        let inputs: Vec<ImageInput<'a>> = images.into_iter().map(Into::into).collect();
        let size = self.model.config.vision_config.image_size;
        let width = self.model.config.vision_config.hidden_size;
        let parts = self.in_batches(&inputs, |pixels| match &self.adapter {
            Some(cb) => Ok(cb.image_states(pixels)?),
            None => Ok(self.model.image_states(pixels)?),
        })?;
        if parts.is_empty() {
            let tokens = 1 + (size / self.model.config.vision_config.patch_size).pow(2);
            let embeds = Tensor::zeros((0, tokens, width), self.options.dtype, &self.device)?;
            let itc_features = Tensor::zeros((0, self.embedding_dim()), self.options.dtype, &self.device)?;
            return Ok(ImageStates { embeds, itc_features });
        }
        Ok(ImageStates::cat(&parts)?)
    }

    /// Encodes `images` (any [`ImageInput`]) with their cross-attention memory, `batch_size` per
    /// pass: what [`BlipScorer::score`] reads. The memory costs about 14 MB an image at 224 px in
    /// f32; for many images keep [`BlipScorer::image_states`] instead.
    pub fn encode_images<'a, I>(&self, images: I) -> Result<EncodedImages>
    where
        I: IntoIterator,
        I::Item: Into<ImageInput<'a>>,
    {
        let states = self.image_states(images)?;
        let all: Vec<usize> = (0..states.len()).collect();
        let memory = self.model.memory_of(&states, &all)?;
        Ok(EncodedImages { embeds: states.embeds, memory, itc_features: states.itc_features })
    }

    /// L2-normalised ITC image embeddings `[images, e]` in f32, `batch_size` images per pass; the
    /// ViT's tokens are dropped after each batch (what an embedding index holds).
    pub fn embed_images<'a, I>(&self, images: I) -> Result<Tensor>
    where
        I: IntoIterator,
        I::Item: Into<ImageInput<'a>>,
    {
        let inputs: Vec<ImageInput<'a>> = images.into_iter().map(Into::into).collect();
        let parts = self.in_batches(&inputs, |pixels| {
            let states = match &self.adapter {
                Some(cb) => cb.image_states(pixels)?,
                None => self.model.image_states(pixels)?,
            };
            Ok(states.itc_features.to_dtype(DType::F32)?)
        })?;
        if parts.is_empty() {
            return Ok(Tensor::zeros((0, self.embedding_dim()), DType::F32, &self.device)?);
        }
        let embeddings = Tensor::cat(&parts, 0)?;
        crate::ensure_finite_tensor(&embeddings, "image embeddings")?;
        Ok(embeddings)
    }

    /// Width of the ITC embeddings (`image_text_hidden_size`).
    pub fn embedding_dim(&self) -> usize {
        self.model.config.image_text_hidden_size
    }

    /// Decodes and processes `inputs` `batch_size` at a time and runs `encode` on each batch of
    /// pixels `[b, 3, S, S]` (in the model's dtype); a bad input is named by its index in `inputs`.
    fn in_batches<T>(&self, inputs: &[ImageInput<'_>], mut encode: impl FnMut(&Tensor) -> Result<T>) -> Result<Vec<T>> {
        if self.options.batch_size == 0 {
            return Err(Error::Invalid("batch_size 0: at least one image per pass".into()));
        }
        let mut parts = Vec::with_capacity(inputs.len().div_ceil(self.options.batch_size));
        for (b, batch) in inputs.chunks(self.options.batch_size).enumerate() {
            let first = b * self.options.batch_size;
            let (pixels, _) = self.processor.load_input_batch(batch, first, self.options.decode, &self.device)?;
            parts.push(encode(&pixels.to_dtype(self.options.dtype)?)?);
        }
        Ok(parts)
    }

    /// L2-normalised ITC text embeddings `[texts, e]` in f32, `batch_size` texts per pass.
    pub fn embed_texts(&self, texts: &[&str]) -> Result<Tensor> {
        if self.options.batch_size == 0 {
            return Err(Error::Invalid("batch_size 0: at least one text per pass".into()));
        }
        let pad = self.model.config.text_config.pad_token_id;
        let parts = texts
            .chunks(self.options.batch_size)
            .map(|chunk| {
                let (ids, mask) = self.tokenizer.encode_batch(chunk, pad)?.to_tensors(&self.device)?;
                Ok(self.model.text_features(&ids, &mask)?.to_dtype(DType::F32)?)
            })
            .collect::<Result<Vec<_>>>()?;
        if parts.is_empty() {
            return Ok(Tensor::zeros((0, self.embedding_dim()), DType::F32, &self.device)?);
        }
        let embeddings = Tensor::cat(&parts, 0)?;
        crate::ensure_finite_tensor(&embeddings, "text embeddings")?;
        Ok(embeddings)
    }

    /// ITC cosine similarities `[texts, images]` of many texts against many images' states.
    pub fn itc_similarities(&self, texts: &[&str], images: &ImageStates) -> Result<Tensor> {
        let texts = self.embed_texts(texts)?;
        Ok(texts.matmul(&images.itc_features.to_dtype(DType::F32)?.t()?)?)
    }

    /// BLIP's text→image retrieval over image states: the `k` best images by ITC are re-ranked by
    /// `itm_logit[1] + itc`, the rest follow in ITC order. Keys and values are built for those `k`
    /// images only. Equals [`BlipScorer::retrieve`] over the full encoding.
    pub fn retrieve_states(&self, text: &str, images: &ImageStates, k: usize) -> Result<Vec<RankedCandidate>> {
        self.rerank_by_itm(text, &images.itc_features, k, |kept| Ok(self.model.memory_of(images, kept)?))
    }

    /// BLIP's re-rank: ITC cosines of `text` against `itc_features` `[images, e]`, the top `k`
    /// re-ranked by `itm_logit[1] + itc` with the cross-attention memory `memory_of` gives for them.
    fn rerank_by_itm(
        &self,
        text: &str,
        itc_features: &Tensor,
        k: usize,
        memory_of: impl Fn(&[usize]) -> Result<ImageMemory>,
    ) -> Result<Vec<RankedCandidate>> {
        let (ids, enc, mask, _) = self.tokenize(text)?;
        let text_feat = self.model.text_features(&ids, &mask)?;
        let itc = BlipItm::itc_similarity(itc_features, &text_feat)?.i((.., 0))?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        crate::ensure_finite(&itc, "ITC similarities")?;
        rerank_top_k(&itc, k, |kept| -> Result<Vec<f32>> {
            let logits = self.model.itm(&memory_of(kept)?, &enc, &mask, false)?.logits;
            let logits = logits.i((.., 1))?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            crate::ensure_finite(&logits, "ITM logits")?;
            Ok(logits)
        })
    }

    /// L2-normalised `[ENC]` features `[images, d]` of `text` against each encoded image (what
    /// ContextBLIP's fine-tuning heads read).
    pub fn candidate_features(&self, text: &str, images: &EncodedImages) -> Result<Tensor> {
        let (_, enc, mask, _) = self.tokenize(text)?;
        let features = ctxalign_models::contextblip::candidate_features(&self.model, images, &enc, &mask)?;
        crate::ensure_finite_tensor(&features, "candidate features")?;
        Ok(features)
    }

    /// Whether `text` is cut by the word or token limit when scored.
    pub fn is_truncated(&self, text: &str) -> Result<bool> {
        Ok(self.tokenize(text)?.3)
    }

    /// Tokenizes one description: `(cls_ids, enc_ids, mask, truncated)`, each `[1, len]`.
    fn tokenize(&self, text: &str) -> Result<(Tensor, Tensor, Tensor, bool)> {
        let pad = self.model.config.text_config.pad_token_id;
        let batch = self.tokenizer.encode_batch(&[text], pad)?;
        let (ids, mask) = batch.to_tensors(&self.device)?;
        let enc = Tensor::new(batch.with_first_token(self.enc_token_id), &self.device)?;
        Ok((ids, enc, mask, batch.truncated_count() > 0))
    }

    /// ITM and ITC scores of `text` against every encoded image. The text-only parts (tokens,
    /// embeddings, first self-attention, ITC text feature) run once for all images.
    pub fn score(&self, text: &str, images: &EncodedImages) -> Result<ScoreReport> {
        let (ids, enc, mask, truncated) = self.tokenize(text)?;
        let text_feat = self.model.text_features(&ids, &mask)?;
        let itc = BlipItm::itc_similarity(&images.itc_features, &text_feat)?
            .i((.., 0))?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let itm = self.model.itm(&images.memory, &enc, &mask, false)?;
        let probs = itm.match_probability()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let logits = itm.logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        crate::ensure_finite(&itc, "ITC similarities")?;
        crate::ensure_finite(&probs, "ITM probabilities")?;
        crate::ensure_finite(&logits.concat(), "ITM logits")?;
        let scores: Vec<PairScore> = (0..probs.len())
            .map(|i| PairScore {
                itm_probability: probs[i],
                itm_logits: [logits[i][0], logits[i][1]],
                itc_similarity: itc[i],
            })
            .collect();
        let best = ctxalign_eval::top_k(&probs, 1)
            .first()
            .copied()
            .ok_or_else(|| Error::Invalid("no images to score".into()))?;
        Ok(ScoreReport { scores, best, truncated })
    }

    /// BLIP's text→image retrieval: the `k` best images by ITC are re-ranked by
    /// `itm_logit[1] + itc`; the rest follow in ITC order.
    pub fn retrieve(&self, text: &str, images: &EncodedImages, k: usize) -> Result<Vec<RankedCandidate>> {
        self.rerank_by_itm(text, &images.itc_features, k, |kept| {
            let idx = Tensor::new(kept.iter().map(|&i| i as u32).collect::<Vec<_>>(), &self.device)?;
            Ok(images.memory.gather(&idx)?)
        })
    }
}

/// The image processor of a model folder: its `preprocessor_config.json`, else BLIP's at `size`.
/// The image processor of a BLIP folder (BLIP's at the ViT's size when it has none), checked
/// against the ViT: a size it cannot take is refused here, naming the file and the key.
pub(crate) fn processor_for(
    files: &ModelFiles,
    vision: &ctxalign_models::blip::BlipVisionConfig,
) -> Result<ImageProcessor> {
    Ok(match &files.preprocessor_config {
        Some(p) => {
            let processor = ImageProcessor::from_hf_json(p)?;
            processor.check_for_vit(p, vision.patch_size)?;
            processor
        }
        None => ImageProcessor::blip(vision.image_size as u32),
    })
}

/// The tokenizer of a model folder with the scorer's cleaning and token limit, checked against the
/// model's embedding table of `vocab_size` rows.
pub(crate) fn tokenizer_for(files: &ModelFiles, options: &ScorerOptions, vocab_size: usize) -> Result<TextTokenizer> {
    let path = files.tokenizer.clone().ok_or_else(|| LoadError::MissingFile {
        path: files.config.with_file_name("tokenizer.json"),
        what: "tokenizer".into(),
    })?;
    let tokenizer = TextTokenizer::from_file(&path, options.cleaning.clone(), options.max_tokens)?;
    tokenizer.check_fits_embeddings(vocab_size, &files.config)?;
    Ok(tokenizer)
}

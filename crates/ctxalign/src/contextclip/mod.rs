//! ContextCLIP: the inference encoder, zero-shot classification with template ensembles, the
//! linear probe and text↔image retrieval; training (`L_CLIP + α·L_CX`) and classification
//! fine-tuning are in [`training`] (feature `train`, on by default), re-exported here. The examples
//! `train_contextclip` / `retrieve` and `xtask contextclip` are thin wrappers over these functions.
//!
//! A trained model is a folder: `contextclip.json`, `model.safetensors`, `tokenizer.json`,
//! `training.json` (options and final losses), plus the loop's `metrics.jsonl`, `loss.png` and
//! `checkpoints/`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ctxalign_data::captions::CaptionedImage;
use ctxalign_data::classification::ClassificationSet;
use ctxalign_data::loader::{stack_pixels, ClassificationDataset, Dataset};
use ctxalign_data::rng::Rng;
use ctxalign_data::{CaptionCleaning, DecodeOptions, ImageInput, ImageProcessor, Resize, ResizeMode, TextTokenizer};
use ctxalign_eval::imagecode::Selection;
use ctxalign_eval::zeroshot::{fill, prompt_name, ClassificationMetrics};
use ctxalign_eval::{linear_probe, ProbeReport, RetrievalReport};
use ctxalign_models::artifact::BaseModel;
use ctxalign_models::contextclip::{
    ContextClip, ContextClipConfig, CLASSIFIER_KEY, CONFIG_FILE, FINETUNE_FILE, WEIGHTS_FILE,
};
use ctxalign_models::loading::{build_from_safetensors, AllowedUnused, RenameTable};
use ctxalign_models::ModelSource;
use serde::Serialize;
use ctxalign_nn::l2_normalize;

use crate::{Error, Result};

#[cfg(feature = "train")]
pub mod training;
#[cfg(feature = "train")]
pub use training::*;

/// The tokenizer file a trained folder carries.
pub use ctxalign_models::contextclip::TOKENIZER_FILE;

/// The bert-base-uncased tokenizer shipped in `models/`, used by the default model.
pub use crate::home::default_tokenizer;

/// The image processor of a model: resize to `image_size`², scale to [0, 1], normalise (the base
/// code's `A.Resize` + `A.Normalize`).
pub fn processor_for(cfg: &ContextClipConfig) -> ImageProcessor {
    let size = cfg.image_size as u32;
    ImageProcessor {
        resize: Some(Resize::Exact { height: size, width: size }),
        resize_mode: ResizeMode::Pillow,
        center_crop: None,
        rescale_factor: 1.0 / 255.0,
        mean: cfg.image_mean,
        std: cfg.image_std,
    }
}

/// Captions are lower-cased and stripped of punctuation only by the WordPiece tokenizer itself;
/// truncation happens at `max_length` tokens. The tokenizer's ids must fit the text tower's
/// embedding table (declared by `config`).
fn tokenizer_for(path: &Path, cfg: &ContextClipConfig, config: &Path) -> Result<TextTokenizer> {
    let tokenizer = TextTokenizer::from_file(path, CaptionCleaning::none(), cfg.max_length)?;
    tokenizer.check_fits_embeddings(cfg.text_vocab_size(), config)?;
    Ok(tokenizer)
}

/// A trained ContextCLIP for inference: embeds images and texts into its joint space
/// (L2-normalised, so dot products are cosines) and classifies images with a zero-shot or a
/// fine-tuned head.
pub struct ClipEncoder {
    /// The two towers and their projection heads.
    pub model: ContextClip,
    /// The folder's WordPiece tokenizer, truncating at the config's `max_length`.
    pub tokenizer: TextTokenizer,
    /// Resize to `image_size`² and normalise, as the model was trained.
    pub processor: ImageProcessor,
    /// Where the weights live and the embeddings are computed.
    pub device: Device,
    /// The model's weight and activation dtype; embeddings are returned in f32.
    pub dtype: DType,
    /// Images and texts embedded per forward pass; bounds the activations' memory.
    pub batch_size: usize,
    /// The folder it was read from and its fingerprint (its config and every byte of its weights).
    pub source: BaseModel,
}

/// Images and texts embedded per pass by default.
pub const DEFAULT_BATCH_SIZE: usize = 64;

/// The files of a ContextCLIP folder, and those a fine-tuned one adds.
const FOLDER_FILES: [&str; 3] = [CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE];
const FINETUNED_FILES: [&str; 1] = [FINETUNE_FILE];

impl ClipEncoder {
    /// Loads a model folder written by `train_contextclip` (or by hand: `contextclip.json`,
    /// `model.safetensors`, `tokenizer.json`) in `dtype` on `device`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let (model, source) = ContextClip::load_fingerprinted(dir, dtype, device)?;
        let config = dir.join(ctxalign_models::contextclip::CONFIG_FILE);
        let tokenizer = tokenizer_for(&dir.join(TOKENIZER_FILE), &model.config, &config)?;
        let processor = processor_for(&model.config);
        Ok(Self { model, tokenizer, processor, device: device.clone(), dtype, batch_size: DEFAULT_BATCH_SIZE, source })
    }

    /// Loads a ContextCLIP folder or hub id (its repository holding the folder's files; a
    /// fine-tuned one's `finetune.json` is fetched too).
    pub fn from_pretrained(spec: &str, dtype: DType, device: &Device) -> Result<Self> {
        let dir = ModelSource::parse(spec).resolve_folder(&FOLDER_FILES, &FINETUNED_FILES)?;
        Self::load(&dir, dtype, device)
    }

    /// What its embeddings mean: the folder's fingerprint. What an
    /// [`crate::index::EmbeddingIndex`] records.
    pub fn fingerprint(&self) -> String {
        format!("contextclip {}", self.source.fingerprint)
    }

    /// What was loaded.
    pub fn summary(&self) -> crate::ModelSummary {
        crate::ModelSummary {
            kind: "ContextCLIP".into(),
            source: self.source.source.clone(),
            base: None,
            fingerprint: self.fingerprint(),
            embedding_dim: self.model.config.projection_dim,
            image_size: self.model.config.image_size,
            dtype: self.dtype,
        }
    }

    /// Normalised f32 embeddings of processed pixels `[n, 3, S, S]` → `[n, projection_dim]`.
    pub fn encode_pixels(&self, pixels: &Tensor) -> Result<Tensor> {
        let pixels = pixels.to_dtype(self.dtype)?;
        Ok(l2_normalize(&self.model.encode_images(&pixels, None)?.to_dtype(DType::F32)?)?)
    }

    /// Normalised f32 embeddings `[n, projection_dim]` of `images` (paths, encoded bytes, decoded
    /// images or processed pixels: anything that is [`ImageInput`]), `batch_size` per pass; a bad
    /// input is named by its place in `images`.
    pub fn encode_images<'a, I>(&self, images: I) -> Result<Tensor>
    where
        I: IntoIterator,
        I::Item: Into<ImageInput<'a>>,
    {
        let inputs: Vec<ImageInput<'a>> = images.into_iter().map(Into::into).collect();
        let mut first = 0;
        self.embed_in_batches(&inputs, |batch| {
            let (pixels, _) = self.processor.load_input_batch(batch, first, DecodeOptions::default(), &self.device)?;
            first += batch.len();
            Ok(self.model.encode_images(&pixels.to_dtype(self.dtype)?, None)?)
        })
    }

    /// Normalised embeddings of image files.
    pub fn encode_image_files<P: AsRef<Path> + Sync>(&self, paths: &[P]) -> Result<Tensor> {
        self.encode_images(paths.iter().map(|p| ImageInput::from(p.as_ref())))
    }

    /// The classifier of `classes` built from prompts: CLIP's zero-shot protocol over `templates`
    /// (see [`ClipEncoder::zero_shot_classifier`]).
    pub fn zero_shot_head(&self, classes: &[String], templates: &[String]) -> Result<ClassifierHead> {
        Ok(ClassifierHead { classes: classes.to_vec(), weight: self.zero_shot_classifier(classes, templates)? })
    }

    /// The classifier a fine-tuned folder carries: `classifier.weight` of its weights, its rows
    /// named by `finetune.json`'s classes. A folder that was not fine-tuned has neither.
    pub fn trained_head(&self) -> Result<ClassifierHead> {
        let dir = PathBuf::from(&self.source.source);
        let record_file = dir.join(FINETUNE_FILE);
        if !record_file.is_file() {
            return Err(Error::format(
                &record_file,
                "missing: this ContextCLIP folder was not fine-tuned for classification (use a zero-shot head)",
            ));
        }
        #[derive(serde::Deserialize)]
        struct Report {
            classes: Vec<String>,
        }
        #[derive(serde::Deserialize)]
        struct Record {
            report: Report,
        }
        let record: Record = ctxalign_models::loading::read_json(&record_file)?;
        // Read through the checked loader: a missing or misshapen classifier is named with the
        // file, the key and the shape the classes need.
        let shape = (record.report.classes.len(), self.model.config.projection_dim);
        let others = AllowedUnused::none().prefix("", "the model's own tensors (read by ContextClip::load)");
        let weight = build_from_safetensors(
            &[dir.join(WEIGHTS_FILE)],
            RenameTable::identity(),
            &others,
            DType::F32,
            &self.device,
            |vb| vb.get(shape, CLASSIFIER_KEY),
        )?;
        Ok(ClassifierHead { classes: record.report.classes, weight })
    }

    /// Classifies `images` (any [`ImageInput`]) with `head`: per image, the class of highest
    /// `100 · cos` logit (a tie goes to the earlier class) and the softmax over the classes.
    pub fn classify_images<'a, I>(&self, head: &ClassifierHead, images: I) -> Result<Vec<Classification>>
    where
        I: IntoIterator,
        I::Item: Into<ImageInput<'a>>,
    {
        let embeddings = self.encode_images(images)?;
        if embeddings.dim(0)? == 0 {
            return Ok(vec![]);
        }
        let weight = head.weight.to_device(&self.device)?;
        if weight.dim(1)? != embeddings.dim(1)? {
            return Err(Error::Invalid(format!(
                "a classifier of width {} for embeddings of width {}",
                weight.dim(1)?,
                embeddings.dim(1)?
            )));
        }
        // [n, e] x [e, classes] → [n, classes] logits, as in evaluation and fine-tuning.
        let logits = (embeddings.matmul(&weight.t()?)? * ZERO_SHOT_SCALE)?;
        let probabilities: Vec<Vec<f32>> = candle_nn::ops::softmax_last_dim(&logits)?.to_vec2()?;
        let logits: Vec<Vec<f32>> = logits.to_vec2()?;
        logits
            .into_iter()
            .zip(probabilities)
            .map(|(logits, probabilities)| {
                let label = ctxalign_eval::argmax(&logits)?;
                Ok(Classification { label, class: head.classes[label].clone(), logits, probabilities })
            })
            .collect()
    }

    /// Normalised embeddings of texts.
    pub fn encode_texts(&self, texts: &[&str]) -> Result<Tensor> {
        self.embed_in_batches(texts, |chunk| {
            let batch = self.tokenizer.encode_batch(chunk, self.model.config.pad_token_id())?;
            let (ids, mask) = batch.to_tensors(&self.device)?;
            Ok(self.model.encode_texts(&ids, &mask, None)?)
        })
    }

    /// Normalised embeddings and labels of every item of a classification set, in order.
    pub fn encode_set(&self, set: &ClassificationSet) -> Result<(Tensor, Vec<usize>)> {
        let dataset = ClassificationDataset {
            set: set.clone(),
            processor: self.processor.clone(),
            augment: None,
            decode: DecodeOptions::default(),
        };
        let size = self.model.config.image_size;
        let mut rng = Rng::new(0);
        let mut labels = vec![];
        let indices: Vec<usize> = (0..dataset.len()).collect();
        let embeddings = self.embed_in_batches(&indices, |chunk| {
            let items = chunk.iter().map(|&i| dataset.load(i, &mut rng)).collect::<Result<Vec<_>, _>>()?;
            labels.extend(items.iter().map(|item| item.label));
            let pixels = stack_pixels(items.iter().map(|item| item.pixels.as_slice()), size, &self.device)?;
            Ok(self.model.encode_images(&pixels.to_dtype(self.dtype)?, None)?)
        })?;
        Ok((embeddings, labels))
    }

    /// CLIP's zero-shot classifier `[classes, projection_dim]`: per class, every template filled with
    /// its name (`_` read as a space), embedded, normalised, averaged and normalised again.
    pub fn zero_shot_classifier(&self, classes: &[String], templates: &[String]) -> Result<Tensor> {
        if templates.is_empty() {
            return Err(Error::Invalid("no prompt templates".into()));
        }
        let mut rows = vec![];
        for class in classes {
            let prompts: Vec<String> = templates.iter().map(|t| fill(t, &prompt_name(class))).collect();
            let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
            let mean = self.encode_texts(&refs)?.mean_keepdim(0)?;
            rows.push(l2_normalize(&mean)?);
        }
        Ok(Tensor::cat(&rows, 0)?)
    }
}

/// A classifier over the joint space: one row per class, applied as `100 · cos(image, row)`.
#[derive(Debug, Clone)]
pub struct ClassifierHead {
    /// The class of each row.
    pub classes: Vec<String>,
    /// `[classes, projection_dim]`, f32 (unit rows for a zero-shot head; a fine-tuned head's are
    /// not normalised).
    pub weight: Tensor,
}

/// One image's class.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Classification {
    /// Index of the class in the head.
    pub label: usize,
    /// Its name.
    pub class: String,
    /// `100 · cos` per class.
    pub logits: Vec<f32>,
    /// Softmax of the logits.
    pub probabilities: Vec<f32>,
}

/// Embeds `items` `batch_size` at a time with `embed` and returns the L2-normalised rows in f32,
/// in order (`[0, width]` for no items).
fn embed_in_chunks<T>(
    items: &[T],
    batch_size: usize,
    width: usize,
    device: &Device,
    mut embed: impl FnMut(&[T]) -> Result<Tensor>,
) -> Result<Tensor> {
    if batch_size == 0 {
        return Err(Error::Invalid("batch_size 0: at least one item per pass".into()));
    }
    let parts = items
        .chunks(batch_size)
        .map(|chunk| {
            let embeddings = l2_normalize(&embed(chunk)?.to_dtype(DType::F32)?)?;
            crate::ensure_finite_tensor(&embeddings, "embeddings")?;
            Ok(embeddings)
        })
        .collect::<Result<Vec<_>>>()?;
    if parts.is_empty() {
        return Ok(Tensor::zeros((0, width), DType::F32, device)?);
    }
    Ok(Tensor::cat(&parts, 0)?)
}

impl ClipEncoder {
    fn embed_in_batches<T>(&self, items: &[T], embed: impl FnMut(&[T]) -> Result<Tensor>) -> Result<Tensor> {
        embed_in_chunks(items, self.batch_size, self.model.config.projection_dim, &self.device, embed)
    }
}

/// CLIP's logit scale for zero-shot classification (`100 · cos`); it does not change the ranking.
pub const ZERO_SHOT_SCALE: f64 = 100.0;

/// Zero-shot classification of `set` with its class names and `templates`.
pub fn zero_shot(
    encoder: &ClipEncoder,
    set: &ClassificationSet,
    templates: &[String],
) -> Result<ClassificationMetrics> {
    classify(encoder, set, &encoder.zero_shot_classifier(&set.classes, templates)?)
}

/// Metrics of `classifier` (`[classes, projection_dim]`, unit rows) on `set`: `100 · cos` logits.
pub fn classify(encoder: &ClipEncoder, set: &ClassificationSet, classifier: &Tensor) -> Result<ClassificationMetrics> {
    // Metrics over no image would be 0 (or NaN) that read as measured.
    set.require_items("the evaluation set")?;
    let (images, labels) = encoder.encode_set(set)?;
    let classifier = classifier.to_dtype(DType::F32)?;
    let scores: Vec<Vec<f32>> = (images.matmul(&classifier.t()?)? * ZERO_SHOT_SCALE)?.to_vec2()?;
    Ok(ClassificationMetrics::compute(&scores, &labels))
}

/// Linear probe: logistic regression on the frozen image embeddings of `train`, its L2 strength
/// chosen on 20 % of `train`, evaluated on `test` (whose classes must be `train`'s).
pub fn linear_probe_sets(
    encoder: &ClipEncoder,
    train: &ClassificationSet,
    test: &ClassificationSet,
    seed: u64,
) -> Result<ProbeReport> {
    if train.classes != test.classes {
        return Err(Error::Invalid("linear probe: the train and test sets name different classes".into()));
    }
    train.require_items("the linear probe's training set")?;
    test.require_items("the linear probe's test set")?;
    let (train_x, train_y) = encoder.encode_set(train)?;
    let (test_x, test_y) = encoder.encode_set(test)?;
    Ok(linear_probe(&train_x.to_vec2()?, &train_y, &test_x.to_vec2()?, &test_y, train.classes.len(), 0.2, seed))
}

pub use ctxalign_data::classification::stratified_split;

/// Text→image and image→text retrieval over captioned images by cosine (every caption a query;
/// its image the positive; an image's positives are all its captions); no re-ranking.
pub fn retrieval(encoder: &dyn JointEmbedder, items: &[CaptionedImage]) -> Result<RetrievalReport> {
    let paths: Vec<PathBuf> = items.iter().map(|i| i.image.clone()).collect();
    let images = encoder.encode_image_files(&paths)?;
    let (queries, owners) = crate::evaluate::caption_queries(items);
    let texts = encoder.encode_texts(&queries)?;
    let similarity: Vec<Vec<f32>> = texts.matmul(&images.t()?)?.to_vec2()?;
    Ok(RetrievalReport::from_similarity(&similarity, &owners, &[1, 5, 10])?)
}

/// Anything that embeds images and texts into one space with unit-norm rows (a ContextCLIP
/// folder, an HF CLIP checkpoint). `Send + Sync`: one loaded embedder serves many threads.
pub trait JointEmbedder: Send + Sync {
    /// Unit-norm f32 embeddings `[n, e]` of image files, in order.
    fn encode_image_files(&self, paths: &[PathBuf]) -> Result<Tensor>;
    /// Unit-norm f32 embeddings `[n, e]` of texts, in order.
    fn encode_texts(&self, texts: &[&str]) -> Result<Tensor>;
}

impl JointEmbedder for ClipEncoder {
    fn encode_image_files(&self, paths: &[PathBuf]) -> Result<Tensor> {
        ClipEncoder::encode_image_files(self, paths)
    }
    fn encode_texts(&self, texts: &[&str]) -> Result<Tensor> {
        ClipEncoder::encode_texts(self, texts)
    }
}

/// An HF `CLIPModel` checkpoint (`openai/clip-vit-base-patch32`, a local folder) with its own
/// tokenizer (77 tokens) and image processor (`preprocessor_config.json`, else CLIP's defaults).
pub struct HfClip {
    /// HF's `CLIPModel`: both towers and projections.
    pub model: ctxalign_models::clip::ClipModel,
    /// The checkpoint's tokenizer, truncating at the text tower's positions.
    pub tokenizer: TextTokenizer,
    /// The checkpoint's image processor (CLIP's defaults when it has none).
    pub processor: ImageProcessor,
    /// Where the weights live and the embeddings are computed.
    pub device: Device,
    /// The model's weight and activation dtype; embeddings are returned in f32.
    pub dtype: DType,
}

impl HfClip {
    /// Loads the checkpoint of `files` in `dtype` on `device`; its tokenizer must fit the text
    /// tower's vocabulary.
    pub fn load(files: &ctxalign_models::ModelFiles, dtype: DType, device: &Device) -> Result<Self> {
        let model = ctxalign_models::clip::ClipModel::load(files, dtype, device)?;
        let tokenizer_path = files
            .tokenizer
            .as_ref()
            .ok_or_else(|| Error::format(&files.config, "the CLIP model has no tokenizer.json beside its config"))?;
        let max = model.config.text_config.max_position_embeddings;
        let tokenizer = TextTokenizer::from_file(tokenizer_path, CaptionCleaning::none(), max)?;
        tokenizer.check_fits_embeddings(model.config.text_config.vocab_size, &files.config)?;
        let processor = match &files.preprocessor_config {
            Some(p) => {
                let processor = ImageProcessor::from_hf_json(p)?;
                processor.check_for_vit(p, model.config.vision_config.patch_size)?;
                processor
            }
            None => ImageProcessor::clip(model.config.vision_config.image_size as u32),
        };
        Ok(Self { model, tokenizer, processor, device: device.clone(), dtype })
    }
}

impl JointEmbedder for HfClip {
    fn encode_image_files(&self, paths: &[PathBuf]) -> Result<Tensor> {
        embed_in_chunks(paths, DEFAULT_BATCH_SIZE, self.model.config.projection_dim, &self.device, |chunk| {
            let pixels = self.processor.load_batch(chunk, DecodeOptions::default(), &self.device)?;
            Ok(self.model.get_image_features(&pixels.to_dtype(self.dtype)?)?)
        })
    }
    fn encode_texts(&self, texts: &[&str]) -> Result<Tensor> {
        let pad = self.model.config.text_config.pad_token_id;
        embed_in_chunks(texts, DEFAULT_BATCH_SIZE, self.model.config.projection_dim, &self.device, |chunk| {
            let (ids, mask) = self.tokenizer.encode_batch(chunk, pad)?.to_tensors(&self.device)?;
            Ok(self.model.get_text_features(&ids, &mask)?)
        })
    }
}

/// Loads a ContextCLIP folder (it has `contextclip.json`) or an HF CLIP (folder or hub id), in
/// `dtype` on `device`.
pub fn load_embedder(spec: &str, dtype: DType, device: &Device) -> Result<Box<dyn JointEmbedder>> {
    let dir = Path::new(spec);
    if dir.join(CONFIG_FILE).is_file() {
        return Ok(Box::new(ClipEncoder::load(dir, dtype, device)?));
    }
    let files = ctxalign_models::ModelSource::parse(spec).resolve()?;
    Ok(Box::new(HfClip::load(&files, dtype, device)?))
}

/// Zero-shot IMAGECODE with a dual encoder ([`ctxalign_eval::imagecode`]'s protocol): per
/// description, the set image of highest cosine. `progress` receives the number of finished sets.
pub fn imagecode_zero_shot(
    embedder: &dyn JointEmbedder,
    split: &ctxalign_data::imagecode::ImageCodeSplit,
    progress: &dyn Fn(usize),
) -> Result<Selection> {
    ctxalign_eval::imagecode::zero_shot(split, progress, |set, descriptions| -> Result<Vec<Vec<f32>>> {
        let images = embedder.encode_image_files(&split.set_images(set)?)?;
        let texts: Vec<&str> = descriptions.iter().map(|d| d.description.as_str()).collect();
        // [descriptions, 10] cosines
        Ok(embedder.encode_texts(&texts)?.matmul(&images.t()?)?.to_vec2()?)
    })
}

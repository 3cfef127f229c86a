//! BLIP image-text matching (HF `BlipForImageTextRetrieval`): ViT + MED text encoder + ITM/ITC heads.
//!
//! ```no_run
//! use candle_core::{DType, Device, Tensor};
//! use ctxalign_models::blip::BlipItm;
//! use ctxalign_models::ModelSource;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let files = ModelSource::parse("Salesforce/blip-itm-base-coco").resolve()?;
//! let model = BlipItm::load(&files, DType::F32, &Device::Cpu)?;
//! let pixels = Tensor::zeros((10, 3, 384, 384), DType::F32, &Device::Cpu)?;
//! let images = model.encode_images(&pixels)?;
//! # Ok(()) }
//! ```

pub mod config;
pub mod text;
pub mod vision;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, IndexOp, Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use ctxalign_nn::{first_token, linear, Linear};

pub use config::{BertLayerConfig, BlipConfig, BlipTextConfig, BlipVisionConfig};
pub use text::{mean_cross_attention, BlipTextModel, BlipTextOutput, ImageMemory};
pub use vision::{BlipVisionModel, BlipVisionOutput};

use crate::loading::{
    build_fingerprinted, build_from_safetensors, read_json, AllowedUnused, LoadError, ModelFiles, RenameTable,
};

/// File names of a BLIP folder (HF's).
pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const PREPROCESSOR_FILE: &str = "preprocessor_config.json";

/// What a BLIP folder holds besides its weights, as the files' contents: what [`BlipItm::save`]
/// writes beside them.
#[derive(Debug, Clone)]
pub struct BlipFolderFiles {
    /// `config.json`. Copied byte for byte from a source folder, so HF's keys that [`BlipConfig`]
    /// does not model survive.
    pub config: Vec<u8>,
    pub tokenizer: Option<Vec<u8>>,
    pub preprocessor_config: Option<Vec<u8>>,
}

impl BlipFolderFiles {
    /// The files of an existing BLIP (the model fine-tuning started from).
    pub fn read(files: &ModelFiles) -> std::result::Result<Self, LoadError> {
        let read = |path: &Path| std::fs::read(path).map_err(|source| LoadError::Io { path: path.to_owned(), source });
        Ok(Self {
            config: read(&files.config)?,
            tokenizer: files.tokenizer.as_deref().map(read).transpose()?,
            preprocessor_config: files.preprocessor_config.as_deref().map(read).transpose()?,
        })
    }

    /// A new model's files: `config` serialised, and the tokenizer and preprocessor files given.
    pub fn new(config: &BlipConfig, tokenizer: Option<Vec<u8>>, preprocessor_config: Option<Vec<u8>>) -> Self {
        let config = serde_json::to_vec_pretty(config).expect("a config serialises");
        Self { config, tokenizer, preprocessor_config }
    }
}

/// Images encoded once for scoring against any number of texts.
#[derive(Debug, Clone)]
pub struct EncodedImages {
    /// ViT output after the final LayerNorm (adapted, if an adapter was applied):
    /// `[images, 1 + patches, d]`.
    pub embeds: Tensor,
    /// Cross-attention keys/values of `embeds` for every text layer.
    pub memory: ImageMemory,
    /// L2-normalised ITC features `[images, image_text_hidden_size]`.
    pub itc_features: Tensor,
}

/// Images encoded for ranking, without the cross-attention memory: the ViT's tokens and the ITC
/// features. What an app keeps between queries: the memory (every text layer's keys and values,
/// about 14 MB an image at 224 px in f32) is built with [`BlipItm::memory_of`] only for the images
/// a query re-ranks by ITM.
#[derive(Debug, Clone)]
pub struct ImageStates {
    /// ViT output after the final LayerNorm (adapted, if an adapter was applied):
    /// `[images, 1 + patches, d]`.
    pub embeds: Tensor,
    /// L2-normalised ITC features `[images, image_text_hidden_size]`.
    pub itc_features: Tensor,
}

impl ImageStates {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.embeds.dims().first().copied().unwrap_or(0)
    }

    /// No image.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The images of several batches, in order (as if encoded in one batch).
    pub fn cat(parts: &[ImageStates]) -> Result<Self> {
        if parts.is_empty() {
            candle_core::bail!("no image states to concatenate")
        }
        let embeds: Vec<&Tensor> = parts.iter().map(|p| &p.embeds).collect();
        let itc: Vec<&Tensor> = parts.iter().map(|p| &p.itc_features).collect();
        Ok(Self { embeds: Tensor::cat(&embeds, 0)?, itc_features: Tensor::cat(&itc, 0)? })
    }
}

/// ITM output of one text against a batch of images (or one image against a batch of texts).
#[derive(Debug, Clone)]
pub struct ItmOutput {
    /// `[pairs, 2]`: logits of (no match, match).
    pub logits: Tensor,
    /// `[pairs, len, d]`: the fused states; row 0 of each is the `[ENC]` feature.
    pub fused: Tensor,
    /// Per text layer `[pairs, heads, len, image tokens]`, when requested.
    pub cross_attentions: Vec<Tensor>,
}

impl ItmOutput {
    /// Match probabilities `softmax(logits)[:, 1]`, `[pairs]`.
    pub fn match_probability(&self) -> Result<Tensor> {
        candle_nn::ops::softmax(&self.logits, D::Minus1)?.i((.., 1))
    }
}

/// The BLIP retrieval model with ITM and ITC heads.
#[derive(Debug, Clone)]
pub struct BlipItm {
    pub vision_model: BlipVisionModel,
    pub text_encoder: BlipTextModel,
    pub vision_proj: Linear,
    pub text_proj: Linear,
    pub itm_head: Linear,
    pub config: BlipConfig,
}

impl BlipItm {
    pub fn new(cfg: &BlipConfig, vb: VarBuilder) -> Result<Self> {
        let (dv, dt, e) = (cfg.vision_config.hidden_size, cfg.text_config.hidden_size, cfg.image_text_hidden_size);
        Ok(Self {
            vision_model: BlipVisionModel::new(&cfg.vision_config, vb.pp("vision_model"))?,
            text_encoder: BlipTextModel::new(&cfg.text_config, vb.pp("text_encoder"))?,
            vision_proj: linear(dv, e, vb.pp("vision_proj"))?,
            text_proj: linear(dt, e, vb.pp("text_proj"))?,
            itm_head: linear(dt, 2, vb.pp("itm_head"))?,
            config: cfg.clone(),
        })
    }

    /// Reads and validates `config.json`.
    pub fn read_config(path: &std::path::Path) -> std::result::Result<BlipConfig, LoadError> {
        let cfg: BlipConfig = read_json(path)?;
        cfg.validate().map_err(|message| LoadError::Config { path: path.to_owned(), message })?;
        Ok(cfg)
    }

    /// Loads an HF `BlipForImageTextRetrieval` checkpoint in `dtype`.
    pub fn load(files: &ModelFiles, dtype: DType, device: &Device) -> std::result::Result<Self, LoadError> {
        Self::load_with_renames(files, RenameTable::identity(), dtype, device)
    }

    /// As [`BlipItm::load`], for checkpoints whose key names differ from HF's.
    pub fn load_with_renames(
        files: &ModelFiles,
        renames: RenameTable,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Self, LoadError> {
        let cfg = Self::read_config(&files.config)?;
        build_from_safetensors(&files.weights, renames, &Self::allowed_unused(), dtype, device, |vb| {
            Self::new(&cfg, vb)
        })
    }

    /// As [`BlipItm::load`], also returning the checkpoint's [`crate::artifact::BaseModel`], its
    /// fingerprint hashed from the tensors as they were read (no second pass over the weights).
    pub fn load_fingerprinted(
        files: &ModelFiles,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<(Self, crate::artifact::BaseModel), LoadError> {
        let cfg = Self::read_config(&files.config)?;
        let (model, digests) = build_fingerprinted(
            &files.weights,
            RenameTable::identity(),
            &Self::allowed_unused(),
            dtype,
            device,
            |vb| Self::new(&cfg, vb),
        )?;
        Ok((model, crate::artifact::BaseModel::from_digests(files, &digests)?))
    }

    /// The keys of a BLIP checkpoint that ITM scoring does not read, each for a reason; every other
    /// tensor must be read, or the load is refused ([`LoadError::UnusedTensors`]).
    pub fn allowed_unused() -> AllowedUnused {
        AllowedUnused::none()
            .suffix("embeddings.position_ids", "HF's position-index buffer (0, 1, 2, …), saved by older transformers")
            // BLIP's own checkpoints (salesforce/BLIP names, `RenameTable::blip_original`) carry
            // what its pre-training and retrieval training keep beside the model.
            .part("text_decoder.", "BLIP's captioning decoder (pre-training checkpoints): ITM does not use it")
            .part("visual_encoder_m.", "BLIP's momentum ViT, a training-time copy for ITC distillation")
            .part("text_encoder_m.", "BLIP's momentum text encoder, a training-time copy")
            .part("vision_proj_m.", "BLIP's momentum ITC projection, a training-time copy")
            .part("text_proj_m.", "BLIP's momentum ITC projection, a training-time copy")
            .exact("image_queue", "BLIP's ITC feature queue, training state")
            .exact("text_queue", "BLIP's ITC feature queue, training state")
            .exact("idx_queue", "BLIP's ITC queue of image ids, training state")
            .exact("ptr_queue", "BLIP's ITC queue pointer, training state")
            .exact("temp", "BLIP's ITC temperature: scoring compares cosines, training reads it itself")
    }

    /// Saves a BLIP folder in HF's layout: `files` and `tensors` as `model.safetensors`, each
    /// atomically (the weights first, `config.json` last). The config is checked first, so the
    /// folder loads again.
    pub fn save(
        dir: &Path,
        files: &BlipFolderFiles,
        tensors: &BTreeMap<String, Tensor>,
    ) -> std::result::Result<(), LoadError> {
        let path = dir.join(CONFIG_FILE);
        let text = std::str::from_utf8(&files.config)
            .map_err(|e| LoadError::Config { path: path.clone(), message: format!("not UTF-8: {e}") })?;
        let config: BlipConfig = crate::loading::parse_json(&path, text)?;
        config.validate().map_err(|message| LoadError::Config { path, message })?;
        crate::artifact::write_tensors(dir, WEIGHTS_FILE, tensors)?;
        for (name, bytes) in [(TOKENIZER_FILE, &files.tokenizer), (PREPROCESSOR_FILE, &files.preprocessor_config)] {
            if let Some(bytes) = bytes {
                crate::artifact::write_file(dir, name, bytes)?;
            }
        }
        crate::artifact::write_file(dir, CONFIG_FILE, &files.config)
    }

    /// Copies the BLIP of `files` into `dir`: weights (shards and index included), then tokenizer,
    /// preprocessor config and `config.json` last, each atomically. Other files of its folder (run
    /// records, evaluations) are not the model's and stay behind.
    pub fn copy(files: &ModelFiles, dir: &Path) -> std::result::Result<(), LoadError> {
        let model_files = files.weights.iter().chain(&files.weight_index).chain(&files.tokenizer);
        for src in model_files.chain(&files.preprocessor_config).chain([&files.config]) {
            // Every path of a `ModelFiles` is a folder joined with a file name.
            let name = src.file_name().expect("a model file has a name");
            ctxalign_data::copy_atomic(src, &dir.join(name))?;
        }
        Ok(())
    }

    pub fn dtype(&self) -> DType {
        self.vision_model.dtype()
    }

    /// Builds the cross-attention memory and ITC features of already computed image embeddings.
    pub fn prepare_images(&self, embeds: Tensor) -> Result<EncodedImages> {
        let memory = self.text_encoder.image_memory(&embeds, None)?;
        let itc_features = self.image_itc_features(&embeds)?;
        Ok(EncodedImages { embeds, memory, itc_features })
    }

    /// L2-normalised ITC features `[images, e]` of image embeddings `[images, tokens, d]` (their
    /// first token, projected).
    pub fn image_itc_features(&self, embeds: &Tensor) -> Result<Tensor> {
        l2_normalize(&self.vision_proj.forward(&first_token(embeds)?)?)
    }

    /// The ITC features of already computed image embeddings, kept with them (no memory).
    pub fn states_of(&self, embeds: Tensor) -> Result<ImageStates> {
        let itc_features = self.image_itc_features(&embeds)?;
        Ok(ImageStates { embeds, itc_features })
    }

    /// `[images, 3, H, W]` normalised pixels → tokens and ITC features, without the
    /// cross-attention memory ([`BlipItm::memory_of`] builds it for the images that need it).
    pub fn image_states(&self, pixel_values: &Tensor) -> Result<ImageStates> {
        self.states_of(self.vision_model.forward(pixel_values)?)
    }

    /// The cross-attention memory of the images at `indices` of `states`, in that order: keys and
    /// values for those images only (BLIP re-ranks its ITC top k by ITM).
    pub fn memory_of(&self, states: &ImageStates, indices: &[usize]) -> Result<ImageMemory> {
        if let Some(&bad) = indices.iter().find(|&&i| i >= states.len()) {
            candle_core::bail!("image {bad} of {} encoded images", states.len())
        }
        let rows = Tensor::new(indices.iter().map(|&i| i as u32).collect::<Vec<_>>(), states.embeds.device())?;
        let mut memory = self.text_encoder.image_memory(&states.embeds.index_select(&rows, 0)?, None)?;
        // Keys and values come out as head-split views; the attention's batched products take
        // them laid out as `ImageMemory::gather` leaves them, contiguous.
        for (k, v) in &mut memory.keys_values {
            *k = k.contiguous()?;
            *v = v.contiguous()?;
        }
        Ok(memory)
    }

    /// `[images, 3, H, W]` normalised pixels → everything needed to score texts against them.
    pub fn encode_images(&self, pixel_values: &Tensor) -> Result<EncodedImages> {
        self.prepare_images(self.vision_model.forward(pixel_values)?)
    }

    /// Text-only pass (`input_ids` with `[CLS]` first) → L2-normalised ITC features `[texts, e]`.
    pub fn text_features(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let out = self.text_encoder.forward(input_ids, attention_mask, None, false)?;
        l2_normalize(&self.text_proj.forward(&first_token(&out.last_hidden_state)?)?)
    }

    /// Cosine similarities `[images, texts]` of ITC features.
    pub fn itc_similarity(image_features: &Tensor, text_features: &Tensor) -> Result<Tensor> {
        image_features.matmul(&text_features.t()?)
    }

    /// ITM of texts against images (`itm_input_ids` with `[ENC]` first). Batches must be equal
    /// (pairwise), or one side 1: one description against N images runs its text-only work once.
    pub fn itm(
        &self,
        images: &ImageMemory,
        itm_input_ids: &Tensor,
        attention_mask: &Tensor,
        output_cross_attentions: bool,
    ) -> Result<ItmOutput> {
        let out = self.text_encoder.forward(itm_input_ids, attention_mask, Some(images), output_cross_attentions)?;
        let logits = self.itm_head.forward(&first_token(&out.last_hidden_state)?)?;
        Ok(ItmOutput { logits, fused: out.last_hidden_state, cross_attentions: out.cross_attentions })
    }
}

pub use ctxalign_nn::ops::l2_normalize;

#[cfg(test)]
mod image_states_tests {
    use super::*;
    use candle_nn::VarMap;

    /// The memory built for chosen images from their states equals the full encoding's memory
    /// gathered at those images (bit for bit: the same products on the same rows), and the ITC
    /// features equal the full encoding's; an index past the end is refused.
    #[test]
    fn memory_of_chosen_images_equals_the_full_encodings() -> Result<()> {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let model = BlipItm::new(&BlipConfig::vignettes_small(40), VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
        let pixels = Tensor::randn(0f32, 1., (3, 3, 96, 96), &dev)?;
        let full = model.encode_images(&pixels)?;
        let states = model.image_states(&pixels)?;
        assert_eq!(states.len(), 3);
        let max_diff = |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar() };
        assert_eq!(max_diff(&states.itc_features, &full.itc_features)?, 0.0);
        let chosen = model.memory_of(&states, &[2, 0])?;
        let gathered = full.memory.gather(&Tensor::new(&[2u32, 0], &dev)?)?;
        assert_eq!(chosen.num_images, 2);
        for ((k, v), (gk, gv)) in chosen.keys_values.iter().zip(&gathered.keys_values) {
            assert_eq!(max_diff(k, gk)?, 0.0);
            assert_eq!(max_diff(v, gv)?, 0.0);
        }
        let halves = ImageStates::cat(&[
            model.image_states(&pixels.narrow(0, 0, 1)?)?,
            model.image_states(&pixels.narrow(0, 1, 2)?)?,
        ])?;
        assert!(max_diff(&halves.itc_features, &states.itc_features)? < 1e-6);
        assert!(model.memory_of(&states, &[3]).is_err());
        Ok(())
    }
}

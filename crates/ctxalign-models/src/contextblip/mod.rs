//! ContextBLIP (Lin et al. 2024): a frozen BLIP with a multi-scale adapter on its ViT, trained by
//! ITM on hard negatives plus text-guided masked image modelling (TMIM), then fine-tuned for
//! IMAGECODE with a candidate head (S1) and an inter-context encoder (S2). Reference-notes §2.
//!
//! A ContextBLIP checkpoint is a folder beside any BLIP: `contextblip.json` ([`ContextBlipConfig`])
//! and `contextblip.safetensors` with `adapter.*` (see [`ctxalign_nn::adapter`]), and — from
//! pre-training — `decoder.*` and `text_adapter.*` (see [`tmim`]); fine-tuning adds `head.*` and
//! `inter_context.*` (see [`ircd`]), and S1 the fine-tuned BLIP weights under their HF names.

pub mod ircd;
pub mod masking;
pub mod tmim;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use ctxalign_nn::{AdapterConfig, MultiScaleAdapter};
use serde::{Deserialize, Serialize};

pub use ircd::{candidate_cross_entropy, CandidateFeatures, CandidateHead, InterContextConfig, InterContextEncoder};
pub use masking::{MaskSelection, MaskingConfig, PatchMask, TokenChoice};
pub use tmim::{masked_patch_mse, patchify, TextAdapter, TextAdapterConfig, TmimDecoder, TmimDecoderConfig};

use crate::artifact::BaseModel;
use crate::blip::{BlipConfig, BlipItm, BlipVisionOutput, EncodedImages, ImageStates};
use crate::loading::{
    build_from_safetensors, from_json_value, read_json, take_field, AllowedUnused, LoadError, RenameTable,
};

/// File names of a ContextBLIP checkpoint folder.
pub const CONFIG_FILE: &str = "contextblip.json";
pub const WEIGHTS_FILE: &str = "contextblip.safetensors";

/// Everything ContextBLIP adds to a BLIP, stored as `contextblip.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContextBlipConfig {
    pub adapter: AdapterConfig,
    pub decoder: TmimDecoderConfig,
    pub text_adapter: TextAdapterConfig,
    pub masking: MaskingConfig,
}

impl ContextBlipConfig {
    /// The paper's settings sized for `blip`: taps at quarters of the ViT depth (`[3, 6, 9, 12]`
    /// for 12 layers), δ = 2, concat; the reference decoder (scaled down for narrow ViTs); the text
    /// adapter halving the width; π = 0.25 text-guided masking.
    pub fn for_blip(blip: &BlipConfig) -> Self {
        let v = &blip.vision_config;
        let t = blip.text_config.hidden_size;
        Self {
            adapter: AdapterConfig::paper_default(v.hidden_size, v.num_hidden_layers),
            decoder: TmimDecoderConfig::for_blip(blip),
            text_adapter: TextAdapterConfig { hidden_size: t, bottleneck_size: t / 2 },
            masking: MaskingConfig::default(),
        }
    }

    /// Checks that this configuration fits `blip`.
    pub fn validate_for(&self, blip: &BlipConfig) -> std::result::Result<(), String> {
        let v = &blip.vision_config;
        let mut problems = vec![];
        if self.adapter.hidden_size != v.hidden_size {
            problems.push(format!("adapter.hidden_size {} ≠ ViT width {}", self.adapter.hidden_size, v.hidden_size));
        }
        if let Some(&t) = self.adapter.taps.iter().find(|&&t| t == 0 || t > v.num_hidden_layers) {
            problems.push(format!("adapter tap {t} is outside the ViT's layers 1..={}", v.num_hidden_layers));
        }
        if let Err(e) = self.adapter.validate() {
            problems.push(e.to_string());
        }
        let d = &self.decoder;
        if (d.vision_hidden_size, d.text_hidden_size, d.image_size, d.patch_size)
            != (v.hidden_size, blip.text_config.hidden_size, v.image_size, v.patch_size)
        {
            problems.push(format!(
                "decoder was sized for a {}-wide ViT at {} px / {} px patches with {}-wide text; this BLIP is {} / {} / {} / {}",
                d.vision_hidden_size,
                d.image_size,
                d.patch_size,
                d.text_hidden_size,
                v.hidden_size,
                v.image_size,
                v.patch_size,
                blip.text_config.hidden_size
            ));
        }
        if let Err(e) = d.validate() {
            problems.push(e);
        }
        if self.text_adapter.hidden_size != blip.text_config.hidden_size {
            problems.push(format!(
                "text_adapter.hidden_size {} ≠ text width {}",
                self.text_adapter.hidden_size, blip.text_config.hidden_size
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    /// Reads the settings of `dir/contextblip.json` and checks them against `blip`.
    pub fn read(dir: &Path, blip: &BlipConfig) -> std::result::Result<Self, LoadError> {
        ContextBlipRecord::read(dir)?.config_for(dir, blip)
    }
}

/// `contextblip.json`: what a ContextBLIP folder is — the stage that wrote it, the BLIP it was built
/// on, ContextBLIP's settings and, from S2, the inter-context encoder's. The one definition of the
/// file: every reader and writer goes through it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ContextBlipRecord {
    pub stage: Stage,
    /// The BLIP the folder was built on (S0: the frozen BLIP its adapter needs; S1/S2: the BLIP
    /// fine-tuning started from). Absent in folders written before it was recorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_model: Option<BaseModel>,
    #[serde(flatten)]
    pub config: ContextBlipConfig,
    /// S2's inter-context encoder.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inter_context: Option<InterContextConfig>,
}

impl ContextBlipRecord {
    /// A record of `stage` with `config`, no base model and no inter-context settings.
    pub fn new(stage: Stage, config: ContextBlipConfig) -> Self {
        Self { stage, base_model: None, config, inter_context: None }
    }

    /// Reads `dir/contextblip.json`. Folders written before stages were recorded get theirs from
    /// their files: S2 with `inter_context` settings, S1 when a complete model folder
    /// (`config.json` beside), else S0.
    pub fn read(dir: &Path) -> std::result::Result<Self, LoadError> {
        let path = dir.join(CONFIG_FILE);
        let mut fields: serde_json::Map<String, serde_json::Value> = read_json(&path)?;
        let stage: Option<Stage> = take_field(&path, &mut fields, "stage")?;
        let base_model = take_field(&path, &mut fields, "base_model")?;
        let inter_context: Option<InterContextConfig> = take_field(&path, &mut fields, "inter_context")?;
        let config: ContextBlipConfig = from_json_value(&path, "", serde_json::Value::Object(fields))?;
        let stage = stage.unwrap_or(if inter_context.is_some() {
            Stage::S2
        } else if dir.join("config.json").is_file() {
            Stage::S1
        } else {
            Stage::S0
        });
        Ok(Self { stage, base_model, config, inter_context })
    }

    /// ContextBLIP's settings, checked against `blip` (errors name `dir`'s `contextblip.json`).
    pub fn config_for(self, dir: &Path, blip: &BlipConfig) -> std::result::Result<ContextBlipConfig, LoadError> {
        self.config.validate_for(blip).map_err(|message| LoadError::Config { path: dir.join(CONFIG_FILE), message })?;
        Ok(self.config)
    }

    /// The file's text.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a record serialises")
    }

    /// Refuses to apply this S0 adapter (of folder `dir`) to a BLIP other than the one it was
    /// pre-trained on, when the record names it: its outputs would be meaningless, silently.
    /// `blip` is the [`BaseModel`] of `files`.
    pub fn check_base_model(
        &self,
        dir: &Path,
        blip: &BaseModel,
        files: &crate::ModelFiles,
    ) -> std::result::Result<(), LoadError> {
        match &self.base_model {
            Some(recorded) if !recorded.matches(blip, files)? => Err(LoadError::Config {
                path: dir.join(CONFIG_FILE),
                message: format!(
                    "this adapter was pre-trained on the BLIP in {} (fingerprint {}), not on the one given \
                     ({}, fingerprint {}): pass that BLIP as --model",
                    recorded.source, recorded.fingerprint, blip.source, blip.fingerprint
                ),
            }),
            _ => Ok(()),
        }
    }
}

/// BLIP with the adapter on its ViT: what zero-shot scoring and fine-tuning run.
#[derive(Debug, Clone)]
pub struct ContextBlip {
    pub blip: BlipItm,
    pub adapter: MultiScaleAdapter,
    pub config: ContextBlipConfig,
}

impl ContextBlip {
    /// BLIP and the adapter from one builder holding BLIP's tensors under their HF names and the
    /// adapter's under `adapter.*`: the layout of training, and of a fine-tuned folder's weights.
    pub fn new(blip: &BlipConfig, cfg: &ContextBlipConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate_for(blip).map_err(candle_core::Error::msg)?;
        Ok(Self {
            blip: BlipItm::new(blip, vb.clone())?,
            adapter: MultiScaleAdapter::new(&cfg.adapter, vb.pp("adapter"))?,
            config: cfg.clone(),
        })
    }

    /// Loads the adapter of the ContextBLIP folder `dir` onto `blip` (other keys in the file —
    /// decoder, heads — are left for their own loaders).
    pub fn load(blip: BlipItm, dir: &Path, dtype: DType, device: &Device) -> std::result::Result<Self, LoadError> {
        Self::from_record(blip, dir, ContextBlipRecord::read(dir)?, dtype, device)
    }

    /// Saves a ContextBLIP folder: `tensors` as `contextblip.safetensors` (adapter, and the stage's
    /// heads), then `record` as `contextblip.json`, each atomically. An S1/S2 folder's fine-tuned
    /// BLIP is saved beside them by [`BlipItm::save`].
    pub fn save(
        dir: &Path,
        record: &ContextBlipRecord,
        tensors: &BTreeMap<String, Tensor>,
    ) -> std::result::Result<(), LoadError> {
        crate::artifact::write_tensors(dir, WEIGHTS_FILE, tensors)?;
        crate::artifact::write_file(dir, CONFIG_FILE, record.to_json().as_bytes())
    }

    /// As [`ContextBlip::load`] with the folder's record already read.
    pub fn from_record(
        blip: BlipItm,
        dir: &Path,
        record: ContextBlipRecord,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Self, LoadError> {
        let config = record.config;
        config
            .validate_for(&blip.config)
            .map_err(|message| LoadError::Config { path: dir.join(CONFIG_FILE), message })?;
        let allowed = parts_read_elsewhere(record.stage, PART_ADAPTER);
        let adapter =
            build_from_safetensors(&[weights_path(dir)], RenameTable::identity(), &allowed, dtype, device, |vb| {
                MultiScaleAdapter::new(&config.adapter, vb.pp("adapter"))
            })?;
        Ok(Self { blip, adapter, config })
    }

    /// The ViT's outputs, every layer kept, cut from any gradient graph (BLIP is frozen: its
    /// activations are not stored for backward).
    pub fn frozen_vision(&self, pixel_values: &Tensor) -> Result<BlipVisionOutput> {
        Ok(detached(self.blip.vision_model.forward_with_hidden_states(pixel_values)?))
    }

    /// The adapted image tokens of a vision pass, `[B, tokens, d]`.
    pub fn adapt(&self, vision: &BlipVisionOutput) -> Result<Tensor> {
        self.adapter.forward(&vision.hidden_states, &self.blip.vision_model.post_layernorm, &vision.last_hidden_state)
    }

    /// Images → adapted tokens, cross-attention memory and ITC features (frozen ViT).
    pub fn encode_images(&self, pixel_values: &Tensor) -> Result<EncodedImages> {
        self.blip.prepare_images(self.adapt(&self.frozen_vision(pixel_values)?)?)
    }

    /// Images → adapted tokens and ITC features, without the cross-attention memory (frozen ViT).
    pub fn image_states(&self, pixel_values: &Tensor) -> Result<ImageStates> {
        self.blip.states_of(self.adapt(&self.frozen_vision(pixel_values)?)?)
    }

    /// As [`ContextBlip::encode_images`] with the ViT in the gradient graph (S1 fine-tunes it).
    pub fn encode_images_end_to_end(&self, pixel_values: &Tensor) -> Result<EncodedImages> {
        let vision = self.blip.vision_model.forward_with_hidden_states(pixel_values)?;
        self.blip.prepare_images(self.adapt(&vision)?)
    }

    /// MAE-style pass over the visible patches only (with their own position embeddings) through
    /// the frozen ViT, then the adapter: `[B, 1 + P − k, d]`, CLS first, visible patches ascending.
    /// `vision` is the full image's pass (from [`ContextBlip::frozen_vision`]), whose embeddings
    /// (`hidden_states[0]`) are reused rather than computed again.
    pub fn encode_visible(&self, vision: &BlipVisionOutput, mask: &PatchMask) -> Result<Tensor> {
        let Some(tokens) = vision.hidden_states.first() else {
            candle_core::bail!("encode_visible needs a vision pass with hidden states (frozen_vision)")
        };
        let (b, t, d) = tokens.dims3()?;
        if t != 1 + mask.num_patches || b != mask.batch() {
            candle_core::bail!(
                "mask of {} samples × {} patches for {b} images of {} patches",
                mask.batch(),
                mask.num_patches,
                t - 1
            )
        }
        let visible = tokens
            .reshape((b * t, d))?
            .index_select(&mask.visible_token_rows(tokens.device())?, 0)?
            .reshape((b, t - mask.masked_count(), d))?;
        self.adapt(&detached(self.blip.vision_model.encode_tokens(&visible.detach(), true)?))
    }
}

/// A vision pass cut from the gradient graph.
fn detached(out: BlipVisionOutput) -> BlipVisionOutput {
    BlipVisionOutput {
        last_hidden_state: out.last_hidden_state.detach(),
        hidden_states: out.hidden_states.iter().map(Tensor::detach).collect(),
    }
}

/// The pre-training-only parts: the TMIM decoder and the text adapter.
#[derive(Debug, Clone)]
pub struct TmimHead {
    pub decoder: TmimDecoder,
    pub text_adapter: TextAdapter,
}

impl TmimHead {
    pub fn new(cfg: &ContextBlipConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            decoder: TmimDecoder::new(&cfg.decoder, vb.pp("decoder"))?,
            text_adapter: TextAdapter::new(&cfg.text_adapter, vb.pp("text_adapter"))?,
        })
    }

    /// TMIM loss of one batch: `visible` adapted tokens (from [`ContextBlip::encode_visible`]),
    /// frozen text states `[B, T, d_text]` with their mask, and the `pixel_values` the targets are
    /// cut from.
    pub fn loss(
        &self,
        visible: &Tensor,
        mask: &PatchMask,
        text_states: &Tensor,
        text_mask: &Tensor,
        pixel_values: &Tensor,
    ) -> Result<Tensor> {
        let text = candle_core::Module::forward(&self.text_adapter, text_states)?;
        let predicted = self.decoder.forward(visible, mask, &text, text_mask)?;
        let targets = patchify(&pixel_values.to_dtype(predicted.dtype())?, self.decoder.config.patch_size)?;
        masked_patch_mse(&predicted, &targets, mask)
    }
}

/// Normalised `[ENC]` features `[N, d]` of one description (`itm_ids`, `mask`: `[1, len]`)
/// against its N encoded candidates: what the fine-tuning heads (S1's candidate head, S2's
/// inter-context encoder) read.
pub fn candidate_features(model: &BlipItm, images: &EncodedImages, itm_ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let fused = model.itm(&images.memory, itm_ids, mask, false)?.fused; // [N, len, d]
    crate::blip::l2_normalize(&ctxalign_nn::first_token(&fused)?)
}

/// Which stage wrote a ContextBLIP folder (`"stage"` in `contextblip.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Pre-trained adapter, TMIM decoder and text adapter over a frozen BLIP (the folder holds
    /// only ContextBLIP's files; the BLIP comes from elsewhere).
    S0,
    /// A complete model folder: the fine-tuned BLIP, the adapter and the candidate head.
    S1,
    /// The S1 folder plus the inter-context encoder.
    S2,
}

impl Stage {
    /// "an S0 folder (a pre-trained adapter for a frozen BLIP)", for messages.
    pub fn describe(self) -> &'static str {
        match self {
            Self::S0 => "an S0 folder (a pre-trained adapter for a frozen BLIP)",
            Self::S1 => "an S1 folder (a fine-tuned BLIP with adapter and candidate head)",
            Self::S2 => "an S2 folder (a fine-tuned BLIP with candidate head and inter-context encoder)",
        }
    }
}

/// The stage of the ContextBLIP folder `dir` ([`ContextBlipRecord::read`]).
pub fn folder_stage(dir: &Path) -> std::result::Result<Stage, LoadError> {
    Ok(ContextBlipRecord::read(dir)?.stage)
}

/// `Ok(stage)` when the folder's stage is one of `allowed`, else an error that says what the
/// folder is and what `purpose` needs.
pub fn require_stage(dir: &Path, allowed: &[Stage], purpose: &str) -> std::result::Result<Stage, LoadError> {
    let wanted: Vec<&str> = allowed.iter().map(|s| s.describe()).collect();
    let needs = format!("{purpose} needs {}", wanted.join(" or "));
    if !dir.join(CONFIG_FILE).is_file() {
        return Err(crate::artifact::wrong_folder(dir, CONFIG_FILE, &needs));
    }
    let stage = folder_stage(dir)?;
    if allowed.contains(&stage) {
        return Ok(stage);
    }
    Err(LoadError::Config { path: dir.join(CONFIG_FILE), message: format!("this is {}; {needs}", stage.describe()) })
}

/// Key prefixes of the parts of a `contextblip.safetensors`, each read by its own loader.
pub const PART_ADAPTER: &str = "adapter.";
pub const PART_DECODER: &str = "decoder.";
pub const PART_TEXT_ADAPTER: &str = "text_adapter.";
pub const PART_HEAD: &str = "head.";
pub const PART_INTER_CONTEXT: &str = "inter_context.";

/// The parts a `contextblip.safetensors` written by `stage` holds: S0 the adapter with the TMIM
/// decoder and text adapter; S1 the adapter and the candidate head (the fine-tuned BLIP is in
/// `model.safetensors`); S2 those and the inter-context encoder.
pub fn stage_parts(stage: Stage) -> &'static [&'static str] {
    match stage {
        Stage::S0 => &[PART_ADAPTER, PART_DECODER, PART_TEXT_ADAPTER],
        Stage::S1 => &[PART_ADAPTER, PART_HEAD],
        Stage::S2 => &[PART_ADAPTER, PART_HEAD, PART_INTER_CONTEXT],
    }
}

/// What the loader of `part` of a `stage` folder's `contextblip.safetensors` may leave unread: the
/// stage's other parts (read by their own loaders, or — the TMIM decoder and text adapter — by
/// nothing after pre-training), each as a whole. Within its own part every key must be read, and a
/// part the stage does not have (an inter-context encoder in an S1 file) is refused by every loader.
pub fn parts_read_elsewhere(stage: Stage, part: &str) -> AllowedUnused {
    let why = |p: &str| match p {
        PART_DECODER | PART_TEXT_ADAPTER => "S0's TMIM decoder and text adapter serve pre-training only",
        PART_HEAD => "the candidate head, read by its own loader",
        PART_INTER_CONTEXT => "the inter-context encoder, read by its own loader",
        _ => "the adapter, read by its own loader",
    };
    stage_parts(stage).iter().filter(|&&p| p != part).fold(AllowedUnused::none(), |a, &p| a.part(p, why(p)))
}

/// `dir/contextblip.safetensors`.
pub fn weights_path(dir: &Path) -> PathBuf {
    dir.join(WEIGHTS_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Taps are strictly increasing layers of the ViT: a repeated tap (`2,2`) or a reordered list
    /// (`4,1`) is refused when the settings are checked, as out-of-range ones are.
    #[test]
    fn taps_must_be_strictly_increasing_and_in_range() {
        let blip = BlipConfig::vignettes_small(100); // 4 ViT layers
        let with = |taps: Vec<usize>| {
            let mut cfg = ContextBlipConfig::for_blip(&blip);
            cfg.adapter.taps = taps;
            cfg.validate_for(&blip)
        };
        assert!(with(vec![1, 2, 4]).is_ok());
        for (taps, needle) in [
            (vec![2, 2], "strictly increasing"),
            (vec![4, 1], "strictly increasing"),
            (vec![1, 3, 3, 4], "strictly increasing"),
            (vec![0, 2], "outside"),
            (vec![2, 5], "outside"),
            (vec![], "empty"),
        ] {
            let e = with(taps.clone()).unwrap_err();
            assert!(e.contains(needle), "{taps:?}: {e}");
        }
        // The paper's quarters on a ViT of fewer than four layers: each layer once.
        let three = BlipConfig {
            vision_config: crate::blip::BlipVisionConfig { num_hidden_layers: 3, ..blip.vision_config.clone() },
            ..blip
        };
        assert_eq!(ContextBlipConfig::for_blip(&three).adapter.taps, vec![1, 2, 3]);
    }

    #[test]
    fn records_round_trip_and_older_folders_get_their_stage_from_their_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let config = ContextBlipConfig::for_blip(&BlipConfig::itm_base_224());
        let base = BaseModel { source: "/models/blip".into(), fingerprint: "sha256:0123456789abcdef".into() };
        // Full fingerprints compare as they are: the files are not read.
        let files = crate::ModelFiles {
            config: dir.join("nowhere/config.json"),
            weights: vec![],
            weight_index: None,
            tokenizer: None,
            preprocessor_config: None,
        };
        let record =
            ContextBlipRecord { base_model: Some(base.clone()), ..ContextBlipRecord::new(Stage::S0, config.clone()) };
        std::fs::write(dir.join(CONFIG_FILE), record.to_json()).unwrap();
        assert_eq!(ContextBlipRecord::read(dir).unwrap(), record);
        assert!(record.check_base_model(dir, &base, &files).is_ok());
        let other = BaseModel { fingerprint: "sha256:fedcba9876543210".into(), ..base };
        let e = record.check_base_model(dir, &other, &files).unwrap_err().to_string();
        assert!(e.contains("pre-trained on the BLIP in /models/blip"), "{e}");

        // A folder from before stages and base models were recorded: the settings alone.
        std::fs::write(dir.join(CONFIG_FILE), serde_json::to_string(&config).unwrap()).unwrap();
        let old = ContextBlipRecord::read(dir).unwrap();
        assert_eq!((old.stage, old.base_model.is_none()), (Stage::S0, true));
        assert!(old.check_base_model(dir, &other, &files).is_ok(), "nothing recorded, nothing to refuse");
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        assert_eq!(folder_stage(dir).unwrap(), Stage::S1);
        let ic = InterContextConfig::reference(768);
        let s2 = ContextBlipRecord { inter_context: Some(ic), ..ContextBlipRecord::new(Stage::S2, config) };
        let mut json: serde_json::Value = serde_json::from_str(&s2.to_json()).unwrap();
        json.as_object_mut().unwrap().remove("stage");
        std::fs::write(dir.join(CONFIG_FILE), json.to_string()).unwrap();
        assert_eq!(folder_stage(dir).unwrap(), Stage::S2);
    }
}

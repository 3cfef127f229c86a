//! Gradient reach: one training step of every trainable model ctxalign ships — BLIP's retrieval
//! objective, ContextBLIP S0 / S1 / S2 and ContextCLIP with both image towers — on a given device
//! and precision, listing each trainable tensor that received no finite, non-zero gradient.
//!
//! Candle's fused LayerNorm and softmax record no backward (docs/reference-notes.md §6), so a kernel
//! path taken only on one device or in one dtype could silently freeze half a model; this check runs the
//! real models there (`cargo xtask grad-check --device cuda --precision bf16`, and the tests on the
//! CPU in f32 and bf16). Attention key biases are gradient-free by construction and not listed.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Tensor, Var};
use ctxalign_data::{CaptionCleaning, DecodeOptions, ImageProcessor, TextTokenizer};
use ctxalign_models::blip::BlipItm;
use ctxalign_models::contextblip::{
    candidate_cross_entropy, CandidateHead, ContextBlipConfig, InterContextConfig, InterContextEncoder,
};
use ctxalign_models::contextclip::{ContextClipConfig, ImageEncoderConfig};
use ctxalign_models::resnet::ResNetConfig;
use ctxalign_models::ModelFiles;
use ctxalign_nn::gradcheck::gradient_free_by_construction;
use ctxalign_train::blip::{BlipRetrievalObjective, INITIAL_TEMPERATURE, TEMPERATURE_KEY};
use ctxalign_train::contextblip::{build_finetuning, build_pretraining, FinetuneObjective, PretrainObjective};
use ctxalign_train::contextclip::{build_contextclip, ContextClipInit, ContextClipLossConfig, ContextClipObjective};
use ctxalign_train::{build_for_training, transformer_init, ParamSource, SampleDraws, TrainableParams};
use serde::Serialize;

use crate::{Result, Runtime};

/// One model's check.
#[derive(Debug, Clone, Serialize)]
pub struct ReachReport {
    /// The model and objective checked (`BLIP ITC + ITM`, `ContextCLIP ViT + BERT`, …).
    pub model: String,
    /// Trainable tensors checked.
    pub trainable: usize,
    /// Those without a finite, non-zero gradient.
    pub missing: Vec<String>,
    /// The step's loss (finite, else the check fails).
    pub loss: f64,
    /// Wall-clock seconds of the build, the step and the backward pass.
    pub seconds: f64,
}

impl ReachReport {
    /// Every trainable tensor got a finite, non-zero gradient and the loss is finite.
    pub fn passed(&self) -> bool {
        self.missing.is_empty() && self.loss.is_finite()
    }
}

/// Inputs of the check: a small BLIP folder (the shipped `models/blip-vignettes-small`), a BERT
/// WordPiece tokenizer (ContextCLIP's), and a few images.
pub struct ReachInputs {
    /// A BLIP folder: its shape for the BLIP trained from scratch, its weights and tokenizer for ContextBLIP.
    pub blip: ModelFiles,
    /// ContextCLIP's BERT WordPiece `tokenizer.json`.
    pub bert_tokenizer: PathBuf,
    /// The batch's images, one per built-in caption (four at most).
    pub images: Vec<PathBuf>,
}

impl ReachInputs {
    /// The shipped model, tokenizer and example images under the workspace root `root`.
    pub fn shipped(root: &Path) -> Result<Self> {
        let images = ["scene-1.jpg", "scene-2.jpg", "scene-4.jpg", "scene-7.jpg"]
            .iter()
            .map(|f| root.join("examples/images").join(f))
            .collect();
        Ok(Self {
            blip: ModelFiles::from_dir(&root.join("models/blip-vignettes-small"))?,
            bert_tokenizer: root.join("models/bert-base-uncased-tokenizer/tokenizer.json"),
            images,
        })
    }
}

const CAPTIONS: [&str; 4] = [
    "a red circle and a blue square on a green background",
    "a yellow triangle on a gray background",
    "two blue squares on a white background",
    "a green star left of a red circle",
];

/// Trainable tensors of `params` without a finite, non-zero gradient of `loss`.
pub fn without_gradient(params: &TrainableParams, loss: &Tensor) -> Result<Vec<String>> {
    let grads = loss.backward()?;
    let mut missing = vec![];
    for (name, var) in params.vars.iter().filter(|(k, _)| !gradient_free_by_construction(k)) {
        let ok = match grads.get(var.as_tensor()) {
            Some(g) => {
                let n = g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
                n > 0.0 && n.is_finite()
            }
            None => false,
        };
        if !ok {
            missing.push(name.clone());
        }
    }
    Ok(missing)
}

fn report(model: &str, params: &TrainableParams, loss: &Tensor, started: Instant) -> Result<ReachReport> {
    let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let missing = without_gradient(params, loss)?;
    Ok(ReachReport {
        model: model.into(),
        trainable: params.len(),
        missing,
        loss: value,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Runs every model's check on `rt`'s device and precision.
pub fn gradient_reach(inputs: &ReachInputs, rt: &Runtime) -> Result<Vec<ReachReport>> {
    let (dev, dtype) = (&rt.device, rt.dtype());
    let blip_cfg = BlipItm::read_config(&inputs.blip.config)?;
    let size = blip_cfg.vision_config.image_size as u32;
    let pixels =
        ImageProcessor::blip(size).load_batch(&inputs.images, DecodeOptions::default(), dev)?.to_dtype(dtype)?;
    let n = pixels.dim(0)?;
    let captions = &CAPTIONS[..n.min(CAPTIONS.len())];
    let ids: Vec<usize> = (0..captions.len()).collect();
    let blip_tokenizer = || -> Result<TextTokenizer> {
        let path =
            inputs.blip.tokenizer.clone().ok_or_else(|| crate::Error::Invalid("the BLIP has no tokenizer".into()))?;
        Ok(TextTokenizer::from_file(&path, CaptionCleaning::blip(30), 35)?)
    };
    let mut out = vec![];

    // BLIP retrieval (ITC + ITM on hard negatives), every tensor trainable, learned τ.
    let started = Instant::now();
    let source = ParamSource::from_scratch(transformer_init(0.02), 1);
    let (model, mut params) = build_for_training(source, dtype, dev, |vb| BlipItm::new(&blip_cfg, vb))?;
    let temperature = Var::new(INITIAL_TEMPERATURE as f32, dev)?;
    params.insert(TEMPERATURE_KEY, temperature.clone())?;
    let objective = BlipRetrievalObjective::new(model, blip_tokenizer()?, temperature, 1)?;
    let l = objective.losses(&pixels, captions, &ids, &SampleDraws::sequential(2, n))?;
    out.push(report("BLIP ITC + ITM", &params, &(&l.itc.loss + &l.itm)?, started)?);

    // ContextBLIP S0: adapter, TMIM decoder, text adapter through the frozen BLIP.
    let started = Instant::now();
    let cfg = ContextBlipConfig::for_blip(&blip_cfg);
    let (model, tmim, s0) = build_pretraining(&inputs.blip, &cfg, None, dtype, dev, 3)?;
    let objective = PretrainObjective::new(model, tmim, blip_tokenizer()?, dev, 3)?;
    let l = objective.losses(&pixels, captions, &ids, &SampleDraws::sequential(5, n))?;
    out.push(report("ContextBLIP S0 (L_itm + L_tmim)", &s0, &(&l.itm + &l.tmim)?, started)?);

    // ContextBLIP S1: BLIP + adapter + candidate head, from the S0 weights just built.
    let started = Instant::now();
    let tmp = std::env::temp_dir().join(format!("ctxalign-reach-{}", std::process::id()));
    let record =
        ctxalign_models::contextblip::ContextBlipRecord::new(ctxalign_models::contextblip::Stage::S0, cfg.clone());
    ctxalign_models::contextblip::ContextBlip::save(&tmp, &record, &s0.tensors())?;
    let built = build_finetuning(&inputs.blip, &tmp.join("contextblip.safetensors"), &cfg, true, dtype, dev, 1);
    let _ = std::fs::remove_dir_all(&tmp);
    let (model, head, s1) = built?;
    let objective = FinetuneObjective::new(model, head, blip_tokenizer()?, true, dev)?;
    let logits = objective.logits(&pixels, CAPTIONS[0])?;
    let ce = candidate_cross_entropy(&logits.unsqueeze(0)?, &[n - 1])?;
    out.push(report("ContextBLIP S1 (candidate cross-entropy)", &s1, &ce, started)?);

    // ContextBLIP S2: the inter-context encoder under a frozen head, on random features.
    let started = Instant::now();
    let d = blip_cfg.text_config.hidden_size;
    let ic_cfg = InterContextConfig::reference(d);
    let (encoder, s2) = build_for_training(ParamSource::from_scratch(transformer_init(0.02), 4), dtype, dev, |vb| {
        InterContextEncoder::new(&ic_cfg, vb.pp("inter_context"))
    })?;
    // The head's own parameters are not part of the check (S2 keeps S1's head frozen).
    let (head, _) = build_for_training(ParamSource::from_scratch(transformer_init(0.02), 5), dtype, dev, |vb| {
        CandidateHead::new(d, vb.pp("head"))
    })?;
    let features = Tensor::randn(0f32, 1.0, (3, 10, d), dev)?.to_dtype(dtype)?;
    let logits = candle_core::Module::forward(&head, &encoder.forward(&features, &[true, false, true])?)?;
    let ce = candidate_cross_entropy(&logits, &[0, 4, 9])?;
    out.push(report("ContextBLIP S2 (inter-context encoder)", &s2, &ce, started)?);

    // ContextCLIP: ViT + BERT and ResNet + BERT, L_CLIP + 0.5·L_CX with a learned τ.
    let vit = ContextClipConfig::small(32);
    let resnet =
        ContextClipConfig { image_encoder: ImageEncoderConfig::Resnet(ResNetConfig::small(2, 32)), ..vit.clone() };
    for (name, cfg) in [("ContextCLIP ViT + BERT", vit), ("ContextCLIP ResNet + BERT", resnet)] {
        let started = Instant::now();
        let loss = ContextClipLossConfig { learn_temperature: true, alpha: 0.5, ..Default::default() };
        let (model, params, temperature) = build_contextclip(&cfg, &ContextClipInit::default(), &loss, dtype, dev, 5)?;
        let tokenizer = TextTokenizer::from_file(&inputs.bert_tokenizer, CaptionCleaning::none(), cfg.max_length)?;
        let objective = ContextClipObjective {
            model,
            tokenizer,
            loss,
            temperature,
            device: dev.clone(),
            seed: 5,
            comm: ctxalign_train::Communicator::single(),
        };
        let px = ImageProcessor::blip(32).load_batch(&inputs.images, DecodeOptions::default(), dev)?.to_dtype(dtype)?;
        let l = objective.losses(&px, captions, &ids, Some(&SampleDraws::sequential(9, n)))?;
        let cx = l.contextual.ok_or_else(|| crate::Error::Invalid("α > 0 gives L_CX".into()))?;
        out.push(report(name, &params, &(l.clip.loss + (cx * 0.5)?)?, started)?);
    }
    Ok(out)
}

//! Text-guided masked image modelling (TMIM): a BERT-style decoder that reconstructs the masked
//! patches from the visible (adapted) image tokens and the text, and the text adapter that feeds it.
//!
//! Decoder input, per sample, in the original token order `[CLS, patch 0 … patch P−1]`: visible
//! positions carry the encoder's adapted tokens (through `decoder_embed` when the widths differ),
//! masked positions carry `mask_embed + decoder_pos_embed[position]`. Each layer is self-attention
//! → cross-attention to the text states → FFN, post-LN (BLIP's text layer). `recon_head` maps each
//! masked position to its `p·p·3` normalised pixels, ordered (row, col, channel).
//!
//! Key layout: `decoder.{mask_embed [1,1,w], decoder_pos_embed [1,1+P,w], decoder_embed.*
//! (only when w ≠ vision width), layer.{i}.*, recon_head.*}`, `text_adapter.{fc1,fc2}.*`.

use candle_core::{bail, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::masking::PatchMask;
use crate::blip::config::{BertLayerConfig, BlipConfig};
use crate::blip::text::{additive_mask, BlipTextLayer};
use crate::HiddenAct;
use ctxalign_nn::ops::upcast_half;
use ctxalign_nn::{linear, Linear};

/// Sizes of the TMIM decoder and what it attaches to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TmimDecoderConfig {
    /// Decoder layers (reference: 4).
    pub num_layers: usize,
    /// Decoder width (reference: 768 = the ViT width).
    pub hidden_size: usize,
    /// Attention heads (reference: 8).
    pub num_attention_heads: usize,
    /// FFN width (reference: 3072).
    pub intermediate_size: usize,
    pub layer_norm_eps: f64,
    /// Width of the image tokens it receives (the ViT's `hidden_size`).
    pub vision_hidden_size: usize,
    /// Width of the text states it cross-attends to.
    pub text_hidden_size: usize,
    /// Image side and patch side of the ViT (P = (image_size / patch_size)²).
    pub image_size: usize,
    pub patch_size: usize,
}

impl TmimDecoderConfig {
    /// The reference's decoder (4 layers, 8 heads, FFN 4×) at the ViT's width, for a base-size
    /// BLIP; for narrower backbones it is scaled down to 2 layers with 32-wide heads.
    pub fn for_blip(blip: &BlipConfig) -> Self {
        let v = &blip.vision_config;
        let w = v.hidden_size;
        let (num_layers, num_attention_heads) = if w >= 768 { (4, 8) } else { (2, (w / 32).max(1)) };
        Self {
            num_layers,
            hidden_size: w,
            num_attention_heads,
            intermediate_size: 4 * w,
            layer_norm_eps: 1e-12,
            vision_hidden_size: w,
            text_hidden_size: blip.text_config.hidden_size,
            image_size: v.image_size,
            patch_size: v.patch_size,
        }
    }

    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }

    /// Values per reconstructed patch: `p·p·3`.
    pub fn patch_values(&self) -> usize {
        self.patch_size * self.patch_size * 3
    }

    /// The layer settings, as BLIP's text layer reads them.
    fn layer_config(&self) -> BertLayerConfig {
        BertLayerConfig {
            hidden_size: self.hidden_size,
            num_attention_heads: self.num_attention_heads,
            intermediate_size: self.intermediate_size,
            layer_norm_eps: self.layer_norm_eps,
            hidden_act: HiddenAct::Gelu,
            cross_attention_width: Some(self.text_hidden_size),
        }
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "decoder hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.patch_size == 0 || !self.image_size.is_multiple_of(self.patch_size) {
            return Err(format!("image_size {} is not a multiple of patch_size {}", self.image_size, self.patch_size));
        }
        Ok(())
    }
}

/// `h + ReLU(fc2(ReLU(fc1(h))))`: the text states the decoder reads (reference: 768 → 384 → 768).
#[derive(Debug, Clone)]
pub struct TextAdapter {
    pub fc1: Linear,
    pub fc2: Linear,
}

/// Sizes of the [`TextAdapter`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextAdapterConfig {
    /// Width of the text states.
    pub hidden_size: usize,
    /// Bottleneck width (reference: half the text width).
    pub bottleneck_size: usize,
}

impl TextAdapter {
    pub fn new(cfg: &TextAdapterConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: linear(cfg.hidden_size, cfg.bottleneck_size, vb.pp("fc1"))?,
            fc2: linear(cfg.bottleneck_size, cfg.hidden_size, vb.pp("fc2"))?,
        })
    }
}

impl Module for TextAdapter {
    fn forward(&self, h: &Tensor) -> Result<Tensor> {
        h + self.fc2.forward(&self.fc1.forward(h)?.relu()?)?.relu()?
    }
}

/// The TMIM decoder.
#[derive(Debug, Clone)]
pub struct TmimDecoder {
    /// `[1, 1, w]`
    pub mask_embed: Tensor,
    /// `[1, 1 + P, w]`
    pub decoder_pos_embed: Tensor,
    /// Present when the decoder is narrower or wider than the ViT.
    pub decoder_embed: Option<Linear>,
    pub layers: Vec<BlipTextLayer>,
    pub recon_head: Linear,
    pub config: TmimDecoderConfig,
}

impl TmimDecoder {
    pub fn new(cfg: &TmimDecoderConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::Msg)?;
        let w = cfg.hidden_size;
        let init = candle_nn::Init::Randn { mean: 0.0, stdev: 0.02 };
        let mask_embed = vb.get_with_hints((1, 1, w), "mask_embed", init)?;
        let decoder_pos_embed = vb.get_with_hints((1, 1 + cfg.num_patches(), w), "decoder_pos_embed", init)?;
        let decoder_embed = (w != cfg.vision_hidden_size)
            .then(|| linear(cfg.vision_hidden_size, w, vb.pp("decoder_embed")))
            .transpose()?;
        let layer_cfg = cfg.layer_config();
        let layers =
            (0..cfg.num_layers).map(|i| BlipTextLayer::new(&layer_cfg, vb.pp("layer").pp(i))).collect::<Result<_>>()?;
        let recon_head = linear(w, cfg.patch_values(), vb.pp("recon_head"))?;
        Ok(Self { mask_embed, decoder_pos_embed, decoder_embed, layers, recon_head, config: cfg.clone() })
    }

    /// Predicted pixels of the masked patches `[B, k, p·p·3]`, in `mask.masked` order.
    ///
    /// `visible`: the encoder's adapted tokens `[B, 1 + P − k, d_vision]` (CLS, then the visible
    /// patches ascending); `text_states` `[B, T, d_text]` (after the text adapter) with its 1/0
    /// `text_mask` `[B, T]`.
    pub fn forward(
        &self,
        visible: &Tensor,
        mask: &PatchMask,
        text_states: &Tensor,
        text_mask: &Tensor,
    ) -> Result<Tensor> {
        let (b, v, _) = visible.dims3()?;
        let (p, k, w) = (mask.num_patches, mask.masked_count(), self.config.hidden_size);
        if p != self.config.num_patches() || v != 1 + p - k || b != mask.batch() {
            bail!(
                "decoder expects {} patches; got {b} samples of {v} visible tokens for a mask of {p} patches, {k} masked",
                self.config.num_patches()
            )
        }
        let dev = visible.device();
        let visible = match &self.decoder_embed {
            Some(embed) => embed.forward(visible)?,
            None => visible.clone(),
        };
        let pos_table = self.decoder_pos_embed.squeeze(0)?; // [1+P, w]
        let mask_tokens = pos_table
            .index_select(&mask.masked_positions(dev)?, 0)? // [B·k, w]
            .reshape((b, k, w))?
            .broadcast_add(&self.mask_embed)?;
        let joined = Tensor::cat(&[visible, mask_tokens], 1)?.reshape((b * (1 + p), w))?;
        let mut hidden = joined.index_select(&mask.restore_rows(dev)?, 0)?.reshape((b, 1 + p, w))?;
        let text_mask = additive_mask(text_mask, hidden.dtype())?;
        for layer in &self.layers {
            let cross = layer.crossattention.as_ref().expect("decoder layers are built with cross-attention");
            let kv = cross.self_.keys_values(text_states)?;
            hidden = layer.forward(&hidden, None, Some((&kv, Some(&text_mask))), false)?.0;
        }
        let at_masked = hidden.reshape((b * (1 + p), w))?.index_select(&mask.masked_token_rows(dev)?, 0)?;
        self.recon_head.forward(&at_masked)?.reshape((b, k, self.config.patch_values()))
    }
}

/// `[B, 3, H, W]` → `[B, (H/p)·(W/p), p·p·3]`: patches in row-major order, each flattened as
/// (row, col, channel) — the layout `recon_head` predicts.
pub fn patchify(pixels: &Tensor, patch_size: usize) -> Result<Tensor> {
    let (b, c, h, w) = pixels.dims4()?;
    let p = patch_size;
    if h % p != 0 || w % p != 0 {
        bail!("image {h}×{w} is not a multiple of the patch size {p}")
    }
    let (gh, gw) = (h / p, w / p);
    pixels.reshape((b, c, gh, p, gw, p))?.permute((0, 2, 4, 3, 5, 1))?.reshape((b, gh * gw, p * p * c))
}

/// Mean squared error over the masked patches only: `predicted` `[B, k, S]` against the same
/// patches of `targets` `[B, P, S]` (from [`patchify`]), averaged over patches and values; in f32
/// when the inputs are half precision.
pub fn masked_patch_mse(predicted: &Tensor, targets: &Tensor, mask: &PatchMask) -> Result<Tensor> {
    let (predicted, targets) = (&upcast_half(predicted)?, &upcast_half(targets)?);
    let (b, p, s) = targets.dims3()?;
    let picked = targets
        .reshape((b * p, s))?
        .index_select(&mask.masked_patch_rows(targets.device())?, 0)?
        .reshape(predicted.shape())?;
    (predicted - picked)?.sqr()?.mean_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;
    use ctxalign_nn::gradcheck::{check_gradients, varmap_vars};

    fn tiny() -> TmimDecoderConfig {
        TmimDecoderConfig {
            num_layers: 1,
            hidden_size: 8,
            num_attention_heads: 2,
            intermediate_size: 12,
            layer_norm_eps: 1e-6,
            vision_hidden_size: 6,
            text_hidden_size: 4,
            image_size: 8,
            patch_size: 4,
        }
    }

    #[test]
    fn patchify_orders_values_row_col_channel() -> Result<()> {
        // pixel (c, y, x) = 100c + 10y + x on an 4×4 image in 2×2 patches.
        let values: Vec<f32> =
            (0..3).flat_map(|c| (0..4).flat_map(move |y| (0..4).map(move |x| (100 * c + 10 * y + x) as f32))).collect();
        let pixels = Tensor::from_vec(values, (1, 3, 4, 4), &Device::Cpu)?;
        let patches = patchify(&pixels, 2)?.to_vec3::<f32>()?;
        // Patch 1 is row 0, column 1: pixels y ∈ {0, 1}, x ∈ {2, 3}; order (row, col, channel).
        let want: Vec<f32> = [(0, 2), (0, 3), (1, 2), (1, 3)]
            .iter()
            .flat_map(|&(y, x)| (0..3).map(move |c| (100 * c + 10 * y + x) as f32))
            .collect();
        assert_eq!(patches[0][1], want);
        assert_eq!(patches[0].len(), 4);
        Ok(())
    }

    #[test]
    fn masked_mse_averages_only_the_masked_patches() -> Result<()> {
        let dev = Device::Cpu;
        let targets = Tensor::randn(0f64, 1.0, (2, 4, 3), &dev)?;
        let predicted = Tensor::randn(0f64, 1.0, (2, 2, 3), &dev)?;
        let mask = PatchMask::new(vec![vec![2, 0], vec![3, 1]], 4)?;
        let ours = masked_patch_mse(&predicted, &targets, &mask)?.to_scalar::<f64>()?;
        let (t, p) = (targets.to_vec3::<f64>()?, predicted.to_vec3::<f64>()?);
        let mut sum = 0.0;
        for (b, m) in [[0usize, 2], [1, 3]].iter().enumerate() {
            for (j, &patch) in m.iter().enumerate() {
                for s in 0..3 {
                    sum += (p[b][j][s] - t[b][patch][s]).powi(2);
                }
            }
        }
        assert!((ours - sum / 12.0).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn text_adapter_matches_its_formula() -> Result<()> {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let ta = TextAdapter::new(
            &TextAdapterConfig { hidden_size: 4, bottleneck_size: 2 },
            VarBuilder::from_varmap(&vm, DType::F64, &dev),
        )?;
        let h = Tensor::randn(0f64, 1.0, (1, 3, 4), &dev)?;
        let out = ta.forward(&h)?.to_vec3::<f64>()?;
        let (w1, b1) = (ta.fc1.weight().to_vec2::<f64>()?, ta.fc1.bias().unwrap().to_vec1::<f64>()?);
        let (w2, b2) = (ta.fc2.weight().to_vec2::<f64>()?, ta.fc2.bias().unwrap().to_vec1::<f64>()?);
        for (t, x) in h.to_vec3::<f64>()?[0].iter().enumerate() {
            let mid: Vec<f64> =
                (0..2).map(|j| (b1[j] + (0..4).map(|i| w1[j][i] * x[i]).sum::<f64>()).max(0.0)).collect();
            for o in 0..4 {
                let up = (b2[o] + (0..2).map(|j| w2[o][j] * mid[j]).sum::<f64>()).max(0.0);
                assert!((out[0][t][o] - (x[o] + up)).abs() < 1e-12);
            }
        }
        Ok(())
    }

    /// Every decoder and text-adapter weight: finite differences of the masked MSE against backward.
    #[test]
    fn decoder_gradients_match_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = tiny();
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F64, &dev);
        let decoder = TmimDecoder::new(&cfg, vb.pp("decoder"))?;
        let ta = TextAdapter::new(&TextAdapterConfig { hidden_size: 4, bottleneck_size: 2 }, vb.pp("text_adapter"))?;
        assert!(decoder.decoder_embed.is_some(), "widths differ: the input projection exists");
        // Positive text-adapter biases keep its ReLUs open on these few random inputs (a unit dead
        // on all of them would have a truly zero gradient, failing the check for the wrong reason).
        for (name, var) in varmap_vars(&vm) {
            if name.starts_with("text_adapter.") && name.ends_with(".bias") {
                var.set(&(var.as_tensor().abs()? + 0.5)?)?;
            }
        }
        let mask = PatchMask::new(vec![vec![1], vec![3]], 4)?;
        let visible = Tensor::randn(0f64, 1.0, (2, 4, 6), &dev)?;
        let text = Tensor::randn(0f64, 1.0, (2, 3, 4), &dev)?;
        let text_mask = Tensor::new(&[[1u32, 1, 1], [1, 1, 0]], &dev)?;
        let targets = Tensor::randn(0f64, 1.0, (2, 4, 48), &dev)?;
        let loss = || -> Result<Tensor> {
            let predicted = decoder.forward(&visible, &mask, &ta.forward(&text)?, &text_mask)?;
            masked_patch_mse(&predicted, &targets, &mask)
        };
        check_gradients(&varmap_vars(&vm), &loss, 1e-6, 1e-4, 5)
    }
}

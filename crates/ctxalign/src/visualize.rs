//! Pictures of what a model attends to: ContextBLIP's text-guided mask for one word of a
//! description, and a set's candidates with their ITM scores (`ctxalign show-mask`).

use std::path::Path;

use candle_core::{DType, IndexOp, Tensor};
use ctxalign_data::image::decode_image;
use ctxalign_eval::plot::draw_text;
use ctxalign_models::blip::mean_cross_attention;
use ctxalign_models::contextblip::masking::text_guided_patches;
use ctxalign_models::contextblip::MaskingConfig;
use image::{imageops, Rgb, RgbImage};

use crate::{BlipScorer, Error, Result};

/// The text-guided mask of one word over one image.
#[derive(Debug, Clone)]
pub struct WordMask {
    /// Mean cross-attention of the word's first token over the patches, row-major `[grid²]`.
    pub attention: Vec<f32>,
    /// The `int(ratio · patches)` most attended patches (ContextBLIP's mask, no noise).
    pub masked: Vec<usize>,
    /// Patches per side of the square patch grid (`attention.len()` is `grid²`).
    pub grid: usize,
    /// Position of the word's first token in the `[ENC]`-first token sequence.
    pub token: usize,
}

/// Computes the mask `word` (a word of `text`) induces on `image` through the scorer's ITM
/// cross-attention (with its ContextBLIP adapter, if any).
pub fn word_mask(scorer: &BlipScorer, image: &Path, text: &str, word: &str, ratio: f64) -> Result<WordMask> {
    let pad = scorer.model.config.text_config.pad_token_id;
    let batch = scorer.tokenizer.encode_batch(&[text], pad)?;
    let ids = &batch.input_ids[0];
    let word_ids = scorer.tokenizer.encode_batch(&[word], pad)?.input_ids[0].clone();
    let pieces = &word_ids[1..word_ids.len().saturating_sub(1)]; // drop [CLS] … [SEP]
    let token = (1..ids.len()).find(|&i| !pieces.is_empty() && ids[i..].starts_with(pieces)).ok_or_else(|| {
        Error::Invalid(format!("the word {word:?} does not occur in the (cleaned, truncated) description"))
    })?;
    let dev = &scorer.device;
    let pixels = scorer.processor.load_batch(&[image], scorer.options.decode, dev)?;
    let images = scorer.encode_pixels(&pixels)?;
    let (_, mask) = batch.to_tensors(dev)?;
    let enc = Tensor::new(batch.with_first_token(scorer.enc_token_id), dev)?;
    let out = scorer.model.itm(&images.memory, &enc, &mask, true)?;
    let attention: Vec<f32> =
        mean_cross_attention(&out.cross_attentions)?.i((0, token))?.to_dtype(DType::F32)?.to_vec1()?;
    let k = MaskingConfig { ratio, ..Default::default() }.masked_count(attention.len())?;
    let masked = text_guided_patches(&attention, k, 0.0, &mut || 0.0);
    let grid = (attention.len() as f64).sqrt().round() as usize;
    Ok(WordMask { attention, masked, grid, token })
}

const PANEL: u32 = 288;
const LABEL: u32 = 14;
const WHITE: Rgb<u8> = Rgb([255, 255, 255]);

fn panel(path: &Path) -> Result<RgbImage> {
    let img = decode_image(path, Default::default())?;
    Ok(imageops::resize(&img, PANEL, PANEL, imageops::FilterType::Triangle))
}

/// The image, and beside it the attention heat map with the masked patches hatched and outlined.
pub fn render_mask(image: &Path, mask: &WordMask, title: &str) -> Result<RgbImage> {
    let base = panel(image)?;
    let mut overlay = base.clone();
    let cell = PANEL as f32 / mask.grid as f32;
    let max = mask.attention.iter().cloned().fold(f32::MIN, f32::max).max(1e-12);
    for (x, y, px) in overlay.enumerate_pixels_mut() {
        let p = ((y as f32 / cell) as usize).min(mask.grid - 1) * mask.grid
            + ((x as f32 / cell) as usize).min(mask.grid - 1);
        let heat = mask.attention[p] / max;
        let masked = mask.masked.contains(&p);
        let hatch = masked && (x + y) % 6 < 2;
        let [r, g, b] = px.0;
        *px = if hatch {
            Rgb([20, 20, 20])
        } else {
            // Blend toward red by attention.
            let mix = |c: u8, t: f32| (c as f32 * (1.0 - 0.6 * heat) + t * 0.6 * heat) as u8;
            Rgb([mix(r, 255.0), mix(g, 0.0), mix(b, 0.0)])
        };
        let on_edge = |v: u32| (v as f32 % cell) < 1.0;
        if masked && (on_edge(x) || on_edge(y)) {
            *px = Rgb([255, 255, 0]);
        }
    }
    let mut out = RgbImage::from_pixel(2 * PANEL + 8, PANEL + 2 * LABEL, Rgb([0, 0, 0]));
    imageops::overlay(&mut out, &base, 0, LABEL as i64);
    imageops::overlay(&mut out, &overlay, (PANEL + 8) as i64, LABEL as i64);
    draw_text(&mut out, 2, 3, title, WHITE);
    draw_text(
        &mut out,
        PANEL + 10,
        PANEL + LABEL + 3,
        &format!("masked {} of {} patches", mask.masked.len(), mask.attention.len()),
        WHITE,
    );
    Ok(out)
}

/// A set's candidates in a row (wrapped every 5), each labelled with its ITM match probability;
/// the best is framed green, `target` (when known) framed white.
pub fn render_candidates(images: &[&Path], scores: &[f32], target: Option<usize>) -> Result<RgbImage> {
    const THUMB: u32 = 144;
    let per_row = images.len().clamp(1, 5) as u32;
    let rows = (images.len() as u32).div_ceil(per_row);
    let mut out = RgbImage::from_pixel(per_row * (THUMB + 6), rows * (THUMB + LABEL + 6), Rgb([0, 0, 0]));
    let best = ctxalign_eval::top_k(scores, 1).first().copied();
    for (i, path) in images.iter().enumerate() {
        let img =
            imageops::resize(&decode_image(path, Default::default())?, THUMB, THUMB, imageops::FilterType::Triangle);
        let (x, y) = ((i as u32 % per_row) * (THUMB + 6) + 3, (i as u32 / per_row) * (THUMB + LABEL + 6) + 3);
        let frame = if Some(i) == best {
            Some(Rgb([0, 220, 0]))
        } else if Some(i) == target {
            Some(WHITE)
        } else {
            None
        };
        if let Some(c) = frame {
            for dx in 0..THUMB + 4 {
                for dy in [0, 1, THUMB + 2, THUMB + 3] {
                    out.put_pixel(x + dx - 2, y + dy - 2, c);
                    out.put_pixel(x + dy - 2, y + dx - 2, c);
                }
            }
        }
        imageops::overlay(&mut out, &img, x as i64, y as i64);
        draw_text(&mut out, x, y + THUMB + 4, &format!("{i}: p {:.3}", scores[i]), WHITE);
    }
    Ok(out)
}

/// Stacks pictures vertically (left-aligned, black background).
pub fn stack(parts: &[RgbImage]) -> RgbImage {
    let w = parts.iter().map(RgbImage::width).max().unwrap_or(1);
    let h = parts.iter().map(|p| p.height() + 6).sum::<u32>().max(1);
    let mut out = RgbImage::from_pixel(w, h, Rgb([0, 0, 0]));
    let mut y = 0;
    for p in parts {
        imageops::overlay(&mut out, p, 0, y as i64);
        y += p.height() + 6;
    }
    out
}

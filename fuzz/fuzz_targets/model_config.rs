#![no_main]
//! Model configs as read from a folder: `config.json` as a BLIP, CLIP or BERT config (parsed and
//! validated as loading does) and `preprocessor_config.json` as an image processor. No panics; a
//! config that validates has heads that divide its widths and a patch size the grid divides by; an
//! image processor that is accepted processes an image (the size and crop it names, when small
//! enough to allocate here) without panicking.
use std::path::Path;

use ctxalign_data::ImageProcessor;
use ctxalign_models::bert::BertConfig;
use ctxalign_models::blip::BlipConfig;
use ctxalign_models::clip::ClipConfig;
use ctxalign_models::loading::parse_json;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let config = Path::new("config.json");
    if let Ok(cfg) = parse_json::<BlipConfig>(config, text) {
        if cfg.validate().is_ok() {
            let v = &cfg.vision_config;
            assert!(v.patch_size > 0 && v.image_size % v.patch_size == 0, "validated: {v:?}");
            let _ = v.grid_size();
            assert!(v.num_attention_heads > 0 && v.hidden_size % v.num_attention_heads == 0);
            let t = &cfg.text_config;
            assert!(t.num_attention_heads > 0 && t.hidden_size % t.num_attention_heads == 0);
        }
    }
    if let Ok(cfg) = parse_json::<ClipConfig>(config, text) {
        let _ = cfg.validate();
    }
    if let Ok(cfg) = parse_json::<BertConfig>(config, text) {
        if cfg.validate().is_ok() {
            assert!(cfg.num_attention_heads > 0 && cfg.hidden_size % cfg.num_attention_heads == 0);
        }
    }
    let Ok(value) = serde_json::from_str::<serde_json::Value>(text) else { return };
    if let Ok(processor) = ImageProcessor::from_hf_value(&value) {
        // An accepted processor must process an image: a size it cannot take is refused at load,
        // not found by a panic at the first image. Sizes too large to allocate here are skipped.
        let small = |n: u32| n <= 512;
        let fits = match processor.resize {
            Some(ctxalign_data::Resize::Exact { height, width }) => small(height) && small(width),
            Some(ctxalign_data::Resize::ShortestEdge(s)) => small(s),
            None => true,
        } && processor.center_crop.is_none_or(|(h, w)| small(h) && small(w));
        if fits {
            let image = image::RgbImage::from_fn(7, 5, |x, y| image::Rgb([x as u8 * 30, y as u8 * 40, 128]));
            let pixels = processor.process(&image);
            assert_eq!(pixels.len() % 3, 0);
        }
    }
});

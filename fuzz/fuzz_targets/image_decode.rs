#![no_main]
//! The image entry point: any bytes decode to RGB or give an `ImageError`, within the pixel limit.
use std::path::Path;

use ctxalign_data::{decode_image_bytes, DecodeOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let options = DecodeOptions { max_pixels: 1 << 20 };
    if let Ok(img) = decode_image_bytes(data, Path::new("fuzz.img"), options) {
        assert!(img.width() as u64 * img.height() as u64 <= 1 << 20);
    }
});

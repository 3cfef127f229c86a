#![no_main]
//! The image entry points: any bytes decode to RGB or give an `ImageError`, within the pixel limit;
//! the header check that runs before training or scoring agrees with the decoder (an image it
//! passes decodes to the size it reported, and one it refuses does not decode).
use std::path::Path;

use ctxalign_data::{check_image_bytes, decode_image_bytes, DecodeOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let options = DecodeOptions { max_pixels: 1 << 20 };
    let checked = check_image_bytes(data, Path::new("fuzz.img"), options);
    match decode_image_bytes(data, Path::new("fuzz.img"), options) {
        Ok(img) => {
            assert!(img.width() as u64 * img.height() as u64 <= 1 << 20);
            assert_eq!(checked.ok(), Some(img.dimensions()), "a decoded image passes the check with its size");
        }
        // The check reads headers only: a body that fails to decode may pass it.
        Err(_) => {}
    }
});

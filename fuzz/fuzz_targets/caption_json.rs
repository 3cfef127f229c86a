#![no_main]
//! BLIP caption JSON: no panics; accepted images stay under the root and have captions.
use std::path::Path;

use ctxalign_data::captions::parse_caption_json;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(items) = parse_caption_json(text, Path::new("fuzz.json"), Path::new("/root")) {
            for it in items {
                assert!(it.image.starts_with("/root") && !it.captions.is_empty());
            }
        }
    }
});

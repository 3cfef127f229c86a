#![no_main]
//! IMAGECODE split files (labeled and unlabeled): any bytes give examples or a `DataError`, never a
//! panic, and no accepted set name escapes the image root.
use std::path::Path;

use ctxalign_data::imagecode::ImageCodeSplit;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(split) = ImageCodeSplit::parse(text, Path::new("fuzz.json"), Path::new("/root/image-sets")) {
            for ex in &split.examples {
                assert!(ex.target.is_none_or(|t| t < 10));
                // `..` may appear inside a name ("MS..VTT"), never as a path component.
                assert!(Path::new(&ex.set).components().all(|c| matches!(c, std::path::Component::Normal(_))));
            }
        }
    }
});

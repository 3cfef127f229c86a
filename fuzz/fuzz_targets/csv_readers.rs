#![no_main]
//! The line- and CSV-based readers: Flickr8k captions, MMVP `Questions.csv`, UCI digits.
use std::path::Path;

use ctxalign_data::captions::parse_flickr8k;
use ctxalign_data::classification::parse_uci_digits;
use ctxalign_data::mmvp::parse_questions;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(items) = parse_flickr8k(text, Path::new("captions.txt"), Path::new("/root")) {
            assert!(items.iter().all(|i| i.image.starts_with("/root")));
        }
        let _ = parse_questions(text, Path::new("Questions.csv"));
        if let Ok(set) = parse_uci_digits(text, Path::new("digits.csv")) {
            assert!(set.items.iter().all(|i| i.label < 10));
        }
    }
});

//! `cargo xtask bench loader`: images/s through the data loader (decode + augmentation +
//! preprocessing, rayon-parallel, prefetching), on the Vignettes caption images.

use std::time::Instant;

use ctxalign::data::captions::read_caption_json;
use ctxalign::data::loader::{Augment, CaptionDataset, DataLoader, LoaderConfig};
use ctxalign::data::vignettes::{write_benchmark, VignettesConfig};
use ctxalign::data::{DecodeOptions, ImageProcessor};

pub fn run(images: usize, source_size: u32, size: u32, batch: usize) -> anyhow::Result<bool> {
    let tmp = std::env::temp_dir().join(format!("ctxalign-bench-loader-{}", std::process::id()));
    let cfg = VignettesConfig {
        image_size: source_size,
        train_sets: 0,
        valid_sets: 0,
        test_sets: 0,
        caption_images: images,
        class_images: 0,
        ..Default::default()
    };
    write_benchmark(&cfg, &tmp, &|_| {})?;
    let items = read_caption_json(&tmp.join("captions/train.json"), &tmp.join("captions"))?;
    let n = items.len();
    let loader = DataLoader::new(
        CaptionDataset {
            text: None,
            items,
            processor: ImageProcessor::blip(size),
            augment: Some(Augment::default()),
            decode: DecodeOptions::default(),
        },
        LoaderConfig { batch_size: batch, prefetch: 4, ..Default::default() },
    );
    for epoch in 0..2 {
        let start = Instant::now();
        let mut count = 0;
        for b in loader.epoch(epoch, 0) {
            count += b?.items.len();
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "loader epoch {epoch}: {count} images ({source_size}px JPEG -> random resized crop -> {size}px) in {secs:.2} s = {:.0} images/s ({} threads)",
            count as f64 / secs,
            rayon::current_num_threads()
        );
        assert_eq!(count, n);
    }
    std::fs::remove_dir_all(&tmp).ok();
    Ok(true)
}

//! The `transformers-pil` resize mode against its fixture (`tests/fixtures/preprocess_transformers_pil`,
//! made by `tests/fixtures/generators/make_preprocess_transformers_pil.py` from transformers' PIL
//! backend), and how it differs from the torchvision crop of the other two modes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use ctxalign_data::{decode_image, DecodeOptions, ImageProcessor, ResizeMode};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/preprocess_transformers_pil")
}

fn processors() -> HashMap<String, serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(fixture().join("processors.json")).unwrap()).unwrap()
}

/// `processor` of the fixture on image `file`, in `mode`: `([3, h, w] values, h, w)`.
fn run(processor: &str, file: &str, mode: ResizeMode) -> (Vec<f32>, usize, usize) {
    let mut p = ImageProcessor::from_hf_value(&processors()[processor]).unwrap();
    p.resize_mode = mode;
    let image = decode_image(&fixture().join(file), DecodeOptions::default()).unwrap();
    let (h, w) = p.output_size(image.width(), image.height());
    (p.process(&image), h as usize, w as usize)
}

/// Largest `|a[c, y, x] − b[c, y − dy, x − dx]|` over the pixels both cover.
fn shifted_max_diff(a: &[f32], b: &[f32], h: usize, w: usize, dy: usize, dx: usize) -> f32 {
    let mut max = 0f32;
    for c in 0..3 {
        for y in dy..h {
            for x in dx..w {
                max = max.max((a[(c * h + y) * w + x] - b[(c * h + y - dy) * w + x - dx]).abs());
            }
        }
    }
    max
}

/// Every output equals the reference's bits (float32 outputs) or its float16 rounding.
#[test]
fn transformers_pil_fixture_is_exact() {
    let expected = candle_core::safetensors::load(fixture().join("expected.safetensors"), &Device::Cpu).unwrap();
    let processors = processors();
    assert_eq!(expected.len(), 6);
    for (name, reference) in &expected {
        let (proc_name, stem) = name.split_once('_').unwrap();
        let p = ImageProcessor::from_hf_value(&processors[proc_name]).unwrap();
        assert_eq!(p.resize_mode, ResizeMode::TransformersPil, "{name}");
        let file = std::fs::read_dir(fixture())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|f| f.file_stem().unwrap() == stem && f.extension().unwrap() != "json")
            .unwrap();
        let ours = p.load(&file, DecodeOptions::default(), &Device::Cpu).unwrap();
        assert_eq!(ours.dims(), reference.dims(), "{name}");
        let ours: Vec<f32> = ours.flatten_all().unwrap().to_vec1().unwrap();
        if reference.dtype() == DType::F32 {
            let reference: Vec<f32> = reference.flatten_all().unwrap().to_vec1().unwrap();
            let differ = ours.iter().zip(&reference).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
            assert_eq!(differ, 0, "{name}: {differ} values differ from the reference's float32");
        } else {
            let reference: Vec<f32> = reference.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let max = ours.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(max <= 1e-3, "{name}: {max} from the float16 reference");
        }
    }
}

/// 319 × 213 resized to 479 × 320, cropped to 320: transformers' PIL backend starts the crop at
/// column 79, torchvision at 80. The `pillow` mode resizes identically, so its output is this
/// mode's shifted by exactly one column; `torchvision` resizes within a few grey levels of Pillow,
/// so it is too, up to those levels. Unshifted, both are far apart.
#[test]
fn transformers_pil_crops_one_pixel_before_torchvision() {
    let (ours, h, w) = run("clip320", "wide.jpg", ResizeMode::TransformersPil);
    assert_eq!((h, w), (320, 320));
    let (pillow, ..) = run("clip320", "wide.jpg", ResizeMode::Pillow);
    let (torchvision, ..) = run("clip320", "wide.jpg", ResizeMode::Torchvision);
    assert_eq!(shifted_max_diff(&ours, &pillow, h, w, 0, 1), 0.0, "pillow's crop is ours, one column on");
    assert!(shifted_max_diff(&ours, &pillow, h, w, 0, 0) > 1.5);
    let shifted = shifted_max_diff(&ours, &torchvision, h, w, 0, 1);
    let unshifted = shifted_max_diff(&ours, &torchvision, h, w, 0, 0);
    let grey_level = 1.0 / 255.0 / 0.26;
    assert!(shifted <= 4.0 * grey_level, "shifted by one column: {shifted}");
    assert!(unshifted > 1.5, "unshifted: {unshifted}");

    // A portrait shifts by one row: 150 × 167 → 64 × 71, cropped at row 3, torchvision's at 4.
    let (ours, h, w) = run("clip64", "portrait.png", ResizeMode::TransformersPil);
    let (pillow, ..) = run("clip64", "portrait.png", ResizeMode::Pillow);
    assert_eq!(shifted_max_diff(&ours, &pillow, h, w, 1, 0), 0.0);
    assert!(shifted_max_diff(&ours, &pillow, h, w, 0, 0) > 1.5);

    // Odd differences in both axes (62 → 47, 48 → 45): one row and one column.
    let (ours, h, w) = run("clipodd", "odd.jpg", ResizeMode::TransformersPil);
    let (pillow, ..) = run("clipodd", "odd.jpg", ResizeMode::Pillow);
    assert_eq!(shifted_max_diff(&ours, &pillow, h, w, 1, 1), 0.0);

    // BLIP has no crop: the two Pillow-resizing modes agree to the bit.
    let (ours, ..) = run("blip48x40", "wide.jpg", ResizeMode::TransformersPil);
    let (pillow, ..) = run("blip48x40", "wide.jpg", ResizeMode::Pillow);
    assert!(ours.iter().zip(&pillow).all(|(a, b)| a.to_bits() == b.to_bits()));
}

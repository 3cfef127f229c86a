//! Image decoding to RGB as Pillow's `convert("RGB")` does, across formats and pixel layouts.

use std::path::{Path, PathBuf};

use candle_core::Device;
use ctxalign_data::{decode_image, DecodeOptions, ImageProcessor};
use image::{DynamicImage, ImageBuffer, Luma, LumaA, Rgb, Rgba};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn max_diff(a: &image::RgbImage, b: &image::RgbImage) -> u8 {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0)
}

#[test]
fn cmyk_jpeg_matches_pillow() {
    let ours = decode_image(&fixtures().join("images/cmyk.jpg"), DecodeOptions::default()).unwrap();
    let pillow = image::open(fixtures().join("images/cmyk_pillow_rgb.png")).unwrap().to_rgb8();
    let d = max_diff(&ours, &pillow);
    assert_eq!(d, 0, "CMYK JPEG differs from Pillow by {d} levels");
}

#[test]
fn layouts_convert_like_pillow() {
    let tmp = tempfile::tempdir().unwrap();
    let (w, h) = (23u32, 17u32);
    let rgb = image::RgbImage::from_fn(w, h, |x, y| Rgb([(x * 11) as u8, (y * 13) as u8, ((x + y) * 5) as u8]));
    let save = |name: &str, img: DynamicImage| -> PathBuf {
        let p = tmp.path().join(name);
        img.save(&p).unwrap();
        p
    };
    // RGBA: alpha is dropped, not composited.
    let rgba = ImageBuffer::from_fn(w, h, |x, y| {
        let p = rgb.get_pixel(x, y);
        Rgba([p[0], p[1], p[2], (x * 10) as u8])
    });
    let p = save("rgba.png", DynamicImage::ImageRgba8(rgba));
    assert_eq!(decode_image(&p, DecodeOptions::default()).unwrap(), rgb);
    // Gray and gray+alpha: replicated into three channels.
    let gray = ImageBuffer::from_fn(w, h, |x, _| Luma([(x * 9) as u8]));
    let gray_alpha = ImageBuffer::from_fn(w, h, |x, _| LumaA([(x * 9) as u8, 7]));
    for p in [
        save("gray.png", DynamicImage::ImageLuma8(gray)),
        save("gray_alpha.png", DynamicImage::ImageLumaA8(gray_alpha)),
    ] {
        let out = decode_image(&p, DecodeOptions::default()).unwrap();
        assert!(out.enumerate_pixels().all(|(x, _, px)| px.0 == [(x * 9) as u8; 3]), "{}", p.display());
    }
    // 16-bit colour: the high byte, as Pillow (v · 257 >> 8 = v; see sixteen_bit_pngs_convert_as_pillow_does).
    let rgb16 = ImageBuffer::from_fn(w, h, |x, y| {
        let p = rgb.get_pixel(x, y);
        Rgb([p[0] as u16 * 257, p[1] as u16 * 257, p[2] as u16 * 257])
    });
    let p = save("rgb16.png", DynamicImage::ImageRgb16(rgb16));
    assert_eq!(decode_image(&p, DecodeOptions::default()).unwrap(), rgb);
    // WebP (lossless), BMP, TIFF, GIF-free formats round-trip exactly.
    for name in ["x.webp", "x.bmp", "x.tiff"] {
        let p = save(name, DynamicImage::ImageRgb8(rgb.clone()));
        assert_eq!(decode_image(&p, DecodeOptions::default()).unwrap(), rgb, "{name}");
    }
    // A file whose extension lies is decoded by its content.
    let p = tmp.path().join("really_a_png.jpg");
    std::fs::copy(tmp.path().join("x.bmp"), &p).unwrap();
    assert_eq!(decode_image(&p, DecodeOptions::default()).unwrap(), rgb);
}

#[test]
fn batches_of_mixed_sizes_become_one_tensor() {
    let dir = fixtures().join("preprocess");
    let paths = ["landscape.png", "portrait.jpg", "gray.png", "alpha.png"].map(|f| dir.join(f));
    for processor in [ImageProcessor::blip(48), ImageProcessor::clip(48)] {
        let batch = processor.load_batch(&paths, DecodeOptions::default(), &Device::Cpu).unwrap();
        assert_eq!(batch.dims(), &[4, 3, 48, 48]);
        let single = processor.load(&paths[1], DecodeOptions::default(), &Device::Cpu).unwrap();
        let diff =
            (batch.get(1).unwrap() - single).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0);
    }
    let err = ImageProcessor::blip(48)
        .load_batch(&[dir.join("landscape.png"), dir.join("absent.png")], DecodeOptions::default(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("absent.png"), "{err}");
}

/// Every JPEG kind the decoder covers gives exactly the RGB Pillow (libjpeg-turbo) gives:
/// `tests/fixtures/jpeg`, made by `tests/fixtures/generators/make_jpeg_decode.py`.
#[test]
fn jpegs_decode_to_pillows_exact_pixels() {
    let dir = fixtures().join("jpeg");
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let cases = index["cases"].as_object().unwrap();
    assert!(cases.len() >= 16);
    let mut failures = vec![];
    for (name, what) in cases {
        let ours = decode_image(&dir.join(format!("{name}.jpg")), DecodeOptions::default()).unwrap();
        let pillow = image::open(dir.join(format!("{name}.png"))).unwrap().to_rgb8();
        let (d, n) = if ours.dimensions() == pillow.dimensions() {
            let diffs: Vec<u8> = ours.as_raw().iter().zip(pillow.as_raw()).map(|(a, b)| a.abs_diff(*b)).collect();
            (diffs.iter().copied().max().unwrap_or(0), diffs.iter().filter(|&&x| x > 0).count())
        } else {
            (255, usize::MAX)
        };
        if d > 0 {
            failures.push(format!("{name} ({what}): max {d} levels off, {n} samples differ"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Real-world JPEGs (Pillow's own test images: tables after the frame header, short APP14, stray
/// bytes between segments, 16-bit quantisation tables, a damaged scan) and damaged streams (a cut
/// interval, a missing restart marker, a bad Huffman code, bytes between segments) decode to
/// exactly Pillow's pixels, the damaged ones with libjpeg's warning; a file Pillow refuses is
/// refused: `tests/fixtures/jpeg_corpus`, made by `tests/fixtures/generators/make_jpeg_corpus.py`.
#[test]
fn real_world_jpegs_decode_to_pillows_exact_pixels() {
    use ctxalign_data::jpeg::JpegWarning;
    use sha2::{Digest, Sha256};
    let dir = fixtures().join("jpeg_corpus");
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let cases = index["cases"].as_object().unwrap();
    assert!(cases.len() >= 12);
    let mut failures = vec![];
    for (name, case) in cases {
        let decoded = decode_image(&dir.join(name), DecodeOptions::default());
        if let Some(reason) = case.get("pillow_refuses") {
            if let Ok(img) = decoded {
                failures.push(format!("{name}: Pillow refuses it ({reason}), we decoded {:?}", img.dimensions()));
            }
            continue;
        }
        let img = match decoded {
            Ok(img) => img,
            Err(e) => {
                failures.push(format!("{name} ({}): {e}", case["what"]));
                continue;
            }
        };
        if let Some(expected) = case.get("libjpeg_warns") {
            let warnings = ctxalign_data::jpeg::decode_jpeg(&std::fs::read(dir.join(name)).unwrap()).unwrap().warnings;
            let kind = |w: &JpegWarning| match w {
                JpegWarning::PrematureEnd => "premature_end",
                JpegWarning::BadHuffmanCode => "bad_huffman_code",
                JpegWarning::ExtraneousBytes { .. } => "extraneous_bytes",
                JpegWarning::MissingRestart { .. } => "missing_restart",
            };
            let reported = ctxalign_data::decode_image_reporting(&dir.join(name), DecodeOptions::default()).unwrap();
            let ok = match expected.as_str() {
                None => warnings.is_empty() && reported.warnings.is_empty(),
                Some(want) => {
                    warnings.iter().any(|w| kind(w) == want)
                        && reported.warnings.iter().any(|w| w.starts_with("Corrupt JPEG data"))
                }
            };
            if !ok {
                failures.push(format!("{name}: expected warning {expected}, got {warnings:?}"));
            }
        }
        let size = (case["width"].as_u64().unwrap() as u32, case["height"].as_u64().unwrap() as u32);
        let digest: String = Sha256::digest(img.as_raw()).iter().map(|b| format!("{b:02x}")).collect();
        if img.dimensions() != size || digest != case["rgb_sha256"].as_str().unwrap() {
            failures.push(format!("{name} ({}): other pixels than Pillow's", case["what"]));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// 16-bit PNGs convert as Pillow 12.1.1's `convert("RGB")` does: a grey one clamps (`min(v, 255)`),
/// colour and grey+alpha ones keep the high byte. `tests/fixtures/images/png16_*`, made by
/// `tests/fixtures/generators/make_png16.py`.
#[test]
fn sixteen_bit_pngs_convert_as_pillow_does() {
    for kind in ["gray", "gray_alpha", "rgb", "rgba"] {
        let dir = fixtures().join("images");
        let ours = decode_image(&dir.join(format!("png16_{kind}.png")), DecodeOptions::default()).unwrap();
        let pillow = image::open(dir.join(format!("png16_{kind}_pillow_rgb.png"))).unwrap().to_rgb8();
        assert_eq!(ours.dimensions(), pillow.dimensions(), "{kind}");
        assert_eq!(ours.as_raw(), pillow.as_raw(), "{kind}: other values than Pillow's");
    }
}

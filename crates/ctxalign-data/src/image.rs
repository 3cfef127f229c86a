//! Image decoding (JPEG/PNG/WebP/GIF/BMP/TIFF; gray, RGBA, 16-bit, CMYK → RGB) and preprocessing that
//! matches HF's `BlipImageProcessor` and `CLIPImageProcessor`.
//!
//! JPEG files are decoded by [`crate::jpeg`] to exactly Pillow's (libjpeg-turbo's) pixels.
//!
//! Resize, center crop and rescale reproduce one of three references, a setting of the processor
//! ([`ResizeMode`]), each exactly:
//! - `pillow`: the authors' BLIP/ContextBLIP code, torchvision transforms on PIL images. Resize is
//!   Pillow's `Image.resize(..., BICUBIC)` (`libImaging/Resample.c`): two separable passes
//!   (horizontal, then vertical) of the a = −0.5 cubic kernel whose support is stretched by the
//!   scale when downscaling (antialiasing), coefficients normalised over the in-bounds window and
//!   held in 22-bit fixed point, rounding to u8 after each pass. `CenterCrop` starts at
//!   `round((size − crop) / 2)`, half to even. `ToTensor` divides by 255 in float32;
//! - `torchvision`: HF transformers' fast image processors (the torchvision backend):
//!   `torchvision.transforms.v2.functional.resize` of a uint8 tensor with bicubic antialiasing
//!   (PyTorch's `_upsample_bicubic2d_aa` uint8 kernel): the same kernel and passes, but the weights
//!   rounded to 16-bit integers at a precision chosen per pass from the largest weight. The crop is
//!   torchvision's, as above; rescale multiplies by the float32 factor;
//! - `transformers-pil`: HF transformers' PIL backend (`CLIPImageProcessorPil`,
//!   `BlipImageProcessorPil` in transformers 5; the default `CLIPImageProcessor` and
//!   `BlipImageProcessor` of transformers 4.x). Resize is Pillow's, as `pillow`; the center crop
//!   starts at `(size − crop) // 2` (floor), one pixel before torchvision's wherever `size − crop`
//!   is 3 mod 4 (a 479-wide resize cropped to 320 starts at column 79, not 80); rescale is
//!   `float32(float64(v) · factor)` (numpy), then normalisation in float32. For the factor 1/255
//!   that rescale equals `ToTensor`'s float32 division by 255 for every u8 value.
//!
//! Where the crop is larger than the image, every reference pads with zeros: torchvision puts
//! `(crop − size) // 2` zeros before the image, transformers' PIL backend `ceil((crop − size) / 2)`
//! (its floor offset, negative). Normalisation is `(x − mean) / std` in float32 in all three.
//!
//! The `image` crate's CatmullRom filter is a different algorithm (up to 0.37 off after
//! normalisation).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::{DynamicImage, ImageReader, RgbImage};
use rayon::prelude::*;
use serde::Deserialize;

/// A failure to read one image, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: image file not found")]
    NotFound { path: PathBuf },
    #[error("{path}: cannot read: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a recognised image format")]
    UnknownFormat { path: PathBuf },
    #[error("{path}: {width}x{height} pixels exceed the limit of {limit} pixels")]
    TooLarge { path: PathBuf, width: u32, height: u32, limit: u64 },
    #[error("{path}: corrupt or unsupported image: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("{path}: invalid preprocessor config: {message}")]
    Config { path: PathBuf, message: String },
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// Limits applied while decoding.
#[derive(Debug, Clone, Copy)]
pub struct DecodeOptions {
    /// Largest accepted width × height (Pillow's decompression-bomb limit is 2 × 89,478,485).
    pub max_pixels: u64,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        Self { max_pixels: 178_956_970 }
    }
}

/// A decoded image and what the decoder warned about while it decoded it: libjpeg's warnings for
/// a damaged JPEG ("Corrupt JPEG data: premature end of data segment", "bad Huffman code", …),
/// which it decodes all the same, to the same pixels libjpeg (and so Pillow) gives. Empty for a
/// sound file. Callers report them as they report inputs left out; nothing is printed here.
#[derive(Debug, Clone)]
pub struct Decoded {
    pub image: RgbImage,
    pub warnings: Vec<String>,
}

/// As [`decode_image`], with the decoder's warnings ([`Decoded`]).
pub fn decode_image_reporting(path: &Path, options: DecodeOptions) -> Result<Decoded, ImageError> {
    decode_image_bytes_reporting(&read_image_file(path)?, path, options)
}

/// As [`decode_image_bytes`], with the decoder's warnings ([`Decoded`]).
pub fn decode_image_bytes_reporting(bytes: &[u8], path: &Path, options: DecodeOptions) -> Result<Decoded, ImageError> {
    check_image_bytes(bytes, path, options)?;
    // JPEG: our libjpeg-turbo-exact decoder (Pillow's pixels); the `image` crate's decoder is a few
    // grey levels off. Kinds it does not implement (arithmetic coding, 12-bit) fall through.
    if image::guess_format(bytes).ok() == Some(image::ImageFormat::Jpeg) {
        match crate::jpeg::decode_jpeg(bytes) {
            Ok(pixels) => {
                let warnings = pixels.warnings.iter().map(|w| w.to_string()).collect();
                return Ok(Decoded { image: jpeg_to_rgb(pixels), warnings });
            }
            Err(crate::jpeg::JpegError::Corrupt(message)) => {
                return Err(ImageError::Corrupt { path: path.to_owned(), message })
            }
            Err(crate::jpeg::JpegError::Unsupported(_)) => {}
        }
    }
    let mut reader = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|source| ImageError::Io { path: path.to_owned(), source })?;
    // Bound the decoder's allocations by the pixel limit (8 bytes a pixel covers 16-bit RGBA), so a
    // hostile header cannot make it allocate more than the limit allows.
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(options.max_pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(limits);
    let image = reader.decode().map_err(|e| classify(path, e))?;
    Ok(Decoded { image: to_rgb8(image), warnings: vec![] })
}

/// Decodes an image file to 8-bit RGB the way Pillow's `convert("RGB")` does: alpha is dropped (not
/// composited), gray is replicated, 16-bit samples become 8 bits as Pillow makes them (grey
/// clamped, colour by its high byte: see `to_rgb8`), CMYK is converted.
/// EXIF orientation is not applied (neither Pillow nor HF's processors apply it).
pub fn decode_image(path: &Path, options: DecodeOptions) -> Result<RgbImage, ImageError> {
    decode_image_bytes(&read_image_file(path)?, path, options)
}

/// As [`decode_image`], from bytes already in memory; `path` only names the source in errors.
/// A damaged JPEG's warnings are dropped: [`decode_image_bytes_reporting`] keeps them.
pub fn decode_image_bytes(bytes: &[u8], path: &Path, options: DecodeOptions) -> Result<RgbImage, ImageError> {
    Ok(decode_image_bytes_reporting(bytes, path, options)?.image)
}

/// Everything [`decode_image`] checks before it decodes the pixels: the file exists and reads, its
/// format is known, its header is sound and within the pixel limit, a JPEG is complete and not a
/// decompression bomb. Returns `(width, height)`. Costs a read of the file, not a decode: the
/// check commands run over every image before the first training step or score.
pub fn check_image(path: &Path, options: DecodeOptions) -> Result<(u32, u32), ImageError> {
    check_image_bytes(&read_image_file(path)?, path, options)
}

fn read_image_file(path: &Path) -> Result<Vec<u8>, ImageError> {
    std::fs::read(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => ImageError::NotFound { path: path.to_owned() },
        _ => ImageError::Io { path: path.to_owned(), source },
    })
}

/// As [`check_image`], from bytes already in memory; `path` only names the source in errors.
/// [`decode_image_bytes`] makes these checks first.
pub fn check_image_bytes(bytes: &[u8], path: &Path, options: DecodeOptions) -> Result<(u32, u32), ImageError> {
    let reader = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|source| ImageError::Io { path: path.to_owned(), source })?;
    let Some(format) = reader.format() else {
        return Err(ImageError::UnknownFormat { path: path.to_owned() });
    };
    // The JPEG decoder fills a truncated scan with grey instead of failing; Pillow refuses such
    // files ("image file is truncated"), and so do we.
    if format == image::ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
        return Err(ImageError::Corrupt {
            path: path.to_owned(),
            message: "JPEG data is truncated (no end-of-image marker after the last scan)".into(),
        });
    }
    // JPEG sizes come from our own marker walk, which reads what the decoder reads: the `image`
    // crate's refuses files libjpeg (and so Pillow) decodes, such as a short Adobe APP14 segment.
    let ours = (format == image::ImageFormat::Jpeg).then(|| crate::jpeg::jpeg_dimensions(bytes));
    let (width, height) = match ours {
        Some(Ok(size)) => size,
        Some(Err(crate::jpeg::JpegError::Corrupt(message))) => {
            return Err(ImageError::Corrupt { path: path.to_owned(), message })
        }
        Some(Err(crate::jpeg::JpegError::Unsupported(_))) | None => {
            reader.into_dimensions().map_err(|e| classify(path, e))?
        }
    };
    if width == 0 || height == 0 {
        return Err(ImageError::Corrupt { path: path.to_owned(), message: format!("{width}x{height} pixels") });
    }
    if width as u64 * height as u64 > options.max_pixels {
        return Err(ImageError::TooLarge { path: path.to_owned(), width, height, limit: options.max_pixels });
    }
    if format == image::ImageFormat::Jpeg {
        check_jpeg_size(bytes.len(), width, height, path)?;
    }
    Ok((width, height))
}

/// A Huffman-coded JPEG spends at least one bit on every 8×8 luma block (its DC code; progressive
/// scans can skip empty AC blocks with end-of-band runs, but not DC). A header that claims more
/// blocks than the file could code even at half that rate is a decompression bomb or a damaged
/// file: the decoder would allocate the full image (531 MB for a 3 KB file claiming 13000×13000)
/// and fill it with grey.
fn check_jpeg_size(file_bytes: usize, width: u32, height: u32, path: &Path) -> Result<(), ImageError> {
    let blocks = u64::from(width.div_ceil(8)) * u64::from(height.div_ceil(8));
    let needed = blocks / 16;
    if (file_bytes as u64) < needed {
        return Err(ImageError::Corrupt {
            path: path.to_owned(),
            message: format!(
                "the header claims {width}×{height} pixels but the file has {file_bytes} bytes; coding that many \
                 blocks takes at least {needed} (a damaged file or a decompression bomb)"
            ),
        });
    }
    Ok(())
}

/// A JPEG is complete when an end-of-image marker (FF D9) follows its last start-of-scan (FF DA).
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let last_sos = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]);
    let last_eoi = bytes.windows(2).rposition(|w| w == [0xFF, 0xD9]);
    matches!((last_sos, last_eoi), (Some(s), Some(e)) if e > s)
}

fn classify(path: &Path, e: image::ImageError) -> ImageError {
    match e {
        image::ImageError::IoError(source) => ImageError::Io { path: path.to_owned(), source },
        image::ImageError::Unsupported(u) if matches!(u.kind(), image::error::UnsupportedErrorKind::Format(_)) => {
            ImageError::UnknownFormat { path: path.to_owned() }
        }
        other => ImageError::Corrupt { path: path.to_owned(), message: other.to_string() },
    }
}

/// Pillow's `convert("RGB")` of what libjpeg hands it: grey replicated; CMYK read as Adobe-inverted
/// (`CMYK;I`, Pillow's assumption for every CMYK JPEG) then Pillow's `cmyk2rgb`:
/// `255 − k` scaled by `1 − c/255` with its rounded division by 255.
fn jpeg_to_rgb(pixels: crate::jpeg::JpegPixels) -> RgbImage {
    use crate::jpeg::JpegLayout;
    let (w, h) = (pixels.width, pixels.height);
    let rgb: Vec<u8> = match pixels.layout {
        JpegLayout::Rgb => pixels.samples,
        JpegLayout::Gray => pixels.samples.iter().flat_map(|&v| [v, v, v]).collect(),
        JpegLayout::Cmyk => {
            let muldiv255 = |a: u32, b: u32| {
                let t = a * b + 128;
                ((t >> 8) + t) >> 8
            };
            pixels
                .samples
                .chunks_exact(4)
                .flat_map(|p| {
                    let nk = p[3] as u32; // 255 − (255 − stored K)
                    [0, 1, 2].map(|i| (nk - muldiv255(255 - p[i] as u32, nk)) as u8)
                })
                .collect()
        }
    };
    RgbImage::from_raw(w, h, rgb).expect("w·h·3 samples")
}

/// A decoded image as 8-bit RGB, converted as Pillow's `convert("RGB")` converts it (see the
/// private `to_rgb8` below, which the decoders use).
pub fn pillow_rgb(image: DynamicImage) -> RgbImage {
    to_rgb8(image)
}

/// Pillow's `convert("RGB")` of what its decoders give for each kind of image. 16-bit samples
/// are not scaled (the `image` crate's conversion rounds `v / 257`): Pillow opens a 16-bit grey
/// PNG as mode `I;16`, whose conversion to RGB clamps (`min(v, 255)`), and 16-bit RGB, RGBA and
/// grey+alpha PNGs as 8-bit modes keeping each sample's high byte (`v >> 8`). Pillow 12.1.1's
/// behaviour, checked by `tests/fixtures/images/png16_*` (`make_png16.py`).
fn to_rgb8(image: DynamicImage) -> RgbImage {
    let (w, h) = (image.width(), image.height());
    let from = |samples: &[u16], channels: usize, sample: fn(u16) -> u8| -> RgbImage {
        let rgb = samples
            .chunks_exact(channels)
            .flat_map(|p| match channels {
                1 | 2 => [sample(p[0]); 3],
                _ => [sample(p[0]), sample(p[1]), sample(p[2])],
            })
            .collect();
        RgbImage::from_raw(w, h, rgb).expect("w·h pixels")
    };
    let clamp = |v: u16| v.min(255) as u8;
    let high = |v: u16| (v >> 8) as u8;
    match image {
        DynamicImage::ImageRgb8(rgb) => rgb,
        DynamicImage::ImageLuma16(buf) => from(buf.as_raw(), 1, clamp),
        DynamicImage::ImageLumaA16(buf) => from(buf.as_raw(), 2, high),
        DynamicImage::ImageRgb16(buf) => from(buf.as_raw(), 3, high),
        DynamicImage::ImageRgba16(buf) => from(buf.as_raw(), 4, high),
        other => other.to_rgb8(),
    }
}

/// How the image is resized before cropping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resize {
    /// To exactly `height × width` (BLIP).
    Exact { height: u32, width: u32 },
    /// Shorter side to `size`, aspect kept, longer side `int(size · long / short)` (CLIP).
    ShortestEdge(u32),
}

/// Which reference the resize, center crop and rescale reproduce (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResizeMode {
    /// Pillow's `Image.resize(BICUBIC)`, torchvision's `CenterCrop` (offsets rounded half to even),
    /// `ToTensor`: the authors' recipes (torchvision transforms on PIL images).
    #[default]
    Pillow,
    /// `torchvision.transforms.v2.functional.resize` on uint8 tensors, antialiased, and
    /// torchvision's `center_crop`: HF transformers' fast image processors.
    Torchvision,
    /// Pillow's `Image.resize(BICUBIC)`, a center crop at `(size − crop) // 2` (floor), rescale in
    /// float64: HF transformers' PIL backend (`CLIPImageProcessorPil`, `BlipImageProcessorPil`),
    /// which was transformers 4.x's default `CLIPImageProcessor` / `BlipImageProcessor`.
    #[serde(rename = "transformers-pil")]
    TransformersPil,
}

impl ResizeMode {
    /// The first source index a center crop of `crop` samples takes along an axis of `size`
    /// samples; negative where the crop is larger than the image: that many zeros come first.
    pub fn crop_offset(self, size: u32, crop: u32) -> i64 {
        let (size, crop) = (i64::from(size), i64::from(crop));
        match self {
            // torchvision (`_center_crop_compute_padding`, then `_center_crop_compute_crop_anchor`):
            // pad `(crop − size) // 2` zeros before, else `int(round((size − crop) / 2.0))`.
            Self::Pillow | Self::Torchvision if crop > size => -((crop - size) / 2),
            Self::Pillow | Self::Torchvision => ((size - crop) as f64 / 2.0).round_ties_even() as i64,
            // transformers' `image_transforms.center_crop`: `(size − crop) // 2`, Python's floor
            // division, padding included (it pads `ceil((crop − size) / 2)` before the image).
            Self::TransformersPil => (size - crop).div_euclid(2),
        }
    }

    /// A u8 sample times `factor`, as the reference computes it in float32.
    fn rescale(self, v: u8, factor: f64) -> f32 {
        match self {
            // torchvision: `x.to(float32) * factor` in float32.
            Self::Torchvision => f32::from(v) * factor as f32,
            // numpy: `(x.astype(float64) * factor).astype(float32)`. `ToTensor`'s float32
            // `x / 255` gives the same value for every u8 at factor 1/255.
            Self::Pillow | Self::TransformersPil => (f64::from(v) * factor) as f32,
        }
    }
}

impl std::str::FromStr for ResizeMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "pillow" | "pil" => Ok(Self::Pillow),
            "torchvision" | "torch" => Ok(Self::Torchvision),
            "transformers-pil" | "transformers_pil" => Ok(Self::TransformersPil),
            _ => Err(format!("unknown resize mode `{s}`: expected pillow, torchvision or transformers-pil")),
        }
    }
}

/// Resize → center crop → rescale → normalise, as HF's image processors do.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessor {
    pub resize: Option<Resize>,
    /// Whose resize, crop offsets and rescale to reproduce.
    pub resize_mode: ResizeMode,
    /// `(height, width)`; the offsets are `resize_mode`'s ([`ResizeMode::crop_offset`]).
    pub center_crop: Option<(u32, u32)>,
    /// Multiplies u8 values (1/255); float64, as numpy's rescale multiplies (see
    /// [`ResizeMode::TransformersPil`]).
    pub rescale_factor: f64,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// The largest side a processor may resize or crop to: far past any ViT's input, and small enough
/// that a mistyped size fails here rather than as an allocation of gigabytes per image.
pub const MAX_SIDE: u32 = 16384;

/// A size setting `key` must be a positive side up to [`MAX_SIDE`].
fn check_side(key: &str, side: u32) -> Result<(), String> {
    if side == 0 || side > MAX_SIDE {
        return Err(format!("`{key}` is {side}: a side of 1 to {MAX_SIDE} pixels is needed"));
    }
    Ok(())
}

/// OpenAI CLIP's normalisation, used by BLIP too (the published digits, kept verbatim).
#[allow(clippy::excessive_precision)]
pub const CLIP_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

#[derive(Deserialize)]
struct HfSize {
    height: Option<u32>,
    width: Option<u32>,
    shortest_edge: Option<u32>,
}

/// The fields of HF's `preprocessor_config.json` that change pixels.
#[derive(Deserialize)]
struct HfProcessorConfig {
    image_processor_type: Option<String>,
    #[serde(default = "yes")]
    do_resize: bool,
    size: Option<HfSize>,
    resample: Option<u32>,
    #[serde(default)]
    do_center_crop: bool,
    crop_size: Option<HfSize>,
    #[serde(default = "yes")]
    do_rescale: bool,
    rescale_factor: Option<f64>,
    #[serde(default = "yes")]
    do_normalize: bool,
    image_mean: Option<Vec<f32>>,
    image_std: Option<Vec<f32>>,
    /// ctxalign's own key (HF ignores it): which resize reference to reproduce.
    resize_mode: Option<ResizeMode>,
}

fn yes() -> bool {
    true
}

impl ImageProcessor {
    /// `BlipImageProcessor` at `size × size`.
    pub fn blip(size: u32) -> Self {
        Self {
            resize: Some(Resize::Exact { height: size, width: size }),
            resize_mode: ResizeMode::Pillow,
            center_crop: None,
            rescale_factor: 1.0 / 255.0,
            mean: CLIP_MEAN,
            std: CLIP_STD,
        }
    }

    /// `CLIPImageProcessor`: shortest edge to `size`, center crop `size × size`.
    pub fn clip(size: u32) -> Self {
        Self { resize: Some(Resize::ShortestEdge(size)), center_crop: Some((size, size)), ..Self::blip(size) }
    }

    /// Parses HF's `preprocessor_config.json` (Blip/CLIP image processors). The resize reference is
    /// the file's `resize_mode` (`pillow`, `torchvision` or `transformers-pil`, a key of ctxalign's
    /// that HF ignores) when present; else torchvision for a fast processor (`image_processor_type`
    /// ending in `Fast`), else Pillow. (HF writes a PIL-backend processor's type without its `Pil`
    /// suffix, so `transformers-pil` is never inferred: name it.)
    pub fn from_hf_json(path: &Path) -> Result<Self, ImageError> {
        let text = std::fs::read_to_string(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => ImageError::NotFound { path: path.to_owned() },
            _ => ImageError::Io { path: path.to_owned(), source },
        })?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ImageError::Config { path: path.to_owned(), message: e.to_string() })?;
        Self::from_hf_value(&value).map_err(|message| ImageError::Config { path: path.to_owned(), message })
    }

    /// As [`ImageProcessor::from_hf_json`], from an already parsed JSON object. Every setting is
    /// checked here, each problem named by its key: a processor that loads processes every image.
    pub fn from_hf_value(value: &serde_json::Value) -> Result<Self, String> {
        let cfg: HfProcessorConfig = serde_path_to_error::deserialize(value.clone()).map_err(|e| {
            let path = e.path().to_string();
            format!("`{path}`: {}", e.into_inner())
        })?;
        if let Some(r) = cfg.resample {
            if r != 3 {
                return Err(format!("`resample` {r} is not supported (only 3 = bicubic)"));
            }
        }
        let resize = if cfg.do_resize {
            let size = cfg.size.ok_or("`do_resize` is set but `size` is missing")?;
            Some(match (size.height, size.width, size.shortest_edge) {
                (Some(height), Some(width), _) => {
                    check_side("size.height", height)?;
                    check_side("size.width", width)?;
                    Resize::Exact { height, width }
                }
                (_, _, Some(s)) => {
                    check_side("size.shortest_edge", s)?;
                    Resize::ShortestEdge(s)
                }
                _ => return Err("`size` needs height and width, or shortest_edge".into()),
            })
        } else {
            None
        };
        let center_crop = if cfg.do_center_crop {
            let c = cfg.crop_size.ok_or("`do_center_crop` is set but `crop_size` is missing")?;
            match (c.height, c.width) {
                (Some(h), Some(w)) => {
                    check_side("crop_size.height", h)?;
                    check_side("crop_size.width", w)?;
                    Some((h, w))
                }
                _ => return Err("`crop_size` needs height and width".into()),
            }
        } else {
            None
        };
        // A crop larger than the resized image would pad it with black (torchvision does): the
        // model would see a frame no reference processor gives it.
        if let (Some(resize), Some((ch, cw))) = (resize, center_crop) {
            let (h, w) = match resize {
                Resize::Exact { height, width } => (height, width),
                // The shorter side becomes `s`; the longer one is at least `s`.
                Resize::ShortestEdge(s) => (s, s),
            };
            if ch > h || cw > w {
                return Err(format!(
                    "`crop_size` {ch}×{cw} is larger than the resized image ({h}×{w} at least): the crop would pad \
                     the image with black"
                ));
            }
        }
        let triple = |v: Option<Vec<f32>>, name: &str, default: [f32; 3]| -> Result<[f32; 3], String> {
            match v {
                None => Ok(default),
                Some(v) => v.try_into().map_err(|v: Vec<f32>| format!("`{name}` has {} values, expected 3", v.len())),
            }
        };
        let (mean, std) = if cfg.do_normalize {
            (triple(cfg.image_mean, "image_mean", CLIP_MEAN)?, triple(cfg.image_std, "image_std", CLIP_STD)?)
        } else {
            ([0.0; 3], [1.0; 3])
        };
        if let Some(m) = mean.iter().find(|m| !m.is_finite() || **m < 0.0) {
            return Err(format!("`image_mean` holds {m}: a channel mean is a finite value ≥ 0"));
        }
        if let Some(s) = std.iter().find(|s| !s.is_finite() || **s <= 0.0) {
            return Err(format!("`image_std` holds {s}: a channel standard deviation is a finite value > 0"));
        }
        let rescale_factor = if cfg.do_rescale { cfg.rescale_factor.unwrap_or(1.0 / 255.0) } else { 1.0 };
        if !rescale_factor.is_finite() || rescale_factor <= 0.0 {
            return Err(format!("`rescale_factor` is {rescale_factor}: a finite value > 0 is needed"));
        }
        let fast = cfg.image_processor_type.as_deref().is_some_and(|t| t.ends_with("Fast"));
        let default_mode = if fast { ResizeMode::Torchvision } else { ResizeMode::Pillow };
        Ok(Self {
            resize,
            resize_mode: cfg.resize_mode.unwrap_or(default_mode),
            center_crop,
            rescale_factor,
            mean,
            std,
        })
    }

    /// The one `(height, width)` every image comes out at, when the settings give one (a fixed
    /// resize, or a center crop).
    pub fn fixed_output_size(&self) -> Option<(u32, u32)> {
        match (self.center_crop, self.resize) {
            (Some(crop), _) => Some(crop),
            (None, Some(Resize::Exact { height, width })) => Some((height, width)),
            _ => None,
        }
    }

    /// Checks that a ViT with `patch_size`-pixel patches can take what this processor outputs:
    /// one fixed size (images are batched), a whole number of patches on each side. `path` is the
    /// processor's file, named in the error. Done when a model is loaded, not at its first image.
    pub fn check_for_vit(&self, path: &Path, patch_size: usize) -> Result<(u32, u32), ImageError> {
        let config = |message: String| ImageError::Config { path: path.to_owned(), message };
        let Some((h, w)) = self.fixed_output_size() else {
            return Err(config(
                "the output size depends on each image (no fixed `size` and no `do_center_crop`): the model needs \
                 one size for every image"
                    .into(),
            ));
        };
        let p = patch_size as u32;
        if p == 0 || !h.is_multiple_of(p) || !w.is_multiple_of(p) {
            let key = if self.center_crop.is_some() { "crop_size" } else { "size" };
            return Err(config(format!(
                "`{key}` gives {h}×{w} images, not a whole number of the model's {patch_size}-pixel patches"
            )));
        }
        Ok((h, w))
    }

    /// Output `(height, width)` for an input of `width × height`.
    pub fn output_size(&self, width: u32, height: u32) -> (u32, u32) {
        let (h, w) = self.resized_size(width, height);
        self.center_crop.unwrap_or((h, w))
    }

    fn resized_size(&self, width: u32, height: u32) -> (u32, u32) {
        match self.resize {
            None => (height, width),
            Some(Resize::Exact { height, width }) => (height, width),
            Some(Resize::ShortestEdge(s)) => {
                let (short, long) = if width <= height { (width, height) } else { (height, width) };
                let new_long = (s as u64 * long as u64 / short as u64) as u32;
                if width <= height {
                    (new_long, s)
                } else {
                    (s, new_long)
                }
            }
        }
    }

    /// RGB image → normalised `[3, H, W]` values, row-major.
    pub fn process(&self, image: &RgbImage) -> Vec<f32> {
        let (h, w) = self.resized_size(image.width(), image.height());
        let resized = resize_bicubic(image, w, h, self.resize_mode);
        let cropped = match self.center_crop {
            Some((ch, cw)) => center_crop(&resized, cw, ch, self.resize_mode),
            None => resized,
        };
        let (w, h) = (cropped.width() as usize, cropped.height() as usize);
        // Rescale as the reference does, then `(x − mean) / std` in float32: a table per channel of
        // what each u8 value becomes.
        let table: [[f32; 256]; 3] = std::array::from_fn(|c| {
            std::array::from_fn(|v| {
                (self.resize_mode.rescale(v as u8, self.rescale_factor) - self.mean[c]) / self.std[c]
            })
        });
        let mut out = vec![0f32; 3 * h * w];
        for (i, px) in cropped.pixels().enumerate() {
            for c in 0..3 {
                out[c * h * w + i] = table[c][px[c] as usize];
            }
        }
        out
    }

    /// Decodes and processes one file → `[3, H, W]`.
    pub fn load(&self, path: &Path, options: DecodeOptions, device: &Device) -> Result<Tensor, ImageError> {
        let image = decode_image(path, options)?;
        let (h, w) = self.output_size(image.width(), image.height());
        Ok(Tensor::from_vec(self.process(&image), (3, h as usize, w as usize), device)?)
    }

    /// Decodes and processes files in parallel → `[N, 3, H, W]`. All outputs must share one size
    /// (true whenever the processor resizes to a fixed size or crops). A damaged JPEG's warnings
    /// are dropped: [`ImageProcessor::load_batch_reporting`] keeps them.
    pub fn load_batch<P: AsRef<Path> + Sync>(
        &self,
        paths: &[P],
        options: DecodeOptions,
        device: &Device,
    ) -> Result<Tensor, ImageError> {
        Ok(self.load_batch_reporting(paths, options, device)?.0)
    }

    /// As [`ImageProcessor::load_batch`], with the decoder's warnings, each `"<file>: <warning>"`
    /// (a damaged JPEG decodes as libjpeg decodes it, with libjpeg's warnings: [`Decoded`]).
    pub fn load_batch_reporting<P: AsRef<Path> + Sync>(
        &self,
        paths: &[P],
        options: DecodeOptions,
        device: &Device,
    ) -> Result<(Tensor, Vec<String>), ImageError> {
        let processed = paths
            .par_iter()
            .map(|p| {
                let Decoded { image, warnings } = decode_image_reporting(p.as_ref(), options)?;
                let warnings: Vec<String> =
                    warnings.into_iter().map(|w| format!("{}: {w}", p.as_ref().display())).collect();
                Ok((self.output_size(image.width(), image.height()), self.process(&image), warnings))
            })
            .collect::<Result<Vec<_>, ImageError>>()?;
        let warnings: Vec<String> = processed.iter().flat_map(|(_, _, w)| w.iter().cloned()).collect();
        let processed: Vec<((u32, u32), Vec<f32>)> = processed.into_iter().map(|(s, v, _)| (s, v)).collect();
        let Some(&((h, w), _)) = processed.first() else {
            return Ok((Tensor::zeros((0, 3, 0, 0), candle_core::DType::F32, device)?, warnings));
        };
        let mut data = Vec::with_capacity(processed.len() * 3 * (h * w) as usize);
        for (i, (size, values)) in processed.into_iter().enumerate() {
            if size != (h, w) {
                return Err(ImageError::Config {
                    path: paths[i].as_ref().to_owned(),
                    message: format!("processed to {size:?}, other images to {:?}: use a fixed-size processor", (h, w)),
                });
            }
            data.extend(values);
        }
        let n = data.len() / (3 * (h * w) as usize);
        Ok((Tensor::from_vec(data, (n, 3, h as usize, w as usize), device)?, warnings))
    }
}

/// A `crop_w × crop_h` center crop at `mode`'s offsets ([`ResizeMode::crop_offset`]); where the
/// crop is larger than the image, the rest is zeros, as every reference pads.
fn center_crop(image: &RgbImage, crop_w: u32, crop_h: u32, mode: ResizeMode) -> RgbImage {
    let (top, left) = (mode.crop_offset(image.height(), crop_h), mode.crop_offset(image.width(), crop_w));
    RgbImage::from_fn(crop_w, crop_h, |x, y| {
        let (sx, sy) = (i64::from(x) + left, i64::from(y) + top);
        if sx >= 0 && sy >= 0 && (sx as u32) < image.width() && (sy as u32) < image.height() {
            *image.get_pixel(sx as u32, sy as u32)
        } else {
            image::Rgb([0, 0, 0])
        }
    })
}

/// Pillow's fixed-point precision of resampling weights.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// The a = −0.5 cubic kernel as Pillow writes it (`bicubic_filter`).
fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// The same kernel as PyTorch writes it (`aa_filter` with `cubic_convolution1/2`); the floating
/// point differs from Pillow's in the last bits, which the 16-bit rounding can expose.
fn torch_bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
    } else {
        0.0
    }
}

/// Fixed-point weights of one resampling pass: for each output index, the first input index and
/// the weights of its window; a pass computes `clamp((2^(p−1) + Σ w·x) >> p, 0, 255)`.
struct PassWeights {
    precision: u32,
    rows: Vec<(usize, Vec<i32>)>,
}

/// The weights of a pass from `in_size` to `out_size` samples: Pillow's `precompute_coeffs` +
/// `normalize_coeffs_8bpc`, or PyTorch's `_compute_indices_min_size_weights_aa` +
/// `compute_index_ranges_int16_weights`.
fn pass_weights(in_size: u32, out_size: u32, mode: ResizeMode) -> PassWeights {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let (filter, max_window): (fn(f64) -> f64, usize) = match mode {
        ResizeMode::Pillow | ResizeMode::TransformersPil => (bicubic_filter, usize::MAX),
        // PyTorch clips the window to `ceil(support)·2 + 1` taps.
        ResizeMode::Torchvision => (torch_bicubic_filter, support.ceil() as usize * 2 + 1),
    };
    let normalised: Vec<(usize, Vec<f64>)> = (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize; // C's (int) truncation
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64).max(xmin as i64) as usize;
            let xmax = xmax.min(xmin.saturating_add(max_window));
            let weights: Vec<f64> = (xmin..xmax).map(|x| filter((x as f64 - center + 0.5) * ss)).collect();
            let total: f64 = weights.iter().sum();
            (xmin, weights.iter().map(|w| if total != 0.0 { w / total } else { *w }).collect())
        })
        .collect();
    let precision = match mode {
        ResizeMode::Pillow | ResizeMode::TransformersPil => PRECISION_BITS,
        // The largest precision whose largest weight still fits an i16.
        ResizeMode::Torchvision => {
            let max = normalised.iter().flat_map(|(_, w)| w.iter().copied()).fold(0.0, f64::max);
            (0..22).find(|p| (0.5 + max * (1u64 << (p + 1)) as f64) as i64 >= 1 << 15).unwrap_or(22)
        }
    };
    let rows = normalised
        .into_iter()
        .map(|(xmin, weights)| {
            let fixed = weights
                .iter()
                .map(|w| {
                    let v = w * (1u64 << precision) as f64;
                    (if v < 0.0 { v - 0.5 } else { v + 0.5 }) as i32
                })
                .collect();
            (xmin, fixed)
        })
        .collect();
    PassWeights { precision, rows }
}

/// One resampling pass along x (`horizontal`) or y, to `out_len` pixels on that axis. The sums are
/// 32-bit, as both references' are (the weights sum to `2^precision` ≤ 2^22, times 255, plus the
/// negative lobes' share, stays far inside an i32).
fn resample_pass(src: &RgbImage, out_len: u32, horizontal: bool, mode: ResizeMode) -> RgbImage {
    let (w, h) = (src.width() as usize, src.height() as usize);
    let PassWeights { precision, rows } = pass_weights(if horizontal { w as u32 } else { h as u32 }, out_len, mode);
    let clamp = |acc: i32| (acc >> precision).clamp(0, 255) as u8;
    let half = 1i32 << (precision - 1);
    let input = src.as_raw();
    let out_len = out_len as usize;
    let mut out;
    if horizontal {
        out = vec![0u8; out_len * h * 3];
        for (line, out_line) in input.chunks_exact(w * 3).zip(out.chunks_exact_mut(out_len * 3)) {
            for ((start, weights), px) in rows.iter().zip(out_line.chunks_exact_mut(3)) {
                let mut acc = [half; 3];
                for (taps, &wt) in line[start * 3..].chunks_exact(3).zip(weights) {
                    for c in 0..3 {
                        acc[c] += taps[c] as i32 * wt;
                    }
                }
                px.copy_from_slice(&acc.map(clamp));
            }
        }
    } else {
        // Whole rows at a time: each output row is a weighted sum of input rows.
        let stride = w * 3;
        out = vec![0u8; stride * out_len];
        let mut acc = vec![0i32; stride];
        for ((start, weights), out_line) in rows.iter().zip(out.chunks_exact_mut(stride)) {
            acc.fill(half);
            for (i, &wt) in weights.iter().enumerate() {
                let line = &input[(start + i) * stride..(start + i + 1) * stride];
                for (a, &v) in acc.iter_mut().zip(line) {
                    *a += v as i32 * wt;
                }
            }
            for (o, &a) in out_line.iter_mut().zip(&acc) {
                *o = clamp(a);
            }
        }
    }
    let (ow, oh) = if horizontal { (out_len, h) } else { (w, out_len) };
    RgbImage::from_raw(ow as u32, oh as u32, out).expect("out_len · size · 3 samples")
}

/// Bicubic resize of an RGB image exactly as `mode`'s reference does it (see the module docs):
/// horizontal pass, then vertical, each skipped when that side keeps its size.
pub fn resize_bicubic(image: &RgbImage, width: u32, height: u32, mode: ResizeMode) -> RgbImage {
    let mut current = std::borrow::Cow::Borrowed(image);
    if width != image.width() {
        current = std::borrow::Cow::Owned(resample_pass(&current, width, true, mode));
    }
    if height != image.height() {
        current = std::borrow::Cow::Owned(resample_pass(&current, height, false, mode));
    }
    current.into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small real JPEG whose SOF header is patched to claim 13000×13000 is refused before
    /// decoding; the same file with its real size decodes.
    #[test]
    fn jpeg_headers_claiming_more_than_the_file_can_code_are_refused() {
        let img = RgbImage::from_fn(16, 16, |x, y| image::Rgb([(x * 15) as u8, (y * 15) as u8, 90]));
        let mut bytes = vec![];
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 90).encode_image(&img).unwrap();
        let path = Path::new("bomb.jpg");
        assert_eq!(decode_image_bytes(&bytes, path, DecodeOptions::default()).unwrap().dimensions(), (16, 16));
        // SOF0 (FF C0): length (2 bytes), precision (1), height (2), width (2).
        let sof = bytes.windows(2).position(|w| w == [0xFF, 0xC0]).expect("a baseline JPEG");
        bytes[sof + 5..sof + 9].copy_from_slice(&[0x32, 0xC8, 0x32, 0xC8]); // 13000, 13000
        match decode_image_bytes(&bytes, path, DecodeOptions::default()) {
            Err(ImageError::Corrupt { message, .. }) => {
                assert!(message.contains("13000×13000") && message.contains("bytes"), "{message}")
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn same_size_resize_is_identity_and_constant_images_stay_constant() {
        let img = RgbImage::from_fn(13, 7, |x, y| image::Rgb([(x * 9) as u8, (y * 20) as u8, 77]));
        for mode in [ResizeMode::Pillow, ResizeMode::Torchvision] {
            assert_eq!(resize_bicubic(&img, 13, 7, mode), img);
        }
        let flat = RgbImage::from_pixel(31, 17, image::Rgb([200, 3, 128]));
        for (w, h) in [(8, 8), (64, 40), (5, 90)] {
            for mode in [ResizeMode::Pillow, ResizeMode::Torchvision] {
                let r = resize_bicubic(&flat, w, h, mode);
                assert!(r.pixels().all(|p| p.0 == [200, 3, 128]), "{w}x{h} {mode:?}");
            }
        }
    }

    #[test]
    fn coefficients_cover_the_input_and_sum_to_one() {
        for (i, o) in [(97, 64), (40, 64), (500, 7), (3, 400)] {
            for mode in [ResizeMode::Pillow, ResizeMode::Torchvision] {
                let PassWeights { precision, rows } = pass_weights(i, o, mode);
                for (xmin, k) in rows {
                    assert!(xmin + k.len() <= i as usize);
                    let s: i64 = k.iter().map(|&v| v as i64).sum();
                    assert!((s - (1i64 << precision)).abs() <= k.len() as i64, "{mode:?} {i}→{o}");
                    if mode == ResizeMode::Torchvision {
                        assert!(k.iter().all(|&v| i16::try_from(v).is_ok()), "torchvision weights are i16");
                    }
                }
            }
        }
    }

    /// Offsets as the references compute them: torchvision's `_center_crop_compute_padding` and
    /// `int(round((size − crop) / 2.0))`; transformers' `(size − crop) // 2`.
    #[test]
    fn crop_offsets_follow_each_reference() {
        let torchvision = |size: i64, crop: i64| {
            if crop > size {
                -((crop - size).div_euclid(2))
            } else {
                ((size - crop) as f64 / 2.0).round_ties_even() as i64
            }
        };
        for size in 1..40u32 {
            for crop in 1..40u32 {
                let (s, c) = (i64::from(size), i64::from(crop));
                assert_eq!(ResizeMode::TransformersPil.crop_offset(size, crop), (s - c).div_euclid(2));
                for mode in [ResizeMode::Pillow, ResizeMode::Torchvision] {
                    assert_eq!(mode.crop_offset(size, crop), torchvision(s, c), "{size} {crop}");
                }
            }
        }
        // The case that found the difference: 479 wide, cropped to 320.
        assert_eq!(ResizeMode::Torchvision.crop_offset(479, 320), 80);
        assert_eq!(ResizeMode::TransformersPil.crop_offset(479, 320), 79);
        // Differences of 1 mod 4 agree, of 3 mod 4 differ.
        assert_eq!(ResizeMode::Torchvision.crop_offset(481, 320), ResizeMode::TransformersPil.crop_offset(481, 320));
        // Larger crops: torchvision pads (crop − size) // 2 zeros first, transformers the ceiling.
        assert_eq!(ResizeMode::Torchvision.crop_offset(32, 35), -1);
        assert_eq!(ResizeMode::TransformersPil.crop_offset(32, 35), -2);
        assert_eq!(ResizeMode::Torchvision.crop_offset(32, 33), 0);
        assert_eq!(ResizeMode::TransformersPil.crop_offset(32, 33), -1);
    }

    /// `ToTensor` divides by 255 in float32; numpy multiplies in float64 and rounds to float32 (the
    /// same values); torchvision multiplies by the float32 factor (126 of 256 values one ulp off).
    #[test]
    fn rescale_follows_each_reference() {
        let mut differ = 0;
        for v in 0..=255u8 {
            let to_tensor = f32::from(v) / 255.0;
            assert_eq!(ResizeMode::Pillow.rescale(v, 1.0 / 255.0).to_bits(), to_tensor.to_bits());
            assert_eq!(ResizeMode::TransformersPil.rescale(v, 1.0 / 255.0).to_bits(), to_tensor.to_bits());
            let tv = ResizeMode::Torchvision.rescale(v, 1.0 / 255.0);
            assert_eq!(tv.to_bits(), (f32::from(v) * (1.0f32 / 255.0)).to_bits());
            differ += usize::from(tv != to_tensor);
        }
        assert_eq!(differ, 126);
    }

    #[test]
    fn resize_modes_parse() {
        for (text, mode) in [
            ("pillow", ResizeMode::Pillow),
            ("torchvision", ResizeMode::Torchvision),
            ("transformers-pil", ResizeMode::TransformersPil),
        ] {
            assert_eq!(text.parse::<ResizeMode>().unwrap(), mode);
            let v = serde_json::json!({"size": {"shortest_edge": 64}, "resize_mode": text});
            assert_eq!(ImageProcessor::from_hf_value(&v).unwrap().resize_mode, mode);
            assert_eq!(serde_json::to_value(mode).unwrap(), serde_json::json!(text));
        }
        assert!("transformers".parse::<ResizeMode>().unwrap_err().contains("transformers-pil"));
        let v = serde_json::json!({"size": {"shortest_edge": 64}, "resize_mode": "transformers"});
        assert!(ImageProcessor::from_hf_value(&v).unwrap_err().contains("transformers-pil"));
    }

    #[test]
    fn shortest_edge_sizes_follow_hf() {
        let p = ImageProcessor::clip(64);
        assert_eq!(p.resized_size(97, 61), (64, 101));
        assert_eq!(p.resized_size(50, 83), (106, 64));
        assert_eq!(p.output_size(97, 61), (64, 64));
    }

    /// Every setting is checked when the file is read, the offending key named: sizes of zero
    /// (which used to panic at the first image), crops larger than the resize, non-finite or
    /// negative means, zero or negative deviations, unknown resize modes, wrong types.
    #[test]
    fn every_processor_setting_is_checked_at_load() {
        let base = serde_json::json!({"do_resize": true, "size": {"height": 96, "width": 96}, "resample": 3,
            "do_center_crop": true, "crop_size": {"height": 96, "width": 96},
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]});
        ImageProcessor::from_hf_value(&base).expect("the base settings are sound");
        let cases: Vec<(&str, serde_json::Value, &str)> = vec![
            ("size 0", serde_json::json!({"size": {"height": 0, "width": 96}}), "size.height"),
            ("width 0", serde_json::json!({"size": {"height": 96, "width": 0}}), "size.width"),
            (
                "shortest edge 0",
                serde_json::json!({"size": {"shortest_edge": 0}, "crop_size": {"height": 1, "width": 1}}),
                "size.shortest_edge",
            ),
            ("huge", serde_json::json!({"size": {"height": 4000000000u64, "width": 96}}), "size.height"),
            ("negative", serde_json::json!({"size": {"height": -96, "width": 96}}), "size.height"),
            ("crop 0", serde_json::json!({"crop_size": {"height": 0, "width": 96}}), "crop_size.height"),
            ("crop > resize", serde_json::json!({"crop_size": {"height": 128, "width": 96}}), "crop_size"),
            ("crop > shortest edge", serde_json::json!({"size": {"shortest_edge": 64}}), "crop_size"),
            // JSON has no NaN: a NaN written by Python (`NaN`) fails to parse; `null` is its stand-in here.
            ("NaN mean", serde_json::json!({"image_mean": [0.5, null, 0.5]}), "image_mean"),
            ("infinite mean", serde_json::json!({"image_mean": [0.5, 1e39, 0.5]}), "image_mean"),
            ("negative mean", serde_json::json!({"image_mean": [0.5, -0.1, 0.5]}), "image_mean"),
            ("std 0", serde_json::json!({"image_std": [0.5, 0.0, 0.5]}), "image_std"),
            ("negative std", serde_json::json!({"image_std": [0.5, -0.5, 0.5]}), "image_std"),
            ("two means", serde_json::json!({"image_mean": [0.5, 0.5]}), "image_mean"),
            ("mean as text", serde_json::json!({"image_mean": "0.5"}), "image_mean"),
            ("rescale 0", serde_json::json!({"rescale_factor": 0.0}), "rescale_factor"),
            ("unknown resize mode", serde_json::json!({"resize_mode": "lanczos"}), "resize_mode"),
            ("bilinear", serde_json::json!({"resample": 2}), "resample"),
        ];
        for (name, patch, key) in cases {
            let mut v = base.clone();
            for (k, x) in patch.as_object().unwrap() {
                v[k] = x.clone();
            }
            match ImageProcessor::from_hf_value(&v) {
                Err(e) => assert!(e.contains(key), "{name}: {e}"),
                Ok(p) => panic!("{name}: accepted as {p:?}"),
            }
        }
        // Read from a file, the error names the file (its folder names the model).
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("preprocessor_config.json");
        std::fs::write(&path, r#"{"size": {"height": 0, "width": 0}}"#).unwrap();
        match ImageProcessor::from_hf_json(&path) {
            Err(ImageError::Config { path: p, message }) => {
                assert_eq!(p, path);
                assert!(message.contains("size.height"), "{message}");
            }
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    /// A ViT takes one fixed size, a whole number of patches per side.
    #[test]
    fn processors_are_checked_against_the_vit() {
        let path = Path::new("m/preprocessor_config.json");
        assert_eq!(ImageProcessor::blip(96).check_for_vit(path, 12).unwrap(), (96, 96));
        assert_eq!(ImageProcessor::clip(224).check_for_vit(path, 32).unwrap(), (224, 224));
        let e = ImageProcessor::blip(100).check_for_vit(path, 12).unwrap_err().to_string();
        assert!(e.contains("m/preprocessor_config.json") && e.contains("`size`") && e.contains("12-pixel"), "{e}");
        let e = ImageProcessor::clip(100).check_for_vit(path, 32).unwrap_err().to_string();
        assert!(e.contains("`crop_size`"), "{e}");
        let varying = ImageProcessor { center_crop: None, ..ImageProcessor::clip(224) };
        let e = varying.check_for_vit(path, 32).unwrap_err().to_string();
        assert!(e.contains("depends on each image"), "{e}");
    }

    #[test]
    fn hf_processor_json_is_parsed_and_checked() {
        let v = serde_json::json!({"do_resize": true, "size": {"height": 384, "width": 384}, "resample": 3,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "image_processor_type": "BlipImageProcessor"});
        let p = ImageProcessor::from_hf_value(&v).unwrap();
        assert_eq!(p.resize, Some(Resize::Exact { height: 384, width: 384 }));
        assert_eq!(p.mean, [0.5; 3]);
        let bad = serde_json::json!({"size": {"height": 384, "width": 384}, "image_mean": [0.5, 0.5]});
        assert!(ImageProcessor::from_hf_value(&bad).unwrap_err().contains("image_mean"));
        let bad = serde_json::json!({"size": {"height": 384, "width": 384}, "resample": 2});
        assert!(ImageProcessor::from_hf_value(&bad).is_err());
    }
}

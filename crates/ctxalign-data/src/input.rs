//! One image as a program has it — a file, encoded bytes, a decoded image, or pixels already
//! processed — turned into a model's input batch by [`ImageProcessor::load_inputs`].
//!
//! Every scorer, encoder and predictor of ctxalign takes images as
//! `impl IntoIterator<Item = impl Into<ImageInput>>`, so a slice of paths, of byte buffers, of
//! `image::DynamicImage`s or of a mix (built with [`ImageInput`]'s variants) all work alike:
//!
//! ```
//! use ctxalign_data::{ImageInput, ImageProcessor, DecodeOptions};
//! use candle_core::Device;
//!
//! let processor = ImageProcessor::blip(32);
//! let photo = image::RgbImage::from_pixel(40, 30, image::Rgb([200, 30, 30]));
//! let mut png = Vec::new();
//! photo.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
//! let inputs = [ImageInput::from(&photo), ImageInput::from(png.as_slice())];
//! let (pixels, warnings) = processor.load_inputs(&inputs, DecodeOptions::default(), &Device::Cpu).unwrap();
//! assert_eq!(pixels.dims(), &[2, 3, 32, 32]);
//! assert!(warnings.is_empty());
//! // The PNG's bytes decode to the same pixels as the image they were written from.
//! let diff = (pixels.get(0).unwrap() - pixels.get(1).unwrap()).unwrap().abs().unwrap();
//! assert_eq!(diff.max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
//! ```

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::{DynamicImage, RgbImage};
use rayon::prelude::*;

use crate::image::{
    decode_image_bytes_reporting, decode_image_reporting, pillow_rgb, DecodeOptions, Decoded, ImageError,
    ImageProcessor,
};

/// One image, borrowed from the caller.
#[derive(Debug, Clone, Copy)]
pub enum ImageInput<'a> {
    /// An image file, read and decoded here.
    Path(&'a Path),
    /// An encoded image (JPEG, PNG, WebP, GIF, BMP, TIFF) in memory, decoded by the same decoders
    /// as a file: JPEG by the libjpeg-exact decoder, so the pixels are Pillow's.
    Bytes(&'a [u8]),
    /// An image decoded by the caller, converted to RGB as Pillow's `convert("RGB")` does (alpha
    /// dropped, grey replicated, 16-bit samples as Pillow makes them 8-bit). Its pixels are what
    /// the caller's decoder gave: a JPEG decoded by the `image` crate differs from Pillow's by a
    /// few levels, where [`ImageInput::Bytes`] of the same file would not.
    Image(&'a DynamicImage),
    /// 8-bit RGB pixels.
    Rgb(&'a RgbImage),
    /// Pixels already processed for the model, `[3, H, W]` (any float dtype, any device): used as
    /// they are.
    Pixels(&'a Tensor),
}

impl ImageInput<'_> {
    /// How errors and warnings name the `index`-th input of a batch: the file's path, else
    /// `<what #index>`.
    pub fn name(&self, index: usize) -> PathBuf {
        match self {
            Self::Path(p) => p.to_path_buf(),
            Self::Bytes(_) => PathBuf::from(format!("<image bytes #{index}>")),
            Self::Image(_) => PathBuf::from(format!("<image #{index}>")),
            Self::Rgb(_) => PathBuf::from(format!("<rgb image #{index}>")),
            Self::Pixels(_) => PathBuf::from(format!("<pixels #{index}>")),
        }
    }
}

impl<'a> From<&'a Path> for ImageInput<'a> {
    fn from(p: &'a Path) -> Self {
        Self::Path(p)
    }
}
impl<'a> From<&'a PathBuf> for ImageInput<'a> {
    fn from(p: &'a PathBuf) -> Self {
        Self::Path(p)
    }
}
/// A string is a file's path.
impl<'a> From<&'a str> for ImageInput<'a> {
    fn from(p: &'a str) -> Self {
        Self::Path(Path::new(p))
    }
}
impl<'a> From<&'a String> for ImageInput<'a> {
    fn from(p: &'a String) -> Self {
        Self::Path(Path::new(p))
    }
}
impl<'a, 'b> From<&'b &'a str> for ImageInput<'a> {
    fn from(p: &'b &'a str) -> Self {
        Self::Path(Path::new(*p))
    }
}
impl<'a, 'b> From<&'b &'a Path> for ImageInput<'a> {
    fn from(p: &'b &'a Path) -> Self {
        Self::Path(p)
    }
}
impl<'a> From<&'a [u8]> for ImageInput<'a> {
    fn from(b: &'a [u8]) -> Self {
        Self::Bytes(b)
    }
}
impl<'a> From<&'a Vec<u8>> for ImageInput<'a> {
    fn from(b: &'a Vec<u8>) -> Self {
        Self::Bytes(b)
    }
}
impl<'a> From<&'a DynamicImage> for ImageInput<'a> {
    fn from(i: &'a DynamicImage) -> Self {
        Self::Image(i)
    }
}
impl<'a> From<&'a RgbImage> for ImageInput<'a> {
    fn from(i: &'a RgbImage) -> Self {
        Self::Rgb(i)
    }
}
impl<'a> From<&'a Tensor> for ImageInput<'a> {
    fn from(t: &'a Tensor) -> Self {
        Self::Pixels(t)
    }
}
impl<'a, 'b> From<&'b ImageInput<'a>> for ImageInput<'a> {
    fn from(i: &'b ImageInput<'a>) -> Self {
        *i
    }
}

/// Collects any iterable of inputs (`&[PathBuf]`, `&[Vec<u8>]`, `[&DynamicImage; 3]`, …).
pub fn image_inputs<'a, I>(images: I) -> Vec<ImageInput<'a>>
where
    I: IntoIterator,
    I::Item: Into<ImageInput<'a>>,
{
    images.into_iter().map(Into::into).collect()
}

impl ImageProcessor {
    /// Decodes (where needed) and processes `inputs` in parallel → `[N, 3, H, W]` f32 on `device`,
    /// with the decoder's warnings, each `"<name>: <warning>"`. All outputs must share one size
    /// (true whenever the processor resizes to a fixed size or crops; [`ImageInput::Pixels`] must
    /// have it too).
    pub fn load_inputs(
        &self,
        inputs: &[ImageInput<'_>],
        options: DecodeOptions,
        device: &Device,
    ) -> Result<(Tensor, Vec<String>), ImageError> {
        self.load_input_batch(inputs, 0, options, device)
    }

    /// As [`ImageProcessor::load_inputs`] for one batch of a longer list that starts at input
    /// `start`: errors and warnings name inputs without a path by their index in the whole list
    /// (`<image bytes #start + i>`), so a caller that batches still points at the right one.
    pub fn load_input_batch(
        &self,
        inputs: &[ImageInput<'_>],
        start: usize,
        options: DecodeOptions,
        device: &Device,
    ) -> Result<(Tensor, Vec<String>), ImageError> {
        enum Processed {
            Values { size: (usize, usize), values: Vec<f32> },
            Pixels(Tensor),
        }
        let processed = inputs
            .par_iter()
            .enumerate()
            .map(|(i, input)| {
                let name = input.name(start + i);
                let (image, warnings) = match *input {
                    ImageInput::Path(p) => split(decode_image_reporting(p, options)?),
                    ImageInput::Bytes(b) => split(decode_image_bytes_reporting(b, &name, options)?),
                    ImageInput::Image(img) => (pillow_rgb(img.clone()), vec![]),
                    ImageInput::Rgb(img) => (img.clone(), vec![]),
                    ImageInput::Pixels(t) => {
                        if t.rank() != 3 || t.dim(0)? != 3 {
                            return Err(ImageError::Config {
                                path: name,
                                message: format!("processed pixels must be [3, H, W], got {:?}", t.dims()),
                            });
                        }
                        return Ok((Processed::Pixels(t.to_dtype(DType::F32)?), vec![]));
                    }
                };
                let warnings = warnings.into_iter().map(|w| format!("{}: {w}", name.display())).collect::<Vec<_>>();
                let (h, w) = self.output_size(image.width(), image.height());
                Ok((Processed::Values { size: (h as usize, w as usize), values: self.process(&image) }, warnings))
            })
            .collect::<Result<Vec<_>, ImageError>>()?;
        let size = |p: &Processed| match p {
            Processed::Values { size, .. } => *size,
            Processed::Pixels(t) => (t.dim(1).unwrap_or(0), t.dim(2).unwrap_or(0)),
        };
        let Some(first) = processed.first().map(|(p, _)| size(p)) else {
            return Ok((Tensor::zeros((0, 3, 0, 0), DType::F32, device)?, vec![]));
        };
        let mut warnings = vec![];
        let mut rows = Vec::with_capacity(processed.len());
        for (i, (p, w)) in processed.into_iter().enumerate() {
            if size(&p) != first {
                return Err(ImageError::Config {
                    path: inputs[i].name(start + i),
                    message: format!(
                        "processed to {:?}, the first image to {first:?}: use a fixed-size processor",
                        size(&p)
                    ),
                });
            }
            warnings.extend(w);
            rows.push(match p {
                Processed::Values { values, .. } => Tensor::from_vec(values, (3, first.0, first.1), device)?,
                Processed::Pixels(t) => t.to_device(device)?,
            });
        }
        Ok((Tensor::stack(&rows, 0)?, warnings))
    }
}

fn split(decoded: Decoded) -> (RgbImage, Vec<String>) {
    (decoded.image, decoded.warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(image: &RgbImage) -> Vec<u8> {
        let mut out = Vec::new();
        image.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
        out
    }

    #[test]
    fn every_kind_of_input_gives_the_same_pixels() {
        let dir = tempfile::tempdir().unwrap();
        let image = RgbImage::from_fn(37, 23, |x, y| image::Rgb([(x * 7) as u8, (y * 11) as u8, ((x + y) * 3) as u8]));
        let bytes = png(&image);
        let path = dir.path().join("a.png");
        std::fs::write(&path, &bytes).unwrap();
        let dynamic = DynamicImage::ImageRgba8(DynamicImage::ImageRgb8(image.clone()).to_rgba8());
        let processor = ImageProcessor::blip(16);
        let options = DecodeOptions::default();
        let reference = processor.load_batch(&[&path], options, &Device::Cpu).unwrap();
        let pixels = reference.get(0).unwrap();
        let inputs = [
            ImageInput::from(&path),
            ImageInput::from(&bytes),
            ImageInput::from(&dynamic),
            ImageInput::from(&image),
            ImageInput::from(&pixels),
        ];
        let (batch, warnings) = processor.load_inputs(&inputs, options, &Device::Cpu).unwrap();
        assert!(warnings.is_empty());
        assert_eq!(batch.dims(), &[5, 3, 16, 16]);
        for i in 0..5 {
            let diff = (batch.get(i).unwrap() - &pixels).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "input {i}");
        }
    }

    /// A batch that starts at input 5 names its bad input by its place in the whole list.
    #[test]
    fn batches_name_inputs_by_their_place_in_the_list() {
        let processor = ImageProcessor::blip(16);
        let junk: &[u8] = b"not an image";
        let good = RgbImage::new(20, 20);
        let inputs = [ImageInput::from(&good), ImageInput::from(junk)];
        let err = processor.load_input_batch(&inputs, 5, DecodeOptions::default(), &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("<image bytes #6>"), "{err}");
    }

    #[test]
    fn bad_inputs_are_named() {
        let processor = ImageProcessor::blip(16);
        let junk: &[u8] = b"not an image";
        let err = processor.load_inputs(&[ImageInput::from(junk)], DecodeOptions::default(), &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("<image bytes #0>"), "{err}");
        let flat = Tensor::zeros((16, 16), DType::F32, &Device::Cpu).unwrap();
        let err =
            processor.load_inputs(&[ImageInput::from(&flat)], DecodeOptions::default(), &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("[3, H, W]"), "{err}");
        let small = Tensor::zeros((3, 8, 8), DType::F32, &Device::Cpu).unwrap();
        let image = RgbImage::new(20, 20);
        let err = processor
            .load_inputs(&[ImageInput::from(&image), ImageInput::from(&small)], DecodeOptions::default(), &Device::Cpu)
            .unwrap_err();
        assert!(err.to_string().contains("<pixels #1>"), "{err}");
        let from_paths = image_inputs(&["a.jpg", "b.jpg"]);
        assert!(matches!(from_paths[1], ImageInput::Path(p) if p == Path::new("b.jpg")));
    }
}

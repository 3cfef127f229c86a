//! Data for ctxalign: image decoding and preprocessing equal to HF's image processors, and BLIP's
//! caption cleaning and tokenization with truncation accounting.

pub mod image;
pub mod text;

pub use image::{decode_image, decode_image_bytes, DecodeOptions, ImageError, ImageProcessor, Resize};
pub use text::{clean_caption, CaptionCleaning, TextError, TextTokenizer, TokenizedBatch};

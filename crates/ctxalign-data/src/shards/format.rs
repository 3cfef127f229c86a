//! How a sample becomes training items: [`CaptionShards`] (one [`CaptionSample`] per captioned
//! image) and [`ImageCodeShards`] (one [`DescriptionSample`] per description of a set).

use std::path::Path;

use super::sample::WdsSample;
use crate::error::DataError;
use crate::image::{check_image_bytes, decode_image_bytes, DecodeOptions, ImageProcessor};
use crate::imagecode::SetKind;
use crate::loader::{prepare_image, Augment, CaptionSample, DescriptionSample};
use crate::rng::Rng;

/// One interpretation of WebDataset samples: what the scan checks and how the loader turns a
/// sample into training items. A sample yields one item or more (an IMAGECODE set one per
/// description); items are what batches count.
pub trait ShardFormat: Send + Sync + 'static {
    /// What the loader yields.
    type Item: Send + 'static;
    /// The interpretation's name, recorded by the scan so that an index is not used with another.
    const KIND: &'static str;

    /// The number of items `sample` yields, or what is wrong with its structure (a missing file,
    /// malformed JSON). Cheap: no image is looked at.
    fn items(&self, sample: &WdsSample) -> Result<usize, String>;

    /// [`ShardFormat::items`] and, in addition, every image header checked
    /// ([`check_image_bytes`]): what the scan before training runs on every sample. `shard` names
    /// the shard in errors.
    fn check(&self, shard: &Path, sample: &WdsSample) -> Result<usize, DataError>;

    /// Decodes and preprocesses item `item` of `sample`. `number` is the item's global sample
    /// number (its key in the batch) and `rng` its own random stream (seeded by run seed, epoch and
    /// number).
    fn load(
        &self,
        shard: &Path,
        sample: &WdsSample,
        item: usize,
        number: usize,
        rng: &mut Rng,
    ) -> Result<Self::Item, DataError>;
}

fn sample_error(shard: &Path, sample: &WdsSample, message: String) -> DataError {
    DataError::Sample { path: shard.to_owned(), key: sample.key.clone(), message }
}

/// The name an image of a sample goes by in errors: its tar member, `<key>.<ext>`.
fn member(sample: &WdsSample, ext: &str) -> std::path::PathBuf {
    format!("{}.{ext}", sample.key).into()
}

fn image_error(shard: &Path, sample: &WdsSample, source: crate::image::ImageError) -> DataError {
    DataError::SampleImage { path: shard.to_owned(), key: sample.key.clone(), source: Box::new(source) }
}

/// Captioned images ([`WdsSample::captioned`]), loaded as the caption loader does: the image
/// decoded (the exact JPEG decoder), augmented with the item's own stream, processed; the caption
/// drawn per epoch from the sample's captions with that stream when augmenting, the first
/// otherwise; `image_index` = the sample number.
#[derive(Debug, Clone)]
pub struct CaptionShards {
    /// Resize, crop and normalisation for the model.
    pub processor: ImageProcessor,
    /// Training augmentation (`None` for evaluation, and the first caption is always taken).
    pub augment: Option<Augment>,
    /// Limits applied while decoding (the scan checks image headers against them too).
    pub decode: DecodeOptions,
    /// The tokenizer the captions will be trained with: the scan then cleans and tokenizes every
    /// caption too ([`crate::TextTokenizer::check_text`]).
    pub text: Option<crate::TextTokenizer>,
}

impl ShardFormat for CaptionShards {
    type Item = CaptionSample;
    const KIND: &'static str = "captioned images";

    fn items(&self, sample: &WdsSample) -> Result<usize, String> {
        sample.captioned().map(|_| 1)
    }

    fn check(&self, shard: &Path, sample: &WdsSample) -> Result<usize, DataError> {
        let c = sample.captioned().map_err(|m| sample_error(shard, sample, m))?;
        // A bad caption makes a bad sample (left out under Skip), not a damaged shard.
        crate::loader::check_texts(self.text.as_ref(), &c.captions)
            .map_err(|(i, e)| sample_error(shard, sample, format!("caption {i}: {e}")))?;
        check_image_bytes(c.image, &member(sample, c.image_ext), self.decode)
            .map_err(|e| image_error(shard, sample, e))?;
        Ok(1)
    }

    fn load(
        &self,
        shard: &Path,
        sample: &WdsSample,
        _item: usize,
        number: usize,
        rng: &mut Rng,
    ) -> Result<CaptionSample, DataError> {
        let c = sample.captioned().map_err(|m| sample_error(shard, sample, m))?;
        let image = decode_image_bytes(c.image, &member(sample, c.image_ext), self.decode)
            .map_err(|e| image_error(shard, sample, e))?;
        let pixels = prepare_image(&image, &self.processor, self.augment.as_ref(), rng);
        let caption = match self.augment {
            Some(_) => rng.pick(&c.captions).clone(),
            None => c.captions[0].clone(),
        };
        Ok(CaptionSample { pixels, caption, image_index: number })
    }
}

/// IMAGECODE sets ([`WdsSample::imagecode`]), one item per description: its set's ten candidates
/// decoded and processed in index order (no augmentation: the differences between candidates are
/// the signal); `video` from the set's name ([`SetKind::of`]); `example` = the sample number.
#[derive(Debug, Clone)]
pub struct ImageCodeShards {
    /// Resize, crop and normalisation for the model.
    pub processor: ImageProcessor,
    /// Limits applied while decoding (the scan checks image headers against them too).
    pub decode: DecodeOptions,
    /// The tokenizer the descriptions will be trained with: the scan then cleans and tokenizes
    /// every description too.
    pub text: Option<crate::TextTokenizer>,
}

impl ShardFormat for ImageCodeShards {
    type Item = DescriptionSample;
    const KIND: &'static str = "IMAGECODE sets";

    fn items(&self, sample: &WdsSample) -> Result<usize, String> {
        sample.imagecode().map(|s| s.descriptions.len())
    }

    fn check(&self, shard: &Path, sample: &WdsSample) -> Result<usize, DataError> {
        let set = sample.imagecode().map_err(|m| sample_error(shard, sample, m))?;
        let descriptions: Vec<String> = set.descriptions.iter().map(|(_, d)| d.clone()).collect();
        crate::loader::check_texts(self.text.as_ref(), &descriptions)
            .map_err(|(i, e)| sample_error(shard, sample, format!("description {i}: {e}")))?;
        for (ext, bytes) in &set.images {
            check_image_bytes(bytes, &member(sample, ext), self.decode).map_err(|e| image_error(shard, sample, e))?;
        }
        Ok(set.descriptions.len())
    }

    fn load(
        &self,
        shard: &Path,
        sample: &WdsSample,
        item: usize,
        number: usize,
        _rng: &mut Rng,
    ) -> Result<DescriptionSample, DataError> {
        let set = sample.imagecode().map_err(|m| sample_error(shard, sample, m))?;
        let Some((target, description)) = set.descriptions.get(item).cloned() else {
            let message = format!("no description {item} (the set has {})", set.descriptions.len());
            return Err(sample_error(shard, sample, message));
        };
        let mut pixels = Vec::new();
        for (ext, bytes) in &set.images {
            let image = decode_image_bytes(bytes, &member(sample, ext), self.decode)
                .map_err(|e| image_error(shard, sample, e))?;
            pixels.extend(self.processor.process(&image));
        }
        Ok(DescriptionSample {
            pixels,
            candidates: set.images.len(),
            description,
            target,
            video: set.kind == SetKind::Video,
            example: number,
        })
    }
}

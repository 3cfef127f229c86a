//! Batches for training and evaluation: parallel decode and preprocessing (rayon), a bounded
//! prefetch queue on a producer thread, deterministic shuffling and augmentation from a seed, and a
//! bad-input policy that never drops a sample silently.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor};
use image::RgbImage;
use rayon::prelude::*;

use crate::captions::CaptionedImage;
use crate::classification::{ClassificationSet, ImageSource};
use crate::error::DataError;
use crate::image::{check_image, decode_image, DecodeOptions, ImageProcessor};
use crate::rng::Rng;
use crate::text::{TextError, TextTokenizer};

/// What to do with a sample that cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BadInputPolicy {
    /// Stop at the first bad sample with its error.
    #[default]
    Fail,
    /// Leave it out of its batch, record it, and report the count at the end.
    Skip,
}

/// Training augmentation (off for evaluation).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Augment {
    /// RandomResizedCrop area fraction range, e.g. (0.2, 1.0) as BLIP pre-training; aspect ratios
    /// 3/4..4/3 as torchvision.
    pub crop_scale: Option<(f64, f64)>,
    /// Horizontal flip with p = 0.5. Off by default: it makes "left"/"right" in texts false.
    pub hflip: bool,
}

impl Default for Augment {
    fn default() -> Self {
        Self { crop_scale: Some((0.5, 1.0)), hflip: false }
    }
}

/// A dataset the loader can draw from.
pub trait Dataset: Send + Sync + 'static {
    type Item: Send + 'static;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Loads sample `index`; `rng` is the sample's own stream (seeded by run seed, epoch, index).
    fn load(&self, index: usize, rng: &mut Rng) -> Result<Self::Item, DataError>;
    /// Checks, without the cost of [`Dataset::load`], everything sample `index` will need (its files
    /// exist, its image headers are sound, its IMAGECODE set is complete), so that
    /// [`DataLoader::preflight`] finds bad data before the first step instead of at the step that
    /// first draws it. Samples held in memory have nothing to check.
    fn check(&self, index: usize) -> Result<(), DataError>;
    /// The group of near-identical samples sample `index` belongs to, if any. A shuffled epoch
    /// keeps each group's samples next to each other (in index order) and shuffles the groups, so
    /// that a batch holds whole groups — each other's hard negatives — except where a batch
    /// boundary cuts one. Samples in no group are groups of one.
    fn group(&self, _index: usize) -> Option<&str> {
        None
    }
}

#[derive(Debug, Clone)]
pub struct LoaderConfig {
    /// Samples per batch (per rank in a data-parallel run).
    pub batch_size: usize,
    pub shuffle: bool,
    pub seed: u64,
    /// Batches prepared ahead of the consumer.
    pub prefetch: usize,
    pub drop_last: bool,
    pub policy: BadInputPolicy,
    /// The share of each epoch this loader serves in a data-parallel run.
    pub shard: Shard,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self {
            batch_size: 32,
            shuffle: true,
            seed: 0,
            prefetch: 2,
            drop_last: false,
            policy: BadInputPolicy::Fail,
            shard: Shard::default(),
        }
    }
}

/// One rank's share of every epoch in a data-parallel run: torch's `DistributedSampler`. Every rank
/// shuffles the usable samples with the same seed and epoch; rank r takes the samples at positions
/// r, r + W, r + 2W, … of that order.
///
/// **The uneven tail.** Every rank must see the same number of equal batches. With `drop_last`
/// (whole batches, as every training recipe uses) the order is cut to a multiple of W × batch
/// size: batch j of every rank then holds exactly the samples of batch j of one process with batch
/// W × b — the same global batches, so W ranks train as one process with the global batch does.
/// Without it, the order is cut to a multiple of W (torch's `drop_last=True` sampler); each rank's
/// last batch may be partial, of the same size on every rank. The samples cut differ from epoch to
/// epoch, since the order is reshuffled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Shard {
    pub rank: usize,
    pub world_size: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Self { rank: 0, world_size: 1 }
    }
}

impl Shard {
    /// Rank `rank` of `world_size` (at least 1).
    pub fn new(rank: usize, world_size: usize) -> Self {
        assert!(rank < world_size.max(1), "rank {rank} of a world of {world_size}");
        Self { rank, world_size: world_size.max(1) }
    }

    /// This rank's samples of an epoch's `order`, cut to a multiple of `unit` × W first.
    fn take<T: Copy>(&self, order: &[T], unit: usize) -> Vec<T> {
        let whole = order.len() / (unit * self.world_size) * (unit * self.world_size);
        order[..whole].iter().skip(self.rank).step_by(self.world_size).copied().collect()
    }
}

/// What the training loop draws batches from: a [`DataLoader`] over an indexed [`Dataset`], or a
/// stream of WebDataset shards. The same number of batches per epoch on every rank of a
/// data-parallel run, deterministic given (seed, epoch, rank), and resumable at any batch.
pub trait BatchSource {
    type Item: Send + 'static;
    /// Batches per epoch of this rank (the same on every rank).
    fn batches_per_epoch(&self) -> usize;
    /// The batches of `epoch` from batch `start` on (for resuming mid-epoch); each batch's
    /// `indices` are its samples' keys (their index in the data set, or a sample number of the
    /// stream), from which the objectives key their random draws.
    fn epoch(&self, epoch: u64, start: usize) -> EpochIter<Self::Item>;
}

impl<D: Dataset> BatchSource for DataLoader<D> {
    type Item = D::Item;
    fn batches_per_epoch(&self) -> usize {
        DataLoader::batches_per_epoch(self)
    }
    fn epoch(&self, epoch: u64, start: usize) -> EpochIter<D::Item> {
        DataLoader::epoch(self, epoch, start)
    }
}

/// One batch: the dataset indices it holds and their items.
#[derive(Debug)]
pub struct Batch<T> {
    pub indices: Vec<usize>,
    pub items: Vec<T>,
}

/// A sample (or set, or pair) that was skipped under [`BadInputPolicy::Skip`]: its index and what
/// is wrong with it, starting with its name.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Skipped {
    pub index: usize,
    pub error: String,
}

pub struct DataLoader<D: Dataset> {
    pub dataset: Arc<D>,
    pub config: LoaderConfig,
    /// The dataset indices epochs draw from: all, less those [`DataLoader::preflight`] left out.
    usable: Vec<usize>,
    /// Per sample, the number of its group ([`Dataset::group`]; a sample in none has a number of
    /// its own); `None` when no sample names a group.
    groups: Option<Vec<usize>>,
}

impl<D: Dataset> DataLoader<D> {
    pub fn new(dataset: D, config: LoaderConfig) -> Self {
        let usable = (0..dataset.len()).collect();
        let groups = group_numbers(&dataset);
        Self { dataset: Arc::new(dataset), config, usable, groups }
    }

    /// Checks every sample ([`Dataset::check`], in parallel) before any is loaded. Under
    /// [`BadInputPolicy::Fail`] any bad sample is an error that counts them and names the first
    /// few; under [`BadInputPolicy::Skip`] they are left out of every epoch and returned, so the
    /// caller can report them (an error still when nothing usable is left).
    pub fn preflight(&mut self) -> Result<Vec<Skipped>, DataError> {
        let bad = self.check_share(Shard::default());
        self.apply_checks(bad)
    }

    /// The first half of [`DataLoader::preflight`], split over the ranks of a data-parallel run:
    /// checks the samples whose index is `shard.rank` modulo the world size (in parallel) and
    /// returns the bad ones. The ranks exchange their findings and each gives all of them to
    /// [`DataLoader::apply_checks`], so that every rank leaves out the same samples.
    pub fn check_share(&self, shard: Shard) -> Vec<Skipped> {
        let dataset = &self.dataset;
        let mine: Vec<usize> = (shard.rank..dataset.len()).step_by(shard.world_size.max(1)).collect();
        mine.par_iter()
            .filter_map(|&i| dataset.check(i).err().map(|e| Skipped { index: i, error: format!("sample {i}: {e}") }))
            .collect()
    }

    /// The second half of [`DataLoader::preflight`]: under [`BadInputPolicy::Fail`] any `bad` sample is
    /// an error; under [`BadInputPolicy::Skip`] they are left out of every epoch and returned (sorted
    /// by index), an error still when nothing usable is left.
    pub fn apply_checks(&mut self, mut bad: Vec<Skipped>) -> Result<Vec<Skipped>, DataError> {
        bad.sort_by_key(|s| s.index);
        bad.dedup_by_key(|s| s.index);
        let total = self.dataset.len();
        if !bad.is_empty() && (self.config.policy == BadInputPolicy::Fail || bad.len() == total) {
            return Err(unusable("samples", &bad, total));
        }
        let left_out: std::collections::HashSet<usize> = bad.iter().map(|s| s.index).collect();
        self.usable.retain(|i| !left_out.contains(i));
        Ok(bad)
    }

    /// The number of samples epochs draw from.
    pub fn len(&self) -> usize {
        self.usable.len()
    }

    pub fn is_empty(&self) -> bool {
        self.usable.is_empty()
    }

    /// The sample order of `epoch`: a permutation fixed by (seed, epoch), or the usable indices in
    /// order. With groups ([`Dataset::group`]) the permutation is of the groups, each group's
    /// usable samples kept together in index order.
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        if !self.config.shuffle {
            return self.usable.clone();
        }
        let mut rng = Rng::derive(self.config.seed, epoch, u64::MAX);
        match &self.groups {
            None => {
                let mut order = self.usable.clone();
                rng.shuffle(&mut order);
                order
            }
            Some(groups) => {
                let mut members: indexmap::IndexMap<usize, Vec<usize>> = indexmap::IndexMap::new();
                for &i in &self.usable {
                    members.entry(groups[i]).or_default().push(i);
                }
                let mut runs: Vec<Vec<usize>> = members.into_values().collect();
                rng.shuffle(&mut runs);
                runs.concat()
            }
        }
    }

    /// Batches per epoch of this loader's rank (the same on every rank).
    pub fn batches_per_epoch(&self) -> usize {
        let n = self.rank_samples_per_epoch();
        let b = self.config.batch_size.max(1);
        if self.config.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// Samples per epoch this rank loads ([`Shard`]: the uneven tail is cut).
    pub fn rank_samples_per_epoch(&self) -> usize {
        let shard = self.config.shard;
        let unit = self.shard_unit() * shard.world_size;
        self.usable.len() / unit * unit / shard.world_size
    }

    fn shard_unit(&self) -> usize {
        if self.config.drop_last {
            self.config.batch_size.max(1)
        } else {
            1
        }
    }

    /// This rank's samples of `epoch`, in order ([`Shard`]).
    pub fn rank_order(&self, epoch: u64) -> Vec<usize> {
        let order = self.order(epoch);
        match self.config.shard.world_size {
            1 => order,
            _ => self.config.shard.take(&order, self.shard_unit()),
        }
    }

    /// Iterates the batches of `epoch` starting at batch `start` (for resuming mid-epoch).
    pub fn epoch(&self, epoch: u64, start: usize) -> EpochIter<D::Item> {
        let order = self.rank_order(epoch);
        let b = self.config.batch_size.max(1);
        let mut chunks: Vec<Vec<usize>> = order.chunks(b).map(|c| c.to_vec()).collect();
        if self.config.drop_last && chunks.last().is_some_and(|c| c.len() < b) {
            chunks.pop();
        }
        let chunks: Vec<Vec<usize>> = chunks.into_iter().skip(start).collect();
        let (tx, rx) = sync_channel(self.config.prefetch.max(1));
        let skipped = Arc::new(Mutex::new(Vec::new()));
        let (dataset, seed, policy, sk) = (self.dataset.clone(), self.config.seed, self.config.policy, skipped.clone());
        std::thread::spawn(move || {
            for indices in chunks {
                let loaded: Vec<(usize, Result<D::Item, DataError>)> = indices
                    .par_iter()
                    .map(|&i| (i, dataset.load(i, &mut Rng::derive(seed, epoch, i as u64))))
                    .collect();
                let mut batch = Batch { indices: vec![], items: vec![] };
                let mut failure = None;
                for (i, r) in loaded {
                    match r {
                        Ok(item) => {
                            batch.indices.push(i);
                            batch.items.push(item);
                        }
                        Err(e) if policy == BadInputPolicy::Skip => {
                            sk.lock().expect("not poisoned").push(Skipped { index: i, error: e.to_string() })
                        }
                        Err(e) => {
                            failure = Some(e);
                            break;
                        }
                    }
                }
                let stop = failure.is_some();
                let msg = match failure {
                    Some(e) => Err(e),
                    None => Ok(batch),
                };
                if tx.send(msg).is_err() || stop {
                    return;
                }
            }
        });
        EpochIter { rx, skipped }
    }
}

/// Numbers the groups of `dataset`'s samples in order of first appearance ([`Dataset::group`]); a
/// sample in no group gets a number of its own. `None` when no sample names a group.
fn group_numbers<D: Dataset>(dataset: &D) -> Option<Vec<usize>> {
    let n = dataset.len();
    (0..n).any(|i| dataset.group(i).is_some()).then(|| {
        let mut numbers: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        (0..n)
            .map(|i| match dataset.group(i) {
                Some(name) => {
                    let next = numbers.len();
                    *numbers.entry(name).or_insert(next)
                }
                // Groups are numbered below n: n + i is no group's.
                None => n + i,
            })
            .collect()
    })
}

/// Checks every item (in parallel) before any is used, and applies `policy`: under
/// [`BadInputPolicy::Fail`] any bad item is a [`DataError::Unusable`] that counts them and names the
/// first few (by `name`, e.g. "sample 12" or "set x"); under [`BadInputPolicy::Skip`] the bad
/// items' indices and errors come back for the caller to leave out and report (an error still when
/// none is usable). `what` names the items in the plural.
pub fn find_unusable<T: Sync>(
    items: &[T],
    what: &'static str,
    policy: BadInputPolicy,
    name: impl Fn(&T) -> String + Sync,
    check: impl Fn(&T) -> Result<(), DataError> + Sync,
) -> Result<Vec<Skipped>, DataError> {
    let bad: Vec<Skipped> = items
        .par_iter()
        .enumerate()
        .filter_map(|(index, item)| check(item).err().map(|e| Skipped { index, error: format!("{}: {e}", name(item)) }))
        .collect();
    if !bad.is_empty() && (policy == BadInputPolicy::Fail || bad.len() == items.len()) {
        return Err(unusable(what, &bad, items.len()));
    }
    Ok(bad)
}

/// The error that counts `bad` of `total` items and names the first few.
pub(crate) fn unusable(what: &'static str, bad: &[Skipped], total: usize) -> DataError {
    const SHOWN: usize = 5;
    let mut first: Vec<String> = bad.iter().take(SHOWN).map(|s| format!("  {}", s.error)).collect();
    if bad.len() > SHOWN {
        first.push(format!("  … and {} more", bad.len() - SHOWN));
    }
    DataError::Unusable { what, bad: bad.len(), total, first: first.join("\n") }
}

/// `items` without those at the indices of `bad` (from [`find_unusable`]), in order.
pub fn without_unusable<T>(items: Vec<T>, bad: &[Skipped]) -> Vec<T> {
    let left_out: std::collections::HashSet<usize> = bad.iter().map(|s| s.index).collect();
    items.into_iter().enumerate().filter(|(i, _)| !left_out.contains(i)).map(|(_, item)| item).collect()
}

/// The batches of one epoch, produced ahead on a background thread.
pub struct EpochIter<T> {
    rx: Receiver<Result<Batch<T>, DataError>>,
    skipped: Arc<Mutex<Vec<Skipped>>>,
}

impl<T> EpochIter<T> {
    /// The iterator over what a producer sends on `rx`; `skipped` is filled by the producer.
    pub fn new(rx: Receiver<Result<Batch<T>, DataError>>, skipped: Arc<Mutex<Vec<Skipped>>>) -> Self {
        Self { rx, skipped }
    }

    /// Samples skipped so far (complete once the iterator is exhausted).
    pub fn skipped(&self) -> Vec<Skipped> {
        self.skipped.lock().expect("not poisoned").clone()
    }
}

impl<T> Iterator for EpochIter<T> {
    type Item = Result<Batch<T>, DataError>;
    fn next(&mut self) -> Option<Self::Item> {
        self.rx.recv().ok()
    }
}

/// torchvision's `RandomResizedCrop` box `(left, top, width, height)`: 10 tries at a random area
/// fraction in `scale` and aspect ratio in 3/4..4/3 (log-uniform), then a centred fallback.
pub fn random_resized_crop_box(width: u32, height: u32, scale: (f64, f64), rng: &mut Rng) -> (u32, u32, u32, u32) {
    let area = (width * height) as f64;
    let (lr0, lr1) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
    for _ in 0..10 {
        let target = area * rng.range_f64(scale.0, scale.1);
        let aspect = rng.range_f64(lr0, lr1).exp();
        let w = (target * aspect).sqrt().round() as u32;
        let h = (target / aspect).sqrt().round() as u32;
        if w > 0 && h > 0 && w <= width && h <= height {
            let top = rng.below((height - h + 1) as usize) as u32;
            let left = rng.below((width - w + 1) as usize) as u32;
            return (left, top, w, h);
        }
    }
    let ratio = width as f64 / height as f64;
    let (w, h) = if ratio < 3.0 / 4.0 {
        (width, ((width as f64) / (3.0 / 4.0)).round() as u32)
    } else if ratio > 4.0 / 3.0 {
        (((height as f64) * (4.0 / 3.0)).round() as u32, height)
    } else {
        (width, height)
    };
    let (w, h) = (w.min(width), h.min(height));
    ((width - w) / 2, (height - h) / 2, w, h)
}

/// Applies `augment` then the processor: `[3, H, W]` values.
pub fn prepare_image(
    image: &RgbImage,
    processor: &ImageProcessor,
    augment: Option<&Augment>,
    rng: &mut Rng,
) -> Vec<f32> {
    let mut img = std::borrow::Cow::Borrowed(image);
    if let Some(a) = augment {
        if let Some(scale) = a.crop_scale {
            let (x, y, w, h) = random_resized_crop_box(img.width(), img.height(), scale, rng);
            img = std::borrow::Cow::Owned(image::imageops::crop_imm(img.as_ref(), x, y, w, h).to_image());
        }
        if a.hflip && rng.bool(0.5) {
            img = std::borrow::Cow::Owned(image::imageops::flip_horizontal(img.as_ref()));
        }
    }
    processor.process(&img)
}

/// A processed image and its label.
#[derive(Debug, Clone)]
pub struct LabeledImage {
    pub pixels: Vec<f32>,
    pub label: usize,
}

/// A processed image and one of its captions (drawn at random per epoch when augmenting, the first
/// otherwise).
#[derive(Debug, Clone)]
pub struct CaptionSample {
    pub pixels: Vec<f32>,
    pub caption: String,
    /// Index of the image in the caption list (to mask other captions of the same image).
    pub image_index: usize,
}

/// Images with labels, processed for a model.
pub struct ClassificationDataset {
    pub set: ClassificationSet,
    pub processor: ImageProcessor,
    pub augment: Option<Augment>,
    pub decode: DecodeOptions,
}

impl Dataset for ClassificationDataset {
    type Item = LabeledImage;
    fn len(&self) -> usize {
        self.set.items.len()
    }
    fn load(&self, index: usize, rng: &mut Rng) -> Result<LabeledImage, DataError> {
        let item = &self.set.items[index];
        let pixels = match &item.source {
            ImageSource::File(p) => {
                prepare_image(&decode_image(p, self.decode)?, &self.processor, self.augment.as_ref(), rng)
            }
            ImageSource::Pixels(img) => prepare_image(img, &self.processor, self.augment.as_ref(), rng),
        };
        Ok(LabeledImage { pixels, label: item.label })
    }
    fn check(&self, index: usize) -> Result<(), DataError> {
        self.set.items[index].check(self.decode)
    }
}

/// Captioned images, processed for a model.
pub struct CaptionDataset {
    pub items: Vec<CaptionedImage>,
    pub processor: ImageProcessor,
    pub augment: Option<Augment>,
    pub decode: DecodeOptions,
    /// The tokenizer (with its cleaning) the captions will be trained with: the check then cleans
    /// and tokenizes every caption of an item ([`TextTokenizer::check_text`]) besides its image.
    pub text: Option<TextTokenizer>,
}

/// Checks every text of `texts` with `text` (when given); the error is the first bad text's index
/// and what is wrong with it.
pub(crate) fn check_texts(text: Option<&TextTokenizer>, texts: &[String]) -> Result<(), (usize, TextError)> {
    let Some(tokenizer) = text else { return Ok(()) };
    for (i, t) in texts.iter().enumerate() {
        tokenizer.check_text(t).map_err(|e| (i, e))?;
    }
    Ok(())
}

impl Dataset for CaptionDataset {
    type Item = CaptionSample;
    fn len(&self) -> usize {
        self.items.len()
    }
    fn load(&self, index: usize, rng: &mut Rng) -> Result<CaptionSample, DataError> {
        let item = &self.items[index];
        let image = decode_image(&item.image, self.decode)?;
        let pixels = prepare_image(&image, &self.processor, self.augment.as_ref(), rng);
        let caption = if self.augment.is_some() { rng.pick(&item.captions).clone() } else { item.captions[0].clone() };
        Ok(CaptionSample { pixels, caption, image_index: index })
    }
    fn check(&self, index: usize) -> Result<(), DataError> {
        let item = &self.items[index];
        if item.captions.is_empty() {
            return Err(DataError::format(&item.image, "the image has no caption"));
        }
        check_texts(self.text.as_ref(), &item.captions).map_err(|(i, source)| DataError::Text {
            what: format!("{}, caption {i}", item.image.display()),
            source: Box::new(source),
        })?;
        check_image(&item.image, self.decode)?;
        Ok(())
    }
    fn group(&self, index: usize) -> Option<&str> {
        self.items[index].group.as_deref()
    }
}

/// One IMAGECODE description with its set's candidate images.
#[derive(Debug, Clone)]
pub struct DescriptionSample {
    /// The candidates' processed pixels, `[candidates, 3, size, size]` flattened, in index order.
    pub pixels: Vec<f32>,
    pub candidates: usize,
    pub description: String,
    /// Index of the described image; `None` in an unlabeled split.
    pub target: Option<usize>,
    pub video: bool,
    /// Index of the description in its split (file order).
    pub example: usize,
}

/// The descriptions of an IMAGECODE split, each loading its set's images (no augmentation: the
/// differences between candidates are the signal). [`ImageCodeSplit::checked`] checks each set once,
/// where [`DataLoader::preflight`] would check a set once per description.
///
/// [`ImageCodeSplit::checked`]: crate::imagecode::ImageCodeSplit::checked
pub struct ImageCodeDataset {
    pub split: crate::imagecode::ImageCodeSplit,
    pub processor: ImageProcessor,
    pub decode: DecodeOptions,
    /// The tokenizer the descriptions will be trained or scored with: the check then cleans and
    /// tokenizes the description too ([`TextTokenizer::check_text`]).
    pub text: Option<TextTokenizer>,
}

impl Dataset for ImageCodeDataset {
    type Item = DescriptionSample;
    fn len(&self) -> usize {
        self.split.examples.len()
    }
    fn load(&self, index: usize, _rng: &mut Rng) -> Result<DescriptionSample, DataError> {
        let ex = &self.split.examples[index];
        let paths = self.split.set_images(&ex.set)?;
        let mut pixels = Vec::new();
        for p in &paths {
            pixels.extend(self.processor.process(&decode_image(p, self.decode)?));
        }
        Ok(DescriptionSample {
            pixels,
            candidates: paths.len(),
            description: ex.description.clone(),
            target: ex.target,
            video: ex.kind == crate::imagecode::SetKind::Video,
            example: index,
        })
    }
    fn check(&self, index: usize) -> Result<(), DataError> {
        let ex = &self.split.examples[index];
        if let Some(tokenizer) = &self.text {
            tokenizer.check_text(&ex.description).map_err(|source| DataError::Text {
                what: format!("{}: {}", self.split.source.display(), ex.at()),
                source: Box::new(source),
            })?;
        }
        for p in self.split.set_images(&ex.set)? {
            check_image(&p, self.decode)?;
        }
        Ok(())
    }
}

/// Stacks `[3, size, size]` pixel vectors into `[n, 3, size, size]`.
pub fn stack_pixels<'a>(
    pixels: impl IntoIterator<Item = &'a [f32]>,
    size: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let mut data = Vec::new();
    let mut n = 0;
    for p in pixels {
        if p.len() != 3 * size * size {
            candle_core::bail!("image of {} values, expected 3x{size}x{size}", p.len())
        }
        data.extend_from_slice(p);
        n += 1;
    }
    Tensor::from_vec(data, (n, 3, size, size), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Numbers(usize);
    impl Dataset for Numbers {
        type Item = (usize, u64);
        fn len(&self) -> usize {
            self.0
        }
        fn load(&self, index: usize, rng: &mut Rng) -> Result<(usize, u64), DataError> {
            if index == 13 {
                return Err(DataError::format(std::path::Path::new("item13"), "broken"));
            }
            Ok((index, rng.next_u64()))
        }
        fn check(&self, index: usize) -> Result<(), DataError> {
            self.load(index, &mut Rng::new(0)).map(drop)
        }
    }

    #[test]
    fn deterministic_order_prefetch_and_resume() {
        let cfg = LoaderConfig { batch_size: 4, seed: 7, policy: BadInputPolicy::Skip, ..Default::default() };
        let loader = DataLoader::new(Numbers(30), cfg);
        let run = |start| -> Vec<(usize, u64)> { loader.epoch(3, start).flat_map(|b| b.unwrap().items).collect() };
        let a = run(0);
        assert_eq!(a, run(0), "same seed and epoch, same batches and per-sample randomness");
        assert_eq!(a.len(), 29, "one bad sample skipped");
        let mut seen: Vec<usize> = a.iter().map(|x| x.0).collect();
        seen.sort();
        assert_eq!(seen, (0..30).filter(|&i| i != 13).collect::<Vec<_>>());
        assert_ne!(loader.order(3), loader.order(4), "epochs reshuffle");
        // Resuming at batch 2 yields exactly the rest of the epoch.
        let rest = run(2);
        let full_rest: Vec<_> = loader.epoch(3, 0).skip(2).flat_map(|b| b.unwrap().items).collect();
        assert_eq!(rest, full_rest);
        // The skip report names each left-out sample and its error.
        let mut it = loader.epoch(0, 0);
        assert_eq!(it.by_ref().count(), 8);
        let skipped = it.skipped();
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].index, 13);
        assert!(skipped[0].error.contains("item13"));
    }

    #[test]
    fn preflight_finds_bad_samples_before_any_batch() {
        // Fail: one error that counts the bad samples and names them.
        let mut strict = DataLoader::new(Numbers(30), LoaderConfig { batch_size: 4, ..Default::default() });
        let err = strict.preflight().unwrap_err();
        assert!(matches!(err, DataError::Unusable { bad: 1, total: 30, what: "samples", .. }), "{err}");
        assert!(err.to_string().contains("sample 13: item13: broken"), "{err}");
        // Skip: left out of every epoch, in every order, and reported.
        let cfg = LoaderConfig { batch_size: 4, seed: 3, policy: BadInputPolicy::Skip, ..Default::default() };
        let mut lenient = DataLoader::new(Numbers(30), cfg);
        let left_out = lenient.preflight().unwrap();
        assert_eq!(left_out.iter().map(|s| s.index).collect::<Vec<_>>(), [13]);
        assert_eq!((lenient.len(), lenient.batches_per_epoch()), (29, 8));
        for epoch in 0..3 {
            let mut order = lenient.order(epoch);
            assert!(!order.contains(&13));
            order.sort();
            assert_eq!(order, (0..30).filter(|&i| i != 13).collect::<Vec<_>>());
        }
        let mut it = lenient.epoch(0, 0);
        assert_eq!(it.by_ref().map(|b| b.unwrap().items.len()).sum::<usize>(), 29);
        assert!(it.skipped().is_empty(), "nothing left to skip while loading");
        // Nothing usable is an error under either policy.
        struct Broken;
        impl Dataset for Broken {
            type Item = ();
            fn len(&self) -> usize {
                2
            }
            fn load(&self, _: usize, _: &mut Rng) -> Result<(), DataError> {
                Ok(())
            }
            fn check(&self, i: usize) -> Result<(), DataError> {
                Err(DataError::format(std::path::Path::new(&format!("item{i}")), "gone"))
            }
        }
        let mut none = DataLoader::new(Broken, LoaderConfig { policy: BadInputPolicy::Skip, ..Default::default() });
        assert!(matches!(none.preflight(), Err(DataError::Unusable { bad: 2, total: 2, .. })));
    }

    /// Samples in groups of `sizes[g]` consecutive indices, named "g{g}"; `loose` samples after
    /// them in no group.
    struct Grouped {
        names: Vec<Option<String>>,
    }
    impl Grouped {
        fn new(sizes: &[usize], loose: usize) -> Self {
            let mut names: Vec<Option<String>> =
                sizes.iter().enumerate().flat_map(|(g, &n)| std::iter::repeat_n(Some(format!("g{g}")), n)).collect();
            names.extend(std::iter::repeat_n(None, loose));
            Self { names }
        }
    }
    impl Dataset for Grouped {
        type Item = usize;
        fn len(&self) -> usize {
            self.names.len()
        }
        fn load(&self, index: usize, _: &mut Rng) -> Result<usize, DataError> {
            Ok(index)
        }
        fn check(&self, index: usize) -> Result<(), DataError> {
            match index {
                4 => Err(DataError::format(std::path::Path::new("item4"), "broken")),
                _ => Ok(()),
            }
        }
        fn group(&self, index: usize) -> Option<&str> {
            self.names[index].as_deref()
        }
    }

    #[test]
    fn groups_stay_together_and_only_the_groups_are_shuffled() {
        let sizes = [3, 5, 2, 4];
        let cfg = LoaderConfig { batch_size: 4, seed: 11, policy: BadInputPolicy::Skip, ..Default::default() };
        let mut loader = DataLoader::new(Grouped::new(&sizes, 6), cfg);
        loader.preflight().unwrap();
        let group_of = |i: usize| loader.dataset.names[i].clone().unwrap_or_else(|| format!("loose{i}"));
        let mut orders = std::collections::HashSet::new();
        for epoch in 0..8 {
            let order = loader.order(epoch);
            let mut sorted = order.clone();
            sorted.sort();
            assert_eq!(sorted, (0..20).filter(|&i| i != 4).collect::<Vec<_>>(), "a permutation of the usable");
            // Each group is one run of consecutive positions, its members in index order.
            let mut runs: Vec<(String, Vec<usize>)> = vec![];
            for &i in &order {
                match runs.last_mut() {
                    Some((g, members)) if *g == group_of(i) => members.push(i),
                    _ => runs.push((group_of(i), vec![i])),
                }
            }
            let names: std::collections::HashSet<&String> = runs.iter().map(|r| &r.0).collect();
            assert_eq!(names.len(), runs.len(), "epoch {epoch}: a group split in {order:?}");
            for (_, members) in &runs {
                assert!(members.windows(2).all(|w| w[0] < w[1]), "{members:?}");
            }
            assert_eq!(runs.len(), sizes.len() + 6);
            orders.insert(order);
        }
        assert!(orders.len() > 4, "epochs shuffle the groups");
        // Unshuffled: index order, as without groups.
        let plain = DataLoader::new(Grouped::new(&sizes, 6), LoaderConfig { shuffle: false, ..Default::default() });
        assert_eq!(plain.order(0), (0..20).collect::<Vec<_>>());
        // Without groups the order is the plain permutation (runs recorded before groups existed
        // keep their batches).
        let mut ungrouped = DataLoader::new(Numbers(20), LoaderConfig { seed: 11, ..Default::default() });
        let mut expected: Vec<usize> = (0..20).collect();
        Rng::derive(11, 2, u64::MAX).shuffle(&mut expected);
        assert_eq!(ungrouped.order(2), expected);
        ungrouped.config.shuffle = false;
        assert_eq!(ungrouped.order(2), (0..20).collect::<Vec<_>>());
    }

    #[test]
    fn fail_policy_stops_with_the_error() {
        let loader = DataLoader::new(Numbers(30), LoaderConfig { batch_size: 5, shuffle: false, ..Default::default() });
        let results: Vec<_> = loader.epoch(0, 0).collect();
        assert_eq!(results.len(), 3, "batches 0, 1 then the failing batch 2");
        assert!(results[2].as_ref().unwrap_err().to_string().contains("item13"));
    }

    #[test]
    fn crop_boxes_stay_inside_and_respect_scale() {
        let mut rng = Rng::new(1);
        for _ in 0..500 {
            let (x, y, w, h) = random_resized_crop_box(97, 61, (0.2, 1.0), &mut rng);
            assert!(x + w <= 97 && y + h <= 61 && w > 0 && h > 0);
        }
        // Impossible aspect: falls back to a centred crop.
        let (x, y, w, h) = random_resized_crop_box(200, 10, (0.99, 1.0), &mut rng);
        assert!(x + w <= 200 && y + h <= 10 && w == 13 && h == 10, "{x} {y} {w} {h}");
    }
}

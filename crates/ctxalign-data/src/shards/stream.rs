//! [`ShardLoader`]: batches streamed from scanned shards (the semantics are in the module docs of
//! [`super`]).

use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use rayon::prelude::*;

use super::format::ShardFormat;
use super::index::{mtime, ShardIndex};
use super::names::expand_shards;
use super::sample::{SampleReader, WdsSample};
use crate::error::DataError;
use crate::loader::{BadInputPolicy, Batch, BatchSource, EpochIter, Shard, Skipped};
use crate::rng::Rng;

/// Items a reader thread may read ahead of the rank's stream.
const WORKER_QUEUE: usize = 64;

/// Keys that separate the random streams of one seed and epoch.
const SHARD_ORDER: u64 = 0x5348_4152_445f_4f52; // "SHARD_OR"
const SHUFFLE: u64 = 0x5348_5546_464c_4542; // "SHUFFLEB"
const RESAMPLE: u64 = 0x5245_5341_4d50_4c45; // "RESAMPLE"

/// How a [`ShardLoader`] streams (serialisable, for a run's record of its settings).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ShardLoaderConfig {
    /// Items per batch (per rank in a data-parallel run).
    pub batch_size: usize,
    /// Seeds the shard order, the shuffle buffer, resampling and every item's random stream.
    pub seed: u64,
    /// This process's rank and the number of ranks.
    pub shard: Shard,
    /// Reader threads per rank (at least 1), each reading its own shards; threads beyond the
    /// rank's shards of an epoch are idle.
    pub workers: usize,
    /// Samples in the shuffle buffer (0 or 1: no shuffling within the shards' order).
    pub shuffle_buffer: usize,
    /// Draw shards with replacement, without end (open_clip's `--dataset-resampled`).
    pub resampled: bool,
    /// A sample that passed the scan but fails to decode: the batch is an error, or the sample is
    /// recorded as skipped and the next one takes its place.
    pub policy: BadInputPolicy,
    /// Batches prepared ahead of the consumer.
    pub prefetch: usize,
}

impl Default for ShardLoaderConfig {
    fn default() -> Self {
        Self {
            batch_size: 32,
            seed: 0,
            shard: Shard::default(),
            workers: 2,
            shuffle_buffer: 1000,
            resampled: false,
            policy: BadInputPolicy::Fail,
            prefetch: 2,
        }
    }
}

/// One item on its way through the stream: raw bytes, decoded only after the shuffle buffer.
struct RawItem {
    shard: usize,
    sample: Arc<WdsSample>,
    /// The item's index among its sample's items.
    item: usize,
    /// Its global sample number.
    number: usize,
}

/// What the reader threads and the producer share.
struct Shared<F> {
    index: ShardIndex,
    format: F,
    /// Per shard: the positions of its bad samples, sorted.
    bad_positions: Vec<Vec<usize>>,
}

/// Streams batches from WebDataset shards (see the module docs of [`super`] for the semantics):
/// one implementation for every [`ShardFormat`] — [`super::CaptionShards`] yields
/// [`crate::loader::CaptionSample`]s, [`super::ImageCodeShards`] yields
/// [`crate::loader::DescriptionSample`]s.
pub struct ShardLoader<F: ShardFormat> {
    shared: Arc<Shared<F>>,
    config: ShardLoaderConfig,
    /// The shards with at least one usable item (their positions in the index).
    usable: Vec<usize>,
    batches: usize,
}

impl<F: ShardFormat> ShardLoader<F> {
    /// A loader over the scanned shards of `index` (scanned with the same kind of `format`).
    ///
    /// Errors: a batch size or worker count of 0; fewer shards holding usable samples than ranks
    /// (each rank reads whole shards); too few items for one batch on every rank.
    pub fn new(index: ShardIndex, format: F, config: ShardLoaderConfig) -> Result<Self, DataError> {
        let first = index.shards().first().map(|s| s.path.clone()).unwrap_or_default();
        let invalid = |message: String| DataError::Shard { path: first.clone(), message };
        if index.kind() != F::KIND {
            return Err(invalid(format!("the shards were scanned as {}, not as {}", index.kind(), F::KIND)));
        }
        if config.batch_size == 0 || config.workers == 0 {
            return Err(invalid("the batch size and the reader threads per rank must be at least 1".into()));
        }
        let world = config.shard.world_size.max(1);
        if config.shard.rank >= world {
            return Err(invalid(format!("rank {} of a world of {world}", config.shard.rank)));
        }
        let usable: Vec<usize> = (0..index.shards().len()).filter(|&i| index.shards()[i].items > 0).collect();
        if usable.len() < world {
            return Err(invalid(format!(
                "{} shards for {world} ranks: every rank reads shards of its own (and better several); write more, \
                 smaller shards (a smaller max count per shard)",
                usable.len()
            )));
        }
        let batches = index.len() / (world * config.batch_size);
        if batches == 0 {
            return Err(invalid(format!(
                "{} usable items in {} shards, fewer than one global batch of {world} rank(s) × {}",
                index.len(),
                index.shards().len(),
                config.batch_size
            )));
        }
        let bad_positions = index.shards().iter().map(|s| s.bad.iter().map(|b| b.position).collect()).collect();
        Ok(Self { shared: Arc::new(Shared { index, format, bad_positions }), config, usable, batches })
    }

    /// Expands `spec` ([`expand_shards`]), scans every shard in this process
    /// ([`ShardIndex::scan`] under `config.policy`) and builds the loader; returns the samples the
    /// scan left out. A data-parallel run splits the scan over its ranks instead
    /// ([`ShardIndex::scan_share`], [`ShardIndex::from_parts`]) and calls [`ShardLoader::new`].
    pub fn open(spec: &str, format: F, config: ShardLoaderConfig) -> Result<(Self, Vec<Skipped>), DataError> {
        let paths = expand_shards(spec)?;
        let (index, skipped) = ShardIndex::scan(&paths, &format, config.policy)?;
        Ok((Self::new(index, format, config)?, skipped))
    }

    /// How it streams (fixed at [`ShardLoader::new`], which checks it against the shards).
    pub fn config(&self) -> &ShardLoaderConfig {
        &self.config
    }

    /// The scanned shards.
    pub fn index(&self) -> &ShardIndex {
        &self.shared.index
    }

    /// How samples become items (the processor, augmentation and decoding limits).
    pub fn format(&self) -> &F {
        &self.shared.format
    }

    /// What a resumed run must find again ([`ShardIndex::fingerprint`]).
    pub fn fingerprint(&self) -> String {
        self.shared.index.fingerprint()
    }

    /// Batches per epoch: usable items / (ranks × batch size), the same on every rank.
    pub fn batches_per_epoch(&self) -> usize {
        self.batches
    }

    /// The usable shards (positions in the index) in the order of `epoch`: shuffled with (seed,
    /// epoch), the same on every rank.
    pub fn shard_order(&self, epoch: u64) -> Vec<usize> {
        let mut order = self.usable.clone();
        Rng::keyed(self.config.seed, &[epoch, SHARD_ORDER]).shuffle(&mut order);
        order
    }

    /// The shards reader thread `worker` of rank `rank` reads in `epoch`, in order (without
    /// resampling): positions rank, rank + W, … of [`ShardLoader::shard_order`] (WebDataset's
    /// `split_by_node`), then positions worker, worker + workers, … of those (`split_by_worker`).
    /// Empty for an idle worker (fewer shards than ranks × workers).
    pub fn worker_shards(&self, epoch: u64, rank: usize, worker: usize) -> Vec<usize> {
        let world = self.config.shard.world_size.max(1);
        let workers = self.config.workers.max(1);
        let rank_shards: Vec<usize> = self.shard_order(epoch).into_iter().skip(rank).step_by(world).collect();
        rank_shards.into_iter().skip(worker).step_by(workers).collect()
    }

    /// The batches of `epoch` from batch `start` on. The stream of the epoch is replayed and its
    /// first `start × batch size` items passed over without being decoded: a resumed run sees
    /// exactly the batches the interrupted one would have (unless a sample failed to decode under
    /// [`BadInputPolicy::Skip`] in the batches passed over: the replay cannot know, and is then
    /// shifted by that many items).
    pub fn epoch(&self, epoch: u64, start: usize) -> EpochIter<F::Item> {
        let (tx, rx) = sync_channel(self.config.prefetch.max(1));
        let skipped = Arc::new(Mutex::new(Vec::new()));
        let producer = Producer {
            shared: self.shared.clone(),
            config: self.config.clone(),
            epoch,
            start,
            batches: self.batches,
            stream: self.rank_stream(epoch),
            skipped: skipped.clone(),
        };
        std::thread::spawn(move || producer.run(tx));
        EpochIter::new(rx, skipped)
    }

    /// The shuffled stream of this rank's items in `epoch`.
    fn rank_stream(&self, epoch: u64) -> Shuffled<F> {
        let Shard { rank, .. } = self.config.shard;
        let sources = (0..self.config.workers.max(1))
            .map(|w| match self.config.resampled {
                true => Source::Resampled {
                    pool: self.usable.clone(),
                    seed: self.config.seed,
                    keys: [epoch, rank as u64, w as u64],
                },
                false => Source::List(self.worker_shards(epoch, rank, w)),
            })
            .collect();
        let merged =
            RoundRobin { shared: self.shared.clone(), sources, receivers: vec![], next: 0, passes: 0, this_pass: 0 };
        let rng = Rng::keyed(self.config.seed, &[epoch, rank as u64, SHUFFLE]);
        Shuffled { source: merged, buffer: Vec::new(), size: self.config.shuffle_buffer.max(1), rng, ended: true }
    }
}

impl<F: ShardFormat> BatchSource for ShardLoader<F> {
    type Item = F::Item;
    fn batches_per_epoch(&self) -> usize {
        ShardLoader::batches_per_epoch(self)
    }
    fn epoch(&self, epoch: u64, start: usize) -> EpochIter<F::Item> {
        ShardLoader::epoch(self, epoch, start)
    }
}

/// What one reader thread reads.
#[derive(Clone)]
enum Source {
    /// These shards, once per pass.
    List(Vec<usize>),
    /// Shards drawn with replacement from `pool`, without end, from the stream keyed by `seed` and
    /// (epoch, rank, worker).
    Resampled { pool: Vec<usize>, seed: u64, keys: [u64; 3] },
}

/// A reader thread: sends the items of its shards, in order, until done or until the receiver is
/// gone.
fn read_shards<F: ShardFormat>(shared: Arc<Shared<F>>, source: Source, tx: SyncSender<Result<RawItem, DataError>>) {
    let send_shard = |shard: usize| -> bool {
        match read_shard(&shared, shard, &tx) {
            Ok(open) => open,
            Err(e) => {
                let _ = tx.send(Err(e));
                false
            }
        }
    };
    match source {
        Source::List(shards) => {
            for shard in shards {
                if !send_shard(shard) {
                    return;
                }
            }
        }
        Source::Resampled { pool, seed, keys } => {
            let mut rng = Rng::keyed(seed, &[keys[0], keys[1], keys[2], RESAMPLE]);
            while !pool.is_empty() && send_shard(pool[rng.below(pool.len())]) {}
        }
    }
}

/// Sends the usable items of one shard; `Ok(false)` when the receiver is gone. A shard that no
/// longer matches its scan (size, time, samples) is an error.
fn read_shard<F: ShardFormat>(
    shared: &Shared<F>,
    shard: usize,
    tx: &SyncSender<Result<RawItem, DataError>>,
) -> Result<bool, DataError> {
    let scan = &shared.index.shards()[shard];
    let path = scan.path.as_path();
    let changed = |what: String| {
        DataError::shard(
            path,
            format!("changed since it was scanned ({what}); scan the shards again (restart the run)"),
        )
    };
    let meta = std::fs::metadata(path).map_err(|e| DataError::io(path, e))?;
    if meta.len() != scan.bytes || mtime(&meta) != (scan.mtime_secs, scan.mtime_nanos) {
        return Err(changed(format!("{} bytes now, {} then, or another modification time", meta.len(), scan.bytes)));
    }
    let bad = &shared.bad_positions[shard];
    let first = shared.index.first_number(shard);
    let (mut number, mut items) = (0, 0);
    let mut reader = SampleReader::open(path)?;
    for position in 0..scan.samples {
        let read = reader.next().ok_or_else(|| changed(format!("it ends after {position} samples")))?;
        if bad.binary_search(&position).is_ok() {
            number += 1;
            continue;
        }
        let sample = read.map_err(|e| changed(format!("sample {position}: {e}")))?;
        let n = shared.format.items(&sample).map_err(|e| changed(format!("sample {}: {e}", sample.key)))?;
        let sample = Arc::new(sample);
        for item in 0..n {
            let raw = RawItem { shard, sample: sample.clone(), item, number: first + number + item };
            if tx.send(Ok(raw)).is_err() {
                return Ok(false);
            }
        }
        number += n;
        items += n;
    }
    if items != scan.items {
        return Err(changed(format!("{items} usable items now, {} then", scan.items)));
    }
    Ok(true)
}

/// One pass over the rank's shards: one item from each reader thread in turn (skipping those that
/// are done), whatever the threads' timing.
struct RoundRobin<F: ShardFormat> {
    shared: Arc<Shared<F>>,
    sources: Vec<Source>,
    /// The running pass's threads; `None` once a thread is done (or idle).
    receivers: Vec<Option<Receiver<Result<RawItem, DataError>>>>,
    next: usize,
    passes: usize,
    /// Items of the running pass so far.
    this_pass: usize,
}

impl<F: ShardFormat> RoundRobin<F> {
    /// Starts a pass: a reader thread per source (none for an idle one). An error when the last
    /// pass yielded nothing (the stream would never end).
    fn start_pass(&mut self) -> Result<(), DataError> {
        if self.passes > 0 && self.this_pass == 0 {
            let path = self.shared.index.shards().first().map(|s| s.path.clone()).unwrap_or_default();
            return Err(DataError::shard(&path, "this rank's shards yielded no sample in a whole pass"));
        }
        self.receivers = self
            .sources
            .iter()
            .map(|source| {
                if matches!(source, Source::List(l) if l.is_empty()) {
                    return None;
                }
                let (tx, rx) = sync_channel(WORKER_QUEUE);
                let (shared, source) = (self.shared.clone(), source.clone());
                std::thread::spawn(move || read_shards(shared, source, tx));
                Some(rx)
            })
            .collect();
        self.next = 0;
        self.passes += 1;
        self.this_pass = 0;
        Ok(())
    }

    /// The pass's next item; `None` at its end (and before the first pass).
    fn next_item(&mut self) -> Result<Option<RawItem>, DataError> {
        let k = self.receivers.len();
        for step in 0..k {
            let w = (self.next + step) % k;
            let Some(rx) = &self.receivers[w] else { continue };
            match rx.recv() {
                Ok(Ok(item)) => {
                    self.next = (w + 1) % k;
                    self.this_pass += 1;
                    return Ok(Some(item));
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => self.receivers[w] = None,
            }
        }
        Ok(None)
    }
}

/// The rank's stream without end: passes over its shards through a shuffle buffer, filled, then
/// each item out a random slot's, refilled from the pass; drained at the end of a pass, after which
/// the next pass starts (WebDataset's pipeline restarted by `with_epoch`).
struct Shuffled<F: ShardFormat> {
    source: RoundRobin<F>,
    buffer: Vec<RawItem>,
    size: usize,
    rng: Rng,
    /// The running pass has ended (the buffer drains).
    ended: bool,
}

impl<F: ShardFormat> Shuffled<F> {
    fn next_item(&mut self) -> Result<RawItem, DataError> {
        loop {
            while !self.ended && self.buffer.len() < self.size {
                match self.source.next_item()? {
                    Some(item) => self.buffer.push(item),
                    None => self.ended = true,
                }
            }
            if !self.buffer.is_empty() {
                let j = self.rng.below(self.buffer.len());
                if !self.ended {
                    match self.source.next_item()? {
                        Some(item) => return Ok(std::mem::replace(&mut self.buffer[j], item)),
                        None => self.ended = true,
                    }
                }
                return Ok(self.buffer.swap_remove(j));
            }
            self.source.start_pass()?;
            self.ended = false;
        }
    }
}

/// The producer thread of one epoch: draws items, decodes them batch by batch in parallel.
struct Producer<F: ShardFormat> {
    shared: Arc<Shared<F>>,
    config: ShardLoaderConfig,
    epoch: u64,
    start: usize,
    batches: usize,
    stream: Shuffled<F>,
    skipped: Arc<Mutex<Vec<Skipped>>>,
}

impl<F: ShardFormat> Producer<F> {
    fn run(mut self, tx: SyncSender<Result<Batch<F::Item>, DataError>>) {
        let b = self.config.batch_size.max(1);
        for _ in 0..self.start.min(self.batches) * b {
            if let Err(e) = self.stream.next_item() {
                let _ = tx.send(Err(e));
                return;
            }
        }
        let mut failures = 0;
        for _ in self.start..self.batches {
            let batch = self.batch(b, &mut failures);
            let stop = batch.is_err();
            if tx.send(batch).is_err() || stop {
                return;
            }
        }
    }

    /// One batch of `b` items; under [`BadInputPolicy::Skip`] an item that fails to decode is
    /// recorded and the stream's next item takes its place.
    fn batch(&mut self, b: usize, failures: &mut usize) -> Result<Batch<F::Item>, DataError> {
        let mut batch = Batch { indices: Vec::with_capacity(b), items: Vec::with_capacity(b) };
        while batch.items.len() < b {
            let raws = (batch.items.len()..b).map(|_| self.stream.next_item()).collect::<Result<Vec<_>, _>>()?;
            let (shared, seed, epoch) = (&self.shared, self.config.seed, self.epoch);
            let loaded: Vec<Result<F::Item, DataError>> = raws
                .par_iter()
                .map(|r| {
                    let path: &Path = &shared.index.shards()[r.shard].path;
                    let mut rng = Rng::derive(seed, epoch, r.number as u64);
                    shared.format.load(path, &r.sample, r.item, r.number, &mut rng)
                })
                .collect();
            for (raw, item) in raws.iter().zip(loaded) {
                match item {
                    Ok(item) => {
                        batch.indices.push(raw.number);
                        batch.items.push(item);
                    }
                    Err(e) if self.config.policy == BadInputPolicy::Skip => {
                        *failures += 1;
                        let skip = Skipped { index: raw.number, error: e.to_string() };
                        self.skipped.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(skip);
                        if *failures > self.shared.index.len() {
                            let path = &self.shared.index.shards()[raw.shard].path;
                            let message = format!("{failures} samples failed to decode this epoch, more than the shards hold: the last: {e}");
                            return Err(DataError::shard(path, message));
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(batch)
    }
}

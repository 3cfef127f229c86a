//! WebDataset tar shards: the format large image–text corpora are stored and streamed in.
//!
//! - [`expand_shards`]: shard lists in brace notation (`out/shards-{000000..000127}.tar`, `::`
//!   between patterns), local files only;
//! - [`tar`]: a streaming tar reader (ustar, GNU long names, pax) and writer;
//! - [`WdsSample`], [`SampleReader`]: consecutive entries grouped by key (`abc.jpg`, `abc.txt` →
//!   sample `abc` with files `jpg`, `txt`), read as a captioned image ([`WdsSample::captioned`]) or
//!   an IMAGECODE set ([`WdsSample::imagecode`]);
//! - [`ShardWriter`], [`write_caption_shards`], [`write_imagecode_shards`]: numbered shards of at
//!   most a count of samples and a size, each written atomically;
//! - [`ShardIndex`]: the scan of every shard before training, split over data-parallel ranks;
//! - [`ShardLoader`]: the stream of batches, a [`crate::loader::BatchSource`] like the indexed
//!   [`crate::loader::DataLoader`].
//!
//! # How a [`ShardLoader`] streams
//!
//! **The scan.** Before the first batch every shard is read once ([`ShardIndex::scan_share`] on
//! each rank for its share of the shards, [`ShardIndex::from_parts`] on all shares): each sample is
//! checked for what its [`ShardFormat`] needs (an image and a caption; ten candidates and
//! descriptions) and its image headers ([`crate::check_image_bytes`]). Under
//! [`crate::loader::BadInputPolicy::Fail`] a bad sample or a damaged shard is an error naming the
//! first five; under `Skip` they are left out of every stream and returned for the caller to
//! report. The scan gives every item a stable global sample number ([`ShardScan`]), records each
//! shard's size, modification time and usable items ([`ShardIndex::fingerprint`]: the resume
//! check), and so knows the epoch's length without reading the data again.
//!
//! **Which rank reads which shard.** Each epoch the shards holding usable items are shuffled with
//! (seed, epoch), the same on every rank; rank r of W takes the shards at positions r, r + W, …
//! (WebDataset's `split_by_node`), and its reader thread w of K those at positions w, w + K, … of
//! the rank's (`split_by_worker`). Every shard is read once per epoch by exactly one (rank, thread)
//! pair. Fewer shards than ranks is an error (write more, smaller shards); fewer than ranks ×
//! threads is fine, some threads are idle.
//!
//! **Resampling.** With `resampled`, each (rank, thread) instead draws shards with replacement from
//! all shards, without end, from its own stream seeded by (seed, epoch, rank, thread) (open_clip's
//! `--dataset-resampled`): shards and samples may repeat within an epoch and some are not seen.
//!
//! **The rank's stream.** The rank takes one item from each of its threads in turn (skipping threads
//! that are done), so the order is the same whatever the threads' timing; then a shuffle buffer of
//! `shuffle_buffer` items seeded by (seed, epoch, rank): filled, then each item out is a random slot's
//! and the slot is refilled from the stream. Raw bytes travel through the buffer; decoding happens
//! after it. An IMAGECODE set yields one item per description, consecutively.
//!
//! **Epoch length.** Batches per epoch = usable items / (W × batch size), the same on every rank and
//! every epoch. A rank whose shards run out before that reads them again from the start (open_clip's
//! `with_epoch` wrap-around). With uneven shards this is an approximation, exactly as in open_clip
//! and WebDataset: within one epoch a rank with fewer items than its share may see some of its
//! samples twice, while a rank with more does not reach the last of its samples that epoch (the
//! shards are reshuffled the next). Shards, not samples, are partitioned exactly; shards of equal
//! sizes (what [`ShardWriter`] writes) and several per rank keep the approximation close.
//!
//! **Batches.** A producer thread decodes and preprocesses each batch in parallel (rayon) ahead of
//! the consumer (a bounded prefetch queue). Each item's random stream (crop, flip, the caption drawn
//! when augmenting) is `Rng::derive(seed, epoch, number)` with its sample number, which is also its
//! entry in `Batch::indices`. A sample that passed the scan but fails to decode is, under `Fail`, an
//! error naming its shard and key; under `Skip` it is recorded in the epoch's skipped list and the
//! stream's next item takes its place, so every batch keeps its size (data-parallel ranks need equal
//! batches).
//!
//! **Resuming.** `epoch(e, start)` replays epoch e's stream and passes over its first start × batch
//! items without decoding them: the same batches as an uninterrupted run (unless, under `Skip`, a
//! sample failed to decode in the batches passed over: that is known only by decoding, and the
//! resumed stream is then shifted by one item per such sample). In resampled mode an item drawn
//! twice in an epoch gets the same random stream both times (same number, same epoch).

mod format;
mod index;
mod names;
mod sample;
mod stream;
pub mod tar;
mod write;

pub use format::{CaptionShards, ImageCodeShards, ShardFormat};
pub use index::{BadSample, ScanPart, ShardIndex, ShardScan};
pub use names::expand_shards;
pub use sample::{split_key, CaptionedSample, ImageCodeSample, SampleReader, WdsSample, IMAGE_EXTENSIONS};
pub use stream::{ShardLoader, ShardLoaderConfig};
pub use tar::{TarEntry, TarReader, TarWriter};
pub use write::{
    sample_key, write_caption_shards, write_imagecode_shards, ShardOptions, ShardWriteReport, ShardWriter,
    WrittenShard, WrittenShards,
};

/// The loader of captioned-image shards.
pub type CaptionShardLoader = ShardLoader<CaptionShards>;
/// The loader of IMAGECODE shards (one item per description).
pub type ImageCodeShardLoader = ShardLoader<ImageCodeShards>;

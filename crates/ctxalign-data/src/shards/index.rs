//! The scan of every shard before training ("preflight"): valid items per shard, the bad samples,
//! and the sizes and modification times that fingerprint the data for a resume.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::format::ShardFormat;
use super::sample::SampleReader;
use crate::error::DataError;
use crate::loader::{unusable, BadInputPolicy, Shard, Skipped};

/// A sample the scan found unusable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadSample {
    /// The sample's position in its shard (0-based, counting every sample).
    pub position: usize,
    /// Its number within the shard's numbers (see [`ShardScan`]).
    pub number: usize,
    /// The sample's key.
    pub key: String,
    /// `<shard>: sample <key>: <what is wrong>`.
    pub error: String,
}

/// What the scan found in one shard.
///
/// **Sample numbers.** Every item of a shard has a number: its shard's first number (the numbers
/// of all shards before it, [`ShardIndex::first_number`]) plus its number within the shard. Within
/// a shard, samples are numbered in order, a usable sample taking one number per item it yields
/// (an IMAGECODE set one per description), a bad sample one, and a damaged tail one. The numbers
/// depend on the shard files alone, not on the policy or the run's ranks: they key each item's
/// random draws and name left-out samples.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardScan {
    /// The shard file, as the shard list names it.
    pub path: PathBuf,
    /// File size in bytes when scanned.
    pub bytes: u64,
    /// Modification time when scanned: seconds and nanoseconds since the Unix epoch (0 where the
    /// platform records none).
    pub mtime_secs: i64,
    /// The modification time's nanoseconds within its second.
    pub mtime_nanos: u32,
    /// Samples read, usable or not, before the end of the archive or the damage.
    pub samples: usize,
    /// Usable items (what batches draw from).
    pub items: usize,
    /// Unusable samples, in order.
    pub bad: Vec<BadSample>,
    /// Why the rest of the shard could not be read (truncated, damaged, unreadable file); the
    /// samples before it are kept.
    pub damage: Option<String>,
}

impl ShardScan {
    /// The numbers the shard's items, bad samples and damaged tail take (see [`ShardScan`]).
    pub fn numbers(&self) -> usize {
        self.items + self.bad.len() + self.damage.is_some() as usize
    }

    /// Reads `path` once: every sample checked by `format` (structure and image headers).
    pub fn scan<F: ShardFormat>(path: &Path, format: &F) -> Self {
        let mut scan = ShardScan {
            path: path.to_owned(),
            bytes: 0,
            mtime_secs: 0,
            mtime_nanos: 0,
            samples: 0,
            items: 0,
            bad: vec![],
            damage: None,
        };
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) => {
                scan.damage = Some(DataError::io(path, e).to_string());
                return scan;
            }
        };
        scan.bytes = meta.len();
        (scan.mtime_secs, scan.mtime_nanos) = mtime(&meta);
        let reader = match SampleReader::open(path) {
            Ok(r) => r,
            Err(e) => {
                scan.damage = Some(e.to_string());
                return scan;
            }
        };
        let mut number = 0;
        for sample in reader {
            let position = scan.samples;
            let checked = sample.and_then(|s| format.check(path, &s).map(|n| (s.key, n)));
            match checked {
                Ok((_, n)) if n > 0 => {
                    scan.items += n;
                    number += n;
                }
                Ok((key, _)) => {
                    let error = format!("{}: sample {key}: yields no item", path.display());
                    scan.bad.push(BadSample { position, number, key, error });
                    number += 1;
                }
                Err(e @ (DataError::Sample { .. } | DataError::SampleImage { .. })) => {
                    let key = match &e {
                        DataError::Sample { key, .. } | DataError::SampleImage { key, .. } => key.clone(),
                        _ => String::new(),
                    };
                    scan.bad.push(BadSample { position, number, key, error: e.to_string() });
                    number += 1;
                }
                Err(e) => {
                    scan.damage = Some(e.to_string());
                    break;
                }
            }
            scan.samples += 1;
        }
        scan
    }
}

/// `(seconds, nanoseconds)` since the Unix epoch, `(0, 0)` where the platform records no time.
pub(crate) fn mtime(meta: &std::fs::Metadata) -> (i64, u32) {
    match meta.modified().map(|t| t.duration_since(std::time::UNIX_EPOCH)) {
        Ok(Ok(d)) => (d.as_secs() as i64, d.subsec_nanos()),
        Ok(Err(before)) => (-(before.duration().as_secs() as i64), before.duration().subsec_nanos()),
        Err(_) => (0, 0),
    }
}

/// One rank's share of the scan ([`ShardIndex::scan_share`]); serialisable so that the ranks of a
/// data-parallel run can exchange their shares (as JSON bytes) and all build the same index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanPart {
    /// [`ShardFormat::KIND`] of the scan.
    pub kind: String,
    /// The number of shards of the whole list.
    pub total_shards: usize,
    /// `(position in the shard list, what the scan found)` for the shards of this share.
    pub scans: Vec<(usize, ShardScan)>,
}

/// Every shard of a list, scanned: what a [`super::ShardLoader`] streams from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardIndex {
    kind: String,
    shards: Vec<ShardScan>,
    /// The first sample number of each shard (prefix sums of [`ShardScan::numbers`]).
    offsets: Vec<usize>,
}

impl ShardIndex {
    /// Scans every shard ([`ShardIndex::scan_share`] for one process, then
    /// [`ShardIndex::from_parts`]); see there for `policy`.
    pub fn scan<F: ShardFormat>(
        paths: &[PathBuf],
        format: &F,
        policy: BadInputPolicy,
    ) -> Result<(Self, Vec<Skipped>), DataError> {
        Self::from_parts(vec![Self::scan_share(paths, Shard::default(), format)], policy)
    }

    /// The first half of the scan, split over the ranks of a data-parallel run: scans (in parallel)
    /// the shards at positions `shard.rank`, `shard.rank + W`, … of `paths`, each read once with
    /// every sample checked by `format` ([`ShardFormat::check`]). The ranks exchange their parts
    /// and each gives all of them to [`ShardIndex::from_parts`], so that every rank builds the
    /// same index.
    pub fn scan_share<F: ShardFormat>(paths: &[PathBuf], shard: Shard, format: &F) -> ScanPart {
        let mine: Vec<usize> = (shard.rank..paths.len()).step_by(shard.world_size.max(1)).collect();
        let scans = mine.par_iter().map(|&i| (i, ShardScan::scan(&paths[i], format))).collect();
        ScanPart { kind: F::KIND.to_string(), total_shards: paths.len(), scans }
    }

    /// The second half of the scan: joins the parts of all ranks (each shard exactly once) and
    /// applies `policy`. Under [`BadInputPolicy::Fail`] any bad sample or damaged shard is a
    /// [`DataError::Unusable`] that counts them and names the first five
    /// (`shards-000003.tar: sample 000000123: no caption …`); under [`BadInputPolicy::Skip`] they
    /// are left out of every stream and returned (ordered by sample number) for the caller to
    /// report; an error still when no usable item is left.
    pub fn from_parts(parts: Vec<ScanPart>, policy: BadInputPolicy) -> Result<(Self, Vec<Skipped>), DataError> {
        let Some(first) = parts.first() else {
            return Err(DataError::OtherRank("no shard scan to build the shard index from".into()));
        };
        let (kind, total) = (first.kind.clone(), first.total_shards);
        let mut slots: Vec<Option<ShardScan>> = vec![None; total];
        for part in parts {
            if part.kind != kind || part.total_shards != total {
                return Err(DataError::OtherRank(format!(
                    "the ranks scanned different shard lists: {total} shards of {kind} here, {} shards of {} there",
                    part.total_shards, part.kind
                )));
            }
            for (i, scan) in part.scans {
                match slots.get_mut(i) {
                    Some(slot @ None) => *slot = Some(scan),
                    Some(Some(_)) => {
                        return Err(DataError::OtherRank(format!(
                            "shard {i} ({}) was scanned twice",
                            scan.path.display()
                        )))
                    }
                    None => return Err(DataError::OtherRank(format!("shard {i} is outside the list of {total}"))),
                }
            }
        }
        let shards = slots
            .into_iter()
            .enumerate()
            .map(|(i, s)| s.ok_or_else(|| DataError::OtherRank(format!("shard {i} of {total} was not scanned"))))
            .collect::<Result<Vec<_>, _>>()?;
        let mut offsets = Vec::with_capacity(shards.len());
        let mut next = 0;
        for s in &shards {
            offsets.push(next);
            next += s.numbers();
        }
        let index = Self { kind, shards, offsets };
        let skipped = index.left_out();
        let samples: usize = index.shards.iter().map(|s| s.samples + s.damage.is_some() as usize).sum();
        if !skipped.is_empty() && (policy == BadInputPolicy::Fail || index.is_empty()) {
            return Err(unusable("shard samples", &skipped, samples));
        }
        if index.is_empty() {
            let path = index.shards.first().map(|s| s.path.clone()).unwrap_or_default();
            let message = format!("the {} shard(s) of this list hold no sample", index.shards.len());
            return Err(DataError::Shard { path, message });
        }
        Ok((index, skipped))
    }

    /// Every bad sample and damaged tail, as [`Skipped`] keyed by sample number.
    fn left_out(&self) -> Vec<Skipped> {
        let mut out = Vec::new();
        for (s, offset) in self.shards.iter().zip(&self.offsets) {
            for b in &s.bad {
                out.push(Skipped { index: offset + b.number, error: b.error.clone() });
            }
            if let Some(damage) = &s.damage {
                out.push(Skipped { index: offset + s.items + s.bad.len(), error: damage.clone() });
            }
        }
        out
    }

    /// [`ShardFormat::KIND`] of the scan.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The shards, in list order.
    pub fn shards(&self) -> &[ShardScan] {
        &self.shards
    }

    /// The first sample number of shard `i` (see [`ShardScan`]).
    pub fn first_number(&self, i: usize) -> usize {
        self.offsets[i]
    }

    /// Usable items in all shards.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.items).sum()
    }

    /// No usable item (never true of an index [`ShardIndex::from_parts`] returned).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What a resumed run must find again: every shard's path, size, modification time and
    /// usable items, one line each (`<path> <bytes> <secs>.<nanos> <items>`). A shard rewritten
    /// since changes it.
    pub fn fingerprint(&self) -> String {
        self.shards
            .iter()
            .map(|s| format!("{} {} {}.{:09} {}\n", s.path.display(), s.bytes, s.mtime_secs, s.mtime_nanos, s.items))
            .collect()
    }
}

//! An embedding index for downstream apps: L2-normalised embeddings with string ids and exact
//! top-k search by cosine, saved as a folder that loads back with errors naming the file.
//!
//! Rows live in blocks of [`BLOCK_ROWS`] (plus a partly filled block in host memory), so
//! [`EmbeddingIndex::add`] appends without copying what is already indexed, and the index costs
//! `4 · dim` bytes per row (1 KiB at 256-d, f32) plus its ids: 100,000 images at 256-d take about
//! 100 MB.
//!
//! The folder: `embeddings.safetensors` (one tensor `embeddings` `[len, dim]`, streamed block by
//! block), `ids.json`, and `index.json` (`{format, dim, len, model, provenance}`), each written
//! atomically and `index.json` last, so a save interrupted half-way leaves counts that disagree and
//! [`EmbeddingIndex::load`] refuses the folder instead of answering from half of it. Folders of the
//! earlier format (`ids.json` + `provenance.json`, no `index.json`) still load.
//!
//! Two fingerprints say what the rows mean:
//! - `model`: the model that embedded them ([`crate::BlipScorer::fingerprint`],
//!   [`crate::contextclip::ClipEncoder::fingerprint`]). [`EmbeddingIndex::load_for`] refuses an
//!   index made by another model with [`Error::ModelMismatch`]: its vectors are in another space,
//!   and searching them with this model's queries would rank at random with exit code 0.
//! - `provenance`: the caller's fingerprint of the inputs (e.g. [`files_fingerprint`] of the indexed
//!   files), so an index of files whose content changed under the same names is rebuilt.

use std::io::Write;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use ctxalign_data::{write_atomic, write_atomic_with};
use ctxalign_eval::top_k;
use ctxalign_nn::l2_normalize;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

const EMBEDDINGS_FILE: &str = "embeddings.safetensors";
const IDS_FILE: &str = "ids.json";
const INDEX_FILE: &str = "index.json";
/// The earlier format's provenance (no `index.json`); read, and removed on save.
const LEGACY_PROVENANCE_FILE: &str = "provenance.json";
const FORMAT: u32 = 2;
/// The name of the one tensor in `embeddings.safetensors`.
const TENSOR: &str = "embeddings";

/// Rows per block: 1 MiB at 256-d. Large enough that a search is a few big matrix products, small
/// enough that the partly filled block (host memory, copied to the device per search) stays cheap.
pub const BLOCK_ROWS: usize = 1024;

/// A fingerprint of `paths` as they are on disk: each path with its size and modification time
/// (nanoseconds), hashed. Cheap enough for thousands of images and a model folder; a file rewritten
/// with other content gets a new modification time.
pub fn files_fingerprint(paths: &[std::path::PathBuf]) -> Result<String> {
    let mut text = String::new();
    for path in paths {
        let meta = std::fs::metadata(path).map_err(Error::io(path))?;
        let modified =
            meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
        text.push_str(&format!("{}\t{}\t{modified}\n", path.display(), meta.len()));
    }
    Ok(crate::fingerprint(&text))
}

/// One search result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hit {
    /// The id the row was added under.
    pub id: String,
    /// Row of the index (the order of [`EmbeddingIndex::add`]).
    pub index: usize,
    /// Cosine similarity to the query.
    pub score: f32,
}

/// What `index.json` records.
#[derive(Debug, Serialize, Deserialize)]
struct IndexRecord {
    format: u32,
    dim: usize,
    len: usize,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    provenance: Option<String>,
}

/// Embeddings `[len, dim]` (L2-normalised on insertion, f32) and their ids.
#[derive(Debug, Clone)]
pub struct EmbeddingIndex {
    dim: usize,
    device: Device,
    ids: Vec<String>,
    /// Full blocks, each `[rows, dim]` on `device` (a loaded index is one block of any size).
    blocks: Vec<Tensor>,
    /// Rows added since the last full block, row-major `[pending / dim, dim]`, in host memory.
    pending: Vec<f32>,
    model: Option<String>,
    provenance: Option<String>,
}

impl EmbeddingIndex {
    /// An empty index of `dim`-wide embeddings that records no model (see
    /// [`EmbeddingIndex::for_model`]).
    pub fn new(dim: usize, device: &Device) -> Result<Self> {
        if dim == 0 {
            return Err(Error::Invalid("an embedding index needs embeddings at least 1 wide".into()));
        }
        Ok(Self {
            dim,
            device: device.clone(),
            ids: vec![],
            blocks: vec![],
            pending: vec![],
            model: None,
            provenance: None,
        })
    }

    /// An empty index for the embeddings of the model whose fingerprint is `model` (saved with the
    /// index and checked by [`EmbeddingIndex::load_for`]).
    pub fn for_model(dim: usize, model: impl Into<String>, device: &Device) -> Result<Self> {
        let mut index = Self::new(dim, device)?;
        index.model = Some(model.into());
        Ok(index)
    }

    /// Rows in the index.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the index has no rows.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Width of the embeddings.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The ids, in row order.
    pub fn ids(&self) -> &[String] {
        &self.ids
    }

    /// The fingerprint of the model that made the embeddings, when recorded.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// Adds `embeddings` `[n, dim]` (any float dtype, any device) under `ids`. They are normalised
    /// here, so any embedding may be added; rows already indexed are not copied.
    pub fn add(&mut self, ids: Vec<String>, embeddings: &Tensor) -> Result<()> {
        let (n, dim) = embeddings.dims2().map_err(|_| {
            Error::Invalid(format!("index add: embeddings must be [n, dim], got {:?}", embeddings.dims()))
        })?;
        if n != ids.len() || dim != self.dim {
            return Err(Error::Invalid(format!(
                "index add: {} ids for {n} embeddings of width {dim}; the index holds width {}",
                ids.len(),
                self.dim
            )));
        }
        let normalised = l2_normalize(&embeddings.to_dtype(DType::F32)?)?.flatten_all()?.to_vec1::<f32>()?;
        crate::ensure_finite(&normalised, "embeddings added to the index")?;
        let mut rows = normalised.as_slice();
        while !rows.is_empty() {
            let room = BLOCK_ROWS * self.dim - self.pending.len();
            let (now, later) = rows.split_at(room.min(rows.len()));
            self.pending.extend_from_slice(now);
            if self.pending.len() == BLOCK_ROWS * self.dim {
                let block = Tensor::from_vec(std::mem::take(&mut self.pending), (BLOCK_ROWS, self.dim), &self.device)?;
                self.blocks.push(block);
            }
            rows = later;
        }
        self.ids.extend(ids);
        Ok(())
    }

    /// Every block, the partly filled one last, as tensors on the index's device.
    fn all_blocks(&self) -> Result<Vec<Tensor>> {
        let mut blocks = self.blocks.clone();
        if !self.pending.is_empty() {
            let rows = self.pending.len() / self.dim;
            blocks.push(Tensor::from_slice(&self.pending, (rows, self.dim), &self.device)?);
        }
        Ok(blocks)
    }

    /// All embeddings `[len, dim]`, f32, in row order (a copy).
    pub fn embeddings(&self) -> Result<Tensor> {
        let blocks = self.all_blocks()?;
        if blocks.is_empty() {
            return Ok(Tensor::zeros((0, self.dim), DType::F32, &self.device)?);
        }
        Ok(Tensor::cat(&blocks, 0)?)
    }

    /// The `k` nearest rows of each query `[q, dim]` by cosine, best first; equal scores keep the
    /// earlier row first. Fewer than `k` when the index holds fewer rows.
    pub fn search(&self, queries: &Tensor, k: usize) -> Result<Vec<Vec<Hit>>> {
        let (q, dim) = queries
            .dims2()
            .map_err(|_| Error::Invalid(format!("index search: queries must be [q, dim], got {:?}", queries.dims())))?;
        if dim != self.dim {
            return Err(Error::Invalid(format!(
                "index search: queries of width {dim}, but the index holds embeddings of width {} (another model?)",
                self.dim
            )));
        }
        let queries = l2_normalize(&queries.to_dtype(DType::F32)?.to_device(&self.device)?)?;
        let mut scores: Vec<Vec<f32>> = vec![Vec::with_capacity(self.len()); q];
        for block in self.all_blocks()? {
            // [q, dim] x [dim, rows] -> [q, rows], appended to each query's row of scores.
            let part: Vec<Vec<f32>> = queries.matmul(&block.t()?)?.to_vec2()?;
            for (all, part) in scores.iter_mut().zip(part) {
                all.extend(part);
            }
        }
        for row in &scores {
            crate::ensure_finite(row, "index search scores")?;
        }
        Ok(scores
            .iter()
            .map(|row| {
                top_k(row, k.min(row.len()))
                    .into_iter()
                    .map(|i| Hit { id: self.ids[i].clone(), index: i, score: row[i] })
                    .collect()
            })
            .collect())
    }

    /// Records what made the embeddings (see [`files_fingerprint`]); saved with the index.
    pub fn with_provenance(mut self, provenance: impl Into<String>) -> Self {
        self.provenance = Some(provenance.into());
        self
    }

    /// What made the embeddings, when recorded.
    pub fn provenance(&self) -> Option<&str> {
        self.provenance.as_deref()
    }

    /// Writes the index folder: the embeddings streamed block by block (no copy of the whole
    /// index in memory), the ids, then `index.json`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
        let file = dir.join(EMBEDDINGS_FILE);
        let blocks = self.all_blocks()?;
        let len = self.len();
        write_atomic_with(&file, |w| {
            write_safetensors_header(w, len, self.dim)?;
            for block in &blocks {
                let values = block.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(std::io::Error::other)?;
                let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                w.write_all(&bytes)?;
            }
            Ok(())
        })?;
        write_atomic(&dir.join(IDS_FILE), serde_json::to_string(&self.ids).expect("JSON").as_bytes())?;
        // The earlier format's provenance must not outlive the embeddings it described.
        let legacy = dir.join(LEGACY_PROVENANCE_FILE);
        if legacy.exists() {
            std::fs::remove_file(&legacy).map_err(Error::io(&legacy))?;
        }
        let record = IndexRecord {
            format: FORMAT,
            dim: self.dim,
            len,
            model: self.model.clone(),
            provenance: self.provenance.clone(),
        };
        write_atomic(&dir.join(INDEX_FILE), serde_json::to_string_pretty(&record).expect("JSON").as_bytes())?;
        Ok(())
    }

    /// Reads an index folder written by [`EmbeddingIndex::save`] (or by the earlier format), onto
    /// `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let ids: Vec<String> = ctxalign_models::loading::read_json(&dir.join(IDS_FILE))?;
        let file = dir.join(EMBEDDINGS_FILE);
        let mut tensors = candle_core::safetensors::load(&file, device)
            .map_err(|e| Error::format(&file, format!("not a readable safetensors file: {e}")))?;
        let embeddings = tensors.remove(TENSOR).ok_or_else(|| Error::format(&file, "no tensor `embeddings`"))?;
        let (n, dim) = embeddings
            .dims2()
            .map_err(|_| Error::format(&file, format!("`embeddings` must be [n, dim], got {:?}", embeddings.dims())))?;
        if n != ids.len() {
            return Err(Error::format(&file, format!("{n} embeddings but {} ids in {IDS_FILE}", ids.len())));
        }
        if dim == 0 {
            return Err(Error::format(&file, "`embeddings` are 0 wide"));
        }
        let record_file = dir.join(INDEX_FILE);
        let (model, provenance) = if record_file.is_file() {
            let record: IndexRecord = ctxalign_models::loading::read_json(&record_file)?;
            if record.format > FORMAT {
                return Err(Error::format(
                    &record_file,
                    format!("index format {} is newer than this ctxalign reads ({FORMAT})", record.format),
                ));
            }
            if (record.len, record.dim) != (n, dim) {
                return Err(Error::format(
                    &record_file,
                    format!(
                        "records {} rows of width {}, but {EMBEDDINGS_FILE} holds [{n}, {dim}] (a save that did \
                         not finish?): rebuild the index",
                        record.len, record.dim
                    ),
                ));
            }
            (record.model, record.provenance)
        } else {
            let legacy = dir.join(LEGACY_PROVENANCE_FILE);
            let provenance = match legacy.is_file() {
                true => Some(ctxalign_models::loading::read_json::<String>(&legacy)?),
                false => None,
            };
            (None, provenance)
        };
        let values = embeddings.to_dtype(DType::F32)?;
        let blocks = if n == 0 { vec![] } else { vec![values] };
        Ok(Self { dim, device: device.clone(), ids, blocks, pending: vec![], model, provenance })
    }

    /// As [`EmbeddingIndex::load`], for the model whose fingerprint is `model`: an index that
    /// records another model, or none, is refused with [`Error::ModelMismatch`].
    pub fn load_for(dir: &Path, model: &str, device: &Device) -> Result<Self> {
        let index = Self::load(dir, device)?;
        if index.model.as_deref() != Some(model) {
            return Err(Error::ModelMismatch {
                path: dir.to_owned(),
                recorded: index.model.clone(),
                given: model.to_owned(),
            });
        }
        Ok(index)
    }
}

/// The safetensors header of one f32 tensor `embeddings` `[len, dim]`: the JSON's length (u64,
/// little-endian), then the JSON padded with spaces to a multiple of 8 (as the safetensors crate
/// writes it, so the data that follows is aligned).
fn write_safetensors_header(w: &mut dyn Write, len: usize, dim: usize) -> std::io::Result<()> {
    let bytes = len * dim * std::mem::size_of::<f32>();
    let mut json = format!(r#"{{"{TENSOR}":{{"dtype":"F32","shape":[{len},{dim}],"data_offsets":[0,{bytes}]}}}}"#);
    while json.len() % 8 != 0 {
        json.push(' ');
    }
    w.write_all(&(json.len() as u64).to_le_bytes())?;
    w.write_all(json.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize, dim: usize, seed: u32) -> Vec<f32> {
        // A cheap deterministic spread of values in (-1, 1), no row all zero.
        (0..n * dim)
            .map(|i| {
                let x = (i as u32).wrapping_mul(2654435761).wrapping_add(seed.wrapping_mul(97)) % 20011;
                x as f32 / 10005.5 - 1.0 + if i % dim == 0 { 3.0 } else { 0.0 }
            })
            .collect()
    }

    fn normalised(values: &[f32], dim: usize) -> Vec<f32> {
        values
            .chunks(dim)
            .flat_map(|r| {
                let norm = r.iter().map(|v| v * v).sum::<f32>().sqrt();
                r.iter().map(move |v| v / norm)
            })
            .collect()
    }

    /// Rows added in pieces that cross block boundaries are the normalised rows in order, and a
    /// search equals a brute-force ranking computed here (equal scores: the earlier row first).
    #[test]
    fn incremental_adds_across_blocks_equal_one_matrix() -> Result<()> {
        let dim = 5;
        let dev = Device::Cpu;
        let n = BLOCK_ROWS * 2 + 300;
        let values = rows(n, dim, 1);
        let mut index = EmbeddingIndex::for_model(dim, "m", &dev)?;
        let mut start = 0;
        for (piece, count) in [700, 1, BLOCK_ROWS - 701, BLOCK_ROWS + 1, 299].into_iter().enumerate() {
            let part = Tensor::from_slice(&values[start * dim..(start + count) * dim], (count, dim), &dev)?;
            index.add((start..start + count).map(|i| format!("{piece}-{i}")).collect(), &part)?;
            start += count;
        }
        assert_eq!(start, n);
        assert_eq!(index.len(), n);
        assert_eq!(index.blocks.len(), 2, "two full blocks, the rest pending");
        let expected = normalised(&values, dim);
        let got = index.embeddings()?.flatten_all()?.to_vec1::<f32>()?;
        let worst = expected.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-6, "rows differ by {worst}");

        // Duplicate row 5 at the end: both score the same for a query equal to it.
        let dup = Tensor::from_slice(&values[5 * dim..6 * dim], (1, dim), &dev)?;
        index.add(vec!["dup".into()], &dup)?;
        let queries = Tensor::from_slice(&values[5 * dim..7 * dim], (2, dim), &dev)?;
        let hits = index.search(&queries, 7)?;
        let all = normalised(&[&values[..], &values[5 * dim..6 * dim]].concat(), dim);
        for (qi, hits) in hits.iter().enumerate() {
            let q = &normalised(&values[(5 + qi) * dim..(6 + qi) * dim], dim);
            let scores: Vec<f32> = all.chunks(dim).map(|r| r.iter().zip(q).map(|(a, b)| a * b).sum()).collect();
            let mut order: Vec<usize> = (0..scores.len()).collect();
            order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
            let got: Vec<usize> = hits.iter().map(|h| h.index).collect();
            // Brute force in f32 may order near-equal scores differently; compare scores, then
            // the exact-tie rule on the duplicate.
            for (h, &o) in hits.iter().zip(&order) {
                assert!((h.score - scores[o]).abs() < 1e-5, "query {qi}: {got:?} vs {:?}", &order[..7]);
            }
        }
        assert_eq!(hits[0][0].index, 5, "the earlier of two equal rows comes first");
        assert_eq!(hits[0][1].index, n, "then its duplicate");
        assert_eq!(hits[0][1].id, "dup");
        Ok(())
    }

    /// A saved index is a safetensors file equal, byte for byte, to the safetensors crate's own
    /// serialisation of the same matrix, and loads back with its ids, model and provenance.
    #[test]
    fn saves_as_the_safetensors_crate_would_and_loads_back() -> Result<()> {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dim = 3;
        let dev = Device::Cpu;
        let n = BLOCK_ROWS + 2;
        let values = rows(n, dim, 7);
        let mut index = EmbeddingIndex::for_model(dim, "model-a", &dev)?.with_provenance("files-1");
        index.add((0..n).map(|i| i.to_string()).collect(), &Tensor::from_slice(&values, (n, dim), &dev)?)?;
        let dir = tmp.path().join("index");
        index.save(&dir)?;

        let reference = tmp.path().join("reference.safetensors");
        let tensors = [(TENSOR.to_string(), index.embeddings()?)].into_iter().collect();
        ctxalign_data::write_safetensors(&reference, &tensors)?;
        assert_eq!(std::fs::read(dir.join(EMBEDDINGS_FILE)).unwrap(), std::fs::read(&reference).unwrap());

        let loaded = EmbeddingIndex::load_for(&dir, "model-a", &dev)?;
        assert_eq!((loaded.len(), loaded.dim(), loaded.ids()), (n, dim, index.ids()));
        assert_eq!((loaded.model(), loaded.provenance()), (Some("model-a"), Some("files-1")));
        assert_eq!(loaded.embeddings()?.to_vec2::<f32>()?, index.embeddings()?.to_vec2::<f32>()?);
        // A loaded index keeps growing.
        let mut loaded = loaded;
        loaded.add(vec!["more".into()], &Tensor::new(&[[0f32, 0., 2.]], &dev)?)?;
        assert_eq!(loaded.search(&Tensor::new(&[[0f32, 0., 1.]], &dev)?, 1)?[0][0].id, "more");

        // An empty index saves and loads too.
        EmbeddingIndex::new(4, &dev)?.save(&tmp.path().join("empty"))?;
        let empty = EmbeddingIndex::load(&tmp.path().join("empty"), &dev)?;
        assert_eq!((empty.len(), empty.dim()), (0, 4));
        assert_eq!(empty.search(&Tensor::ones((2, 4), DType::F32, &dev)?, 3)?, vec![vec![]; 2]);
        Ok(())
    }

    /// Another model's index, or one that records none, is refused by `load_for` with both
    /// fingerprints; a query of another width is refused by `search`.
    #[test]
    fn another_models_index_is_refused() -> Result<()> {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dev = Device::Cpu;
        let dir = tmp.path().join("index");
        let mut index = EmbeddingIndex::for_model(2, "model-a", &dev)?;
        index.add(vec!["a".into()], &Tensor::new(&[[1f32, 0.]], &dev)?)?;
        index.save(&dir)?;
        match EmbeddingIndex::load_for(&dir, "model-b", &dev) {
            Err(Error::ModelMismatch { recorded, given, .. }) => {
                assert_eq!((recorded.as_deref(), given.as_str()), (Some("model-a"), "model-b"))
            }
            other => panic!("expected Error::ModelMismatch, got {other:?}"),
        }
        EmbeddingIndex::new(2, &dev)?.save(&dir)?;
        assert!(matches!(
            EmbeddingIndex::load_for(&dir, "model-a", &dev),
            Err(Error::ModelMismatch { recorded: None, .. })
        ));
        let err = index.search(&Tensor::new(&[[1f32, 0., 0.]], &dev)?, 1).unwrap_err();
        assert!(err.to_string().contains("width 3"), "{err}");
        assert!(EmbeddingIndex::new(0, &dev).is_err());
        let nan = Tensor::new(&[[f32::NAN, 0.]], &dev)?;
        assert!(matches!(index.add(vec!["nan".into()], &nan), Err(Error::NonFinite { .. })));
        assert_eq!(index.len(), 1, "a refused add changes nothing");
        Ok(())
    }

    /// A save cut short between the embeddings and `index.json` (simulated: `index.json` from an
    /// earlier, smaller save) is refused; a folder of the earlier format loads with its provenance.
    #[test]
    fn interrupted_saves_are_refused_and_the_earlier_format_loads() -> Result<()> {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dev = Device::Cpu;
        let dir = tmp.path().join("index");
        let mut index = EmbeddingIndex::new(2, &dev)?;
        index.add(vec!["a".into()], &Tensor::new(&[[1f32, 0.]], &dev)?)?;
        index.save(&dir)?;
        let old_record = std::fs::read(dir.join(INDEX_FILE)).unwrap();
        index.add(vec!["b".into()], &Tensor::new(&[[0f32, 1.]], &dev)?)?;
        index.save(&dir)?;
        std::fs::write(dir.join(INDEX_FILE), old_record).unwrap();
        match EmbeddingIndex::load(&dir, &dev) {
            Err(e @ Error::Format { .. }) => assert!(e.to_string().contains("records 1 rows"), "{e}"),
            other => panic!("expected Error::Format, got {other:?}"),
        }

        let legacy = tmp.path().join("legacy");
        let tensors = [(TENSOR.to_string(), Tensor::new(&[[0.6f32, 0.8]], &dev)?)].into_iter().collect();
        ctxalign_data::write_safetensors(&legacy.join(EMBEDDINGS_FILE), &tensors)?;
        std::fs::write(legacy.join(IDS_FILE), br#"["x"]"#).unwrap();
        std::fs::write(legacy.join(LEGACY_PROVENANCE_FILE), br#""old-files""#).unwrap();
        let loaded = EmbeddingIndex::load(&legacy, &dev)?;
        assert_eq!((loaded.ids(), loaded.provenance(), loaded.model()), (&["x".to_string()][..], Some("old-files"), None));
        // Saving it again writes the current format and drops the old provenance file.
        loaded.save(&legacy)?;
        assert!(!legacy.join(LEGACY_PROVENANCE_FILE).exists());
        assert_eq!(EmbeddingIndex::load(&legacy, &dev)?.provenance(), Some("old-files"));
        Ok(())
    }

    /// Provenance round-trips, an index saved without it loses the old one, and rewriting a file
    /// under the same name changes the fingerprint.
    #[test]
    fn provenance_is_saved_and_follows_the_files() -> Result<()> {
        let tmp = tempfile::tempdir().expect("temp dir");
        let image = tmp.path().join("a.png");
        std::fs::write(&image, b"first").expect("write");
        let before = files_fingerprint(std::slice::from_ref(&image))?;
        let mut index = EmbeddingIndex::new(3, &Device::Cpu)?.with_provenance(before.clone());
        index.add(vec!["a".into()], &Tensor::new(&[[1f32, 2., 3.]], &Device::Cpu)?)?;
        let dir = tmp.path().join("index");
        index.save(&dir)?;
        assert_eq!(EmbeddingIndex::load(&dir, &Device::Cpu)?.provenance(), Some(before.as_str()));
        std::fs::write(&image, b"other content").expect("write");
        assert_ne!(files_fingerprint(std::slice::from_ref(&image))?, before, "a rewritten file is another input");
        let mut plain = EmbeddingIndex::new(3, &Device::Cpu)?;
        plain.add(vec!["a".into()], &Tensor::new(&[[3f32, 2., 1.]], &Device::Cpu)?)?;
        plain.save(&dir)?;
        assert_eq!(EmbeddingIndex::load(&dir, &Device::Cpu)?.provenance(), None);
        Ok(())
    }

    /// Failures keep their cause and path: a folder that cannot be made is `Error::Io`, a damaged
    /// index file is `Error::Format` naming the file; a missing file is `Error::Io` too.
    #[test]
    fn errors_are_typed_and_name_the_path() -> Result<()> {
        let tmp = tempfile::tempdir().expect("temp dir");
        let blocker = tmp.path().join("a-file");
        std::fs::write(&blocker, b"x").expect("write");
        let index = EmbeddingIndex::new(2, &Device::Cpu)?;
        match index.save(&blocker.join("index")) {
            Err(Error::Io { path, .. }) => assert!(path.starts_with(&blocker), "{}", path.display()),
            other => panic!("expected Error::Io, got {other:?}"),
        }
        let dir = tmp.path().join("index");
        let mut index = EmbeddingIndex::new(2, &Device::Cpu)?;
        index.add(vec!["a".into(), "b".into()], &Tensor::new(&[[1f32, 0.], [0., 1.]], &Device::Cpu)?)?;
        index.save(&dir)?;
        std::fs::write(dir.join(IDS_FILE), br#"["a"]"#).expect("write");
        match EmbeddingIndex::load(&dir, &Device::Cpu) {
            Err(e @ Error::Format { .. }) => assert!(e.to_string().contains("2 embeddings but 1 ids"), "{e}"),
            other => panic!("expected Error::Format, got {:?}", other.err()),
        }
        assert!(matches!(files_fingerprint(&[tmp.path().join("missing.png")]), Err(Error::Io { .. })));
        Ok(())
    }
}

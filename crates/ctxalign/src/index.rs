//! An embedding index for downstream apps: L2-normalised embeddings with string ids, exact top-k
//! search by cosine, saved as a folder (`embeddings.safetensors` + `ids.json`, both written
//! atomically, and `provenance.json` when the index records what made it) that loads back with
//! errors naming the file.
//!
//! Provenance is a caller's fingerprint of everything the embeddings depend on (the model and the
//! indexed files, see [`files_fingerprint`]): a saved index is reused only when it matches, so an
//! index made by another model, or for files whose content changed under the same names, is
//! rebuilt instead of silently answering for them.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use ctxalign_data::write_atomic;
use ctxalign_eval::top_k;
use ctxalign_nn::l2_normalize;
use serde::Serialize;

use crate::{Error, Result};

const EMBEDDINGS_FILE: &str = "embeddings.safetensors";
const IDS_FILE: &str = "ids.json";
const PROVENANCE_FILE: &str = "provenance.json";

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
    pub id: String,
    /// Row of the index.
    pub index: usize,
    /// Cosine similarity to the query.
    pub score: f32,
}

/// Embeddings `[n, dim]` (normalised on insertion) and their ids.
#[derive(Debug, Clone)]
pub struct EmbeddingIndex {
    ids: Vec<String>,
    embeddings: Tensor,
    provenance: Option<String>,
}

impl EmbeddingIndex {
    pub fn new(dim: usize, device: &Device) -> Result<Self> {
        Ok(Self { ids: vec![], embeddings: Tensor::zeros((0, dim), DType::F32, device)?, provenance: None })
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn dim(&self) -> usize {
        self.embeddings.dim(1).unwrap_or(0)
    }

    pub fn ids(&self) -> &[String] {
        &self.ids
    }

    /// Adds `embeddings` `[n, dim]` under `ids` (normalised here, so any embedding may be added).
    pub fn add(&mut self, ids: Vec<String>, embeddings: &Tensor) -> Result<()> {
        let (n, dim) = embeddings.dims2()?;
        if n != ids.len() || dim != self.dim() {
            return Err(Error::Invalid(format!(
                "index add: {} ids for {n} embeddings of width {dim}; the index holds width {}",
                ids.len(),
                self.dim()
            )));
        }
        let normalised = l2_normalize(&embeddings.to_dtype(DType::F32)?.to_device(self.embeddings.device())?)?;
        self.embeddings = Tensor::cat(&[&self.embeddings, &normalised], 0)?;
        self.ids.extend(ids);
        Ok(())
    }

    /// The `k` nearest entries of each query `[q, dim]` by cosine, best first.
    pub fn search(&self, queries: &Tensor, k: usize) -> Result<Vec<Vec<Hit>>> {
        let queries = l2_normalize(&queries.to_dtype(DType::F32)?.to_device(self.embeddings.device())?)?;
        if self.is_empty() {
            return Ok(vec![vec![]; queries.dim(0)?]);
        }
        let scores: Vec<Vec<f32>> = queries.matmul(&self.embeddings.t()?)?.to_vec2()?;
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

    /// Writes the index folder.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
        let tensors = [("embeddings".to_string(), self.embeddings.clone())].into_iter().collect();
        ctxalign_data::write_safetensors(&dir.join(EMBEDDINGS_FILE), &tensors)?;
        write_atomic(&dir.join(IDS_FILE), serde_json::to_string(&self.ids).expect("JSON").as_bytes())?;
        let provenance = dir.join(PROVENANCE_FILE);
        match &self.provenance {
            Some(p) => write_atomic(&provenance, serde_json::to_string(p).expect("JSON").as_bytes())?,
            // An earlier save's provenance must not outlive the embeddings it described.
            None if provenance.exists() => std::fs::remove_file(&provenance).map_err(Error::io(&provenance))?,
            None => {}
        }
        Ok(())
    }

    /// Reads an index folder written by [`EmbeddingIndex::save`].
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let ids: Vec<String> = ctxalign_models::loading::read_json(&dir.join(IDS_FILE))?;
        let file = dir.join(EMBEDDINGS_FILE);
        let mut tensors = candle_core::safetensors::load(&file, device)
            .map_err(|e| Error::format(&file, format!("not a readable safetensors file: {e}")))?;
        let embeddings = tensors.remove("embeddings").ok_or_else(|| Error::format(&file, "no tensor `embeddings`"))?;
        let (n, _) = embeddings
            .dims2()
            .map_err(|_| Error::format(&file, format!("`embeddings` must be [n, dim], got {:?}", embeddings.dims())))?;
        if n != ids.len() {
            return Err(Error::format(&file, format!("{n} embeddings but {} ids in {IDS_FILE}", ids.len())));
        }
        let provenance_file = dir.join(PROVENANCE_FILE);
        let provenance = match provenance_file.is_file() {
            true => Some(ctxalign_models::loading::read_json::<String>(&provenance_file)?),
            false => None,
        };
        Ok(Self { ids, embeddings: embeddings.to_dtype(DType::F32)?, provenance })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

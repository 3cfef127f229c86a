//! Data for ctxalign.
//!
//! - [`image`]: decoding (JPEG/PNG/WebP/…, gray/RGBA/16-bit/CMYK → RGB) and preprocessing equal to
//!   HF's BLIP and CLIP image processors;
//! - [`text`]: BLIP's caption cleaning and tokenization with truncation accounting;
//! - readers for real formats: [`imagecode`], [`captions`] (BLIP caption JSON, Flickr8k, Karpathy
//!   splits), [`mmvp`], [`classification`] (image folders, CIFAR, MNIST, UCI digits);
//! - [`loader`]: parallel, prefetching, deterministic batches with augmentation and a bad-input
//!   policy;
//! - [`shards`]: WebDataset tar shards — brace-pattern shard lists, a tar reader and writer,
//!   sharding of caption and IMAGECODE data, a scan before training and a streaming loader split
//!   over data-parallel ranks and reader threads;
//! - [`vignettes`]: the built-in contextual benchmark, generated procedurally with checked
//!   descriptions, written in the formats above;
//! - [`lock`]: the lock a job holds on the folder it writes (a run, shards), so that two jobs never
//!   write into one;
//! - [`walk`]: the folder walker every reader shares (each real file once, link loops not followed).
//!
//! Every reader fails with a [`DataError`] that names the file (and line, key or set).

pub mod captions;
pub mod classification;
pub mod error;
pub mod image;
pub mod imagecode;
pub mod input;
pub mod jpeg;
pub mod loader;
pub mod lock;
pub mod mmvp;
pub mod rng;
pub mod shards;
pub mod text;
pub mod vignettes;
pub mod walk;

pub use error::{resolve_under, DataError};
pub use image::{
    check_image, check_image_bytes, decode_image, decode_image_bytes, decode_image_bytes_reporting,
    decode_image_reporting, pillow_rgb, DecodeOptions, Decoded, ImageError, ImageProcessor, Resize, ResizeMode,
};
pub use input::{image_inputs, ImageInput};
pub use text::{clean_caption, CaptionCleaning, TextError, TextTokenizer, TokenizedBatch};

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, then a rename, so a
/// crash never leaves a half-written file behind.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<(), DataError> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// Streams a file to `path` atomically, like [`write_atomic`], for content too large to hold in
/// memory twice: `write` fills a buffered temporary file in the same folder, which is synced and
/// renamed over `path` only when `write` succeeds (on failure it is removed and `path` is untouched).
pub fn write_atomic_with(
    path: &std::path::Path,
    write: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
) -> Result<(), DataError> {
    use std::io::Write;
    let (dir, tmp) = staging(path)?;
    let file = std::fs::File::create(&tmp).map_err(|e| DataError::write(&tmp, e))?;
    let mut buffered = std::io::BufWriter::new(file);
    let written = write(&mut buffered)
        .and_then(|_| buffered.flush())
        .and_then(|_| buffered.get_ref().sync_all());
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(DataError::write(&tmp, e));
    }
    drop(buffered);
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        DataError::write(path, e)
    })?;
    sync_dir(dir);
    Ok(())
}

/// The folder of `path` (created) and the temporary file beside it that is renamed over `path`.
pub(crate) fn staging(path: &std::path::Path) -> Result<(&std::path::Path, std::path::PathBuf), DataError> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| DataError::write(dir, e))?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    Ok((dir, dir.join(format!(".{name}.tmp{}", std::process::id()))))
}

/// Copies `src` to `dst` atomically (a temporary copy in `dst`'s folder, synced, then renamed), for
/// files too large to hold in memory.
pub fn copy_atomic(src: &std::path::Path, dst: &std::path::Path) -> Result<(), DataError> {
    let (dir, tmp) = staging(dst)?;
    let copied = std::fs::copy(src, &tmp)
        .map_err(|e| DataError::io(src, e))
        .and_then(|_| std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| DataError::write(&tmp, e)))
        .and_then(|_| std::fs::rename(&tmp, dst).map_err(|e| DataError::write(dst, e)));
    if copied.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    copied?;
    sync_dir(dir);
    Ok(())
}

/// Writes tensors to a safetensors file atomically ([`write_atomic`]: a synced temporary file
/// renamed over `path`), so a crash leaves the old file or the new one, never half of one.
/// Serialising needs the values in host memory, hence the copy to the CPU.
pub fn write_safetensors(
    path: &std::path::Path,
    tensors: &std::collections::BTreeMap<String, candle_core::Tensor>,
) -> Result<(), DataError> {
    let contiguous: Vec<(String, candle_core::Tensor)> = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_device(&candle_core::Device::Cpu)?.contiguous()?)))
        .collect::<candle_core::Result<_>>()?;
    let bytes = safetensors::tensor::serialize(contiguous.iter().map(|(k, t)| (k.as_str(), t)), None)
        .map_err(|e| DataError::write(path, std::io::Error::other(e.to_string())))?;
    write_atomic(path, &bytes)
}

/// Makes renames in `dir` durable on POSIX; not possible (nor needed) everywhere, hence best effort.
pub fn sync_dir(dir: &std::path::Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// The README's example, run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

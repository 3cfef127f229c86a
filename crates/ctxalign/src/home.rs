//! Where ctxalign keeps what it makes by default: the built-in benchmark it generates, the runs
//! whose `--out` was not given, and the default model when it is installed.
//!
//! The folder is `$CTXALIGN_HOME` when set, else the platform's cache folder:
//! `$XDG_CACHE_HOME/ctxalign` or `~/.cache/ctxalign` on Linux and other Unixes,
//! `~/Library/Caches/ctxalign` on macOS, `%LOCALAPPDATA%\ctxalign` on Windows. Never the current
//! folder: an installed `ctxalign` resolves the same defaults wherever it is started.
//!
//! The shipped folders of `models/` — the default BLIP (`blip-vignettes-small`, 7.7 MB) and
//! ContextCLIP's default tokenizer (`bert-base-uncased-tokenizer`) — are read from the source
//! checkout when the program runs from one (`cargo run`, the examples, xtask, the tests). The
//! `ctxalign` binary also embeds them ([`EmbeddedFolder`]) and, run as an installed program, writes
//! each once into `<home>/models/<name>-<fingerprint>/`: an installed binary reads its own copy even
//! where the checkout it was built from still exists, since that checkout may have changed since
//! ([`runs_from_checkout`]).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::{Error, Fingerprint, Result};

/// The variable that overrides the default folder.
pub const HOME_VARIABLE: &str = "CTXALIGN_HOME";

/// The name of the default model's folder, in the checkout and under `<home>/models`.
pub const DEFAULT_MODEL_NAME: &str = "blip-vignettes-small";

/// The name of the default BERT WordPiece tokenizer's folder (ContextCLIP's text tower).
pub const DEFAULT_TOKENIZER_NAME: &str = "bert-base-uncased-tokenizer";

/// ctxalign's data and cache folder (see the module docs); not created here.
pub fn home_dir() -> Result<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = var(HOME_VARIABLE) {
        return Ok(dir);
    }
    let cache = if cfg!(windows) {
        var("LOCALAPPDATA")
    } else if cfg!(target_os = "macos") {
        var("HOME").map(|h| h.join("Library").join("Caches"))
    } else {
        var("XDG_CACHE_HOME").or_else(|| var("HOME").map(|h| h.join(".cache")))
    };
    cache.map(|c| c.join("ctxalign")).ok_or_else(|| {
        Error::Invalid(format!(
            "no folder for ctxalign's data: set {HOME_VARIABLE} (or HOME / XDG_CACHE_HOME / LOCALAPPDATA)"
        ))
    })
}

/// Where the built-in Vignettes benchmark is generated (once) when a command is given no data.
pub fn builtin_data_dir() -> Result<PathBuf> {
    Ok(home_dir()?.join("vignettes-default"))
}

/// The default output folder of a run kind (`contextblip-s0`, `contextclip`, ...):
/// `<home>/runs/<kind>`.
pub fn run_dir(kind: &str) -> Result<PathBuf> {
    Ok(home_dir()?.join("runs").join(kind))
}

/// A default output file (`zero-shot.json`, `classify.json`): `<home>/results/<name>`.
pub fn results_file(name: &str) -> Result<PathBuf> {
    Ok(home_dir()?.join("results").join(name))
}

/// The `models/` folder of the source checkout this crate was built from.
fn checkout_models() -> PathBuf {
    checkout_root().join("models")
}

/// The workspace root of the checkout this crate was built from.
fn checkout_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Whether this program is one of its checkout's own builds, which read the checkout's `models/`:
/// a program with no embedded copy (the library's tests, the examples, xtask: they are built and
/// run in the checkout), a binary inside the checkout (its `target/`), or one that cargo started
/// from this checkout (`cargo run`, `cargo test` set `CARGO_MANIFEST_DIR` to a package of it). An
/// installed binary (`cargo install` copies it elsewhere) is none of these: whether the checkout it
/// was built from still exists says nothing about whether its models are the ones built in.
pub fn runs_from_checkout(embedded: bool) -> bool {
    let exe = std::env::current_exe().ok();
    let started_by_cargo = std::env::var_os("CARGO_MANIFEST_DIR");
    from_checkout(embedded, exe.as_deref(), started_by_cargo.as_deref().map(Path::new), &checkout_root())
}

/// [`runs_from_checkout`] with its inputs: the executable's path, the package folder cargo set for
/// the process (if any), the checkout's root.
fn from_checkout(embedded: bool, exe: Option<&Path>, cargo_package: Option<&Path>, root: &Path) -> bool {
    if !embedded {
        return true;
    }
    let Ok(root) = std::fs::canonicalize(root) else { return false };
    let inside = |p: &Path| std::fs::canonicalize(p).is_ok_and(|p| p.starts_with(&root));
    exe.is_some_and(inside) || cargo_package.is_some_and(inside)
}

/// A folder of `models/` compiled into a binary: its name, file names and contents.
#[derive(Debug)]
pub struct EmbeddedFolder {
    /// The folder's name under `models/` (`blip-vignettes-small`).
    pub name: &'static str,
    /// Each file's name in the folder and its bytes.
    pub files: &'static [(&'static str, &'static [u8])],
}

static EMBEDDED: OnceLock<&'static [&'static EmbeddedFolder]> = OnceLock::new();

/// Makes `folders` the shipped folders of this process where no checkout provides them (the
/// `ctxalign` binary calls this at start; it costs nothing until one is needed).
pub fn register_embedded(folders: &'static [&'static EmbeddedFolder]) {
    let _ = EMBEDDED.set(folders);
}

/// A shipped folder of `models/` by name: the checkout's when this program is one of its builds
/// ([`runs_from_checkout`]) and the folder is there (every embedded file present), else the
/// embedded copy installed under [`home_dir`] (written on first use), else an error that says what
/// to pass instead.
pub fn shipped_folder(name: &str, instead: &str) -> Result<PathBuf> {
    let checkout = checkout_models().join(name);
    let embedded = EMBEDDED.get().and_then(|all| all.iter().find(|f| f.name == name));
    let complete = runs_from_checkout(embedded.is_some())
        && match embedded {
            Some(folder) => folder.files.iter().all(|(file, _)| checkout.join(file).is_file()),
            None => checkout.is_dir(),
        };
    if complete {
        return Ok(checkout);
    }
    match embedded {
        Some(folder) => install_embedded(folder, &home_dir()?.join("models")),
        None => Err(Error::Invalid(format!(
            "{} is not there and this program does not embed it; {instead}",
            checkout.display()
        ))),
    }
}

/// The default model's folder ([`shipped_folder`] `blip-vignettes-small`).
pub fn default_model_dir() -> Result<PathBuf> {
    shipped_folder(DEFAULT_MODEL_NAME, "pass --model (a BLIP folder or a hub id such as Salesforce/blip-itm-base-coco)")
}

/// The default BERT tokenizer file ([`shipped_folder`] `bert-base-uncased-tokenizer`).
pub fn default_tokenizer() -> Result<PathBuf> {
    Ok(shipped_folder(DEFAULT_TOKENIZER_NAME, "pass --tokenizer (a BERT tokenizer.json)")?.join("tokenizer.json"))
}

/// Writes `model` to `<models>/<name>-<fingerprint>/` unless it is there, and returns that folder.
/// The files go into a temporary folder first, renamed into place whole, so a folder that exists
/// is complete; the fingerprint covers every name and byte, so another build's model never
/// shadows this one's.
pub fn install_embedded(model: &EmbeddedFolder, models: &Path) -> Result<PathBuf> {
    let mut fp = Fingerprint::new();
    for (name, bytes) in model.files {
        fp.update(name.as_bytes());
        fp.update(&(bytes.len() as u64).to_le_bytes());
        fp.update(bytes);
    }
    let dir = models.join(format!("{}-{}", model.name, fp.hex()));
    if dir.is_dir() {
        return Ok(dir);
    }
    std::fs::create_dir_all(models).map_err(Error::io(models))?;
    let staging = models.join(format!(".{}-{}.partial", model.name, std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(Error::io(&staging))?;
    for (name, bytes) in model.files {
        let path = staging.join(name);
        std::fs::write(&path, bytes).map_err(Error::io(&path))?;
    }
    if let Err(e) = std::fs::rename(&staging, &dir) {
        let _ = std::fs::remove_dir_all(&staging);
        // Another process installed the same model meanwhile: theirs is as good.
        if !dir.is_dir() {
            return Err(Error::Io { path: dir, source: e });
        }
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checkout's models are read by its own builds only: a binary under it or started by cargo
    /// in it, or a program with no embedded copy; an installed binary elsewhere is not one, whether
    /// or not the checkout it was built from exists.
    #[test]
    fn only_the_checkouts_own_builds_read_its_models() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("checkout");
        std::fs::create_dir_all(root.join("target/release")).unwrap();
        std::fs::create_dir_all(root.join("crates/ctxalign")).unwrap();
        std::fs::create_dir_all(tmp.path().join("bin")).unwrap();
        let (built, installed) = (root.join("target/release/ctxalign"), tmp.path().join("bin/ctxalign"));
        for exe in [&built, &installed] {
            std::fs::write(exe, b"").unwrap();
        }
        assert!(from_checkout(true, Some(&built), None, &root));
        assert!(!from_checkout(true, Some(&installed), None, &root));
        assert!(from_checkout(true, Some(&installed), Some(&root.join("crates/ctxalign")), &root));
        assert!(!from_checkout(true, Some(&installed), Some(tmp.path()), &root));
        assert!(from_checkout(false, Some(&installed), None, &root), "nothing embedded: the checkout's");
        assert!(!from_checkout(true, Some(&built), None, &tmp.path().join("gone")), "no checkout");
    }

    #[test]
    fn installs_once_completely_and_by_content() {
        let tmp = tempfile::tempdir().unwrap();
        static A: EmbeddedFolder = EmbeddedFolder { name: "m", files: &[("config.json", b"{}"), ("w.bin", b"123")] };
        static B: EmbeddedFolder = EmbeddedFolder { name: "m", files: &[("config.json", b"{}"), ("w.bin", b"124")] };
        let a = install_embedded(&A, tmp.path()).unwrap();
        assert_eq!(std::fs::read(a.join("w.bin")).unwrap(), b"123");
        // Installed folders are reused, and a different content gets its own folder.
        std::fs::write(a.join("marker"), b"").unwrap();
        assert_eq!(install_embedded(&A, tmp.path()).unwrap(), a);
        assert!(a.join("marker").is_file());
        let b = install_embedded(&B, tmp.path()).unwrap();
        assert_ne!(a, b);
        assert_eq!(std::fs::read(b.join("w.bin")).unwrap(), b"124");
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".partial"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}

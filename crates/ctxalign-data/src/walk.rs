//! The one folder walker every reader and command uses: each real file is listed once, however many
//! links reach it, and a link back into a folder being walked (a loop) is not followed.
//!
//! Following paths alone, a folder holding a link to its parent is walked again inside itself until
//! the path grows too long (a folder of 6 images then lists hundreds), and two links to one image
//! list it twice. Here every folder and file is identified by its canonical path (links resolved):
//! a folder reached again below itself is a loop ([`Walker::loops`]), a folder or file reached
//! again elsewhere is an alias of the first path it was listed under ([`Walker::aliases`]); neither
//! is listed again, and both are kept so callers can say what they left out.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::DataError;

/// How far a [`Walker`] goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalkOptions {
    /// Descend into sub-folders (else only the folder's own entries).
    pub recursive: bool,
    /// Leave out sub-folders whose name starts with `.` (an index or cache kept beside the data).
    pub skip_hidden_folders: bool,
}

impl WalkOptions {
    /// The folder's own entries only.
    pub fn flat() -> Self {
        Self { recursive: false, skip_hidden_folders: true }
    }

    /// Every sub-folder but hidden ones.
    pub fn recursive() -> Self {
        Self { recursive: true, skip_hidden_folders: true }
    }
}

/// A walk over one or more folders that lists each real file and folder once (see the module docs).
/// One walker over several folders (the class folders of a data set) also finds a file reached from
/// two of them.
#[derive(Debug)]
pub struct Walker {
    options: WalkOptions,
    /// Canonical path → the path it was first listed under.
    seen_files: HashMap<PathBuf, PathBuf>,
    seen_folders: HashMap<PathBuf, PathBuf>,
    /// `(entry, first)`: `entry` reaches the same file or folder as `first`, listed before it.
    pub aliases: Vec<(PathBuf, PathBuf)>,
    /// Links to a folder that holds them (directly or further up): not followed.
    pub loops: Vec<PathBuf>,
}

impl Walker {
    pub fn new(options: WalkOptions) -> Self {
        Self { options, seen_files: HashMap::new(), seen_folders: HashMap::new(), aliases: vec![], loops: vec![] }
    }

    /// The files under `root` that `keep` accepts, in name order (depth first), each real file once.
    /// A link whose target is missing is listed (as its own path): reading it then fails naming it,
    /// where leaving it out would lose it silently.
    pub fn files(&mut self, root: &Path, keep: impl Fn(&Path) -> bool) -> Result<Vec<PathBuf>, DataError> {
        let canonical = self.enter_root(root)?;
        let mut out = vec![];
        let mut ancestors = vec![canonical];
        self.visit(root, &mut ancestors, &keep, &mut out)?;
        Ok(out)
    }

    /// The folders directly under `root`, in name order, each real folder once (hidden ones left out
    /// as the options say).
    pub fn folders(&mut self, root: &Path) -> Result<Vec<PathBuf>, DataError> {
        let canonical = self.enter_root(root)?;
        let mut out = vec![];
        for path in sorted_entries(root)? {
            if !path.is_dir() || self.hidden(&path) {
                continue;
            }
            let real = canonicalize(&path)?;
            if real == canonical || canonical.starts_with(&real) {
                self.loops.push(path);
            } else if let Some(first) = self.seen_folders.get(&real) {
                self.aliases.push((path, first.clone()));
            } else {
                self.seen_folders.insert(real, path.clone());
                out.push(path);
            }
        }
        Ok(out)
    }

    /// What the walk left out, one line each, for a caller's report (empty when nothing was).
    pub fn left_out(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .aliases
            .iter()
            .map(|(entry, first)| format!("{}: the same file or folder as {}", entry.display(), first.display()))
            .collect();
        lines.extend(
            self.loops
                .iter()
                .map(|l| format!("{}: a link back into a folder it is in (a loop), not followed", l.display())),
        );
        lines
    }

    fn enter_root(&mut self, root: &Path) -> Result<PathBuf, DataError> {
        let canonical = canonicalize(root)?;
        if !canonical.is_dir() {
            return Err(DataError::format(root, "not a folder"));
        }
        self.seen_folders.entry(canonical.clone()).or_insert_with(|| root.to_owned());
        Ok(canonical)
    }

    fn hidden(&self, path: &Path) -> bool {
        self.options.skip_hidden_folders && path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'))
    }

    fn visit(
        &mut self,
        dir: &Path,
        ancestors: &mut Vec<PathBuf>,
        keep: &dyn Fn(&Path) -> bool,
        out: &mut Vec<PathBuf>,
    ) -> Result<(), DataError> {
        for path in sorted_entries(dir)? {
            // `metadata` follows links: a link to a folder is a folder here.
            let Ok(meta) = std::fs::metadata(&path) else {
                // A dangling link (or an entry gone meanwhile).
                if keep(&path) {
                    out.push(path);
                }
                continue;
            };
            if meta.is_dir() {
                if !self.options.recursive || self.hidden(&path) {
                    continue;
                }
                let real = canonicalize(&path)?;
                if ancestors.contains(&real) {
                    self.loops.push(path);
                    continue;
                }
                if let Some(first) = self.seen_folders.get(&real) {
                    self.aliases.push((path, first.clone()));
                    continue;
                }
                self.seen_folders.insert(real.clone(), path.clone());
                ancestors.push(real);
                self.visit(&path, ancestors, keep, out)?;
                ancestors.pop();
            } else if keep(&path) {
                let real = canonicalize(&path)?;
                match self.seen_files.get(&real) {
                    Some(first) => self.aliases.push((path, first.clone())),
                    None => {
                        self.seen_files.insert(real, path.clone());
                        out.push(path);
                    }
                }
            }
        }
        Ok(())
    }
}

/// The entries of `dir`, sorted by name.
fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut paths = std::fs::read_dir(dir)
        .map_err(|e| DataError::io(dir, e))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| DataError::io(dir, e))?;
    paths.sort();
    Ok(paths)
}

fn canonicalize(path: &Path) -> Result<PathBuf, DataError> {
    std::fs::canonicalize(path).map_err(|e| DataError::io(path, e))
}

/// Whether `path` names an image by its extension (jpg, jpeg, png, webp, bmp, gif, tif, tiff; any
/// case): what the image-folder readers list.
pub fn is_image_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// The extensions [`is_image_file`] accepts.
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"];

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"x").unwrap();
    }

    /// A link to an ancestor, a link to a sibling folder, two links to one file: each real file is
    /// listed once, under the first path that reaches it, and what was left out is reported.
    #[test]
    fn each_real_file_once_and_loops_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("photos");
        for f in ["a.jpg", "b.png", "sub/c.jpg", "sub/deep/d.jpg", "notes.txt", ".index/e.jpg"] {
            touch(&root.join(f));
        }
        symlink("..", root.join("sub/up")).unwrap(); // a loop through the parent
        symlink(".", root.join("sub/deep/here")).unwrap(); // a loop onto itself
        symlink(root.join("sub"), root.join("z-again")).unwrap(); // an alias folder
        symlink(root.join("a.jpg"), root.join("a-copy.jpg")).unwrap(); // an alias file
        symlink(root.join("gone.jpg"), root.join("dangling.jpg")).unwrap();
        let mut w = Walker::new(WalkOptions::recursive());
        let files = w.files(&root, is_image_file).unwrap();
        let rel: Vec<String> = files.iter().map(|p| p.strip_prefix(&root).unwrap().display().to_string()).collect();
        // `a-copy.jpg` sorts before `a.jpg`: the first path that reaches a file is the one listed.
        assert_eq!(rel, ["a-copy.jpg", "b.png", "dangling.jpg", "sub/c.jpg", "sub/deep/d.jpg"]);
        assert_eq!(w.loops.len(), 2, "{:?}", w.loops);
        assert_eq!(w.aliases.len(), 2, "{:?}", w.aliases);
        assert!(w.left_out().iter().any(|l| l.contains("z-again") && l.contains("same file or folder")));
        // Flat: the folder's own entries only.
        let flat = Walker::new(WalkOptions::flat()).files(&root, is_image_file).unwrap();
        assert_eq!(flat.len(), 3);
        // Folders: each real folder once; a link to the root itself is a loop.
        symlink(&root, root.join("self")).unwrap();
        let mut w = Walker::new(WalkOptions::flat());
        let folders = w.folders(&root).unwrap();
        let names: Vec<_> = folders.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["sub"]);
        assert_eq!((w.aliases.len(), w.loops.len()), (1, 1));
        // Not a folder, or missing: named errors.
        assert!(matches!(
            Walker::new(WalkOptions::flat()).files(&root.join("a.jpg"), |_| true),
            Err(DataError::Format { .. })
        ));
        assert!(matches!(
            Walker::new(WalkOptions::flat()).files(&root.join("nope"), |_| true),
            Err(DataError::NotFound { .. })
        ));
    }
}

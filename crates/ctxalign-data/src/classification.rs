//! Classification data: image folders, CIFAR-10/100 binary, MNIST IDX, the UCI digits CSV.
//!
//! Every reader returns a [`ClassificationSet`]: class names (usable in prompts) and items that are
//! either image files (decoded later, in the loader) or pixels already in memory.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::RgbImage;

use crate::error::{read_bytes, read_text, DataError};
use crate::image::{check_image, DecodeOptions};
use crate::loader::{find_unusable, without_unusable, BadInputPolicy, Skipped};
use crate::walk::{is_image_file, WalkOptions, Walker};

/// Where an item's pixels are.
#[derive(Debug, Clone)]
pub enum ImageSource {
    File(PathBuf),
    /// Decoded RGB pixels (CIFAR, MNIST, UCI digits), shared with the set.
    Pixels(Arc<RgbImage>),
}

#[derive(Debug, Clone)]
pub struct ClassItem {
    pub source: ImageSource,
    pub label: usize,
}

impl ClassItem {
    /// The header check of its file ([`check_image`]); pixels in memory need nothing.
    pub fn check(&self, decode: DecodeOptions) -> Result<(), DataError> {
        match &self.source {
            ImageSource::File(path) => Ok(check_image(path, decode).map(drop)?),
            ImageSource::Pixels(_) => Ok(()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ClassificationSet {
    pub classes: Vec<String>,
    pub items: Vec<ClassItem>,
}

impl ClassificationSet {
    /// Items per class.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes.len()];
        for it in &self.items {
            counts[it.label] += 1;
        }
        counts
    }

    /// `Err(DataError::EmptySplit)` naming `what` ("the test split of cifar10") when the set has
    /// no item; with the class count in the message, since a split by class of tiny classes is the
    /// usual cause.
    pub fn require_items(&self, what: &str) -> Result<(), DataError> {
        if !self.items.is_empty() {
            return Ok(());
        }
        Err(DataError::EmptySplit {
            what: what.to_string(),
            detail: format!(
                " ({} classes; a class needs at least 2 images to appear in both parts of a 70/30 split)",
                self.classes.len()
            ),
        })
    }

    /// Checks every image file before any is used ([`check_image`], in parallel; pixels in memory
    /// need nothing). Under [`BadInputPolicy::Skip`] the set comes back without the bad items, with
    /// what was left out; under [`BadInputPolicy::Fail`] any bad item is an error.
    pub fn checked(mut self, decode: DecodeOptions, policy: BadInputPolicy) -> Result<(Self, Vec<Skipped>), DataError> {
        let name = |item: &ClassItem| match &item.source {
            ImageSource::File(path) => path.display().to_string(),
            ImageSource::Pixels(_) => "an image in memory".into(),
        };
        let bad = find_unusable(&self.items, "images", policy, name, |item| item.check(decode))?;
        self.items = without_unusable(self.items, &bad);
        Ok((self, bad))
    }
}

/// `root/<class>/<image>` (torchvision's `ImageFolder`): classes are the sorted sub-folder names, a
/// sub-folder's name with `_` read as a space in prompts is left to the caller. Files that are not
/// images by extension are ignored; an empty class folder is an error. Folders and files are listed
/// by the shared [`Walker`]: a class folder or image reached twice through links (two names for one
/// class, one image labelled twice) is an error naming both paths, not a silent duplicate, and a
/// link loop is not followed.
pub fn read_image_folder(root: &Path) -> Result<ClassificationSet, DataError> {
    let mut walker = Walker::new(WalkOptions::flat());
    let class_dirs = walker.folders(root)?;
    if class_dirs.is_empty() {
        return Err(DataError::format(root, "no class folders"));
    }
    let mut classes = vec![];
    let mut items = vec![];
    for (label, dir) in class_dirs.iter().enumerate() {
        classes.push(dir.file_name().unwrap_or_default().to_string_lossy().into_owned());
        let files = walker.files(dir, is_image_file)?;
        if files.is_empty() {
            return Err(DataError::format(dir, "class folder holds no images"));
        }
        items.extend(files.into_iter().map(|f| ClassItem { source: ImageSource::File(f), label }));
    }
    if let Some((entry, first)) = walker.aliases.first() {
        return Err(DataError::format(
            entry,
            format!(
                "the same file or folder as {} (through a link): one image would count twice, or under two \
                 classes",
                first.display()
            ),
        ));
    }
    Ok(ClassificationSet { classes, items })
}

/// Which CIFAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cifar {
    /// Records of 1 label byte + 3072 pixel bytes; names from `batches.meta.txt`.
    Ten,
    /// Records of coarse + fine label bytes + 3072 pixel bytes; fine labels, names from
    /// `fine_label_names.txt`.
    Hundred,
}

/// Reads CIFAR binary batches (`data_batch_1.bin`…, `test_batch.bin`, or `train.bin`/`test.bin` for
/// CIFAR-100) from `dir`. Pixels are stored channel-planar (1024 R, 1024 G, 1024 B), 32×32.
pub fn read_cifar(dir: &Path, which: Cifar, files: &[&str]) -> Result<ClassificationSet, DataError> {
    let (label_bytes, names_file, n_classes) = match which {
        Cifar::Ten => (1, "batches.meta.txt", 10),
        Cifar::Hundred => (2, "fine_label_names.txt", 100),
    };
    let names_path = dir.join(names_file);
    let classes: Vec<String> =
        read_text(&names_path)?.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    if classes.len() != n_classes {
        return Err(DataError::format(&names_path, format!("{} class names, expected {n_classes}", classes.len())));
    }
    let record = label_bytes + 3072;
    let mut items = vec![];
    for f in files {
        let path = dir.join(f);
        let bytes = read_bytes(&path)?;
        if bytes.is_empty() || bytes.len() % record != 0 {
            return Err(DataError::format(
                &path,
                format!("{} bytes is not a whole number of {record}-byte records", bytes.len()),
            ));
        }
        for (i, rec) in bytes.chunks_exact(record).enumerate() {
            let label = rec[label_bytes - 1] as usize;
            if label >= n_classes {
                return Err(DataError::format(&path, format!("record {i}: label {label} >= {n_classes}")));
            }
            let px = &rec[label_bytes..];
            let img = RgbImage::from_fn(32, 32, |x, y| {
                let o = (y * 32 + x) as usize;
                image::Rgb([px[o], px[1024 + o], px[2048 + o]])
            });
            items.push(ClassItem { source: ImageSource::Pixels(Arc::new(img)), label });
        }
    }
    Ok(ClassificationSet { classes, items })
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Reads MNIST-style IDX files (images: magic 0x803, `[n, rows, cols]` u8; labels: magic 0x801,
/// `[n]` u8), optionally gzipped. Classes are "0".."9" (or as many as the largest label needs).
pub fn read_mnist(images: &Path, labels: &Path) -> Result<ClassificationSet, DataError> {
    let ib = read_bytes(images)?;
    let lb = read_bytes(labels)?;
    if ib.len() < 16 || be_u32(&ib, 0) != 0x0803 {
        return Err(DataError::format(images, "not an IDX image file (magic 0x00000803)"));
    }
    if lb.len() < 8 || be_u32(&lb, 0) != 0x0801 {
        return Err(DataError::format(labels, "not an IDX label file (magic 0x00000801)"));
    }
    let (n, rows, cols) = (be_u32(&ib, 4) as usize, be_u32(&ib, 8) as usize, be_u32(&ib, 12) as usize);
    if ib.len() != 16 + n * rows * cols {
        return Err(DataError::format(
            images,
            format!("header says {n}x{rows}x{cols} but the file has {} pixel bytes", ib.len() - 16),
        ));
    }
    if be_u32(&lb, 4) as usize != n || lb.len() != 8 + n {
        return Err(DataError::format(labels, format!("expected {n} labels to match {}", images.display())));
    }
    let labels_v: Vec<usize> = lb[8..].iter().map(|&l| l as usize).collect();
    let n_classes = labels_v.iter().max().map_or(0, |m| m + 1).max(10);
    let items = (0..n)
        .map(|i| {
            let px = &ib[16 + i * rows * cols..16 + (i + 1) * rows * cols];
            let img =
                RgbImage::from_fn(cols as u32, rows as u32, |x, y| image::Rgb([px[y as usize * cols + x as usize]; 3]));
            ClassItem { source: ImageSource::Pixels(Arc::new(img)), label: labels_v[i] }
        })
        .collect();
    Ok(ClassificationSet { classes: (0..n_classes).map(|c| c.to_string()).collect(), items })
}

/// Reads the UCI optical digits CSV (optionally `.gz`): 64 values 0..16 (8×8, row-major) and a label
/// 0..9 per line. Pixels are scaled to 0..255 (`v · 255 / 16`, rounded) and drawn white on black as
/// MNIST is, so the same prompts and preprocessing apply.
pub fn read_uci_digits(file: &Path) -> Result<ClassificationSet, DataError> {
    parse_uci_digits(&read_text(file)?, file)
}

/// The UCI digits test part (1,797 images) shipped inside this crate (`data/uci-digits`, CC BY 4.0;
/// see its README for the source).
pub fn embedded_uci_digits() -> ClassificationSet {
    const GZ: &[u8] = include_bytes!("../data/uci-digits/digits.csv.gz");
    use std::io::Read;
    let mut text = String::new();
    flate2::read::GzDecoder::new(GZ).read_to_string(&mut text).expect("the embedded copy is valid gzip");
    parse_uci_digits(&text, Path::new("<embedded>/uci-digits/digits.csv.gz")).expect("the embedded copy parses")
}

/// Parses UCI digits CSV text; `file` names it in errors.
pub fn parse_uci_digits(text: &str, file: &Path) -> Result<ClassificationSet, DataError> {
    let mut items = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let vals: Vec<u32> = line
            .split(',')
            .map(|v| {
                v.trim().parse::<u32>().map_err(|_| DataError::line(file, i + 1, format!("`{v}` is not an integer")))
            })
            .collect::<Result<_, _>>()?;
        if vals.len() != 65 {
            return Err(DataError::line(file, i + 1, format!("{} values, expected 64 pixels + 1 label", vals.len())));
        }
        if let Some(v) = vals[..64].iter().find(|&&v| v > 16) {
            return Err(DataError::line(file, i + 1, format!("pixel value {v} outside 0..16")));
        }
        if vals[64] > 9 {
            return Err(DataError::line(file, i + 1, format!("label {} outside 0..9", vals[64])));
        }
        let img = RgbImage::from_fn(8, 8, |x, y| image::Rgb([((vals[(y * 8 + x) as usize] * 255 + 8) / 16) as u8; 3]));
        items.push(ClassItem { source: ImageSource::Pixels(Arc::new(img)), label: vals[64] as usize });
    }
    if items.is_empty() {
        return Err(DataError::format(file, "no rows"));
    }
    Ok(ClassificationSet { classes: (0..10).map(|c| c.to_string()).collect(), items })
}

/// Deterministic stratified split of a set into `(train, test)` with `test_share` of each class
/// in the test part (for sets that ship without a split, such as the UCI digits).
pub fn stratified_split(set: &ClassificationSet, test_share: f64, seed: u64) -> (ClassificationSet, ClassificationSet) {
    let mut by_class: Vec<Vec<usize>> = vec![vec![]; set.classes.len()];
    for (i, item) in set.items.iter().enumerate() {
        by_class[item.label].push(i);
    }
    let mut rng = crate::rng::Rng::new(seed);
    let (mut train, mut test) = (vec![], vec![]);
    for mut members in by_class {
        rng.shuffle(&mut members);
        let n_test = (members.len() as f64 * test_share).round() as usize;
        test.extend(members[..n_test].iter().map(|&i| set.items[i].clone()));
        train.extend(members[n_test..].iter().map(|&i| set.items[i].clone()));
    }
    (
        ClassificationSet { classes: set.classes.clone(), items: train },
        ClassificationSet { classes: set.classes.clone(), items: test },
    )
}

/// A classification data set as named on a command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatasetSpec {
    /// `builtin`: the Vignettes classes (generated once; train / val).
    Builtin,
    /// `uci-digits[:<file>]`: the embedded UCI digits, or that CSV; split 70/30 by class.
    UciDigits(Option<PathBuf>),
    /// `folder:<root>`: an ImageFolder; `<root>/train` with `<root>/test` or `<root>/val` when
    /// present, else one folder split 70/30 by class.
    Folder(PathBuf),
    /// `cifar10:<dir>` (the binary batches).
    Cifar10(PathBuf),
    /// `cifar100:<dir>` (the binary batches).
    Cifar100(PathBuf),
    /// `mnist:<dir>` (the four IDX files, each optionally `.gz`).
    Mnist(PathBuf),
}

/// What [`DatasetSpec::load`] returns: both parts and the template set CLIP uses for the data.
#[derive(Debug, Clone)]
pub struct LoadedDataset {
    /// The name for records (`cifar10`, `uci-digits`, the folder's path, ...).
    pub name: String,
    pub train: ClassificationSet,
    pub test: ClassificationSet,
    /// The built-in template set made for this data (`cifar10`, `mnist`, `photo`, ...).
    pub default_templates: &'static str,
}

impl std::str::FromStr for DatasetSpec {
    type Err = DataError;

    fn from_str(spec: &str) -> Result<Self, DataError> {
        let (kind, path) = match spec.split_once(':') {
            Some((k, p)) if !p.is_empty() => (k, Some(PathBuf::from(p))),
            Some((k, _)) => (k, None),
            None => (spec, None),
        };
        let need = |p: Option<PathBuf>| {
            p.ok_or_else(|| DataError::Spec { spec: spec.into(), message: format!("`{kind}:<path>` needs a path") })
        };
        Ok(match kind {
            "builtin" if path.is_none() => Self::Builtin,
            "uci-digits" => Self::UciDigits(path),
            "folder" => Self::Folder(need(path)?),
            "cifar10" => Self::Cifar10(need(path)?),
            "cifar100" => Self::Cifar100(need(path)?),
            "mnist" => Self::Mnist(need(path)?),
            _ => return Err(DataError::Spec {
                spec: spec.into(),
                message:
                    "expected builtin, uci-digits[:<file>], folder:<root>, cifar10:<dir>, cifar100:<dir> or mnist:<dir>"
                        .into(),
            }),
        })
    }
}

impl DatasetSpec {
    /// Reads both parts. `builtin_dir` is where the built-in benchmark is generated (once);
    /// `seed` orders the 70/30 split of sets that have none.
    pub fn load(&self, builtin_dir: &Path, seed: u64) -> Result<LoadedDataset, DataError> {
        let loaded =
            |name: String, (train, test), default_templates| LoadedDataset { name, train, test, default_templates };
        Ok(match self {
            Self::Builtin => {
                let data =
                    crate::vignettes::ensure_benchmark(&crate::vignettes::VignettesConfig::default(), builtin_dir)?;
                let classes = data.join("classes");
                let parts = (read_image_folder(&classes.join("train"))?, read_image_folder(&classes.join("val"))?);
                loaded("vignettes-classes".into(), parts, "photo")
            }
            Self::UciDigits(file) => {
                let set = match file {
                    Some(f) => read_uci_digits(f)?,
                    None => embedded_uci_digits(),
                };
                loaded("uci-digits".into(), stratified_split(&set, 0.3, seed), "mnist")
            }
            Self::Folder(root) => {
                let test_dir = ["test", "val"].iter().map(|d| root.join(d)).find(|d| d.is_dir());
                let parts = match (root.join("train").is_dir(), test_dir) {
                    (true, Some(test)) => (read_image_folder(&root.join("train"))?, read_image_folder(&test)?),
                    _ => stratified_split(&read_image_folder(root)?, 0.3, seed),
                };
                loaded(root.display().to_string(), parts, "photo")
            }
            Self::Cifar10(dir) => {
                let train: Vec<String> = (1..=5).map(|i| format!("data_batch_{i}.bin")).collect();
                let train: Vec<&str> = train.iter().map(String::as_str).collect();
                let parts = (read_cifar(dir, Cifar::Ten, &train)?, read_cifar(dir, Cifar::Ten, &["test_batch.bin"])?);
                loaded("cifar10".into(), parts, "cifar10")
            }
            Self::Cifar100(dir) => {
                let parts =
                    (read_cifar(dir, Cifar::Hundred, &["train.bin"])?, read_cifar(dir, Cifar::Hundred, &["test.bin"])?);
                loaded("cifar100".into(), parts, "cifar100")
            }
            Self::Mnist(dir) => {
                let file = |stem: &str| -> PathBuf {
                    let plain = dir.join(stem);
                    if plain.is_file() {
                        plain
                    } else {
                        dir.join(format!("{stem}.gz"))
                    }
                };
                let parts = (
                    read_mnist(&file("train-images-idx3-ubyte"), &file("train-labels-idx1-ubyte"))?,
                    read_mnist(&file("t10k-images-idx3-ubyte"), &file("t10k-labels-idx1-ubyte"))?,
                );
                loaded("mnist".into(), parts, "mnist")
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dataset_specs_parse_or_say_what_is_expected() {
        assert_eq!("builtin".parse::<DatasetSpec>().unwrap(), DatasetSpec::Builtin);
        assert_eq!("uci-digits".parse::<DatasetSpec>().unwrap(), DatasetSpec::UciDigits(None));
        assert_eq!("mnist:/d/m".parse::<DatasetSpec>().unwrap(), DatasetSpec::Mnist("/d/m".into()));
        assert_eq!("folder:a:b".parse::<DatasetSpec>().unwrap(), DatasetSpec::Folder("a:b".into()));
        let e = "cifar10".parse::<DatasetSpec>().unwrap_err().to_string();
        assert!(e.contains("`cifar10:<path>` needs a path"), "{e}");
        let e = "imagenet:/x".parse::<DatasetSpec>().unwrap_err().to_string();
        assert!(e.contains("data set `imagenet:/x`") && e.contains("cifar100:<dir>"), "{e}");
    }

    #[test]
    fn uci_digits_split_keeps_every_class_in_both_parts() {
        let d = DatasetSpec::UciDigits(None).load(Path::new("/nonexistent"), 3).unwrap();
        assert_eq!(d.default_templates, "mnist");
        let (train, test) = (d.train.class_counts(), d.test.class_counts());
        assert!(train.iter().zip(&test).all(|(a, b)| *a > 0 && *b > 0));
        let share =
            test.iter().sum::<usize>() as f64 / (train.iter().sum::<usize>() + test.iter().sum::<usize>()) as f64;
        assert!((share - 0.3).abs() < 0.01, "{share}");
    }
}

//! CLIP's zero-shot classification protocol (docs/reference-notes.md §4): prompt templates per data
//! set, top-1 / top-5 / mean per-class recall, and CLIP_benchmark's result JSON.
//!
//! Building the classifier needs a text encoder, so it lives with the models; here are the parts
//! that are data and arithmetic: templates, metrics, the JSON record.

use std::path::Path;

use serde::Serialize;

/// CLIP's 18 templates for CIFAR-10 and CIFAR-100 (`openai/CLIP`, `data/prompts.md`).
pub const CIFAR_TEMPLATES: [&str; 18] = [
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
];

/// CLIP's MNIST template (used for any digit set: UCI digits, SVHN).
pub const MNIST_TEMPLATES: [&str; 1] = ["a photo of the number: \"{}\"."];

/// CLIP's 18 RESISC45 templates.
pub const RESISC45_TEMPLATES: [&str; 18] = [
    "satellite imagery of {}.",
    "aerial imagery of {}.",
    "satellite photo of {}.",
    "aerial photo of {}.",
    "satellite view of {}.",
    "aerial view of {}.",
    "satellite imagery of a {}.",
    "aerial imagery of a {}.",
    "satellite photo of a {}.",
    "aerial photo of a {}.",
    "satellite view of a {}.",
    "aerial view of a {}.",
    "satellite imagery of the {}.",
    "aerial imagery of the {}.",
    "satellite photo of the {}.",
    "aerial photo of the {}.",
    "satellite view of the {}.",
    "aerial view of the {}.",
];

/// CLIP's Birdsnap template.
pub const BIRDSNAP_TEMPLATES: [&str; 1] = ["a photo of a {}, a type of bird."];

/// CLIP's class names for CIFAR-10.
pub const CIFAR10_CLASSES: [&str; 10] =
    ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];

/// CLIP's class names for RESISC45 (alphabetical, as the data set's folders).
pub const RESISC45_CLASSES: [&str; 45] = [
    "airplane",
    "airport",
    "baseball diamond",
    "basketball court",
    "beach",
    "bridge",
    "chaparral",
    "church",
    "circular farmland",
    "cloud",
    "commercial area",
    "dense residential",
    "desert",
    "forest",
    "freeway",
    "golf course",
    "ground track field",
    "harbor",
    "industrial area",
    "intersection",
    "island",
    "lake",
    "meadow",
    "medium residential",
    "mobile home park",
    "mountain",
    "overpass",
    "palace",
    "parking lot",
    "railway",
    "railway station",
    "rectangular farmland",
    "river",
    "roundabout",
    "runway",
    "sea ice",
    "ship",
    "snowberg",
    "sparse residential",
    "stadium",
    "storage tank",
    "tennis court",
    "terrace",
    "thermal power station",
    "wetland",
];

/// The built-in template sets by name (`cifar10`, `cifar100`, `mnist`, `resisc45`, `birdsnap`),
/// plus `photo` (`"a photo of a {}."` alone).
pub fn builtin_templates(name: &str) -> Option<Vec<String>> {
    let list: &[&str] = match name.to_lowercase().as_str() {
        "cifar10" | "cifar-10" | "cifar100" | "cifar-100" => &CIFAR_TEMPLATES,
        "mnist" | "digits" | "uci-digits" => &MNIST_TEMPLATES,
        "resisc45" => &RESISC45_TEMPLATES,
        "birdsnap" => &BIRDSNAP_TEMPLATES,
        "photo" => &["a photo of a {}."],
        _ => return None,
    };
    Some(list.iter().map(|s| s.to_string()).collect())
}

/// Names accepted by [`builtin_templates`].
pub const BUILTIN_TEMPLATE_SETS: [&str; 6] = ["cifar10", "cifar100", "mnist", "resisc45", "birdsnap", "photo"];

/// Errors of template files.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("{path}: cannot read templates: {message}")]
    Read { path: std::path::PathBuf, message: String },
    #[error("{path}: template {index} ({template:?}) has no `{{}}` for the class name")]
    NoPlaceholder { path: std::path::PathBuf, index: usize, template: String },
    #[error("{path}: no templates")]
    Empty { path: std::path::PathBuf },
}

/// Reads a custom templates file: a JSON list of strings, or plain text with one template per line
/// (blank lines and `#` comments skipped). Every template must contain `{}`.
pub fn read_templates(path: &Path) -> Result<Vec<String>, TemplateError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| TemplateError::Read { path: path.to_owned(), message: e.to_string() })?;
    let templates: Vec<String> = if text.trim_start().starts_with('[') {
        serde_json::from_str(&text)
            .map_err(|e| TemplateError::Read { path: path.to_owned(), message: e.to_string() })?
    } else {
        text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from).collect()
    };
    if templates.is_empty() {
        return Err(TemplateError::Empty { path: path.to_owned() });
    }
    for (index, t) in templates.iter().enumerate() {
        if !t.contains("{}") {
            return Err(TemplateError::NoPlaceholder { path: path.to_owned(), index, template: t.clone() });
        }
    }
    Ok(templates)
}

/// `template` with `{}` replaced by `class_name`.
pub fn fill(template: &str, class_name: &str) -> String {
    template.replacen("{}", class_name, 1)
}

/// A class folder's name as a prompt word (`sea_ice` → `sea ice`).
pub fn prompt_name(class_name: &str) -> String {
    class_name.replace('_', " ")
}

/// CLIP_benchmark's classification metrics.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ClassificationMetrics {
    pub acc1: f64,
    pub acc5: f64,
    /// Recall averaged over the classes present in the labels.
    pub mean_per_class_recall: f64,
}

impl ClassificationMetrics {
    /// From per-sample class scores `[n][classes]` and labels. Ties rank the lower class index first.
    pub fn compute(scores: &[Vec<f32>], labels: &[usize]) -> Self {
        assert_eq!(scores.len(), labels.len(), "one score row per label");
        let n_classes = scores.first().map_or(0, |r| r.len());
        let (mut top1, mut top5) = (0usize, 0usize);
        let mut per_class = vec![(0usize, 0usize); n_classes.max(labels.iter().max().map_or(0, |m| m + 1))];
        for (row, &label) in scores.iter().zip(labels) {
            // Rank of the true class: how many classes score strictly higher (or equal with a lower index).
            let own = row.get(label).copied().unwrap_or(f32::NEG_INFINITY);
            let rank = row.iter().enumerate().filter(|&(c, &s)| s > own || (s == own && c < label)).count();
            top1 += (rank == 0) as usize;
            top5 += (rank < 5) as usize;
            per_class[label].1 += 1;
            per_class[label].0 += (rank == 0) as usize;
        }
        let n = labels.len().max(1) as f64;
        let present: Vec<f64> =
            per_class.iter().filter(|(_, total)| *total > 0).map(|(hit, total)| *hit as f64 / *total as f64).collect();
        Self {
            acc1: top1 as f64 / n,
            acc5: top5 as f64 / n,
            mean_per_class_recall: present.iter().sum::<f64>() / present.len().max(1) as f64,
        }
    }
}

/// One CLIP_benchmark result record (`{"dataset", "model", "pretrained", "task", "metrics",
/// "language"}`), for classification or retrieval metrics.
#[derive(Debug, Clone, Serialize)]
pub struct BenchmarkRecord {
    pub dataset: String,
    pub model: String,
    pub pretrained: String,
    /// `zeroshot_classification`, `linear_probe` or `zeroshot_retrieval`.
    pub task: String,
    pub metrics: serde_json::Map<String, serde_json::Value>,
    pub language: String,
}

impl BenchmarkRecord {
    pub fn classification(dataset: &str, model: &str, pretrained: &str, task: &str, m: &ClassificationMetrics) -> Self {
        let metrics = serde_json::to_value(m).expect("serialisable").as_object().cloned().unwrap_or_default();
        Self {
            dataset: dataset.into(),
            model: model.into(),
            pretrained: pretrained.into(),
            task: task.into(),
            metrics,
            language: "en".into(),
        }
    }

    /// `image_retrieval_recall@k` (text→image) and `text_retrieval_recall@k` (image→text).
    pub fn retrieval(
        dataset: &str,
        model: &str,
        pretrained: &str,
        text_to_image: &crate::RetrievalMetrics,
        image_to_text: &crate::RetrievalMetrics,
    ) -> Self {
        let mut metrics = serde_json::Map::new();
        for (k, r) in &text_to_image.recall_at {
            metrics.insert(format!("image_retrieval_recall@{k}"), (*r).into());
        }
        for (k, r) in &image_to_text.recall_at {
            metrics.insert(format!("text_retrieval_recall@{k}"), (*r).into());
        }
        Self {
            dataset: dataset.into(),
            model: model.into(),
            pretrained: pretrained.into(),
            task: "zeroshot_retrieval".into(),
            metrics,
            language: "en".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_by_hand() {
        // 4 samples, 6 classes. Labels 0, 1, 1, 5.
        let scores = vec![
            vec![0.9, 0.1, 0.0, 0.0, 0.0, 0.0], // rank 0: top-1 hit
            vec![0.5, 0.4, 0.3, 0.2, 0.1, 0.0], // label 1 at rank 1
            vec![0.1, 0.9, 0.0, 0.0, 0.0, 0.0], // hit
            vec![0.6, 0.5, 0.4, 0.3, 0.2, 0.1], // label 5 at rank 5: outside top 5
        ];
        let m = ClassificationMetrics::compute(&scores, &[0, 1, 1, 5]);
        assert_eq!(m.acc1, 0.5);
        assert_eq!(m.acc5, 0.75);
        // class 0: 1/1, class 1: 1/2, class 5: 0/1 → mean 0.5
        assert!((m.mean_per_class_recall - 0.5).abs() < 1e-12);
    }

    #[test]
    fn templates_builtin_and_from_files() {
        assert_eq!(builtin_templates("cifar10").unwrap().len(), 18);
        assert_eq!(builtin_templates("RESISC45").unwrap().len(), 18);
        assert_eq!(fill(&builtin_templates("mnist").unwrap()[0], "7"), "a photo of the number: \"7\".");
        let dir = std::env::temp_dir().join(format!("ctxalign-templates-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let lines = dir.join("t.txt");
        std::fs::write(&lines, "# mine\na sketch of a {}.\n\nart of the {}.\n").unwrap();
        assert_eq!(read_templates(&lines).unwrap(), vec!["a sketch of a {}.", "art of the {}."]);
        let bad = dir.join("bad.json");
        std::fs::write(&bad, r#"["a {}.", "no placeholder"]"#).unwrap();
        let err = read_templates(&bad).unwrap_err().to_string();
        assert!(err.contains("bad.json") && err.contains("template 1"), "{err}");
        std::fs::remove_dir_all(dir).ok();
    }
}

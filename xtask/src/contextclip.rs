//! `cargo xtask contextclip-results`: evaluates ContextCLIP runs (zero-shot on the built-in classes
//! and the real UCI digits, linear probe on the digits, retrieval R@k on held-out captions), groups
//! them by their folder name without the `-seed<N>` suffix and writes the comparison with mean ±
//! standard deviation over seeds.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Args;
use ctxalign::contextclip::{linear_probe_sets, retrieval, stratified_split, zero_shot, ClipEncoder};
use ctxalign::data::captions::read_caption_json;
use ctxalign::data::classification::{embedded_uci_digits, read_image_folder};
use ctxalign::data::vignettes::{ensure_benchmark, VignettesConfig};
use ctxalign::device::{InferenceArgs, TrainingArgs};
use ctxalign::eval::zeroshot::{builtin_templates, read_templates, BenchmarkRecord};
use ctxalign::eval::Table;
use ctxalign::Runtime;

#[derive(Args)]
pub struct ResultsArgs {
    /// Run folders written by `--example train_contextclip` (each with `training.json`).
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// The built-in benchmark (generated once).
    #[arg(long, default_value = "target/vignettes-default")]
    data_dir: PathBuf,
    /// Caption-style prompt templates for the built-in classes (CLIP's "a photo of a {}." is
    /// reported as well).
    #[arg(long, default_value = "examples/templates/vignettes.txt")]
    templates: PathBuf,
    /// Markdown table of the comparison.
    #[arg(long, default_value = "target/contextclip-results.md")]
    out: PathBuf,
    /// CLIP_benchmark records of every run and task (JSON list).
    #[arg(long, default_value = "target/contextclip-results.json")]
    json: PathBuf,
    #[command(flatten)]
    runtime: InferenceArgs,
}

/// The metrics of one run, in table order.
const METRICS: [&str; 11] = [
    "built-in zero-shot top-1",
    "built-in zero-shot top-5",
    "built-in zero-shot top-1, caption-style templates",
    "built-in zero-shot top-5, caption-style templates",
    "digits zero-shot top-1",
    "digits zero-shot mean recall",
    "digits linear probe top-1",
    "text→image R@1",
    "text→image R@5",
    "text→image R@10",
    "image→text R@1",
];

fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = if xs.len() > 1 { xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (mean, var.sqrt())
}

pub fn results(a: ResultsArgs) -> anyhow::Result<bool> {
    ctxalign::args::check_output_file(&a.out)?;
    ctxalign::args::check_output_file(&a.json)?;
    let device = a.runtime.open()?;
    let data = ensure_benchmark(&VignettesConfig::default(), &a.data_dir)?;
    let classes_val = read_image_folder(&data.join("classes").join("val"))?;
    let caps = data.join("captions");
    let val_items = read_caption_json(&caps.join("val.json"), &caps)?;
    let digits = embedded_uci_digits();
    let (digits_train, digits_test) = stratified_split(&digits, 0.3, 0);
    let photo = builtin_templates("photo").expect("built in");
    let mnist = builtin_templates("mnist").expect("built in");
    let caption_style = read_templates(&a.templates)?;
    let mut records = vec![];
    // α → metric → values over seeds
    let mut groups: BTreeMap<String, BTreeMap<&str, Vec<f64>>> = BTreeMap::new();
    let mut per_run = Table::new([
        "run",
        "α",
        "seed",
        "built-in top-1",
        "styled top-1",
        "digits top-1",
        "probe top-1",
        "t→i R@1",
        "i→t R@1",
    ]);
    for run in &a.runs {
        let training: serde_json::Value = ctxalign::models::loading::read_json(&run.join("training.json"))?;
        let alpha = training["options"]["loss"]["alpha"].as_f64().unwrap_or(f64::NAN);
        let seed = training["options"]["seed"].as_u64().unwrap_or(0);
        eprintln!("evaluating {}", run.display());
        let encoder = ClipEncoder::load(run, a.runtime.dtype, &device)?;
        let name = run.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let builtin = zero_shot(&encoder, &classes_val, &photo)?;
        let styled = zero_shot(&encoder, &classes_val, &caption_style)?;
        let digits_zs = zero_shot(&encoder, &digits, &mnist)?;
        let probe = linear_probe_sets(&encoder, &digits_train, &digits_test, seed)?;
        let r = retrieval(&encoder, &val_items)?;
        let recall = |m: &ctxalign::eval::RetrievalMetrics, k: usize| {
            m.recall_at.iter().find(|(kk, _)| *kk == k).map(|(_, v)| *v).unwrap_or(f64::NAN)
        };
        let values = [
            builtin.acc1,
            builtin.acc5,
            styled.acc1,
            styled.acc5,
            digits_zs.acc1,
            digits_zs.mean_per_class_recall,
            probe.metrics.acc1,
            recall(&r.text_to_image, 1),
            recall(&r.text_to_image, 5),
            recall(&r.text_to_image, 10),
            recall(&r.image_to_text, 1),
        ];
        // Runs group by folder name without its `-seed<N>` suffix (`alpha0.5-seed2` → `alpha0.5`).
        let label = match name.rsplit_once("-seed") {
            Some((stem, n)) if n.parse::<u64>().is_ok() => stem.to_string(),
            _ => name.clone(),
        };
        let group = groups.entry(label).or_default();
        for (m, v) in METRICS.iter().zip(values) {
            group.entry(m).or_default().push(100.0 * v);
        }
        let pct = |v: f64| format!("{:.1}", 100.0 * v);
        per_run.row([
            name.clone(),
            format!("{alpha}"),
            seed.to_string(),
            pct(builtin.acc1),
            pct(styled.acc1),
            pct(digits_zs.acc1),
            pct(probe.metrics.acc1),
            pct(values[7]),
            pct(values[10]),
        ]);
        records.push(BenchmarkRecord::classification(
            "vignettes-classes",
            &name,
            &run.display().to_string(),
            "zeroshot_classification",
            &builtin,
        ));
        records.push(BenchmarkRecord::classification(
            "vignettes-classes-styled",
            &name,
            &run.display().to_string(),
            "zeroshot_classification",
            &styled,
        ));
        records.push(BenchmarkRecord::classification(
            "uci-digits",
            &name,
            &run.display().to_string(),
            "zeroshot_classification",
            &digits_zs,
        ));
        records.push(BenchmarkRecord::classification(
            "uci-digits",
            &name,
            &run.display().to_string(),
            "linear_probe",
            &probe.metrics,
        ));
        records.push(BenchmarkRecord::retrieval(
            "vignettes-captions",
            &name,
            &run.display().to_string(),
            &r.text_to_image,
            &r.image_to_text,
        ));
    }
    let alphas: Vec<String> = groups.keys().cloned().collect();
    let mut header = vec!["metric (%, mean ± sd over seeds)".to_string()];
    header.extend(alphas.iter().map(|a| format!("{a} (n = {})", groups[a][METRICS[0]].len())));
    let mut summary = Table::new(header);
    for m in METRICS {
        let mut row = vec![m.to_string()];
        for a in &alphas {
            let (mean, sd) = mean_std(&groups[a][m]);
            row.push(format!("{mean:.1} ± {sd:.1}"));
        }
        summary.row(row);
    }
    println!("{per_run}\n{summary}");
    let chance = 100.0 / classes_val.classes.len() as f64;
    let markdown = format!(
        "Built-in classes: {} ({} val images, chance {chance:.1} %); UCI digits: {} images (zero-shot on all, \
             probe on a stratified 70/30 split, λ chosen on 20 % of the train part); retrieval: {} held-out images, \
             {} captions.\n\n```text\n{summary}\n```\n\nPer run:\n\n```text\n{per_run}\n```\n",
        classes_val.classes.len(),
        classes_val.items.len(),
        digits.items.len(),
        val_items.len(),
        val_items.iter().map(|i| i.captions.len()).sum::<usize>()
    );
    ctxalign::data::write_atomic(&a.out, markdown.as_bytes())?;
    ctxalign::data::write_atomic(&a.json, serde_json::to_string_pretty(&records)?.as_bytes())?;
    println!("written: {} and {}", a.out.display(), a.json.display());
    Ok(true)
}

/// `cargo xtask classify`: zero-shot classification, linear probe or fine-tuning of a ContextCLIP
/// on a classification set, with CLIP_benchmark's JSON record.
#[derive(Args)]
pub struct ClassifyArgs {
    /// A trained ContextCLIP folder.
    #[arg(long, default_value = "target/contextclip")]
    model: PathBuf,
    /// `builtin` (the Vignettes classes), `uci-digits` (embedded; stratified 70/30), `folder:<root>`
    /// (ImageFolder; `<root>/train` and `<root>/test` or `val` when present), `cifar10:<dir>`,
    /// `cifar100:<dir>` (binary batches), `mnist:<dir>` (IDX files, optionally .gz).
    #[arg(long, default_value = "builtin")]
    dataset: String,
    /// `zeroshot`, `linear-probe` or `finetune`.
    #[arg(long, default_value = "zeroshot")]
    task: String,
    /// A built-in template set (cifar10, cifar100, mnist, resisc45, birdsnap, photo) or a file (one
    /// template per line, or a JSON list). Default: the data set's own, else `photo`.
    #[arg(long)]
    templates: Option<String>,
    /// Fine-tuning steps, batch and learning rate.
    #[arg(long, default_value_t = 200, value_parser = ctxalign::args::positive_steps)]
    steps: u64,
    /// Fine-tuning batch size.
    #[arg(long, default_value_t = 32, value_parser = ctxalign::args::positive_count)]
    batch_size: usize,
    /// Fine-tuning learning rate of the image side (the classifier gets 10×).
    #[arg(long, default_value_t = 1e-4, value_parser = ctxalign::args::learning_rate)]
    lr: f64,
    /// Random seed (the 70/30 split of sets without one, the probe, fine-tuning).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// `finetune`: continue the run in the output folder from its latest checkpoint (same settings).
    #[arg(long)]
    resume: bool,
    /// `finetune`: start over in an output folder that holds an earlier run's checkpoints.
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// With --resume: continue although settings differ from the checkpoint's run (the differences
    /// are recorded).
    #[arg(long, requires = "resume")]
    accept_changed_settings: bool,
    #[command(flatten)]
    bad_input: ctxalign::args::BadInputArgs,
    /// Where the built-in benchmark is generated (once).
    #[arg(long, default_value = "target/vignettes-default")]
    data_dir: PathBuf,
    /// CLIP_benchmark record.
    #[arg(long, default_value = "target/classify.json")]
    out: PathBuf,
    /// Device and precision (the precision's dtype also serves zero-shot and the probe).
    #[command(flatten)]
    runtime: TrainingArgs,
}

/// `(name, train, test, default templates)` of a dataset spec.
fn classification_data(
    spec: &str,
    data_dir: &std::path::Path,
    seed: u64,
) -> anyhow::Result<(
    String,
    ctxalign::data::classification::ClassificationSet,
    ctxalign::data::classification::ClassificationSet,
    &'static str,
)> {
    use ctxalign::data::classification::{read_cifar, read_mnist, Cifar};
    let (kind, path) = spec.split_once(':').map(|(k, p)| (k, Some(PathBuf::from(p)))).unwrap_or((spec, None));
    let need = |p: Option<PathBuf>| p.ok_or_else(|| anyhow::anyhow!("--dataset {kind}:<path> needs a path"));
    Ok(match kind {
        "builtin" => {
            let data = ensure_benchmark(&VignettesConfig::default(), data_dir)?;
            let c = data.join("classes");
            ("vignettes-classes".into(), read_image_folder(&c.join("train"))?, read_image_folder(&c.join("val"))?, "photo")
        }
        "uci-digits" => {
            let set = match path {
                Some(p) => ctxalign::data::classification::read_uci_digits(&p)?,
                None => embedded_uci_digits(),
            };
            let (train, test) = stratified_split(&set, 0.3, seed);
            ("uci-digits".into(), train, test, "mnist")
        }
        "folder" => {
            let root = need(path)?;
            let test_dir = ["test", "val"].iter().map(|d| root.join(d)).find(|d| d.is_dir());
            match (root.join("train").is_dir(), test_dir) {
                (true, Some(test)) => {
                    (root.display().to_string(), read_image_folder(&root.join("train"))?, read_image_folder(&test)?, "photo")
                }
                _ => {
                    let (train, test) = stratified_split(&read_image_folder(&root)?, 0.3, seed);
                    (root.display().to_string(), train, test, "photo")
                }
            }
        }
        "cifar10" => {
            let dir = need(path)?;
            let train_files = ["data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin", "data_batch_5.bin"];
            ("cifar10".into(), read_cifar(&dir, Cifar::Ten, &train_files)?, read_cifar(&dir, Cifar::Ten, &["test_batch.bin"])?, "cifar10")
        }
        "cifar100" => {
            let dir = need(path)?;
            ("cifar100".into(), read_cifar(&dir, Cifar::Hundred, &["train.bin"])?, read_cifar(&dir, Cifar::Hundred, &["test.bin"])?, "cifar100")
        }
        "mnist" => {
            let dir = need(path)?;
            let file = |stem: &str| -> PathBuf {
                let plain = dir.join(stem);
                if plain.is_file() { plain } else { dir.join(format!("{stem}.gz")) }
            };
            (
                "mnist".into(),
                read_mnist(&file("train-images-idx3-ubyte"), &file("train-labels-idx1-ubyte"))?,
                read_mnist(&file("t10k-images-idx3-ubyte"), &file("t10k-labels-idx1-ubyte"))?,
                "mnist",
            )
        }
        other => anyhow::bail!("unknown --dataset {other:?} (builtin, uci-digits, folder:<root>, cifar10:<dir>, cifar100:<dir>, mnist:<dir>)"),
    })
}

pub fn classify(a: ClassifyArgs) -> anyhow::Result<bool> {
    use ctxalign::contextclip::{finetune_classifier, FinetuneOptions};
    ctxalign::args::check_output_file(&a.out)?;
    let (dataset, train, test, default_templates) = classification_data(&a.dataset, &a.data_dir, a.seed)?;
    // Every image file is checked before the first one is encoded (the probe reads both sets).
    let (train, test) = {
        let decode = ctxalign::data::DecodeOptions::default();
        let (train_total, test_total) = (train.items.len(), test.items.len());
        let (train, train_bad) = train.checked(decode, a.bad_input.policy())?;
        let (test, test_bad) = test.checked(decode, a.bad_input.policy())?;
        for (name, bad, total) in [("train", &train_bad, train_total), ("test", &test_bad, test_total)] {
            let errors: Vec<String> = bad.iter().map(|s| s.error.clone()).collect();
            ctxalign::args::warn_left_out(&format!("{} of {total} {name} images left out", bad.len()), &errors);
        }
        (train, test)
    };
    let templates = match &a.templates {
        Some(t) => match builtin_templates(t) {
            Some(list) => list,
            None => read_templates(std::path::Path::new(t))?,
        },
        None => builtin_templates(default_templates).expect("built in"),
    };
    let rt = Runtime::new(a.runtime.open()?, a.runtime.precision);
    let encoder = ClipEncoder::load(&a.model, rt.dtype(), &rt.device)?;
    let model_name = a.model.display().to_string();
    println!(
        "{dataset}: {} classes, {} train / {} test images; {} templates",
        test.classes.len(),
        train.items.len(),
        test.items.len(),
        templates.len()
    );
    let (task, metrics, extra) = match a.task.as_str() {
        "zeroshot" => ("zeroshot_classification", zero_shot(&encoder, &test, &templates)?, String::new()),
        "linear-probe" => {
            let r = linear_probe_sets(&encoder, &train, &test, a.seed)?;
            ("linear_probe", r.metrics, format!("λ chosen on validation: {}", r.chosen_l2))
        }
        "finetune" => {
            drop(encoder);
            let out_dir = a.out.with_extension("finetune");
            let opts = FinetuneOptions {
                out_dir: out_dir.clone(),
                templates: templates.clone(),
                steps: a.steps,
                batch_size: a.batch_size,
                lr: a.lr,
                classifier_lr: 10.0 * a.lr,
                weight_decay: 0.05,
                seed: a.seed,
                bad_input: a.bad_input.policy(),
                resume: a.resume,
                overwrite: a.overwrite,
                accept_changed_settings: a.accept_changed_settings,
                progress: true,
            };
            let r = finetune_classifier(&a.model, &train, &test, &opts, &rt)?;
            let Some(finetuned) = r.finetuned else {
                eprintln!(
                    "interrupted at step {}: the checkpoint is in {}; continue with --resume",
                    r.steps,
                    out_dir.display()
                );
                std::process::exit(ctxalign::train::INTERRUPTED_EXIT_CODE);
            };
            let note = format!(
                "zero-shot start: top-1 {:.1} %; weights in {}",
                100.0 * r.zero_shot.acc1,
                out_dir.join("finetuned.safetensors").display()
            );
            ("finetune", finetuned, note)
        }
        other => anyhow::bail!("unknown --task {other:?} (zeroshot, linear-probe, finetune)"),
    };
    let mut table = Table::new(["metric", "value"]);
    table.row(["top-1".to_string(), format!("{:.1} %", 100.0 * metrics.acc1)]);
    table.row(["top-5".to_string(), format!("{:.1} %", 100.0 * metrics.acc5)]);
    table.row(["mean per-class recall".to_string(), format!("{:.1} %", 100.0 * metrics.mean_per_class_recall)]);
    println!("{table}");
    if !extra.is_empty() {
        println!("{extra}");
    }
    let record = BenchmarkRecord::classification(&dataset, "contextclip", &model_name, task, &metrics);
    ctxalign::data::write_atomic(&a.out, serde_json::to_string_pretty(&record)?.as_bytes())?;
    println!("CLIP_benchmark record: {}", a.out.display());
    Ok(true)
}

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
use ctxalign_cli::runtime_args::InferenceArgs;
use ctxalign::eval::zeroshot::{builtin_templates, read_templates, BenchmarkRecord};
use ctxalign::eval::Table;

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

pub fn results(a: ResultsArgs) -> anyhow::Result<bool> {
    ctxalign_cli::args::check_output_file(&a.out)?;
    ctxalign_cli::args::check_output_file(&a.json)?;
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
            let (mean, sd) = ctxalign::eval::accuracy::mean_sd(&groups[a][m]);
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

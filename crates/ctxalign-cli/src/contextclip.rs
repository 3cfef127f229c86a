//! ContextCLIP jobs: `train-contextclip`, `classify`, `retrieve`.

use std::path::PathBuf;

use clap::Args;
#[cfg(feature = "train")]
use clap::ValueEnum;

use super::or_default;
use ctxalign::contextclip::{linear_probe_sets, zero_shot, ClipEncoder};
use ctxalign::data::classification::{DatasetSpec, LoadedDataset};
use ctxalign::data::walk::{is_image_file, WalkOptions, Walker};
use crate::runtime_args::InferenceArgs;
use crate::runtime_args::TrainingArgs;
use ctxalign::eval::zeroshot::{builtin_templates, read_templates, BenchmarkRecord};
use ctxalign::eval::Table;
use ctxalign::index::{files_fingerprint, EmbeddingIndex};
use ctxalign::Runtime;

#[cfg(feature = "train")]
#[derive(Clone, Copy, ValueEnum)]
pub enum SimilarityArg {
    Dot,
    Cosine,
}

#[cfg(feature = "train")]
#[derive(Clone, Copy, ValueEnum)]
pub enum TargetsArg {
    Hard,
    Soft,
}

#[cfg(feature = "train")]
#[derive(Clone, Copy, ValueEnum)]
pub enum ModeArg {
    Samples,
    Dims,
    PaperCode,
}

#[cfg(feature = "train")]
#[derive(Args)]
pub struct TrainArgs {
    /// BLIP-format caption JSON files (repeatable); default: the built-in benchmark's captions.
    #[arg(long)]
    captions: Vec<PathBuf>,
    /// Flickr8k's `Flickr8k.token.txt` (with --image-root = `Flicker8k_Dataset`).
    #[arg(long)]
    flickr8k: Option<PathBuf>,
    /// Folder the caption files' image paths are relative to.
    #[arg(long)]
    image_root: Option<PathBuf>,
    /// Held-out caption JSON for the final retrieval evaluation (default: the built-in val split;
    /// with real data and no --val-captions, the last 10 % of the images are held out).
    #[arg(long)]
    val_captions: Option<PathBuf>,
    /// Where the built-in benchmark is generated (once); default: `vignettes-default` in
    /// ctxalign's home folder.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Output folder: the model (contextclip.json, model.safetensors, tokenizer.json) and its run
    /// record; default: `runs/contextclip` in ctxalign's home folder.
    #[arg(long)]
    out: Option<PathBuf>,
    /// A `contextclip.json` describing the towers (default: the small CPU model).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Tokenizer of the text tower (default: the shipped bert-base-uncased one).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Continue from a trained ContextCLIP folder (its config, weights and learned τ; fresh
    /// optimiser and schedule).
    #[arg(long)]
    init_from: Option<PathBuf>,
    /// Start the image tower from a checkpoint in its own layout (timm ResNet, HF CLIP).
    #[arg(long)]
    image_checkpoint: Option<PathBuf>,
    /// Start the text tower from a checkpoint in its own layout (HF BERT, HF CLIP).
    #[arg(long)]
    text_checkpoint: Option<PathBuf>,
    /// The paper's optimisation (Adam wd 1e-3; lr 1e-4 image / 1e-6 text / 1e-3 heads; 30 epochs
    /// of 32) instead of the from-scratch CPU settings.
    #[arg(long)]
    paper: bool,
    /// Weight α of the contextual loss (paper 0.5; 0 = CLIP baseline).
    #[arg(long, default_value_t = 0.5)]
    alpha: f64,
    /// Weight λ of the image→text direction (paper 0.75).
    #[arg(long, default_value_t = 0.75)]
    lambda: f64,
    /// Temperature τ (paper 1.0; CPU default 0.07, learned).
    #[arg(long)]
    temperature: Option<f64>,
    /// Learn τ (CPU default) or keep it fixed (--paper).
    #[arg(long)]
    learn_temperature: Option<bool>,
    /// Similarity (paper: dot; CPU default: cosine).
    #[arg(long, value_enum)]
    similarity: Option<SimilarityArg>,
    /// InfoNCE targets (paper: soft; CPU default: hard).
    #[arg(long, value_enum)]
    targets: Option<TargetsArg>,
    /// What the contextual loss's points are.
    #[arg(long, value_enum, default_value = "samples")]
    mode: ModeArg,
    /// Band width h of the contextual loss (paper 0.5).
    #[arg(long, default_value_t = 0.5)]
    band_width: f64,
    /// Optimizer steps (overrides --epochs).
    #[arg(long, value_parser = crate::args::positive_steps)]
    steps: Option<u64>,
    /// Epochs (default: 30 with --paper, else the CPU default).
    #[arg(long, value_parser = crate::args::positive_steps)]
    epochs: Option<u64>,
    /// Captioned images per step.
    #[arg(long, value_parser = crate::args::positive_count)]
    batch_size: Option<usize>,
    /// One learning rate for every group (overrides the defaults).
    #[arg(long, value_parser = crate::args::learning_rate)]
    lr: Option<f64>,
    #[command(flatten)]
    shards: super::ShardArgs,
    #[command(flatten)]
    run: super::RunArgs,
    /// Train on all captions of the built-in data (default: each image's first caption, which lists
    /// every object; the relational ones keep a model from scratch on the ln B plateau for longer
    /// than a CPU run lasts). Real data always uses all captions.
    #[arg(long)]
    all_captions: bool,
    /// Skip the evaluation after training.
    #[arg(long)]
    no_eval: bool,
    #[command(flatten)]
    bad_input: crate::args::BadInputArgs,
    #[command(flatten)]
    runtime: TrainingArgs,
}

/// Trains a ContextCLIP from the command line's settings, then evaluates it (unless --no-eval).
#[cfg(feature = "train")]
pub fn train(a: TrainArgs) -> anyhow::Result<bool> {
    use ctxalign::contextclip::{retrieval, train_contextclip, TrainOptions};
    use ctxalign::data::captions::{read_caption_json, read_flickr8k};
    use ctxalign::data::classification::read_image_folder;
    use ctxalign::models::contextclip::ContextClipConfig;
    use ctxalign::nn::{ContextualMode, Similarity, Targets};
    if super::launch::launch_ranks(&a.runtime)? {
        return Ok(true);
    }
    let out = or_default(&a.out, || ctxalign::home::run_dir("contextclip"))?;
    let builtin = a.captions.is_empty() && a.flickr8k.is_none();
    let data = super::builtin_benchmark(&a.data_dir)?;
    let (train_items, val_items) = if builtin {
        let dir = data.join("captions");
        (read_caption_json(&dir.join("train.json"), &dir)?, read_caption_json(&dir.join("val.json"), &dir)?)
    } else {
        let root = a.image_root.clone().ok_or_else(|| anyhow::anyhow!("--captions / --flickr8k need --image-root"))?;
        let mut items = match &a.flickr8k {
            Some(f) => read_flickr8k(f, &root)?,
            None => ctxalign::contextblip::read_caption_files(&a.captions, &root)?,
        };
        match &a.val_captions {
            Some(v) => (items, read_caption_json(v, &root)?),
            None => {
                let val = items.split_off(items.len() * 9 / 10);
                (items, val)
            }
        }
    };
    let train_items = if builtin && !a.all_captions {
        train_items.iter().map(|i| i.first_caption_only()).collect()
    } else {
        train_items
    };
    let mut opts = TrainOptions::cpu_default(out.clone())?;
    if let Some(c) = &a.config {
        opts.config = ContextClipConfig::read(c)?;
    }
    if a.paper {
        opts = TrainOptions::paper(out.clone(), opts.config.clone(), opts.tokenizer.clone());
    }
    if let Some(t) = &a.tokenizer {
        opts.tokenizer = t.clone();
    }
    if let Some(dir) = &a.init_from {
        opts.config = ctxalign::models::contextclip::ContextClipRecord::read(dir)?.config;
        opts.init.checkpoint = Some(dir.join(ctxalign::models::contextclip::WEIGHTS_FILE));
    }
    opts.init.towers = a.image_checkpoint.iter().chain(&a.text_checkpoint).cloned().collect();
    if let Some(t) = &a.text_checkpoint {
        opts.init.bert_prefix = ctxalign::models::loading::CheckedSafetensors::open(
            std::slice::from_ref(t),
            ctxalign::models::loading::RenameTable::identity(),
        )
        .map(|st| ctxalign::models::bert::BertModel::checkpoint_prefix(st.keys()) == "bert.")?;
    }
    opts.loss.alpha = a.alpha;
    opts.loss.clip.lambda = a.lambda;
    if let Some(t) = a.temperature {
        opts.loss.temperature = t;
    }
    if let Some(l) = a.learn_temperature {
        opts.loss.learn_temperature = l;
    }
    if let Some(s) = a.similarity {
        opts.loss.clip.similarity = match s {
            SimilarityArg::Dot => Similarity::Dot,
            SimilarityArg::Cosine => Similarity::Cosine,
        };
    }
    if let Some(t) = a.targets {
        opts.loss.clip.targets = match t {
            TargetsArg::Hard => Targets::Hard,
            TargetsArg::Soft => Targets::Soft,
        };
    }
    opts.loss.mode = match a.mode {
        ModeArg::Samples => ContextualMode::Samples,
        ModeArg::Dims => ContextualMode::Dims,
        ModeArg::PaperCode => ContextualMode::PaperCode,
    };
    opts.loss.band_width = a.band_width;
    if a.steps.is_some() || a.epochs.is_some() {
        opts.steps = a.steps;
    }
    if let Some(e) = a.epochs {
        opts.epochs = e;
    }
    if let Some(b) = a.batch_size {
        opts.batch_size = b;
    }
    if let Some(lr) = a.lr {
        (opts.image_lr, opts.text_lr, opts.head_lr) = (lr, lr, lr);
    }
    opts.run = a.run.control(a.bad_input.policy())?;
    if super::launch::reports(&a.runtime) {
        println!(
            "ContextCLIP on {} ({}, {}{}): α {}, λ {}, τ {}{}, {:?} similarity, {:?} targets, L_CX {:?} h {}",
            match &a.shards.shards {
                Some(spec) => format!("the shards {spec}"),
                None => format!("{} captioned images", train_items.len()),
            },
            a.runtime.device,
            a.runtime.precision,
            super::contextblip::ranks_note(&a.runtime),
            opts.loss.alpha,
            opts.loss.clip.lambda,
            opts.loss.temperature,
            if opts.loss.learn_temperature { " (learned)" } else { "" },
            opts.loss.clip.similarity,
            opts.loss.clip.targets,
            opts.loss.mode,
            opts.loss.band_width
        );
    }
    let source = match a.shards.source() {
        Some(_) if !a.captions.is_empty() || a.flickr8k.is_some() => {
            anyhow::bail!("give --captions / --flickr8k or --shards, not both")
        }
        Some(shards) => ctxalign::CaptionSource::Shards(shards),
        None => ctxalign::CaptionSource::Files(train_items),
    };
    let trained = super::launch::run_training(&a.runtime, |rt, comm| {
        let opts = TrainOptions { run: ctxalign::RunControl { dist: comm, ..opts.run.clone() }, ..opts.clone() };
        Ok(train_contextclip(source.clone(), &opts, &rt)?)
    })?;
    let Some((report, rt)) = trained else { return Ok(true) };
    super::print_notices(&report.outcome);
    let left_out: Vec<String> = report.left_out.iter().map(|s| s.error.clone()).collect();
    crate::args::warn_left_out(&format!("{} captioned images left out", left_out.len()), &left_out);
    if report.outcome.interrupted {
        super::exit_interrupted(report.outcome.steps, &out, "continue with --resume");
    }
    let mut table = Table::new(["", "value"]);
    table.row(["steps".to_string(), report.outcome.steps.to_string()]);
    table.row(["parameters".to_string(), report.parameters.to_string()]);
    for (k, v) in &report.outcome.final_terms {
        table.row([format!("final {k} loss"), format!("{v:.4}")]);
    }
    table.row(["samples/s".to_string(), format!("{:.1}", report.outcome.samples_per_second)]);
    super::ranks_rows(&mut table, &report.outcome);
    if !a.no_eval {
        // Evaluated in the precision it trained in (the saved weights are the f32 masters).
        let encoder = ClipEncoder::load(&out, rt.dtype(), &rt.device)?;
        let r = retrieval(&encoder, &val_items)?;
        for (name, m) in [("text→image", &r.text_to_image), ("image→text", &r.image_to_text)] {
            let recalls: Vec<String> = m.recall_at.iter().map(|(k, v)| format!("R@{k} {:.1}", 100.0 * v)).collect();
            table.row([format!("{name} ({} queries)", m.queries), recalls.join("  ")]);
        }
        if builtin {
            let classes = read_image_folder(&data.join("classes").join("val"))?;
            let m = zero_shot(&encoder, &classes, &builtin_templates("photo").expect("built in"))?;
            table.row([
                format!("zero-shot, {} built-in classes", classes.classes.len()),
                format!("top-1 {:.1}  top-5 {:.1}", 100.0 * m.acc1, 100.0 * m.acc5),
            ]);
        }
    }
    println!("{table}");
    println!("model: {}  (loss curve: {})", out.display(), out.join("loss.png").display());
    Ok(true)
}

#[derive(Args)]
pub struct ClassifyArgs {
    /// A trained ContextCLIP folder; default: `runs/contextclip` in ctxalign's home folder (where
    /// `train-contextclip` writes by default).
    #[arg(long)]
    model: Option<PathBuf>,
    /// `builtin` (the Vignettes classes), `uci-digits` (embedded; stratified 70/30), `folder:<root>`
    /// (ImageFolder; `<root>/train` and `<root>/test` or `val` when present), `cifar10:<dir>`,
    /// `cifar100:<dir>` (binary batches), `mnist:<dir>` (IDX files, optionally .gz).
    #[arg(long, default_value = "builtin")]
    dataset: DatasetSpec,
    /// `zeroshot`, `linear-probe` or `finetune`.
    #[arg(long, default_value = "zeroshot")]
    task: String,
    /// A built-in template set (cifar10, cifar100, mnist, resisc45, birdsnap, photo) or a file (one
    /// template per line, or a JSON list). Default: the data set's own, else `photo`.
    #[arg(long)]
    templates: Option<String>,
    /// Fine-tuning steps, batch and learning rate.
    #[arg(long, default_value_t = 200, value_parser = crate::args::positive_steps)]
    steps: u64,
    /// Fine-tuning batch size.
    #[arg(long, default_value_t = 32, value_parser = crate::args::positive_count)]
    batch_size: usize,
    /// Fine-tuning learning rate of the image side (the classifier gets 10×).
    #[arg(long, default_value_t = 1e-4, value_parser = crate::args::learning_rate)]
    lr: f64,
    #[command(flatten)]
    run: super::RunArgs,
    #[command(flatten)]
    bad_input: crate::args::BadInputArgs,
    /// Where the built-in benchmark is generated (once); default: `vignettes-default` in
    /// ctxalign's home folder.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// CLIP_benchmark record; default: `results/classify.json` in ctxalign's home folder
    /// (fine-tuning writes its run beside it, in `classify.finetune/`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Device and precision (the precision's dtype also serves zero-shot and the probe).
    #[command(flatten)]
    runtime: TrainingArgs,
}

pub fn classify(a: ClassifyArgs) -> anyhow::Result<bool> {
    #[cfg(not(feature = "train"))]
    if a.task == "finetune" {
        anyhow::bail!("--task finetune needs a build with training (the default `train` feature)");
    }
    if a.task != "finetune" && a.runtime.nproc_per_node.is_some_and(|n| n > 1) {
        anyhow::bail!("--nproc-per-node runs training on several ranks: only --task finetune trains");
    }
    #[cfg(feature = "train")]
    if a.task == "finetune" && super::launch::launch_ranks(&a.runtime)? {
        return Ok(true);
    }
    #[cfg(feature = "train")]
    let reporting = super::launch::reports(&a.runtime);
    #[cfg(not(feature = "train"))]
    let reporting = true;
    let out = or_default(&a.out, || ctxalign::home::results_file("classify.json"))?;
    let model = or_default(&a.model, || ctxalign::home::run_dir("contextclip"))?;
    crate::args::check_output_file(&out)?;
    let data_dir = or_default(&a.data_dir, ctxalign::home::builtin_data_dir)?;
    let LoadedDataset { name: dataset, train, test, default_templates } = a.dataset.load(&data_dir, a.run.seed)?;
    // Every image file is checked before the first one is encoded (the probe reads both sets).
    let (train, test) = {
        let decode = ctxalign::data::DecodeOptions::default();
        let (train_total, test_total) = (train.items.len(), test.items.len());
        let (train, train_bad) = train.checked(decode, a.bad_input.policy())?;
        let (test, test_bad) = test.checked(decode, a.bad_input.policy())?;
        for (name, bad, total) in [("train", &train_bad, train_total), ("test", &test_bad, test_total)] {
            let errors: Vec<String> = bad.iter().map(|s| s.error.clone()).collect();
            crate::args::warn_left_out(&format!("{} of {total} {name} images left out", bad.len()), &errors);
        }
        (train, test)
    };
    // An empty split is refused before any model loads, for every task (zero-shot reads only the
    // test split).
    test.require_items(&format!("the test split of {dataset}"))?;
    if a.task != "zeroshot" {
        train.require_items(&format!("the training split of {dataset}"))?;
    }
    let templates = match &a.templates {
        Some(t) => match builtin_templates(t) {
            Some(list) => list,
            None => read_templates(std::path::Path::new(t))?,
        },
        None => builtin_templates(default_templates).expect("built in"),
    };
    let model_name = model.display().to_string();
    if reporting {
        println!(
            "{dataset}: {} classes, {} train / {} test images; {} templates",
            test.classes.len(),
            train.items.len(),
            test.items.len(),
            templates.len()
        );
    }
    let encoder = || -> anyhow::Result<ClipEncoder> {
        let rt = Runtime::new(a.runtime.open()?, a.runtime.precision);
        Ok(ClipEncoder::load(&model, rt.dtype(), &rt.device)?)
    };
    let (task, metrics, extra) = match a.task.as_str() {
        "zeroshot" => ("zeroshot_classification", zero_shot(&encoder()?, &test, &templates)?, String::new()),
        "linear-probe" => {
            let r = linear_probe_sets(&encoder()?, &train, &test, a.run.seed)?;
            ("linear_probe", r.metrics, format!("λ chosen on validation: {}", r.chosen_l2))
        }
        #[cfg(feature = "train")]
        "finetune" => {
            use ctxalign::contextclip::{finetune_classifier, FinetuneOptions};
            let out_dir = out.with_extension("finetune");
            let opts = FinetuneOptions {
                out_dir: out_dir.clone(),
                templates: templates.clone(),
                steps: a.steps,
                batch_size: a.batch_size,
                lr: a.lr,
                classifier_lr: 10.0 * a.lr,
                weight_decay: 0.05,
                run: a.run.control(a.bad_input.policy())?,
            };
            let trained = super::launch::run_training(&a.runtime, |rt, comm| {
                let opts =
                    FinetuneOptions { run: ctxalign::RunControl { dist: comm, ..opts.run.clone() }, ..opts.clone() };
                Ok(finetune_classifier(&model, &train, &test, &opts, &rt)?)
            })?;
            let Some((r, _)) = trained else { return Ok(true) };
            super::print_notices(&r.outcome);
            let Some(finetuned) = r.finetuned else {
                super::exit_interrupted(r.outcome.steps, &out_dir, "continue with --resume");
            };
            let zero_shot = r.zero_shot.map_or_else(|| "-".to_string(), |z| format!("{:.1} %", 100.0 * z.acc1));
            let note =
                format!("zero-shot start: top-1 {zero_shot}; fine-tuned ContextCLIP folder: {}", out_dir.display());
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
    ctxalign::data::write_atomic(&out, serde_json::to_string_pretty(&record)?.as_bytes())?;
    println!("CLIP_benchmark record: {}", out.display());
    Ok(true)
}

#[derive(Args)]
pub struct RetrieveArgs {
    /// A trained ContextCLIP folder; default: `runs/contextclip` in ctxalign's home folder (where
    /// `train-contextclip` writes by default).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Folder of images (searched recursively; jpg, png, webp, bmp, gif, tiff).
    #[arg(long)]
    images: PathBuf,
    /// Text queries (repeatable).
    #[arg(long, required = true)]
    query: Vec<String>,
    /// How many images to show per query.
    #[arg(long, default_value_t = 5, value_parser = crate::args::positive_count)]
    k: usize,
    /// Where the index is kept (default: `.contextclip-index` in the image folder).
    #[arg(long)]
    index: Option<PathBuf>,
    #[command(flatten)]
    bad_input: crate::args::BadInputArgs,
    #[command(flatten)]
    runtime: InferenceArgs,
}

/// Indexes `--images` (or reuses its saved index) and prints the best images per query.
pub fn retrieve(a: RetrieveArgs) -> anyhow::Result<bool> {
    let model = or_default(&a.model, || ctxalign::home::run_dir("contextclip"))?;
    let device = a.runtime.open()?;
    let encoder = ClipEncoder::load(&model, a.runtime.dtype, &device)?;
    // The shared walker: each real image once, however many links reach it; link loops are not
    // followed (a folder holding a link to its parent would otherwise be indexed inside itself).
    let mut walker = Walker::new(WalkOptions::recursive());
    let mut files = walker.files(&a.images, is_image_file)?;
    files.sort();
    let walked_past = walker.left_out();
    if !walked_past.is_empty() {
        eprintln!("note: {} entries of {} not indexed:", walked_past.len(), a.images.display());
        for line in walked_past.iter().take(10) {
            eprintln!("  {line}");
        }
    }
    if files.is_empty() {
        anyhow::bail!("{}: no image files", a.images.display());
    }
    // Every image is checked before the first is encoded: a damaged one fails now, naming it, or
    // is left out and reported under --skip-bad.
    let bad = ctxalign::data::loader::find_unusable(
        &files,
        "images",
        a.bad_input.policy(),
        |p| p.display().to_string(),
        |p| ctxalign::data::check_image(p, ctxalign::data::DecodeOptions::default()).map(drop).map_err(Into::into),
    )?;
    let total = files.len();
    let errors: Vec<String> = bad.iter().map(|s| s.error.clone()).collect();
    crate::args::warn_left_out(&format!("{} of {total} images left out", bad.len()), &errors);
    let files = ctxalign::data::loader::without_unusable(files, &bad);
    let ids: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
    let index_dir = a.index.clone().unwrap_or_else(|| a.images.join(".contextclip-index"));
    // The index is reused only for this model (its fingerprint: config and every weight byte) and
    // these images as they are now (paths, sizes, modification times).
    let provenance = files_fingerprint(&files)?;
    let index = match EmbeddingIndex::load_for(&index_dir, &encoder.fingerprint(), &device) {
        Ok(index) if index.ids() == ids.as_slice() && index.provenance() == Some(provenance.as_str()) => index,
        saved => {
            match saved {
                Ok(_) => eprintln!(
                    "the saved index in {} was made for other or changed images: re-indexing {} images …",
                    index_dir.display(),
                    files.len()
                ),
                Err(ctxalign::Error::ModelMismatch { .. }) => eprintln!(
                    "the saved index in {} was made by another model: re-indexing {} images …",
                    index_dir.display(),
                    files.len()
                ),
                Err(_) => eprintln!("indexing {} images …", files.len()),
            }
            let dim = encoder.model.config.projection_dim;
            let mut index = EmbeddingIndex::for_model(dim, encoder.fingerprint(), &device)?.with_provenance(provenance);
            index.add(ids, &encoder.encode_images(&files)?)?;
            index.save(&index_dir)?;
            index
        }
    };
    let queries: Vec<&str> = a.query.iter().map(String::as_str).collect();
    let hits = index.search(&encoder.encode_texts(&queries)?, a.k)?;
    for (query, hits) in a.query.iter().zip(hits) {
        println!("\n{query}");
        let mut table = Table::new(["rank", "cosine", "image"]);
        for (rank, hit) in hits.iter().enumerate() {
            table.row([(rank + 1).to_string(), format!("{:.3}", hit.score), hit.id.clone()]);
        }
        println!("{table}");
    }
    Ok(true)
}

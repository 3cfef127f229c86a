//! `cargo xtask train-default-backbone`: the small BLIP shipped in `models/` — the library's
//! backbone recipe (`ctxalign::backbone`, the `ctxalign train-backbone` job) on the built-in
//! Vignettes captions, then the evaluation (held-out caption retrieval; zero-shot on the
//! benchmark's valid split) and the model card. `--eval-only` re-measures an existing model folder.

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::Device;
use clap::Args;
use ctxalign::data::captions::{read_caption_json, CaptionedImage};
use ctxalign::data::imagecode::ImageCodeSplit;
use ctxalign::data::vignettes::VignettesConfig;
use ctxalign::data::write_atomic;
use ctxalign::eval::accuracy::{counts_json, percent, share};
use ctxalign::eval::progress::Progress;
use ctxalign::eval::ranking::{RetrievalMetrics, RetrievalReport};
use ctxalign::eval::Table;
use ctxalign::evaluate::{caption_retrieval, imagecode_zero_shot, ImageCodeReport};
use ctxalign::models::ModelFiles;
use ctxalign::{BlipScorer, ScorerOptions};

#[derive(Args)]
pub struct TrainBackboneArgs {
    /// The recipe's options, as `ctxalign train-backbone` takes them; here --out defaults to
    /// `models/blip-vignettes-small` and --run-dir to `target/train-default-backbone`, and the data
    /// is the benchmark of --data-seed in --data.
    #[command(flatten)]
    train: ctxalign_cli::blip::TrainBackboneArgs,
    /// Vignettes benchmark folder; generated with the default settings and `--data-seed` if absent.
    #[arg(long, default_value = "target/vignettes-default")]
    data: PathBuf,
    /// Seed of the built-in benchmark it trains and is evaluated on (generated once).
    #[arg(long, default_value_t = 0)]
    data_seed: u64,
    /// Only evaluate the model in `--out` and rewrite its card's numbers.
    #[arg(long)]
    eval_only: bool,
    /// Text tokens kept per description at evaluation (IMAGECODE-style descriptions run long).
    #[arg(long, default_value_t = 64)]
    eval_max_tokens: usize,
    /// Zero-shot also on the valid split of a benchmark generated with this seed, which training
    /// never saw (in `target/vignettes-seed<N>`): how far the numbers carry beyond the data seed.
    #[arg(long, default_value_t = 1)]
    unseen_seed: u64,
}

pub fn run(mut a: TrainBackboneArgs) -> anyhow::Result<bool> {
    let out = a.train.out.get_or_insert_with(|| PathBuf::from("models/blip-vignettes-small")).clone();
    a.train.run_dir.get_or_insert_with(|| PathBuf::from("target/train-default-backbone"));
    if a.unseen_seed == a.data_seed {
        anyhow::bail!("--unseen-seed {} is the data's seed: give one training never saw", a.unseen_seed);
    }
    let data = ensure_benchmark(&a.data, a.data_seed)?;
    let unseen = ensure_benchmark(&PathBuf::from(format!("target/vignettes-seed{}", a.unseen_seed)), a.unseen_seed)?;
    a.train.data_dir = Some(a.data.clone());
    let data_record = out.join("data.json");
    let training = if a.eval_only {
        // The data the model was trained on, as its training run recorded it.
        let recorded = DataRecord::read(&data_record)?;
        if recorded.data_seed != a.data_seed {
            anyhow::bail!(
                "{}: the model was trained on seed-{} data, not {}",
                out.display(),
                recorded.data_seed,
                a.data_seed
            );
        }
        (a.train.contrast_groups, a.train.contrast_descriptions) =
            (recorded.contrast_groups, recorded.contrast_descriptions);
        let path = out.join("training.json");
        serde_json::from_str(&std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?)
            .with_context(|| format!("{}: malformed", path.display()))?
    } else {
        // Every rank trains; the process of rank 0 evaluates and writes the card.
        if ctxalign_cli::launch::launch_ranks(&a.train.runtime)? {
            return Ok(true);
        }
        if ctxalign_cli::blip::run_backbone(&a.train)?.is_none() {
            return Ok(true);
        }
        let record = DataRecord {
            data_seed: a.data_seed,
            contrast_groups: a.train.contrast_groups,
            contrast_descriptions: a.train.contrast_descriptions,
        };
        write_atomic(&data_record, serde_json::to_string_pretty(&record.to_json())?.as_bytes())?;
        let path = out.join("training.json");
        serde_json::from_str(&std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?)?
    };
    let training = card_facts(&training, a.data_seed);
    let device = ctxalign_cli::launch::local_runtime(&a.train.runtime)?.device;
    let eval = evaluate(&out, &data, &unseen, a.eval_max_tokens, &device)?;
    let results = serde_json::json!({
        "training": training,
        "retrieval_val": eval.all,
        "retrieval_val_listings": eval.listings,
        "zero_shot_valid": zero_shot_summary(&eval.zero_shot),
        "zero_shot_valid_unseen_seed": zero_shot_summary(&eval.unseen),
        "unseen_seed": a.unseen_seed,
        "eval_max_tokens": a.eval_max_tokens,
        "eval_seconds": eval.seconds,
    });
    write_atomic(&out.join("eval.json"), serde_json::to_string_pretty(&results)?.as_bytes())?;
    write_atomic(&out.join("README.md"), model_card(&a, &training, &eval).as_bytes())?;
    println!("model card: {}", out.join("README.md").display());
    Ok(true)
}

/// The data a default model was trained on (`data.json` in its folder), for `--eval-only`.
struct DataRecord {
    data_seed: u64,
    contrast_groups: usize,
    contrast_descriptions: usize,
}

impl DataRecord {
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "data_seed": self.data_seed,
            "contrast_groups": self.contrast_groups,
            "contrast_descriptions": self.contrast_descriptions,
        })
    }

    fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: malformed", path.display()))?;
        let field = |key: &str| {
            value
                .get(key)
                .and_then(|v| v.as_u64())
                .with_context(|| format!("{}: no whole number `{key}`", path.display()))
        };
        Ok(Self {
            data_seed: field("data_seed")?,
            contrast_groups: field("contrast_groups")? as usize,
            contrast_descriptions: field("contrast_descriptions")? as usize,
        })
    }
}

/// The facts the card shows, flat: from the recipe's `training.json` (`options`, `runtime`,
/// `report`), or a record of the older flat layout as it is.
fn card_facts(record: &serde_json::Value, data_seed: u64) -> serde_json::Value {
    let (Some(options), Some(report)) = (record.get("options"), record.get("report")) else { return record.clone() };
    let mut facts = serde_json::Map::new();
    for part in [options, report] {
        if let Some(map) = part.as_object() {
            facts.extend(map.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
    }
    facts.insert("data_seed".into(), data_seed.into());
    facts.insert("threads".into(), rayon::current_num_threads().into());
    if let Some(rt) = record.get("runtime") {
        facts.insert("runtime".into(), rt.clone());
    }
    serde_json::Value::Object(facts)
}

fn ensure_benchmark(dir: &Path, seed: u64) -> anyhow::Result<PathBuf> {
    Ok(ctxalign::data::vignettes::ensure_benchmark(&VignettesConfig { seed, ..Default::default() }, dir)?)
}

/// Held-out retrieval on all captions and on the listing captions alone, and zero-shot on the
/// valid split of the benchmark and of the `unseen` one.
fn evaluate(
    model: &Path,
    data: &Path,
    unseen: &Path,
    max_tokens: usize,
    device: &Device,
) -> anyhow::Result<Evaluation> {
    let started = std::time::Instant::now();
    let files = ModelFiles::from_dir(model)?;
    let options = ScorerOptions { max_tokens, ..Default::default() };
    let scorer = BlipScorer::from_files(&files, options, device)?;
    let captions_dir = data.join("captions");
    let val = read_caption_json(&captions_dir.join("val.json"), &captions_dir)?;
    let listings = val.iter().map(CaptionedImage::first_caption_only).collect::<Vec<_>>();
    let mut retrieval = vec![];
    for (name, items) in [("all captions", &val), ("listing captions", &listings)] {
        let queries: usize = items.iter().map(|i| i.captions.len()).sum();
        let bar = progress_bar(queries as u64, &format!("held-out {name}"));
        retrieval.push(caption_retrieval(&scorer, items, 16, &|n| bar.set_position(n as u64))?);
        bar.finish();
        let pct = |x: f64| format!("{:.1}", 100.0 * x);
        let mut t =
            Table::new([format!("held-out {name}"), "R@1".into(), "R@5".into(), "R@10".into(), "median rank".into()]);
        let r = retrieval.last().expect("just pushed");
        for (row, m) in [
            ("text→image, ITC top-16 + ITM re-rank", reranked(r)),
            ("text→image, ITC", &r.text_to_image),
            ("image→text, ITC", &r.image_to_text),
        ] {
            let mut cells = vec![row.to_string()];
            cells.extend(m.recall_at.iter().map(|(_, r)| pct(*r)));
            cells.push(format!("{}", m.median_rank));
            t.row(cells);
        }
        println!("{t}");
        println!(
            "({} images, {queries} caption queries; chance R@1 = {:.2} %)\n",
            items.len(),
            100.0 / items.len() as f64
        );
    }
    let mut zero_shot = vec![];
    for (name, dir) in [("valid sets", data), ("valid sets, unseen seed", unseen)] {
        let split = ImageCodeSplit::open(&dir.join("imagecode"), "valid")?;
        let bar = progress_bar(split.sets().len() as u64, name);
        zero_shot.push(imagecode_zero_shot(&scorer, &split, &|n| bar.set_position(n as u64))?);
        bar.finish();
        println!("{}", accuracy_table(name, zero_shot.last().expect("just pushed")));
    }
    let unseen = zero_shot.pop().expect("two reports");
    let zero_shot = zero_shot.pop().expect("two reports");
    let listings = retrieval.pop().expect("two reports");
    let all = retrieval.pop().expect("two reports");
    Ok(Evaluation { all, listings, zero_shot, unseen, seconds: started.elapsed().as_secs_f64() })
}

struct Evaluation {
    all: RetrievalReport,
    listings: RetrievalReport,
    zero_shot: ImageCodeReport,
    /// Zero-shot on the valid split of the benchmark of `--unseen-seed`.
    unseen: ImageCodeReport,
    seconds: f64,
}

/// Text→image after re-ranking: [`caption_retrieval`] always re-ranks, so its report has it.
fn reranked(r: &RetrievalReport) -> &RetrievalMetrics {
    &r.reranked.as_ref().expect("caption_retrieval re-ranks the ITC top k").text_to_image
}

fn accuracy_table(name: &str, r: &ImageCodeReport) -> Table {
    let mut t = Table::new([format!("zero-shot, {name} (chance 10 %)"), "All".into(), "Video".into(), "Static".into()]);
    for (name, acc) in [("ITM", &r.itm.accuracy), ("ITC", &r.itc.accuracy)] {
        t.row([name.to_string(), percent(acc, "all"), percent(acc, "video"), percent(acc, "static")]);
    }
    t
}

fn zero_shot_summary(r: &ImageCodeReport) -> serde_json::Value {
    serde_json::json!({"itm": counts_json(&r.itm.accuracy), "itc": counts_json(&r.itc.accuracy)})
}

fn progress_bar(len: u64, what: &str) -> Progress {
    Progress::new(len, what)
}

fn model_card(a: &TrainBackboneArgs, training: &serde_json::Value, eval: &Evaluation) -> String {
    let (retrieval, listings, zero_shot, unseen) = (&eval.all, &eval.listings, &eval.zero_shot, &eval.unseen);
    let g = |k: &str| training.get(k).map(|v| v.to_string()).unwrap_or_else(|| "?".into());
    let pct = |x: f64| format!("{:.1} %", 100.0 * x);
    let recall = |m: &RetrievalMetrics| m.recall_at.iter().map(|(_, r)| pct(*r)).collect::<Vec<_>>().join(" | ");
    let acc = |acc: &ctxalign::eval::GroupCounts, grp: &str| {
        let (c, n) = acc.get(grp).copied().unwrap_or((0, 0));
        format!("{} ({c}/{n})", share(acc, grp).map(pct).unwrap_or("-".into()))
    };
    let all_share = |acc: &ctxalign::eval::GroupCounts| 100.0 * share(acc, "all").unwrap_or(0.0);
    let categories: Vec<String> = zero_shot
        .itm
        .accuracy
        .keys()
        .filter(|k| !["all", "video", "static"].contains(&k.as_str()))
        .map(|k| {
            format!(
                "| {k} | {} | {} | {} |",
                acc(&zero_shot.itm.accuracy, k),
                acc(&zero_shot.itc.accuracy, k),
                acc(&unseen.itm.accuracy, k)
            )
        })
        .collect();
    let stages: Vec<&serde_json::Value> =
        training.get("stages").and_then(|v| v.as_array()).map(|v| v.iter().collect()).unwrap_or_default();
    let stage_lines: Vec<String> = stages
        .iter()
        .map(|s| {
            let name = s["stage"].as_str().unwrap_or("?");
            let terms: Vec<String> = s["final_terms"]
                .as_object()
                .map(|m| m.iter().map(|(k, v)| format!("{k} {:.3}", v.as_f64().unwrap_or(f64::NAN))).collect())
                .unwrap_or_default();
            format!(
                "| `{name}` | {} | {} | {:.0} s | `loss-{name}.png` |",
                s["steps"],
                terms.join(", "),
                s["seconds"].as_f64().unwrap_or(0.0)
            )
        })
        .collect();
    let contrast_groups = a.train.contrast_groups;
    let contrast = if contrast_groups > 0 {
        format!(
            "- **The contrast corpus** (`ctxalign::data::vignettes::ensure_contrast_captions`, written beside the \
             captions as `captions/contrast.json`): {contrast_groups} groups of ten near-identical scenes, drawn as \
             the benchmark's sets are (static edits or video frames, the same difficulty) from a random stream of \
             their own — never a set of the benchmark's splits — and each image described by up to \
             {per} statements that are true of it and false of each of the other nine (the benchmark's own \
             description engine). Images no description singles out are left out.\n",
            per = a.train.contrast_descriptions
        )
    } else {
        String::new()
    };
    let rerank_effect = {
        let (itc, re) = (retrieval.text_to_image.recall_at[0].1, reranked(retrieval).recall_at[0].1);
        match re > itc {
            true => format!(
                "Re-ranking ITC's top 16 by ITM (BLIP's protocol) raises text→image R@1 on the held-out \
                 captions from {} to {}",
                pct(itc),
                pct(re)
            ),
            false => format!(
                "Re-ranking ITC's top 16 by ITM (BLIP's protocol) does not raise text→image R@1 on the \
                 held-out captions ({} → {}): rank by ITC with this model",
                pct(itc),
                pct(re)
            ),
        }
    };
    // Categories whose ITM accuracy is within chance's reach (under 12 % of ≥ 30 descriptions).
    let weak: Vec<String> = zero_shot
        .itm
        .accuracy
        .iter()
        .filter(|(k, &(c, n))| {
            !["all", "video", "static"].contains(&k.as_str()) && n >= 30 && (c as f64) < 0.12 * n as f64
        })
        .map(|(k, _)| k.clone())
        .collect();
    let weak = match weak.is_empty() {
        true => String::new(),
        false => format!(" ITM is at chance on {} descriptions.", weak.join(" and ")),
    };
    let sharpness = training.get("negative_sharpness").and_then(|v| v.as_f64()).unwrap_or(1.0);
    let negatives = if sharpness == 1.0 {
        "drawn from `softmax(sim/τ)` (BLIP's hard negatives)".to_string()
    } else if sharpness == 0.0 {
        "drawn uniformly from the batch's others (`--negative-sharpness 0`: a matcher from scratch given \
         BLIP's hard negatives stays at the constant predictor's loss)"
            .to_string()
    } else {
        format!("drawn from `softmax({sharpness} · sim/τ)` (`--negative-sharpness {sharpness}`)")
    };
    let (itm_valid, itc_valid, itm_unseen) =
        (all_share(&zero_shot.itm.accuracy), all_share(&zero_shot.itc.accuracy), all_share(&unseen.itm.accuracy));
    let command = reproduce_command(a, training);
    let data_seed = g("data_seed");
    let zero_shot_rows: Vec<String> = [(zero_shot, &data_seed), (unseen, &a.unseen_seed.to_string())]
        .iter()
        .flat_map(|(report, seed)| {
            [("ITM (`[ENC]`)", &report.itm.accuracy), ("ITC", &report.itc.accuracy)].map(|(scoring, counts)| {
                format!(
                    "| {scoring}, seed {seed} | {} | {} | {} |",
                    acc(counts, "all"),
                    acc(counts, "video"),
                    acc(counts, "static")
                )
            })
        })
        .collect();
    format!(
        r#"# blip-vignettes-small

A small BLIP (`BlipForImageTextRetrieval`, HF layout) trained **from scratch** by ctxalign on its
built-in Vignettes world, so that every command works offline on a fresh clone. It runs through
exactly the code path of a real checkpoint such as `Salesforce/blip-itm-base-coco` (same loader,
tokenizer handling, `[ENC]` ITM, ITC). It knows only the synthetic world of coloured shapes; for real
images use a real BLIP checkpoint.

**In short:** on the benchmark's valid split (chance 10 %) its ITM picks the described image of 10
in {itm_valid:.1} % of the descriptions (ITC: {itc_valid:.1} %); on a benchmark generated with seed
{unseen_seed}, which training never saw, {itm_unseen:.1} %.{weak} {rerank_effect}.

## Architecture

`BlipConfig::vignettes_small` (see `config.json`): ViT with 96 px input, 12 px patches (8×8 grid),
4 layers of width 128 (4 heads, MLP 512); BERT "MED" text encoder with cross-attention, 4 layers of
width 128 (4 heads, FFN 512), 64 positions; ITC projections to 128; ITM head. {params} parameters
(f32). `tokenizer.json`: uncased WordPiece, {vocab} ids — the words of the training captions, single
characters and `##` letter/digit continuations (so unseen words split into characters, never `[UNK]`),
then `[DEC]`, `[ENC]` as the last two ids as in BLIP.

## Training

- **Single scenes:** the benchmark's caption images (`cargo xtask synth --seed {data_seed}` defaults,
  written to `{data}` if absent), 96 px, 5 captions each — first a listing of every object and the
  background, then four relational captions.
{contrast}- {train_images} captioned images in all. No crops or flips (a crop can cut an object out and make
  its caption false; a flip makes "left" false).
- **Stages** (`ctxalign::backbone`), each its own AdamW, schedule and run folder:
  1. ITC alone on the first captions of the single scenes: from scratch, hard negatives drawn from
     random similarities are random, and batches of near-identical scenes leave ITC near ln(batch).
  2. BLIP's retrieval loss on the single scenes — ITC plus ITM on one negative image per text and
     one negative text per image, {negatives}, same-image entries excluded (`ctxalign::train::blip`).
  3. The same loss on every image, each batch keeping a group of the contrast corpus together, so
     that a description's negatives include the scenes of its group, of each of which it is false.

  ITC has a learned temperature (init 0.07, clamped to [0.001, 0.5]) and soft targets over captions
  of the same image; in-batch only (no momentum encoder or feature queue). Captions up to {max_tokens}
  tokens; {captions_used}.
- Optimiser, per stage: AdamW (β 0.9/0.999, weight decay {wd}, none on the temperature), peak lr {lr}
  ({itm_lr} for the cross-attention layers and the ITM head) after {warmup} warm-up steps, cosine to
  10 %; gradient norm clipped at 5; batch {batch}; seed {seed}; final temperature {temp}.
- {seconds:.0} s of training on {threads} CPU threads in all:

| stage | steps | final mean loss terms | time | curve |
| --- | ---: | --- | ---: | --- |
{stage_lines}

## Evaluation

Held-out captions (`captions/val.json`: {val_images} single scenes, each one candidate; chance R@1 =
{chance:.2} %), queried with all {queries} captions and with the {val_images} listing captions alone:

| text → image | all: R@1 | R@5 | R@10 | listings: R@1 | R@5 | R@10 |
| --- | --- | --- | --- | --- | --- | --- |
| ITC top-16, re-ranked by ITM + ITC (BLIP's protocol) | {rerank} | {rerank_l} |
| ITC only | {itc} | {itc_l} |
| image → text, ITC only | {i2t} | {i2t_l} |

Zero-shot on IMAGECODE-format **valid** splits (sets of 10 near-identical images; chance 10 %;
descriptions up to {eval_tokens} tokens) — the benchmark's (seed {data_seed}, {descriptions}
descriptions) and one generated with seed {unseen_seed} ({unseen_descriptions} descriptions), whose
scenes, sets and descriptions training never saw:

| scoring | All | Video | Static |
| --- | --- | --- | --- |
{zero_shot_rows}

By description category (a description counts in each category of its statements):

| category | ITM, seed {data_seed} | ITC, seed {data_seed} | ITM, seed {unseen_seed} |
| --- | --- | --- | --- |
{categories}

Neither the sets nor the descriptions of any benchmark split were trained on; the contrast
corpus is drawn the way the sets are, from a stream of its own.

## Reproduce

```sh
{command}
cargo xtask train-default-backbone --eval-only  # re-measure the numbers above from the shipped files
```

Training is deterministic for a given seed and thread count (CPU); numbers on other thread counts
can differ in the last digits of the weights. Full results: `eval.json`; run record: `training.json`.
"#,
        params = g("parameters"),
        vocab = g("vocab_size"),
        unseen_seed = a.unseen_seed,
        data = a.data.display(),
        train_images = g("train_images"),
        wd = g("weight_decay"),
        lr = g("lr"),
        itm_lr = g("itm_lr"),
        warmup = g("warmup_steps"),
        batch = g("batch_size"),
        max_tokens = g("max_tokens"),
        captions_used = if training.get("all_captions").and_then(|v| v.as_bool()).unwrap_or(false) {
            "stages 2 and 3 draw one of an image's captions per epoch"
        } else {
            "every stage trains on each image's first caption"
        },
        seed = g("seed"),
        temp = g("final_temperature"),
        seconds = training.get("seconds").and_then(|v| v.as_f64()).unwrap_or(0.0),
        threads = g("threads"),
        stage_lines = stage_lines.join("\n"),
        val_images = retrieval.image_to_text.queries,
        queries = retrieval.text_to_image.queries,
        chance = 100.0 / retrieval.image_to_text.queries.max(1) as f64,
        rerank = recall(reranked(retrieval)),
        itc = recall(&retrieval.text_to_image),
        i2t = recall(&retrieval.image_to_text),
        rerank_l = recall(reranked(listings)),
        itc_l = recall(&listings.text_to_image),
        i2t_l = recall(&listings.image_to_text),
        descriptions = zero_shot.itm.predictions.len(),
        unseen_descriptions = unseen.itm.predictions.len(),
        eval_tokens = a.eval_max_tokens,
        categories = categories.join("\n"),
        zero_shot_rows = zero_shot_rows.join("\n"),
    )
}

/// The command that trains this model again: the recipe's options as recorded.
fn reproduce_command(a: &TrainBackboneArgs, training: &serde_json::Value) -> String {
    let g = |k: &str| training.get(k).map(|v| v.to_string()).unwrap_or_else(|| "?".into());
    let mut flags = vec![
        format!("--itc-steps {}", g("itc_steps")),
        format!("--steps {}", g("steps")),
        format!("--contrast-steps {}", training.get("contrast_steps").map_or("0".into(), |v| v.to_string())),
    ];
    if a.train.contrast_groups > 0 {
        flags.push(format!("--contrast-groups {}", a.train.contrast_groups));
        flags.push(format!("--contrast-descriptions {}", a.train.contrast_descriptions));
    }
    if training.get("all_captions").and_then(|v| v.as_bool()).unwrap_or(false) {
        flags.push("--all-captions".into());
    }
    if let Some(sharpness) = training.get("negative_sharpness") {
        flags.push(format!("--negative-sharpness {sharpness}"));
    }
    for key in ["batch_size", "lr", "itm_lr", "weight_decay", "warmup_steps", "max_tokens", "seed"] {
        flags.push(format!("--{} {}", key.replace('_', "-"), g(key)));
    }
    format!("cargo xtask train-default-backbone \\\n    {}", flags.join(" "))
}

//! **Vignettes**: the built-in contextual benchmark.
//!
//! Procedurally rendered scenes of coloured shapes — anti-aliased, rotated, of two sizes, several per
//! scene, overlapping and occluding, on varied backgrounds — each with its scene graph, and
//! descriptions generated from the graph whose truth is checked: every description is true of its
//! target and false of each of the other 9 candidates of its set. It tests what IMAGECODE tests
//! (quantity, spatial relations, negation, occlusion, fine nuances, co-reference, with context that
//! holds everywhere) and is written in the real formats, so the readers and evaluators run the same
//! code on it as on real data:
//!
//! ```text
//! <out>/imagecode/image-sets/<set>/imgX.jpg     10 per set; video sets use frame numbers X > 9
//! <out>/imagecode/{train,valid}_data.json       {set: {"<target>": description}}
//! <out>/imagecode/test_data_unlabeled.json      {set: [description, ...]}
//! <out>/imagecode/test_labels.json              {set: [target, ...]} (what a leaderboard hides)
//! <out>/imagecode/<split>_categories.json       {set: {"<target>": [category, ...]}}
//! <out>/imagecode/scenes/<set>.json             the 10 scene graphs
//! <out>/captions/images/<id>.jpg, captions/{train,val}.json     BLIP caption JSON, several true captions each
//! <out>/classes/{train,val}/<colour shape>/<id>.png            one object per image, 24 classes
//! <out>/report.json                                           counts per category, description lengths
//! ```
//!
//! Everything is deterministic from the seed (and independent of the thread count).

pub mod describe;
pub mod scene;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use rayon::prelude::*;
use serde::Serialize;

use crate::captions::{write_caption_json, CaptionedImage};
use crate::error::DataError;
use crate::rng::Rng;
use crate::write_atomic;
use describe::{describe, true_props, Description, Prop};
use scene::{place, random_object, render, Scene, BACKGROUNDS, COLORS, SHAPES, SIZES};

/// How hard the sets are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Difficulty {
    /// 2–3 objects, large edits between static candidates, fast motion in video.
    Easy,
    /// 3–5 objects.
    Medium,
    /// 4–6 objects, single small edits, slow motion, at most 2 discriminative statements.
    Hard,
}

impl std::str::FromStr for Difficulty {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "easy" => Ok(Self::Easy),
            "medium" => Ok(Self::Medium),
            "hard" => Ok(Self::Hard),
            _ => Err(format!("difficulty `{s}`: expected easy, medium or hard")),
        }
    }
}

impl Difficulty {
    fn objects(self) -> (usize, usize) {
        match self {
            Self::Easy => (2, 3),
            Self::Medium => (3, 5),
            Self::Hard => (4, 6),
        }
    }
    fn max_discriminative(self) -> usize {
        match self {
            Self::Hard => 2,
            _ => 3,
        }
    }
    fn context(self) -> usize {
        match self {
            Self::Easy => 0,
            Self::Medium => 1,
            Self::Hard => 2,
        }
    }
    fn edits(self) -> usize {
        match self {
            Self::Easy => 2,
            _ => 1,
        }
    }
    fn speed(self) -> f64 {
        match self {
            Self::Easy => 0.05,
            Self::Medium => 0.03,
            Self::Hard => 0.02,
        }
    }
}

/// Settings of a generated benchmark (recorded in its `config.json`).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct VignettesConfig {
    pub seed: u64,
    /// Image side in pixels (64–96 for CPU training; 224/384 for backbone-size runs).
    pub image_size: u32,
    pub difficulty: Difficulty,
    /// IMAGECODE-format sets per split.
    pub train_sets: usize,
    pub valid_sets: usize,
    pub test_sets: usize,
    /// Share of video sets (the rest are static).
    pub video_share: f64,
    /// Descriptions per set (1–3 as IMAGECODE, each of a different target).
    pub descriptions_per_set: usize,
    /// Single-scene caption images (split 90/10 into train/val).
    pub caption_images: usize,
    pub captions_per_image: usize,
    /// Classification images per class (split 80/20).
    pub class_images: usize,
}

impl Default for VignettesConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            image_size: 96,
            difficulty: Difficulty::Medium,
            train_sets: 1000,
            valid_sets: 200,
            test_sets: 200,
            video_share: 0.5,
            descriptions_per_set: 2,
            caption_images: 4000,
            captions_per_image: 5,
            class_images: 60,
        }
    }
}

/// One generated set: 10 scenes, frame numbers for the file names, and descriptions by target.
#[derive(Debug, Clone, Serialize)]
pub struct GeneratedSet {
    pub name: String,
    pub video: bool,
    /// `imgX` numbers, increasing (video frames skip numbers).
    pub frames: Vec<u32>,
    pub scenes: Vec<Scene>,
    /// (target, description)
    pub descriptions: Vec<(usize, Description)>,
}

fn random_scene(rng: &mut Rng, difficulty: Difficulty) -> Scene {
    let (lo, hi) = difficulty.objects();
    let n = lo + rng.below(hi - lo + 1);
    Scene {
        background: *rng.pick(&BACKGROUNDS),
        shade: rng.range_f64(-1.0, 1.0),
        objects: (0..n).map(|_| random_object(rng)).collect(),
    }
}

/// Every object at least 35 % visible, so counts are unambiguous to a viewer.
fn well_formed(scene: &Scene) -> bool {
    scene.objects.iter().all(|o| o.visible >= 0.35)
}

/// One small change to a scene, for static sets.
fn edit(scene: &mut Scene, rng: &mut Rng) {
    let n = scene.objects.len();
    match rng.below(7) {
        0 => scene.objects[rng.below(n)].color = *rng.pick(&COLORS),
        1 => scene.objects[rng.below(n)].shape = *rng.pick(&SHAPES),
        2 => scene.objects[rng.below(n)].size = *rng.pick(&SIZES),
        3 => place(&mut scene.objects[rng.below(n)], rng),
        4 if n > 2 => {
            scene.objects.remove(rng.below(n));
        }
        5 if n < 7 => scene.objects.push(random_object(rng)),
        _ if n > 1 => {
            // Swap drawing order: what occluded what changes.
            let (i, j) = (rng.below(n), rng.below(n));
            scene.objects.swap(i, j);
        }
        _ => place(&mut scene.objects[0], rng),
    }
}

fn static_candidates(rng: &mut Rng, difficulty: Difficulty, side: u32) -> Option<Vec<Scene>> {
    let base = random_scene(rng, difficulty);
    let mut scenes = Vec::with_capacity(10);
    let mut tries = 0;
    while scenes.len() < 10 {
        tries += 1;
        if tries > 200 {
            return None;
        }
        let mut s = base.clone();
        s.shade = rng.range_f64(-1.0, 1.0);
        for _ in 0..difficulty.edits() + rng.below(2) {
            edit(&mut s, rng);
        }
        render(&mut s, side);
        if well_formed(&s) && !scenes.iter().any(|o: &Scene| same_content(o, &s)) {
            scenes.push(s);
        }
    }
    Some(scenes)
}

fn same_content(a: &Scene, b: &Scene) -> bool {
    a.objects.len() == b.objects.len()
        && a.objects.iter().zip(&b.objects).all(|(x, y)| {
            x.shape == y.shape
                && x.color == y.color
                && x.size == y.size
                && (x.x - y.x).abs() < 0.03
                && (x.y - y.y).abs() < 0.03
        })
}

fn video_candidates(rng: &mut Rng, difficulty: Difficulty, side: u32) -> Option<(Vec<Scene>, Vec<u32>)> {
    let mut scene = random_scene(rng, difficulty);
    let speed = difficulty.speed();
    let mut velocity: Vec<(f64, f64)> =
        scene.objects.iter().map(|_| (rng.range_f64(-speed, speed), rng.range_f64(-speed, speed))).collect();
    let stride = 1 + rng.below(4) as u32;
    let start = rng.below(5) as u32;
    let frames: Vec<u32> = (0..10).map(|t| start + t * stride).collect();
    // One object may appear and one may leave during the clip.
    let appear_at = rng.bool(0.5).then(|| 1 + rng.below(8));
    let leave_at = rng.bool(0.4).then(|| 1 + rng.below(8));
    let newcomer = random_object(rng);
    let mut scenes = Vec::with_capacity(10);
    for t in 0..10 {
        if Some(t) == appear_at {
            scene.objects.push(newcomer.clone());
            velocity.push((rng.range_f64(-speed, speed), rng.range_f64(-speed, speed)));
        }
        if Some(t) == leave_at && scene.objects.len() > 2 {
            let k = rng.below(scene.objects.len());
            scene.objects.remove(k);
            velocity.remove(k);
        }
        if t > 0 {
            for (o, v) in scene.objects.iter_mut().zip(velocity.iter_mut()) {
                let m = o.radius() + 0.02;
                for (pos, vel) in [(&mut o.x, &mut v.0), (&mut o.y, &mut v.1)] {
                    *pos += *vel * stride as f64;
                    if *pos < m || *pos > 1.0 - m {
                        *vel = -*vel; // bounce off the border
                        *pos = pos.clamp(m, 1.0 - m);
                    }
                }
                o.angle += 0.05 * stride as f64;
            }
        }
        let mut s = scene.clone();
        render(&mut s, side);
        if !well_formed(&s) {
            return None;
        }
        scenes.push(s);
    }
    Some((scenes, frames))
}

/// The random stream of item `index` of `split` (deterministic in (seed, split, index)).
fn split_rng(cfg: &VignettesConfig, split: &str, index: usize) -> Rng {
    let split_key = split.bytes().fold(0u64, |h, b| h.wrapping_mul(131).wrapping_add(b as u64));
    Rng::derive(cfg.seed, split_key, index as u64)
}

/// Render at a fixed resolution for the scene graph's visibility measures, so the graph (and the
/// descriptions) do not depend on the output image size.
const GRAPH_SIDE: u32 = 96;

/// Ten candidates, static or a video clip (`video`), and their frame numbers; `None` when this
/// draw found no well-formed set (the caller draws again).
fn candidates(rng: &mut Rng, video: bool, difficulty: Difficulty) -> Option<(Vec<Scene>, Vec<u32>)> {
    match video {
        true => video_candidates(rng, difficulty, GRAPH_SIDE),
        false => static_candidates(rng, difficulty, GRAPH_SIDE).map(|s| (s, (0..10).collect())),
    }
}

/// Generates set `index` of a split (deterministic in (seed, split, index)).
pub fn generate_set(cfg: &VignettesConfig, split: &str, index: usize) -> GeneratedSet {
    let mut rng = split_rng(cfg, split, index);
    // Decided once, so sets that need retries do not skew the video/static share.
    let video = rng.bool(cfg.video_share);
    loop {
        let Some((scenes, frames)) = candidates(&mut rng, video, cfg.difficulty) else { continue };
        let mut targets: Vec<usize> = (0..10).collect();
        rng.shuffle(&mut targets);
        let mut descriptions = vec![];
        for t in targets {
            if descriptions.len() == cfg.descriptions_per_set {
                break;
            }
            if let Some(d) =
                describe(&scenes, t, cfg.difficulty.max_discriminative(), cfg.difficulty.context(), &mut rng)
            {
                descriptions.push((t, d));
            }
        }
        if descriptions.is_empty() {
            continue;
        }
        let name = if video {
            format!("vignettes-video-{split}-{index:06}")
        } else {
            format!("open-images-vignettes-{split}-{index:06}")
        };
        return GeneratedSet { name, video, frames, scenes, descriptions };
    }
}

/// The split name of the contrast corpus's groups (a random stream of its own: no group repeats a
/// benchmark set).
pub const CONTRAST_SPLIT: &str = "contrast";

/// Group `index` of the contrast corpus: ten near-identical candidates drawn as the benchmark's
/// sets are (static or video, `cfg`'s difficulty), each described up to `per_image` times by
/// statements true of it and false of each of the other nine ([`describe`]). Candidates no
/// description singles out have none; at least two of the ten have one.
pub fn generate_contrast_group(cfg: &VignettesConfig, index: usize, per_image: usize) -> GeneratedSet {
    let mut rng = split_rng(cfg, CONTRAST_SPLIT, index);
    let video = rng.bool(cfg.video_share);
    loop {
        let Some((scenes, frames)) = candidates(&mut rng, video, cfg.difficulty) else { continue };
        let mut descriptions: Vec<(usize, Description)> = vec![];
        for target in 0..scenes.len() {
            let mut texts: Vec<String> = vec![];
            // Twice the draws asked for: a draw may repeat an earlier description.
            for _ in 0..2 * per_image {
                if texts.len() == per_image {
                    break;
                }
                let Some(d) =
                    describe(&scenes, target, cfg.difficulty.max_discriminative(), cfg.difficulty.context(), &mut rng)
                else {
                    break;
                };
                if !texts.contains(&d.text) {
                    texts.push(d.text.clone());
                    descriptions.push((target, d));
                }
            }
        }
        let described: std::collections::BTreeSet<usize> = descriptions.iter().map(|d| d.0).collect();
        if described.len() < 2 {
            continue;
        }
        let name = format!("vignettes-contrast-{}-{index:06}", if video { "video" } else { "static" });
        return GeneratedSet { name, video, frames, scenes, descriptions };
    }
}

/// The contrast corpus's settings, recorded beside it (`contrast-config.json`) so that a corpus of
/// other settings is written again rather than reused.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct ContrastConfig {
    pub seed: u64,
    pub image_size: u32,
    pub difficulty: Difficulty,
    pub video_share: f64,
    /// Groups of ten near-identical images.
    pub groups: usize,
    /// Descriptions per image, at most.
    pub per_image: usize,
}

/// File of the contrast corpus's captions inside a benchmark's `captions/` folder.
pub const CONTRAST_CAPTIONS: &str = "contrast.json";

/// Writes the **contrast corpus** into `captions_dir` (a benchmark's `captions/` folder, its image
/// root) unless one of the same settings is there: `groups` groups of ten near-identical images
/// (`contrast/<group>/img<frame>.jpg`), each described image recorded in
/// [`CONTRAST_CAPTIONS`] with its descriptions and its group ([`CaptionedImage::group`]). Training
/// batches keep a group together, so a description's hard negatives are its group's other images,
/// of each of which it is false: what teaches a matcher to check every statement against the
/// image, as the benchmark's sets ask, where random scenes teach it to spot objects. Returns the
/// captions file. `progress` is called with the number of groups written so far.
pub fn ensure_contrast_captions(
    cfg: &VignettesConfig,
    groups: usize,
    per_image: usize,
    captions_dir: &Path,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<PathBuf, DataError> {
    let file = captions_dir.join(CONTRAST_CAPTIONS);
    let settings_file = captions_dir.join("contrast-config.json");
    let settings = ContrastConfig {
        seed: cfg.seed,
        image_size: cfg.image_size,
        difficulty: cfg.difficulty,
        video_share: cfg.video_share,
        groups,
        per_image,
    };
    if groups == 0 || per_image == 0 {
        let message = format!(
            "a contrast corpus of {groups} groups of {per_image} descriptions per image: need at least 1 of each"
        );
        return Err(DataError::format(captions_dir, message));
    }
    let recorded: Option<ContrastConfig> =
        std::fs::read_to_string(&settings_file).ok().and_then(|t| serde_json::from_str(&t).ok());
    if file.is_file() && recorded.as_ref() == Some(&settings) {
        return Ok(file);
    }
    // Settings first, captions last: a corpus cut short has no captions file and is written again.
    let _ = std::fs::remove_file(&file);
    let written = std::sync::atomic::AtomicUsize::new(0);
    let items: Vec<Vec<CaptionedImage>> = (0..groups)
        .into_par_iter()
        .map(|g| -> Result<Vec<CaptionedImage>, DataError> {
            let set = generate_contrast_group(cfg, g, per_image);
            let dir = captions_dir.join("contrast").join(&set.name);
            mkdir(&dir)?;
            let mut items = vec![];
            for (target, (scene, frame)) in set.scenes.iter().zip(&set.frames).enumerate() {
                let captions: Vec<String> =
                    set.descriptions.iter().filter(|d| d.0 == target).map(|d| d.1.text.clone()).collect();
                if captions.is_empty() {
                    continue;
                }
                let path = dir.join(format!("img{frame}.jpg"));
                save_jpeg(&path, &render(&mut scene.clone(), cfg.image_size))?;
                items.push(CaptionedImage { image: path, captions, group: Some(set.name.clone()) });
            }
            progress(written.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1);
            Ok(items)
        })
        .collect::<Result<_, _>>()?;
    write_json(&settings_file, &settings)?;
    write_caption_json(&file, captions_dir, &items.concat())?;
    Ok(file)
}

/// Several true captions of one scene, from its scene graph.
pub fn captions_for(scene: &Scene, n: usize, rng: &mut Rng) -> Vec<String> {
    let mut props: Vec<Prop> =
        true_props(scene).into_iter().filter(|p| !matches!(p, Prop::Count { n: 0, .. })).collect();
    rng.shuffle(&mut props);
    let listing = {
        let mut names: Vec<String> = scene
            .objects
            .iter()
            .map(|o| format!("a {} {} {}", o.size.name(), o.color.name(), o.shape.name()))
            .collect();
        names.dedup();
        format!("{} on a {} background", names.join(", "), scene.background.name())
    };
    let mut out = vec![listing];
    for chunk in props.chunks(2) {
        if out.len() >= n {
            break;
        }
        out.push(chunk.iter().map(Prop::text).collect::<Vec<_>>().join(" and "));
    }
    out
}

/// Counts and lengths of a generated benchmark.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub sets: BTreeMap<String, usize>,
    pub descriptions: BTreeMap<String, usize>,
    /// category → descriptions tagged with it
    pub categories: BTreeMap<String, usize>,
    pub words_mean: f64,
    pub words_min: usize,
    pub words_max: usize,
    pub video_sets: usize,
    pub static_sets: usize,
    pub caption_images: usize,
    pub class_images: usize,
    pub images_written: usize,
    pub seconds: f64,
}

fn save_jpeg(path: &Path, img: &image::RgbImage) -> Result<(), DataError> {
    let mut bytes = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 95)
        .encode_image(img)
        .map_err(|e| DataError::format(path, format!("cannot encode: {e}")))?;
    std::fs::write(path, bytes).map_err(|e| DataError::io(path, e))
}

fn mkdir(p: &Path) -> Result<(), DataError> {
    std::fs::create_dir_all(p).map_err(|e| DataError::io(p, e))
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<(), DataError> {
    write_atomic(path, serde_json::to_string_pretty(value).expect("serialisable").as_bytes())
}

/// Generates and writes the whole benchmark under `out`; `progress` is called with the number of
/// images written so far.
pub fn write_benchmark(
    cfg: &VignettesConfig,
    out: &Path,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<Report, DataError> {
    let start = std::time::Instant::now();
    let written = std::sync::atomic::AtomicUsize::new(0);
    let bump = |n: usize| progress(written.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n);
    let ic = out.join("imagecode");
    mkdir(&ic.join("scenes"))?;
    let mut report = Report { words_min: usize::MAX, ..Default::default() };
    let mut total_words = 0usize;
    for (split, count) in [("train", cfg.train_sets), ("valid", cfg.valid_sets), ("test", cfg.test_sets)] {
        let sets: Vec<GeneratedSet> = (0..count)
            .into_par_iter()
            .map(|i| -> Result<GeneratedSet, DataError> {
                let set = generate_set(cfg, split, i);
                let dir = ic.join("image-sets").join(&set.name);
                mkdir(&dir)?;
                for (scene, frame) in set.scenes.iter().zip(&set.frames) {
                    // On a copy: the graph keeps its fixed-resolution visibility measures.
                    let img = render(&mut scene.clone(), cfg.image_size);
                    save_jpeg(&dir.join(format!("img{frame}.jpg")), &img)?;
                }
                write_json(&ic.join("scenes").join(format!("{}.json", set.name)), &set.scenes)?;
                bump(10);
                Ok(set)
            })
            .collect::<Result<_, _>>()?;
        let mut labeled: IndexMap<&str, IndexMap<String, &str>> = IndexMap::new();
        let mut unlabeled: IndexMap<&str, Vec<&str>> = IndexMap::new();
        let mut labels: IndexMap<&str, Vec<usize>> = IndexMap::new();
        let mut cats: IndexMap<&str, IndexMap<String, &Vec<String>>> = IndexMap::new();
        for s in &sets {
            *report.sets.entry(split.into()).or_default() += 1;
            if s.video {
                report.video_sets += 1;
            } else {
                report.static_sets += 1;
            }
            for (t, d) in &s.descriptions {
                *report.descriptions.entry(split.into()).or_default() += 1;
                for c in &d.categories {
                    *report.categories.entry(c.clone()).or_default() += 1;
                }
                let words = d.text.split_whitespace().count();
                total_words += words;
                report.words_min = report.words_min.min(words);
                report.words_max = report.words_max.max(words);
                labeled.entry(&s.name).or_default().insert(t.to_string(), &d.text);
                unlabeled.entry(&s.name).or_default().push(&d.text);
                labels.entry(&s.name).or_default().push(*t);
                cats.entry(&s.name).or_default().insert(t.to_string(), &d.categories);
            }
        }
        if split == "test" {
            write_json(&ic.join("test_data_unlabeled.json"), &unlabeled)?;
            write_json(&ic.join("test_labels.json"), &labels)?;
        } else {
            write_json(&ic.join(format!("{split}_data.json")), &labeled)?;
        }
        write_json(&ic.join(format!("{split}_categories.json")), &cats)?;
    }
    let n_desc: usize = report.descriptions.values().sum();
    report.words_mean = total_words as f64 / n_desc.max(1) as f64;
    if n_desc == 0 {
        report.words_min = 0;
    }

    // Caption corpus.
    let cap_dir = out.join("captions");
    mkdir(&cap_dir.join("images"))?;
    let captioned: Vec<CaptionedImage> = (0..cfg.caption_images)
        .into_par_iter()
        .map(|i| -> Result<CaptionedImage, DataError> {
            let mut rng = Rng::derive(cfg.seed, 0xCA7, i as u64);
            let scene = loop {
                let mut s = random_scene(&mut rng, cfg.difficulty);
                render(&mut s, 96);
                if well_formed(&s) {
                    break s;
                }
            };
            let captions = captions_for(&scene, cfg.captions_per_image, &mut rng);
            let img = render(&mut scene.clone(), cfg.image_size);
            let path = cap_dir.join("images").join(format!("{i:06}.jpg"));
            save_jpeg(&path, &img)?;
            bump(1);
            Ok(CaptionedImage::new(path, captions))
        })
        .collect::<Result<_, _>>()?;
    let cut = captioned.len() * 9 / 10;
    write_caption_json(&cap_dir.join("train.json"), &cap_dir, &captioned[..cut])?;
    write_caption_json(&cap_dir.join("val.json"), &cap_dir, &captioned[cut..])?;
    report.caption_images = captioned.len();

    // Classification: one object per image, class = "<colour> <shape>".
    let classes: Vec<(scene::Color, scene::Shape)> =
        COLORS.iter().flat_map(|&c| SHAPES.iter().map(move |&s| (c, s))).collect();
    let jobs: Vec<(usize, usize)> =
        (0..classes.len()).flat_map(|c| (0..cfg.class_images).map(move |i| (c, i))).collect();
    jobs.par_iter()
        .map(|&(c, i)| -> Result<(), DataError> {
            let mut rng = Rng::derive(cfg.seed, 0xC1A55 + c as u64, i as u64);
            let mut o = random_object(&mut rng);
            (o.color, o.shape) = classes[c];
            let mut s =
                Scene { background: *rng.pick(&BACKGROUNDS), shade: rng.range_f64(-1.0, 1.0), objects: vec![o] };
            let split = if i * 5 < cfg.class_images * 4 { "train" } else { "val" };
            let dir = out.join("classes").join(split).join(format!("{} {}", classes[c].0.name(), classes[c].1.name()));
            mkdir(&dir)?;
            let img = render(&mut s, cfg.image_size);
            let path = dir.join(format!("{i:05}.png"));
            img.save(&path).map_err(|e| DataError::format(&path, format!("cannot encode: {e}")))?;
            bump(1);
            Ok(())
        })
        .collect::<Result<(), _>>()?;
    report.class_images = jobs.len();
    report.images_written = written.load(std::sync::atomic::Ordering::Relaxed);
    report.seconds = start.elapsed().as_secs_f64();
    write_json(&out.join("report.json"), &report)?;
    write_json(&out.join("config.json"), cfg)?;
    Ok(report)
}

/// The settings a written benchmark in `out` was generated with (its `config.json`).
pub fn read_config(out: &Path) -> Result<VignettesConfig, DataError> {
    let file = out.join("config.json");
    crate::error::parse_json(&file, &crate::error::read_text(&file)?)
}

/// Writes the benchmark to `out` unless a finished one (its `report.json`) is already there; used by
/// every command that defaults to the built-in data, so they share one copy.
pub fn ensure_benchmark(cfg: &VignettesConfig, out: &Path) -> Result<PathBuf, DataError> {
    if !out.join("report.json").is_file() {
        eprintln!("generating the Vignettes benchmark (seed {}) in {}", cfg.seed, out.display());
        write_benchmark(cfg, out, &|_| {})?;
    }
    Ok(out.to_owned())
}

pub fn imagecode_root(out: &Path) -> PathBuf {
    out.join("imagecode")
}

//! The Vignettes uniqueness property, verified by a checker that shares no code with the generator's
//! description logic: it parses each description's *text* with its own grammar and evaluates it on
//! the scene graphs as plain JSON. Every description must be true of its target and false of each
//! of the other 9 candidates, on thousands of sets of every difficulty and both kinds.

use ctxalign_data::vignettes::{
    ensure_contrast_captions, generate_contrast_group, generate_set, Difficulty, VignettesConfig,
};
use serde_json::Value;

// The documented semantics (README: "The Vignettes benchmark"), restated here on purpose.
const SPATIAL_MARGIN: f64 = 0.04;
const HIDDEN_BELOW: f64 = 0.9;
const FULLY_VISIBLE_FROM: f64 = 0.995;
const EDGE_BAND: f64 = 0.2;
const SIZES: [&str; 2] = ["small", "large"];
const COLORS: [&str; 6] = ["red", "green", "blue", "yellow", "purple", "orange"];
const SHAPES: [&str; 4] = ["circle", "square", "triangle", "diamond"];

/// Attribute filter parsed from words like "small red square", "blue shapes", "diamond".
#[derive(Debug, Default, Clone)]
struct Filter {
    size: Option<String>,
    color: Option<String>,
    shape: Option<String>,
}

fn parse_filter(words: &str) -> Filter {
    let mut f = Filter::default();
    for w in words.split_whitespace() {
        let singular = w.strip_suffix('s').filter(|s| SHAPES.contains(s) || *s == "shape").unwrap_or(w);
        if SIZES.contains(&w) {
            f.size = Some(w.into());
        } else if COLORS.contains(&w) {
            f.color = Some(w.into());
        } else if SHAPES.contains(&singular) {
            f.shape = Some(singular.into());
        } else if singular != "shape" {
            panic!("checker: unknown word `{w}` in `{words}`");
        }
    }
    f
}

fn matches(f: &Filter, o: &Value) -> bool {
    let eq = |k: &str, v: &Option<String>| v.as_ref().is_none_or(|v| o[k].as_str() == Some(v.as_str()));
    eq("size", &f.size) && eq("color", &f.color) && eq("shape", &f.shape)
}

/// "the X" denotes exactly one object, else the sentence is false.
fn the(scene: &Value, words: &str) -> Option<usize> {
    let f =
        parse_filter(words.strip_prefix("the ").unwrap_or_else(|| panic!("checker: expected `the …`, got `{words}`")));
    let hits: Vec<usize> = scene["objects"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .filter(|(_, o)| matches(&f, o))
        .map(|(i, _)| i)
        .collect();
    (hits.len() == 1).then(|| hits[0])
}

fn count(scene: &Value, words: &str) -> usize {
    let f = parse_filter(words);
    scene["objects"].as_array().unwrap().iter().filter(|o| matches(&f, o)).count()
}

fn num(scene: &Value, i: usize, key: &str) -> f64 {
    scene["objects"][i][key].as_f64().unwrap()
}

fn relation(scene: &Value, a: usize, rel: &str, b: usize) -> bool {
    let (ax, ay, bx, by) = (num(scene, a, "x"), num(scene, a, "y"), num(scene, b, "x"), num(scene, b, "y"));
    match rel {
        "to the left of" => ax + SPATIAL_MARGIN < bx,
        "to the right of" => ax > bx + SPATIAL_MARGIN,
        "above" => ay + SPATIAL_MARGIN < by,
        "below" => ay > by + SPATIAL_MARGIN,
        _ => panic!("checker: unknown relation `{rel}`"),
    }
}

const RELATIONS: [&str; 4] = ["to the left of", "to the right of", "above", "below"];
const NUMBER_WORDS: [&str; 10] = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"];

/// Truth of one sentence on one scene.
fn sentence_holds(scene: &Value, s: &str) -> bool {
    if let Some(bg) = s.strip_prefix("the background is ") {
        return scene["background"].as_str() == Some(bg);
    }
    if let Some(rest) = s.strip_prefix("there is no ") {
        return count(scene, rest) == 0;
    }
    if let Some(rest) = s.strip_prefix("there is exactly one ") {
        if let Some((a, tail)) = rest.split_once(", and it is ") {
            // Co-reference: "it" is the one object just introduced.
            let Some(ai) = the(scene, &format!("the {a}")) else { return false };
            let rel = RELATIONS.iter().find(|r| tail.starts_with(*r)).expect("checker: relation after `it is`");
            let Some(bi) = the(scene, tail[rel.len()..].trim()) else { return false };
            return relation(scene, ai, rel, bi);
        }
        return count(scene, rest) == 1;
    }
    if let Some(rest) = s.strip_prefix("there are exactly ") {
        let (n, what) = rest.split_once(' ').unwrap();
        let n = NUMBER_WORDS.iter().position(|w| *w == n).expect("checker: number word");
        return count(scene, what) == n;
    }
    let (subject, predicate) = s.split_once(" is ").unwrap_or_else(|| panic!("checker: cannot parse `{s}`"));
    let Some(a) = the(scene, subject) else { return false };
    if let Some(rel) = RELATIONS.iter().find(|r| predicate.starts_with(*r)) {
        let Some(b) = the(scene, predicate[rel.len()..].trim()) else { return false };
        return relation(scene, a, rel, b);
    }
    if let Some(b) = predicate.strip_prefix("partly hidden behind ") {
        let Some(b) = the(scene, b) else { return false };
        let hidden_by: Vec<usize> =
            scene["objects"][a]["hidden_by"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        return num(scene, a, "visible") < HIDDEN_BELOW && hidden_by.contains(&b);
    }
    match predicate {
        "fully visible" => num(scene, a, "visible") >= FULLY_VISIBLE_FROM,
        "large" | "small" => scene["objects"][a]["size"].as_str() == Some(predicate),
        "near the top edge" => num(scene, a, "y") < EDGE_BAND,
        "near the bottom edge" => num(scene, a, "y") > 1.0 - EDGE_BAND,
        "near the left edge" => num(scene, a, "x") < EDGE_BAND,
        "near the right edge" => num(scene, a, "x") > 1.0 - EDGE_BAND,
        _ => panic!("checker: unknown predicate `{predicate}`"),
    }
}

fn description_holds(scene: &Value, text: &str) -> bool {
    let body = text.strip_suffix('.').expect("descriptions end with a full stop");
    body.split(". ").all(|s| sentence_holds(scene, s))
}

#[test]
fn every_description_picks_out_exactly_its_target() {
    let mut checked = 0;
    let mut sets = 0;
    let mut kinds = [0usize; 2];
    for (difficulty, n) in [(Difficulty::Easy, 700), (Difficulty::Medium, 700), (Difficulty::Hard, 700)] {
        let cfg = VignettesConfig { seed: 1234, difficulty, descriptions_per_set: 3, ..Default::default() };
        for i in 0..n {
            let set = generate_set(&cfg, "check", i);
            assert_eq!(set.scenes.len(), 10);
            assert!(set.frames.windows(2).all(|w| w[0] < w[1]), "frame numbers increase");
            assert_eq!(set.name.contains("open-images"), !set.video, "IMAGECODE's static/video naming rule");
            kinds[set.video as usize] += 1;
            let scenes: Vec<Value> = set.scenes.iter().map(|s| serde_json::to_value(s).unwrap()).collect();
            for (target, d) in &set.descriptions {
                for (c, scene) in scenes.iter().enumerate() {
                    let truth = description_holds(scene, &d.text);
                    assert_eq!(
                        truth,
                        c == *target,
                        "set {} ({difficulty:?}): `{}` is {truth} of candidate {c}, target {target}",
                        set.name,
                        d.text
                    );
                }
                checked += 1;
            }
            sets += 1;
        }
    }
    assert!(checked >= 4000, "checked {checked} descriptions");
    assert!(kinds[0] > 700 && kinds[1] > 700, "both kinds present: {kinds:?}");
    println!("{checked} descriptions in {sets} sets verified");
}

#[test]
fn generation_is_deterministic() {
    let cfg = VignettesConfig { seed: 9, ..Default::default() };
    let a = serde_json::to_string(&generate_set(&cfg, "train", 17)).unwrap();
    let b = serde_json::to_string(&generate_set(&cfg, "train", 17)).unwrap();
    assert_eq!(a, b);
    let c = serde_json::to_string(&generate_set(&VignettesConfig { seed: 10, ..cfg }, "train", 17)).unwrap();
    assert_ne!(a, c);
}

#[test]
fn every_contrast_description_is_false_of_the_rest_of_its_group() {
    let mut checked = 0;
    let mut described_images = 0;
    for difficulty in [Difficulty::Easy, Difficulty::Medium, Difficulty::Hard] {
        let cfg = VignettesConfig { seed: 77, difficulty, ..Default::default() };
        for i in 0..150 {
            let group = generate_contrast_group(&cfg, i, 3);
            assert_eq!(group.scenes.len(), 10);
            assert!(group.name.starts_with("vignettes-contrast-"), "{}", group.name);
            let scenes: Vec<Value> = group.scenes.iter().map(|s| serde_json::to_value(s).unwrap()).collect();
            let mut per_image = [0usize; 10];
            for (target, d) in &group.descriptions {
                per_image[*target] += 1;
                for (c, scene) in scenes.iter().enumerate() {
                    assert_eq!(description_holds(scene, &d.text), c == *target, "{}: `{}` on {c}", group.name, d.text);
                }
                checked += 1;
            }
            assert!(per_image.iter().all(|&n| n <= 3), "{per_image:?}");
            assert!(per_image.iter().filter(|&&n| n > 0).count() >= 2, "{}: {per_image:?}", group.name);
            let texts: std::collections::HashSet<(usize, &str)> =
                group.descriptions.iter().map(|(t, d)| (*t, d.text.as_str())).collect();
            assert_eq!(texts.len(), group.descriptions.len(), "an image's descriptions differ");
            described_images += per_image.iter().filter(|&&n| n > 0).count();
        }
    }
    assert!(checked > 2000 && described_images > 1500, "{checked} descriptions of {described_images} images");
    // Deterministic, and a stream of its own: not a benchmark set.
    let cfg = VignettesConfig { seed: 5, ..Default::default() };
    let a = serde_json::to_string(&generate_contrast_group(&cfg, 3, 2)).unwrap();
    assert_eq!(a, serde_json::to_string(&generate_contrast_group(&cfg, 3, 2)).unwrap());
    for split in ["train", "valid", "test"] {
        let set = generate_set(&cfg, split, 3);
        let contrast = generate_contrast_group(&cfg, 3, 2);
        assert_ne!(serde_json::to_string(&set.scenes).unwrap(), serde_json::to_string(&contrast.scenes).unwrap());
    }
}

#[test]
fn the_contrast_corpus_is_written_once_per_settings_with_its_groups() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("captions");
    let cfg = VignettesConfig { seed: 3, image_size: 32, ..Default::default() };
    let file = ensure_contrast_captions(&cfg, 6, 2, &dir, &|_| {}).unwrap();
    let items = ctxalign_data::captions::read_caption_json(&file, &dir).unwrap();
    let mut groups: Vec<&str> = items.iter().map(|i| i.group.as_deref().expect("every image in a group")).collect();
    groups.dedup();
    assert_eq!(groups.len(), 6, "each group's images are consecutive");
    for item in &items {
        assert!(item.image.starts_with(dir.join("contrast").join(item.group.as_ref().unwrap())));
        assert!((1..=2).contains(&item.captions.len()));
        assert_eq!(image::image_dimensions(&item.image).unwrap(), (32, 32));
    }
    for (g, group) in groups.iter().enumerate() {
        let expected = generate_contrast_group(&cfg, g, 2);
        assert_eq!(*group, expected.name);
        let texts: Vec<&String> =
            items.iter().filter(|i| i.group.as_deref() == Some(*group)).flat_map(|i| &i.captions).collect();
        assert_eq!(texts.len(), expected.descriptions.len());
    }
    // The same settings: reused as it is; other settings: written again.
    let written = std::fs::metadata(&file).unwrap().modified().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    ensure_contrast_captions(&cfg, 6, 2, &dir, &|_| panic!("nothing to write")).unwrap();
    assert_eq!(std::fs::metadata(&file).unwrap().modified().unwrap(), written);
    ensure_contrast_captions(&cfg, 4, 2, &dir, &|_| {}).unwrap();
    let fewer = ctxalign_data::captions::read_caption_json(&file, &dir).unwrap();
    let mut groups: Vec<_> = fewer.iter().map(|i| i.group.clone()).collect();
    groups.dedup();
    assert_eq!(groups.len(), 4);
    let err = ensure_contrast_captions(&cfg, 0, 2, &dir, &|_| {}).unwrap_err().to_string();
    assert!(err.contains("at least 1"), "{err}");
}

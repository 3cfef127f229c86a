//! Propositions about scenes, their truth, their text, and the choice of a description that is true
//! of the target and false of every other candidate.

use serde::Serialize;

use super::scene::{Color, Object, Scene, Shape, Size};
use crate::rng::Rng;

/// Visibility below which an object is "partly hidden".
pub const HIDDEN_BELOW: f64 = 0.9;
/// Visibility at or above which an object is "fully visible".
pub const FULLY_VISIBLE_FROM: f64 = 0.995;
/// Centre offset (fraction of the side) needed for "left of", "above", ….
pub const SPATIAL_MARGIN: f64 = 0.04;
/// Centre distance to an edge for "near the … edge".
pub const EDGE_BAND: f64 = 0.2;

/// A definite description: "the [size] [colour] shape"; `None` fields match anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Ref {
    pub size: Option<Size>,
    pub color: Option<Color>,
    pub shape: Shape,
}

impl Ref {
    fn matches(&self, o: &Object) -> bool {
        o.shape == self.shape && self.color.is_none_or(|c| c == o.color) && self.size.is_none_or(|s| s == o.size)
    }

    /// The one matching object, or `None` when there are zero or several ("the" presupposes one).
    pub fn resolve<'a>(&self, scene: &'a Scene) -> Option<&'a Object> {
        let mut found = scene.objects.iter().filter(|o| self.matches(o));
        let first = found.next()?;
        found.next().is_none().then_some(first)
    }

    pub fn text(&self) -> String {
        let mut words = vec![];
        if let Some(s) = self.size {
            words.push(s.name());
        }
        if let Some(c) = self.color {
            words.push(c.name());
        }
        words.push(self.shape.name());
        words.join(" ")
    }

    /// The shortest description that picks out `scene.objects[i]` alone, if any.
    pub fn minimal(scene: &Scene, i: usize) -> Option<Ref> {
        let o = &scene.objects[i];
        let options = [
            Ref { size: None, color: None, shape: o.shape },
            Ref { size: None, color: Some(o.color), shape: o.shape },
            Ref { size: Some(o.size), color: None, shape: o.shape },
            Ref { size: Some(o.size), color: Some(o.color), shape: o.shape },
        ];
        options.into_iter().find(|r| r.resolve(scene).is_some_and(|found| std::ptr::eq(found, o)))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Relation {
    Left,
    Right,
    Above,
    Below,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Edge {
    Top,
    Bottom,
    Left,
    Right,
}

/// One statement about a scene.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Prop {
    /// "the background is grey"
    Background(super::scene::Background),
    /// "there is no …" (n = 0), "there is exactly one …", "there are exactly n …s"
    Count { color: Option<Color>, shape: Option<Shape>, n: usize },
    /// "the A is to the left of / to the right of / above / below the B"
    Spatial { a: Ref, rel: Relation, b: Ref },
    /// "the A is partly hidden behind the B"
    Behind { a: Ref, b: Ref },
    /// "the A is fully visible"
    FullyVisible(Ref),
    /// "the A is large/small" (A named without its size)
    SizeOf { a: Ref, size: Size },
    /// "the A is near the top edge"
    NearEdge { a: Ref, edge: Edge },
    /// "there is exactly one A, and it is to the left of the B"
    CoRef { a: Ref, rel: Relation, b: Ref },
}

/// Description categories, as IMAGECODE's analyses name them.
pub const CATEGORIES: [&str; 7] = ["quantity", "spatial", "negation", "occlusion", "nuance", "co-reference", "context"];

fn relation_holds(a: &Object, rel: Relation, b: &Object, margin: f64) -> bool {
    match rel {
        Relation::Left => a.x + margin < b.x,
        Relation::Right => a.x > b.x + margin,
        Relation::Above => a.y + margin < b.y,
        Relation::Below => a.y > b.y + margin,
    }
}

fn rel_text(rel: Relation) -> &'static str {
    match rel {
        Relation::Left => "to the left of",
        Relation::Right => "to the right of",
        Relation::Above => "above",
        Relation::Below => "below",
    }
}

fn count_noun(color: Option<Color>, shape: Option<Shape>, plural: bool) -> String {
    let shape = match (shape, plural) {
        (Some(s), false) => s.name().to_string(),
        (Some(s), true) => format!("{}s", s.name()),
        (None, false) => "shape".into(),
        (None, true) => "shapes".into(),
    };
    match color {
        Some(c) => format!("{} {shape}", c.name()),
        None => shape,
    }
}

const NUMBERS: [&str; 10] = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"];

impl Prop {
    pub fn category(&self) -> &'static str {
        match self {
            Prop::Background(_) => "context",
            Prop::Count { n: 0, .. } => "negation",
            Prop::Count { .. } => "quantity",
            Prop::Spatial { .. } => "spatial",
            Prop::Behind { .. } | Prop::FullyVisible(_) => "occlusion",
            Prop::SizeOf { .. } | Prop::NearEdge { .. } => "nuance",
            Prop::CoRef { .. } => "co-reference",
        }
    }

    /// Truth with the crisp thresholds above; a definite description that does not pick out exactly
    /// one object makes the statement false.
    pub fn holds(&self, scene: &Scene) -> bool {
        self.holds_with(scene, SPATIAL_MARGIN)
    }

    /// As [`Prop::holds`], with another spatial margin (the generator uses a negative one to demand
    /// that a distractor be *clearly* false).
    pub fn holds_with(&self, scene: &Scene, margin: f64) -> bool {
        match self {
            Prop::Background(b) => scene.background == *b,
            Prop::Count { color, shape, n } => {
                scene
                    .objects
                    .iter()
                    .filter(|o| color.is_none_or(|c| c == o.color) && shape.is_none_or(|s| s == o.shape))
                    .count()
                    == *n
            }
            Prop::Spatial { a, rel, b } | Prop::CoRef { a, rel, b } => match (a.resolve(scene), b.resolve(scene)) {
                (Some(x), Some(y)) => relation_holds(x, *rel, y, margin),
                _ => false,
            },
            Prop::Behind { a, b } => match (a.resolve(scene), b.resolve(scene)) {
                (Some(x), Some(y)) => {
                    let yi = scene.objects.iter().position(|o| std::ptr::eq(o, y)).expect("resolved in scene");
                    x.visible < HIDDEN_BELOW && x.hidden_by.contains(&yi)
                }
                _ => false,
            },
            Prop::FullyVisible(a) => a.resolve(scene).is_some_and(|o| o.visible >= FULLY_VISIBLE_FROM),
            Prop::SizeOf { a, size } => a.resolve(scene).is_some_and(|o| o.size == *size),
            Prop::NearEdge { a, edge } => a.resolve(scene).is_some_and(|o| match edge {
                Edge::Top => o.y < EDGE_BAND,
                Edge::Bottom => o.y > 1.0 - EDGE_BAND,
                Edge::Left => o.x < EDGE_BAND,
                Edge::Right => o.x > 1.0 - EDGE_BAND,
            }),
        }
    }

    pub fn text(&self) -> String {
        match self {
            Prop::Background(b) => format!("the background is {}", b.name()),
            Prop::Count { color, shape, n: 0 } => format!("there is no {}", count_noun(*color, *shape, false)),
            Prop::Count { color, shape, n: 1 } => format!("there is exactly one {}", count_noun(*color, *shape, false)),
            Prop::Count { color, shape, n } => {
                format!("there are exactly {} {}", NUMBERS[(*n).min(9)], count_noun(*color, *shape, true))
            }
            Prop::Spatial { a, rel, b } => format!("the {} is {} the {}", a.text(), rel_text(*rel), b.text()),
            Prop::Behind { a, b } => format!("the {} is partly hidden behind the {}", a.text(), b.text()),
            Prop::FullyVisible(a) => format!("the {} is fully visible", a.text()),
            Prop::SizeOf { a, size } => format!("the {} is {}", a.text(), size.name()),
            Prop::NearEdge { a, edge } => {
                let e = match edge {
                    Edge::Top => "top",
                    Edge::Bottom => "bottom",
                    Edge::Left => "left",
                    Edge::Right => "right",
                };
                format!("the {} is near the {e} edge", a.text())
            }
            Prop::CoRef { a, rel, b } => {
                format!("there is exactly one {}, and it is {} the {}", a.text(), rel_text(*rel), b.text())
            }
        }
    }
}

/// Statements true of `scene` worth saying (each made of references that are unique in `scene`).
pub fn true_props(scene: &Scene) -> Vec<Prop> {
    let mut props = vec![Prop::Background(scene.background)];
    let objs = &scene.objects;
    // Counts of colours, shapes and colour–shape pairs present, and absent pairs (negation).
    for color in super::scene::COLORS {
        for shape in super::scene::SHAPES {
            let n = objs.iter().filter(|o| o.color == color && o.shape == shape).count();
            props.push(Prop::Count { color: Some(color), shape: Some(shape), n });
        }
        let n = objs.iter().filter(|o| o.color == color).count();
        if n > 0 {
            props.push(Prop::Count { color: Some(color), shape: None, n });
        }
    }
    for shape in super::scene::SHAPES {
        let n = objs.iter().filter(|o| o.shape == shape).count();
        props.push(Prop::Count { color: None, shape: Some(shape), n });
    }
    let refs: Vec<Option<Ref>> = (0..objs.len()).map(|i| Ref::minimal(scene, i)).collect();
    for (i, a) in refs.iter().enumerate() {
        let Some(a) = *a else { continue };
        let o = &objs[i];
        if o.visible >= FULLY_VISIBLE_FROM {
            props.push(Prop::FullyVisible(a));
        }
        let unsized_ref = Ref { size: None, ..a };
        if unsized_ref.resolve(scene).is_some() {
            props.push(Prop::SizeOf { a: unsized_ref, size: o.size });
        }
        for (edge, near) in [
            (Edge::Top, o.y < EDGE_BAND),
            (Edge::Bottom, o.y > 1.0 - EDGE_BAND),
            (Edge::Left, o.x < EDGE_BAND),
            (Edge::Right, o.x > 1.0 - EDGE_BAND),
        ] {
            if near {
                props.push(Prop::NearEdge { a, edge });
            }
        }
        for (j, b) in refs.iter().enumerate() {
            let Some(b) = *b else { continue };
            if i == j {
                continue;
            }
            for rel in [Relation::Left, Relation::Right, Relation::Above, Relation::Below] {
                // Only relations that hold clearly in the target are stated.
                if relation_holds(o, rel, &objs[j], 2.0 * SPATIAL_MARGIN) {
                    props.push(Prop::Spatial { a, rel, b });
                    props.push(Prop::CoRef { a, rel, b });
                }
            }
            if o.visible < HIDDEN_BELOW - 0.1 && o.hidden_by.contains(&j) {
                props.push(Prop::Behind { a, b });
            }
        }
    }
    props.retain(|p| p.holds(scene));
    props
}

/// A chosen description.
#[derive(Debug, Clone, Serialize)]
pub struct Description {
    pub text: String,
    /// Categories of its discriminative statements, then "context" if it has context statements.
    pub categories: Vec<String>,
    pub props: Vec<Prop>,
}

/// Picks statements true of `candidates[target]` such that every other candidate makes at least one
/// of them clearly false; adds `context` statements true of all. `None` when no such set exists
/// within `max_discriminative` statements.
pub fn describe(
    candidates: &[Scene],
    target: usize,
    max_discriminative: usize,
    context: usize,
    rng: &mut Rng,
) -> Option<Description> {
    let mut props = true_props(&candidates[target]);
    rng.shuffle(&mut props);
    // Which distractors each statement rules out, clearly (spatial relations reversed or gone).
    let rules_out = |p: &Prop| -> Vec<usize> {
        (0..candidates.len()).filter(|&c| c != target && !p.holds_with(&candidates[c], -SPATIAL_MARGIN)).collect()
    };
    let scored: Vec<(Prop, Vec<usize>)> = props.iter().map(|p| (p.clone(), rules_out(p))).collect();
    // Context: statements true of all ten that say something about what is there (absences that
    // hold everywhere are not informative context).
    let context_props: Vec<&Prop> =
        scored.iter().filter(|(p, r)| r.is_empty() && !matches!(p, Prop::Count { n: 0, .. })).map(|(p, _)| p).collect();
    let mut remaining: Vec<usize> = (0..candidates.len()).filter(|&c| c != target).collect();
    let mut chosen: Vec<Prop> = vec![];
    while !remaining.is_empty() && chosen.len() < max_discriminative {
        // Greedy cover; ties broken by the shuffled order, preferring categories not used yet.
        let used: Vec<&str> = chosen.iter().map(|p| p.category()).collect();
        let best = scored
            .iter()
            .filter(|(p, _)| !chosen.contains(p))
            .map(|(p, r)| (p, r.iter().filter(|c| remaining.contains(c)).count(), !used.contains(&p.category())))
            .filter(|(_, gain, _)| *gain > 0)
            .max_by_key(|(_, gain, fresh)| (*gain, *fresh))?;
        let covered = rules_out(best.0);
        remaining.retain(|c| !covered.contains(c));
        chosen.push(best.0.clone());
    }
    if !remaining.is_empty() {
        return None;
    }
    let mut categories: Vec<String> = chosen.iter().map(|p| p.category().to_string()).collect();
    categories.dedup();
    let mut all: Vec<Prop> = context_props.into_iter().take(context).cloned().collect();
    if !all.is_empty() {
        categories.push("context".into());
    }
    all.extend(chosen);
    let text = all.iter().map(Prop::text).collect::<Vec<_>>().join(". ") + ".";
    Some(Description { text, categories, props: all })
}

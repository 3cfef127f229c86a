//! Accuracy by group (IMAGECODE's `all` / `video` / `static` and description categories, MMVP's
//! patterns): shares, the result table and JSON every command prints and writes, and the mean ± sd
//! over seeds.

use std::collections::BTreeMap;

use crate::Table;

/// `group → (correct, total)`; `"all"` holds every example. A group is present only when at least
/// one example is in it, so every total is at least 1.
pub type GroupCounts = BTreeMap<String, (usize, usize)>;

/// The group every counted example is in.
pub const ALL: &str = "all";

/// The groups every IMAGECODE table leads with, in this order; other groups follow sorted.
const LEADING: [&str; 3] = [ALL, "video", "static"];

/// Accuracy by group, the one place it is counted: each outcome `(correct, groups)` counts in
/// [`ALL`] and in each group it names, once per group even when a group is named twice (or is
/// `"all"` itself), so no example weighs double in a share. No outcome gives an empty map: there
/// is no group without examples and no `"all"` of 0 / 0.
pub fn count_by_group<'a, G>(outcomes: impl IntoIterator<Item = (bool, G)>) -> GroupCounts
where
    G: IntoIterator<Item = &'a str>,
{
    let mut counts = GroupCounts::new();
    let mut seen = std::collections::BTreeSet::new();
    for (correct, groups) in outcomes {
        seen.clear();
        for group in std::iter::once(ALL).chain(groups) {
            if seen.insert(group) {
                let entry = counts.entry(group.to_string()).or_default();
                entry.0 += correct as usize;
                entry.1 += 1;
            }
        }
    }
    counts
}

/// `correct / total` of a group, if present and non-empty.
pub fn share(counts: &GroupCounts, group: &str) -> Option<f64> {
    counts.get(group).filter(|(_, t)| *t > 0).map(|(c, t)| *c as f64 / *t as f64)
}

/// A group's accuracy in percent with one decimal, `-` when absent.
pub fn percent(counts: &GroupCounts, group: &str) -> String {
    share(counts, group).map(|x| format!("{:.1}", 100.0 * x)).unwrap_or_else(|| "-".into())
}

/// `{"all": {"correct": c, "total": n, "accuracy": c/n}, ...}` (accuracy 0 for an empty group).
pub fn counts_json(counts: &GroupCounts) -> serde_json::Value {
    counts
        .iter()
        .map(|(k, (c, n))| {
            (k.clone(), serde_json::json!({"correct": c, "total": n, "accuracy": *c as f64 / (*n).max(1) as f64}))
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// One row per named result: `All`, `Video`, `Static`, then every other group any row has
/// (sorted), in percent.
pub fn group_table(title: &str, rows: &[(String, &GroupCounts)]) -> Table {
    let mut others: Vec<String> =
        rows.iter().flat_map(|(_, a)| a.keys().cloned()).filter(|k| !LEADING.contains(&k.as_str())).collect();
    others.sort();
    others.dedup();
    let mut header = vec![title.to_string(), "All".into(), "Video".into(), "Static".into()];
    header.extend(others.iter().cloned());
    let mut table = Table::new(header);
    for (name, counts) in rows {
        let mut cells = vec![name.clone()];
        cells.extend(LEADING.iter().map(|g| percent(counts, g)));
        cells.extend(others.iter().map(|g| percent(counts, g)));
        table.row(cells);
    }
    table
}

/// Mean and sample standard deviation (0 for fewer than two values; NaN mean for none).
pub fn mean_sd(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let sd = if values.len() > 1 {
        (values.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    (mean, sd)
}

/// `mean ± sd` with one decimal; just the mean for one value, `-` for none.
pub fn mean_spread(values: &[f64]) -> String {
    match values.len() {
        0 => "-".into(),
        1 => format!("{:.1}", values[0]),
        _ => {
            let (m, sd) = mean_sd(values);
            format!("{m:.1} ± {sd:.1}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts() -> GroupCounts {
        [("all", (3, 4)), ("video", (1, 2)), ("static", (2, 2)), ("negation", (0, 1)), ("empty", (0, 0))]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    }

    #[test]
    fn counts_every_outcome_in_all_and_once_per_named_group() {
        // Hand count: all 2/4; video 1/2 (outcomes 0, 1); static 1/2 (2, 3); spatial 1/2 (0 named it
        // twice, 3 once) — outcome 0 counts once in it; an outcome naming "all" counts once there.
        let outcomes = [
            (true, vec!["video", "spatial", "spatial"]),
            (false, vec!["video"]),
            (true, vec!["static", "all"]),
            (false, vec!["static", "spatial"]),
        ];
        let counts = count_by_group(outcomes.iter().map(|(ok, g)| (*ok, g.iter().copied())));
        let expected: GroupCounts = [("all", (2, 4)), ("video", (1, 2)), ("static", (1, 2)), ("spatial", (1, 2))]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        assert_eq!(counts, expected);
        // An outcome with no group of its own is still in "all"; no outcome, no group at all.
        assert_eq!(count_by_group([(false, [])]), [("all".to_string(), (0, 1))].into_iter().collect());
        assert!(count_by_group(std::iter::empty::<(bool, [&str; 0])>()).is_empty());
    }

    #[test]
    fn shares_cells_and_json() {
        let c = counts();
        assert_eq!(share(&c, "all"), Some(0.75));
        assert_eq!(share(&c, "empty"), None);
        assert_eq!(share(&c, "missing"), None);
        assert_eq!(percent(&c, "video"), "50.0");
        assert_eq!(percent(&c, "missing"), "-");
        let j = counts_json(&c);
        assert_eq!(j["all"]["accuracy"], 0.75);
        assert_eq!(j["empty"]["accuracy"], 0.0);
        assert_eq!(j["negation"]["total"], 1);
    }

    #[test]
    fn table_leads_with_all_video_static_then_sorted_groups() {
        let c = counts();
        let mut other = GroupCounts::new();
        other.insert("all".into(), (1, 4));
        other.insert("co-reference".into(), (1, 1));
        let text = group_table("model", &[("A".into(), &c), ("B".into(), &other)]).to_string();
        let header = text.lines().next().unwrap();
        let pos = |s: &str| header.find(s).unwrap_or_else(|| panic!("{s} in {header}"));
        assert!(pos("All") < pos("Video") && pos("Video") < pos("Static") && pos("Static") < pos("co-reference"));
        assert!(pos("co-reference") < pos("empty") && pos("empty") < pos("negation"));
        let row_b = text.lines().find(|l| l.starts_with('B')).unwrap();
        assert!(row_b.contains("25.0") && row_b.contains("100.0") && row_b.contains('-'));
    }

    #[test]
    fn mean_and_spread() {
        assert_eq!(mean_spread(&[]), "-");
        assert_eq!(mean_spread(&[61.25]), "61.2");
        let (m, sd) = mean_sd(&[1.0, 2.0, 3.0, 4.0]);
        assert!((m - 2.5).abs() < 1e-12 && (sd - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(mean_spread(&[1.0, 2.0, 3.0, 4.0]), "2.5 ± 1.3");
    }
}

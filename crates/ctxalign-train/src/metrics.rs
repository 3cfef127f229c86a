//! Metrics: one JSON object per line (`metrics.jsonl`), and a loss-curve PNG drawn from it.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Result, TrainError};

/// Appends records to a JSONL file. Opening for a resumed run drops the lines past the resumed
/// step, so the file reads as one uninterrupted run.
pub struct MetricsLog {
    pub path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// `resume_step`: `None` starts a fresh file; `Some(s)` keeps the records with `step <= s`.
    pub fn open(path: &Path, resume_step: Option<u64>) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
        }
        let kept: Vec<String> = match (resume_step, std::fs::read_to_string(path)) {
            (Some(s), Ok(text)) => text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<Value>(l)
                        .ok()
                        .and_then(|v| v.get("step").and_then(Value::as_u64))
                        .is_some_and(|st| st <= s)
                })
                .map(str::to_owned)
                .collect(),
            _ => vec![],
        };
        let mut body = kept.join("\n");
        if !body.is_empty() {
            body.push('\n');
        }
        ctxalign_data::write_atomic(path, body.as_bytes())?;
        let file = std::fs::OpenOptions::new().append(true).open(path).map_err(|e| TrainError::io(path, e))?;
        Ok(Self { path: path.to_owned(), file })
    }

    pub fn write(&mut self, record: &Map<String, Value>) -> Result<()> {
        let mut line = serde_json::to_string(record).expect("a JSON map serialises");
        line.push('\n');
        self.file.write_all(line.as_bytes()).and_then(|_| self.file.flush()).map_err(|e| TrainError::io(&self.path, e))
    }
}

/// Reads `(step, value)` series for `keys` from a JSONL metrics file (records lacking a key skip it).
pub fn read_series(path: &Path, keys: &[&str]) -> Result<Vec<Vec<(f64, f64)>>> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    let mut series = vec![vec![]; keys.len()];
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line)
            .map_err(|e| TrainError::checkpoint(path, format!("line {}: malformed JSON: {e}", n + 1)))?;
        let Some(step) = v.get("step").and_then(Value::as_f64) else { continue };
        for (k, key) in keys.iter().enumerate() {
            if let Some(y) = v.get(*key).and_then(Value::as_f64) {
                series[k].push((step, y));
            }
        }
    }
    Ok(series)
}

/// Draws the series as lines with a legend ([`ctxalign_eval::plot::line_chart`]) and writes a PNG.
pub fn plot_series(path: &Path, title: &str, names: &[&str], series: &[Vec<(f64, f64)>]) -> Result<()> {
    let img = ctxalign_eval::plot::line_chart(title, names, series);
    img.save(path).map_err(|e| TrainError::checkpoint(path, format!("cannot write PNG: {e}")))
}

/// The label font, for callers that drew with it from here.
pub use ctxalign_eval::plot::draw_text;

/// Plots `keys` of a metrics file into a PNG.
pub fn plot_metrics(jsonl: &Path, png: &Path, title: &str, keys: &[&str]) -> Result<()> {
    let series = read_series(jsonl, keys)?;
    plot_series(png, title, keys, &series)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_drops_records_past_the_checkpoint_and_plots() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m/metrics.jsonl");
        let rec = |s: u64| {
            let mut m = Map::new();
            m.insert("step".into(), s.into());
            m.insert("loss".into(), (1.0 / (s as f64 + 1.0)).into());
            m
        };
        let mut log = MetricsLog::open(&path, None).unwrap();
        for s in 1..=5 {
            log.write(&rec(s)).unwrap();
        }
        drop(log);
        let mut log = MetricsLog::open(&path, Some(3)).unwrap();
        log.write(&rec(4)).unwrap();
        let series = read_series(&path, &["loss"]).unwrap();
        assert_eq!(series[0].iter().map(|p| p.0 as u64).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        let png = dir.path().join("loss.png");
        plot_metrics(&path, &png, "loss", &["loss"]).unwrap();
        let img = image::open(&png).unwrap().to_rgb8();
        let coloured = img.pixels().filter(|p| p.0 == ctxalign_eval::plot::COLOURS[0]).count();
        assert!(coloured > 100, "the curve is drawn ({coloured} px)");
    }
}

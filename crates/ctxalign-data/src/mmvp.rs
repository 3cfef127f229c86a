//! MMVP-VLM (Tong et al. 2024): 9 visual patterns × 15 pairs of (image, statement).
//!
//! `Questions.csv` has a question id, a pattern (`Type`) and a statement per row; images are
//! `MMVP_VLM_Images/<pattern folder>/<qid>.jpg`. Rows pair up by id (1–2, 3–4, …); the prompt is
//! `"a photo of " + statement`, and a pair counts only if both statements pick their own image.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{read_text, DataError};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MmvpPair {
    pub pattern: String,
    pub qids: [u32; 2],
    pub images: [PathBuf; 2],
    pub statements: [String; 2],
}

impl MmvpPair {
    /// The prompts scored against the two images.
    pub fn prompts(&self) -> [String; 2] {
        self.statements.clone().map(|s| format!("a photo of {s}"))
    }
}

/// Splits one CSV line with RFC 4180 quoting.
pub(crate) fn split_csv_line(line: &str) -> Result<Vec<String>, String> {
    let mut fields = vec![];
    let mut cur = String::new();
    let mut chars = line.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            (true, '"') => quoted = false,
            (false, '"') if cur.is_empty() => quoted = true,
            (false, ',') => fields.push(std::mem::take(&mut cur)),
            (_, c) => cur.push(c),
        }
    }
    if quoted {
        return Err("unterminated quoted field".into());
    }
    fields.push(cur);
    Ok(fields)
}

fn norm(s: &str) -> String {
    s.chars().filter(|c| c.is_alphanumeric()).flat_map(char::to_lowercase).collect()
}

/// Reads `<root>/Questions.csv` and finds each image as `<root>/MMVP_VLM_Images/*/<qid>.jpg`.
pub fn read_mmvp(root: &Path) -> Result<Vec<MmvpPair>, DataError> {
    let csv = root.join("Questions.csv");
    let questions = parse_questions(&read_text(&csv)?, &csv)?;
    let images_root = root.join("MMVP_VLM_Images");
    // The shared walker: a pattern folder reached twice through a link is one folder.
    let pattern_dirs = crate::walk::Walker::new(crate::walk::WalkOptions::flat()).folders(&images_root)?;
    let mut rows: Vec<(u32, String, String, PathBuf)> = vec![];
    for q in questions {
        let found: Vec<PathBuf> =
            pattern_dirs.iter().map(|d| d.join(format!("{}.jpg", q.qid))).filter(|p| p.is_file()).collect();
        let image = match found.as_slice() {
            [one] => one.clone(),
            [] => {
                return Err(DataError::NotFound { path: images_root.join("<pattern>").join(format!("{}.jpg", q.qid)) })
            }
            _ => return Err(DataError::format(&images_root, format!("{}.jpg is in several pattern folders", q.qid))),
        };
        rows.push((q.qid, q.pattern, q.statement, image));
    }
    rows.sort_by_key(|r| r.0);
    if !rows.len().is_multiple_of(2) {
        return Err(DataError::format(&csv, format!("{} rows: statements come in pairs", rows.len())));
    }
    rows.chunks(2)
        .map(|p| {
            let (a, b) = (&p[0], &p[1]);
            if a.0 % 2 != 1 || b.0 != a.0 + 1 || a.1 != b.1 {
                return Err(DataError::format(
                    &csv,
                    format!("questions {} and {} do not form a pair of one pattern", a.0, b.0),
                ));
            }
            Ok(MmvpPair {
                pattern: a.1.clone(),
                qids: [a.0, b.0],
                images: [a.3.clone(), b.3.clone()],
                statements: [a.2.clone(), b.2.clone()],
            })
        })
        .collect()
}

/// One row of `Questions.csv`.
#[derive(Debug, Clone, PartialEq)]
pub struct Question {
    pub qid: u32,
    pub pattern: String,
    pub statement: String,
}

/// Parses `Questions.csv` text (columns found by name); `csv` names the file in errors.
pub fn parse_questions(text: &str, csv: &Path) -> Result<Vec<Question>, DataError> {
    let csv = csv.to_path_buf();
    let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
    let (_, header) = lines.next().ok_or_else(|| DataError::format(&csv, "empty file"))?;
    let header: Vec<String> =
        split_csv_line(header).map_err(|m| DataError::line(&csv, 1, m))?.iter().map(|h| norm(h)).collect();
    let col = |names: &[&str]| header.iter().position(|h| names.contains(&h.as_str()));
    let (Some(qid_col), Some(type_col), Some(stmt_col)) = (
        col(&["questionid", "qid", "id"]),
        col(&["type", "pattern", "category"]),
        col(&["statement", "text", "caption"]),
    ) else {
        return Err(DataError::format(
            &csv,
            format!("header needs question id, type and statement columns, found {header:?}"),
        ));
    };
    let mut out = vec![];
    for (i, line) in lines {
        let fields = split_csv_line(line).map_err(|m| DataError::line(&csv, i + 1, m))?;
        let get = |c: usize| {
            fields.get(c).map(|s| s.trim().to_string()).ok_or_else(|| {
                DataError::line(&csv, i + 1, format!("expected at least {} fields, found {}", c + 1, fields.len()))
            })
        };
        let qid: u32 =
            get(qid_col)?.parse().map_err(|_| DataError::line(&csv, i + 1, "question id is not a number"))?;
        let statement = get(stmt_col)?;
        // An empty statement would be scored as the prompt "a photo of " alone, against nothing.
        if !statement.chars().any(char::is_alphanumeric) {
            let message = format!("question {qid}: the statement {statement:?} has no word (no letter or digit)");
            return Err(DataError::line(&csv, i + 1, message));
        }
        out.push(Question { qid, pattern: get(type_col)?, statement });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quoting() {
        assert_eq!(
            split_csv_line(r#"1,"Orientation, and Direction","a ""big"" dog""#).unwrap(),
            vec!["1", "Orientation, and Direction", "a \"big\" dog"]
        );
        assert!(split_csv_line("1,\"open").is_err());
    }
}

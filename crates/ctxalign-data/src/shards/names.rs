//! Shard lists in WebDataset's brace notation: `data/shards-{000000..000127}.tar`,
//! `{train,extra}/part-{00..09}.tar`, several patterns joined by `::`.

use std::path::PathBuf;

use crate::error::DataError;

/// The most file names one spec may expand to: a typo such as `{0..999999999}` is refused instead
/// of filling the memory with names.
const MAX_NAMES: usize = 1_000_000;

/// Expands a shard spec to the local files it names, in order.
///
/// - `{000000..000127}`: a numeric range, inclusive, ascending or descending; every number is
///   zero-padded to the width of the first bound (`{000..127}` → `000`, `001`, …, `127`; `{8..10}`
///   → `8`, `9`, `10`);
/// - `{a,b,c}`: alternatives, each of which may hold groups itself (`{a{0..1},b}`);
/// - several groups in one pattern multiply out, the leftmost varying slowest (as bash does);
/// - `p1::p2`: the files of `p1` then those of `p2`.
///
/// Only local files: `http://`, `https://`, `s3://`, `pipe:` and other URL schemes are refused
/// (ctxalign reads shards from disk; copy them there first). Every expanded file must exist (the
/// error names the first missing one and counts them); an empty expansion or a malformed brace
/// group (`{1..}`, `{}`, unbalanced braces) is an error naming the spec.
pub fn expand_shards(spec: &str) -> Result<Vec<PathBuf>, DataError> {
    let err = |message: String| DataError::Spec { spec: spec.to_string(), message };
    let mut names = Vec::new();
    for pattern in spec.split("::") {
        let pattern = pattern.trim();
        if pattern.is_empty() {
            continue;
        }
        refuse_remote(pattern).map_err(err)?;
        names.extend(expand_braces(pattern).map_err(err)?);
        if names.len() > MAX_NAMES {
            return Err(err(format!("expands to more than {MAX_NAMES} shard names")));
        }
    }
    if names.is_empty() {
        return Err(err("names no shard file (an empty shard list)".into()));
    }
    let paths: Vec<PathBuf> = names.into_iter().map(PathBuf::from).collect();
    let missing: Vec<&PathBuf> = paths.iter().filter(|p| !p.is_file()).collect();
    if let Some(first) = missing.first() {
        let message = match missing.len() {
            1 => format!("the shard file {} does not exist (of {} named)", first.display(), paths.len()),
            n => format!("{n} of the {} shard files named do not exist; the first is {}", paths.len(), first.display()),
        };
        return Err(err(message));
    }
    Ok(paths)
}

/// Refuses URLs and commands: WebDataset would stream them, ctxalign reads local files only.
fn refuse_remote(pattern: &str) -> Result<(), String> {
    let lower = pattern.to_ascii_lowercase();
    let scheme = lower
        .split_once("://")
        .map(|(s, _)| s)
        .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')));
    if lower.starts_with("pipe:") {
        return Err(format!("`{pattern}`: `pipe:` commands are not run; ctxalign reads shards from local files only"));
    }
    if let Some(scheme) = scheme {
        return Err(format!(
            "`{pattern}`: {scheme}:// shards are not fetched; ctxalign reads shards from local files only \
             (copy them to a local folder first)"
        ));
    }
    Ok(())
}

/// Expands every brace group of one pattern (no `::`).
fn expand_braces(pattern: &str) -> Result<Vec<String>, String> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut pos = 0;
    let out = expand_sequence(&chars, &mut pos, false)?;
    if pos < chars.len() {
        // Only a `}` or `,` at the top level stops the sequence early; a top-level comma is a
        // literal character of the file name.
        return Err(format!("unbalanced `}}` at character {} of `{pattern}`", pos + 1));
    }
    Ok(out)
}

/// Expands characters from `pos` until the end, or (inside a group) until a top-level `,` or `}`,
/// which is left at `pos`. Returns every expansion, the leftmost group varying slowest.
fn expand_sequence(chars: &[char], pos: &mut usize, in_group: bool) -> Result<Vec<String>, String> {
    let mut out = vec![String::new()];
    while *pos < chars.len() {
        match chars[*pos] {
            '}' => {
                if in_group {
                    return Ok(out);
                }
                return Err(format!("unbalanced `}}` at character {}", *pos + 1));
            }
            ',' if in_group => return Ok(out),
            '{' => {
                let open = *pos;
                *pos += 1;
                let options = expand_group(chars, pos, open)?;
                if out.len().saturating_mul(options.len()) > MAX_NAMES {
                    return Err(format!("expands to more than {MAX_NAMES} shard names"));
                }
                out = out.iter().flat_map(|prefix| options.iter().map(move |o| format!("{prefix}{o}"))).collect();
            }
            c => {
                for s in &mut out {
                    s.push(c);
                }
                *pos += 1;
            }
        }
    }
    if in_group {
        return Err("unbalanced `{`: a brace group is not closed".into());
    }
    Ok(out)
}

/// Expands the group whose `{` is at `open` (`pos` just after it), leaving `pos` after its `}`.
fn expand_group(chars: &[char], pos: &mut usize, open: usize) -> Result<Vec<String>, String> {
    // A numeric range holds no braces and no commas: recognise it from the raw text.
    let close = chars[*pos..].iter().position(|&c| matches!(c, '}' | '{' | ',')).map(|i| *pos + i);
    if let Some(close) = close.filter(|&c| chars[c] == '}') {
        let body: String = chars[*pos..close].iter().collect();
        if body.contains("..") {
            let range = expand_range(&body).map_err(|m| format!("`{{{body}}}` at character {}: {m}", open + 1))?;
            *pos = close + 1;
            return Ok(range);
        }
        if body.is_empty() {
            return Err(format!("empty brace group `{{}}` at character {}", open + 1));
        }
    }
    let mut options = Vec::new();
    loop {
        options.extend(expand_sequence(chars, pos, true)?);
        match chars.get(*pos) {
            Some(',') => *pos += 1,
            Some('}') => {
                *pos += 1;
                break;
            }
            _ => return Err(format!("unbalanced `{{` at character {}: the group is not closed", open + 1)),
        }
    }
    if options.len() < 2 {
        return Err(format!(
            "the brace group at character {} has one alternative; write a range `{{a..b}}` or alternatives \
             `{{a,b}}`",
            open + 1
        ));
    }
    Ok(options)
}

/// `000..127` → the numbers, zero-padded to the width of the first bound.
fn expand_range(body: &str) -> Result<Vec<String>, String> {
    let Some((lo, hi)) = body.split_once("..") else {
        return Err("a range is `{first..last}`".into());
    };
    let number = |s: &str| -> Result<u64, String> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("`{s}` is not a whole number (a range is `{{first..last}}`, e.g. `{{000..127}}`)"));
        }
        s.parse().map_err(|_| format!("`{s}` is too large"))
    };
    let (a, b) = (number(lo)?, number(hi)?);
    let count = a.abs_diff(b).saturating_add(1);
    if count > MAX_NAMES as u64 {
        return Err(format!("{count} numbers, more than {MAX_NAMES} shard names"));
    }
    let width = lo.len();
    let numbers: Box<dyn Iterator<Item = u64>> = if a <= b { Box::new(a..=b) } else { Box::new((b..=a).rev()) };
    Ok(numbers.map(|n| format!("{n:0width$}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn braces_expand_without_touching_the_disk() {
        assert_eq!(expand_braces("a-{08..11}.tar").unwrap(), ["a-08.tar", "a-09.tar", "a-10.tar", "a-11.tar"]);
        assert_eq!(expand_braces("{3..1}").unwrap(), ["3", "2", "1"]);
        assert_eq!(expand_braces("{a,b{0..1}}x").unwrap(), ["ax", "b0x", "b1x"]);
        assert_eq!(expand_braces("plain,name.tar").unwrap(), ["plain,name.tar"]);
        assert!(expand_braces("{0..99999999}").unwrap_err().contains("more than"));
        assert!(expand_braces("{a}").unwrap_err().contains("one alternative"));
    }
}

//! Range-checked parsers for command-line options (clap `value_parser`s): an out-of-range value is
//! rejected while the command line is read, with the range it must be in, before any work starts.
//!
//! ```text
//! error: invalid value '0' for '--batch-size <BATCH_SIZE>': must be a whole number ≥ 1
//! ```

fn number<T: std::str::FromStr>(s: &str, what: &str) -> Result<T, String> {
    s.trim().parse::<T>().map_err(|_| format!("must be {what}"))
}

fn finite(s: &str) -> Result<f64, String> {
    let v: f64 = number(s, "a number")?;
    if v.is_finite() {
        Ok(v)
    } else {
        Err(format!("must be a finite number, not {v}"))
    }
}

/// A count of at least 1 (batch sizes, k, sets).
pub fn positive_count(s: &str) -> Result<usize, String> {
    match number::<usize>(s, "a whole number ≥ 1")? {
        0 => Err("must be a whole number ≥ 1".into()),
        n => Ok(n),
    }
}

/// A number of steps or epochs, at least 1.
pub fn positive_steps(s: &str) -> Result<u64, String> {
    match number::<u64>(s, "a whole number ≥ 1")? {
        0 => Err("must be a whole number ≥ 1".into()),
        n => Ok(n),
    }
}

/// A time limit in whole seconds, at least 1.
pub fn positive_seconds(s: &str) -> Result<u64, String> {
    positive_steps(s)
}

/// A learning rate: finite and > 0.
pub fn learning_rate(s: &str) -> Result<f64, String> {
    let v = finite(s)?;
    if v > 0.0 {
        Ok(v)
    } else {
        Err(format!("must be > 0 (a learning rate), not {v}"))
    }
}

/// A weight decay or another coefficient: finite and ≥ 0.
pub fn non_negative(s: &str) -> Result<f64, String> {
    let v = finite(s)?;
    if v >= 0.0 {
        Ok(v)
    } else {
        Err(format!("must be ≥ 0, not {v}"))
    }
}

/// A per-epoch learning-rate factor or a smallest crop area: in (0, 1].
pub fn unit_fraction(s: &str) -> Result<f64, String> {
    let v = finite(s)?;
    if v > 0.0 && v <= 1.0 {
        Ok(v)
    } else {
        Err(format!("must be in (0, 1], not {v}"))
    }
}

/// A share of something to mask or drop: in [0, 1).
pub fn proportion(s: &str) -> Result<f64, String> {
    let v = finite(s)?;
    if (0.0..1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("must be in [0, 1), not {v}"))
    }
}

/// A text length in tokens: room for the first token, one word and `[SEP]`, so at least 3.
pub fn token_budget(s: &str) -> Result<usize, String> {
    let n = number::<usize>(s, "a whole number ≥ 3")?;
    if n >= 3 {
        Ok(n)
    } else {
        Err(format!("must be ≥ 3 (the first token, at least one word and [SEP]), not {n}"))
    }
}

/// `--skip-bad` of every command that reads a data set.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct BadInputArgs {
    /// Leave out the samples, images or IMAGECODE sets that cannot be used (missing or unreadable
    /// files, damaged images, sets without 10 images) and report them, instead of stopping. Either
    /// way they are found before the first training step or score.
    #[arg(long)]
    pub skip_bad: bool,
}

impl BadInputArgs {
    pub fn policy(&self) -> ctxalign::data::loader::BadInputPolicy {
        match self.skip_bad {
            true => ctxalign::data::loader::BadInputPolicy::Skip,
            false => ctxalign::data::loader::BadInputPolicy::Fail,
        }
    }
}

/// Every option or argument of `cmd` and its subcommands (recursively) that has no help text, as
/// `"<command path> --<id>"`: a program's test asserts there are none.
pub fn options_without_help(cmd: &clap::Command) -> Vec<String> {
    fn walk(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
        for arg in cmd.get_arguments() {
            let builtin = matches!(arg.get_id().as_str(), "help" | "version");
            if !builtin && arg.get_help().is_none() && arg.get_long_help().is_none() {
                out.push(format!("{path} --{}", arg.get_id()));
            }
        }
        for sub in cmd.get_subcommands() {
            walk(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }
    let mut out = vec![];
    walk(cmd, cmd.get_name(), &mut out);
    out
}

/// Prints to stderr what the image decoder warned about (a damaged JPEG, decoded as libjpeg
/// decodes it), one line each, as libjpeg's own tools print them.
pub fn warn_decoded(warnings: &[String]) {
    for w in warnings {
        eprintln!("warning: {w}");
    }
}

/// Prints to stderr what `--skip-bad` left out: `summary`, then the first errors (records written
/// by the commands list them all).
pub fn warn_left_out(summary: &str, errors: &[String]) {
    const SHOWN: usize = 10;
    if errors.is_empty() {
        return;
    }
    eprintln!("warning: {summary} (--skip-bad):");
    for e in errors.iter().take(SHOWN) {
        eprintln!("  {e}");
    }
    if errors.len() > SHOWN {
        eprintln!("  … and {} more", errors.len() - SHOWN);
    }
}

/// Checks, before any work starts, that an output file can be written: its folder is created and
/// a probe file made and removed in it, and the path is not a folder. Commands that write their
/// results at the end call this first, so a bad `--out` fails in a second, not after the scoring.
pub fn check_output_file(path: &std::path::Path) -> Result<(), ctxalign::data::DataError> {
    use ctxalign::data::DataError;
    if path.is_dir() {
        let message = "is a folder; name a file to write the results to";
        return Err(DataError::Format { path: path.to_owned(), message: message.into() });
    }
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir).map_err(|source| DataError::Write { path: dir.to_owned(), source })?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let probe = dir.join(format!(".{name}.probe{}", std::process::id()));
    std::fs::File::create(&probe).map_err(|source| DataError::Write { path: path.to_owned(), source })?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_without_help_are_found() {
        let cmd = clap::Command::new("prog")
            .arg(clap::Arg::new("documented").long("documented").help("says what it is"))
            .subcommand(clap::Command::new("sub").arg(clap::Arg::new("bare").long("bare")));
        assert_eq!(options_without_help(&cmd), ["prog sub --bare"]);
    }

    #[test]
    fn output_files_are_checked_up_front() {
        let tmp = tempfile::tempdir().unwrap();
        let fine = tmp.path().join("new/folder/results.json");
        check_output_file(&fine).unwrap();
        assert!(fine.parent().unwrap().is_dir() && !fine.exists(), "the folder is made, no file is left");
        assert_eq!(std::fs::read_dir(fine.parent().unwrap()).unwrap().count(), 0, "the probe is removed");
        let msg = check_output_file(tmp.path()).unwrap_err().to_string();
        assert!(msg.contains("is a folder; name a file"), "{msg}");
        // A file where a folder must be.
        std::fs::write(tmp.path().join("file"), "x").unwrap();
        let msg = check_output_file(&tmp.path().join("file/results.json")).unwrap_err().to_string();
        assert!(msg.contains("cannot write") && msg.contains("file"), "{msg}");
    }

    #[test]
    fn ranges_and_messages() {
        assert_eq!(positive_count("4"), Ok(4));
        assert!(positive_count("0").unwrap_err().contains("≥ 1"));
        assert!(positive_count("-2").is_err());
        assert_eq!(positive_steps("300"), Ok(300));
        assert!(positive_steps("0").is_err());
        assert_eq!(learning_rate("3e-4"), Ok(3e-4));
        assert!(learning_rate("0").unwrap_err().contains("> 0"));
        assert!(learning_rate("-1e-4").is_err());
        assert!(learning_rate("NaN").unwrap_err().contains("finite"));
        assert!(learning_rate("inf").unwrap_err().contains("finite"));
        assert_eq!(non_negative("0"), Ok(0.0));
        assert!(non_negative("-0.05").is_err());
        assert_eq!(unit_fraction("1"), Ok(1.0));
        assert!(unit_fraction("0").is_err() && unit_fraction("1.5").is_err() && unit_fraction("-0.9").is_err());
        assert_eq!(proportion("0"), Ok(0.0));
        assert!(proportion("1").is_err() && proportion("-0.1").is_err());
        assert_eq!(token_budget("35"), Ok(35));
        assert!(token_budget("0").is_err() && token_budget("1").is_err() && token_budget("2").is_err());
        assert!(token_budget("x").unwrap_err().contains("whole number"));
    }
}

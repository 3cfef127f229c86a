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

#[cfg(test)]
mod tests {
    use super::*;

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

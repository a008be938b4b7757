//! Value parsers of command-line flags, in one place: each bounds what would overflow,
//! panic or exhaust the machine, and says what it expects in one line.

use std::time::Duration;

pub(crate) fn parse_session_timeout(v: &str) -> std::result::Result<f64, String> {
    let s: f64 = v
        .trim()
        .parse()
        .map_err(|_| format!("{v:?} is not a number of seconds"))?;
    if !(1.0..=86400.0).contains(&s) {
        return Err(format!("{s} is not between 1 and 86400 seconds"));
    }
    Ok(s)
}

/// A whole number in `[lo, hi]`, for flags whose extremes would overflow or exhaust the
/// machine (threads, buffer sizes).
pub(crate) fn usize_in(
    lo: usize,
    hi: usize,
) -> impl Fn(&str) -> std::result::Result<usize, String> + Clone {
    move |v: &str| {
        let n: usize = v
            .trim()
            .parse()
            .map_err(|_| format!("{v:?} is not a whole number"))?;
        if n < lo || n > hi {
            return Err(format!("{n} is not in {lo}..={hi}"));
        }
        Ok(n)
    }
}

/// A size: `512M`, `100G`, `1.5T`, `64K`, `4096B`, with or without `iB`; a bare number is
/// MiB, as in juicefs.
pub(crate) fn parse_size(v: &str) -> std::result::Result<u64, String> {
    let t = v.trim();
    let bad = || format!("{v:?} is not a size (e.g. 512M, 100G; a bare number is MiB)");
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let x: f64 = num.parse().map_err(|_| bad())?;
    let mul: u64 = match unit.trim().to_ascii_uppercase().trim_end_matches("IB") {
        "" | "M" => 1 << 20,
        "B" => 1,
        "K" => 1 << 10,
        "G" => 1 << 30,
        "T" => 1 << 40,
        "P" => 1 << 50,
        _ => return Err(bad()),
    };
    let bytes = x * mul as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 / 2.0 {
        return Err(format!("{v:?} is too large"));
    }
    Ok(bytes as u64)
}

/// A share between 0 and 1.
pub(crate) fn parse_ratio(v: &str) -> std::result::Result<f64, String> {
    let x: f64 = v
        .trim()
        .parse()
        .map_err(|_| format!("{v:?} is not a number between 0 and 1"))?;
    if !x.is_finite() || !(0.0..=1.0).contains(&x) {
        return Err(format!("{v} is not between 0 and 1"));
    }
    Ok(x)
}

/// Seconds for a kernel cache timeout: finite, 0 to a day.
pub(crate) fn parse_seconds(v: &str) -> std::result::Result<f64, String> {
    let x: f64 = v
        .trim()
        .parse()
        .map_err(|_| format!("{v:?} is not a number of seconds"))?;
    if !x.is_finite() || !(0.0..=86400.0).contains(&x) {
        return Err(format!("{v} is not between 0 and 86400 seconds"));
    }
    Ok(x)
}

/// `90s`, `30m`, `1h`, `2d` or a number of seconds.
pub(crate) fn parse_duration(v: &str) -> std::result::Result<Duration, String> {
    let t = v.trim();
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{v:?} is not a duration (like 90s, 30m, 1h, 2d)"))?;
    let mul = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{v:?}: the unit must be s, m, h or d")),
    };
    n.checked_mul(mul)
        .filter(|&s| s <= 100 * 365 * 86400)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{v:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_units_and_a_bare_number_is_mib() {
        assert_eq!(parse_size("512"), Ok(512 << 20));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("100G"), Ok(100 << 30));
        assert_eq!(parse_size("100GiB"), Ok(100 << 30));
        assert_eq!(parse_size("1.5T"), Ok(3 << 39));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("4096B"), Ok(4096));
        for bad in ["", "G", "12X", "-1G", "1e400", "99999999999P"] {
            assert!(parse_size(bad).is_err(), "{bad} accepted");
        }
        assert!(parse_ratio("0.7").is_ok());
        assert!(parse_ratio("1.5").is_err() && parse_ratio("nan").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("2d").unwrap(), Duration::from_secs(172_800));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
    }
}

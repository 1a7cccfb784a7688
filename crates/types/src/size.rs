//! Byte sizes: `K M G T` are powers of 1024, a plain number is bytes (SPEC §4).

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("size is empty")]
    Empty,
    #[error("size {0:?} is not a number with an optional K, M, G or T suffix")]
    Malformed(String),
    #[error("size {0:?} does not fit in 64 bits")]
    Overflow(String),
}

/// Parses `4096`, `512K`, `10G`, `1.5T`, `2GiB`, `8 M` (case-insensitive suffixes, optional
/// `B`/`iB`). Fractions are allowed with a suffix and rounded down to a whole byte.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    if t.is_empty() {
        return Err(SizeError::Empty);
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let suffix = suffix.trim().to_ascii_uppercase();
    let shift = match suffix.as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        "P" | "PB" | "PIB" => 50,
        _ => return Err(SizeError::Malformed(s.to_owned())),
    };
    if num.is_empty() || num.matches('.').count() > 1 || num.starts_with('.') || num.ends_with('.')
    {
        return Err(SizeError::Malformed(s.to_owned()));
    }
    let (int, frac) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num, ""),
    };
    if !frac.is_empty() && shift == 0 {
        return Err(SizeError::Malformed(s.to_owned()));
    }
    let whole: u64 = int.parse().map_err(|_| SizeError::Overflow(s.to_owned()))?;
    let mut bytes = whole.checked_shl(shift).filter(|v| v >> shift == whole);
    if !frac.is_empty() {
        // Fraction of the unit, computed exactly over at most 18 digits.
        let digits = &frac[..frac.len().min(18)];
        let f: u128 = digits
            .parse()
            .map_err(|_| SizeError::Malformed(s.to_owned()))?;
        let scale = 10u128.pow(digits.len() as u32);
        let extra = ((f << shift) / scale) as u64;
        bytes = bytes.and_then(|b| b.checked_add(extra));
    }
    bytes.ok_or_else(|| SizeError::Overflow(s.to_owned()))
}

/// Formats bytes in the largest binary unit that keeps three significant figures:
/// `0 B`, `512 B`, `4.0 KiB`, `10 GiB`, `1.50 TiB`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if v >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else if v >= 10.0 {
        format!("{v:.1} {}", UNITS[u])
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: every accepted spelling, and every malformed one refused with the right reason.
    #[test]
    fn parses_units_and_refuses_garbage() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("10g"), Ok(10 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1.5T"), Ok(3 << 39));
        assert_eq!(parse_size(" 8 M "), Ok(8 << 20));
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        for bad in ["G", "1X", "-1", "1.5", "1..2G", ".5G", "abc", "1 2"] {
            assert!(
                matches!(parse_size(bad), Err(SizeError::Malformed(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_size("99999999999999999999"),
            Err(SizeError::Overflow(_))
        ));
        assert!(matches!(parse_size("16384P"), Err(SizeError::Overflow(_))));
    }

    #[test]
    fn formats_human_units() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(1023), "1023 B");
        assert_eq!(format_size(4096), "4 KiB");
        assert_eq!(format_size(10 << 30), "10 GiB");
        assert_eq!(format_size(3 << 39), "1.50 TiB");
        assert_eq!(format_size(15 << 19), "7.50 MiB");
    }
}

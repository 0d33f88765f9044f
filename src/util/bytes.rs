//! Byte sizes for people: `--max-disk 20G` on the way in, `1.3 GB` on the way out.

/// Formats a byte count with decimal units (`"512 B"`, `"1.25 MB"`, `"3.40 GB"`).
pub fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["kB", "MB", "GB", "TB", "PB"];
    if n < 1000 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut unit = "B";
    for u in UNITS {
        v /= 1000.0;
        unit = u;
        if v < 1000.0 {
            break;
        }
    }
    format!("{v:.2} {unit}")
}

/// Parses a size: a plain byte count or a number with a unit, decimal (`k`, `M`, `G`, `T`, with
/// or without a trailing `B`) or binary (`Ki`, `Mi`, `Gi`, `Ti`, with or without `B`).
///
/// # Errors
/// A message naming the text seen.
pub fn parse(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| format!("`{s}` is not a size (expected e.g. 500M, 20G, 1.5T or a byte count)"))?;
    let unit = unit.trim();
    let unit = unit.strip_suffix('B').unwrap_or(unit);
    let mult: f64 = match unit.to_ascii_lowercase().as_str() {
        "" => 1.0,
        "k" => 1e3,
        "m" => 1e6,
        "g" => 1e9,
        "t" => 1e12,
        "ki" => 1024.0,
        "mi" => 1024f64.powi(2),
        "gi" => 1024f64.powi(3),
        "ti" => 1024f64.powi(4),
        _ => return Err(format!("`{s}`: unknown size unit `{unit}` (use k, M, G, T or Ki, Mi, Gi, Ti)")),
    };
    if !value.is_finite() || value < 0.0 {
        return Err(format!("`{s}` is not a size"));
    }
    Ok((value * mult).round() as u64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_round_trip() {
        assert_eq!(super::parse("20G").unwrap(), 20_000_000_000);
        assert_eq!(super::parse("1.5GiB").unwrap(), 1_610_612_736);
        assert_eq!(super::parse("4096").unwrap(), 4096);
        assert_eq!(super::parse("3 MB").unwrap(), 3_000_000);
        assert!(super::parse("12Q").is_err());
        assert!(super::parse("G").is_err());
        assert_eq!(super::human(999), "999 B");
        assert_eq!(super::human(1_250_000), "1.25 MB");
    }
}

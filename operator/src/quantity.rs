//! Kubernetes quantities (`500m`, `2`, `1k`, `1.5Gi`, `1e3`) as numbers. The API server rewrites
//! quantities in canonical form (`1000` becomes `1k`), so every reader must understand every form.

/// The value of a quantity, or `None` if it is not one.
pub fn parse(q: &str) -> Option<f64> {
    let q = q.trim();
    const SUFFIXES: [(&str, f64); 14] = [
        ("Ki", 1024.0),
        ("Mi", 1048576.0),
        ("Gi", 1073741824.0),
        ("Ti", 1099511627776.0),
        ("Pi", 1125899906842624.0),
        ("Ei", 1152921504606846976.0),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
    ];
    for (suffix, factor) in SUFFIXES {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<f64>().ok().map(|v| v * factor);
        }
    }
    if let Some(n) = q.strip_suffix('E') {
        return n.parse::<f64>().ok().map(|v| v * 1e18);
    }
    // Plain numbers, including the exponent form (`1e3`).
    q.parse::<f64>().ok().filter(|v| v.is_finite())
}

/// CPU in millicores (0 when unparsable).
pub fn milli(q: &str) -> i64 {
    parse(q).map(|v| (v * 1000.0).round() as i64).unwrap_or(0)
}

/// A count or a byte size, rounded up (0 when unparsable).
pub fn int(q: &str) -> i64 {
    parse(q).map(|v| v.ceil() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form() {
        assert_eq!(milli("2"), 2000);
        assert_eq!(milli("500m"), 500);
        assert_eq!(milli("1k"), 1_000_000, "the API server's canonical form of 1000");
        assert_eq!(milli("1.5"), 1500);
        assert_eq!(int("1k"), 1000);
        assert_eq!(int("1Gi"), 1 << 30);
        assert_eq!(int("4Ti"), 4 << 40);
        assert_eq!(int("500M"), 500_000_000);
        assert_eq!(int("1e3"), 1000);
        assert_eq!(int("8"), 8);
        assert_eq!(parse("lots"), None);
        assert_eq!(parse("-4Gi"), Some(-4.0 * 1073741824.0));
    }
}

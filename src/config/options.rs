//! Option strings of the form `KEY=VALUE,KEY=VALUE` (`--retrofit`, `--upcycle`, `--lora`):
//! their parts, and the value kinds they share, each error naming its key.

/// The comma-separated parts of `s` (blank ones skipped), each split at its first `=`;
/// a part without one is `Err(part)`.
pub fn pairs(s: &str) -> impl Iterator<Item = Result<(&str, &str), &str>> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').ok_or(p))
}

/// [`pairs`], a part without `=` an error that says so.
pub fn key_values(s: &str) -> impl Iterator<Item = Result<(&str, &str), String>> {
    pairs(s).map(|p| p.map_err(not_pair))
}

/// The error of a part without `=`.
pub fn not_pair(part: &str) -> String {
    format!("{part:?} is not KEY=VALUE")
}

/// `value` of `key` as a count.
pub fn whole(key: &str, value: &str) -> Result<usize, String> {
    value
        .parse()
        .map_err(|_| format!("{key} must be a whole number, got {value:?}"))
}

/// `value` of `key` as a finite number ≥ 0 (a loss weight).
pub fn non_negative(key: &str, value: &str) -> Result<f64, String> {
    value
        .parse::<f64>()
        .ok()
        .filter(|a| a.is_finite() && *a >= 0.0)
        .ok_or_else(|| format!("{key} must be a number ≥ 0, got {value:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_values_and_their_errors() {
        let got: Vec<_> = pairs(" a=1, ,b=x=y,c").collect();
        assert_eq!(got, [Ok(("a", "1")), Ok(("b", "x=y")), Err("c")]);
        assert_eq!(
            key_values("c").next(),
            Some(Err("\"c\" is not KEY=VALUE".into()))
        );
        assert_eq!(whole("every", "3"), Ok(3));
        assert!(whole("every", "-1")
            .unwrap_err()
            .contains("every must be a whole number"));
        assert_eq!(non_negative("aux", "0.5"), Ok(0.5));
        for bad in ["-0.1", "inf", "NaN", "x"] {
            assert!(non_negative("aux", bad)
                .unwrap_err()
                .starts_with("aux must be"));
        }
    }
}

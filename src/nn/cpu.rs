//! Which of the CPU's vector instruction sets the kernels may use: every one it has,
//! unless the `ROUTELM_CPU` environment variable caps them (`avx2`: nothing of AVX-512;
//! `baseline`: neither AVX-512 nor AVX2), so that a smaller machine's paths can be run,
//! measured and compared on a larger one. Every run-time feature check in the kernels
//! asks [`allows`] as well as the CPU.
//!
//! The f32 GEMM of the `gemm` crate (prompts through f32 weights or dequantized tiles)
//! detects the CPU itself and is not capped.

use std::sync::OnceLock;

/// Instruction-set levels, smallest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Baseline,
    Avx2,
    Avx512,
}

/// The highest level the kernels may use (read once).
pub fn cap() -> Level {
    static CAP: OnceLock<Level> = OnceLock::new();
    *CAP.get_or_init(|| {
        let v = std::env::var("ROUTELM_CPU").unwrap_or_default();
        match parse(&v) {
            Some(l) => l,
            None => {
                tracing::warn!(
                    "ROUTELM_CPU={v:?} is not one of avx512, avx2, baseline; using the CPU's best"
                );
                Level::Avx512
            }
        }
    })
}

/// A `ROUTELM_CPU` value's level (empty: no cap).
fn parse(v: &str) -> Option<Level> {
    match v.trim().to_ascii_lowercase().as_str() {
        "" | "avx512" | "native" => Some(Level::Avx512),
        "avx2" => Some(Level::Avx2),
        "baseline" | "none" | "sse2" => Some(Level::Baseline),
        _ => None,
    }
}

/// Whether kernels of `level` may run (the CPU must still have them).
pub fn allows(level: Level) -> bool {
    level <= cap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_name_their_levels() {
        assert_eq!(parse(""), Some(Level::Avx512));
        assert_eq!(parse("AVX2"), Some(Level::Avx2));
        assert_eq!(parse(" baseline "), Some(Level::Baseline));
        assert_eq!(parse("avx10"), None);
        assert!(Level::Baseline < Level::Avx2 && Level::Avx2 < Level::Avx512);
    }
}

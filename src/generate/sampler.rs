//! Token choice from one row of logits: a pure function of the logits, the history, the
//! settings and the RNG state.

use crate::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerConfig {
    /// 0: greedy (argmax).
    pub temperature: f64,
    /// Keep the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p (1.0: all).
    pub top_p: f64,
    /// CTRL-style penalty (Keskar et al., 2019) on tokens already present: positive logits
    /// are divided by it, negative ones multiplied (1.0: off).
    pub repetition_penalty: f64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
        }
    }
}

/// Choose the next token.
pub fn sample(logits: &[f32], history: &[u32], cfg: &SamplerConfig, rng: &mut Rng) -> u32 {
    if cfg.temperature <= 0.0 && cfg.repetition_penalty == 1.0 {
        // greedy on the logits as they are (the first of equal maxima, as below)
        return logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |b, (i, &v)| {
                if v > b.1 {
                    (i, v)
                } else {
                    b
                }
            })
            .0 as u32;
    }
    let mut z: Vec<f64> = logits.iter().map(|&v| v as f64).collect();
    if cfg.repetition_penalty != 1.0 {
        let mut seen = vec![false; z.len()];
        for &t in history {
            if let Some(s) = seen.get_mut(t as usize) {
                *s = true;
            }
        }
        for (v, s) in z.iter_mut().zip(seen) {
            if s {
                *v = if *v > 0.0 {
                    *v / cfg.repetition_penalty
                } else {
                    *v * cfg.repetition_penalty
                };
            }
        }
    }
    let argmax = |z: &[f64]| {
        z.iter()
            .enumerate()
            .fold((0usize, f64::NEG_INFINITY), |b, (i, &v)| {
                if v > b.1 {
                    (i, v)
                } else {
                    b
                }
            })
            .0
    };
    if cfg.temperature <= 0.0 {
        return argmax(&z) as u32;
    }
    let mut order: Vec<usize> = (0..z.len()).collect();
    order.sort_by(|&a, &b| z[b].total_cmp(&z[a]));
    let keep = if cfg.top_k > 0 {
        cfg.top_k.min(order.len())
    } else {
        order.len()
    };
    order.truncate(keep);
    let max = z[order[0]];
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| ((z[i] - max) / cfg.temperature).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if cfg.top_p < 1.0 {
        let mut acc = 0.0;
        let mut n = 0;
        for p in &probs {
            acc += p;
            n += 1;
            if acc >= cfg.top_p {
                break;
            }
        }
        probs.truncate(n.max(1));
        order.truncate(n.max(1));
    }
    let total: f64 = probs.iter().sum();
    let mut u = rng.uniform() * total;
    for (p, &i) in probs.iter().zip(&order) {
        u -= p;
        if u <= 0.0 {
            return i as u32;
        }
    }
    order[order.len() - 1] as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Greedy decoding without a penalty (read straight from the logits) picks what the
    /// general path picks: the first of equal maxima, NaN never.
    #[test]
    fn greedy_shortcut_equals_the_general_path() {
        let mut rng = Rng::new(0);
        let general = SamplerConfig {
            repetition_penalty: 1.5,
            ..Default::default()
        };
        for logits in [
            vec![2.0f32, 5.0, 5.0, f32::NAN, f32::NEG_INFINITY],
            vec![f32::NAN, -1.0, -1.0],
            vec![-3.0, 0.5, 7.25, 7.0],
        ] {
            // no history: the penalty changes nothing, so only the path differs
            let want = sample(&logits, &[], &general, &mut rng);
            assert_eq!(
                sample(&logits, &[], &SamplerConfig::default(), &mut rng),
                want
            );
        }
    }

    #[test]
    fn greedy_top_k_top_p_and_penalty() {
        let logits = [1.0f32, 3.0, 2.0, -1.0];
        let mut rng = Rng::new(0);
        assert_eq!(sample(&logits, &[], &SamplerConfig::default(), &mut rng), 1);
        // top_k = 1 at any temperature is greedy
        let c = SamplerConfig {
            temperature: 5.0,
            top_k: 1,
            ..Default::default()
        };
        for _ in 0..20 {
            assert_eq!(sample(&logits, &[], &c, &mut rng), 1);
        }
        // top_p small keeps only the best
        let c = SamplerConfig {
            temperature: 1.0,
            top_p: 0.1,
            ..Default::default()
        };
        assert_eq!(sample(&logits, &[], &c, &mut rng), 1);
        // a penalty of 2 turns 3.0 into 1.5 < 2.0
        let c = SamplerConfig {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        assert_eq!(sample(&logits, &[1], &c, &mut rng), 2);
        // top_k = 2 never samples outside the two best
        let c = SamplerConfig {
            temperature: 10.0,
            top_k: 2,
            ..Default::default()
        };
        for _ in 0..100 {
            let t = sample(&logits, &[], &c, &mut rng);
            assert!(t == 1 || t == 2);
        }
        // same seed, same draws
        let c = SamplerConfig {
            temperature: 1.0,
            ..Default::default()
        };
        let a: Vec<u32> = {
            let mut r = Rng::new(5);
            (0..10).map(|_| sample(&logits, &[], &c, &mut r)).collect()
        };
        let b: Vec<u32> = {
            let mut r = Rng::new(5);
            (0..10).map(|_| sample(&logits, &[], &c, &mut r)).collect()
        };
        assert_eq!(a, b);
    }
}

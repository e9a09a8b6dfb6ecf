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
    draw(&z, cfg, rng)
}

/// The `k` best ids of `z`, best first; equal values in id order (as a stable sort of
/// every id would give them).
fn best(z: &[f64], k: usize) -> Vec<u32> {
    let better = |a: &u32, b: &u32| z[*b as usize].total_cmp(&z[*a as usize]).then(a.cmp(b));
    let mut ids: Vec<u32> = (0..z.len() as u32).collect();
    if k < ids.len() {
        ids.select_nth_unstable_by(k, better);
        ids.truncate(k);
    }
    ids.sort_unstable_by(better);
    ids
}

/// A draw at `cfg.temperature` from the `top_k` best (all when 0), within the smallest
/// best-first set whose probability reaches `top_p`. The best ids are sorted only as far
/// as the nucleus and the draw reach (a few dozen of a 262k vocabulary, where sorting all
/// of them halved Gemma 3's decoding speed); the weights are summed best first where all
/// of them are sorted, in id order otherwise.
fn draw(z: &[f64], cfg: &SamplerConfig, rng: &mut Rng) -> u32 {
    let kept = match cfg.top_k {
        0 => z.len(),
        k => k.min(z.len()),
    };
    let mut k = if kept < z.len() { kept } else { 64.min(kept) };
    let mut order = best(z, k);
    let max = z[order[0] as usize];
    let weight = |v: f64| ((v - max) / cfg.temperature).exp();
    let total: f64 = if order.len() == kept {
        order.iter().map(|&i| weight(z[i as usize])).sum()
    } else {
        z.iter().map(|&v| weight(v)).sum()
    };
    let prob = |i: u32| weight(z[i as usize]) / total;
    // more of the best, sorted, when the walk needs them
    let mut widen = |order: &mut Vec<u32>| {
        k = (k * 8).min(kept);
        *order = best(z, k);
    };
    let mut keep = kept;
    if cfg.top_p < 1.0 {
        let (mut acc, mut j) = (0.0, 0);
        loop {
            while j < order.len() {
                acc += prob(order[j]);
                j += 1;
                if acc >= cfg.top_p {
                    break;
                }
            }
            if acc >= cfg.top_p || order.len() == kept {
                break;
            }
            widen(&mut order);
        }
        keep = j.max(1);
    }
    let mass: f64 = if keep <= order.len() {
        order[..keep].iter().map(|&i| prob(i)).sum()
    } else {
        (0..z.len() as u32).map(prob).sum()
    };
    let mut u = rng.uniform() * mass;
    let mut j = 0;
    loop {
        while j < keep.min(order.len()) {
            u -= prob(order[j]);
            if u <= 0.0 {
                return order[j];
            }
            j += 1;
        }
        if order.len() >= keep {
            return order[keep - 1];
        }
        widen(&mut order);
    }
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

    /// The draw as a full sort of every id computes it (sum and walk best first).
    fn full_sort_draw(z: &[f64], cfg: &SamplerConfig, rng: &mut Rng) -> u32 {
        let mut order: Vec<usize> = (0..z.len()).collect();
        order.sort_by(|&a, &b| z[b].total_cmp(&z[a]));
        order.truncate(if cfg.top_k > 0 {
            cfg.top_k.min(z.len())
        } else {
            z.len()
        });
        let max = z[order[0]];
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| ((z[i] - max) / cfg.temperature).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if cfg.top_p < 1.0 {
            let (mut acc, mut n) = (0.0, 0);
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
        let mut u = rng.uniform() * probs.iter().sum::<f64>();
        for (p, &i) in probs.iter().zip(&order) {
            u -= p;
            if u <= 0.0 {
                return i as u32;
            }
        }
        order[order.len() - 1] as u32
    }

    /// Sorting only as many of the best ids as the draw reaches picks what sorting all of
    /// them picks, for the same random state: top-k, nucleus, both, neither, flat and
    /// peaked logits, ties, and vocabularies past the first sorted prefix.
    #[test]
    fn partial_sorting_draws_what_a_full_sort_draws() {
        let mut rng = Rng::new(11);
        let mut draws = 0;
        for n in [3usize, 64, 65, 1000, 5000] {
            for spread in [0.1, 1.0, 8.0] {
                let mut z: Vec<f64> = (0..n).map(|_| rng.normal() * spread).collect();
                z[n / 2] = z[0]; // a tie
                for (top_k, top_p, temperature) in [
                    (0, 1.0, 1.0),
                    (0, 0.9, 0.7),
                    (0, 0.999, 2.0),
                    (40, 1.0, 1.0),
                    (40, 0.5, 1.3),
                    (1, 1.0, 1.0),
                    (n + 5, 0.95, 1.0),
                ] {
                    let cfg = SamplerConfig {
                        temperature,
                        top_k,
                        top_p,
                        repetition_penalty: 1.0,
                    };
                    for seed in 0..20 {
                        let (mut a, mut b) = (Rng::new(seed), Rng::new(seed));
                        assert_eq!(
                            draw(&z, &cfg, &mut a),
                            full_sort_draw(&z, &cfg, &mut b),
                            "n {n} spread {spread} {cfg:?} seed {seed}"
                        );
                        draws += 1;
                    }
                }
            }
        }
        assert_eq!(draws, 5 * 3 * 7 * 20);
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

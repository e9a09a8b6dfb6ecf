//! Relative position biases (T5, Raffel et al., 2020, §2.1): each head adds a learned scalar
//! for the bucket of `key − query` to its attention scores. Distances below half the
//! buckets (per direction) get their own bucket; longer ones share logarithmic buckets up
//! to `max_distance`. A bidirectional (encoder) table gives each sign half the buckets.

use candle_core::{Result, Tensor};

/// The bucket of a relative position `rel = key − query`. The float steps follow
/// transformers' float32 arithmetic, so boundary distances land in the same bucket.
pub fn relative_bucket(
    rel: i64,
    bidirectional: bool,
    buckets: usize,
    max_distance: usize,
) -> usize {
    let mut n = buckets as i64;
    let mut base = 0;
    let r = if bidirectional {
        n /= 2;
        if rel > 0 {
            base = n;
        }
        rel.abs()
    } else {
        (-rel).max(0)
    };
    let exact = n / 2;
    if r < exact {
        return (base + r) as usize;
    }
    let log_ratio = (r as f32 / exact as f32).ln();
    let span = ((max_distance as f64) / exact as f64).ln() as f32;
    let large = exact + (log_ratio / span * (n - exact) as f32) as i64;
    (base + large.min(n - 1)) as usize
}

/// The `(n_heads, t, t_k)` score biases from `table: (buckets, n_heads)` for queries at
/// positions `q0..q0 + t` over keys `0..t_k`; unidirectional (a causal decoder) or
/// bidirectional (an encoder). The causal mask itself is the attention's.
pub fn relative_bias(
    table: &Tensor,
    q0: usize,
    t: usize,
    t_k: usize,
    bidirectional: bool,
    max_distance: usize,
) -> Result<Tensor> {
    let (buckets, h) = table.dims2()?;
    let idx: Vec<u32> = (q0..q0 + t)
        .flat_map(|i| {
            (0..t_k).map(move |j| {
                relative_bucket(j as i64 - i as i64, bidirectional, buckets, max_distance) as u32
            })
        })
        .collect();
    let idx = Tensor::from_vec(idx, t * t_k, table.device())?;
    table
        .index_select(&idx, 0)?
        .reshape((t, t_k, h))?
        .permute((2, 0, 1))?
        .contiguous()
}

#[cfg(test)]
mod tests {
    use super::relative_bucket;

    /// Hand-computed buckets of T5's scheme (32 buckets, max distance 128, and the small
    /// 8/16 setting where `ln(2)/ln(4)·4` must land exactly on 2).
    #[test]
    fn buckets_by_hand() {
        let bi = |r| relative_bucket(r, true, 32, 128);
        // exact below 8 per direction; keys after the query take the upper half
        assert_eq!([bi(0), bi(-1), bi(-7), bi(1), bi(7)], [0, 1, 7, 17, 23]);
        // 8 + floor(ln(d/8)/ln(16)·8), capped at 15
        assert_eq!(
            [bi(-8), bi(-20), bi(-127), bi(-1000), bi(1000)],
            [8, 10, 15, 15, 31]
        );
        let uni = |r| relative_bucket(r, false, 32, 128);
        // the future is bucket 0; 16 + floor(ln(d/16)/ln(8)·16)
        assert_eq!([uni(5), uni(-15), uni(-20), uni(-128)], [0, 15, 17, 31]);
        assert_eq!(relative_bucket(-8, false, 8, 16), 6);
        assert_eq!(relative_bucket(-16, false, 8, 16), 7);
    }
}

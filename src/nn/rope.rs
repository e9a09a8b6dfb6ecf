//! Rotary position tables (Su et al., 2021, "RoFormer"): `cos` and `sin` of
//! `pos * theta^(-2i/r)` for `i < r/2`, rescaled by the configured [`RopeScaling`] as
//! transformers' `modeling_rope_utils` does, precomputed once for every position of the
//! context.
//!
//! Dynamic NTK and LongRoPE choose their frequencies by how many positions a forward pass
//! reaches. transformers recomputes them in `dynamic_rope_update` from
//! `max(position_ids) + 1` before each pass, so during cached generation each step's new
//! queries and keys are rotated with the frequencies for the length reached at that step,
//! while the keys already in the cache keep the rotation they were given. [`RopeTables::range`]
//! does the same: a pass over positions `start..start + len` whose end passes the switch
//! length gets tables computed for `start + len`. (transformers also keeps the largest
//! length seen across calls on the module; a fresh model, or one generation whose length
//! only grows, is what we match.)

use candle_core::{DType, Device, Result, Tensor};
use std::f64::consts::PI;

use crate::config::RopeScaling;

/// YaRN's correction range: the dims (of `rotary_dim`) that rotate `beta_fast` and
/// `beta_slow` times over `original` positions, rounded outward when `truncate`, clamped
/// to `[0, rotary_dim - 1]`.
fn yarn_range(
    beta_fast: f64,
    beta_slow: f64,
    rotary_dim: usize,
    theta: f64,
    original: f64,
    truncate: bool,
) -> (f64, f64) {
    let dim = rotary_dim as f64;
    let correction =
        |rotations: f64| (dim * (original / (rotations * 2.0 * PI)).ln()) / (2.0 * theta.ln());
    let (mut low, mut high) = (correction(beta_fast), correction(beta_slow));
    if truncate {
        (low, high) = (low.floor(), high.ceil());
    }
    (low.max(0.0), high.min(dim - 1.0))
}

/// Inverse frequencies `theta^(-2i/r)`, rescaled as `scaling` says for a forward pass that
/// reaches `reached` positions (only dynamic NTK and LongRoPE look at it).
pub fn inv_freq(theta: f64, rotary_dim: usize, scaling: &RopeScaling, reached: usize) -> Vec<f64> {
    let half = rotary_dim / 2;
    let exponent = |i: usize| 2.0 * i as f64 / rotary_dim as f64;
    let base = |theta: f64| (0..half).map(move |i| 1.0 / theta.powf(exponent(i)));
    match scaling {
        RopeScaling::None => base(theta).collect(),
        RopeScaling::Linear { factor } => base(theta).map(|f| f / factor).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } => base(theta)
            .map(|f| {
                let wavelen = 2.0 * PI / f;
                let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
                if wavelen < high_wavelen {
                    f
                } else if wavelen > low_wavelen {
                    f / factor
                } else {
                    let smooth =
                        (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    (1.0 - smooth) * f / factor + smooth * f
                }
            })
            .collect(),
        RopeScaling::Dynamic {
            factor,
            max_position_embeddings: max,
        } => {
            let len = reached as f64;
            if len > *max {
                let r = rotary_dim as f64;
                let scaled = theta * ((factor * len / max) - (factor - 1.0)).powf(r / (r - 2.0));
                base(scaled).collect()
            } else {
                base(theta).collect()
            }
        }
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            beta_fast,
            beta_slow,
            truncate,
            ..
        } => {
            let (low, mut high) = yarn_range(
                *beta_fast,
                *beta_slow,
                rotary_dim,
                theta,
                *original_max_position_embeddings,
                *truncate,
            );
            if low == high {
                high += 0.001; // transformers' guard against a zero-width ramp
            }
            base(theta)
                .enumerate()
                .map(|(i, f)| {
                    // 1 below the ramp (extrapolate: keep f), 0 above it (interpolate: f / factor)
                    let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                    let keep = 1.0 - ramp;
                    (f / factor) * (1.0 - keep) + f * keep
                })
                .collect()
        }
        RopeScaling::LongRope {
            short_factor,
            long_factor,
            original_max_position_embeddings,
            ..
        } => {
            let factors = if reached as f64 > *original_max_position_embeddings {
                long_factor
            } else {
                short_factor
            };
            (0..half)
                .map(|i| 1.0 / (factors[i] * theta.powf(exponent(i))))
                .collect()
        }
    }
}

/// cos and sin tables `(len, rotary_dim / 2)` for positions `start..start + len`, in f32
/// like transformers' (position and frequency rounded first), times `scale`.
fn tables(
    inv_freq: &[f64],
    start: usize,
    len: usize,
    scale: f64,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(len * half);
    let mut sin = Vec::with_capacity(len * half);
    let scale = scale as f32;
    for p in start..start + len {
        for f in inv_freq {
            let a = (p as f32 * *f as f32) as f64;
            cos.push(a.cos() as f32 * scale);
            sin.push(a.sin() as f32 * scale);
        }
    }
    let cos = Tensor::from_vec(cos, (len, half), device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (len, half), device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

/// Positions whose tables are computed when the model is built; later ones are computed
/// when a pass reaches them (once a pass, shared by its layers: a row of a decode step,
/// ~10 ms for a 4096-token prompt), so that a context length a file claims (millions of
/// positions) costs no memory until it is used. 8192 rows held Gemma 3's four tables at
/// 17 MB, 6% of its model's resident memory.
const PRECOMPUTED: usize = 1024;

#[derive(Debug, Clone)]
pub struct RopeTables {
    /// (rows, rotary_dim / 2): the first positions of the context (up to
    /// [`PRECOMPUTED`], and up to the switch length when the scaling has one) with the
    /// frequencies of passes that stay within the switch length.
    cos: Tensor,
    sin: Tensor,
    /// The frequencies of those rows.
    inv_freq: Vec<f64>,
    theta: f64,
    rotary_dim: usize,
    scaling: RopeScaling,
}

impl RopeTables {
    pub fn new(
        theta: f64,
        rotary_dim: usize,
        scaling: RopeScaling,
        max_seq_len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let inv_freq = inv_freq(theta, rotary_dim, &scaling, 0);
        // past the switch length, `range` computes the tables it needs
        let rows = scaling
            .switch_length()
            .map_or(max_seq_len, |s| s.min(max_seq_len))
            .min(PRECOMPUTED);
        let (cos, sin) = tables(
            &inv_freq,
            0,
            rows,
            scaling.attention_factor(),
            dtype,
            device,
        )?;
        Ok(Self {
            cos,
            sin,
            inv_freq,
            theta,
            rotary_dim,
            scaling,
        })
    }

    /// Tables for the contiguous positions `start..start + len` of a forward pass that
    /// reaches `start + len` positions.
    pub fn range(&self, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        match self.scaling.switch_length() {
            Some(switch) if start + len > switch => {
                let inv_freq = inv_freq(self.theta, self.rotary_dim, &self.scaling, start + len);
                let scale = self.scaling.attention_factor();
                tables(
                    &inv_freq,
                    start,
                    len,
                    scale,
                    self.cos.dtype(),
                    self.cos.device(),
                )
            }
            _ if start + len > self.cos.dim(0)? => tables(
                &self.inv_freq,
                start,
                len,
                self.scaling.attention_factor(),
                self.cos.dtype(),
                self.cos.device(),
            ),
            _ => Ok((
                self.cos.narrow(0, start, len)?,
                self.sin.narrow(0, start, len)?,
            )),
        }
    }

    /// The tables of the positions `pos` (any shape, u32), shaped `pos.shape + (half,)`,
    /// for passes within the switch length.
    pub fn gather(&self, pos: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut shape = pos.dims().to_vec();
        shape.push(self.cos.dim(1)?);
        let flat = pos.flatten_all()?;
        let rows = self.cos.dim(0)?;
        let (cos, sin) = if flat.to_vec1::<u32>()?.iter().all(|&p| (p as usize) < rows) {
            (
                self.cos.index_select(&flat, 0)?,
                self.sin.index_select(&flat, 0)?,
            )
        } else {
            // past the precomputed rows: each position's own row
            let mut cos = Vec::new();
            let mut sin = Vec::new();
            for p in flat.to_vec1::<u32>()? {
                let (c, s) = self.range(p as usize, 1)?;
                cos.push(c);
                sin.push(s);
            }
            (Tensor::cat(&cos, 0)?, Tensor::cat(&sin, 0)?)
        };
        Ok((cos.reshape(shape.as_slice())?, sin.reshape(shape)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows past the precomputed ones (a long context claimed, little memory spent) are
    /// computed when reached, equal to the formula cos/sin(p · θ^(−2i/d)), through both
    /// `range` (contiguous passes) and `gather` (chosen tokens).
    #[test]
    fn positions_past_the_precomputed_rows_are_computed_when_reached() -> Result<()> {
        let dim = 8;
        let r = RopeTables::new(
            10_000.0,
            dim,
            RopeScaling::None,
            1 << 20,
            DType::F32,
            &Device::Cpu,
        )?;
        assert_eq!(
            r.cos.dim(0)?,
            PRECOMPUTED,
            "a 2^20 context is not tabled up front"
        );
        let expect = |p: usize, i: usize| {
            let a = p as f64 * 10_000f64.powf(-2.0 * i as f64 / dim as f64);
            (a.cos(), a.sin())
        };
        let start = PRECOMPUTED - 3;
        let (cos, sin) = r.range(start, 7)?;
        let (cos, sin) = (cos.to_vec2::<f32>()?, sin.to_vec2::<f32>()?);
        for (row, p) in (start..start + 7).enumerate() {
            for i in 0..dim / 2 {
                let (c, s) = expect(p, i);
                assert!((cos[row][i] as f64 - c).abs() < 2e-3, "cos at {p}, {i}");
                assert!((sin[row][i] as f64 - s).abs() < 2e-3, "sin at {p}, {i}");
            }
        }
        let pos = Tensor::new(
            &[[3u32, PRECOMPUTED as u32 + 100], [7, 1 << 19]],
            &Device::Cpu,
        )?;
        let (gc, gs) = r.gather(&pos)?;
        assert_eq!(gc.dims(), &[2, 2, dim / 2]);
        for (a, b) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            let p = pos.get(a)?.get(b)?.to_scalar::<u32>()? as usize;
            let (rc, rs) = r.range(p, 1)?;
            assert_eq!(
                gc.get(a)?.get(b)?.to_vec1::<f32>()?,
                rc.get(0)?.to_vec1::<f32>()?
            );
            assert_eq!(
                gs.get(a)?.get(b)?.to_vec1::<f32>()?,
                rs.get(0)?.to_vec1::<f32>()?
            );
        }
        Ok(())
    }
}

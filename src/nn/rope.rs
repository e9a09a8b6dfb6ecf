//! Rotary position tables (Su et al., 2021, "RoFormer"): `cos` and `sin` of
//! `pos * theta^(-2i/r)` for `i < r/2`, precomputed once for every position of the context.

use candle_core::{DType, Device, Result, Tensor};

use crate::config::RopeScaling;

/// Inverse frequencies `theta^(-2i/r)`, rescaled as `scaling` says (transformers'
/// `_compute_linear_scaling_rope_parameters` / `_compute_llama3_parameters`).
pub fn inv_freq(theta: f64, rotary_dim: usize, scaling: RopeScaling) -> Vec<f64> {
    let base = (0..rotary_dim / 2).map(|i| 1.0 / theta.powf(2.0 * i as f64 / rotary_dim as f64));
    match scaling {
        RopeScaling::None => base.collect(),
        RopeScaling::Linear { factor } => base.map(|f| f / factor).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } => base
            .map(|f| {
                let wavelen = 2.0 * std::f64::consts::PI / f;
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
    }
}

#[derive(Debug, Clone)]
pub struct RopeTables {
    /// (max_seq_len, rotary_dim / 2)
    pub cos: Tensor,
    pub sin: Tensor,
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
        let half = rotary_dim / 2;
        let inv_freq = inv_freq(theta, rotary_dim, scaling);
        let mut cos = Vec::with_capacity(max_seq_len * half);
        let mut sin = Vec::with_capacity(max_seq_len * half);
        for p in 0..max_seq_len {
            for f in &inv_freq {
                // f32 like transformers' tables: position and frequency rounded first
                let a = (p as f32 * *f as f32) as f64;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        let cos = Tensor::from_vec(cos, (max_seq_len, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (max_seq_len, half), device)?.to_dtype(dtype)?;
        Ok(Self { cos, sin })
    }

    /// Tables for the contiguous positions `start..start + len`.
    pub fn range(&self, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        Ok((
            self.cos.narrow(0, start, len)?,
            self.sin.narrow(0, start, len)?,
        ))
    }
}

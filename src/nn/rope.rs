//! Rotary position tables (Su et al., 2021, "RoFormer"): `cos` and `sin` of
//! `pos * theta^(-2i/r)` for `i < r/2`, precomputed once for every position of the context.

use candle_core::{DType, Device, Result, Tensor};

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
        max_seq_len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let half = rotary_dim / 2;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| 1.0 / theta.powf(2.0 * i as f64 / rotary_dim as f64))
            .collect();
        let mut cos = Vec::with_capacity(max_seq_len * half);
        let mut sin = Vec::with_capacity(max_seq_len * half);
        for p in 0..max_seq_len {
            for f in &inv_freq {
                let a = p as f64 * f;
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

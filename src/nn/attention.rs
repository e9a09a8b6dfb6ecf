//! Causal self-attention with multi-head, grouped-query and multi-query variants.
//!
//! Query heads are grouped by the KV head they share: `q: (b, h, t, d)` is viewed as
//! `(b, h_kv, group * t, d)` so one batched matmul serves every group without copying K/V
//! (`repeat_kv` is never materialised). The causal mask and the `1/sqrt(d)` scale are fused
//! into the softmax kernel ([`super::ops::causal_softmax`]), so no [T × T] mask exists.

use candle_core::{Result, Tensor};

use super::{ops, Linear};
use crate::model::cache::KvCache;

#[derive(Debug, Clone)]
pub struct Attention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl Attention {
    /// `x: (b, t, d_model)`; `rope`: the (cos, sin) tables of these `t` positions, if any;
    /// `cache`: the layer's KV cache, appended to and attended over when present.
    pub fn forward(
        &self,
        x: &Tensor,
        rope: Option<(&Tensor, &Tensor)>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, hkv, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let q = self.q.forward(x)?.reshape((b, t, h, d))?;
        let k = self.k.forward(x)?.reshape((b, t, hkv, d))?;
        let v = self.v.forward(x)?.reshape((b, t, hkv, d))?;
        let (q, k) = match rope {
            Some((cos, sin)) => (ops::rope(&q, cos, sin)?, ops::rope(&k, cos, sin)?),
            None => (q, k),
        };
        // (b, t, h, d) -> (b, h, t, d)
        let q = q.transpose(1, 2)?.contiguous()?;
        let k = k.transpose(1, 2)?.contiguous()?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let (k, v) = match cache {
            Some(c) => c.append(&k, &v)?,
            None => (k, v),
        };
        let group = h / hkv;
        let q = q.reshape((b, hkv, group * t, d))?;
        let scores = q.matmul(&k.t()?)?; // (b, hkv, group*t, t_k)
        let p = ops::causal_softmax(&scores, 1.0 / (d as f64).sqrt(), t)?;
        let y = p.matmul(&v)?; // (b, hkv, group*t, d)
        let y = y
            .reshape((b, h, t, d))?
            .transpose(1, 2)?
            .reshape((b, t, h * d))?;
        self.o.forward(&y)
    }
}

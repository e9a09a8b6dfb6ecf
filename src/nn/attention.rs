//! Causal self-attention with multi-head, grouped-query and multi-query variants.
//!
//! Projections stay in `(b, t, heads, d)` layout end to end: rotary embedding, the KV cache
//! and the fused kernel ([`super::causal_attention`]) all work on it, so nothing is
//! transposed, K/V are never repeated per query head, and no [T × T] mask exists.

use candle_core::{Result, Tensor};

use super::causal_attention::{causal_attention, AttentionOptions};
use super::{ops, Linear, Norm};
use crate::config::QkNorm;
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
    /// RMSNorm on queries and keys before rotary (per head or over all heads).
    pub q_norm: Option<Norm>,
    pub k_norm: Option<Norm>,
    pub qk_norm: QkNorm,
    pub scale: f64,
    pub window: Option<usize>,
    pub softcap: Option<f64>,
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
        let (mut q, mut k) = (self.q.forward(x)?, self.k.forward(x)?);
        if let (QkNorm::Full, Some(qn), Some(kn)) = (self.qk_norm, &self.q_norm, &self.k_norm) {
            (q, k) = (qn.forward(&q)?, kn.forward(&k)?);
        }
        let mut q = q.reshape((b, t, h, d))?;
        let mut k = k.reshape((b, t, hkv, d))?;
        if let (QkNorm::PerHead, Some(qn), Some(kn)) = (self.qk_norm, &self.q_norm, &self.k_norm) {
            (q, k) = (qn.forward(&q)?, kn.forward(&k)?);
        }
        let v = self.v.forward(x)?.reshape((b, t, hkv, d))?;
        let (q, k) = match rope {
            Some((cos, sin)) => (ops::rope(&q, cos, sin)?, ops::rope(&k, cos, sin)?),
            None => (q, k),
        };
        let (k, v) = match cache {
            Some(c) => c.append(&k, &v)?,
            None => (k, v),
        };
        let opts = AttentionOptions {
            scale: self.scale,
            window: self.window,
            softcap: self.softcap,
        };
        let y = causal_attention(&q, &k, &v, &opts)?; // (b, t, h, d)
        let y = y.reshape((b, t, h * d))?;
        self.o.forward(&y)
    }
}

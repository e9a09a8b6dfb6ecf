//! Causal self-attention with multi-head, grouped-query and multi-query variants.
//!
//! Projections stay in `(b, t, heads, d)` layout end to end: rotary embedding, the KV cache
//! and the fused kernel ([`super::causal_attention`]) all work on it, so nothing is
//! transposed, K/V are never repeated per query head, and no [T × T] mask exists.

use candle_core::{DType, Result, Tensor};

use super::causal_attention::{causal_attention, AttentionOptions};
use super::KvCache;
use super::{ops, Linear, Norm};
use crate::config::{MlaConfig, QkNorm};

/// How queries, keys and values are projected from the input.
#[derive(Debug, Clone)]
pub enum Projections {
    /// `q = x Wq`, `k = x Wk`, `v = x Wv`.
    Standard { q: Linear, k: Linear, v: Linear },
    /// Multi-head latent attention (DeepSeek-V2/V3).
    Latent(Box<Latent>),
}

/// Latent attention's projections: `q = Wqb · norm(Wqa · x)`, `[c, k_rope] = Wkva · x`,
/// `[k_nope, v] = Wkvb · norm(c)`; each head's key is `[k_rope (shared), k_nope]` and its
/// query `[q_rope, q_nope]` (rotary part first, where the rotary kernel expects it).
#[derive(Debug, Clone)]
pub struct Latent {
    pub q_a: Option<(Linear, Norm)>,
    pub q_b: Linear,
    pub kv_a: Linear,
    pub kv_norm: Norm,
    pub kv_b: Linear,
    pub config: MlaConfig,
}

#[derive(Debug, Clone)]
pub struct Attention {
    pub proj: Projections,
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
    /// ALiBi position biases instead of rotary embeddings.
    pub alibi: bool,
    /// q, k and v clamped to `[-c, c]` after their projections and full q/k norms
    /// (OLMoE's `clip_qkv`).
    pub clip: Option<f64>,
    /// A query sees only the keys up to its own position (false: an encoder's
    /// bidirectional self-attention).
    pub causal: bool,
}

/// Where the tokens of an attention call sit: the rotary tables of their positions, or the
/// relative-position biases of their scores.
#[derive(Debug, Clone, Copy, Default)]
pub struct Positions<'a> {
    /// `(cos, sin)` of these `t` positions.
    pub rope: Option<(&'a Tensor, &'a Tensor)>,
    /// `(n_heads, t, t_k)` added to the self-attention scores.
    pub bias: Option<&'a Tensor>,
}

impl Attention {
    /// Its projections.
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v: Vec<&mut Linear> = match &mut self.proj {
            Projections::Standard { q, k, v } => vec![q, k, v],
            Projections::Latent(l) => {
                let mut v: Vec<&mut Linear> = l.q_a.iter_mut().map(|(q, _)| q).collect();
                v.extend([&mut l.q_b, &mut l.kv_a, &mut l.kv_b]);
                v
            }
        };
        v.push(&mut self.o);
        v
    }

    /// Standard projections: q, k, v in `(b, t, heads, head_dim)`, q/k norms applied,
    /// before rotary.
    fn standard(
        &self,
        x: &Tensor,
        q: &Linear,
        k: &Linear,
        v: &Linear,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let (h, hkv, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let [mut q, mut k, mut v] = Linear::forward_many([q, k, v], x)?;
        if let (QkNorm::Full, Some(qn), Some(kn)) = (self.qk_norm, &self.q_norm, &self.k_norm) {
            (q, k) = (qn.forward(&q)?, kn.forward(&k)?);
        }
        if let Some(c) = self.clip {
            let c = c as f32;
            (q, k, v) = (q.clamp(-c, c)?, k.clamp(-c, c)?, v.clamp(-c, c)?);
        }
        let mut q = q.reshape((b, t, h, d))?;
        let mut k = k.reshape((b, t, hkv, d))?;
        if let (QkNorm::PerHead, Some(qn), Some(kn)) = (self.qk_norm, &self.q_norm, &self.k_norm) {
            (q, k) = (qn.forward(&q)?, kn.forward(&k)?);
        }
        let v = v.reshape((b, t, hkv, d))?;
        Ok((q, k, v))
    }

    /// `x: (b, t, d_model)`; `pos`: where these `t` tokens sit; `cache`: the layer's KV
    /// cache, appended to and attended over when present.
    pub fn forward(
        &self,
        x: &Tensor,
        pos: Positions,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let rope = pos.rope;
        let (b, t, _) = x.dims3()?;
        let h = self.n_heads;
        let rotate = |x: Tensor| -> Result<Tensor> {
            match rope {
                Some((cos, sin)) => ops::rope(&x, cos, sin),
                None => Ok(x),
            }
        };
        let (q, k, v) = match &self.proj {
            Projections::Standard { q, k, v } => {
                let (q, k, v) = self.standard(x, q, k, v)?;
                (rotate(q)?, rotate(k)?, v)
            }
            Projections::Latent(l) => {
                if let Some(cache) = cache {
                    return self.latent_cached(x, l, &rotate, cache);
                }
                let a = l.config;
                let nope = a.qk_nope_dim;
                let (q_rot, q_nope) = l.queries(x, h)?;
                let q = Tensor::cat(&[rotate(q_rot)?, q_nope], 3)?;
                let (c, k_rot) = l.latent(x, &rotate)?;
                let kvb = l.kv_b.forward(&c)?;
                let kvb = kvb.reshape((b, t, h, nope + a.v_head_dim))?;
                let rot = a.qk_rope_dim;
                let k = Tensor::cat(
                    &[k_rot.broadcast_as((b, t, h, rot))?, kvb.narrow(3, 0, nope)?],
                    3,
                )?;
                let v = kvb.narrow(3, nope, a.v_head_dim)?.contiguous()?;
                (q, k, v)
            }
        };
        let cached = cache.is_some();
        let (k, v) = match cache {
            Some(c) => c.append(&k, &v)?,
            None => (k, v),
        };
        let opts = AttentionOptions {
            bias: pos.bias.cloned(),
            ..self.options()
        };
        if cached && t == 1 && pos.bias.is_none() && self.decodes_in_one_pass(&q, &k, &v) {
            // one new token over its cache: the decoding loops (which read an f16 cache
            // as it is)
            let keys = (0..b)
                .map(|i| k.narrow(0, i, 1))
                .collect::<Result<Vec<_>>>()?;
            let values = (0..b)
                .map(|i| v.narrow(0, i, 1))
                .collect::<Result<Vec<_>>>()?;
            let y = self.decode_attention(&q, &keys, &values)?;
            let dv = y.dim(3)?;
            return self.o.forward(&y.reshape((b, t, h * dv))?);
        }
        // a cache held narrower than the queries is widened for the prompt's attention
        let (k, v) = if k.dtype() != q.dtype() {
            (k.to_dtype(q.dtype())?, v.to_dtype(q.dtype())?)
        } else {
            (k, v)
        };
        let y = causal_attention(&q, &k, &v, &opts)?; // (b, t, h, dv)
        let dv = y.dim(3)?;
        let y = y.reshape((b, t, h * dv))?;
        self.o.forward(&y)
    }

    /// One new token of each of `b` sequences, `x: (b, 1, d_model)`, each at its own
    /// position (`rope`: `(b, 1, half)` tables) with its own cache: the projections run once
    /// for all rows (each weight read once per step), attention per sequence over its own
    /// keys. The same arithmetic as [`Attention::forward`] on each sequence alone.
    pub fn forward_decode(
        &self,
        x: &Tensor,
        rope: Option<(&Tensor, &Tensor)>,
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        let Projections::Standard { q, k, v } = &self.proj else {
            candle_core::bail!("batched decoding takes standard projections")
        };
        let (b, t, _) = x.dims3()?;
        if t != 1 || caches.len() != b {
            candle_core::bail!(
                "batched decoding takes one token for each of {b} caches, got {t} for {}",
                caches.len()
            )
        }
        let (q, k, v) = self.standard(x, q, k, v)?;
        let (q, k) = match rope {
            Some((cos, sin)) => (ops::rope(&q, cos, sin)?, ops::rope(&k, cos, sin)?),
            None => (q, k),
        };
        let opts = self.options();
        let mut kvs = Vec::with_capacity(b);
        for (i, cache) in caches.iter_mut().enumerate() {
            kvs.push(cache.append(&k.narrow(0, i, 1)?, &v.narrow(0, i, 1)?)?);
        }
        let one_pass = kvs.iter().all(|(k, v)| self.decodes_in_one_pass(&q, k, v));
        let y = if one_pass {
            let (ks, vs): (Vec<Tensor>, Vec<Tensor>) = kvs.into_iter().unzip();
            self.decode_attention(&q, &ks, &vs)?
        } else {
            let ys = kvs
                .iter()
                .enumerate()
                .map(|(i, (ki, vi))| {
                    let (ki, vi) = (ki.to_dtype(q.dtype())?, vi.to_dtype(q.dtype())?);
                    causal_attention(&q.narrow(0, i, 1)?, &ki, &vi, &opts)
                })
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&ys, 0)?
        };
        let dv = y.dim(3)?;
        self.o.forward(&y.reshape((b, 1, self.n_heads * dv))?)
    }

    /// Whether queries `q` (one token each) over cached keys `k` and values `v` take
    /// [`decode_attention`](super::decode_attention::decode_attention)'s loops: f32
    /// queries, an f32 or f16 cache with contiguous rows, causal attention without a
    /// soft-cap.
    fn decodes_in_one_pass(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
        self.softcap.is_none()
            && self.causal
            && q.dtype() == DType::F32
            && k.dtype() == v.dtype()
            && matches!(k.dtype(), DType::F32 | DType::F16)
            && q.device().is_cpu()
            && [k, v].iter().all(|t| t.rank() == 4 && t.stride()[3] == 1)
    }

    /// One token of each sequence, `q: (b, 1, h, d)`, over sequence `i`'s cached `keys[i]`
    /// and `values[i]`, with this layer's scale, window and ALiBi.
    fn decode_attention(&self, q: &Tensor, keys: &[Tensor], values: &[Tensor]) -> Result<Tensor> {
        super::decode_attention::decode_attention(
            q,
            keys,
            values,
            self.scale as f32,
            self.window,
            self.alibi,
        )
    }

    fn options(&self) -> AttentionOptions {
        AttentionOptions {
            scale: self.scale,
            window: self.window,
            softcap: self.softcap,
            alibi: self.alibi,
            causal: self.causal,
            bias: None,
        }
    }

    /// Cross-attention's keys and values of `source: (b, s, d_model)` (an encoder's
    /// output), `(b, s, h_kv, head_dim)` each: computed once, kept in the cache.
    pub fn keys_values(&self, source: &Tensor) -> Result<(Tensor, Tensor)> {
        let Projections::Standard { k, v, .. } = &self.proj else {
            candle_core::bail!("cross-attention takes standard projections")
        };
        let (b, s, _) = source.dims3()?;
        let shape = (b, s, self.n_kv_heads, self.head_dim);
        let [k, v] = Linear::forward_many([k, v], source)?;
        Ok((k.reshape(shape)?, v.reshape(shape)?))
    }

    /// Cross-attention from `x: (b, t, d_model)` over the source's keys and values
    /// ([`Attention::keys_values`]): every query sees every source position.
    pub fn cross(&self, x: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let Projections::Standard { q, .. } = &self.proj else {
            candle_core::bail!("cross-attention takes standard projections")
        };
        let (b, t, _) = x.dims3()?;
        let q = q.forward(x)?.reshape((b, t, self.n_heads, self.head_dim))?;
        let opts = AttentionOptions {
            causal: false,
            ..self.options()
        };
        let y = causal_attention(&q, k, v, &opts)?;
        self.o
            .forward(&y.reshape((b, t, self.n_heads * self.head_dim))?)
    }

    /// Latent attention through a latent cache, with `kv_b` absorbed (DeepSeek-V2 §2.1.2):
    /// a head's score `q_nope·(W_k c) + q_rot·k_rot` is `(W_kᵀ q_nope)·c + q_rot·k_rot`, and
    /// its output `W_v Σ p c`. So every head attends over the same cached rows
    /// `[k_rot, c]` (one KV head of width `qk_rope_dim + kv_lora_rank`, the values being
    /// the `c` part of the same rows), and only the queries and outputs go through `kv_b`.
    fn latent_cached(
        &self,
        x: &Tensor,
        l: &Latent,
        rotate: &dyn Fn(Tensor) -> Result<Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let h = self.n_heads;
        let a = l.config;
        let (nope, rot, lora, dv) = (a.qk_nope_dim, a.qk_rope_dim, a.kv_lora_rank, a.v_head_dim);
        if l.kv_b.bias.is_some() {
            candle_core::bail!("latent attention: a kv_b bias cannot be absorbed into the cache")
        }
        let (q_rot, q_nope) = l.queries(x, h)?;
        let (c, k_rot) = l.latent(x, rotate)?;
        let rows = Tensor::cat(&[k_rot, c.reshape((b, t, 1, lora))?], 3)?;
        let all = cache.append_latent(&rows)?; // (b, len, 1, rot + lora)
                                               // kv_b's weight per head: (h, nope + dv, lora) = [W_k; W_v]
                                               // an adapter on kv_b is absorbed with it: W + scale · B A
        let w = match &l.kv_b.lora {
            Some(ad) => (&l.kv_b.weight + (ad.b.matmul(&ad.a)? * ad.scale)?)?,
            None => l.kv_b.weight.clone(),
        };
        let w = w.reshape((h, nope + dv, lora))?;
        let (w_k, w_v) = (w.narrow(1, 0, nope)?, w.narrow(1, nope, dv)?);
        // (h, b·t, nope) · (h, nope, lora) → the absorbed queries (b, t, h, lora)
        let per_head = |x: &Tensor, d: usize| x.reshape((b * t, h, d))?.transpose(0, 1);
        let q_abs = per_head(&q_nope, nope)?
            .contiguous()?
            .matmul(&w_k.contiguous()?)?
            .transpose(0, 1)?
            .reshape((b, t, h, lora))?;
        let q = Tensor::cat(&[rotate(q_rot)?, q_abs], 3)?;
        let o = causal_attention(&q, &all, &all.narrow(3, rot, lora)?, &self.options())?;
        // (h, b·t, lora) · (h, lora, dv) → (b, t, h·dv)
        let y = per_head(&o, lora)?
            .contiguous()?
            .matmul(&w_v.transpose(1, 2)?)?
            .transpose(0, 1)?
            .reshape((b, t, h * dv))?;
        self.o.forward(&y)
    }
}

impl Latent {
    /// The queries `(b, t, h, qk_rope_dim)` (not yet rotated) and `(b, t, h, qk_nope_dim)`.
    fn queries(&self, x: &Tensor, h: usize) -> Result<(Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let (nope, rot) = (self.config.qk_nope_dim, self.config.qk_rope_dim);
        let q = match &self.q_a {
            Some((qa, norm)) => self.q_b.forward(&norm.forward(&qa.forward(x)?)?)?,
            None => self.q_b.forward(x)?,
        }
        .reshape((b, t, h, nope + rot))?;
        Ok((q.narrow(3, nope, rot)?, q.narrow(3, 0, nope)?))
    }

    /// The normalised latent `c: (b, t, kv_lora_rank)` and the rotated key part shared by
    /// every head, `(b, t, 1, qk_rope_dim)`.
    fn latent(
        &self,
        x: &Tensor,
        rotate: &dyn Fn(Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let (lora, rot) = (self.config.kv_lora_rank, self.config.qk_rope_dim);
        let kv = self.kv_a.forward(x)?; // (b, t, lora + rot)
        let k_rot = rotate(kv.narrow(2, lora, rot)?.reshape((b, t, 1, rot))?)?;
        Ok((self.kv_norm.forward(&kv.narrow(2, 0, lora)?)?, k_rot))
    }
}

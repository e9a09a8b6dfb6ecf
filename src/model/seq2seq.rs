//! The encoder-decoder transformer (T5 shape): a bidirectional encoder and a causal decoder
//! that also attends to the encoder's output, built from the same norms, projections and
//! feed-forward blocks as [`super::Model`]. Positions enter as learned relative biases on
//! the attention scores (Raffel et al., 2020): each head adds a learned scalar for the
//! bucket of `key − query` (exact for short distances, logarithmic up to `max_distance`);
//! the first layer of each stack owns the table and every layer of the stack uses it.

use candle_core::{DType, Device, Result as CResult, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::config::{FfnKind, NormKind};
use crate::error::{Error, Result};
use crate::nn::{Linear, Mlp, Norm};

/// A resolved encoder-decoder description.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Seq2SeqConfig {
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub head_dim: usize,
    pub d_ff: usize,
    pub encoder_layers: usize,
    pub decoder_layers: usize,
    /// `Relu` (T5 v1.0), `Geglu` (v1.1's gated GELU) or `Swiglu`; no biases anywhere.
    pub ffn: FfnKind,
    /// RMSNorm epsilon.
    pub norm_eps: f64,
    /// Relative-position buckets (halved per direction in the encoder).
    pub buckets: usize,
    pub max_distance: usize,
    /// The head shares the token embedding.
    pub tie_embeddings: bool,
    /// The decoder output is multiplied by `d_model^-0.5` before the head.
    pub scale_output: bool,
    /// The first decoder input.
    pub decoder_start: u32,
    /// Generation stops after this token.
    pub eos: Option<u32>,
    /// Longest decoder sequence generation produces.
    pub max_seq_len: usize,
}

impl Seq2SeqConfig {
    /// Every inconsistency, all at once.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("n_heads", self.n_heads),
            ("head_dim", self.head_dim),
            ("d_ff", self.d_ff),
            ("encoder_layers", self.encoder_layers),
            ("decoder_layers", self.decoder_layers),
            ("buckets", self.buckets),
        ] {
            if v == 0 || v > 1 << 24 {
                p.push(format!("{name} ({v}) must be in 1..=2^24"));
            }
        }
        if self.buckets < 4 || self.max_distance < self.buckets {
            p.push(format!(
                "relative positions need at least 4 buckets and max_distance >= buckets (got {} and {})",
                self.buckets, self.max_distance
            ));
        }
        if !matches!(self.ffn, FfnKind::Relu | FfnKind::Geglu | FfnKind::Swiglu) {
            p.push(format!("feed-forward {:?} is not a T5 kind", self.ffn));
        }
        if self.decoder_start as usize >= self.vocab_size {
            p.push("decoder_start is out of the vocabulary".into());
        }
        p
    }
}

/// The bucket of a relative position `key − query` (T5's scheme): bidirectional tables
/// give each sign half the buckets; within a half, distances below half of it are exact
/// and the rest share logarithmic buckets up to `max_distance`. The float steps follow
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

/// Multi-head attention without score scaling (T5 folds it into the weights).
#[derive(Debug, Clone)]
pub struct PlainAttention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub n_heads: usize,
    pub head_dim: usize,
}

impl PlainAttention {
    /// `x: (b, t, d_model)` → `(b, h, t, head_dim)` with projection `p`.
    fn heads(&self, p: &Linear, x: &Tensor) -> CResult<Tensor> {
        let (b, t, _) = x.dims3()?;
        p.forward(x)?
            .reshape((b, t, self.n_heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// Keys and values of `x` in `(b, h, t, head_dim)`.
    pub fn kv(&self, x: &Tensor) -> CResult<(Tensor, Tensor)> {
        Ok((self.heads(&self.k, x)?, self.heads(&self.v, x)?))
    }

    /// Attend from `x: (b, t, d)` over `k, v: (b, h, tk, head_dim)`, adding `bias`
    /// (broadcastable to `(b, h, t, tk)`, `-inf` where masked) to the scores.
    pub fn attend(
        &self,
        x: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: Option<&Tensor>,
    ) -> CResult<Tensor> {
        let (b, t, _) = x.dims3()?;
        let q = self.heads(&self.q, x)?;
        let mut s = q.matmul(&k.t()?)?;
        if let Some(bias) = bias {
            s = s.broadcast_add(bias)?;
        }
        let p = candle_nn::ops::softmax_last_dim(&s)?;
        let y = p
            .matmul(v)?
            .transpose(1, 2)?
            .reshape((b, t, self.n_heads * self.head_dim))?;
        self.o.forward(&y)
    }
}

#[derive(Debug, Clone)]
pub struct EncoderLayer {
    pub attn_norm: Norm,
    pub attn: PlainAttention,
    pub ffn_norm: Norm,
    pub ffn: Mlp,
}

#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub self_norm: Norm,
    pub self_attn: PlainAttention,
    pub cross_norm: Norm,
    pub cross_attn: PlainAttention,
    pub ffn_norm: Norm,
    pub ffn: Mlp,
}

/// Decoder state between steps: each layer's self-attention keys/values so far and its
/// cross-attention keys/values of the encoder output (computed once).
#[derive(Debug, Clone)]
pub struct Seq2SeqCache {
    self_kv: Vec<Option<(Tensor, Tensor)>>,
    cross_kv: Vec<(Tensor, Tensor)>,
    pos: usize,
}

impl Seq2SeqCache {
    /// Decoder positions consumed so far.
    pub fn pos(&self) -> usize {
        self.pos
    }
}

/// What a decoder pass produces.
#[derive(Debug)]
pub struct DecoderOutput {
    /// `(b, t, vocab)`.
    pub logits: Tensor,
    /// With `hidden_states`: the decoder input embeddings, each layer's output but the
    /// last, and the last after the final norm.
    pub hidden_states: Vec<Tensor>,
}

#[derive(Debug, Clone)]
pub struct Seq2Seq {
    pub config: Seq2SeqConfig,
    pub embed: Tensor,
    /// `(buckets, n_heads)` relative-position tables of the encoder and the decoder.
    pub encoder_bias: Tensor,
    pub decoder_bias: Tensor,
    pub encoder: Vec<EncoderLayer>,
    pub encoder_norm: Norm,
    pub decoder: Vec<DecoderLayer>,
    pub decoder_norm: Norm,
    pub head: Linear,
}

/// Parameter names of an encoder-decoder with this config, with shapes.
pub fn seq2seq_param_specs(c: &Seq2SeqConfig) -> Vec<(String, Vec<usize>)> {
    let (d, inner) = (c.d_model, c.n_heads * c.head_dim);
    let mut v = vec![("embed_tokens.weight".to_string(), vec![c.vocab_size, d])];
    if !c.tie_embeddings {
        v.push(("lm_head.weight".into(), vec![c.vocab_size, d]));
    }
    let attn = |v: &mut Vec<(String, Vec<usize>)>, p: &str| {
        for proj in ["q_proj", "k_proj", "v_proj"] {
            v.push((format!("{p}.{proj}.weight"), vec![inner, d]));
        }
        v.push((format!("{p}.o_proj.weight"), vec![d, inner]));
    };
    let ffn = |v: &mut Vec<(String, Vec<usize>)>, p: &str| {
        if c.ffn.is_gated() {
            v.push((format!("{p}.gate_proj.weight"), vec![c.d_ff, d]));
        }
        v.push((format!("{p}.up_proj.weight"), vec![c.d_ff, d]));
        v.push((format!("{p}.down_proj.weight"), vec![d, c.d_ff]));
    };
    for (stack, n) in [("encoder", c.encoder_layers), ("decoder", c.decoder_layers)] {
        v.push((
            format!("{stack}.relative_bias.weight"),
            vec![c.buckets, c.n_heads],
        ));
        v.push((format!("{stack}.norm.weight"), vec![d]));
        for l in 0..n {
            let p = format!("{stack}.layers.{l}");
            v.push((format!("{p}.input_layernorm.weight"), vec![d]));
            attn(&mut v, &format!("{p}.self_attn"));
            if stack == "decoder" {
                v.push((format!("{p}.cross_attn_layernorm.weight"), vec![d]));
                attn(&mut v, &format!("{p}.cross_attn"));
            }
            v.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
            ffn(&mut v, &format!("{p}.mlp"));
        }
    }
    v
}

impl Seq2Seq {
    /// Build from canonical parameters ([`seq2seq_param_specs`]); every missing, misshapen
    /// or unexpected tensor is reported at once, naming `origin`.
    pub fn new(
        config: &Seq2SeqConfig,
        params: &std::collections::BTreeMap<String, Tensor>,
        origin: &str,
    ) -> Result<Self> {
        let specs = seq2seq_param_specs(config);
        let problems = super::transformer::tensor_problems(
            specs.iter().map(|(n, s)| (n.as_str(), s.as_slice())),
            params,
        );
        if !problems.is_empty() {
            return Err(Error::WeightMismatch {
                path: origin.into(),
                problems,
            });
        }
        let get = |n: &str| params[n].clone();
        let norm = |p: &str| Norm {
            kind: NormKind::RmsNorm,
            weight: get(&format!("{p}.weight")),
            bias: None,
            eps: config.norm_eps,
        };
        let lin = |p: &str| Linear::new(get(&format!("{p}.weight")), None);
        let attn = |p: &str| PlainAttention {
            q: lin(&format!("{p}.q_proj")),
            k: lin(&format!("{p}.k_proj")),
            v: lin(&format!("{p}.v_proj")),
            o: lin(&format!("{p}.o_proj")),
            n_heads: config.n_heads,
            head_dim: config.head_dim,
        };
        let mlp = |p: &str| Mlp {
            kind: config.ffn,
            gate: config
                .ffn
                .is_gated()
                .then(|| lin(&format!("{p}.gate_proj"))),
            up: lin(&format!("{p}.up_proj")),
            down: lin(&format!("{p}.down_proj")),
            gate_up: None,
        };
        let encoder = (0..config.encoder_layers)
            .map(|l| {
                let p = format!("encoder.layers.{l}");
                EncoderLayer {
                    attn_norm: norm(&format!("{p}.input_layernorm")),
                    attn: attn(&format!("{p}.self_attn")),
                    ffn_norm: norm(&format!("{p}.post_attention_layernorm")),
                    ffn: mlp(&format!("{p}.mlp")),
                }
            })
            .collect();
        let decoder = (0..config.decoder_layers)
            .map(|l| {
                let p = format!("decoder.layers.{l}");
                DecoderLayer {
                    self_norm: norm(&format!("{p}.input_layernorm")),
                    self_attn: attn(&format!("{p}.self_attn")),
                    cross_norm: norm(&format!("{p}.cross_attn_layernorm")),
                    cross_attn: attn(&format!("{p}.cross_attn")),
                    ffn_norm: norm(&format!("{p}.post_attention_layernorm")),
                    ffn: mlp(&format!("{p}.mlp")),
                }
            })
            .collect();
        let embed = get("embed_tokens.weight");
        let head = if config.tie_embeddings {
            embed.clone()
        } else {
            get("lm_head.weight")
        };
        Ok(Self {
            config: config.clone(),
            embed,
            encoder_bias: get("encoder.relative_bias.weight"),
            decoder_bias: get("decoder.relative_bias.weight"),
            encoder,
            encoder_norm: norm("encoder.norm"),
            decoder,
            decoder_norm: norm("decoder.norm"),
            head: Linear::new(head, None),
        })
    }

    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    fn check_ids(&self, ids: &Tensor) -> Result<()> {
        let max = ids.flatten_all()?.max(0)?.to_scalar::<u32>()? as usize;
        if max >= self.config.vocab_size {
            return Err(Error::Generate(format!(
                "token id {max} is out of range for a vocabulary of {}",
                self.config.vocab_size
            )));
        }
        Ok(())
    }

    fn embed(&self, ids: &Tensor) -> CResult<Tensor> {
        let (b, t) = ids.dims2()?;
        self.embed
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, self.config.d_model))
    }

    /// `(1, h, t, tk)` relative biases for queries at `q0..q0 + t` over keys `0..tk`,
    /// with `-inf` above the diagonal when `causal`.
    fn position_bias(
        &self,
        table: &Tensor,
        q0: usize,
        t: usize,
        tk: usize,
        causal: bool,
    ) -> CResult<Tensor> {
        let c = &self.config;
        let mut idx = Vec::with_capacity(t * tk);
        let mut mask = Vec::with_capacity(t * tk);
        for i in q0..q0 + t {
            for j in 0..tk {
                let rel = j as i64 - i as i64;
                idx.push(relative_bucket(rel, !causal, c.buckets, c.max_distance) as u32);
                mask.push(if causal && j > i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                });
            }
        }
        let idx = Tensor::from_vec(idx, t * tk, table.device())?;
        let mask = Tensor::from_vec(mask, (t, tk), table.device())?.to_dtype(table.dtype())?;
        let bias = table.index_select(&idx, 0)?.reshape((t, tk, c.n_heads))?;
        bias.permute((2, 0, 1))?.broadcast_add(&mask)?.unsqueeze(0)
    }

    /// Encode `ids: (b, s)` → `(b, s, d_model)`, and the hidden states between layers
    /// (the embeddings, each layer's output but the last, the last after the final norm).
    pub fn encode(&self, ids: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        self.check_ids(ids)?;
        let s = ids.dim(1)?;
        let mut x = self.embed(ids)?;
        let bias = self.position_bias(&self.encoder_bias, 0, s, s, false)?;
        let mut hidden = Vec::with_capacity(self.encoder.len() + 1);
        for layer in &self.encoder {
            hidden.push(x.clone());
            let h = layer.attn_norm.forward(&x)?;
            let (k, v) = layer.attn.kv(&h)?;
            x = (x + layer.attn.attend(&h, &k, &v, Some(&bias))?)?;
            x = (&x + layer.ffn.forward(&layer.ffn_norm.forward(&x)?)?)?;
        }
        let x = self.encoder_norm.forward(&x)?;
        hidden.push(x.clone());
        Ok((x, hidden))
    }

    /// A decoder cache for this encoder output.
    pub fn new_cache(&self, encoded: &Tensor) -> Result<Seq2SeqCache> {
        let cross_kv = self
            .decoder
            .iter()
            .map(|l| l.cross_attn.kv(encoded))
            .collect::<CResult<_>>()?;
        Ok(Seq2SeqCache {
            self_kv: vec![None; self.decoder.len()],
            cross_kv,
            pos: 0,
        })
    }

    /// Decode `ids: (b, t)`, continuing `cache` (whose cross-attention comes from the
    /// encoder output it was made for).
    pub fn decode(
        &self,
        ids: &Tensor,
        cache: &mut Seq2SeqCache,
        hidden_states: bool,
    ) -> Result<DecoderOutput> {
        self.check_ids(ids)?;
        let t = ids.dim(1)?;
        let start = cache.pos;
        if start + t > self.config.max_seq_len {
            return Err(Error::Generate(format!(
                "decoder sequence of {} tokens exceeds the limit of {}",
                start + t,
                self.config.max_seq_len
            )));
        }
        let mut x = self.embed(ids)?;
        let bias = self.position_bias(&self.decoder_bias, start, t, start + t, true)?;
        let mut hidden = Vec::new();
        for (l, layer) in self.decoder.iter().enumerate() {
            if hidden_states {
                hidden.push(x.clone());
            }
            let h = layer.self_norm.forward(&x)?;
            let (k, v) = layer.self_attn.kv(&h)?;
            let (k, v) = match cache.self_kv[l].take() {
                Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                None => (k, v),
            };
            x = (x + layer.self_attn.attend(&h, &k, &v, Some(&bias))?)?;
            cache.self_kv[l] = Some((k, v));
            let h = layer.cross_norm.forward(&x)?;
            let (ck, cv) = &cache.cross_kv[l];
            x = (&x + layer.cross_attn.attend(&h, ck, cv, None)?)?;
            x = (&x + layer.ffn.forward(&layer.ffn_norm.forward(&x)?)?)?;
        }
        cache.pos += t;
        let mut x = self.decoder_norm.forward(&x)?;
        if hidden_states {
            hidden.push(x.clone());
        }
        if self.config.scale_output {
            x = (x * (self.config.d_model as f64).powf(-0.5))?;
        }
        Ok(DecoderOutput {
            logits: self.head.forward(&x)?,
            hidden_states: hidden,
        })
    }

    /// Greedy decoding of `n` tokens for one encoder input `prompt`, starting from the
    /// decoder start token and stopping after EOS; returns the decoder ids, start first.
    pub fn greedy(&self, prompt: &[u32], n: usize) -> Result<Vec<u32>> {
        let input = Tensor::new(prompt, self.device())?.unsqueeze(0)?;
        let (encoded, _) = self.encode(&input)?;
        let mut cache = self.new_cache(&encoded)?;
        let mut ids = vec![self.config.decoder_start];
        for _ in 0..n {
            let step = Tensor::new(&ids[ids.len() - 1..], self.device())?.unsqueeze(0)?;
            let logits = self.decode(&step, &mut cache, false)?.logits;
            let next = logits
                .flatten_all()?
                .to_dtype(DType::F32)?
                .argmax(D::Minus1)?
                .to_scalar::<u32>()?;
            ids.push(next);
            if Some(next) == self.config.eos {
                break;
            }
        }
        Ok(ids)
    }
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

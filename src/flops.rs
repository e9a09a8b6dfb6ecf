//! The FLOP ledger: forward FLOPs per token for each component of each layer, and the
//! parameter counts, as a pure function of the [`ModelConfig`] (and the context length).
//!
//! Conventions (Kaplan et al., 2020, "Scaling Laws", Table 1; nanoGPT's `estimate_mfu`):
//! a multiply-add is 2 FLOPs; a projection `d_in → d_out` costs `2·d_in·d_out` per token;
//! causal attention at context `n` costs, per token, `2·n·head_dim` for the scores and the
//! same for the weighted sum, per query head, where `n` is the average number of keys a
//! query sees under the causal mask, `(seq_len + 1) / 2`; norms, activations, softmax and
//! the embedding lookup are not counted (they are not matmuls). Training ≈ 3 × forward.

use crate::config::{BlockKind, ModelConfig, NormKind, Position, QkNorm};

/// One line of the ledger.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FlopEntry {
    /// `layers.N.attn.qkv`, `head`, …
    pub component: String,
    /// Forward FLOPs per token (averaged over a sequence for routed blocks).
    pub flops: f64,
    /// The same without Mixture-of-Depths routing (every token through every block).
    pub dense_flops: f64,
    /// Parameters involved (0 for attention scores).
    pub params: usize,
}

/// The ledger of one configuration at one context length.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FlopLedger {
    pub seq_len: usize,
    pub entries: Vec<FlopEntry>,
    /// Every parameter, embeddings included.
    pub total_params: usize,
    /// Parameters that touch each token (all of them for a dense model, embeddings
    /// counted once even when tied).
    pub active_params: usize,
}

/// The ledger being written: entries, parameter totals, and the sizes every component
/// reads. One method per component, each pushing its entries and returning its parameters.
struct Ledger<'a> {
    cfg: &'a ModelConfig,
    seq_len: usize,
    entries: Vec<FlopEntry>,
    total: usize,
    /// Parameters of experts a token does not use.
    inactive: usize,
}

impl Ledger<'_> {
    fn push(&mut self, component: String, flops: f64, params: usize) {
        self.entries.push(FlopEntry {
            component,
            flops,
            dense_flops: flops,
            params,
        });
    }

    /// The last entry costs nothing in the dense equivalent (a router's own cost).
    fn undensify_last(&mut self) {
        if let Some(e) = self.entries.last_mut() {
            e.dense_flops = 0.0;
        }
    }

    /// One norm's parameters.
    fn norm_params(&self) -> usize {
        match self.cfg.norm {
            NormKind::LayerNorm if self.cfg.norm_bias => 2 * self.cfg.d_model,
            _ => self.cfg.d_model,
        }
    }

    /// Average keys a query sees among `n` tokens: `(n + 1) / 2` under the causal mask
    /// (fewer with a window), all `n` in a bidirectional encoder.
    fn keys_seen(window: Option<usize>, n: usize, causal: bool) -> f64 {
        if !causal {
            return n as f64;
        }
        let w = window.unwrap_or(usize::MAX);
        (1..=n).map(|i| i.min(w) as f64).sum::<f64>() / n.max(1) as f64
    }

    /// Self-attention under `p` (q/k/v projections with latent attention when `latent`,
    /// scores over the keys a query sees, output projection); its parameters.
    fn attention(&mut self, p: &str, window: Option<usize>, latent: bool, causal: bool) -> usize {
        let c = self.cfg;
        let d = c.d_model;
        let (q, kv) = (c.q_dim(), c.kv_dim());
        // projections into attention: (matrix parameters, extra norm parameters)
        let (qkv_matrix, qkv_norms) = match (&c.mla, latent) {
            (Some(a), true) => {
                let q_path = match a.q_lora_rank {
                    Some(r) => (d * r + r * q, r),
                    None => (d * q, 0),
                };
                let kv_path = d * (a.kv_lora_rank + a.qk_rope_dim)
                    + a.kv_lora_rank * c.n_heads * (a.qk_nope_dim + a.v_head_dim);
                (q_path.0 + kv_path, q_path.1 + a.kv_lora_rank)
            }
            _ => (d * (q + 2 * kv), 0),
        };
        let qkv_params = qkv_matrix + qkv_norms + if c.qkv_bias { q + 2 * kv } else { 0 };
        let out_in = if latent { c.attn_out_dim() } else { q };
        let o_params = out_in * d + if c.out_bias { d } else { 0 };
        self.push(format!("{p}.qkv"), 2.0 * qkv_matrix as f64, qkv_params);
        // q·k over head_dim, then the weighted sum of values over their width
        let keys = Self::keys_seen(window, self.seq_len, causal);
        self.push(format!("{p}.scores"), 2.0 * keys * (q + out_in) as f64, 0);
        self.push(format!("{p}.out"), 2.0 * (out_in * d) as f64, o_params);
        qkv_params + o_params
    }

    /// Cross-attention of a decoder layer: queries of the target, keys and values of the
    /// source (one source token per target token), every source position seen.
    fn cross(&mut self, p: &str) -> usize {
        let c = self.cfg;
        let (d, q, kv) = (c.d_model, c.q_dim(), c.kv_dim());
        let bias = |n: usize| if c.qkv_bias { n } else { 0 };
        self.push(format!("{p}.q"), 2.0 * (d * q) as f64, d * q + bias(q));
        self.push(
            format!("{p}.kv"),
            2.0 * (d * 2 * kv) as f64,
            d * 2 * kv + bias(2 * kv),
        );
        self.push(
            format!("{p}.scores"),
            2.0 * (self.seq_len * 2 * q) as f64,
            0,
        );
        let o = q * d + if c.out_bias { d } else { 0 };
        self.push(format!("{p}.out"), 2.0 * (q * d) as f64, o);
        d * q + bias(q) + d * 2 * kv + bias(2 * kv) + o
    }

    /// One FFN of hidden width `w`: (parameters, forward FLOPs per token).
    fn ffn_cost(&self, w: usize) -> (usize, f64) {
        let c = self.cfg;
        let d = c.d_model;
        let n_in = if c.ffn.is_gated() { 2 } else { 1 };
        let params = (n_in + 1) * d * w + if c.ffn_bias { n_in * w + d } else { 0 };
        (params, 2.0 * ((n_in + 1) * d * w) as f64)
    }

    /// The feed-forward block under `p`: dense, or layer `l`'s Mixture of Experts (router,
    /// top-k routed experts, shared experts); its parameters.
    fn ffn(&mut self, p: &str, l: Option<usize>) -> usize {
        let c = self.cfg;
        let d = c.d_model;
        let moe = l.and_then(|l| c.layer(l).moe);
        let Some(m) = moe else {
            let (params, flops) = self.ffn_cost(c.d_ff);
            self.push(format!("{p}.ffn"), flops, params);
            return params;
        };
        let router = m.slots() * d + if m.selection_bias { m.slots() } else { 0 };
        let (expert_params, expert_flops) = self.ffn_cost(m.d_expert);
        self.push(
            format!("{p}.moe.router"),
            2.0 * (d * m.slots()) as f64,
            router,
        );
        // with no-op experts an upper bound: a slot routed to one costs nothing
        let active = m.top_k.min(m.n_experts) as f64;
        let experts = m.n_experts * expert_params;
        self.push(format!("{p}.moe.experts"), active * expert_flops, experts);
        let mut shared = 0;
        if m.d_shared > 0 {
            let (params, flops) = self.ffn_cost(m.d_shared);
            let gate = if m.shared_gate { d } else { 0 };
            self.push(
                format!("{p}.moe.shared"),
                flops + 2.0 * gate as f64,
                params + gate,
            );
            shared = params + gate;
        }
        self.inactive += m.n_experts.saturating_sub(m.top_k) * expert_params;
        router + experts + shared
    }

    /// Decoder layer `l`: attention, cross-attention, feed-forward, norms, and when it is a
    /// routed (Mixture-of-Depths) block the costs scaled to the tokens it processes.
    fn layer(&mut self, l: usize) {
        let c = self.cfg;
        let d = c.d_model;
        let p = format!("layers.{l}");
        let first = self.entries.len();
        let window = c.layer(l).window;
        let mut params = self.attention(&format!("{p}.attn"), window, true, true);
        if c.encoder_layers > 0 {
            params += self.cross(&format!("{p}.cross")) + self.norm_params();
        }
        params += self.ffn(&p, Some(l));
        let n_norms = match c.block {
            BlockKind::ParallelSharedNorm => 1,
            _ => 2,
        } + if c.sandwich_norms { 2 } else { 0 };
        params += n_norms * self.norm_params()
            + match c.qk_norm {
                QkNorm::None => 0,
                QkNorm::PerHead => 2 * c.head_dim,
                QkNorm::Full => c.q_dim() + c.kv_dim(),
            };
        self.total += params;
        if let Some(dc) = c.layer(l).depth {
            // per token of the sequence: the k processed tokens' cost spread over n, and
            // attention among the k tokens only
            let n = self.seq_len;
            let k = ((dc.capacity * n as f64).ceil() as usize).clamp(1, n.max(1));
            let share = k as f64 / n.max(1) as f64;
            let attn = Self::keys_seen(window, k, true) / Self::keys_seen(window, n, true);
            use crate::config::DepthSkip;
            for e in &mut self.entries[first..] {
                // skipping one sub-block: the other runs on every token
                let in_ffn = e.component.contains(".ffn") || e.component.contains(".moe.");
                let routed = match dc.skip {
                    DepthSkip::Block => true,
                    DepthSkip::Mlp => in_ffn,
                    DepthSkip::Attention => !in_ffn,
                };
                if !routed {
                    continue;
                }
                e.flops *= share;
                if e.component.ends_with("attn.scores") {
                    e.flops *= attn;
                }
            }
            // routing's own costs: none without routing
            self.push(format!("{p}.depth.router"), 2.0 * d as f64, d);
            self.undensify_last();
            self.total += d;
            if dc.predictor > 0 {
                // the predictor runs on every token (it decides at sampling time)
                let params = dc.predictor * d + dc.predictor;
                self.push(format!("{p}.depth.predictor"), 2.0 * params as f64, params);
                self.undensify_last();
                self.total += params;
            }
        }
    }

    /// Encoder layer `l` of an encoder-decoder (per source token, bidirectional).
    fn encoder_layer(&mut self, l: usize) {
        let p = format!("encoder.layers.{l}");
        let params = self.attention(&format!("{p}.attn"), None, false, false)
            + self.ffn(&p, None)
            + 2 * self.norm_params();
        self.total += params;
    }
}

impl FlopLedger {
    /// The ledger of `cfg` at context `seq_len`. For an encoder-decoder, a token is one
    /// source token (through the encoder) and one target token (through the decoder).
    pub fn new(cfg: &ModelConfig, seq_len: usize) -> Self {
        let d = cfg.d_model;
        let mut b = Ledger {
            cfg,
            seq_len,
            entries: Vec::new(),
            total: cfg.vocab_size * d,
            inactive: 0,
        };
        if cfg.position == Position::Learned {
            b.total += cfg.max_seq_len * d;
        }
        if let Position::Relative { buckets, .. } = cfg.position {
            let tables = if cfg.encoder_layers > 0 { 2 } else { 1 };
            b.total += tables * buckets * cfg.n_heads;
        }
        for l in 0..cfg.encoder_layers {
            b.encoder_layer(l);
        }
        if cfg.encoder_layers > 0 {
            b.total += b.norm_params();
        }
        for l in 0..cfg.n_layers {
            b.layer(l);
        }
        b.total += b.norm_params();
        let head_params = if cfg.tie_embeddings {
            0
        } else {
            cfg.vocab_size * d
        } + if cfg.head_bias { cfg.vocab_size } else { 0 };
        b.total += head_params;
        b.push(
            "head".into(),
            2.0 * (d * cfg.vocab_size) as f64,
            head_params,
        );
        Self {
            seq_len,
            entries: b.entries,
            total_params: b.total,
            active_params: b.total - b.inactive,
        }
    }

    /// Forward FLOPs per token, all components.
    pub fn forward_per_token(&self) -> f64 {
        self.entries.iter().map(|e| e.flops).sum()
    }

    /// Forward FLOPs per token if every token went through every block (no depth routing).
    pub fn dense_forward_per_token(&self) -> f64 {
        self.entries
            .iter()
            .map(|e| {
                if e.component.contains(".depth.") {
                    0.0
                } else {
                    e.dense_flops
                }
            })
            .sum()
    }

    /// Training FLOPs per token: forward + backward ≈ 3 × forward.
    pub fn train_per_token(&self) -> f64 {
        3.0 * self.forward_per_token()
    }
}

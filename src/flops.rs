//! The FLOP ledger: forward FLOPs per token for each component of each layer, and the
//! parameter counts, as a pure function of the [`ModelConfig`] (and the context length).
//!
//! Conventions (Kaplan et al., 2020, "Scaling Laws", Table 1; nanoGPT's `estimate_mfu`):
//! a multiply-add is 2 FLOPs; a projection `d_in → d_out` costs `2·d_in·d_out` per token;
//! causal attention at context `n` costs, per token, `2·n·head_dim` for the scores and the
//! same for the weighted sum, per query head, where `n` is the average number of keys a
//! query sees under the causal mask, `(seq_len + 1) / 2`; norms, activations, softmax and
//! the embedding lookup are not counted (they are not matmuls). Training ≈ 3 × forward.

use crate::config::{ModelConfig, Position};

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

impl FlopLedger {
    pub fn new(cfg: &ModelConfig, seq_len: usize) -> Self {
        let d = cfg.d_model;
        let (q, kv) = (cfg.q_dim(), cfg.kv_dim());
        let mut entries = Vec::new();
        // parameters of experts a token does not use
        let mut inactive = 0;
        let mut total = cfg.vocab_size * d;
        if cfg.position == Position::Learned {
            total += cfg.max_seq_len * d;
        }
        let norm_params = match cfg.norm {
            crate::config::NormKind::LayerNorm if cfg.norm_bias => 2 * d,
            _ => d,
        };
        // average keys per query among n tokens: (n + 1) / 2 under the causal mask, fewer
        // with a window
        let keys_seen_n = |window: Option<usize>, n: usize| -> f64 {
            let w = window.unwrap_or(usize::MAX);
            (1..=n).map(|i| i.min(w) as f64).sum::<f64>() / n.max(1) as f64
        };
        let keys_seen = |window: Option<usize>| keys_seen_n(window, seq_len);
        for l in 0..cfg.n_layers {
            let p = format!("layers.{l}");
            let first = entries.len();
            // a routed (Mixture-of-Depths) block runs on k = ceil(capacity · n) tokens
            let capacity = match (&cfg.depth, cfg.layer(l).routed) {
                (Some(dc), true) => Some(dc.capacity),
                _ => None,
            };
            let attended = capacity.map_or(seq_len, |c| {
                ((c * seq_len as f64).ceil() as usize).clamp(1, seq_len.max(1))
            });
            // projections into attention: (matrix parameters, extra norm parameters)
            let (qkv_matrix, qkv_norms) = match &cfg.mla {
                Some(a) => {
                    let q_path = match a.q_lora_rank {
                        Some(r) => (d * r + r * q, r),
                        None => (d * q, 0),
                    };
                    let kv_path = d * (a.kv_lora_rank + a.qk_rope_dim)
                        + a.kv_lora_rank * cfg.n_heads * (a.qk_nope_dim + a.v_head_dim);
                    (q_path.0 + kv_path, q_path.1 + a.kv_lora_rank)
                }
                None => (d * (q + 2 * kv), 0),
            };
            let qkv_params = qkv_matrix + qkv_norms + if cfg.qkv_bias { q + 2 * kv } else { 0 };
            let out_in = cfg.attn_out_dim();
            let o_params = out_in * d + if cfg.out_bias { d } else { 0 };
            let n_in = if cfg.ffn.is_gated() { 2 } else { 1 };
            // one FFN of hidden width w: (params, forward FLOPs per token)
            let ffn = |w: usize| {
                let params = (n_in + 1) * d * w + if cfg.ffn_bias { n_in * w + d } else { 0 };
                (params, 2.0 * ((n_in + 1) * d * w) as f64)
            };
            entries.push(FlopEntry {
                dense_flops: 0.0,
                component: format!("{p}.attn.qkv"),
                flops: 2.0 * qkv_matrix as f64,
                params: qkv_params,
            });
            entries.push(FlopEntry {
                dense_flops: 0.0,
                component: format!("{p}.attn.scores"),
                // q·k over head_dim, then the weighted sum of values over their width
                flops: 2.0 * keys_seen(cfg.layer(l).window) * (q + out_in) as f64,
                params: 0,
            });
            entries.push(FlopEntry {
                dense_flops: 0.0,
                component: format!("{p}.attn.out"),
                flops: 2.0 * (out_in * d) as f64,
                params: o_params,
            });
            let ffn_params = match (cfg.layer(l).moe, &cfg.moe) {
                (true, Some(m)) => {
                    let router = m.slots() * d + if m.selection_bias { m.slots() } else { 0 };
                    let (expert_params, expert_flops) = ffn(m.d_expert);
                    let (shared_params, shared_flops) = if m.d_shared > 0 {
                        ffn(m.d_shared)
                    } else {
                        (0, 0.0)
                    };
                    let gate = if m.shared_gate { d } else { 0 };
                    entries.push(FlopEntry {
                        dense_flops: 0.0,
                        component: format!("{p}.moe.router"),
                        flops: 2.0 * (d * m.slots()) as f64,
                        params: router,
                    });
                    // with no-op experts an upper bound: a slot routed to one costs nothing
                    entries.push(FlopEntry {
                        dense_flops: 0.0,
                        component: format!("{p}.moe.experts"),
                        flops: m.top_k.min(m.n_experts) as f64 * expert_flops,
                        params: m.n_experts * expert_params,
                    });
                    if m.d_shared > 0 {
                        entries.push(FlopEntry {
                            dense_flops: 0.0,
                            component: format!("{p}.moe.shared"),
                            flops: shared_flops + 2.0 * gate as f64,
                            params: shared_params + gate,
                        });
                    }
                    inactive += m.n_experts.saturating_sub(m.top_k) * expert_params;
                    router + m.n_experts * expert_params + shared_params + gate
                }
                _ => {
                    let (params, flops) = ffn(cfg.d_ff);
                    entries.push(FlopEntry {
                        dense_flops: 0.0,
                        component: format!("{p}.ffn"),
                        flops,
                        params,
                    });
                    params
                }
            };
            for e in &mut entries[first..] {
                e.dense_flops = e.flops;
            }
            if capacity.is_some() {
                // per token of the sequence: the k processed tokens' cost spread over n, and
                // attention among the k tokens only
                let share = attended as f64 / seq_len.max(1) as f64;
                for e in &mut entries[first..] {
                    e.flops *= share;
                    if e.component.ends_with("attn.scores") {
                        e.flops *= keys_seen_n(cfg.layer(l).window, attended)
                            / keys_seen(cfg.layer(l).window);
                    }
                }
                entries.push(FlopEntry {
                    dense_flops: 0.0,
                    component: format!("{p}.depth.router"),
                    flops: 2.0 * d as f64,
                    params: d,
                });
                total += d;
                let h = cfg.depth.map_or(0, |dc| dc.predictor);
                if h > 0 {
                    // the predictor runs on every token (it decides at sampling time)
                    let params = h * d + h;
                    entries.push(FlopEntry {
                        dense_flops: 0.0,
                        component: format!("{p}.depth.predictor"),
                        flops: 2.0 * params as f64,
                        params,
                    });
                    total += params;
                }
            }
            let n_norms = match cfg.block {
                crate::config::BlockKind::ParallelSharedNorm => 1,
                _ => 2,
            } + if cfg.sandwich_norms { 2 } else { 0 };
            let qk_norm_params = match cfg.qk_norm {
                crate::config::QkNorm::None => 0,
                crate::config::QkNorm::PerHead => 2 * cfg.head_dim,
                crate::config::QkNorm::Full => q + kv,
            };
            total += qkv_params + o_params + ffn_params + n_norms * norm_params + qk_norm_params;
        }
        total += norm_params;
        let head_params = if cfg.tie_embeddings {
            0
        } else {
            cfg.vocab_size * d
        } + if cfg.head_bias { cfg.vocab_size } else { 0 };
        total += head_params;
        entries.push(FlopEntry {
            dense_flops: 2.0 * (d * cfg.vocab_size) as f64,
            component: "head".into(),
            flops: 2.0 * (d * cfg.vocab_size) as f64,
            params: head_params,
        });
        Self {
            seq_len,
            entries,
            total_params: total,
            active_params: total - inactive,
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

//! Gemma, Gemma 2 and Gemma 3 (text): Llama layout with `(1 + w)` RMSNorms, embeddings
//! scaled by `sqrt(d_model)`, GeGLU, tied head; Gemma 2 adds sandwich norms, soft-capping,
//! `query_pre_attn_scalar` and alternating sliding windows; Gemma 3 adds per-head q/k norms
//! and a separate rotary base for its sliding-window (local) layers.

use super::{llama, RawConfig, TensorMap};
use crate::config::{LayerSpec, ModelConfig, Position, QkNorm};
use crate::error::Result;
use crate::weights::Params;

pub fn config_gemma(raw: &RawConfig) -> ModelConfig {
    let mut c = llama::base(raw);
    c.norm_offset = 1.0;
    c.embed_scale = Some((c.d_model as f64).sqrt());
    c.tie_embeddings = raw.bool_or("tie_word_embeddings", true);
    c
}

pub fn config_gemma2(raw: &RawConfig) -> ModelConfig {
    let mut c = config_gemma(raw);
    c.sandwich_norms = true;
    c.attn_softcap = raw.opt_f64(&["attn_logit_softcapping"]);
    c.final_softcap = raw.opt_f64(&["final_logit_softcapping"]);
    c.attn_scale = raw
        .opt_f64(&["query_pre_attn_scalar"])
        .map(|s| 1.0 / s.sqrt());
    c
}

/// Gemma 3: the global layers' rotary settings from `rope_parameters.full_attention` (4.x:
/// top-level `rope_theta`, `rope_scaling`), the local layers' base from
/// `rope_parameters.sliding_attention` (4.x: `rope_local_base_freq`); local layers from
/// `layer_types` (4.x: every layer but each `sliding_window_pattern`-th).
pub fn config_gemma3(raw: &RawConfig) -> ModelConfig {
    let mut c = config_gemma2(raw);
    c.qk_norm = QkNorm::PerHead;
    let (theta, partial, scaling) = raw.rope(Some("full_attention"));
    c.position = Position::Rope {
        theta,
        rotary_dim: (c.head_dim as f64 * partial) as usize,
        scaling,
    };
    c.local_rope_theta = Some(if raw.has(&["rope_parameters", "sliding_attention"]) {
        raw.rope(Some("sliding_attention")).0
    } else {
        raw.f64_or(&["rope_local_base_freq"], 10_000.0)
    });
    let window = raw.opt_usize(&["sliding_window"]).filter(|&w| w > 0);
    let pattern = raw.opt_usize(&["sliding_window_pattern", "_sliding_window_pattern"]);
    if let (true, Some(w), Some(p)) = (c.layers.is_empty(), window, pattern) {
        c.layers = (0..c.n_layers)
            .map(|l| LayerSpec {
                window: (!(l + 1).is_multiple_of(p.max(1))).then_some(w),
                ..LayerSpec::default()
            })
            .collect();
    }
    c
}

/// Gemma 2's norm names: its `post_attention_layernorm` normalises the attention output
/// (our `attn_out_norm`) and `pre_feedforward_layernorm` is the pre-FFN norm.
pub fn tensors_gemma2(cfg: &ModelConfig, map: &mut TensorMap) -> Result<Params> {
    let mut out = Params::new();
    for l in 0..cfg.n_layers {
        let p = format!("model.layers.{l}");
        map.rename(
            &mut out,
            &format!("{p}.post_attention_layernorm.weight"),
            &format!("{p}.attn_out_norm.weight"),
        );
        map.rename(
            &mut out,
            &format!("{p}.pre_feedforward_layernorm.weight"),
            &format!("{p}.post_attention_layernorm.weight"),
        );
        map.rename(
            &mut out,
            &format!("{p}.post_feedforward_layernorm.weight"),
            &format!("{p}.ffn_out_norm.weight"),
        );
    }
    map.take_opt("lm_head.weight");
    map.take_canonical(cfg, &mut out);
    Ok(out)
}

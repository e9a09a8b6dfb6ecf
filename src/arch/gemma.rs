//! Gemma, Gemma 2 and Gemma 3 (text): Llama layout with `(1 + w)` RMSNorms, embeddings
//! scaled by `sqrt(d_model)`, GeGLU, tied head; Gemma 2 adds sandwich norms, soft-capping,
//! `query_pre_attn_scalar` and alternating sliding windows; Gemma 3 adds per-head q/k norms
//! and a separate rotary base for its sliding-window (local) layers.

use super::llama::{self, Windows};
use super::{RawConfig, TensorMap};
use crate::config::{ModelConfig, Position, QkNorm};
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
    c.layers = llama::windows(raw, c.n_layers, Windows::Pattern(2));
    c.sandwich_norms = true;
    c.attn_softcap = raw.opt_f64(&["attn_logit_softcapping"]);
    c.final_softcap = raw.opt_f64(&["final_logit_softcapping"]);
    c.attn_scale = raw
        .opt_f64(&["query_pre_attn_scalar"])
        .map(|s| 1.0 / s.sqrt());
    c
}

/// Gemma 3: the global layers' rotary settings from `rope_parameters.full_attention` (4.x:
/// top-level `rope_theta`, `rope_scaling`), the local layers' from
/// `rope_parameters.sliding_attention` (4.x: base `rope_local_base_freq`, no scaling); local
/// layers from `layer_types` (4.x: every layer but each `sliding_window_pattern`-th, 6 by
/// default).
pub fn config_gemma3(raw: &RawConfig) -> ModelConfig {
    let mut c = config_gemma2(raw);
    c.qk_norm = QkNorm::PerHead;
    let pattern = raw
        .opt_usize(&["sliding_window_pattern", "_sliding_window_pattern"])
        .unwrap_or(6);
    c.layers = llama::windows(raw, c.n_layers, Windows::Pattern(pattern));
    if raw.bool_or("use_bidirectional_attention", false) {
        raw.problem("use_bidirectional_attention (an embedding model) is not supported".into());
    }
    let (theta, partial, scaling) = raw.rope(Some("full_attention"));
    // Gemma 3's own default global base
    let stated =
        raw.has(&["rope_theta"]) || raw.has(&["rope_parameters", "full_attention", "rope_theta"]);
    let theta = if stated { theta } else { 1_000_000.0 };
    c.position = Position::Rope {
        theta,
        rotary_dim: (c.head_dim as f64 * partial) as usize,
        scaling,
    };
    if raw.has(&["rope_parameters", "sliding_attention"]) {
        let (theta, _, scaling) = raw.rope(Some("sliding_attention"));
        c.local_rope_theta = Some(theta);
        c.local_rope_scaling = scaling;
    } else {
        c.local_rope_theta = Some(raw.f64_or(&["rope_local_base_freq"], 10_000.0));
    }
    c
}

/// Gemma 3 with its vision tower (`Gemma3ForConditionalGeneration`): the language model's
/// config under `text_config`. Only the text model runs; the vision tower and the
/// multimodal projector are skipped at load (said on stderr).
pub fn config_gemma3_multimodal(raw: &RawConfig) -> ModelConfig {
    // image-token ids and the vision side: what the skipped vision tower uses
    raw.acknowledge(&[
        "vision_config",
        "boi_token_index",
        "eoi_token_index",
        "image_token_index",
        "mm_tokens_per_image",
        "tie_word_embeddings",
    ]);
    match raw.nested("text_config") {
        Some(text) => {
            let c = config_gemma3(&text);
            raw.absorb("text_config", &text);
            c
        }
        None => {
            raw.problem("text_config (the language model's config) is required".into());
            ModelConfig::default()
        }
    }
}

/// The language model's tensors under `language_model.model.` (transformers 5 also
/// writes `model.language_model.`), its head under `language_model.lm_head.` or `lm_head.`.
pub fn tensors_gemma3_multimodal(cfg: &ModelConfig, map: &mut TensorMap) -> Result<Params> {
    let skipped: usize = [
        "vision_tower.",
        "multi_modal_projector.",
        "model.vision_tower.",
        "model.multi_modal_projector.",
    ]
    .iter()
    .map(|p| map.skip_prefix(p))
    .sum();
    if skipped > 0 {
        tracing::warn!(
            "{}: the vision tower and projector ({skipped} tensors) are skipped; routelm runs the text model",
            map.origin.display()
        );
    }
    map.move_prefix("language_model.model.", "model.");
    map.move_prefix("model.language_model.", "model.");
    map.move_prefix("language_model.lm_head.", "lm_head.");
    tensors_gemma2(cfg, map)
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

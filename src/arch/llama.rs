//! Llama (1–3) and Mistral, and the base that Llama-shaped families (Qwen, Gemma, Phi-3)
//! adjust: `config.json` keys of the Llama layout, and tensor names that already are ours.

use super::{RawConfig, TensorMap};
use crate::config::{FfnKind, LayerSpec, ModelConfig, NormKind, Position};
use crate::error::Result;
use crate::weights::Params;

/// The FFN kind for a Hugging Face activation name.
pub(crate) fn ffn_kind(raw: &RawConfig, gated: bool) -> FfnKind {
    let act = raw
        .str(&["hidden_act", "hidden_activation", "activation_function"])
        .unwrap_or("silu");
    match (act, gated) {
        ("silu" | "swish", true) => FfnKind::Swiglu,
        ("gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" | "gelu", true) => FfnKind::Geglu,
        ("gelu_pytorch_tanh" | "gelu_new" | "gelu_fast", false) => FfnKind::Gelu,
        ("gelu", false) => FfnKind::GeluExact,
        ("relu", false) => FfnKind::Relu,
        _ => {
            raw.problem(format!(
                "activation '{act}' is not supported for this family"
            ));
            FfnKind::Swiglu
        }
    }
}

/// Per-layer sliding windows from `sliding_window`, `use_sliding_window` and `layer_types`.
pub(crate) fn windows(raw: &RawConfig, n_layers: usize) -> Vec<LayerSpec> {
    let Some(w) = raw.opt_usize(&["sliding_window"]).filter(|&w| w > 0) else {
        return Vec::new();
    };
    if !raw.bool_or("use_sliding_window", true) {
        return Vec::new();
    }
    match raw.str_list("layer_types") {
        Some(types) => types
            .iter()
            .map(|t| LayerSpec {
                window: (t == "sliding_attention").then_some(w),
                moe: false,
                routed: false,
            })
            .collect(),
        None => vec![
            LayerSpec {
                window: Some(w),
                moe: false,
                routed: false
            };
            n_layers
        ],
    }
}

/// The Llama-layout config every Llama-shaped family starts from.
pub(crate) fn base(raw: &RawConfig) -> ModelConfig {
    let d_model = raw.usize(&["hidden_size"]);
    let n_layers = raw.usize(&["num_hidden_layers"]);
    let n_heads = raw.usize(&["num_attention_heads"]);
    let head_dim = raw
        .opt_usize(&["head_dim"])
        .unwrap_or(d_model.checked_div(n_heads).unwrap_or(0));
    let (theta, partial, scaling) = raw.rope(None);
    let attention_bias = raw.bool_or("attention_bias", false);
    ModelConfig {
        vocab_size: raw.usize(&["vocab_size"]),
        d_model,
        n_layers,
        n_heads,
        n_kv_heads: raw.opt_usize(&["num_key_value_heads"]).unwrap_or(n_heads),
        head_dim,
        d_ff: raw.usize(&["intermediate_size"]),
        max_seq_len: raw.opt_usize(&["max_position_embeddings"]).unwrap_or(2048),
        norm: NormKind::RmsNorm,
        norm_eps: raw.f64_or(&["rms_norm_eps"], 1e-6),
        norm_bias: false,
        ffn: ffn_kind(raw, true),
        ffn_bias: raw.bool_or("mlp_bias", false),
        qkv_bias: attention_bias,
        out_bias: attention_bias,
        position: Position::Rope {
            theta,
            rotary_dim: (head_dim as f64 * partial) as usize,
            scaling,
        },
        tie_embeddings: raw.bool_or("tie_word_embeddings", false),
        init_std: raw.f64_or(&["initializer_range"], 0.02),
        layers: windows(raw, n_layers),
        ..ModelConfig::default()
    }
}

/// The Llama-layout base with LayerNorms (with bias, `layer_norm_eps`) and a plain biased
/// FFN, as GPT-NeoX and Phi use.
pub(crate) fn layer_norm_base(raw: &RawConfig) -> ModelConfig {
    let mut c = base(raw);
    c.norm = NormKind::LayerNorm;
    c.norm_bias = true;
    c.norm_eps = raw.f64_or(&["layer_norm_eps"], 1e-5);
    c.ffn = ffn_kind(raw, false);
    c.ffn_bias = true;
    c
}

pub fn config(raw: &RawConfig) -> ModelConfig {
    base(raw)
}

/// Llama-layout checkpoints already use our names; a tied head may still be stored.
pub fn tensors(cfg: &ModelConfig, map: &mut TensorMap) -> Result<Params> {
    let mut out = Params::new();
    if cfg.tie_embeddings {
        map.take_opt("lm_head.weight");
    }
    map.take_canonical(cfg, &mut out);
    Ok(out)
}

//! Llama (1–3) and Mistral, and the base that Llama-shaped families (Qwen, Gemma, Phi-3)
//! adjust: `config.json` keys of the Llama layout, and tensor names that already are ours.

use super::{RawConfig, TensorMap};
use crate::config::{FfnKind, LayerSpec, ModelConfig, NormKind, Position, RopeScaling};
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

/// Which layers of a family use `sliding_window`, as transformers decides it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Windows {
    /// Every layer (Mistral, Mixtral, Phi-3, PhiMoE).
    Every,
    /// Every layer when `use_sliding_window` (default false; Qwen3-MoE).
    EveryIfUsed,
    /// `layer_types`, else when `use_sliding_window` (default false) the layers from
    /// `max_window_layers` (default 28) on (Qwen2, Qwen3).
    FromMaxWindowLayers,
    /// `layer_types`, else when `use_sliding_window` (default false) the even-indexed layers
    /// below `max_window_layers` (default 28) (Qwen2-MoE).
    EvenBelowMaxWindowLayers,
    /// `layer_types`, else every layer but each `n`-th (Gemma 2: 2; Gemma 3:
    /// `sliding_window_pattern`, default 6).
    Pattern(usize),
}

/// Per-layer sliding windows from `sliding_window` (and `layer_types`,
/// `use_sliding_window`, `max_window_layers`) by the family's rule.
pub(crate) fn windows(raw: &RawConfig, n_layers: usize, rule: Windows) -> Vec<LayerSpec> {
    // every key of the rule is read, used or not, so none is refused as unknown
    let used = raw.bool_or("use_sliding_window", false);
    let max_window_layers = raw.opt_usize(&["max_window_layers"]).unwrap_or(28);
    let types = raw.str_list("layer_types");
    let Some(w) = raw.opt_usize(&["sliding_window"]).filter(|&w| w > 0) else {
        return Vec::new();
    };
    // Qwen's configs drop the window altogether unless `use_sliding_window`
    if matches!(
        rule,
        Windows::FromMaxWindowLayers | Windows::EvenBelowMaxWindowLayers | Windows::EveryIfUsed
    ) && !used
    {
        return Vec::new();
    }
    let types = match rule {
        Windows::Every | Windows::EveryIfUsed => None,
        _ => types,
    };
    let sliding: Vec<bool> = match (types, rule) {
        (Some(types), _) => {
            if types.len() != n_layers {
                raw.problem(format!(
                    "layer_types has {} entries for {n_layers} layers",
                    types.len()
                ));
            }
            types.iter().map(|t| t == "sliding_attention").collect()
        }
        (None, Windows::Every) => vec![true; n_layers],
        (None, Windows::EveryIfUsed) => vec![true; n_layers],
        (None, Windows::FromMaxWindowLayers) => {
            (0..n_layers).map(|l| l >= max_window_layers).collect()
        }
        (None, Windows::EvenBelowMaxWindowLayers) => (0..n_layers)
            .map(|l| l < max_window_layers && l % 2 == 0)
            .collect(),
        (None, Windows::Pattern(n)) => (0..n_layers)
            .map(|l| !(l + 1).is_multiple_of(n.max(1)))
            .collect(),
    };
    sliding
        .into_iter()
        .map(|s| LayerSpec {
            window: s.then_some(w),
            ..Default::default()
        })
        .collect()
}

/// The context window: `max_position_embeddings`, or `factor` times it with dynamic NTK
/// scaling, which exists to run past the trained length.
pub(crate) fn context(raw: &RawConfig, scaling: &RopeScaling) -> usize {
    let max = raw.opt_usize(&["max_position_embeddings"]).unwrap_or(2048);
    match scaling {
        RopeScaling::Dynamic { factor, .. } => (max as f64 * factor.max(1.0)) as usize,
        _ => max,
    }
}

/// The Llama-layout config every Llama-shaped family starts from.
pub(crate) fn base(raw: &RawConfig) -> ModelConfig {
    let d_model = raw.usize(&["hidden_size"]);
    let n_layers = raw.layers(&["num_hidden_layers"]);
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
        max_seq_len: context(raw, &scaling),
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

/// Llama has no sliding window; Mistral uses `sliding_window` in every layer.
pub fn config(raw: &RawConfig) -> ModelConfig {
    let mut c = base(raw);
    if raw.model_type().as_deref() == Some("mistral") {
        c.layers = windows(raw, c.n_layers, Windows::Every);
    }
    c
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

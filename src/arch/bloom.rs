//! BLOOM: ALiBi position biases instead of any position embedding, a LayerNorm on the token
//! embeddings, biased LayerNorms and projections, tanh-GELU FFN of width `4·d_model`, tied
//! head. Its layers are named as GPT-NeoX's (the fused `query_key_value` interleaved per
//! head) but for the attention module. Checkpoints name tensors with or without the
//! `transformer.` prefix.

use super::{gpt_neox, RawConfig, TensorMap};
use crate::config::{FfnKind, ModelConfig, NormKind, Position};
use crate::error::Result;
use crate::weights::Params;

pub fn config(raw: &RawConfig) -> ModelConfig {
    let d_model = raw.usize(&["hidden_size", "n_embed"]);
    let n_heads = raw.usize(&["n_head", "num_attention_heads"]);
    if raw.bool_or("apply_residual_connection_post_layernorm", false) {
        raw.problem("apply_residual_connection_post_layernorm is not supported".into());
    }
    ModelConfig {
        vocab_size: raw.usize(&["vocab_size"]),
        d_model,
        n_layers: raw.layers(&["n_layer", "num_hidden_layers"]),
        n_heads,
        n_kv_heads: n_heads,
        head_dim: d_model.checked_div(n_heads).unwrap_or(0),
        d_ff: 4 * d_model,
        // ALiBi has no trained length; this only bounds the KV cache
        max_seq_len: raw
            .opt_usize(&["seq_length", "max_position_embeddings"])
            .unwrap_or(2048),
        norm: NormKind::LayerNorm,
        norm_eps: raw.f64_or(&["layer_norm_epsilon"], 1e-5),
        norm_bias: true,
        ffn: FfnKind::Gelu,
        ffn_bias: true,
        qkv_bias: true,
        out_bias: true,
        position: Position::Alibi,
        tie_embeddings: raw.bool_or("tie_word_embeddings", true),
        init_std: raw.f64_or(&["initializer_range"], 0.02),
        embed_norm: true,
        ..ModelConfig::default()
    }
}

pub fn tensors(cfg: &ModelConfig, map: &mut TensorMap) -> Result<Params> {
    let mut out = Params::new();
    let pre = if map.has("transformer.word_embeddings.weight") {
        "transformer."
    } else {
        ""
    };
    for l in 0..cfg.n_layers {
        let (g, p) = (format!("{pre}h.{l}"), format!("model.layers.{l}"));
        gpt_neox::layer_tensors(cfg, map, &mut out, (&g, &p), "self_attention")?;
    }
    for kind in ["weight", "bias"] {
        map.rename(
            &mut out,
            &format!("{pre}word_embeddings_layernorm.{kind}"),
            &format!("model.embed_norm.{kind}"),
        );
        map.rename(
            &mut out,
            &format!("{pre}ln_f.{kind}"),
            &format!("model.norm.{kind}"),
        );
    }
    map.rename(
        &mut out,
        &format!("{pre}word_embeddings.weight"),
        "model.embed_tokens.weight",
    );
    if cfg.tie_embeddings {
        map.take_opt("lm_head.weight");
    } else {
        map.rename(&mut out, "lm_head.weight", "lm_head.weight");
    }
    Ok(out)
}

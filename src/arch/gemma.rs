//! Gemma and Gemma 2: Llama layout with `(1 + w)` RMSNorms, embeddings scaled by
//! `sqrt(d_model)`, GeGLU, tied head; Gemma 2 adds sandwich norms, soft-capping,
//! `query_pre_attn_scalar` and alternating sliding windows.

use super::{llama, RawConfig, TensorMap};
use crate::config::ModelConfig;
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

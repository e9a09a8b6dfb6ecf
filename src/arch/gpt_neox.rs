//! GPT-NeoX (Pythia): parallel residual (or sequential), rotary on `rotary_pct` of each
//! head, exact GELU, LayerNorms and projections with biases, untied `embed_out`. The fused
//! `query_key_value` is interleaved per head (`[h, 3, d]` rows) and split at load.

use super::{llama, RawConfig, TensorMap};
use crate::config::{BlockKind, ModelConfig};
use crate::error::Result;
use crate::weights::Params;

pub fn config(raw: &RawConfig) -> ModelConfig {
    let mut c = llama::layer_norm_base(raw);
    c.qkv_bias = raw.bool_or("attention_bias", true);
    c.out_bias = c.qkv_bias;
    c.block = if raw.bool_or("use_parallel_residual", true) {
        BlockKind::Parallel
    } else {
        BlockKind::Sequential
    };
    c
}

pub fn tensors(cfg: &ModelConfig, map: &mut TensorMap) -> Result<Params> {
    let mut out = Params::new();
    for l in 0..cfg.n_layers {
        let (g, p) = (format!("gpt_neox.layers.{l}"), format!("model.layers.{l}"));
        for kind in ["weight", "bias"] {
            map.unfuse_heads(
                &mut out,
                &format!("{g}.attention.query_key_value.{kind}"),
                ["q_proj", "k_proj", "v_proj"].map(|n| format!("{p}.self_attn.{n}.{kind}")),
                cfg.n_heads,
                cfg.head_dim,
            )?;
            for (from, to) in [
                ("attention.dense", "self_attn.o_proj"),
                ("mlp.dense_h_to_4h", "mlp.up_proj"),
                ("mlp.dense_4h_to_h", "mlp.down_proj"),
                ("input_layernorm", "input_layernorm"),
                ("post_attention_layernorm", "post_attention_layernorm"),
            ] {
                map.rename(
                    &mut out,
                    &format!("{g}.{from}.{kind}"),
                    &format!("{p}.{to}.{kind}"),
                );
            }
        }
        // rotary caches and masks some exports carry are not weights
        for buf in [
            "attention.rotary_emb.inv_freq",
            "attention.bias",
            "attention.masked_bias",
        ] {
            map.take_opt(&format!("{g}.{buf}"));
        }
    }
    for kind in ["weight", "bias"] {
        map.rename(
            &mut out,
            &format!("gpt_neox.final_layer_norm.{kind}"),
            &format!("model.norm.{kind}"),
        );
    }
    map.rename(
        &mut out,
        "gpt_neox.embed_in.weight",
        "model.embed_tokens.weight",
    );
    if cfg.tie_embeddings {
        map.take_opt("embed_out.weight");
    } else {
        map.rename(&mut out, "embed_out.weight", "lm_head.weight");
    }
    Ok(out)
}

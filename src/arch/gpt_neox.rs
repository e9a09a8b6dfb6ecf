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

/// One layer in GPT-NeoX's names, which BLOOM shares but for its attention module's
/// name (`attn`): the per-head fused `query_key_value`, `dense`, the h→4h and 4h→h FFN and
/// two LayerNorms, weights and biases, from file layer `g` to canonical layer `p`.
pub(crate) fn layer_tensors(
    cfg: &ModelConfig,
    map: &mut TensorMap,
    out: &mut Params,
    (g, p): (&str, &str),
    attn: &str,
) -> Result<()> {
    for kind in ["weight", "bias"] {
        map.unfuse_heads(
            out,
            &format!("{g}.{attn}.query_key_value.{kind}"),
            ["q_proj", "k_proj", "v_proj"].map(|n| format!("{p}.self_attn.{n}.{kind}")),
            cfg.n_heads,
            cfg.head_dim,
        )?;
        for (from, to) in [
            (format!("{attn}.dense"), "self_attn.o_proj"),
            ("mlp.dense_h_to_4h".into(), "mlp.up_proj"),
            ("mlp.dense_4h_to_h".into(), "mlp.down_proj"),
            ("input_layernorm".into(), "input_layernorm"),
            (
                "post_attention_layernorm".into(),
                "post_attention_layernorm",
            ),
        ] {
            map.rename(
                out,
                &format!("{g}.{from}.{kind}"),
                &format!("{p}.{to}.{kind}"),
            );
        }
    }
    Ok(())
}

pub fn tensors(cfg: &ModelConfig, map: &mut TensorMap) -> Result<Params> {
    let mut out = Params::new();
    for l in 0..cfg.n_layers {
        let (g, p) = (format!("gpt_neox.layers.{l}"), format!("model.layers.{l}"));
        layer_tensors(cfg, map, &mut out, (&g, &p), "attention")?;
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

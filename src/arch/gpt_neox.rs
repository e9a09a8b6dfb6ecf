//! GPT-NeoX (Pythia): parallel residual (or sequential), rotary on `rotary_pct` of each
//! head, exact GELU, LayerNorms and projections with biases, untied `embed_out`. The fused
//! `query_key_value` is interleaved per head (`[h, 3, d]` rows) and split at load.

use candle_core::Tensor;

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

/// Rows of the fused tensor viewed as `[h, 3, d, ..]` → (q, k, v), each `[h·d, ..]`.
pub(crate) fn unfuse(t: &Tensor, h: usize, d: usize) -> Result<[Tensor; 3]> {
    let rest: Vec<usize> = t.dims()[1..].to_vec();
    let mut shape = vec![h, 3, d];
    shape.extend(&rest);
    let t = t.reshape(shape)?;
    let mut flat = vec![h * d];
    flat.extend(&rest);
    let part = |i: usize| -> Result<Tensor> {
        Ok(t.narrow(1, i, 1)?.contiguous()?.reshape(flat.as_slice())?)
    };
    Ok([part(0)?, part(1)?, part(2)?])
}

pub fn tensors(cfg: &ModelConfig, map: &mut TensorMap) -> Result<Params> {
    let mut out = Params::new();
    for l in 0..cfg.n_layers {
        let (g, p) = (format!("gpt_neox.layers.{l}"), format!("model.layers.{l}"));
        for kind in ["weight", "bias"] {
            if let Some(t) = map.take(&format!("{g}.attention.query_key_value.{kind}")) {
                for (name, part) in ["q_proj", "k_proj", "v_proj"].iter().zip(unfuse(
                    &t,
                    cfg.n_heads,
                    cfg.head_dim,
                )?) {
                    out.insert(format!("{p}.self_attn.{name}.{kind}"), part);
                }
            }
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

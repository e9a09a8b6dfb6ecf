//! GPT-2: learned positions, LayerNorms with bias, GELU (tanh) MLP, biases everywhere,
//! tied head; weights are `Conv1D` (stored `[in, out]`, transposed at load) and the
//! attention projections are fused in `c_attn`.

use super::{RawConfig, TensorMap};
use crate::config::{ModelConfig, NormKind, Position};
use crate::error::Result;
use crate::weights::Params;

pub fn config(raw: &RawConfig) -> ModelConfig {
    let d_model = raw.usize(&["n_embd", "hidden_size"]);
    let n_heads = raw.usize(&["n_head", "num_attention_heads"]);
    let n_layers = raw.layers(&["n_layer", "num_hidden_layers"]);
    let c = ModelConfig {
        vocab_size: raw.usize(&["vocab_size"]),
        d_model,
        n_layers,
        n_heads,
        n_kv_heads: n_heads,
        head_dim: d_model.checked_div(n_heads).unwrap_or(0),
        d_ff: raw.opt_usize(&["n_inner"]).unwrap_or(4 * d_model),
        max_seq_len: raw.usize(&["n_positions", "max_position_embeddings"]),
        norm: NormKind::LayerNorm,
        norm_eps: raw.f64_or(&["layer_norm_epsilon"], 1e-5),
        norm_bias: true,
        ffn: super::llama::ffn_kind(raw, false),
        ffn_bias: true,
        qkv_bias: true,
        out_bias: true,
        position: Position::Learned,
        tie_embeddings: raw.bool_or("tie_word_embeddings", true),
        init_std: raw.f64_or(&["initializer_range"], 0.02),
        layers: Vec::new(),
        attn_scale: if raw.bool_or("scale_attn_weights", true) {
            None
        } else {
            Some(1.0)
        },
        ..ModelConfig::default()
    };
    if raw.bool_or("scale_attn_by_inverse_layer_idx", false) {
        raw.problem(
            "scale_attn_by_inverse_layer_idx true is not supported (a per-layer attention scale)"
                .into(),
        );
    }
    // attention computed in float32 with the scale folded in: what routelm does anyway
    raw.acknowledge(&["reorder_and_upcast_attn"]);
    c
}

pub fn tensors(cfg: &ModelConfig, map: &mut TensorMap) -> Result<Params> {
    let mut out = Params::new();
    let d = cfg.d_model;
    // Conv1D stores [in, out]: transpose to our [out, in]
    let conv =
        |map: &mut TensorMap, out: &mut Params, from: &str, to: &[(&str, usize)]| -> Result<()> {
            for (kind, transposed) in [("weight", true), ("bias", false)] {
                let parts: Vec<(String, usize)> = to
                    .iter()
                    .map(|(name, n)| (format!("{name}.{kind}"), *n))
                    .collect();
                map.split_rows(out, &format!("{from}.{kind}"), &parts, transposed)?;
            }
            Ok(())
        };
    for l in 0..cfg.n_layers {
        let (h, p) = (format!("transformer.h.{l}"), format!("model.layers.{l}"));
        let (q, k, v) = (
            format!("{p}.self_attn.q_proj"),
            format!("{p}.self_attn.k_proj"),
            format!("{p}.self_attn.v_proj"),
        );
        conv(
            map,
            &mut out,
            &format!("{h}.attn.c_attn"),
            &[(&q, d), (&k, d), (&v, d)],
        )?;
        conv(
            map,
            &mut out,
            &format!("{h}.attn.c_proj"),
            &[(&format!("{p}.self_attn.o_proj"), d)],
        )?;
        conv(
            map,
            &mut out,
            &format!("{h}.mlp.c_fc"),
            &[(&format!("{p}.mlp.up_proj"), cfg.d_ff)],
        )?;
        conv(
            map,
            &mut out,
            &format!("{h}.mlp.c_proj"),
            &[(&format!("{p}.mlp.down_proj"), d)],
        )?;
        // the causal-mask buffers older exports carry are not weights
        map.take_opt(&format!("{h}.attn.bias"));
        map.take_opt(&format!("{h}.attn.masked_bias"));
    }
    let mut norm = |from: &str, to: &str| {
        for kind in ["weight", "bias"] {
            map.rename(&mut out, &format!("{from}.{kind}"), &format!("{to}.{kind}"));
        }
    };
    for l in 0..cfg.n_layers {
        norm(
            &format!("transformer.h.{l}.ln_1"),
            &format!("model.layers.{l}.input_layernorm"),
        );
        norm(
            &format!("transformer.h.{l}.ln_2"),
            &format!("model.layers.{l}.post_attention_layernorm"),
        );
    }
    norm("transformer.ln_f", "model.norm");
    map.rename(
        &mut out,
        "transformer.wte.weight",
        "model.embed_tokens.weight",
    );
    map.rename(
        &mut out,
        "transformer.wpe.weight",
        "model.embed_positions.weight",
    );
    if cfg.tie_embeddings {
        map.take_opt("lm_head.weight");
    } else {
        map.rename(&mut out, "lm_head.weight", "lm_head.weight");
    }
    Ok(out)
}

//! T5 (v1.0 and v1.1) and mT5: the encoder-decoder family. `config.json` keys and tensor
//! names → a [`ModelConfig`] with an encoder (`encoder_layers`), relative positions and
//! cross-attention, and the canonical names of its parameter table.

use super::{RawConfig, TensorMap};
use crate::config::{FfnKind, ModelConfig, NormKind, Position};
use crate::error::Result;
use crate::weights::Params;

/// `model_type` values of this family.
pub const MODEL_TYPES: &[&str] = &["t5", "mt5"];

/// transformers 5 writes `tie_word_embeddings: true` for every T5 but keeps a stored
/// `lm_head.weight` untied, and names the output scaling `scale_decoder_outputs`; 4.x
/// scaled exactly when `tie_word_embeddings` was not false. So the head is tied exactly
/// when the weights carry none (read from the folder's safetensors headers; without
/// weight files, the 4.x rule).
pub fn config(raw: &RawConfig) -> ModelConfig {
    let proj = raw
        .str(&["feed_forward_proj"])
        .unwrap_or("relu")
        .to_string();
    let ffn = match proj.as_str() {
        "relu" => FfnKind::Relu,
        "gated-gelu" => FfnKind::Geglu,
        "gated-silu" => FfnKind::Swiglu,
        other => {
            raw.problem(format!(
                "feed_forward_proj '{other}' is not supported (relu, gated-gelu, gated-silu)"
            ));
            FfnKind::Relu
        }
    };
    // transformers derives these two from feed_forward_proj on load
    raw.acknowledge(&["dense_act_fn", "is_gated_act"]);
    let tie_key = raw.bool_or("tie_word_embeddings", true);
    let has_head = raw
        .path()
        .parent()
        .and_then(|dir| super::stored_names(dir).ok())
        .map(|names| names.contains("lm_head.weight"));
    let d_model = raw.usize(&["d_model"]);
    let n_heads = raw.usize(&["num_heads"]);
    let encoder_layers = raw.layers(&["num_layers"]);
    ModelConfig {
        vocab_size: raw.usize(&["vocab_size"]),
        d_model,
        n_layers: raw
            .opt_layers(&["num_decoder_layers"])
            .unwrap_or(encoder_layers),
        n_heads,
        n_kv_heads: n_heads,
        head_dim: raw.usize(&["d_kv"]),
        d_ff: raw.usize(&["d_ff"]),
        max_seq_len: raw.opt_usize(&["n_positions"]).unwrap_or(512),
        norm: NormKind::RmsNorm,
        norm_eps: raw.f64_or(&["layer_norm_epsilon"], 1e-6),
        ffn,
        position: Position::Relative {
            buckets: raw
                .opt_usize(&["relative_attention_num_buckets"])
                .unwrap_or(32),
            max_distance: raw
                .opt_usize(&["relative_attention_max_distance"])
                .unwrap_or(128),
        },
        tie_embeddings: has_head.map_or(tie_key, |h| !h),
        init_std: raw.f64_or(&["initializer_factor"], 1.0),
        // T5 folds the score scale into its query weights
        attn_scale: Some(1.0),
        encoder_layers,
        decoder_start: Some(
            raw.opt_usize(&["decoder_start_token_id", "pad_token_id"])
                .unwrap_or(0) as u32,
        ),
        output_scale: raw
            .bool_or("scale_decoder_outputs", tie_key)
            .then(|| (d_model as f64).powf(-0.5)),
        ..Default::default()
    }
}

/// T5's names: `shared`, `{encoder,decoder}.block.L.layer.N.{SelfAttention,EncDecAttention,
/// DenseReluDense}`, the relative-position table in block 0, `final_layer_norm`.
pub fn tensors(cfg: &ModelConfig, map: &mut TensorMap) -> Result<Params> {
    let mut out = Params::new();
    map.rename(&mut out, "shared.weight", "model.embed_tokens.weight");
    // copies of the shared embedding some exports carry
    map.take_opt("encoder.embed_tokens.weight");
    map.take_opt("decoder.embed_tokens.weight");
    if !cfg.tie_embeddings {
        map.rename(&mut out, "lm_head.weight", "lm_head.weight");
    }
    let ffn_names: &[(&str, &str)] = if cfg.ffn.is_gated() {
        &[
            ("wi_0", "gate_proj"),
            ("wi_1", "up_proj"),
            ("wo", "down_proj"),
        ]
    } else {
        &[("wi", "up_proj"), ("wo", "down_proj")]
    };
    for (stack, ours, n) in [
        ("encoder", "model.encoder", cfg.encoder_layers),
        ("decoder", "model", cfg.n_layers),
    ] {
        map.rename(
            &mut out,
            &format!("{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
            &format!("{ours}.relative_bias.weight"),
        );
        map.rename(
            &mut out,
            &format!("{stack}.final_layer_norm.weight"),
            &format!("{ours}.norm.weight"),
        );
        for l in 0..n {
            let (b, p) = (
                format!("{stack}.block.{l}.layer"),
                format!("{ours}.layers.{l}"),
            );
            let mut attn = |from: &str, to: &str| {
                for (w, proj) in [
                    ("q", "q_proj"),
                    ("k", "k_proj"),
                    ("v", "v_proj"),
                    ("o", "o_proj"),
                ] {
                    map.rename(
                        &mut out,
                        &format!("{b}.{from}.{w}.weight"),
                        &format!("{p}.{to}.{proj}.weight"),
                    );
                }
            };
            attn("0.SelfAttention", "self_attn");
            let ffn_layer = if stack == "decoder" {
                attn("1.EncDecAttention", "cross_attn");
                map.rename(
                    &mut out,
                    &format!("{b}.1.layer_norm.weight"),
                    &format!("{p}.cross_attn_layernorm.weight"),
                );
                2
            } else {
                1
            };
            map.rename(
                &mut out,
                &format!("{b}.0.layer_norm.weight"),
                &format!("{p}.input_layernorm.weight"),
            );
            map.rename(
                &mut out,
                &format!("{b}.{ffn_layer}.layer_norm.weight"),
                &format!("{p}.post_attention_layernorm.weight"),
            );
            for (from, to) in ffn_names {
                map.rename(
                    &mut out,
                    &format!("{b}.{ffn_layer}.DenseReluDense.{from}.weight"),
                    &format!("{p}.mlp.{to}.weight"),
                );
            }
        }
    }
    Ok(out)
}

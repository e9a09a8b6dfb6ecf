//! T5 (v1.0 and v1.1) and mT5: the encoder-decoder family. `config.json` keys and tensor
//! names → [`Seq2SeqConfig`] and the canonical names of [`seq2seq_param_specs`].

use super::{RawConfig, TensorMap};
use crate::config::FfnKind;
use crate::error::Result;
use crate::model::seq2seq::Seq2SeqConfig;
use crate::weights::Params;

/// `model_type` values of this family.
pub const MODEL_TYPES: &[&str] = &["t5", "mt5"];

/// `has_lm_head`: whether the weights carry their own `lm_head.weight`. transformers 5
/// writes `tie_word_embeddings: true` for every T5 but keeps a stored head untied, and
/// names the output scaling `scale_decoder_outputs`; 4.x scaled exactly when
/// `tie_word_embeddings` was not false.
pub fn config(raw: &RawConfig, has_lm_head: bool) -> Seq2SeqConfig {
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
    let encoder_layers = raw.usize(&["num_layers"]);
    let tie_key = raw.bool_or("tie_word_embeddings", true);
    Seq2SeqConfig {
        vocab_size: raw.usize(&["vocab_size"]),
        d_model: raw.usize(&["d_model"]),
        n_heads: raw.usize(&["num_heads"]),
        head_dim: raw.usize(&["d_kv"]),
        d_ff: raw.usize(&["d_ff"]),
        encoder_layers,
        decoder_layers: raw
            .opt_usize(&["num_decoder_layers"])
            .unwrap_or(encoder_layers),
        ffn,
        norm_eps: raw.f64_or(&["layer_norm_epsilon"], 1e-6),
        buckets: raw
            .opt_usize(&["relative_attention_num_buckets"])
            .unwrap_or(32),
        max_distance: raw
            .opt_usize(&["relative_attention_max_distance"])
            .unwrap_or(128),
        tie_embeddings: !has_lm_head,
        scale_output: raw.bool_or("scale_decoder_outputs", tie_key),
        decoder_start: raw
            .opt_usize(&["decoder_start_token_id", "pad_token_id"])
            .unwrap_or(0) as u32,
        eos: raw.opt_usize(&["eos_token_id"]).map(|e| e as u32),
        max_seq_len: raw.opt_usize(&["n_positions"]).unwrap_or(512),
    }
}

/// T5's names: `shared`, `{encoder,decoder}.block.L.layer.N.{SelfAttention,EncDecAttention,
/// DenseReluDense}`, the relative-position table in block 0, `final_layer_norm`.
pub fn tensors(cfg: &Seq2SeqConfig, map: &mut TensorMap) -> Result<Params> {
    let mut out = Params::new();
    map.rename(&mut out, "shared.weight", "embed_tokens.weight");
    // copies of the shared embedding some exports carry
    map.take_opt("encoder.embed_tokens.weight");
    map.take_opt("decoder.embed_tokens.weight");
    if cfg.tie_embeddings {
        map.take_opt("lm_head.weight");
    } else {
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
    for (stack, n) in [
        ("encoder", cfg.encoder_layers),
        ("decoder", cfg.decoder_layers),
    ] {
        map.rename(
            &mut out,
            &format!("{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
            &format!("{stack}.relative_bias.weight"),
        );
        map.rename(
            &mut out,
            &format!("{stack}.final_layer_norm.weight"),
            &format!("{stack}.norm.weight"),
        );
        for l in 0..n {
            let (b, p) = (
                format!("{stack}.block.{l}.layer"),
                format!("{stack}.layers.{l}"),
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

//! llama.cpp's tensor names → the family's (Hugging Face) names, per architecture.

/// A layer tensor's name `blk.N.PART` as `(N, PART)`.
pub(super) fn layer_part(gguf: &str) -> Option<(usize, &str)> {
    let (layer, part) = gguf.strip_prefix("blk.")?.split_once('.')?;
    Some((layer.parse().ok()?, part))
}

/// llama.cpp's tensor name → the family's (Hugging Face) name, for one layer's part.
pub(super) fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(n) = fixed {
        return Some(n.to_string());
    }
    let (layer, part) = layer_part(gguf)?;
    let part = match part {
        "attn_norm.weight" => "input_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_qkv.weight" => "self_attn.qkv_proj.weight",
        "attn_q.bias" => "self_attn.q_proj.bias",
        "attn_k.bias" => "self_attn.k_proj.bias",
        "attn_v.bias" => "self_attn.v_proj.bias",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "attn_q_norm.weight" => "self_attn.q_norm.weight",
        "attn_k_norm.weight" => "self_attn.k_norm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        "post_attention_norm.weight" => "post_attention_layernorm.weight",
        "post_ffw_norm.weight" => "post_feedforward_layernorm.weight",
        "ffn_gate_inp.weight" => "mlp.gate.weight",
        "ffn_gate_shexp.weight" => "mlp.shared_expert.gate_proj.weight",
        "ffn_up_shexp.weight" => "mlp.shared_expert.up_proj.weight",
        "ffn_down_shexp.weight" => "mlp.shared_expert.down_proj.weight",
        "ffn_gate_inp_shexp.weight" => "mlp.shared_expert_gate.weight",
        // the experts stacked `(E, out, in)`: split per expert at load
        "ffn_gate_exps.weight" => "mlp.experts.*.gate_proj.weight",
        "ffn_up_exps.weight" => "mlp.experts.*.up_proj.weight",
        "ffn_down_exps.weight" => "mlp.experts.*.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{part}"))
}

/// Gemma 2/3's names differ: `ffn_norm` is the pre-feed-forward norm there, and the
/// post-attention norm is a sandwich norm.
pub(super) fn gemma_name(gguf: &str) -> Option<String> {
    let n = hf_name(gguf)?;
    if gguf.ends_with("ffn_norm.weight") {
        return Some(n.replace("post_attention_layernorm", "pre_feedforward_layernorm"));
    }
    Some(n)
}

/// Mixtral's names for the expert parts (`block_sparse_moe`, `w1`/`w3`/`w2`).
pub(super) fn mixtral_name(n: &str) -> String {
    n.replace(".mlp.gate.weight", ".block_sparse_moe.gate.weight")
        .replace(".mlp.experts.", ".block_sparse_moe.experts.")
        .replace(".gate_proj.weight", ".w1.weight")
        .replace(".up_proj.weight", ".w3.weight")
        .replace(".down_proj.weight", ".w2.weight")
}

/// The canonical names of a [`DIRECT`] architecture's tensor: three (q, k, v) for the fused
/// `attn_qkv`, one otherwise.
pub(super) fn direct_name(gguf: &str) -> Option<Vec<String>> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "position_embd.weight" => Some("model.embed_positions.weight"),
        "token_embd_norm.weight" => Some("model.embed_norm.weight"),
        "token_embd_norm.bias" => Some("model.embed_norm.bias"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output_norm.bias" => Some("model.norm.bias"),
        "output.weight" => Some("lm_head.weight"),
        "output.bias" => Some("lm_head.bias"),
        _ => None,
    };
    if let Some(n) = fixed {
        return Some(vec![n.to_string()]);
    }
    let (layer, part) = layer_part(gguf)?;
    let (module, kind) = part.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let p = format!("model.layers.{layer}");
    let one = |m: &str| Some(vec![format!("{p}.{m}.{kind}")]);
    match module {
        "attn_qkv" => Some(
            ["q_proj", "k_proj", "v_proj"]
                .map(|n| format!("{p}.self_attn.{n}.{kind}"))
                .to_vec(),
        ),
        "attn_q" => one("self_attn.q_proj"),
        "attn_k" => one("self_attn.k_proj"),
        "attn_v" => one("self_attn.v_proj"),
        "attn_output" => one("self_attn.o_proj"),
        "attn_norm" => one("input_layernorm"),
        "ffn_norm" => one("post_attention_layernorm"),
        "ffn_up" => one("mlp.up_proj"),
        "ffn_down" => one("mlp.down_proj"),
        _ => None,
    }
}

/// DeepSeek's (`deepseek2`) latent-attention and router names; the rest as [`hf_name`].
/// `attn_k_b` and `attn_v_b` are joined back into `kv_b_proj` ([`join_kv_b`]).
pub(super) fn deepseek2_name(gguf: &str) -> Option<String> {
    let Some((layer, part)) = layer_part(gguf) else {
        return hf_name(gguf);
    };
    let part = match part {
        "attn_q_a.weight" => "self_attn.q_a_proj.weight",
        "attn_q_a_norm.weight" => "self_attn.q_a_layernorm.weight",
        "attn_q_b.weight" => "self_attn.q_b_proj.weight",
        "attn_kv_a_mqa.weight" => "self_attn.kv_a_proj_with_mqa.weight",
        "attn_kv_a_norm.weight" => "self_attn.kv_a_layernorm.weight",
        "attn_kv_b.weight" => "self_attn.kv_b_proj.weight",
        "exp_probs_b.bias" => "mlp.gate.e_score_correction_bias",
        _ => return hf_name(gguf),
    };
    Some(format!("model.layers.{layer}.{part}"))
}

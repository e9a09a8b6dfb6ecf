//! GGUF files as a second file adapter beside `config.json` + safetensors: the metadata of
//! the architectures llama.cpp writes becomes the `config.json` the family's adapter reads,
//! and llama.cpp's tensor names become the family's, so the families' translations (and
//! their checks) are the only ones. For inference the projections, the token embeddings and
//! the head stay in their stored form, read in place from the mapped file by the
//! quantized kernels ([`crate::nn::qmatmul`]); everything else (norms, routers, experts)
//! and, for training or verification, every tensor is dequantized at load.
//!
//! Layouts llama.cpp's converter changes: `llama` stores the q and k projections with each
//! head's rows interleaved for its pairwise rotary (undone here; Qwen's rotary already
//! takes halves, so its rows are as published); Gemma (1, 2 and 3) stores its norms as
//! `1 + w` (the model then takes them as they are); GPT-NeoX, BLOOM and GPT-2 get one fused
//! q/k/v of consecutive row blocks (read straight into canonical names, [`DIRECT`]);
//! DeepSeek's `kv_b_proj` is split per head into `attn_k_b` (transposed) and `attn_v_b`
//! (joined back here).

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value as Json};
use std::path::Path;
use std::sync::Arc;

use super::{Family, RawConfig};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::nn::qmatmul::{QMatrix, StoredWeights};
use crate::weights::gguf::{GgufFile, Value};
use crate::weights::Params;

/// The GGUF architectures routelm reads, and the Hugging Face model type each becomes.
const ARCHITECTURES: &[(&str, &str, &str)] = &[
    ("llama", "llama", "LlamaForCausalLM"),
    ("gemma", "gemma", "GemmaForCausalLM"),
    ("gemma2", "gemma2", "Gemma2ForCausalLM"),
    ("gemma3", "gemma3_text", "Gemma3ForCausalLM"),
    ("phi3", "phi3", "Phi3ForCausalLM"),
    ("olmoe", "olmoe", "OlmoeForCausalLM"),
    ("qwen2", "qwen2", "Qwen2ForCausalLM"),
    ("qwen3", "qwen3", "Qwen3ForCausalLM"),
    ("qwen2moe", "qwen2_moe", "Qwen2MoeForCausalLM"),
    ("qwen3moe", "qwen3_moe", "Qwen3MoeForCausalLM"),
    ("gptneox", "gpt_neox", "GPTNeoXForCausalLM"),
    ("bloom", "bloom", "BloomForCausalLM"),
    ("gpt2", "gpt2", "GPT2LMHeadModel"),
    ("phi2", "phi", "PhiForCausalLM"),
    ("deepseek2", "deepseek_v3", "DeepseekV3ForCausalLM"),
];

/// The architectures whose tensors llama.cpp's converter writes in routelm's own layout
/// up to their names: LayerNorm models with one fused `attn_qkv` holding q, k and v as
/// consecutive row blocks (the converter already undid GPT-NeoX's and BLOOM's per-head
/// interleaving, and GPT-2's `[in, out]` storage). Their tensors map straight to canonical
/// names ([`direct_name`]), so a quantized fused projection is cut into q, k and v views.
const DIRECT: &[&str] = &["gptneox", "bloom", "gpt2", "phi2"];

/// The metadata value `arch.key`.
fn meta<'a>(f: &'a GgufFile, arch: &str, key: &str) -> Option<&'a Value> {
    f.get(&format!("{arch}.{key}"))
}

fn need_u64(f: &GgufFile, arch: &str, key: &str) -> Result<u64> {
    meta(f, arch, key).and_then(Value::as_u64).ok_or_else(|| {
        Error::parse(
            &f.path,
            format!("metadata {arch}.{key} is missing or not an integer"),
        )
    })
}

/// The `config.json` equivalent of a GGUF file's metadata, for its family's adapter.
fn hf_config(f: &GgufFile) -> Result<(String, Json)> {
    let arch = f
        .get("general.architecture")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::parse(&f.path, "metadata general.architecture is missing"))?;
    let Some(&(_, model_type, class)) = ARCHITECTURES.iter().find(|a| a.0 == arch) else {
        let known: Vec<&str> = ARCHITECTURES.iter().map(|a| a.0).collect();
        return Err(Error::parse(
            &f.path,
            format!(
                "GGUF architecture '{arch}' is not supported yet (supported: {})",
                known.join(", ")
            ),
        ));
    };
    let heads = need_u64(f, arch, "attention.head_count")?;
    let d_model = need_u64(f, arch, "embedding_length")?;
    let vocab = match meta(f, arch, "vocab_size").and_then(Value::as_u64) {
        Some(v) => v,
        None => match f.get("tokenizer.ggml.tokens") {
            Some(Value::Array(t)) => t.len() as u64,
            _ => {
                let embd = f.tensor("token_embd.weight").ok_or_else(|| {
                    Error::parse(&f.path, "no vocabulary size and no token_embd.weight")
                })?;
                embd.shape[0] as u64
            }
        },
    };
    let mut c = json!({
        "model_type": model_type,
        "architectures": [class],
        "vocab_size": vocab,
        "hidden_size": d_model,
        "num_hidden_layers": need_u64(f, arch, "block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": meta(f, arch, "attention.head_count_kv")
            .and_then(Value::as_u64).unwrap_or(heads),
        "intermediate_size": need_u64(f, arch, "feed_forward_length")?,
        "max_position_embeddings": need_u64(f, arch, "context_length")?,
        "rms_norm_eps": meta(f, arch, "attention.layer_norm_rms_epsilon")
            .and_then(Value::as_f64).unwrap_or(1e-5),
        "tie_word_embeddings": f.tensor("output.weight").is_none(),
    });
    if let Some(k) = meta(f, arch, "attention.key_length").and_then(Value::as_u64) {
        c["head_dim"] = k.into();
    }
    if let Some(t) = meta(f, arch, "rope.freq_base").and_then(Value::as_f64) {
        c["rope_theta"] = t.into();
    }
    match meta(f, arch, "rope.scaling.type").and_then(Value::as_str) {
        None | Some("none") => {}
        Some("linear") => {
            let factor = meta(f, arch, "rope.scaling.factor").and_then(Value::as_f64);
            c["rope_scaling"] = json!({"rope_type": "linear", "factor": factor});
        }
        Some(other) => {
            return Err(Error::parse(
                &f.path,
                format!("{arch}.rope.scaling.type '{other}' is not supported yet"),
            ))
        }
    }
    if DIRECT.contains(&arch) {
        direct_keys(f, arch, &mut c)?;
    } else if arch == "deepseek2" {
        deepseek2_keys(f, &mut c)?;
    } else {
        moe_keys(f, arch, &mut c)?;
    }
    match arch {
        "llama" | "qwen2" | "qwen3" | "qwen2moe" | "qwen3moe" | "olmoe" => {
            c["hidden_act"] = "silu".into()
        }
        "gemma" => c["hidden_activation"] = "gelu_pytorch_tanh".into(),
        "phi3" => {
            c["hidden_act"] = "silu".into();
            // llama.cpp runs Phi-3 without its sliding window (so does this reading)
            c["sliding_window"] = Json::Null;
            if f.tensor("rope_factors_long.weight").is_some() {
                return Err(Error::parse(
                    &f.path,
                    "Phi-3 with LongRoPE factors (the 128k-context models) is not supported yet",
                ));
            }
            let head_dim = c
                .get("head_dim")
                .and_then(Json::as_u64)
                .unwrap_or(d_model / heads);
            if let Some(rot) = meta(f, arch, "rope.dimension_count").and_then(Value::as_u64) {
                c["partial_rotary_factor"] = (rot as f64 / head_dim as f64).into();
            }
        }
        "gemma2" => {
            let head_dim = c
                .get("head_dim")
                .and_then(Json::as_u64)
                .unwrap_or(d_model / heads);
            let layers = need_u64(f, arch, "block_count")?;
            c["hidden_activation"] = "gelu_pytorch_tanh".into();
            // llama.cpp scales queries by the head width, the 46-layer (27B) model by
            // d_model / heads; sliding windows on even layers, 4096 unless the file says
            c["query_pre_attn_scalar"] = if layers == 46 {
                d_model / heads
            } else {
                head_dim
            }
            .into();
            c["sliding_window"] = meta(f, arch, "attention.sliding_window")
                .and_then(Value::as_u64)
                .unwrap_or(4096)
                .into();
            // llama.cpp's defaults where the file is silent
            for (key, default) in [
                ("attn_logit_softcapping", 50.0),
                ("final_logit_softcapping", 30.0),
            ] {
                c[key] = meta(f, arch, key)
                    .and_then(Value::as_f64)
                    .unwrap_or(default)
                    .into();
            }
        }
        "gemma3" => {
            let head_dim = c
                .get("head_dim")
                .cloned()
                .unwrap_or((d_model / heads).into());
            c["hidden_activation"] = "gelu_pytorch_tanh".into();
            c["query_pre_attn_scalar"] = head_dim;
            // llama.cpp's Gemma 3 settings: every sixth layer global (unless the file says),
            // local base 10000
            c["sliding_window"] = need_u64(f, arch, "attention.sliding_window")?.into();
            c["sliding_window_pattern"] = meta(f, arch, "attention.sliding_window_pattern")
                .and_then(Value::as_u64)
                .unwrap_or(6)
                .into();
            c["rope_local_base_freq"] = 10_000.0.into();
        }
        _ => {}
    }
    Ok((arch.to_string(), c))
}

/// The rows of `name` (its first dimension), when the file holds it as a matrix.
fn rows_of(f: &GgufFile, name: &str) -> Option<u64> {
    f.tensor(name)
        .filter(|t| t.shape.len() == 2)
        .map(|t| t.shape[0] as u64)
}

/// The `config.json` keys of the [`DIRECT`] architectures. The FFN width and the key/value
/// heads are read off the tensors: the converter writes `4 · embedding_length` and `head_count`
/// for Phi-2 whatever the checkpoint had. None of them stores its activation, so each gets
/// the one its published models use.
fn direct_keys(f: &GgufFile, arch: &str, c: &mut Json) -> Result<()> {
    let heads = need_u64(f, arch, "attention.head_count")?;
    let d_model = need_u64(f, arch, "embedding_length")?;
    let head_dim = d_model / heads.max(1);
    if let Some(ff) = rows_of(f, "blk.0.ffn_up.weight") {
        c["intermediate_size"] = ff.into();
    }
    if let Some(k) = rows_of(f, "blk.0.attn_k.weight") {
        c["num_key_value_heads"] = (k / head_dim.max(1)).into();
    }
    let eps = meta(f, arch, "attention.layer_norm_epsilon")
        .and_then(Value::as_f64)
        .unwrap_or(1e-5);
    // the key each family's config class names
    let eps_key = if matches!(arch, "gptneox" | "phi2") {
        "layer_norm_eps"
    } else {
        "layer_norm_epsilon"
    };
    c[eps_key] = eps.into();
    let rotary = || {
        meta(f, arch, "rope.dimension_count")
            .and_then(Value::as_u64)
            .map(|r| r as f64 / head_dim.max(1) as f64)
            .unwrap_or(1.0)
    };
    let theta = meta(f, arch, "rope.freq_base")
        .and_then(Value::as_f64)
        .unwrap_or(10_000.0);
    match arch {
        "gptneox" => {
            c["rotary_pct"] = rotary().into();
            c["rotary_emb_base"] = theta.into();
            c["use_parallel_residual"] = meta(f, arch, "use_parallel_residual")
                .and_then(Value::as_bool)
                .unwrap_or(true)
                .into();
            c["hidden_act"] = "gelu".into();
        }
        "phi2" => {
            c["partial_rotary_factor"] = rotary().into();
            c["rope_theta"] = theta.into();
            c["hidden_act"] = "gelu_new".into();
        }
        "gpt2" => {
            c["n_positions"] = c["max_position_embeddings"].clone();
            c["n_inner"] = c["intermediate_size"].clone();
            c["activation_function"] = "gelu_new".into();
        }
        // BLOOM: ALiBi, so the context only bounds the cache
        _ => c["seq_length"] = c["max_position_embeddings"].clone(),
    }
    // keys the family's config class does not have (its adapter refuses unknown keys)
    let foreign: &[&str] = match arch {
        "gpt2" | "bloom" => &["rms_norm_eps", "num_key_value_heads", "intermediate_size"],
        _ => &["rms_norm_eps"],
    };
    if let Some(o) = c.as_object_mut() {
        for k in foreign {
            o.remove(*k);
        }
    }
    Ok(())
}

/// DeepSeek-V2/V3 (`deepseek2`): latent attention and the routed experts, as llama.cpp
/// reads them. Its converter writes the latent attention as one key/value head of width
/// `kv_lora_rank + rope` (`key_length`); the per-head widths are the `_mla` keys. Without
/// `expert_gating_func` llama.cpp scores experts by softmax (the V2 files), and so does
/// this reading.
fn deepseek2_keys(f: &GgufFile, c: &mut Json) -> Result<()> {
    let arch = "deepseek2";
    let get = |key: &str| meta(f, arch, key).and_then(Value::as_u64);
    let rope = need_u64(f, arch, "rope.dimension_count")?;
    // files written before the split `attn_k_b`/`attn_v_b` keep per-head widths in key_length
    let split = f.tensor("blk.0.attn_k_b.weight").is_some();
    let (k_len, v_len) = if split {
        (
            get("attention.key_length_mla"),
            get("attention.value_length_mla"),
        )
    } else {
        (get("attention.key_length"), get("attention.value_length"))
    };
    let (Some(k_len), Some(v_len)) = (k_len, v_len) else {
        return Err(Error::parse(
            &f.path,
            "metadata deepseek2.attention.key_length_mla / value_length_mla is missing",
        ));
    };
    if k_len <= rope {
        return Err(Error::parse(
            &f.path,
            format!("deepseek2 key width {k_len} is not above its rotary width {rope}"),
        ));
    }
    c["num_key_value_heads"] = c["num_attention_heads"].clone();
    c["head_dim"] = k_len.into();
    c["qk_head_dim"] = k_len.into();
    c["qk_rope_head_dim"] = rope.into();
    c["qk_nope_head_dim"] = (k_len - rope).into();
    c["v_head_dim"] = v_len.into();
    c["kv_lora_rank"] = need_u64(f, arch, "attention.kv_lora_rank")?.into();
    if let Some(q) = get("attention.q_lora_rank").filter(|&q| q > 0) {
        c["q_lora_rank"] = q.into();
    } else {
        c["q_lora_rank"] = Json::Null;
    }
    c["rope_interleave"] = true.into();
    c["hidden_act"] = "silu".into();
    c["n_routed_experts"] = need_u64(f, arch, "expert_count")?.into();
    c["num_experts_per_tok"] = need_u64(f, arch, "expert_used_count")?.into();
    c["moe_intermediate_size"] = need_u64(f, arch, "expert_feed_forward_length")?.into();
    c["n_shared_experts"] = get("expert_shared_count").unwrap_or(0).into();
    c["first_k_dense_replace"] = get("leading_dense_block_count").unwrap_or(0).into();
    c["n_group"] = get("expert_group_count").unwrap_or(1).into();
    c["topk_group"] = get("expert_group_used_count").unwrap_or(1).into();
    c["routed_scaling_factor"] = meta(f, arch, "expert_weights_scale")
        .and_then(Value::as_f64)
        .unwrap_or(1.0)
        .into();
    c["norm_topk_prob"] = meta(f, arch, "expert_weights_norm")
        .and_then(Value::as_bool)
        .unwrap_or(false)
        .into();
    c["scoring_func"] = match get("expert_gating_func") {
        None | Some(1) => "softmax",
        Some(2) => "sigmoid",
        Some(other) => {
            return Err(Error::parse(
                &f.path,
                format!(
                    "deepseek2.expert_gating_func {other} is not supported (1 softmax, 2 sigmoid)"
                ),
            ))
        }
    }
    .into();
    Ok(())
}

/// The Mixture-of-Experts keys of the `config.json` equivalent, when the file has experts.
fn moe_keys(f: &GgufFile, arch: &str, c: &mut Json) -> Result<()> {
    // llama.cpp's `llama` with experts is Mixtral; a layer without a router
    // (`ffn_gate_inp`) is dense
    if let Some(experts) = meta(f, arch, "expert_count")
        .and_then(Value::as_u64)
        .filter(|&e| e > 0)
    {
        let used = need_u64(f, arch, "expert_used_count")?;
        let layers = need_u64(f, arch, "block_count")?;
        let dense: Vec<u64> = (0..layers)
            .filter(|l| f.tensor(&format!("blk.{l}.ffn_gate_inp.weight")).is_none())
            .collect();
        c["num_experts_per_tok"] = used.into();
        if arch == "llama" {
            c["model_type"] = "mixtral".into();
            c["architectures"] = json!(["MixtralForCausalLM"]);
            c["num_local_experts"] = experts.into();
            if !dense.is_empty() {
                return Err(Error::parse(
                    &f.path,
                    "a llama file mixing dense and expert layers is not supported",
                ));
            }
        } else if arch == "olmoe" {
            // OLMoE's experts are `feed_forward_length` wide; every layer has them and
            // the chosen weights stay as the softmax gave them
            c["num_experts"] = experts.into();
            c["norm_topk_prob"] = false.into();
        } else {
            c["num_experts"] = experts.into();
            c["moe_intermediate_size"] = need_u64(f, arch, "expert_feed_forward_length")?.into();
            c["mlp_only_layers"] = json!(dense);
            c["decoder_sparse_step"] = 1.into();
            // Qwen2-MoE leaves the chosen weights as they are, Qwen3-MoE renormalises them
            c["norm_topk_prob"] = (arch == "qwen3moe").into();
        }
        if let Some(s) = meta(f, arch, "expert_shared_feed_forward_length").and_then(Value::as_u64)
        {
            c["shared_expert_intermediate_size"] = s.into();
        }
    }
    Ok(())
}

/// A layer tensor's name `blk.N.PART` as `(N, PART)`.
fn layer_part(gguf: &str) -> Option<(usize, &str)> {
    let (layer, part) = gguf.strip_prefix("blk.")?.split_once('.')?;
    Some((layer.parse().ok()?, part))
}

/// llama.cpp's tensor name → the family's (Hugging Face) name, for one layer's part.
fn hf_name(gguf: &str) -> Option<String> {
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
fn gemma_name(gguf: &str) -> Option<String> {
    let n = hf_name(gguf)?;
    if gguf.ends_with("ffn_norm.weight") {
        return Some(n.replace("post_attention_layernorm", "pre_feedforward_layernorm"));
    }
    Some(n)
}

/// Mixtral's names for the expert parts (`block_sparse_moe`, `w1`/`w3`/`w2`).
fn mixtral_name(n: &str) -> String {
    n.replace(".mlp.gate.weight", ".block_sparse_moe.gate.weight")
        .replace(".mlp.experts.", ".block_sparse_moe.experts.")
        .replace(".gate_proj.weight", ".w1.weight")
        .replace(".up_proj.weight", ".w3.weight")
        .replace(".down_proj.weight", ".w2.weight")
}

/// The canonical names of a [`DIRECT`] architecture's tensor: three (q, k, v) for the fused
/// `attn_qkv`, one otherwise.
fn direct_name(gguf: &str) -> Option<Vec<String>> {
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
fn deepseek2_name(gguf: &str) -> Option<String> {
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

/// DeepSeek's `kv_b_proj` (`[h · (nope + v), kv_lora_rank]`, each head's key rows then its
/// value rows) from the converter's split: `attn_k_b` `[h, kv_lora_rank, nope]` (each
/// head's key part transposed) and `attn_v_b` `[h, v, kv_lora_rank]`.
fn join_kv_b(k_b: &Tensor, v_b: &Tensor, cfg: &ModelConfig) -> candle_core::Result<Tensor> {
    let h = cfg.n_heads;
    let (lora, nope, v_dim) = match cfg.mla {
        Some(a) => (a.kv_lora_rank, a.qk_nope_dim, a.v_head_dim),
        None => (0, 0, 0),
    };
    let k = k_b.reshape((h, lora, nope))?.transpose(1, 2)?;
    let v = v_b.reshape((h, v_dim, lora))?;
    Tensor::cat(&[k, v], 1)?.reshape((h * (nope + v_dim), lora))
}

/// Undo llama.cpp's q/k row order for pairwise rotary: within each head, rows `2i` and
/// `2i + 1` go back to `i` and `i + head_dim/2` (rotate-half layout).
fn unpermute(t: &Tensor, heads: usize, path: &Path, name: &str) -> Result<Tensor> {
    let order: Vec<u32> = unpermuted_rows(t.dim(0)?, heads)
        .map_err(|e| Error::WeightMismatch {
            path: path.to_path_buf(),
            problems: vec![format!("tensor {name}: {e}")],
        })?
        .into_iter()
        .map(|i| i as u32)
        .collect();
    let order = Tensor::from_vec(order, t.dim(0)?, t.device())?;
    Ok(t.index_select(&order, 0)?)
}

/// The family (`None` for routelm's own architecture) and resolved config of a GGUF
/// file, from its metadata alone.
pub fn config(path: &Path) -> Result<(Option<&'static Family>, ModelConfig)> {
    let f = GgufFile::open(path)?;
    resolve(&f, path)
}

/// The architecture name of files that hold a routelm model of any shape (Mixture-of-
/// Depths routers, options llama.cpp's architectures lack): the config as `routelm.config`
/// JSON, tensors under routelm's canonical names.
pub const ROUTELM_ARCH: &str = "routelm";

fn resolve(f: &GgufFile, path: &Path) -> Result<(Option<&'static Family>, ModelConfig)> {
    if f.get("general.architecture").and_then(Value::as_str) == Some(ROUTELM_ARCH) {
        let text = f
            .get("routelm.config")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::parse(path, "metadata routelm.config is missing"))?;
        let cfg = crate::config::parse_resolved(text)
            .map_err(|e| Error::parse(path, format!("routelm.config: {e}")))?;
        let problems = cfg.problems();
        if !problems.is_empty() {
            return Err(Error::Config {
                origin: path.display().to_string(),
                problems,
            });
        }
        return Ok((None, cfg));
    }
    let (arch, json) = hf_config(f)?;
    let raw = RawConfig::new(json, path.to_path_buf());
    let family = super::detect(&raw)?;
    let mut cfg = raw.finish((family.config)(&raw))?;
    if arch.starts_with("gemma") {
        // the converter stored the norms as 1 + w
        cfg.norm_offset = 0.0;
    }
    Ok((Some(family), cfg))
}

/// The row order that undoes llama.cpp's interleaving of each head's rows (`unpermute`).
fn unpermuted_rows(rows: usize, heads: usize) -> std::result::Result<Vec<usize>, String> {
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return Err(format!(
            "{rows} rows are not {heads} heads of an even width (the metadata's head count does not fit the tensor)"
        ));
    }
    let hd = rows / heads;
    Ok((0..rows)
        .map(|i| {
            let (h, r) = (i / hd, i % hd);
            let (a, b) = (r / (hd / 2), r % (hd / 2));
            h * hd + 2 * b + a
        })
        .collect())
}

/// Load a GGUF file: config from its metadata through the family's adapter, tensors
/// dequantized to `dtype` and renamed to the family's names, then the family's own tensor
/// rules. Returns the family's name, the resolved config and the canonical parameters.
pub fn load(
    path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(Option<&'static str>, ModelConfig, Params)> {
    let (family, cfg, params, _) = load_with(path, dtype, device, false)?;
    Ok((family, cfg, params))
}

/// [`load`] for inference: the weights [`super::takes_stored`] names stay in their stored form
/// (returned beside the parameters, which hold a stand-in of the right shape for each).
pub fn load_stored(
    path: &Path,
    device: &Device,
) -> Result<(Option<&'static str>, ModelConfig, Params, StoredWeights)> {
    load_with(path, DType::F32, device, true)
}

fn load_with(
    path: &Path,
    dtype: DType,
    device: &Device,
    keep: bool,
) -> Result<(Option<&'static str>, ModelConfig, Params, StoredWeights)> {
    let f = GgufFile::open(path)?;
    let (family, cfg) = resolve(&f, path)?;
    let own = family.is_none();
    let arch = f
        .get("general.architecture")
        .and_then(Value::as_str)
        .unwrap_or_default();
    // Gemma 2 and 3 name their sandwich norms apart (Gemma's `ffn_norm` is Llama's)
    let gemma = arch == "gemma2" || arch == "gemma3";
    let mixtral = arch == "llama" && cfg.moe_layers().next().is_some();
    let direct = DIRECT.contains(&arch);
    let deepseek = arch == "deepseek2";
    let mut params = Params::new();
    let mut stored = StoredWeights::new();
    let mut unknown = Vec::new();
    // DeepSeek's split latent key/value expansions, joined after the loop
    let mut latent: std::collections::BTreeMap<(usize, bool), Tensor> = Default::default();
    for t in &f.tensors {
        if direct {
            let mapped = load_direct(&f, t, &cfg, keep, dtype, device, &mut params, &mut stored)
                .map_err(|problem| Error::WeightMismatch {
                    path: path.to_path_buf(),
                    problems: vec![format!("tensor {}: {problem}", t.name)],
                })?;
            if !mapped {
                unknown.push(t.name.clone());
            }
            continue;
        }
        if deepseek {
            if let Some((l, part @ ("attn_k_b.weight" | "attn_v_b.weight"))) = layer_part(&t.name) {
                let x = Tensor::from_vec(f.dequantize(t), t.shape.as_slice(), &Device::Cpu)?;
                latent.insert((l, part == "attn_v_b.weight"), x);
                continue;
            }
        }
        let name = if own {
            Some(t.name.clone())
        } else if gemma {
            gemma_name(&t.name)
        } else if deepseek {
            deepseek2_name(&t.name)
        } else {
            hf_name(&t.name)
        };
        let Some(name) = name else {
            unknown.push(t.name.clone());
            continue;
        };
        // Phi-3's fused projections: `ffn_up` holds [gate; up]
        let name = if arch == "phi3" {
            name.replace(".mlp.up_proj.weight", ".mlp.gate_up_proj.weight")
        } else {
            name
        };
        // DeepSeek's query projection (without a low-rank query) has its rotary rows
        // reordered by the family's rules, which a stored weight cannot follow
        let reordered = deepseek && name.ends_with(".q_proj.weight");
        if keep && t.shape.len() == 2 && super::storable_file_name(&name) && !reordered {
            let (rows, cols) = (t.shape[0], t.shape[1]);
            let bad = |problem: String| Error::WeightMismatch {
                path: path.to_path_buf(),
                problems: vec![format!("tensor {}: {problem}", t.name)],
            };
            let mut q = QMatrix::new(t.ty, rows, cols, f.stored(t)).map_err(bad)?;
            if arch == "llama" {
                if name.ends_with("q_proj.weight") {
                    q = q.permute_rows(&unpermuted_rows(rows, cfg.n_heads).map_err(bad)?);
                } else if name.ends_with("k_proj.weight") {
                    q = q.permute_rows(&unpermuted_rows(rows, cfg.n_kv_heads).map_err(bad)?);
                }
            }
            params.insert(name.clone(), crate::nn::linear::stand_in(rows, cols)?);
            stored.insert(name, Arc::new(q));
            continue;
        }
        if keep && t.shape.len() == 3 && name.contains(".experts.*.") {
            // each expert's rows are a run of the stacked tensor's bytes
            let (experts, rows, cols) = (t.shape[0], t.shape[1], t.shape[2]);
            let size = t.len / experts.max(1);
            let all = f.stored(t);
            for e in 0..experts {
                let q = QMatrix::new(t.ty, rows, cols, all.slice(e * size, size)).map_err(|p| {
                    Error::WeightMismatch {
                        path: path.to_path_buf(),
                        problems: vec![format!("tensor {} expert {e}: {p}", t.name)],
                    }
                })?;
                let part = name.replace('*', &e.to_string());
                let part = if mixtral { mixtral_name(&part) } else { part };
                params.insert(part.clone(), crate::nn::linear::stand_in(rows, cols)?);
                stored.insert(part, Arc::new(q));
            }
            continue;
        }
        let values = f.dequantize(t);
        let mut x = Tensor::from_vec(values, t.shape.as_slice(), &Device::Cpu)?;
        if arch == "llama" {
            if name.ends_with("q_proj.weight") {
                x = unpermute(&x, cfg.n_heads, path, &t.name)?;
            } else if name.ends_with("k_proj.weight") {
                x = unpermute(&x, cfg.n_kv_heads, path, &t.name)?;
            }
        }
        if name.ends_with("shared_expert_gate.weight") {
            x = x.reshape((1, x.elem_count()))?;
        }
        let pieces = if name.contains(".experts.*.") {
            let e = x.dim(0)?;
            (0..e)
                .map(|i| Ok((name.replace('*', &i.to_string()), x.get(i)?)))
                .collect::<candle_core::Result<Vec<_>>>()?
        } else {
            vec![(name, x)]
        };
        for (name, x) in pieces {
            let name = if mixtral { mixtral_name(&name) } else { name };
            params.insert(name, x.to_dtype(dtype)?.to_device(device)?);
        }
    }
    if deepseek {
        join_latent(latent, &cfg, dtype, device, &mut params, path)?;
    }
    if !unknown.is_empty() {
        return Err(Error::WeightMismatch {
            path: path.to_path_buf(),
            problems: unknown
                .into_iter()
                .map(|n| format!("tensor {n}: not a name routelm maps for {arch}"))
                .collect(),
        });
    }
    let canonical = match family {
        Some(family) if !direct => {
            let (canonical, provenance) =
                super::canonical_params_traced(family, &cfg, params, path.to_path_buf())?;
            stored = super::rekey_stored(stored, &provenance, &canonical, path)?;
            canonical
        }
        _ => {
            let problems = crate::weights::names::check_params(&cfg, &params);
            if !problems.is_empty() {
                return Err(Error::WeightMismatch {
                    path: path.to_path_buf(),
                    problems,
                });
            }
            params
        }
    };
    super::check_stored(&stored, &canonical, path)?;
    Ok((family.map(|f| f.name), cfg, canonical, stored))
}

/// One tensor of a [`DIRECT`] architecture under its canonical name(s): a fused q/k/v cut
/// into its three row blocks (views of the stored rows when kept stored). `Ok(false)` for a
/// name routelm does not map; `Err` for a tensor that does not fit the config.
#[allow(clippy::too_many_arguments)]
fn load_direct(
    f: &GgufFile,
    t: &crate::weights::gguf::TensorInfo,
    cfg: &ModelConfig,
    keep: bool,
    dtype: DType,
    device: &Device,
    params: &mut Params,
    stored: &mut StoredWeights,
) -> std::result::Result<bool, String> {
    let Some(names) = direct_name(&t.name) else {
        return Ok(false);
    };
    let rows = t.shape.first().copied().unwrap_or(0);
    let sizes = if names.len() == 3 {
        let (q, kv) = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim);
        if q + 2 * kv != rows {
            return Err(format!(
                "{rows} rows, but {} query and 2 × {} key/value heads of width {} are {}",
                cfg.n_heads,
                cfg.n_kv_heads,
                cfg.head_dim,
                q + 2 * kv
            ));
        }
        vec![q, kv, kv]
    } else {
        vec![rows]
    };
    if keep && t.shape.len() == 2 && super::takes_stored(&names[0]) {
        let cols = t.shape[1];
        let q = QMatrix::new(t.ty, rows, cols, f.stored(t))?;
        let mut at = 0;
        for (name, n) in names.into_iter().zip(sizes) {
            let stand_in = crate::nn::linear::stand_in(n, cols).map_err(|e| e.to_string())?;
            params.insert(name.clone(), stand_in);
            stored.insert(name, Arc::new(q.rows_range(at, at + n)));
            at += n;
        }
        return Ok(true);
    }
    let x = Tensor::from_vec(f.dequantize(t), t.shape.as_slice(), &Device::Cpu)
        .and_then(|x| x.to_dtype(dtype)?.to_device(device))
        .map_err(|e| e.to_string())?;
    let parts = super::split(&x, 0, &sizes).map_err(|e| e.to_string())?;
    for (name, part) in names.into_iter().zip(parts) {
        params.insert(name, part);
    }
    Ok(true)
}

/// DeepSeek's `kv_b_proj` of every layer from its `attn_k_b` and `attn_v_b`; and, for a
/// file without the selection bias (`exp_probs_b`, DeepSeek-V2), a zero bias (the same
/// choice) for each expert layer.
fn join_latent(
    latent: std::collections::BTreeMap<(usize, bool), Tensor>,
    cfg: &ModelConfig,
    dtype: DType,
    device: &Device,
    params: &mut Params,
    path: &Path,
) -> Result<()> {
    for ((l, is_v), k_b) in &latent {
        if *is_v {
            continue;
        }
        let name = format!("model.layers.{l}.self_attn.kv_b_proj.weight");
        let v_b = latent
            .get(&(*l, true))
            .ok_or_else(|| Error::WeightMismatch {
                path: path.to_path_buf(),
                problems: vec![format!(
                    "blk.{l}.attn_k_b.weight has no blk.{l}.attn_v_b.weight"
                )],
            })?;
        let joined = join_kv_b(k_b, v_b, cfg).map_err(|e| Error::WeightMismatch {
            path: path.to_path_buf(),
            problems: vec![format!(
                "blk.{l}.attn_k_b / attn_v_b: {e} (the metadata's latent widths do not fit)"
            )],
        })?;
        params.insert(name, joined.to_dtype(dtype)?.to_device(device)?);
    }
    for (l, moe) in cfg.moe_layers() {
        let name = format!("model.layers.{l}.mlp.gate.e_score_correction_bias");
        if let std::collections::btree_map::Entry::Vacant(e) = params.entry(name) {
            e.insert(Tensor::zeros(moe.n_experts, dtype, device)?);
        }
    }
    Ok(())
}

/// Texts of the control tokens that end a turn in the vocabularies llama.cpp reads (it
/// stops generation at them too, whatever `eos_token_id` says).
const END_OF_TURN: &[&str] = &[
    "<end_of_turn>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|endoftext|>",
];

/// The ids that end generation: `eos_token_id`, `eot_token_id` and `eom_token_id` when
/// given, and the control tokens that end a turn (Gemma's files name only `<eos>`, while
/// its chat ends each turn with `<end_of_turn>`).
pub fn eos_ids(path: &Path) -> Result<Vec<u32>> {
    let f = GgufFile::open(path)?;
    let mut ids: Vec<u32> = ["eos_token_id", "eot_token_id", "eom_token_id"]
        .iter()
        .filter_map(|k| f.get(&format!("tokenizer.ggml.{k}")))
        .filter_map(Value::as_u64)
        .filter_map(|e| u32::try_from(e).ok())
        .collect();
    if let (Some(Value::Array(tokens)), Some(Value::Array(types))) = (
        f.get("tokenizer.ggml.tokens"),
        f.get("tokenizer.ggml.token_type"),
    ) {
        for (id, (t, ty)) in tokens.iter().zip(types).enumerate() {
            let control = ty.as_u64() == Some(3);
            if control && t.as_str().is_some_and(|t| END_OF_TURN.contains(&t)) {
                ids.extend(u32::try_from(id).ok());
            }
        }
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

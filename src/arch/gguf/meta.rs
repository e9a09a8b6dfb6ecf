//! A GGUF file's metadata as the `config.json` its family's adapter reads: the keys every
//! architecture shares, those of the architectures read in routelm's own layout
//! ([`super::DIRECT`]), DeepSeek's latent attention, and the Mixture-of-Experts keys.

use serde_json::{json, Value as Json};

use super::{ARCHITECTURES, DIRECT};
use crate::config::MAX_LAYERS;
use crate::error::{Error, Result};
use crate::weights::gguf::{GgufFile, Value};

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
pub(super) fn hf_config(f: &GgufFile) -> Result<(String, Json)> {
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
    let vocab = vocab_size(f, arch)?;
    let layers = block_count(f, arch)?;
    let mut c = json!({
        "model_type": model_type,
        "architectures": [class],
        "vocab_size": vocab,
        "hidden_size": d_model,
        "num_hidden_layers": layers,
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
    rope_keys(f, arch, &mut c)?;
    if DIRECT.contains(&arch) {
        direct_keys(f, arch, &mut c)?;
    } else if arch == "deepseek2" {
        deepseek2_keys(f, &mut c)?;
    } else {
        moe_keys(f, arch, layers, &mut c)?;
    }
    // no heads: width 0 here (not a division by zero); the config check refuses the file
    family_keys(
        f,
        arch,
        layers,
        d_model.checked_div(heads).unwrap_or(0),
        &mut c,
    )?;
    Ok((arch.to_string(), c))
}

/// `arch.block_count`, refused past [`MAX_LAYERS`] before anything counts through it.
fn block_count(f: &GgufFile, arch: &str) -> Result<u64> {
    let n = need_u64(f, arch, "block_count")?;
    if n > MAX_LAYERS as u64 {
        return Err(Error::parse(
            &f.path,
            format!("{arch}.block_count ({n}) is absurdly large (at most {MAX_LAYERS})"),
        ));
    }
    Ok(n)
}

/// The vocabulary's size: the metadata's, else the tokenizer's token count, else the
/// embedding's rows.
fn vocab_size(f: &GgufFile, arch: &str) -> Result<u64> {
    if let Some(v) = meta(f, arch, "vocab_size").and_then(Value::as_u64) {
        return Ok(v);
    }
    match f.get("tokenizer.ggml.tokens") {
        Some(Value::Array(t)) => Ok(t.len() as u64),
        _ => {
            let embd = f.tensor("token_embd.weight").ok_or_else(|| {
                Error::parse(&f.path, "no vocabulary size and no token_embd.weight")
            })?;
            Ok(embd.shape[0] as u64)
        }
    }
}

/// The rotary base and scaling (linear only; another type is refused by name).
fn rope_keys(f: &GgufFile, arch: &str, c: &mut Json) -> Result<()> {
    if let Some(t) = meta(f, arch, "rope.freq_base").and_then(Value::as_f64) {
        c["rope_theta"] = t.into();
    }
    match meta(f, arch, "rope.scaling.type").and_then(Value::as_str) {
        None | Some("none") => Ok(()),
        Some("linear") => {
            let factor = meta(f, arch, "rope.scaling.factor").and_then(Value::as_f64);
            c["rope_scaling"] = json!({"rope_type": "linear", "factor": factor});
            Ok(())
        }
        Some(other) => Err(Error::parse(
            &f.path,
            format!("{arch}.rope.scaling.type '{other}' is not supported yet"),
        )),
    }
}

/// The keys one family needs that the metadata leaves implicit (activations, Phi-3's
/// partial rotary, Gemma 2's and 3's query scale, windows and soft caps), with llama.cpp's
/// defaults where the file is silent. `layers`: the block count; `width`: `d_model /
/// heads`, the head width when the file gives none.
fn family_keys(f: &GgufFile, arch: &str, layers: u64, width: u64, c: &mut Json) -> Result<()> {
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
            let head_dim = c.get("head_dim").and_then(Json::as_u64).unwrap_or(width);
            if let Some(rot) = meta(f, arch, "rope.dimension_count").and_then(Value::as_u64) {
                c["partial_rotary_factor"] = (rot as f64 / head_dim as f64).into();
            }
        }
        "gemma2" => {
            let head_dim = c.get("head_dim").and_then(Json::as_u64).unwrap_or(width);
            c["hidden_activation"] = "gelu_pytorch_tanh".into();
            // llama.cpp scales queries by the head width, the 46-layer (27B) model by
            // d_model / heads; sliding windows on even layers, 4096 unless the file says
            c["query_pre_attn_scalar"] = if layers == 46 { width } else { head_dim }.into();
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
            let head_dim = c.get("head_dim").cloned().unwrap_or(width.into());
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
    Ok(())
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

/// The Mixture-of-Experts keys of the `config.json` equivalent, when the file has experts
/// (`layers`: the block count).
fn moe_keys(f: &GgufFile, arch: &str, layers: u64, c: &mut Json) -> Result<()> {
    // llama.cpp's `llama` with experts is Mixtral; a layer without a router
    // (`ffn_gate_inp`) is dense
    if let Some(experts) = meta(f, arch, "expert_count")
        .and_then(Value::as_u64)
        .filter(|&e| e > 0)
    {
        let used = need_u64(f, arch, "expert_used_count")?;
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

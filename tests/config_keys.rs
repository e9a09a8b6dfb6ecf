//! Every `config.json` key that transformers reads for a family we load is either honoured
//! (changing it changes routelm's resolved config) or refused (loading fails), never
//! silently ignored. `tests/fixtures/config_keys.json` lists transformers' keys per
//! `model_type` (written by `scripts/config_keys.py`); each key is changed in turn in a
//! copy of that family's fixture config.

use std::path::{Path, PathBuf};

use routelm::arch;
use serde_json::{json, Value};

mod common;

/// The fixture whose config.json stands for each model_type.
const FIXTURE_OF: &[(&str, &str)] = &[
    ("llama", "llama3"),
    ("mistral", "mistral"),
    ("qwen2", "qwen2"),
    ("qwen3", "qwen3"),
    ("gemma", "gemma"),
    ("gemma2", "gemma2"),
    ("gemma3_text", "gemma3"),
    ("phi3", "phi3"),
    ("phi", "phi2"),
    ("gpt2", "gpt2"),
    ("deepseek_v3", "deepseek_v3"),
    ("mixtral", "mixtral"),
    ("phimoe", "phimoe"),
    ("qwen2_moe", "qwen2_moe"),
    ("qwen3_moe", "qwen3_moe"),
    ("olmoe", "olmoe"),
    ("bloom", "bloom"),
    ("gpt_neox", "gpt_neox"),
    ("t5", "t5_v1_1"),
];

/// Keys that cannot change what a forward pass computes (metadata, token ids, training-only
/// settings, output switches), with why.
const NO_EFFECT: &[(&str, &str)] = &[
    ("architectures", "metadata"),
    ("transformers_version", "metadata"),
    (
        "dtype",
        "storage dtype; routelm computes in the dtype asked for",
    ),
    (
        "bos_token_id",
        "a token id (generation reads generation_config.json)",
    ),
    (
        "eos_token_id",
        "a token id (generation reads generation_config.json)",
    ),
    ("pad_token_id", "a token id"),
    ("use_cache", "an output switch"),
    ("return_dict", "an output switch"),
    ("output_hidden_states", "an output switch"),
    ("output_router_logits", "an output switch"),
    ("id2label", "classification heads"),
    ("label2id", "classification heads"),
    ("problem_type", "classification heads"),
    ("chunk_size_feed_forward", "chunking computes the same"),
    ("is_encoder_decoder", "metadata"),
    ("is_decoder", "metadata"),
    ("add_cross_attention", "not used by causal LMs"),
    ("initializer_range", "initialisation only"),
    ("initializer_factor", "initialisation only"),
    ("attention_dropout", "training only"),
    ("attn_pdrop", "training only"),
    ("embd_pdrop", "training only"),
    ("resid_pdrop", "training only"),
    ("hidden_dropout", "training only"),
    ("dropout_rate", "training only"),
    ("classifier_dropout", "training only"),
    ("summary_activation", "sequence-summary heads"),
    ("summary_first_dropout", "sequence-summary heads"),
    ("summary_proj_to_labels", "sequence-summary heads"),
    ("summary_type", "sequence-summary heads"),
    ("summary_use_proj", "sequence-summary heads"),
    ("router_aux_loss_coef", "training only"),
    (
        "router_jitter_noise",
        "training only (Mixtral); PhiMoE's is honoured",
    ),
    ("input_jitter_noise", "training only"),
    ("pretraining_tp", "tensor-parallel slicing of the same sums"),
    ("slow_but_exact", "tensor-parallel slicing of the same sums"),
    (
        "reorder_and_upcast_attn",
        "attention in float32: what routelm does",
    ),
];

/// Keys whose effect depends on another: they are changed with `context(model_type, key)`
/// applied to both configs, so that the condition holds (a null removes a key).
fn context(model_type: &str, key: &str) -> Value {
    // sliding windows on, by each family's rule, with no `layer_types` to take precedence
    let sliding = match model_type {
        "qwen2" | "qwen3" => {
            json!({"use_sliding_window": true, "sliding_window": 4, "layer_types": null, "max_window_layers": 0})
        }
        // windows on even layers below max_window_layers: 0 -> 1 adds layer 0
        "qwen2_moe" => {
            let below = if key == "max_window_layers" { 0 } else { 28 };
            json!({"use_sliding_window": true, "sliding_window": 4, "layer_types": null, "max_window_layers": below})
        }
        _ => json!({"use_sliding_window": true, "sliding_window": 4}),
    };
    match key {
        "sliding_window" | "max_window_layers" | "layer_types" => sliding,
        "use_sliding_window" => {
            let mut c = sliding;
            c["use_sliding_window"] = json!(false);
            c
        }
        // the pretraining length matters to a scaling that reads it
        "original_max_position_embeddings" => json!({
            "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0},
            "rope_scaling": null, "rope_theta": null
        }),
        // one rope layout at a time
        "rope_parameters" => json!({"rope_scaling": null, "rope_theta": null}),
        _ => json!({}),
    }
}

/// A changed value of the same kind as `v` (`key` picks a sensible one where needed).
fn perturb(key: &str, v: &Value, n_layers: usize) -> Option<Value> {
    Some(match (key, v) {
        ("layer_types", _) => json!((0..n_layers)
            .map(|l| if l == 0 {
                "sliding_attention"
            } else {
                "full_attention"
            })
            .collect::<Vec<_>>()),
        ("mlp_only_layers", _) => json!([0]),
        ("rope_parameters", _) => {
            json!({"rope_type": "linear", "factor": 3.0, "rope_theta": 1234.0})
        }
        ("hidden_act" | "hidden_activation" | "activation_function", _) => json!("relu"),
        ("feed_forward_proj", _) => json!("gated-silu"),
        ("scoring_func", _) => json!("softmax"),
        ("topk_method", _) => json!("greedy"),
        (_, Value::Bool(b)) => json!(!b),
        (_, Value::Number(n)) if n.is_u64() => json!(n.as_u64()? + 1),
        (_, Value::Number(n)) => json!(n.as_f64()? * 1.5 + 0.1),
        (_, Value::String(_)) => json!("routelm-test-value"),
        (_, Value::Null) => json!(2),
        _ => return None,
    })
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The resolved config of `dir` as text (decoder or encoder-decoder), or the error.
fn resolved(dir: &Path) -> Result<String, String> {
    match arch::load_config(dir) {
        Ok((_, c)) => Ok(format!("{c:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// A copy of fixture `name` with `patch` applied to config.json (null removes a key).
fn patched(name: &str, patch: &serde_json::Map<String, Value>, tmp: &Path) -> PathBuf {
    common::patched_fixture(&root().join("hf").join(name), patch, tmp)
}

#[test]
fn every_config_key_transformers_reads_is_honoured_or_refused() {
    let keys: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("config_keys.json")).unwrap())
            .unwrap();
    let tmp = std::env::temp_dir().join(format!("routelm-config-keys-{}", std::process::id()));
    let mut ignored = Vec::new();
    let mut counted = (0, 0, 0);
    for (model_type, fixture) in FIXTURE_OF {
        let defaults = keys["model_types"][model_type]
            .as_object()
            .unwrap_or_else(|| panic!("config_keys.json has no {model_type}"));
        let original: Value = serde_json::from_str(
            &std::fs::read_to_string(root().join("hf").join(fixture).join("config.json")).unwrap(),
        )
        .unwrap();
        let n_layers = original
            .get("num_hidden_layers")
            .and_then(Value::as_u64)
            .unwrap_or(2) as usize;
        for (key, default) in defaults {
            if NO_EFFECT.iter().any(|(k, _)| k == key) {
                continue;
            }
            let base = context(model_type, key)
                .as_object()
                .cloned()
                .unwrap_or_default();
            let current = base
                .get(key)
                .or_else(|| original.get(key))
                .unwrap_or(default);
            let Some(new) = perturb(key, current, n_layers) else {
                panic!("{model_type}: no way to change {key} = {current}");
            };
            let mut changed = base.clone();
            changed.insert(key.clone(), new.clone());
            let before = resolved(&patched(fixture, &base, &tmp));
            let after = resolved(&patched(fixture, &changed, &tmp));
            match (&before, &after) {
                (_, Err(e)) => {
                    counted.1 += 1;
                    println!("{model_type}.{key} = {new}: refused ({e})");
                }
                (Ok(b), Ok(a)) if a != b => counted.0 += 1,
                (Err(e), Ok(_)) => panic!("{model_type}: the context for {key} is refused: {e}"),
                _ => {
                    counted.2 += 1;
                    ignored.push(format!("{model_type}.{key} ({current} -> {new})"));
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    println!(
        "{} keys honoured, {} refused, {} ignored",
        counted.0, counted.1, counted.2
    );
    assert!(
        ignored.is_empty(),
        "keys transformers reads that change nothing in routelm and are not refused:\n  {}",
        ignored.join("\n  ")
    );
}

//! Loading scales linearly with the number of tensors: DeepSeek-V3 checkpoints carry
//! ~90k of them, and a check that compares every tensor with every expected name would
//! take minutes there. A synthetic Mixtral checkpoint (tiny shapes, many experts) is loaded at
//! two sizes ten times apart; the larger must not take more than 30× as long (a linear
//! loader takes ~10×, a quadratic one ~100×).

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

/// A Hugging Face Mixtral folder of 100 layers of width 4 with `experts` experts each
/// (3 tensors an expert, 8 more a layer).
fn write_mixtral(dir: &Path, experts: usize) {
    let layers = 100;
    std::fs::create_dir_all(dir).unwrap();
    let cfg = serde_json::json!({
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "hidden_size": 4, "intermediate_size": 4, "num_hidden_layers": layers,
        "num_attention_heads": 1, "num_key_value_heads": 1, "vocab_size": 8,
        "max_position_embeddings": 8, "rms_norm_eps": 1e-6, "tie_word_embeddings": true,
        "hidden_act": "silu", "num_local_experts": experts, "num_experts_per_tok": 2,
        "sliding_window": null
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let dev = Device::Cpu;
    let m = Tensor::full(0.01f32, (4, 4), &dev).unwrap();
    let v = Tensor::ones(4, DType::F32, &dev).unwrap();
    let router = Tensor::zeros((experts, 4), DType::F32, &dev).unwrap();
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert(
        "model.embed_tokens.weight".into(),
        Tensor::zeros((8, 4), DType::F32, &dev).unwrap(),
    );
    t.insert("model.norm.weight".into(), v.clone());
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for w in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            t.insert(format!("{p}.self_attn.{w}.weight"), m.clone());
        }
        for w in ["input_layernorm", "post_attention_layernorm"] {
            t.insert(format!("{p}.{w}.weight"), v.clone());
        }
        t.insert(format!("{p}.block_sparse_moe.gate.weight"), router.clone());
        for e in 0..experts {
            for w in ["w1", "w2", "w3"] {
                t.insert(
                    format!("{p}.block_sparse_moe.experts.{e}.{w}.weight"),
                    m.clone(),
                );
            }
        }
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
}

fn load_seconds(dir: &Path) -> f64 {
    let t0 = Instant::now();
    let loaded = routelm::arch::load_dir(dir, DType::F32, &Device::Cpu).unwrap();
    let s = t0.elapsed().as_secs_f64();
    assert_eq!(loaded.family, Some("mixtral"));
    s
}

#[test]
fn loading_is_linear_in_the_number_of_tensors() {
    let root = std::env::temp_dir().join(format!("routelm-loading-{}", std::process::id()));
    let (small, large) = (root.join("small"), root.join("large"));
    // ~10k and ~100k tensors
    write_mixtral(&small, 33);
    write_mixtral(&large, 333);
    let s = load_seconds(&small).min(load_seconds(&small));
    let l = load_seconds(&large);
    println!(
        "load: 10k tensors {:.3} s, 100k tensors {:.3} s (ratio {:.1}; linear ≈ 10)",
        s,
        l,
        l / s
    );
    std::fs::remove_dir_all(&root).ok();
    assert!(
        l < 30.0 * s + 0.5,
        "loading 10× the tensors took {:.1}× as long",
        l / s
    );
}

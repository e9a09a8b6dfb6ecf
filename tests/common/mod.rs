//! Shared helpers for the integration tests: tiny configurations covering every layer
//! option, and tensor comparisons.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use routelm::config::{
    BlockKind, DepthConfig, FfnKind, LayerSpec, MlaConfig, ModelConfigFile, MoeConfig, NormKind,
    Position, QkNorm, RopeScaling, Scoring,
};
use routelm::ModelConfig;

/// The file form of [`tiny`]'s base (variant 0: Llama-like).
pub fn tiny_file() -> ModelConfigFile {
    ModelConfigFile {
        vocab_size: Some(40),
        d_model: Some(16),
        n_layers: Some(2),
        n_heads: Some(4),
        max_seq_len: Some(12),
        d_ff: Some(24),
        init_std: Some(0.3),
        ..Default::default()
    }
}

/// A tiny config; `variant` picks the layer options so that together they cover every
/// norm, FFN kind, position scheme, head layout and bias setting.
pub fn tiny(variant: usize) -> ModelConfig {
    let mut f = tiny_file();
    match variant {
        0 => {} // Llama-like: RMSNorm, SwiGLU, RoPE, MHA, tied
        1 => {
            // GPT-2-like: LayerNorm with bias, GELU, learned positions, biases, untied
            f.norm = Some(NormKind::LayerNorm);
            f.norm_bias = Some(true);
            f.ffn = Some(FfnKind::Gelu);
            f.position = Some("learned".into());
            f.qkv_bias = Some(true);
            f.out_bias = Some(true);
            f.ffn_bias = Some(true);
            f.tie_embeddings = Some(false);
        }
        2 => {
            // GQA with GeGLU, partial rotary, q/k/v biases
            f.n_kv_heads = Some(2);
            f.ffn = Some(FfnKind::Geglu);
            f.rotary_dim = Some(2);
            f.qkv_bias = Some(true);
        }
        3 => {
            // MQA, ReLU, no positions, LayerNorm without bias
            f.n_kv_heads = Some(1);
            f.ffn = Some(FfnKind::Relu);
            f.norm = Some(NormKind::LayerNorm);
            f.position = Some("none".into());
        }
        4..=15 => {}
        _ => panic!("no variant {variant}"),
    }
    let mut c = f.resolve("tiny").unwrap();
    match variant {
        4 => {
            // Gemma-2-like: per-head q/k norm, sandwich norms, (1 + w) norms, scaled
            // embeddings, soft-capped attention and logits, alternating sliding window, GQA
            c.qk_norm = QkNorm::PerHead;
            c.sandwich_norms = true;
            c.norm_offset = 1.0;
            c.embed_scale = Some(4.0);
            c.attn_softcap = Some(2.0);
            c.final_softcap = Some(3.0);
            c.attn_scale = Some(0.3);
            c.n_kv_heads = 2;
            c.layers = vec![
                LayerSpec {
                    window: Some(3),
                    ..LayerSpec::default()
                },
                LayerSpec::default(),
            ];
        }
        5 => {
            // GPT-NeoX-like: parallel block, exact GELU, LayerNorm with bias, full q/k norm,
            // head bias, linear rope scaling on half the head
            c.block = BlockKind::Parallel;
            c.ffn = FfnKind::GeluExact;
            c.norm = NormKind::LayerNorm;
            c.norm_bias = true;
            c.qk_norm = QkNorm::Full;
            c.head_bias = true;
            c.tie_embeddings = false;
            c.position = Position::Rope {
                theta: 100.0,
                rotary_dim: 2,
                scaling: RopeScaling::Linear { factor: 2.0 },
            };
        }
        6 => {
            // Phi-2-like: parallel block with one shared norm; Llama-3 rope scaling; window
            c.block = BlockKind::ParallelSharedNorm;
            c.position = Position::Rope {
                theta: 500.0,
                rotary_dim: 4,
                scaling: RopeScaling::Llama3 {
                    factor: 8.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 16.0,
                },
            };
            c.layers = vec![
                LayerSpec {
                    window: Some(4),
                    ..LayerSpec::default()
                };
                2
            ];
        }
        7 => {
            // DeepSeek-like MoE: sigmoid scores, groups, selection bias, renormalised and
            // scaled weights, a gated shared expert; first layer dense
            let moe = MoeConfig {
                scoring: Scoring::Sigmoid,
                routed_scale: 1.5,
                n_groups: 3,
                topk_groups: 2,
                selection_bias: true,
                d_shared: 12,
                shared_gate: true,
                aux_loss_coef: 0.01,
                z_loss_coef: 0.001,
                ..MoeConfig::new(6, 2, 8)
            };
            c.layers = vec![
                LayerSpec::default(),
                LayerSpec {
                    moe: Some(moe),
                    ..LayerSpec::default()
                },
            ];
        }
        8 => {
            // Mixtral-like MoE in every layer with balancing and z losses, GQA; the layers
            // differ in expert count, width and k
            c.n_kv_heads = 2;
            let moe = |n, k, w| MoeConfig {
                aux_loss_coef: 0.02,
                z_loss_coef: 0.001,
                ..MoeConfig::new(n, k, w)
            };
            c.layers = vec![
                LayerSpec {
                    moe: Some(moe(4, 2, 16)),
                    ..LayerSpec::default()
                },
                LayerSpec {
                    moe: Some(moe(6, 3, 8)),
                    ..LayerSpec::default()
                },
            ];
        }
        9 | 10 => {
            // latent attention: low-rank q (variant 9) or full-rank q (10), rotary part of 4,
            // values narrower than queries and keys
            c.head_dim = 6;
            c.position = Position::Rope {
                theta: 1000.0,
                rotary_dim: 4,
                scaling: RopeScaling::None,
            };
            c.mla = Some(MlaConfig {
                q_lora_rank: if variant == 9 { Some(12) } else { None },
                kv_lora_rank: 8,
                qk_nope_dim: 2,
                qk_rope_dim: 4,
                v_head_dim: 3,
            });
        }
        11 => {
            // Mixture-of-Depths: the second block routed at capacity 0.5
            let depth = DepthConfig {
                capacity: 0.5,
                aux_loss_coef: 0.1,
                predictor: 0,
                selection: Default::default(),
                scale: Default::default(),
                keep_first: false,
                skip: Default::default(),
                norm_input: false,
            };
            c.layers = vec![
                LayerSpec::default(),
                LayerSpec {
                    depth: Some(depth),
                    ..LayerSpec::default()
                },
            ];
        }
        12 => {
            // staged MoDE: a routed block whose FFN is a Mixture of Experts, GQA
            c.n_kv_heads = 2;
            let depth = DepthConfig {
                capacity: 0.4,
                aux_loss_coef: 0.1,
                predictor: 5,
                selection: Default::default(),
                scale: Default::default(),
                keep_first: false,
                skip: Default::default(),
                norm_input: false,
            };
            let moe = MoeConfig {
                aux_loss_coef: 0.01,
                ..MoeConfig::new(4, 2, 8)
            };
            c.layers = vec![
                LayerSpec {
                    depth: Some(depth),
                    moe: Some(moe),
                    window: None
                };
                2
            ];
        }
        13 => {
            // BLOOM-like: ALiBi with 3 heads (slopes of a head count that is no power of
            // two), a LayerNorm on the embeddings, biased LayerNorms, GELU, biases
            c.position = Position::Alibi;
            c.embed_norm = true;
            c.norm = NormKind::LayerNorm;
            c.norm_bias = true;
            c.ffn = FfnKind::Gelu;
            c.qkv_bias = true;
            c.out_bias = true;
            c.ffn_bias = true;
            c.n_heads = 3;
            c.n_kv_heads = 3;
            c.head_dim = 4;
        }
        14 => {
            // Gemma-3-like local layer (its own rotary base) before a PhiMoE-like layer
            // (SparseMixer routing)
            c.qk_norm = QkNorm::PerHead;
            c.local_rope_theta = Some(7.0);
            let moe = MoeConfig {
                scoring: Scoring::SparseMixer { eps: 0.3 },
                norm_topk: false,
                aux_loss_coef: 0.01,
                ..MoeConfig::new(4, 2, 8)
            };
            c.layers = vec![
                LayerSpec {
                    window: Some(3),
                    ..LayerSpec::default()
                },
                LayerSpec {
                    moe: Some(moe),
                    ..LayerSpec::default()
                },
            ];
        }
        15 => {
            // integrated MoDE: no-op experts among softmax-routed experts, renormalised
            let moe = MoeConfig {
                aux_loss_coef: 0.01,
                z_loss_coef: 0.001,
                noop_experts: 2,
                ..MoeConfig::new(3, 2, 8)
            };
            c.layers = vec![
                LayerSpec {
                    moe: Some(moe),
                    ..LayerSpec::default()
                };
                2
            ];
        }
        _ => {}
    }
    assert!(c.problems().is_empty(), "{:?}", c.problems());
    c
}

pub const VARIANTS: usize = 16;

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

pub fn ids(v: &[u32], b: usize) -> Tensor {
    Tensor::from_slice(v, (b, v.len() / b), &Device::Cpu).unwrap()
}

/// A copy of the fixture folder `src` under `tmp`, with `patch` applied to its config.json
/// (each key set, or removed where the value is null).
pub fn patched_fixture(
    src: &std::path::Path,
    patch: &serde_json::Map<String, serde_json::Value>,
    tmp: &std::path::Path,
) -> std::path::PathBuf {
    let dst = tmp.join(src.file_name().unwrap());
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).unwrap();
    for f in std::fs::read_dir(src).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dst.join(f.file_name().unwrap())).unwrap();
    }
    let path = dst.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let obj = cfg.as_object_mut().unwrap();
    for (k, v) in patch {
        if v.is_null() {
            obj.remove(k);
        } else {
            obj.insert(k.clone(), v.clone());
        }
    }
    std::fs::write(&path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    dst
}

/// How many damaged copies a damaged-input test makes: `default`, or
/// `ROUTELM_DAMAGED_COPIES` for a longer hunt by hand.
pub fn damaged_copies(default: usize) -> usize {
    std::env::var("ROUTELM_DAMAGED_COPIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `routelm ARGS` run to completion, progress bars off.
pub fn run_routelm(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_routelm"))
        .args(args)
        .env("ROUTELM_NO_PROGRESS", "1")
        .output()
        .unwrap()
}

/// `routelm ARGS`: whether it succeeded, its stdout and its stderr.
pub fn routelm(args: &[&str]) -> (bool, String, String) {
    let out = run_routelm(args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A fresh folder for a short fine-tuning run from the command line: `ft.toml` (a recipe of
/// `steps` steps of 4 × 32 tokens at learning rate `lr`, evaluated once at the end) and
/// `data.txt` (`text` repeated).
pub fn fine_tune_workspace(tag: &str, steps: usize, lr: f64, text: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("routelm-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let recipe = format!(
        "[model]\nd_model = 8\nn_layers = 1\nn_heads = 1\n[train]\nsteps = {steps}\nbatch_size = 4\nseq_len = 32\nlr = {lr:e}\neval_every = {steps}\neval_batches = 1\nlog_every = 3\n"
    );
    std::fs::write(d.join("ft.toml"), recipe).unwrap();
    std::fs::write(d.join("data.txt"), text.repeat(200)).unwrap();
    d
}

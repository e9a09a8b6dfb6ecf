//! The FLOP ledger against an independent hand count, and its parameter count against
//! the parameter table the model is built from.

use routelm::weights::names::param_specs;
use routelm::{FlopLedger, RunFile};

#[test]
fn train_small_matches_hand_count() {
    let preset = RunFile::from_file(std::path::Path::new("configs/train-small.toml")).unwrap();
    let cfg = preset.model.resolve("train-small").unwrap();
    let l = FlopLedger::new(&cfg, 256);
    // d = 256, 6 layers, 8 heads of 32, SwiGLU 704, vocab 256, context 256, untied head.
    let (d, f, v, layers, n) = (256.0, 704.0, 256.0, 6.0, 256.0);
    let qkv = 2.0 * 3.0 * d * d; // 393,216
    let out = 2.0 * d * d; // 131,072
    let ffn = 2.0 * 3.0 * d * f; // 1,081,344
    let attn = 2.0 * 2.0 * d * (n + 1.0) / 2.0; // QK^T and PV over (n+1)/2 keys on average: 131,584
    let head = 2.0 * d * v; // 131,072
    let hand = layers * (qkv + out + ffn + attn) + head;
    assert_eq!(hand, 10_554_368.0);
    assert_eq!(l.forward_per_token(), hand);
    assert_eq!(l.train_per_token(), 3.0 * hand);
    // params: embed + head + per layer (4 d^2 + 3 d f + 2 d) + final norm
    let params = 2 * 256 * 256 + 6 * (4 * 256 * 256 + 3 * 256 * 704 + 2 * 256) + 256;
    assert_eq!(l.total_params, params);
}

#[test]
fn parameter_count_agrees_with_parameter_table() {
    for text in [
        "d_model = 48\nn_layers = 3\nn_heads = 6\nn_kv_heads = 2\nqkv_bias = true\n",
        "d_model = 32\nn_layers = 3\nn_heads = 4\n[moe]\nn_experts = 6\ntop_k = 2\nfirst_dense = 1\nd_shared = 16\nshared_gate = true\nselection_bias = true\n",
        "d_model = 32\nn_layers = 2\nn_heads = 4\nnorm = \"layer_norm\"\nnorm_bias = true\nffn = \"gelu\"\nffn_bias = true\nout_bias = true\nposition = \"learned\"\ntie_embeddings = false\n",
    ] {
        let cfg = RunFile::parse(text, false).unwrap().model.resolve("t").unwrap();
        let table: usize = param_specs(&cfg).iter().map(|s| s.numel()).sum();
        assert_eq!(FlopLedger::new(&cfg, 16).total_params, table, "{text}");
    }
}

/// An MoE layer counts the router plus top_k experts per token; inactive experts are
/// parameters but not active ones.
#[test]
fn moe_ledger_counts_active_experts_only() {
    let dense = RunFile::from_file(std::path::Path::new("configs/train-small.toml"))
        .unwrap()
        .model
        .resolve("d")
        .unwrap();
    let moe = RunFile::from_file(std::path::Path::new("configs/moe.toml"))
        .unwrap()
        .model
        .resolve("m")
        .unwrap();
    let (ld, lm) = (FlopLedger::new(&dense, 256), FlopLedger::new(&moe, 256));
    // same expert FLOPs (2 × 352 = 704 wide), plus a 256 × 8 router per layer
    let router = 6.0 * 2.0 * 256.0 * 8.0;
    assert_eq!(lm.forward_per_token(), ld.forward_per_token() + router);
    let expert = 3 * 256 * 352;
    assert_eq!(
        lm.total_params - ld.total_params,
        6 * (8 * expert - 3 * 256 * 704 + 8 * 256)
    );
    assert_eq!(lm.total_params - lm.active_params, 6 * 6 * expert);
    let table: usize = param_specs(&moe).iter().map(|s| s.numel()).sum();
    assert_eq!(lm.total_params, table);
}

/// Latent attention: the ledger's parameter count matches the parameter table.
#[test]
fn mla_parameter_count_agrees_with_parameter_table() {
    let mut cfg = RunFile::parse(
        "d_model = 32\nn_layers = 2\nn_heads = 4\nhead_dim = 12\nrotary_dim = 4\n",
        false,
    )
    .unwrap()
    .model
    .resolve("t")
    .unwrap();
    for q_lora_rank in [Some(16), None] {
        cfg.mla = Some(routelm::config::MlaConfig {
            q_lora_rank,
            kv_lora_rank: 8,
            qk_nope_dim: 8,
            qk_rope_dim: 4,
            v_head_dim: 6,
        });
        assert!(cfg.problems().is_empty(), "{:?}", cfg.problems());
        let table: usize = param_specs(&cfg).iter().map(|s| s.numel()).sum();
        assert_eq!(FlopLedger::new(&cfg, 16).total_params, table);
    }
}

/// Encoder-decoders (the T5 fixtures): the ledger's parameter count matches the parameter
/// table, which matches the checkpoint (encoder, cross-attention, relative tables).
#[test]
fn encoder_decoder_parameter_count_agrees_with_parameter_table() {
    for name in ["t5", "t5_v1_1", "t5_v1_1_v5"] {
        let dir = std::path::Path::new("tests/fixtures/hf").join(name);
        let (_, cfg) = routelm::arch::load_config(&dir).unwrap();
        assert!(cfg.encoder_layers > 0, "{name}");
        let table: usize = param_specs(&cfg).iter().map(|s| s.numel()).sum();
        let ledger = FlopLedger::new(&cfg, 16);
        assert_eq!(ledger.total_params, table, "{name}");
        assert!(ledger
            .entries
            .iter()
            .any(|e| e.component.starts_with("encoder.layers.0")));
        assert!(ledger
            .entries
            .iter()
            .any(|e| e.component.ends_with("cross.scores")));
    }
}

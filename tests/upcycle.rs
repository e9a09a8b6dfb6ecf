//! Expert upcycling: a dense model turned into a Mixture of Experts whose experts start as
//! copies of its feed-forward blocks computes what the dense model computes at step 0,
//! while its routers already spread the tokens over the experts; training then moves the
//! experts apart, and the result runs like any routelm MoE checkpoint.

mod common;

use std::path::Path;

use candle_core::{DType, Device};
use common::routelm;
use routelm::model::upcycle::{upcycle, Upcycle};
use routelm::model::Model;

const SEQ: [u32; 12] = [5, 17, 3, 39, 22, 8, 0, 31, 12, 7, 44, 2];

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name)
}

/// Every family's block kinds that have a dense feed-forward: SwiGLU (llama3, qwen2),
/// GELU with biases (gpt2), gated GELU with sandwich norms (gemma3), parallel blocks
/// (gpt_neox, phi2).
#[test]
fn upcycled_models_equal_their_dense_models_at_step_zero() {
    for name in ["llama3", "qwen2", "gpt2", "gemma3", "gpt_neox", "phi2"] {
        let (_, cfg, params) =
            routelm::arch::load_params(&fixture(name), DType::F32, &Device::Cpu).unwrap();
        let dense = Model::new(&cfg, &params, name).unwrap();
        let u: Upcycle = "n_experts=4,top_k=2".parse().unwrap();
        let (ucfg, uparams) = upcycle(&cfg, params.clone(), &u, 7).unwrap();
        assert_eq!(ucfg.moe_layers().count(), cfg.n_layers, "{name}");
        let moe = Model::new(&ucfg, &uparams, name).unwrap();
        let x = common::ids(&SEQ, 2);
        let a = dense.forward(&x, None, false).unwrap();
        let b = moe.forward(&x, None, false).unwrap();
        let d = common::max_abs_diff(&a.logits, &b.logits);
        assert!(d <= 1e-5, "{name}: upcycled logits differ by {d}");
        // the router is not degenerate: the tokens go to more than top_k experts
        assert_eq!(b.moe.len(), cfg.n_layers, "{name}");
        for m in &b.moe {
            let used = m.load.iter().filter(|&&n| n > 0).count();
            assert!(used > 2, "{name}: layer {} used {used} experts", m.layer);
            assert_eq!(m.assignments, 2 * x.elem_count(), "{name}");
        }
    }
}

#[test]
fn every_nth_layer_and_bad_specs() {
    let (_, cfg, params) =
        routelm::arch::load_params(&fixture("llama3"), DType::F32, &Device::Cpu).unwrap();
    let u: Upcycle = "n_experts=3,top_k=1,every=2,aux=0".parse().unwrap();
    let (ucfg, uparams) = upcycle(&cfg, params, &u, 1).unwrap();
    let layers: Vec<usize> = ucfg.moe_layers().map(|(l, _)| l).collect();
    let want: Vec<usize> = (0..cfg.n_layers).step_by(2).collect();
    assert_eq!(layers, want);
    assert!(uparams.contains_key("model.layers.0.mlp.experts.2.down_proj.weight"));
    assert!(!uparams.contains_key("model.layers.0.mlp.down_proj.weight"));
    if cfg.n_layers > 1 {
        assert!(uparams.contains_key("model.layers.1.mlp.down_proj.weight"));
    }
    for (spec, says) in [
        ("n_experts=1,top_k=1", "at least 2"),
        ("n_experts=4,top_k=5", "top_k must be from 1 to n_experts"),
        ("n_experts=4,top_k=0", "top_k must be from 1"),
        ("n_experts=4,top_k=2,every=0", "every must be at least 1"),
        ("n_experts=4,top_k=2,aux=-1", "aux must be a number"),
        ("n_experts=4,top_k=2,experts=3", "unknown key"),
        ("n_experts=four", "whole number"),
        ("top_k", "KEY=VALUE"),
    ] {
        let e = spec.parse::<Upcycle>().unwrap_err();
        assert!(e.contains(says), "{spec}: {e}");
    }
    // an MoE model has nothing left to upcycle
    let (_, mcfg, mparams) =
        routelm::arch::load_params(&fixture("mixtral"), DType::F32, &Device::Cpu).unwrap();
    let e = upcycle(&mcfg, mparams, &"n_experts=2,top_k=1".parse().unwrap(), 0).unwrap_err();
    assert!(e.to_string().contains("no layer left"), "{e}");
}

/// `train --init DIR --upcycle …`: the experts, equal at the start, differ after training;
/// the checkpoint is an MoE model that generates.
#[test]
fn train_upcycles_and_the_experts_move_apart() {
    let d = common::fine_tune_workspace(
        "upcycle",
        6,
        3e-3,
        "upcycling corpus: many tokens, a few experts. ",
    );
    let s = |p: &str| d.join(p).to_str().unwrap().to_string();
    let init = fixture("llama3");
    let (ok, _, err) = routelm(&[
        "train",
        "--init",
        init.to_str().unwrap(),
        "--upcycle",
        "n_experts=4,top_k=2",
        "--config",
        &s("ft.toml"),
        "--data",
        &s("data.txt"),
        "--out",
        &s("run"),
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("upcycled:"), "{err}");
    let (_, cfg, params) =
        routelm::arch::load_params(&d.join("run/checkpoint"), DType::F32, &Device::Cpu).unwrap();
    assert!(cfg.moe_layers().count() > 0);
    let w = |e: usize| params[&format!("model.layers.0.mlp.experts.{e}.gate_proj.weight")].clone();
    let moved = common::max_abs_diff(&w(0), &w(1));
    assert!(
        moved > 0.0,
        "experts 0 and 1 are still equal after training"
    );
    let (ok, out, err) = routelm(&[
        "generate",
        "--model",
        &s("run/checkpoint"),
        "--prompt-ids",
        "1,2,3",
        "--max-tokens",
        "4",
        "--temperature",
        "0",
    ]);
    assert!(ok, "{out}{err}");
    // --upcycle needs --init, and a bad spec is a usage error
    let (ok, _, err) = routelm(&["train", "--upcycle", "n_experts=4,top_k=2"]);
    assert!(!ok && err.contains("--init"), "{err}");
    let (ok, _, err) = routelm(&[
        "train",
        "--init",
        init.to_str().unwrap(),
        "--upcycle",
        "n_experts=4,top_k=9",
    ]);
    assert!(!ok && err.contains("top_k must be"), "{err}");
}

/// `compare --init M --upcycle …`: the dense model trained on and its upcycled copy, from
/// the same weights at the same training FLOPs (so the upcycled one, dearer per token,
/// takes fewer steps), both scored on the held-out text.
#[test]
fn compare_upcycled_with_dense_at_equal_flops() {
    let d = common::fine_tune_workspace("compare-upcycle", 4, 1e-3, "experts copy a block. ");
    std::fs::write(d.join("held.txt"), "a block copies experts. ".repeat(30)).unwrap();
    let s = |p: &str| d.join(p).to_str().unwrap().to_string();
    let (ok, out, err) = routelm(&[
        "compare",
        "--init",
        fixture("llama3").to_str().unwrap(),
        "--upcycle",
        "n_experts=4,top_k=2",
        "--config",
        &s("ft.toml"),
        "--data",
        &s("data.txt"),
        "--eval",
        &s("held.txt"),
        "--ctx",
        "32",
        "--chunks",
        "2",
        "--base-steps",
        "6",
        "--evals",
        "3",
        "--out",
        &s("cmp"),
    ]);
    assert!(ok, "{out}{err}");
    assert!(
        err.contains("held-out perplexity") && err.contains("before training"),
        "{err}"
    );
    let md = std::fs::read_to_string(d.join("cmp/report.md")).unwrap();
    let row = |name: &str| -> Vec<String> {
        let line = md
            .lines()
            .find(|l| l.starts_with(&format!("| {name} |")))
            .unwrap_or_else(|| panic!("no {name} row in {md}"));
        line.split('|').map(|c| c.trim().to_string()).collect()
    };
    let (dense, up) = (row("dense"), row("upcycled-4x2"));
    let steps = |r: &[String]| r[4].parse::<usize>().unwrap();
    assert_eq!(steps(&dense), 6, "{md}");
    assert!(steps(&up) < steps(&dense), "{md}");
    for r in [&dense, &up] {
        let ppl: f64 = r[11].parse().unwrap();
        assert!(ppl.is_finite() && ppl > 1.0, "{md}");
    }
    assert!(d.join("cmp/loss_vs_flops.png").exists());
    let _ = std::fs::remove_dir_all(&d);
}

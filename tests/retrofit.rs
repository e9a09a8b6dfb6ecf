//! Depth retrofit: a dense model with routers added to some blocks. At capacity 1 it is the
//! dense model; below it the processed tokens keep their full update while the router
//! still learns through the loss; training with the base frozen changes only the routers,
//! and the result samples and evaluates as a Mixture-of-Depths model.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device, Var};
use common::{max_abs_diff, routelm};
use routelm::model::retrofit::{retrofit, Retrofit};
use routelm::model::Model;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name)
}

const SEQ: [u32; 12] = [5, 17, 3, 39, 22, 8, 0, 31, 12, 7, 44, 2];

#[test]
fn capacity_one_equals_the_base_model() {
    for name in ["llama3", "qwen3", "phi2", "gpt_neox", "gpt2"] {
        let (_, cfg, params) =
            routelm::arch::load_params(&fixture(name), DType::F32, &Device::Cpu).unwrap();
        let base = Model::new(&cfg, &params, name).unwrap();
        let r: Retrofit = "capacity=1,every=1".parse().unwrap();
        let (rcfg, rparams) = retrofit(&cfg, params.clone(), &r, 5).unwrap();
        assert_eq!(rcfg.depth_layers().count(), cfg.n_layers, "{name}");
        let routed = Model::new(&rcfg, &rparams, name).unwrap();
        let x = common::ids(&SEQ, 2);
        let a = base.forward(&x, None, false).unwrap();
        let b = routed.forward(&x, None, false).unwrap();
        assert_eq!(b.depth.len(), cfg.n_layers, "{name}");
        let d = max_abs_diff(&a.logits, &b.logits);
        assert!(d <= 1e-6, "{name}: capacity-1 retrofit differs by {d}");
    }
}

/// Below capacity 1, a token the router passes over skips the block (its logits change),
/// and the router gets a gradient from the language-model loss alone (no auxiliary loss)
/// although the processed tokens' updates are unscaled.
#[test]
fn skipped_tokens_change_the_output_and_the_router_learns_from_the_loss() {
    let (_, cfg, params) =
        routelm::arch::load_params(&fixture("llama3"), DType::F32, &Device::Cpu).unwrap();
    let r: Retrofit = "capacity=0.5,every=1,aux=0".parse().unwrap();
    let (rcfg, rparams) = retrofit(&cfg, params.clone(), &r, 5).unwrap();
    let x = common::ids(&SEQ, 2);
    let y = common::ids(&[17, 3, 39, 22, 8, 0, 31, 12, 7, 44, 2, 9], 2);
    let base = Model::new(&cfg, &params, "base").unwrap();
    let router = "model.layers.0.depth_router.weight";
    let var = Var::from_tensor(&rparams[router]).unwrap();
    let mut live = rparams.clone();
    live.insert(router.into(), var.as_tensor().clone());
    let routed = Model::new(&rcfg, &live, "routed").unwrap();
    let out = routed.forward(&x, None, false).unwrap();
    for d in &out.depth {
        assert_eq!(
            (d.selected, d.tokens),
            (6, 12),
            "half of each of 2 sequences of 6"
        );
    }
    let diff = max_abs_diff(&base.forward(&x, None, false).unwrap().logits, &out.logits);
    assert!(
        diff > 1e-3,
        "skipping half the tokens changed nothing ({diff})"
    );
    let loss = routed.loss(&x, &y).unwrap();
    let g = loss.total.backward().unwrap();
    let grad = g.get(var.as_tensor()).expect("the router got no gradient");
    let norm = grad
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(norm > 0.0, "the router's gradient is zero");
}

#[test]
fn bad_specs_are_named() {
    for (spec, want) in [
        ("capacity=0", "capacity must be"),
        ("capacity=1.5", "capacity must be"),
        ("every=0", "every must be"),
        ("skip=heads", "skip=attention"),
        ("layers=1:x", "whole number"),
        ("width=3", "unknown key"),
    ] {
        let e = spec.parse::<Retrofit>().unwrap_err();
        assert!(e.contains(want), "{spec}: {e}");
    }
    let (_, cfg, params) =
        routelm::arch::load_params(&fixture("llama3"), DType::F32, &Device::Cpu).unwrap();
    let r: Retrofit = "layers=0:9".parse().unwrap();
    let e = retrofit(&cfg, params, &r, 1).unwrap_err().to_string();
    assert!(e.contains("block 9 does not exist"), "{e}");
}

/// `train --init DIR --retrofit …` trains the routers alone (every other weight in the
/// checkpoint is the loaded one, bit for bit); the checkpoint samples (the causal
/// decision) and `perplexity` reports how many tokens the routed blocks processed.
#[test]
fn train_retrofit_trains_only_the_routers() {
    let d = common::fine_tune_workspace(
        "retrofit",
        6,
        1e-2,
        "some tokens can skip a block, others cannot. ",
    );
    let s = |p: &str| d.join(p).to_str().unwrap().to_string();
    let init = fixture("llama3");
    let (ok, _, err) = routelm(&[
        "train",
        "--init",
        init.to_str().unwrap(),
        "--retrofit",
        "capacity=0.5,every=1",
        "--config",
        &s("ft.toml"),
        "--data",
        &s("data.txt"),
        "--out",
        &s("run"),
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("depth retrofit: 2 of 2 blocks"), "{err}");
    let (_, loaded_cfg, loaded) =
        routelm::arch::load_params(&init, DType::F32, &Device::Cpu).unwrap();
    let (_, cfg, ckpt) =
        routelm::arch::load_params(&d.join("run/checkpoint"), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(cfg.depth_layers().count(), loaded_cfg.n_layers);
    for (k, t) in &loaded {
        assert_eq!(max_abs_diff(t, &ckpt[k]), 0.0, "{k} changed");
    }
    let (_, fresh) = retrofit(
        &loaded_cfg,
        loaded.clone(),
        &"capacity=0.5,every=1".parse().unwrap(),
        1337,
    )
    .unwrap();
    let name = "model.layers.0.depth_router.weight";
    assert!(
        max_abs_diff(&fresh[name], &ckpt[name]) > 0.0,
        "the router did not train"
    );
    let (ok, out, err) = routelm(&[
        "generate",
        "--model",
        &s("run/checkpoint"),
        "--prompt-ids",
        "1,2,3",
        "--max-tokens",
        "6",
        "--temperature",
        "0",
        "--ids",
    ]);
    assert!(ok, "{out}{err}");
    std::fs::write(
        d.join("text.txt"),
        "some tokens can skip a block. ".repeat(40),
    )
    .unwrap();
    let (ok, out, err) = routelm(&[
        "perplexity",
        "--model",
        &s("run/checkpoint"),
        "--data",
        &s("text.txt"),
        "--ctx",
        "32",
    ]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("routed blocks processed"), "{out}");
    let (ok, _, err) = routelm(&["train", "--full"]);
    assert!(!ok && err.contains("--retrofit"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}

/// With `keep_first`, a sequence's first token goes through a routed block even when its
/// router score is the lowest (top-k in training, the causal threshold when sampling);
/// without it, it is skipped.
#[test]
fn keep_first_routes_the_first_token_through() {
    use candle_core::Tensor;
    use routelm::config::{DepthConfig, DepthScale, Selection};
    use routelm::routing::{DepthDecision, DepthRouter, DepthStep};
    let (t, d) = (6, 4);
    // feature 0 of token i is i - 2.5: the router's logit rises with the position
    let x: Vec<f32> = (0..t)
        .flat_map(|i| [i as f32 - 2.5, 0.0, 0.0, 0.0])
        .collect();
    let x = Tensor::from_vec(x, (1, t, d), &Device::Cpu).unwrap();
    let mut w = vec![0f32; d];
    w[0] = 1.0;
    for (keep_first, decision) in [
        (false, DepthDecision::TopK),
        (true, DepthDecision::TopK),
        (false, DepthDecision::Threshold),
        (true, DepthDecision::Threshold),
    ] {
        let router = DepthRouter {
            layer: 0,
            weight: Tensor::from_vec(w.clone(), (1, d), &Device::Cpu).unwrap(),
            predictor: None,
            config: DepthConfig {
                capacity: 0.5,
                aux_loss_coef: 0.0,
                predictor: 0,
                selection: Selection::Learned,
                scale: DepthScale::Unit,
                keep_first,
                skip: Default::default(),
                norm_input: false,
            },
        };
        let step = DepthStep {
            start: 0,
            decision,
            seed: 0,
        };
        let rows = router.choose(&x, step).unwrap().rows;
        let want: Vec<u32> = match (keep_first, decision) {
            (false, _) => vec![3, 4, 5],
            (true, DepthDecision::TopK) => vec![0, 4, 5],
            (true, DepthDecision::Threshold) => vec![0, 3, 4, 5],
        };
        assert_eq!(rows[0], want, "keep_first {keep_first}, {decision:?}");
        // a later chunk (a cache of 6 tokens before it) has no first token to keep
        let later = DepthStep { start: 6, ..step };
        let rows = router.choose(&x, later).unwrap().rows;
        assert!(
            !rows[0].contains(&0),
            "keep_first {keep_first}, {decision:?}: {rows:?}"
        );
    }
}

/// `skip=mlp`: every token runs the attention and enters the KV cache, the chosen ones
/// also the feed-forward; `skip=attention`: the chosen tokens run the attention (and
/// alone enter the KV cache), every token the feed-forward. Decoding through the cache
/// (alone, and batched with another sequence) gives the logits of the whole sequence
/// decided causally; the ledger drops only the skipped sub-block's share; at capacity 1
/// the model is the dense one.
#[test]
fn skipping_the_feed_forward_alone() {
    skipping_one_sub_block("mlp");
}

#[test]
fn skipping_the_attention_alone() {
    skipping_one_sub_block("attention");
}

fn skipping_one_sub_block(kind: &str) {
    use candle_core::{IndexOp, Tensor};
    use routelm::model::ForwardOptions;
    use routelm::routing::DepthDecision;
    let (_, cfg, params) =
        routelm::arch::load_params(&fixture("llama3"), DType::F32, &Device::Cpu).unwrap();
    let base = Model::new(&cfg, &params, "base").unwrap();
    let x = common::ids(&SEQ, 1);
    let full1 = retrofit(
        &cfg,
        params.clone(),
        &format!("capacity=1,every=1,skip={kind}").parse().unwrap(),
        3,
    )
    .unwrap();
    let m1 = Model::new(&full1.0, &full1.1, "c1").unwrap();
    let d = max_abs_diff(
        &base.forward(&x, None, false).unwrap().logits,
        &m1.forward(&x, None, false).unwrap().logits,
    );
    assert!(d <= 1e-6, "capacity 1, skip={kind}: {d}");
    let (rcfg, rparams) = retrofit(
        &cfg,
        params.clone(),
        &format!("capacity=0.5,every=1,skip={kind}").parse().unwrap(),
        3,
    )
    .unwrap();
    let m = Model::new(&rcfg, &rparams, kind).unwrap();
    let opts = ForwardOptions {
        depth: Some(DepthDecision::Threshold),
        ..Default::default()
    };
    let full = m.forward_with(&x, None, opts).unwrap();
    assert!(max_abs_diff(&full.logits, &base.forward(&x, None, false).unwrap().logits) > 1e-3);
    let mut cache = m.new_cache();
    let mut parts = Vec::new();
    for t in 0..SEQ.len() {
        let step = m
            .forward(&x.i((.., t..t + 1)).unwrap(), Some(&mut cache), false)
            .unwrap();
        parts.push(step.logits);
    }
    let d = max_abs_diff(&full.logits, &Tensor::cat(&parts, 1).unwrap());
    assert!(d <= 1e-5, "skip={kind}: cached decoding differs by {d}");
    let mut skipped = 0;
    for (l, s) in full.depth.iter().enumerate() {
        let cached = if kind == "mlp" { SEQ.len() } else { s.selected };
        assert_eq!(cache.layers[l].len(), cached, "layer {l}: tokens cached");
        skipped += s.tokens - s.selected;
    }
    assert!(skipped > 0, "no token skipped a sub-block");
    // batched with another sequence, one token each: as each alone
    let mut alone = [m.new_cache(), m.new_cache()];
    let mut batch = [m.new_cache(), m.new_cache()];
    for (i, c) in alone.iter_mut().chain(batch.iter_mut()).enumerate() {
        let p = if i % 2 == 0 { &SEQ[..4] } else { &SEQ[2..9] };
        m.forward(&common::ids(p, 1), Some(c), true).unwrap();
    }
    let tokens = [7u32, 21];
    let mut refs: Vec<&mut routelm::model::Cache> = batch.iter_mut().collect();
    let (logits, _) = m.decode_batch(&tokens, &mut refs).unwrap();
    for (i, c) in alone.iter_mut().enumerate() {
        let out = m
            .forward(&common::ids(&[tokens[i]], 1), Some(c), true)
            .unwrap();
        let v = out.logits.dim(candle_core::D::Minus1).unwrap();
        let d = max_abs_diff(
            &out.logits.reshape((1, v)).unwrap(),
            &logits.i(i..i + 1).unwrap(),
        );
        assert!(
            d <= 1e-5,
            "skip={kind}, row {i}: batched logits differ by {d}"
        );
    }
    // the ledger: the skipped sub-blocks at half their cost, the other in full
    let ffn = |c: &routelm::ModelConfig| {
        let l = routelm::FlopLedger::new(c, 64);
        (l.forward_per_token(), l.dense_forward_per_token())
    };
    let (dense, _) = ffn(&cfg);
    let (sub, _) = ffn(&rcfg);
    let block = ffn(
        &retrofit(&cfg, params, &"capacity=0.5,every=1".parse().unwrap(), 3)
            .unwrap()
            .0,
    )
    .0;
    assert!(
        block < sub && sub < dense,
        "block {block}, {kind} {sub}, dense {dense}"
    );
}

/// `compare --init`: the base model and one retrofit per (capacity, skip) setting, each
/// trained by `routelm train` in a child process, in one table and plot. At capacity 1 a
/// retrofit processes every token and scores the base model's perplexity; a rerun reuses
/// the finished settings; a bad skip kind is refused before anything trains.
#[test]
fn compare_init_sweeps_the_settings_against_the_base_model() {
    let d = common::fine_tune_workspace("compare-init", 3, 1e-2, "a token may skip a block. ");
    std::fs::write(d.join("held.txt"), "a block may skip a token. ".repeat(30)).unwrap();
    let s = |p: &str| d.join(p).to_str().unwrap().to_string();
    let init = fixture("llama3");
    let args = |skips: &str| {
        vec![
            "compare".to_string(),
            "--init".into(),
            init.to_str().unwrap().into(),
            "--capacities".into(),
            "0.5,1".into(),
            "--skips".into(),
            skips.into(),
            "--config".into(),
            s("ft.toml"),
            "--data".into(),
            s("data.txt"),
            "--eval".into(),
            s("held.txt"),
            "--ctx".into(),
            "32".into(),
            "--chunks".into(),
            "2".into(),
            "--decode-tokens".into(),
            "4".into(),
            "--rounds".into(),
            "1".into(),
            "--out".into(),
            s("cmp"),
        ]
    };
    let run = |skips: &str| {
        let a = args(skips);
        routelm(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let (ok, _, err) = run("heads");
    assert!(!ok && err.contains("skip=attention"), "{err}");
    assert!(!d.join("cmp").exists(), "a refused sweep trained something");
    let (ok, out, err) = run("attention,mlp");
    assert!(ok, "{out}{err}");
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(d.join("cmp/report.json")).unwrap()).unwrap();
    assert_eq!(rows.len(), 5, "{rows:?}");
    let base = &rows[0];
    assert_eq!(base["name"], "base");
    assert_eq!(base["trainable"], 0);
    let ppl = |r: &serde_json::Value| r["perplexity"].as_f64().unwrap();
    for r in &rows[1..] {
        assert!(r["trainable"].as_u64().unwrap() > 0, "{r}");
        assert!(r["decode_tps"].as_f64().unwrap() > 0.0, "{r}");
        if cfg!(unix) {
            assert!(r["peak_rss_mb"].as_f64().unwrap() > 0.0, "{r}");
        }
        if r["capacity"].as_f64() == Some(1.0) {
            assert_eq!(r["processed"].as_f64(), Some(1.0), "{r}");
            let rel = (ppl(r) / ppl(base) - 1.0).abs();
            assert!(rel < 1e-4, "capacity 1 is the base model: {r} vs {base}");
        } else {
            assert!(r["processed"].as_f64().unwrap() < 1.0, "{r}");
        }
    }
    let md = std::fs::read_to_string(d.join("cmp/report.md")).unwrap();
    assert!(md.contains("| attention-c50 | attention | 50% |"), "{md}");
    assert!(d.join("cmp/quality_speed.png").exists() && d.join("cmp/quality_flops.png").exists());
    let (ok, _, err) = run("attention,mlp");
    assert!(ok && err.matches("reusing").count() == 4, "{err}");
    let _ = std::fs::remove_dir_all(&d);
}

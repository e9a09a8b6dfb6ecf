//! LoRA: adapters that peft wrote give transformers' logits through routelm, adapters
//! routelm writes read back the same, merging folds exactly `W + (alpha/r)·B A`, adapter
//! gradients equal finite differences, and training through adapters leaves every base
//! weight bit for bit as loaded.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use common::{max_abs_diff, routelm};
use routelm::model::{lora, Model};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The adapters peft made (tests/fixtures/lora, by scripts/make_lora_fixtures.py).
const PEFT_FIXTURES: [&str; 3] = ["llama3", "phi2", "deepseek_v3"];

fn base(name: &str) -> PathBuf {
    root().join("tests/fixtures/hf").join(name)
}

fn adapter(name: &str) -> PathBuf {
    root().join("tests/fixtures/lora").join(name)
}

fn reference(name: &str) -> BTreeMap<String, Tensor> {
    candle_core::safetensors::load(adapter(name).join("reference.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

fn logits(model: &Model, ids: &Tensor) -> Tensor {
    model.forward(ids, None, false).unwrap().logits
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("routelm-lora-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Through routelm, each peft adapter gives the logits transformers + peft computed (and
/// moves them far from the base model's), with the base weights read in place and with
/// them converted; decoding through the cache gives the last position's logits too.
#[test]
fn peft_adapters_give_transformers_logits() {
    for name in PEFT_FIXTURES {
        let r = reference(name);
        let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
        let want = &r["logits"];
        let plain = routelm::arch::load_dir(&base(name), DType::F32, &Device::Cpu).unwrap();
        let d = max_abs_diff(&logits(&plain.model, &ids), &r["base_logits"]);
        assert!(d <= 1e-4, "{name}: base logits differ by {d}");
        let moved = max_abs_diff(want, &r["base_logits"]);
        assert!(
            moved > 1.0,
            "{name}: the adapter moves the logits by only {moved}"
        );
        let m = routelm::arch::load_dir_with(
            &base(name),
            Some(&adapter(name)),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
        .model;
        let got = logits(&m, &ids);
        let d = max_abs_diff(&got, want);
        assert!(
            d <= 1e-4,
            "{name}: adapted logits differ from peft's by {d}"
        );
        // the same through the parameter tables (no weights kept in their stored form)
        let (_, cfg, mut params) =
            routelm::arch::load_params(&base(name), DType::F32, &Device::Cpu).unwrap();
        let names = routelm::arch::published_modules(&base(name)).unwrap();
        let (acfg, adapters) = lora::load_peft(&adapter(name), &cfg, &names).unwrap();
        params.extend(adapters);
        let owned = Model::new(&acfg, &params, name).unwrap();
        let d = max_abs_diff(&logits(&owned, &ids), want);
        assert!(
            d <= 1e-4,
            "{name}: adapted logits (owned weights) differ by {d}"
        );
        // decoding: the prefix through the cache, then the last token alone
        let t = ids.dim(1).unwrap();
        let row = ids.narrow(0, 0, 1).unwrap();
        let mut cache = m.new_cache();
        m.forward(&row.narrow(1, 0, t - 1).unwrap(), Some(&mut cache), false)
            .unwrap();
        let last = m
            .forward(&row.narrow(1, t - 1, 1).unwrap(), Some(&mut cache), true)
            .unwrap()
            .logits;
        let full = want.narrow(0, 0, 1).unwrap().narrow(1, t - 1, 1).unwrap();
        let d = max_abs_diff(&last.reshape(full.shape()).unwrap(), &full);
        assert!(d <= 1e-4, "{name}: decoded last-token logits differ by {d}");
    }
}

/// An adapter routelm writes for a base reads back to the same tensors under the same
/// module names, including renamed (Phi-2's dense, fc1, fc2) and row-reordered
/// (DeepSeek's rotary rows) projections; the written files are PEFT's names.
#[test]
fn written_adapters_read_back_equal() {
    for name in PEFT_FIXTURES {
        let (_, cfg, _) =
            routelm::arch::load_params(&base(name), DType::F32, &Device::Cpu).unwrap();
        let names = routelm::arch::published_modules(&base(name)).unwrap();
        let (acfg, adapters) = lora::load_peft(&adapter(name), &cfg, &names).unwrap();
        let dir = tmp(&format!("rt-{name}"));
        lora::save_peft(&dir.join("a"), &acfg, &adapters, &names, "base").unwrap();
        let (acfg2, back) = lora::load_peft(&dir.join("a"), &cfg, &names).unwrap();
        assert_eq!(
            acfg.lora.as_ref().unwrap().r,
            acfg2.lora.as_ref().unwrap().r
        );
        assert_eq!(
            acfg.lora.as_ref().unwrap().alpha,
            acfg2.lora.as_ref().unwrap().alpha
        );
        assert_eq!(adapters.len(), back.len(), "{name}");
        for (k, t) in &adapters {
            assert_eq!(max_abs_diff(t, &back[k]), 0.0, "{name}: {k}");
        }
        // the file's tensor names are peft's: the same set as peft's own file
        let theirs: Vec<String> = routelm::weights::load_safetensors(
            &adapter(name).join("adapter_model.safetensors"),
            None,
            &Device::Cpu,
        )
        .unwrap()
        .into_keys()
        .collect();
        let ours: Vec<String> = routelm::weights::load_safetensors(
            &dir.join("a/adapter_model.safetensors"),
            None,
            &Device::Cpu,
        )
        .unwrap()
        .into_keys()
        .collect();
        assert_eq!(theirs, ours, "{name}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Merging: each adapted weight becomes `W + (alpha/r)·B A` (checked in f64 from the
/// values), the adapters are gone, and the merged model computes the adapted logits.
#[test]
fn merged_weights_equal_base_plus_scaled_ba() {
    for name in PEFT_FIXTURES {
        let (_, cfg, mut params) =
            routelm::arch::load_params(&base(name), DType::F32, &Device::Cpu).unwrap();
        let names = routelm::arch::published_modules(&base(name)).unwrap();
        let (acfg, adapters) = lora::load_peft(&adapter(name), &cfg, &names).unwrap();
        params.extend(adapters.clone());
        let (mcfg, merged) = lora::merge(&acfg, &params).unwrap();
        assert!(mcfg.lora.is_none());
        assert!(!merged.keys().any(|k| k.contains("lora_")));
        let l = acfg.lora.as_ref().unwrap();
        let scale = l.alpha / l.r as f64;
        let module = adapters
            .keys()
            .find_map(|k| k.strip_suffix(".lora_A.weight"))
            .unwrap();
        let get = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
        let a = get(&adapters[&format!("{module}.lora_A.weight")]);
        let b = get(&adapters[&format!("{module}.lora_B.weight")]);
        let w = get(&params[&format!("{module}.weight")]);
        let m = get(&merged[&format!("{module}.weight")]);
        for i in 0..w.len() {
            for j in 0..w[0].len() {
                let ba: f64 = (0..a.len()).map(|k| b[i][k] * a[k][j]).sum();
                let want = w[i][j] + scale * ba;
                assert!(
                    (m[i][j] - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "{name} {module}[{i},{j}]"
                );
            }
        }
        let r = reference(name);
        let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
        let model = Model::new(&mcfg, &merged, name).unwrap();
        let d = max_abs_diff(&logits(&model, &ids), &r["logits"]);
        assert!(d <= 1e-4, "{name}: merged logits differ from peft's by {d}");
    }
}

/// Gradients of the loss with respect to the adapters, through a whole (f64) model of
/// each tiny variant, equal central finite differences; the frozen base gets none.
#[test]
fn adapter_gradients_match_finite_differences() {
    for variant in [0, 1, 2] {
        let mut cfg = common::tiny(variant);
        cfg.lora = Some("r=2,alpha=3,targets=q,k,v,o,gate,up,down".parse().unwrap());
        let mut p = routelm::model::init::init_params(&cfg, 11, DType::F64, &Device::Cpu).unwrap();
        // B starts at zero (so A would get no gradient): fill it too
        for (k, t) in p.iter_mut() {
            if k.ends_with("lora_B.weight") {
                let n = t.elem_count();
                let v: Vec<f64> = (0..n)
                    .map(|i| 0.5 * ((i * 7 + k.len()) as f64).sin())
                    .collect();
                *t = Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap();
            }
        }
        let x = common::ids(&[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8], 2);
        let y = common::ids(&[1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9], 2);
        let loss = |params: &BTreeMap<String, Tensor>| {
            Model::new(&cfg, params, "test")
                .unwrap()
                .loss(&x, &y)
                .unwrap()
                .total
        };
        let vars: BTreeMap<String, Var> = p
            .iter()
            .filter(|(k, _)| k.contains("lora_"))
            .map(|(k, t)| (k.clone(), Var::from_tensor(t).unwrap()))
            .collect();
        assert!(
            vars.len() >= 8,
            "variant {variant}: {} adapter tensors",
            vars.len()
        );
        let mut live = p.clone();
        for (k, v) in &vars {
            live.insert(k.clone(), v.as_tensor().clone());
        }
        let grads = loss(&live).backward().unwrap();
        for (k, t) in &live {
            if !k.contains("lora_") {
                assert!(
                    grads.get(t).is_none(),
                    "variant {variant}: frozen {k} got a gradient"
                );
            }
        }
        for (name, var) in &vars {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("variant {variant}: no gradient for {name}"));
            let flat = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let n = flat.len();
            for i in [0, n / 2, n - 1] {
                let at = |delta: f64| {
                    let mut v = p[name].flatten_all().unwrap().to_vec1::<f64>().unwrap();
                    v[i] += delta;
                    let mut q = p.clone();
                    q.insert(
                        name.clone(),
                        Tensor::from_vec(v, p[name].shape(), &Device::Cpu).unwrap(),
                    );
                    loss(&q).to_scalar::<f64>().unwrap()
                };
                let h = 1e-5;
                let fd = (at(h) - at(-h)) / (2.0 * h);
                assert!(
                    (fd - flat[i]).abs() < 1e-6 * (1.0 + fd.abs()),
                    "variant {variant} {name}[{i}]: finite difference {fd}, autograd {}",
                    flat[i]
                );
            }
        }
    }
}

/// Fresh adapters leave the model's outputs as they were (B starts at zero), and a
/// target the model lacks is refused with the projections it has.
#[test]
fn fresh_adapters_change_nothing_and_bad_targets_are_named() {
    let (_, cfg, params) =
        routelm::arch::load_params(&base("llama3"), DType::F32, &Device::Cpu).unwrap();
    let ids = common::ids(&[5, 17, 3, 39, 22, 8, 0, 31], 2);
    let before = logits(&Model::new(&cfg, &params, "base").unwrap(), &ids);
    let spec: routelm::config::LoraConfig = "r=4,targets=q,k,v,o,gate,up,down".parse().unwrap();
    let (acfg, ap) = lora::attach(&cfg, params.clone(), &spec, 3).unwrap();
    let after = logits(&Model::new(&acfg, &ap, "adapted").unwrap(), &ids);
    assert_eq!(max_abs_diff(&before, &after), 0.0);
    let bad: routelm::config::LoraConfig = "targets=query_key_value".parse().unwrap();
    let err = lora::attach(&cfg, params, &bad, 3).unwrap_err().to_string();
    assert!(
        err.contains("query_key_value") && err.contains("q_proj"),
        "{err}"
    );
    for (spec, want) in [
        ("r=0", "r must be"),
        ("alpha=-1", "alpha must be"),
        ("dropout=0.1", "dropout"),
        ("rank=4", "unknown key"),
        ("targets=q,k/v", "not a module name"),
    ] {
        let e = spec.parse::<routelm::config::LoraConfig>().unwrap_err();
        assert!(e.contains(want), "{spec}: {e}");
    }
}

/// `train --init DIR --lora …` trains the adapters alone: every base weight in the
/// checkpoint is bit for bit the loaded one, the adapters moved, OUT/adapter loads back as
/// a PEFT adapter on the base (`generate --lora`), and OUT/merged (--merge, the base's
/// layout) computes the same logits as base + adapter.
#[test]
fn train_lora_freezes_the_base_and_writes_peft_and_merged() {
    let d = common::fine_tune_workspace(
        "lora-train",
        8,
        1e-2,
        "low rank adapters learn a small change. ",
    );
    let s = |p: &str| d.join(p).to_str().unwrap().to_string();
    let init = base("llama3");
    let (ok, _, err) = routelm(&[
        "train",
        "--init",
        init.to_str().unwrap(),
        "--lora",
        "r=4,alpha=8,targets=q,v,down",
        "--merge",
        "--config",
        &s("ft.toml"),
        "--data",
        &s("data.txt"),
        "--out",
        &s("run"),
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("the base weights are frozen"), "{err}");
    let (_, cfg, loaded) = routelm::arch::load_params(&init, DType::F32, &Device::Cpu).unwrap();
    let ckpt = routelm::weights::load_safetensors(
        &d.join("run/checkpoint/model.safetensors"),
        None,
        &Device::Cpu,
    )
    .unwrap();
    for (k, t) in &loaded {
        assert_eq!(
            max_abs_diff(t, &ckpt[k]),
            0.0,
            "base weight {k} changed in training"
        );
    }
    let moved: f64 = ckpt
        .iter()
        .filter(|(k, _)| k.ends_with("lora_B.weight"))
        .map(|(_, t)| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        })
        .fold(0.0, f64::max);
    assert!(moved > 0.0, "the adapters did not train");
    // the optimizer state covers the adapters alone
    let opt = routelm::weights::load_safetensors(
        &d.join("run/checkpoint/optimizer.safetensors"),
        None,
        &Device::Cpu,
    )
    .unwrap();
    assert!(
        opt.keys().all(|k| k.contains("lora_")),
        "{:?}",
        opt.keys().next()
    );
    // base + adapter (PEFT folder) vs the merged folder, through the loaders users use
    let ids = common::ids(&[5, 17, 3, 39, 22, 8, 0, 31], 2);
    let adapted = routelm::arch::load_dir_with(
        &init,
        Some(&d.join("run/adapter")),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
    .model;
    let merged = routelm::arch::load_dir(&d.join("run/merged"), DType::F32, &Device::Cpu)
        .unwrap()
        .model;
    let base_model = Model::new(&cfg, &loaded, "base").unwrap();
    let (a, m, b) = (
        logits(&adapted, &ids),
        logits(&merged, &ids),
        logits(&base_model, &ids),
    );
    assert!(
        max_abs_diff(&a, &m) <= 1e-4,
        "merged vs adapted: {}",
        max_abs_diff(&a, &m)
    );
    assert!(max_abs_diff(&a, &b) > 1e-4, "the adapter changes nothing");
    let (ok, out, err) = routelm(&[
        "generate",
        "--model",
        init.to_str().unwrap(),
        "--lora",
        &s("run/adapter"),
        "--prompt-ids",
        "1,2,3",
        "--max-tokens",
        "4",
        "--temperature",
        "0",
        "--ids",
    ]);
    assert!(ok, "{out}{err}");
    // usage errors: --lora needs --init, --merge needs adapters, a bad adapter folder
    let (ok, _, err) = routelm(&["train", "--lora", "r=4"]);
    assert!(!ok && err.contains("--init"), "{err}");
    let (ok, _, err) = routelm(&[
        "train",
        "--init",
        init.to_str().unwrap(),
        "--merge",
        "--config",
        &s("ft.toml"),
        "--out",
        &s("run2"),
    ]);
    assert!(!ok && err.contains("--merge"), "{err}");
    let (ok, _, err) = routelm(&[
        "generate",
        "--model",
        init.to_str().unwrap(),
        "--lora",
        &s("nowhere"),
        "--prompt-ids",
        "1",
    ]);
    assert!(!ok && err.contains("adapter_config.json"), "{err}");
    let (ok, _, err) = routelm(&[
        "generate",
        "--model",
        base("phi2").to_str().unwrap(),
        "--lora",
        &s("run/adapter"),
        "--prompt-ids",
        "1",
    ]);
    assert!(!ok && err.contains("lora"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}

/// `routelm verify BASE --lora ADAPTER` compares with the reference in the adapter folder.
#[test]
fn verify_takes_an_adapter() {
    for name in PEFT_FIXTURES {
        let (ok, out, err) = routelm(&[
            "verify",
            base(name).to_str().unwrap(),
            "--lora",
            adapter(name).to_str().unwrap(),
        ]);
        assert!(ok && out.contains("PASS"), "{name}: {out}{err}");
    }
    // against the base's own reference, the adapted model fails
    let (ok, out, _) = routelm(&[
        "verify",
        base("llama3").to_str().unwrap(),
        "--lora",
        adapter("llama3").to_str().unwrap(),
        "--reference",
        base("llama3").to_str().unwrap(),
    ]);
    assert!(!ok && out.contains("FAIL"), "{out}");
}

/// Adapter settings routelm does not run are refused by name, naming the file: another
/// PEFT type, DoRA, per-module ranks, a trained bias, saved modules, a zero rank; and
/// adapter tensors that do not fit the model (one missing, one extra) are each listed.
#[test]
fn adapters_routelm_cannot_run_are_refused_by_name() {
    let src = adapter("llama3");
    let text = std::fs::read_to_string(src.join("adapter_config.json")).unwrap();
    let config: serde_json::Value = serde_json::from_str(&text).unwrap();
    let load = |dir: &std::path::Path| {
        routelm::arch::load_dir_with(&base("llama3"), Some(dir), DType::F32, &Device::Cpu)
            .err()
            .map(|e| e.to_string())
    };
    let cases: [(&str, serde_json::Value, &str); 6] = [
        ("peft_type", "IA3".into(), "peft_type \"IA3\""),
        ("use_dora", true.into(), "DoRA"),
        (
            "rank_pattern",
            serde_json::json!({"q_proj": 8}),
            "per-module ranks",
        ),
        ("lora_bias", true.into(), "lora_bias is set"),
        (
            "modules_to_save",
            serde_json::json!(["lm_head"]),
            "modules_to_save is set",
        ),
        ("r", 0.into(), "r and lora_alpha must be positive"),
    ];
    for (i, (key, value, want)) in cases.into_iter().enumerate() {
        let dir = tmp(&format!("refused-{i}"));
        std::fs::copy(
            src.join("adapter_model.safetensors"),
            dir.join("adapter_model.safetensors"),
        )
        .unwrap();
        let mut c = config.clone();
        c[key] = value;
        std::fs::write(dir.join("adapter_config.json"), c.to_string()).unwrap();
        let err = load(&dir).unwrap_or_else(|| panic!("{key}: loaded"));
        assert!(err.contains(want), "{key}: {err}");
        assert!(err.contains("adapter_config.json"), "{key}: {err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
    // one adapter tensor renamed: the projection it belonged to has none, and the new
    // name adapts nothing
    let dir = tmp("refused-tensors");
    std::fs::copy(
        src.join("adapter_config.json"),
        dir.join("adapter_config.json"),
    )
    .unwrap();
    let mut tensors =
        candle_core::safetensors::load(src.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let (name, _) = tensors
        .iter()
        .find(|(n, _)| n.contains("layers.0.self_attn.q_proj.lora_A"))
        .map(|(n, t)| (n.clone(), t.clone()))
        .unwrap();
    let t = tensors.remove(&name).unwrap();
    tensors.insert(name.replace("layers.0.", "layers.99."), t);
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors")).unwrap();
    let err = load(&dir).expect("loaded with a renamed tensor");
    assert!(err.contains("adapter_model.safetensors"), "{err}");
    assert!(err.contains("layers.99"), "{err}");
    assert!(
        err.contains("no adapter for model.layers.0.self_attn.q_proj.lora_A"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

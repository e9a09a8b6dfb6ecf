//! Bad input gives a clear error naming the file and the problem, a non-zero exit, and
//! no panic — through the command line, as a user meets it.

mod common;

use candle_core::{DType, Device};
use routelm::model::init::init_params;
use std::path::{Path, PathBuf};

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("routelm-err-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Run `routelm ARGS`, expect failure, return stderr.
fn fails(args: &[&str]) -> String {
    let (ok, _, err) = common::routelm(args);
    assert!(!ok, "expected failure for {args:?}");
    assert!(!err.contains("panicked"), "panic for {args:?}: {err}");
    err
}

fn saved_model(name: &str) -> PathBuf {
    let d = dir(name);
    let cfg = common::tiny(0);
    let p = init_params(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
    routelm::weights::save_model_dir(&d, &cfg, &p).unwrap();
    d
}

fn gen(model: &Path) -> String {
    fails(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt-ids",
        "1,2,3",
        "--max-tokens",
        "2",
    ])
}

#[test]
fn truncated_weights() {
    let d = saved_model("trunc");
    let f = d.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let err = gen(&d);
    assert!(
        err.contains("model.safetensors") && err.contains("not a valid safetensors file"),
        "{err}"
    );
}

#[test]
fn corrupt_header() {
    let d = saved_model("corrupt");
    let f = d.join("model.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    for b in bytes.iter_mut().skip(8).take(40) {
        *b = b'#';
    }
    std::fs::write(&f, &bytes).unwrap();
    let err = gen(&d);
    assert!(
        err.contains("model.safetensors") && err.contains("not a valid safetensors file"),
        "{err}"
    );
}

#[test]
fn config_that_does_not_match_the_tensors() {
    let d = saved_model("mismatch");
    let mut cfg = common::tiny(0);
    cfg.d_ff = 32; // tensors were saved with d_ff 24
    cfg.n_layers = 3;
    std::fs::write(d.join("config.json"), serde_json::to_string(&cfg).unwrap()).unwrap();
    let err = gen(&d);
    assert!(
        err.contains("model.safetensors: weights do not match the configuration"),
        "{err}"
    );
    assert!(
        err.contains(
            "model.layers.0.mlp.up_proj.weight has shape [24, 16], the config implies [32, 16]"
        ),
        "{err}"
    );
    assert!(
        err.contains("missing tensor model.layers.2.input_layernorm.weight"),
        "{err}"
    );
}

#[test]
fn missing_files() {
    let d = dir("missing");
    let err = gen(&d);
    assert!(
        err.contains("config.json") && err.contains("No such file"),
        "{err}"
    );
    let d = saved_model("missing-weights");
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    let err = gen(&d);
    assert!(
        err.contains("model.safetensors") && err.contains("No such file"),
        "{err}"
    );
    let err = fails(&["train", "--config", "no-such-preset.toml"]);
    assert!(
        err.contains("no-such-preset.toml: no such file, and not a preset name"),
        "{err}"
    );
}

#[test]
fn invalid_and_unknown_config_keys() {
    let d = dir("badcfg");
    let f = d.join("bad.toml");
    std::fs::write(&f, "[model]\nd_model = 100\nn_layers = 2\nn_heads = 3\n").unwrap();
    let err = fails(&["flops", "--config", f.to_str().unwrap()]);
    assert!(
        err.contains("bad.toml") && err.contains("n_heads (3) must divide d_model (100)"),
        "{err}"
    );
    std::fs::write(
        &f,
        "[model]\nd_model = 64\nn_layers = 2\nn_heads = 4\nn_embd = 3\n",
    )
    .unwrap();
    let err = fails(&["flops", "--config", f.to_str().unwrap()]);
    assert!(err.contains("bad.toml") && err.contains("n_embd"), "{err}");
    std::fs::write(
        &f,
        "[model]\nd_model = 64\nn_layers = 2\nn_heads = 4\nvocab_size = 1000000000000\n",
    )
    .unwrap();
    let err = fails(&["inspect", f.to_str().unwrap()]);
    assert!(
        err.contains("vocab_size (1000000000000) is larger than"),
        "{err}"
    );
}

#[test]
fn prompt_longer_than_context_and_bad_token() {
    let d = saved_model("prompt");
    let long: Vec<String> = (0..13).map(|i| (i % 40).to_string()).collect();
    let err = fails(&[
        "generate",
        "--model",
        d.to_str().unwrap(),
        "--prompt-ids",
        &long.join(","),
    ]);
    assert!(
        err.contains("the prompt has 13 tokens, more than the model's context window of 12"),
        "{err}"
    );
    let err = fails(&[
        "generate",
        "--model",
        d.to_str().unwrap(),
        "--prompt-ids",
        "1,99",
    ]);
    assert!(
        err.contains("prompt token 99 is out of range for a vocabulary of 40"),
        "{err}"
    );
}

/// A copy of a fixture folder to break.
fn fixture_copy(name: &str, tag: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name);
    let d = dir(tag);
    for f in [
        "config.json",
        "model.safetensors",
        "reference.safetensors",
        "meta.json",
    ] {
        std::fs::copy(src.join(f), d.join(f)).unwrap();
    }
    d
}

fn edit_config(d: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = d.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
}

#[test]
fn unknown_architecture_lists_the_known_ones() {
    let d = fixture_copy("llama3", "unknown-arch");
    edit_config(&d, |v| v["model_type"] = "transformer9000".into());
    let err = gen(&d);
    assert!(
        err.contains("config.json")
            && err.contains("unknown architecture model_type 'transformer9000'"),
        "{err}"
    );
    assert!(err.contains("llama") && err.contains("gpt_neox"), "{err}");
}

#[test]
fn absurd_sizes_are_refused_before_allocating() {
    let d = fixture_copy("qwen2", "absurd");
    edit_config(&d, |v| {
        v["vocab_size"] = serde_json::json!(1_000_000_000_000u64)
    });
    let err = gen(&d);
    assert!(
        err.contains("config.json") && err.contains("vocab_size (1000000000000) is larger than"),
        "{err}"
    );
}

#[test]
fn hf_config_that_does_not_match_the_tensors() {
    let d = fixture_copy("phi3", "hf-mismatch");
    edit_config(&d, |v| v["intermediate_size"] = 96.into());
    let err = gen(&d);
    assert!(
        err.contains("model.safetensors: weights do not match the configuration"),
        "{err}"
    );
    assert!(
        err.contains(
            "model.layers.0.mlp.down_proj.weight has shape [64, 128], the config implies [64, 96]"
        ),
        "{err}"
    );
    assert!(
        err.contains("model.layers.1.mlp.down_proj.weight"),
        "every mismatch is listed: {err}"
    );
}

#[test]
fn sharded_checkpoints_load_and_a_missing_shard_is_named() {
    let d = fixture_copy("mistral", "shards");
    let all = routelm::weights::load_safetensors(&d.join("model.safetensors"), None, &Device::Cpu)
        .unwrap();
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    let (mut a, mut b) = (
        routelm::weights::Params::new(),
        routelm::weights::Params::new(),
    );
    let mut map = serde_json::Map::new();
    for (i, (name, t)) in all.into_iter().enumerate() {
        let file = if i % 2 == 0 {
            "model-00001-of-00002.safetensors"
        } else {
            "model-00002-of-00002.safetensors"
        };
        map.insert(name.clone(), file.into());
        if i % 2 == 0 {
            a.insert(name, t)
        } else {
            b.insert(name, t)
        };
    }
    routelm::weights::save_safetensors(&d.join("model-00001-of-00002.safetensors"), &a).unwrap();
    routelm::weights::save_safetensors(&d.join("model-00002-of-00002.safetensors"), &b).unwrap();
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(d.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let r = routelm::verify::verify_dir(&d).unwrap();
    assert!(r.pass, "sharded mistral does not verify");
    std::fs::remove_file(d.join("model-00002-of-00002.safetensors")).unwrap();
    let err = gen(&d);
    assert!(
        err.contains("model.safetensors.index.json")
            && err.contains("shard model-00002-of-00002.safetensors is listed but missing"),
        "{err}"
    );
}

#[test]
fn verify_fails_when_outputs_differ() {
    let d = fixture_copy("gpt2", "verify-fail");
    edit_config(&d, |v| v["layer_norm_epsilon"] = serde_json::json!(0.5));
    let err = fails(&["verify", d.to_str().unwrap()]);
    assert!(err.contains("outputs differ from the reference"), "{err}");
}

/// An encoder-decoder refuses the next-token loss and training by name (it needs
/// source/target pairs), and decoding without its source in the cache.
#[test]
fn encoder_decoder_refuses_what_it_cannot_do() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/t5");
    let (_, cfg, params) =
        routelm::arch::load_params(&dir, candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
    let model = routelm::Model::new(&cfg, &params, "t5").unwrap();
    let ids = common::ids(&[1, 2, 3], 1);
    let err = model.loss(&ids, &ids).unwrap_err().to_string();
    assert!(err.contains("decoder-only"), "{err}");
    let err = model
        .forward(&ids, Some(&mut model.new_cache()), false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("Model::encode"), "{err}");
    let train = routelm::TrainConfigFile::default()
        .resolve(cfg.max_seq_len, "t")
        .unwrap();
    let err = routelm::Trainer::from_params(&cfg, &train, params, "t5")
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("decoder-only"), "{err}");
}

/// Numbers on the command line are checked before any work: zero counts, negative or NaN
/// sampling settings, fractions out of range.
#[test]
fn numeric_options_are_validated() {
    let m = "tests/fixtures/hf/llama3";
    let cases: &[(&[&str], &str)] = &[
        (&["bench", "train", "--steps", "0"], "at least 1"),
        (&["bench", "decode", "--tokens", "0"], "at least 1"),
        (
            &["bench", "serve", "--model", m, "--clients", "0"],
            "at least 1",
        ),
        (&["train", "--steps", "0"], "at least 1"),
        (
            &[
                "generate",
                "--model",
                m,
                "--prompt",
                "a",
                "--max-tokens",
                "0",
            ],
            "at least 1",
        ),
        (
            &[
                "generate",
                "--model",
                m,
                "--prompt",
                "a",
                "--temperature=-1",
            ],
            "0 or more",
        ),
        (
            &[
                "generate",
                "--model",
                m,
                "--prompt",
                "a",
                "--temperature",
                "NaN",
            ],
            "finite",
        ),
        (
            &["generate", "--model", m, "--prompt", "a", "--top-p", "1.5"],
            "at most 1",
        ),
        (
            &[
                "generate",
                "--model",
                m,
                "--prompt",
                "a",
                "--repetition-penalty",
                "0",
            ],
            "above 0",
        ),
        (&["chat", "--model", m, "--top-p", "0"], "above 0"),
        (
            &["eval", "--model", m, "--val-fraction", "1"],
            "between 0 and 1",
        ),
        (
            &["perplexity", "--model", m, "--data", "x", "--ctx", "0"],
            "at least 1",
        ),
        (&["serve", "--model", m, "--parallel", "0"], "at least 1"),
    ];
    for (args, want) in cases {
        let err = fails(args);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

/// Randomly damaged Hugging Face folders (flipped bytes, lying numbers and truncations in
/// the safetensors header and tensor table; flipped bytes and cut text in config.json) load
/// or give an error, never a panic or a hang: 300 of each, seeded (ROUTELM_DAMAGED_COPIES=N
/// for a longer hunt).
#[test]
fn randomly_damaged_folders_never_panic() {
    use routelm::rng::Rng;
    let copies = common::damaged_copies(300);
    let src = Path::new("tests/fixtures/hf/mixtral");
    let weights = std::fs::read(src.join("model.safetensors")).unwrap();
    let config = std::fs::read(src.join("config.json")).unwrap();
    let d = dir("damaged-folder");
    let mut rng = Rng::new(77);
    let (mut loaded, mut refused) = (0, 0);
    for i in 0..2 * copies {
        let (mut w, mut c) = (weights.clone(), config.clone());
        // the header (its 8-byte length and JSON table) or config.json
        let target: &mut Vec<u8> = if i % 2 == 0 { &mut w } else { &mut c };
        let head = if i % 2 == 0 {
            8 + u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize
        } else {
            config.len()
        };
        for _ in 0..1 + rng.next_u64() % 3 {
            let at = (rng.next_u64() as usize) % head.min(target.len());
            match rng.next_u64() % 4 {
                0 => target[at] ^= 1 << (rng.next_u64() % 8),
                1 => target[at] = b"0123456789\"{}[],:-e."[(rng.next_u64() % 20) as usize],
                2 if at + 8 <= target.len() => {
                    let v = [u64::MAX, 1 << 40, 1 << 31][(rng.next_u64() % 3) as usize];
                    target[at..at + 8].copy_from_slice(&v.to_le_bytes());
                }
                _ => target.truncate(at.max(1)),
            }
        }
        std::fs::write(d.join("model.safetensors"), &w).unwrap();
        std::fs::write(d.join("config.json"), &c).unwrap();
        let t0 = std::time::Instant::now();
        let ok = std::panic::catch_unwind(|| {
            routelm::arch::load_dir(&d, DType::F32, &Device::Cpu).is_ok()
        })
        .unwrap_or_else(|_| panic!("damaged copy {i}: a panic"));
        assert!(
            t0.elapsed().as_secs() < 10,
            "damaged copy {i}: took {:?}",
            t0.elapsed()
        );
        if ok {
            loaded += 1;
        } else {
            refused += 1;
        }
    }
    println!("damaged folders: {loaded} still loaded, {refused} refused with an error");
    assert!(
        refused > copies / 2,
        "too few damaged folders were refused: {refused}"
    );
}

/// Randomly damaged tokenizer.json files load or give an error (through the tokenizer's
/// own checks), never a panic; a loaded one encodes and decodes without one: 300 seeded.
#[test]
fn randomly_damaged_tokenizers_never_panic() {
    use routelm::rng::Rng;
    let copies = common::damaged_copies(300);
    let good = std::fs::read("tests/fixtures/tokenizer/tokenizer.json").unwrap();
    let d = dir("damaged-tokenizer");
    let path = d.join("tokenizer.json");
    let mut rng = Rng::new(5);
    let mut refused = 0;
    for i in 0..copies {
        let mut b = good.clone();
        for _ in 0..1 + rng.next_u64() % 3 {
            let at = (rng.next_u64() as usize) % b.len();
            match rng.next_u64() % 3 {
                0 => b[at] ^= 1 << (rng.next_u64() % 8),
                1 => b[at] = b"0123456789\"{}[],:-e.\\u"[(rng.next_u64() % 22) as usize],
                _ => b.truncate(at.max(1)),
            }
        }
        std::fs::write(&path, &b).unwrap();
        let outcome = std::panic::catch_unwind(|| match routelm::Tokenizer::from_file(&path) {
            Ok(t) => {
                let ids = t.encode("Hello, wörld! 123").unwrap_or_default();
                let _ = t.decode(&ids);
                true
            }
            Err(_) => false,
        });
        match outcome {
            Ok(true) => {}
            Ok(false) => refused += 1,
            Err(_) => panic!("damaged tokenizer copy {i}: a panic"),
        }
    }
    assert!(
        refused > copies / 2,
        "too few damaged tokenizers were refused: {refused}"
    );
}

/// Found by the damaged-tokenizer hunt: a template post-processor naming a special token it
/// does not define loads in the tokenizers library, then panics on every encode. routelm
/// tries one encode at load: an error naming the file, no panic message.
#[test]
fn a_tokenizer_whose_template_names_a_missing_token_is_an_error() {
    let d = dir("template-token");
    let good = std::fs::read_to_string("tests/fixtures/tokenizer/tokenizer.json").unwrap();
    let bad = good.replace(r#""special_tokens":{"<s>""#, r#""special_tokens":{"<x>""#);
    assert_ne!(good, bad);
    std::fs::write(d.join("tokenizer.json"), bad).unwrap();
    let err = fails(&[
        "tokenize",
        "--model",
        d.to_str().unwrap(),
        "--text",
        "hello",
    ]);
    assert!(
        err.contains("tokenizer.json") && err.contains("test text"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // not JSON at all: said before the library sees it
    std::fs::write(d.join("tokenizer.json"), &good[..good.len() / 2]).unwrap();
    let err = fails(&[
        "tokenize",
        "--model",
        d.to_str().unwrap(),
        "--text",
        "hello",
    ]);
    assert!(err.contains("not valid JSON"), "{err}");
}

//! Tokenization as transformers does it: the special tokens a tokenizer's post-processor
//! adds, special tokens left out of decoded text, and a folder's generation settings
//! (several EOS ids, sampling defaults). The tokenizer in `tests/fixtures/tokenizer` was
//! checked with the `tokenizers` Python package: "hello world" → [0, 2, 3] with special
//! tokens, [2, 3] without, and [0, 2, 3, 1] decodes to "hello world".

use std::path::{Path, PathBuf};
use std::process::Command;

use routelm::Tokenizer;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer")
}

#[test]
fn encode_adds_the_post_processors_special_tokens_and_decode_skips_them() {
    let tok = Tokenizer::for_model_dir(&dir()).unwrap();
    assert_eq!(tok.encode("hello world").unwrap(), vec![0, 2, 3]);
    assert_eq!(tok.encode_plain("hello world").unwrap(), vec![2, 3]);
    assert_eq!(tok.decode(&[0, 2, 3, 1]).unwrap(), "hello world");
    assert_eq!(
        tok.tokens(&[0, 3, 99]),
        vec![Some("<s>".to_string()), Some("world".to_string()), None]
    );
}

#[test]
fn generation_config_gives_every_eos_id_and_the_sampling_defaults() {
    let g = routelm::arch::generation_defaults(&dir()).unwrap();
    assert_eq!(g.eos, vec![1, 3]);
    assert_eq!(g.temperature, Some(0.6));
    // transformers' defaults for what a sampling generation_config leaves out
    assert_eq!(g.top_k, Some(50));
    assert_eq!(g.top_p, Some(1.0));
    // a folder without one says nothing but its config's EOS (here: none)
    let empty = std::env::temp_dir().join(format!("routelm-gen-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    assert_eq!(
        routelm::arch::generation_defaults(&empty).unwrap(),
        Default::default()
    );
    let _ = std::fs::remove_dir_all(&empty);
}

#[test]
fn tokenize_command_prints_ids_and_tokens() {
    let out = Command::new(env!("CARGO_BIN_EXE_routelm"))
        .args(["tokenize", "--model"])
        .arg(dir())
        .args(["--text", "hello world", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ids"], serde_json::json!([0, 2, 3]));
    assert_eq!(v["tokens"], serde_json::json!(["<s>", "hello", "world"]));
    let out = Command::new(env!("CARGO_BIN_EXE_routelm"))
        .args(["tokenize", "--no-special", "--model"])
        .arg(dir())
        .args(["--text", "world"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "3\tworld\n");
}

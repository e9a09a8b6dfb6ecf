//! Parity with Hugging Face transformers on every fixture in `tests/fixtures/hf`: logits,
//! hidden states and greedy tokens within the fixture's tolerances, and KV-cache decoding
//! equal to the full forward. Every fixture folder is checked; none may be skipped.

use candle_core::{DType, Device, IndexOp, Tensor};
use std::path::Path;

/// Every family the fixtures hold (a missing folder fails the test too).
const FIXTURES: &[&str] = &[
    "bloom",
    "deepseek_v3",
    "gemma",
    "gemma2",
    "gemma3",
    "gpt2",
    "gpt_neox",
    "llama3",
    "mistral",
    "mixtral",
    "olmoe",
    "phi2",
    "phi3",
    "phimoe",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
    "t5",
    "t5_v1_1",
];

fn max(t: &Tensor) -> f64 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// The encoder-decoder's decoder through its cache (first 2 tokens, then one at a time)
/// equals one decoder pass over all tokens, in float64.
fn check_seq2seq_cache(dir: &Path, model: &routelm::model::seq2seq::Seq2Seq) {
    let refs =
        routelm::weights::load_safetensors(&dir.join("reference.safetensors"), None, &Device::Cpu)
            .unwrap();
    let enc = refs["encoder_input_ids"].to_dtype(DType::U32).unwrap();
    let dec = refs["decoder_input_ids"].to_dtype(DType::U32).unwrap();
    let (encoded, _) = model.encode(&enc).unwrap();
    let mut cache = model.new_cache(&encoded).unwrap();
    let full = model.decode(&dec, &mut cache, false).unwrap().logits;
    let mut cache = model.new_cache(&encoded).unwrap();
    let t = dec.dim(1).unwrap();
    let mut parts = vec![
        model
            .decode(&dec.i((.., ..2)).unwrap(), &mut cache, false)
            .unwrap()
            .logits,
    ];
    for i in 2..t {
        let step = dec.i((.., i..i + 1)).unwrap();
        parts.push(model.decode(&step, &mut cache, false).unwrap().logits);
    }
    let d = max(&(&full - Tensor::cat(&parts, 1).unwrap()).unwrap());
    assert!(
        d <= 1e-9,
        "{}: cached decoding differs by {d}",
        dir.display()
    );
}

fn check(dir: &Path) {
    let r = routelm::verify::verify_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    assert!(
        r.pass,
        "{}: logits {:.2e} (tol {:.0e}), hidden {:?} (tol {:.0e}), greedy {:?} vs {:?}",
        dir.display(),
        r.logits_max_abs_diff,
        r.logits_tolerance,
        r.hidden_max_abs_diff,
        r.hidden_tolerance,
        r.greedy_got,
        r.greedy_expected
    );
    // the KV-cache path equals the full forward: prefill 3 tokens, then one at a time; in
    // float64, so that a real difference is not hidden in float32 rounding
    let model = match routelm::arch::load_any(dir, DType::F64, &Device::Cpu).unwrap() {
        routelm::arch::AnyModel::Decoder(l) => l.model,
        routelm::arch::AnyModel::Seq2Seq(m) => return check_seq2seq_cache(dir, &m),
    };
    let refs =
        routelm::weights::load_safetensors(&dir.join("reference.safetensors"), None, &Device::Cpu)
            .unwrap();
    let ids = refs["input_ids"].to_dtype(DType::U32).unwrap();
    let full = model.forward(&ids, None, false).unwrap().logits;
    let mut cache = model.new_cache();
    let t = ids.dim(1).unwrap();
    let mut parts = vec![
        model
            .forward(&ids.i((.., ..3)).unwrap(), Some(&mut cache), false)
            .unwrap()
            .logits,
    ];
    for i in 3..t {
        parts.push(
            model
                .forward(&ids.i((.., i..i + 1)).unwrap(), Some(&mut cache), false)
                .unwrap()
                .logits,
        );
    }
    let inc = Tensor::cat(&parts, 1).unwrap();
    let tol = 1e-9;
    let d = max(&(&full - inc).unwrap());
    assert!(
        d <= tol,
        "{}: cached decoding differs from the full forward by {d} (tolerance {tol})",
        dir.display()
    );
}

#[test]
fn every_fixture_matches_transformers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf");
    let mut found: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| root.join(n).join("config.json").exists())
        .collect();
    found.sort();
    assert_eq!(
        found, FIXTURES,
        "the fixture folders changed: update FIXTURES"
    );
    for name in FIXTURES {
        check(&root.join(name));
    }
}

/// Exporting the loaded parameters back to the family's layout reproduces the published
/// file: the same tensors under the same names, bit for bit (fused, transposed and
/// reordered ones included), less only what the loader drops (a tied head's stored copy,
/// buffers), so fine-tuned weights load in transformers like the originals.
#[test]
fn export_reproduces_every_published_file() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf");
    let tmp = std::env::temp_dir().join(format!("routelm-export-{}", std::process::id()));
    for name in FIXTURES.iter().filter(|n| !n.starts_with("t5")) {
        let src = root.join(name);
        let (_, _, params) = routelm::arch::load_params(&src, DType::F32, &Device::Cpu).unwrap();
        let dst = tmp.join(name);
        routelm::arch::export_dir(&src, &dst, &params).unwrap();
        let load = |p: &Path| routelm::weights::load_safetensors(p, None, &Device::Cpu).unwrap();
        let original = load(&src.join("model.safetensors"));
        let exported = load(&dst.join("model.safetensors"));
        for (k, t) in &original {
            match exported.get(k) {
                Some(e) => assert_eq!(
                    max(
                        &(t.to_dtype(DType::F64).unwrap() - e.to_dtype(DType::F64).unwrap())
                            .unwrap()
                    ),
                    0.0,
                    "{name}: {k} differs"
                ),
                None => assert!(k == "lm_head.weight", "{name}: {k} was not exported"),
            }
        }
        assert_eq!(
            original.len() - exported.len(),
            usize::from(
                !exported.contains_key("lm_head.weight") && original.contains_key("lm_head.weight")
            ),
            "{name}: extra tensors"
        );
        assert!(dst.join("config.json").exists());
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

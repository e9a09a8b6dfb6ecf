//! GGUF reading and ggml dequantization against gguf-py (fixtures from
//! `scripts/make_gguf_fixtures.py`): every element type bit for bit, a file with every
//! metadata value type and several tensor types, and damaged headers that must give a
//! clear error without a large allocation.

mod common;

use candle_core::{Device, Tensor};
use routelm::weights::gguf::{GgufFile, Value};
use routelm::weights::quant::{dequantize_into, GgmlType};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf")
}

const TYPES: &[(&str, u32)] = &[
    ("F32", 0),
    ("F16", 1),
    ("BF16", 30),
    ("Q4_0", 2),
    ("Q4_1", 3),
    ("Q5_0", 6),
    ("Q5_1", 7),
    ("Q8_0", 8),
    ("Q2_K", 10),
    ("Q3_K", 11),
    ("Q4_K", 12),
    ("Q5_K", 13),
    ("Q6_K", 14),
];

/// Every type's dequantization equals gguf-py's, bit for bit, on random blocks.
#[test]
fn dequantization_is_bit_exact_for_every_type() {
    let t = routelm::weights::load_safetensors(
        &fixtures().join("blocks.safetensors"),
        None,
        &Device::Cpu,
    )
    .unwrap();
    for &(name, id) in TYPES {
        let ty = GgmlType::from_id(id).unwrap();
        assert_eq!(ty.name(), name);
        let blocks: Vec<u8> = t[&format!("{name}.blocks")].to_vec1().unwrap();
        let want: Vec<f32> = t[&format!("{name}.f32")].to_vec1().unwrap();
        assert_eq!(ty.bytes_for(want.len()), Some(blocks.len()), "{name}");
        let mut got = vec![0f32; want.len()];
        dequantize_into(ty, &blocks, &mut got);
        let differ = got
            .iter()
            .zip(&want)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(
            differ,
            0,
            "{name}: {differ} of {} values differ",
            want.len()
        );
    }
}

fn json_value(v: &Value) -> serde_json::Value {
    use serde_json::json;
    match v {
        Value::U8(x) => json!(x),
        Value::I8(x) => json!(x),
        Value::U16(x) => json!(x),
        Value::I16(x) => json!(x),
        Value::U32(x) => json!(x),
        Value::I32(x) => json!(x),
        Value::F32(x) => json!(*x as f64),
        Value::Bool(x) => json!(x),
        Value::String(x) => json!(x),
        Value::Array(x) => serde_json::Value::Array(x.iter().map(json_value).collect()),
        Value::U64(x) => json!(x),
        Value::I64(x) => json!(x),
        Value::F64(x) => json!(x),
    }
}

/// A file gguf-py wrote reads back as gguf-py reads it: every metadata value type, and
/// tensors of several types with their shapes and values.
#[test]
fn a_gguf_py_file_reads_back_as_written() {
    let f = GgufFile::open(&fixtures().join("tiny.gguf")).unwrap();
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("tiny.json")).unwrap())
            .unwrap();
    assert_eq!(f.version, 3);
    for (k, v) in want["metadata"].as_object().unwrap() {
        let got = json_value(f.get(k).unwrap_or_else(|| panic!("no key {k}")));
        assert_eq!(&got, v, "{k}");
    }
    assert_eq!(
        f.get("general.architecture").and_then(|v| v.as_str()),
        Some("llama")
    );
    let tensors = want["tensors"].as_object().unwrap();
    assert_eq!(f.tensors.len(), tensors.len());
    for (name, t) in tensors {
        let info = f.tensor(name).unwrap();
        assert_eq!(info.ty.name(), t["type"].as_str().unwrap(), "{name}");
        let shape: Vec<usize> = t["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(info.shape, shape, "{name}");
        let got = f.dequantize(info);
        let want: Vec<f32> = t["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(got, want, "{name}");
    }
}

/// A header: magic, version 3, the counts, then `rest`.
fn header(tensors: u64, kv: u64, rest: &[u8]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(tensors.to_le_bytes());
    b.extend(kv.to_le_bytes());
    b.extend(rest);
    b
}

fn string(s: &str) -> Vec<u8> {
    let mut b = (s.len() as u64).to_le_bytes().to_vec();
    b.extend(s.as_bytes());
    b
}

/// A tensor description: name, dims (innermost first), type, offset.
fn tensor(name: &str, dims: &[u64], ty: u32, offset: u64) -> Vec<u8> {
    let mut b = string(name);
    b.extend((dims.len() as u32).to_le_bytes());
    for d in dims {
        b.extend(d.to_le_bytes());
    }
    b.extend(ty.to_le_bytes());
    b.extend(offset.to_le_bytes());
    b
}

/// Damaged or lying headers are errors that name the file and the problem; none panics
/// or allocates what a count claims.
#[test]
fn damaged_headers_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!("routelm-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = std::fs::read(fixtures().join("tiny.gguf")).unwrap();
    let mut kv_string = string("k");
    kv_string.extend(8u32.to_le_bytes());
    kv_string.extend(u64::MAX.to_le_bytes());
    let mut array = string("k");
    array.extend(9u32.to_le_bytes());
    array.extend(4u32.to_le_bytes());
    array.extend((1u64 << 60).to_le_bytes());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("not gguf", b"GGML0000".to_vec(), "magic"),
        ("empty", Vec::new(), "magic"),
        ("truncated", good[..good.len() / 2].to_vec(), "past the end"),
        ("truncated header", good[..100].to_vec(), "GGUF header"),
        (
            "version",
            {
                let mut b = good.clone();
                b[4] = 9;
                b
            },
            "version 9",
        ),
        ("tensor count", header(u64::MAX, 0, &[]), "tensor count"),
        ("kv count", header(0, 1 << 40, &[0; 64]), "metadata count"),
        ("string length", header(0, 1, &kv_string), "length"),
        ("array count", header(0, 1, &array), "element count"),
        (
            "dims",
            header(1, 0, &tensor("t", &[1 << 40, 1 << 40], 0, 0)),
            "overflows",
        ),
        (
            "offset",
            header(1, 0, &tensor("t", &[4], 0, 1 << 50)),
            "past the end",
        ),
        (
            "blocks",
            header(1, 0, &tensor("t", &[33], 8, 0)),
            "whole Q8_0 blocks",
        ),
        ("type", header(1, 0, &tensor("t", &[4], 99, 0)), "type 99"),
        (
            "dimension count",
            header(1, 0, &tensor("t", &[], 0, 0)),
            "dimensions",
        ),
    ];
    for (what, bytes, expect) in cases {
        let p = dir.join(format!("{}.gguf", what.replace(' ', "_")));
        std::fs::write(&p, &bytes).unwrap();
        let err = match GgufFile::open(&p) {
            Ok(_) => panic!("{what}: opened"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(expect), "{what}: {err}");
        assert!(err.contains(&p.display().to_string()), "{what}: {err}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Logits of a model loaded from a GGUF file against its safetensors twin (the same
/// weights written the way llama.cpp's converter writes them: llama's q/k rows permuted,
/// Gemma's norms as `1 + w`), on the fixture's reference input.
fn twin_diff(gguf: &str, hf: &str, patch: serde_json::Value) -> (f64, f64) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let tmp = std::env::temp_dir().join(format!(
        "routelm-twin-{}-{}",
        std::process::id(),
        gguf.replace('/', "-")
    ));
    std::fs::create_dir_all(&tmp).unwrap();
    let hf_dir =
        common::patched_fixture(&root.join("hf").join(hf), patch.as_object().unwrap(), &tmp);
    let dev = Device::Cpu;
    let a = routelm::arch::load_dir(&root.join("gguf").join(gguf), candle_core::DType::F32, &dev)
        .unwrap()
        .model;
    let b = routelm::arch::load_dir(&hf_dir, candle_core::DType::F32, &dev)
        .unwrap()
        .model;
    let refs =
        routelm::weights::load_safetensors(&hf_dir.join("reference.safetensors"), None, &dev)
            .unwrap();
    let ids = refs["input_ids"].to_dtype(candle_core::DType::U32).unwrap();
    let la = a.forward(&ids, None, false).unwrap().logits;
    let lb = b.forward(&ids, None, false).unwrap().logits;
    std::fs::remove_dir_all(&tmp).ok();
    let scale = common::max_abs_diff(&lb, &lb.zeros_like().unwrap());
    (common::max_abs_diff(&la, &lb), scale)
}

/// A Q8_0 file decoded through its stored weights (8-bit activations, integer dot
/// products; a prompt of more rows through the integer GEMM, or dequantized tiles without
/// AVX-512 VNNI) gives the logits of its dequantized copy within the activations'
/// quantization, step after step.
#[test]
fn stored_weights_decode_like_their_dequantized_copy() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf/llama3.q8_0.gguf");
    let dev = Device::Cpu;
    let stored = routelm::arch::load_dir(&path, candle_core::DType::F32, &dev)
        .unwrap()
        .model;
    let (values, bytes) = stored.stored_read();
    println!("stored weights read per token: {values} values in {bytes} bytes");
    assert!(
        values > 0 && bytes * 3 < values * 4,
        "{values} values, {bytes} bytes"
    );
    let (_, cfg, params) =
        routelm::arch::load_params(&path, candle_core::DType::F32, &dev).unwrap();
    let plain = routelm::model::Model::from_owned(&cfg, params, "dequantized").unwrap();
    assert_eq!(plain.stored_read(), (0, 0));
    let tokens: Vec<u32> = (0..14u32)
        .map(|i| (i * 37 + 5) % cfg.vocab_size as u32)
        .collect();
    let run = |m: &routelm::model::Model| -> Vec<Tensor> {
        let mut cache = m.new_cache();
        let prompt = Tensor::new(&tokens[..10], &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        // every position's logits: the head too takes more rows than a decode step
        let all = m.forward(&prompt, Some(&mut cache), false).unwrap().logits;
        let mut out = vec![all.squeeze(0).unwrap()];
        for &t in &tokens[10..] {
            let id = Tensor::new(&[t], &dev).unwrap().unsqueeze(0).unwrap();
            let logits = m.forward(&id, Some(&mut cache), true).unwrap().logits;
            out.push(logits.flatten_to(1).unwrap());
        }
        out
    };
    let (a, b) = (run(&stored), run(&plain));
    // the prompt's products run on integers where the CPU has AVX-512 VNNI (interleaved
    // weights or the integer GEMM) or AVX2 (interleaved weights)
    let kernels = routelm::nn::qmatmul::interleave::Kernel::available();
    let vnni = !kernels.is_empty();
    println!(
        "prompt products: {}",
        if vnni {
            format!("on integers ({kernels:?})")
        } else {
            "dequantized tiles".to_string()
        }
    );
    for (step, (x, y)) in a.iter().zip(&b).enumerate() {
        let d = common::max_abs_diff(x, y);
        let scale = common::max_abs_diff(y, &y.zeros_like().unwrap());
        println!("step {step}: max |Δlogit| {d:.2e} of {scale:.2}");
        // the prompt takes 8-bit activations (as the decode steps) where it runs on
        // integers, else f32 products on dequantized tiles
        let bound = if step == 0 && !vnni { 1e-4 } else { 0.03 };
        assert!(d <= bound * scale, "step {step}: {d} of {scale}");
        if step > 0 || vnni {
            assert!(d > 0.0, "step {step}: the integer kernels did not run");
        }
    }
}

/// A quantized Mixture-of-Experts model (OLMoE, Q8_0 experts read in place) decoding three
/// sequences in one batched step per token, each expert on its own rows, gives the logits
/// and routes of each sequence decoded alone.
#[test]
fn stored_experts_decode_batched_like_each_sequence_alone() {
    use routelm::model::{Cache, TokenRoute};
    let path = fixtures().join("olmoe.q8_0.gguf");
    let dev = Device::Cpu;
    let m = routelm::arch::load_dir(&path, candle_core::DType::F32, &dev)
        .unwrap()
        .model;
    m.prepare_products();
    let (values, bytes) = m.stored_read();
    assert!(
        values > 0 && bytes * 3 < values * 4,
        "{values} values, {bytes} bytes"
    );
    let vocab = m.config.vocab_size as u32;
    let prompts: Vec<Vec<u32>> = (0..3u32)
        .map(|i| {
            (0..3 + 2 * i)
                .map(|j| (i * 31 + j * 17 + 3) % vocab)
                .collect()
        })
        .collect();
    let ids = |t: &[u32]| Tensor::new(t, &dev).unwrap().unsqueeze(0).unwrap();
    let mut alone: Vec<Cache> = prompts.iter().map(|_| m.new_cache()).collect();
    for (p, c) in prompts.iter().zip(alone.iter_mut()) {
        m.forward(&ids(p), Some(c), true).unwrap();
    }
    let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let (mut batch, _, _) = m.prefill_batch(&refs).unwrap();
    let mut experts_seen = 0;
    for step in 0..4u32 {
        let tokens: Vec<u32> = (0..3u32).map(|i| (7 * i + 11 * step + 1) % vocab).collect();
        let mut caches: Vec<&mut Cache> = batch.iter_mut().collect();
        let (logits, routes) = m.decode_batch(&tokens, &mut caches).unwrap();
        for (i, (&t, c)) in tokens.iter().zip(alone.iter_mut()).enumerate() {
            let out = m.forward(&ids(&[t]), Some(c), true).unwrap();
            let want = out.logits.flatten_all().unwrap();
            let got = logits.get(i).unwrap();
            let d = common::max_abs_diff(&want, &got);
            let scale = common::max_abs_diff(&want, &want.zeros_like().unwrap());
            println!("step {step}, sequence {i}: max |Δlogit| {d:.2e} of {scale:.2}");
            assert!(
                d <= 1e-5 * scale,
                "step {step}, sequence {i}: {d} of {scale}"
            );
            let route = TokenRoute::of_last(&out.moe, &out.depth);
            assert_eq!(routes[i], route, "step {step}, sequence {i}");
            experts_seen += route.experts.iter().map(|(_, e)| e.len()).sum::<usize>();
        }
    }
    assert!(experts_seen > 0, "no expert was reported");
}

/// Unquantized GGUF twins give the safetensors model's logits (to f32 rounding), the
/// Mixture-of-Experts ones too (experts stacked in the file, one layer of Qwen2-MoE's dense). A Q8_0
/// twin's weights are each within half a quantization step of the f32 twin's (a step is
/// the block's largest magnitude / 127, stored in f16), and its logits move by a few
/// percent of their range on this tiny random model (measured 2.4%).
#[test]
fn gguf_twins_match_their_safetensors_models() {
    // the twins carry no rope scaling: compare with the fixture without it
    let no_scaling = serde_json::json!({"rope_scaling": null});
    let (d, scale) = twin_diff("llama3.f32.gguf", "llama3", no_scaling.clone());
    println!("llama3 f32 twin: max |Δlogit| {d:.2e} of {scale:.2}");
    assert!(d <= 1e-5 * scale.max(1.0), "llama f32: {d}");
    for family in [
        "gemma",
        "gemma2",
        "gemma3",
        "qwen2",
        "qwen3",
        "qwen2_moe",
        "qwen3_moe",
        "mixtral",
    ] {
        let (d, scale) = twin_diff(&format!("{family}.f32.gguf"), family, serde_json::json!({}));
        println!("{family} f32 twin: max |Δlogit| {d:.2e} of {scale:.2}");
        assert!(d <= 1e-5 * scale.max(1.0), "{family} f32: {d}");
    }
    let (d, scale) = twin_diff("llama3.q8_0.gguf", "llama3", no_scaling);
    println!("llama3 q8_0 twin: max |Δlogit| {d:.2e} of {scale:.2}");
    assert!(d > 0.0 && d <= 0.05 * scale, "llama q8_0: {d} of {scale}");
    // Phi-3's fused q/k/v and gate/up blocks, read in place and cut into row blocks;
    // OLMoE's full-width q/k norms and quantized experts
    for family in ["phi3", "olmoe"] {
        let (d, scale) = twin_diff(
            &format!("{family}.q8_0.gguf"),
            family,
            serde_json::json!({}),
        );
        println!("{family} q8_0 twin: max |Δlogit| {d:.2e} of {scale:.2}");
        assert!(
            d > 0.0 && d <= 0.05 * scale,
            "{family} q8_0: {d} of {scale}"
        );
    }
    // files llama.cpp's own converter wrote (scripts/convert_fixtures_llamacpp.py): fused
    // q/k/v as consecutive row blocks (GPT-NeoX's and BLOOM's per-head interleaving undone,
    // GPT-2's Conv1D transposed), Phi-2's separate projections, DeepSeek's latent attention
    // split into `attn_k_b` / `attn_v_b` and its stacked experts
    for (file, family, bound) in [
        ("gpt_neox.f32.gguf", "gpt_neox", 1e-5),
        ("bloom.f32.gguf", "bloom", 1e-5),
        ("gpt2.f32.gguf", "gpt2", 1e-5),
        ("phi2.f32.gguf", "phi2", 1e-5),
        ("deepseek_v3.f32.gguf", "deepseek_v3", 1e-5),
        ("gpt_neox.q8_0.gguf", "gpt_neox", 0.05),
        ("gpt2.q8_0.gguf", "gpt2", 0.05),
        ("phi2.q8_0.gguf", "phi2", 0.05),
    ] {
        let (d, scale) = twin_diff(&format!("converter/{file}"), family, serde_json::json!({}));
        println!("{file} (llama.cpp's converter): max |Δlogit| {d:.2e} of {scale:.2}");
        assert!(d <= bound * scale.max(1.0), "{file}: {d} of {scale}");
        if bound > 1e-5 {
            assert!(d > 0.0, "{file}: the quantized weights were not read");
        }
    }
    // the quantized fused q/k/v is read in place, cut into three row blocks: every
    // projection and the (tied) head are stored weights
    for (file, values) in [
        // 2 layers of 192·64 + 64·64 + 2·256·64, the head 256·64
        (
            "gpt2.q8_0.gguf",
            2 * (192 * 64 + 64 * 64 + 2 * 256 * 64) + 256 * 64,
        ),
        // 2 layers of (64 + 2·32)·64 + 64·64 + 2·128·64, the head 320·64
        (
            "phi2.q8_0.gguf",
            2 * (128 * 64 + 64 * 64 + 2 * 128 * 64) + 320 * 64,
        ),
    ] {
        let m = routelm::arch::load_dir(
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/gguf/converter")
                .join(file),
            candle_core::DType::F32,
            &Device::Cpu,
        )
        .unwrap()
        .model;
        assert_eq!(m.stored_read().0, values, "{file}");
    }
    let phi3 = routelm::arch::load_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf/phi3.q8_0.gguf"),
        candle_core::DType::F32,
        &Device::Cpu,
    )
    .unwrap()
    .model;
    // every projection and the head: 2 layers of 64·(64 + 2·32 + 64) + 3·64·128, 320·64
    assert_eq!(
        phi3.stored_read().0,
        2 * (64 * 192 + 3 * 64 * 128) + 320 * 64
    );
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf");
    let load = |f: &str| {
        routelm::arch::load_params(&dir.join(f), candle_core::DType::F32, &Device::Cpu)
            .unwrap()
            .2
    };
    let (exact, q8) = (load("llama3.f32.gguf"), load("llama3.q8_0.gguf"));
    for (name, w) in &exact {
        let (w, q) = (
            w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            q8[name].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        if w.len() % 32 != 0 || w == q {
            continue; // vectors stay f32 in the file
        }
        for (bw, bq) in w.chunks(32).zip(q.chunks(32)) {
            let step = bw.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            let worst = bw
                .iter()
                .zip(bq)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                worst <= 0.55 * step + 1e-9,
                "{name}: {worst} > half of {step}"
            );
        }
    }
}

/// The tokenizer a GGUF file's metadata describes (byte-level BPE, GPT-2's split and the
/// llama-bpe split) encodes and decodes a text set with Unicode, digits, code, whitespace
/// runs and special-token strings as transformers' tokenizer built from the same file does.
#[test]
fn gguf_tokenizers_match_transformers() {
    let want: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tokenizer_expect.json")).unwrap(),
    )
    .unwrap();
    for (pre, cases) in want.as_object().unwrap() {
        let tok =
            routelm::Tokenizer::for_model_dir(&fixtures().join(format!("tokenizer-{pre}.gguf")))
                .unwrap();
        for case in cases.as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let ids: Vec<u32> = case["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(tok.encode(text).unwrap(), ids, "{pre}: {text:?}");
            assert_eq!(
                tok.decode(&ids).unwrap(),
                case["decoded"].as_str().unwrap(),
                "{pre}: decode {text:?}"
            );
        }
    }
}

/// The tokenizers routelm builds from GGUF vocabularies (a few MB), Gemma's
/// SentencePiece-style one and byte-level BPE with GPT-2's and Llama 3's splits, equal the
/// tokenizers library's build of the same file (~100 MB for Gemma 3's, ~10 MB for
/// SmolLM2's): ids with and without special tokens, decoding every id alone and in runs,
/// token texts and ids.
#[test]
fn own_tokenizers_equal_the_library_build() {
    for name in ["gemma", "default", "llama-bpe"] {
        own_tokenizer_equals_the_library_build(name);
    }
}

/// A byte-level tokenizer whose encoder is released (what `generate` does once the prompt
/// is in ids) decodes every id and looks up tokens as before, and refuses to encode
/// rather than give unmerged ids.
#[test]
fn a_released_encoder_decodes_as_before_and_refuses_to_encode() {
    let path = fixtures().join("tokenizer-llama-bpe.gguf");
    let full = routelm::Tokenizer::from_gguf(&path).unwrap();
    let mut light = routelm::Tokenizer::from_gguf(&path).unwrap();
    assert!(matches!(light, routelm::Tokenizer::ByteLevel(..)));
    let text = "Hello, world! naïve café 日本語 <|begin_of_text|> 12345";
    let ids = light.encode(text).unwrap();
    light.release_encoder();
    let all: Vec<u32> = (0..full.vocab_size() as u32).collect();
    for chunk in all.chunks(97) {
        assert_eq!(light.decode(chunk).unwrap(), full.decode(chunk).unwrap());
        assert_eq!(light.tokens(chunk), full.tokens(chunk));
    }
    assert_eq!(light.decode(&ids).unwrap(), full.decode(&ids).unwrap());
    assert_eq!(
        light.token_id("<|end_of_text|>"),
        full.token_id("<|end_of_text|>")
    );
    let err = light.encode(text).unwrap_err().to_string();
    assert!(err.contains("released"), "{err}");
}

fn own_tokenizer_equals_the_library_build(name: &str) {
    use routelm::TokenizerBuild;
    let path = fixtures().join(format!("tokenizer-{name}.gguf"));
    let own = routelm::Tokenizer::from_gguf_as(&path, TokenizerBuild::Own).unwrap();
    let lib = routelm::Tokenizer::from_gguf_as(&path, TokenizerBuild::Library).unwrap();
    assert!(
        matches!(
            own,
            routelm::Tokenizer::Spm(..) | routelm::Tokenizer::ByteLevel(..)
        ),
        "{name}: not routelm's own build"
    );
    assert_eq!(own.vocab_size(), lib.vocab_size(), "{name}");
    let texts = [
        "Hello, world! The year 2024 had 366 days; π ≈ 3.14159.",
        "   leading spaces and\ttabs\tand trailing   ",
        "naïve café, 日本語のテキスト, 한국어, русский, 🤖🚀👍🏽 e\u{301}",
        "def f(x):\n    return x ** 2  # comment\n\n\n",
        "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
        "<|im_start|>user\nHi!<|im_end|>\n<|endoftext|>",
        "<bos><eos><pad><unk><mask> 1234567890 0.5 -3e10 1,000,000",
        "I'm sure they'LL say we'VE won; it'ſ 'd 're\r\n\r\n \u{a0}\u{3000}x",
        "",
        " ",
        "\u{2581}already\u{2581}marked",
    ];
    for t in texts {
        let (a, b) = (own.encode(t).unwrap(), lib.encode(t).unwrap());
        assert_eq!(a, b, "{name}: {t:?}");
        assert_eq!(
            own.encode_plain(t).unwrap(),
            lib.encode_plain(t).unwrap(),
            "{name}: {t:?}"
        );
        assert_eq!(
            own.decode(&b).unwrap(),
            lib.decode(&b).unwrap(),
            "{name}: {t:?}"
        );
        assert_eq!(own.tokens(&b), lib.tokens(&b), "{name}: {t:?}");
    }
    let n = lib.vocab_size() as u32 + 3;
    for id in 0..n {
        assert_eq!(
            own.decode(&[id]).unwrap(),
            lib.decode(&[id]).unwrap(),
            "{name}: id {id}"
        );
        assert_eq!(own.tokens(&[id]), lib.tokens(&[id]), "{name}: id {id}");
        if let Some(Some(t)) = lib.tokens(&[id]).pop() {
            assert_eq!(own.token_id(&t), lib.token_id(&t), "{name}: {t:?}");
        }
    }
    let ids: Vec<u32> = (0..n).collect();
    for run in ids.chunks(5) {
        assert_eq!(
            own.decode(run).unwrap(),
            lib.decode(run).unwrap(),
            "{name}: {run:?}"
        );
    }
}

/// A GGUF file's end-of-generation ids: its EOS, and the control tokens that end a turn
/// (the Gemma-style file names `<eos>` only; its chat turns end with `<end_of_turn>`).
#[test]
fn gguf_end_of_turn_tokens_end_generation() {
    let eos = |f: &str| {
        routelm::arch::generation_defaults(&fixtures().join(f))
            .unwrap()
            .eos
    };
    assert_eq!(eos("tokenizer-gemma.gguf"), vec![1, 5]);
    // <|endoftext|> (0) and <|im_end|> (2, also the EOS)
    assert_eq!(eos("tokenizer-default.gguf"), vec![0, 2]);
}

/// Logits of `model` and of the same model read back from `file`, on one prompt (more
/// rows than a decode step) and one decode step: `(max |Δ| of the two, logit range)`.
fn file_vs_model(model: &routelm::model::Model, file: &Path) -> (f64, f64) {
    let back = routelm::arch::load_dir(file, candle_core::DType::F32, &Device::Cpu)
        .unwrap()
        .model;
    let mut worst: f64 = 0.0;
    let mut scale: f64 = 0.0;
    for rows in [&[3u32, 9, 1, 4, 15, 9, 2, 6, 5, 3, 5][..], &[7u32][..]] {
        let ids = common::ids(rows, 1);
        let a = model.forward(&ids, None, false).unwrap().logits;
        let b = back.forward(&ids, None, false).unwrap().logits;
        worst = worst.max(common::max_abs_diff(&a, &b));
        scale = scale.max(common::max_abs_diff(&a, &a.zeros_like().unwrap()));
    }
    (worst, scale)
}

/// `routelm quantize` writes llama.cpp's layout for Llama-shaped models (Mistral without a
/// window, Mixtral with its experts stacked) and reads them back: in f32 the logits of the
/// checkpoint to f32 rounding (so the q/k interleave for llama.cpp's rotary and its
/// undoing at load are inverses), in Q8_0 and Q4_K_M within their quantization.
#[test]
fn quantized_files_read_back_as_their_models() {
    use routelm::arch::gguf_export::{quantize_model, Scheme};
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf");
    let tmp = std::env::temp_dir().join(format!("routelm-quantize-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let no_window = serde_json::json!({"sliding_window": null});
    for fixture in ["mistral", "mixtral"] {
        let dir =
            common::patched_fixture(&root.join(fixture), no_window.as_object().unwrap(), &tmp);
        let (_, cfg, params) =
            routelm::arch::load_params(&dir, candle_core::DType::F32, &Device::Cpu).unwrap();
        let model = routelm::model::Model::new(&cfg, &params, "checkpoint").unwrap();
        for (scheme, bound) in [("f32", 1e-5), ("q8_0", 0.05), ("q4_k_m", 0.3)] {
            let out = tmp.join(format!("{fixture}.{scheme}.gguf"));
            let w = quantize_model(
                &dir,
                &out,
                scheme.parse::<Scheme>().unwrap(),
                &mut |_, _| {},
            )
            .unwrap();
            assert_eq!(w.arch, "llama", "{fixture} {scheme}: {:?}", w.not_llama);
            // the folder has no tokenizer.json: the file says it has no vocabulary (so
            // llama.cpp loads it rather than refuse it) and reads back with bytes
            let f = routelm::weights::gguf::GgufFile::open(&out).unwrap();
            assert_eq!(
                f.get("tokenizer.ggml.model").and_then(|v| v.as_str()),
                Some("none")
            );
            assert!(matches!(
                routelm::tokenize::Tokenizer::for_model_dir(&out).unwrap(),
                routelm::tokenize::Tokenizer::Bytes
            ));
            // the experts too are read in place: a token reads top_k / n_experts of them
            let back = routelm::arch::load_dir(&out, candle_core::DType::F32, &Device::Cpu)
                .unwrap()
                .model;
            let numel = |pred: &dyn Fn(&str) -> bool| -> usize {
                params
                    .iter()
                    .filter(|(n, _)| pred(n))
                    .map(|(_, t)| t.elem_count())
                    .sum()
            };
            let dense = numel(&|n| {
                n.contains("_proj.") && !n.contains(".experts.") || n == "lm_head.weight"
            });
            let experts = numel(&|n| n.contains(".experts."));
            let share = cfg
                .moe_layers()
                .next()
                .map_or(0, |(_, m)| experts * m.top_k / m.n_experts);
            assert_eq!(back.stored_read().0, dense + share, "{fixture} {scheme}");
            let (d, scale) = file_vs_model(&model, &out);
            println!(
                "{fixture} {scheme} ({:?}): max |Δlogit| {d:.2e} of {scale:.2}",
                w.types
            );
            assert!(
                d <= bound * scale.max(1.0),
                "{fixture} {scheme}: {d} of {scale}"
            );
            if scheme != "f32" {
                assert!(d > 0.0, "{fixture} {scheme}: nothing was quantized");
            }
        }
    }
    std::fs::remove_dir_all(&tmp).ok();
}

/// Qwen checkpoints are written under llama.cpp's Qwen architectures (biases, q/k norms,
/// shared experts and their vector gate as llama.cpp keeps them) and read back as
/// themselves.
#[test]
fn qwen_files_are_written_for_llama_cpp() {
    use routelm::arch::gguf_export::{quantize_model, Scheme};
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf");
    let tmp = std::env::temp_dir().join(format!("routelm-quantize-qwen-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    for (fixture, arch) in [
        ("qwen2", "qwen2"),
        ("qwen3", "qwen3"),
        ("qwen2_moe", "qwen2moe"),
        ("qwen3_moe", "qwen3moe"),
    ] {
        let dir = root.join(fixture);
        let (_, cfg, params) =
            routelm::arch::load_params(&dir, candle_core::DType::F32, &Device::Cpu).unwrap();
        let model = routelm::model::Model::new(&cfg, &params, "checkpoint").unwrap();
        let out = tmp.join(format!("{fixture}.gguf"));
        let w = quantize_model(&dir, &out, Scheme::All(GgmlType::F32), &mut |_, _| {}).unwrap();
        assert_eq!(w.arch, arch, "{fixture}: {:?}", w.not_llama);
        let (d, scale) = file_vs_model(&model, &out);
        assert!(d <= 1e-5 * scale.max(1.0), "{fixture}: {d} of {scale}");
    }
    std::fs::remove_dir_all(&tmp).ok();
}

/// A model llama.cpp's architectures cannot hold (here Mixture-of-Depths routers) is
/// written under the `routelm` architecture, says why, and reads back as itself; a
/// failed write leaves an existing file as it was.
#[test]
fn routed_models_are_written_for_routelm() {
    use routelm::arch::gguf_export::{quantize_model, Scheme};
    use routelm::config::{DepthConfig, LayerSpec, Selection};
    let tmp = std::env::temp_dir().join(format!("routelm-quantize-mod-{}", std::process::id()));
    let mut cfg = common::tiny(0);
    let depth = DepthConfig {
        capacity: 0.5,
        aux_loss_coef: 0.1,
        predictor: 0,
        selection: Selection::Learned,
        scale: Default::default(),
        keep_first: false,
        skip: Default::default(),
        norm_input: false,
    };
    cfg.layers = vec![
        LayerSpec {
            depth: Some(depth),
            ..Default::default()
        };
        cfg.n_layers
    ];
    let params =
        routelm::model::init::init_params(&cfg, 3, candle_core::DType::F32, &Device::Cpu).unwrap();
    routelm::weights::save_model_dir(&tmp, &cfg, &params).unwrap();
    let model = routelm::model::Model::new(&cfg, &params, "checkpoint").unwrap();
    let out = tmp.join("routed.gguf");
    let w = quantize_model(&tmp, &out, Scheme::All(GgmlType::F32), &mut |_, _| {}).unwrap();
    assert_eq!(w.arch, "routelm");
    let why = w.not_llama.unwrap();
    assert!(why.contains("depth_router"), "{why}");
    let (d, scale) = file_vs_model(&model, &out);
    assert!(d <= 1e-5 * scale.max(1.0), "{d} of {scale}");
    // a source that cannot be read: an error naming it, the earlier file untouched
    let before = std::fs::read(&out).unwrap();
    let err = quantize_model(&tmp.join("missing"), &out, Scheme::Q4KM, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), before);
    std::fs::remove_dir_all(&tmp).ok();
}

/// Metadata of every value type, written and read back.
#[test]
fn written_metadata_reads_back() {
    let tmp = std::env::temp_dir().join(format!("routelm-gguf-meta-{}.gguf", std::process::id()));
    let meta: Vec<(String, Value)> = vec![
        ("a.u8".into(), Value::U8(7)),
        ("a.i8".into(), Value::I8(-7)),
        ("a.u16".into(), Value::U16(700)),
        ("a.i16".into(), Value::I16(-700)),
        ("a.u32".into(), Value::U32(70_000)),
        ("a.i32".into(), Value::I32(-70_000)),
        ("a.f32".into(), Value::F32(0.25)),
        ("a.bool".into(), Value::Bool(true)),
        ("a.string".into(), Value::String("héllo".into())),
        ("a.u64".into(), Value::U64(1 << 40)),
        ("a.i64".into(), Value::I64(-(1 << 40))),
        ("a.f64".into(), Value::F64(-1.5)),
        (
            "a.array".into(),
            Value::Array(vec![Value::String("x".into()), Value::String("y".into())]),
        ),
    ];
    let tensors = vec![routelm::weights::gguf::TensorOut {
        name: "t".into(),
        shape: vec![2, 32],
        ty: GgmlType::Q8_0,
    }];
    let values: Vec<f32> = (0..64).map(|i| i as f32 / 8.0 - 4.0).collect();
    routelm::weights::gguf::write(&tmp, &meta, &tensors, |_| {
        Ok(routelm::weights::quantize::quantize(GgmlType::Q8_0, &values).unwrap())
    })
    .unwrap();
    let f = GgufFile::open(&tmp).unwrap();
    for (k, v) in &meta {
        assert_eq!(f.get(k), Some(v), "{k}");
    }
    let t = f.tensor("t").unwrap();
    assert_eq!((t.shape.clone(), t.ty), (vec![2, 32], GgmlType::Q8_0));
    let back = f.dequantize(t);
    for (a, b) in values.iter().zip(&back) {
        assert!((a - b).abs() <= 4.0 / 127.0, "{a} vs {b}");
    }
    std::fs::remove_file(&tmp).ok();
}

/// A byte-level BPE `tokenizer.json` written as GGUF metadata (what `routelm quantize`
/// writes) reads back as the same tokenizer: equal ids and text on the tokenizer test
/// set, for GPT-2's split and Llama 3's; the token list padded to the embedding rows.
#[test]
fn tokenizers_written_to_gguf_read_back_as_themselves() {
    let want: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tokenizer_expect.json")).unwrap(),
    )
    .unwrap();
    let tmp = std::env::temp_dir().join(format!("routelm-tok-out-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    for pre in ["default", "llama-bpe"] {
        let routelm::Tokenizer::Hf(source) = routelm::Tokenizer::from_gguf_as(
            &fixtures().join(format!("tokenizer-{pre}.gguf")),
            routelm::TokenizerBuild::Library,
        )
        .unwrap() else {
            panic!("{pre}: not a tokenizer.json tokenizer");
        };
        let json = tmp.join(format!("{pre}.json"));
        source.save(&json, false).unwrap();
        let n = source.get_vocab_size(true);
        let meta = routelm::tokenize::gguf_metadata(&json, n + 3, None, Some(0)).unwrap();
        let file = tmp.join(format!("{pre}.gguf"));
        routelm::weights::gguf::write(&file, &meta, &[], |_| unreachable!()).unwrap();
        let back = routelm::Tokenizer::from_gguf(&file).unwrap();
        let plain = routelm::Tokenizer::from_file(&json).unwrap();
        assert_eq!(
            back.vocab_size(),
            n + 3,
            "{pre}: padded to the embedding rows"
        );
        for case in want[pre].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let ids = plain.encode(text).unwrap();
            assert_eq!(back.encode(text).unwrap(), ids, "{pre}: {text:?}");
            assert_eq!(
                back.decode(&ids).unwrap(),
                plain.decode(&ids).unwrap(),
                "{pre}: {text:?}"
            );
        }
    }
    std::fs::remove_dir_all(&tmp).ok();
}

/// Randomly damaged files (flipped bytes, lying numbers, truncations) read by the GGUF
/// reader, the model loader and the tokenizer builder give a result or an error, never a
/// panic, and never hang: 400 damaged copies of a model file and a tokenizer file (a seeded
/// smoke test; coverage-guided fuzzing is the thorough one).
#[test]
fn randomly_damaged_files_never_panic() {
    use routelm::rng::Rng;
    let dir = std::env::temp_dir().join(format!("routelm-gguf-damage-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut rng = Rng::new(2024);
    let (mut loaded, mut refused) = (0, 0);
    // more copies for a longer hunt: ROUTELM_DAMAGED_COPIES=N
    let copies = common::damaged_copies(200);
    for name in ["llama3.q8_0.gguf", "tokenizer-llama-bpe.gguf"] {
        let good = std::fs::read(fixtures().join(name)).unwrap();
        // the header, metadata and tensor table: where a damaged number steers the reader
        let head = good.len().min(8192);
        for i in 0..copies {
            let mut b = good.clone();
            for _ in 0..1 + rng.next_u64() % 4 {
                let at = (rng.next_u64() as usize) % head.min(b.len());
                match rng.next_u64() % 4 {
                    0 => b[at] ^= 1 << (rng.next_u64() % 8),
                    1 => b[at] = rng.next_u64() as u8,
                    2 if at + 8 <= b.len() => {
                        let v = [u64::MAX, 1 << 40, 1 << 31, 0][(rng.next_u64() % 4) as usize];
                        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
                    }
                    _ => b.truncate(at.max(1)),
                }
            }
            let path = dir.join("damaged.gguf");
            std::fs::write(&path, &b).unwrap();
            let t0 = std::time::Instant::now();
            let outcome = std::panic::catch_unwind(|| {
                let read = GgufFile::open(&path).is_ok();
                let model =
                    routelm::arch::load_dir(&path, candle_core::DType::F32, &Device::Cpu).is_ok();
                let tok = routelm::Tokenizer::from_gguf(&path).is_ok();
                read && (model || tok)
            });
            let ok = outcome.unwrap_or_else(|_| panic!("{name}, damaged copy {i}: a panic"));
            assert!(
                t0.elapsed().as_secs() < 10,
                "{name}, damaged copy {i}: took {:?}",
                t0.elapsed()
            );
            if ok {
                loaded += 1;
            } else {
                refused += 1;
            }
        }
    }
    println!("damaged GGUF files: {loaded} still loaded, {refused} refused with an error");
    assert!(
        refused > 100,
        "too few damaged files were refused: {refused}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Found by the damaged-file hunt: a head count that does not fit the query rows (6 heads
/// of the key length 16 over 64 rows) made the q/k row reordering index past the matrix.
/// It is an error naming the tensor.
#[test]
fn a_head_count_that_does_not_fit_the_rows_is_an_error() {
    let good = std::fs::read(fixtures().join("llama3.q8_0.gguf")).unwrap();
    let key = b"llama.attention.head_count\x04\x00\x00\x00";
    let at = good.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    let mut b = good.clone();
    b[at..at + 4].copy_from_slice(&6u32.to_le_bytes());
    let path = std::env::temp_dir().join(format!("routelm-heads-{}.gguf", std::process::id()));
    std::fs::write(&path, &b).unwrap();
    for dtype in [candle_core::DType::F32, candle_core::DType::BF16] {
        let err = routelm::arch::load_dir(&path, dtype, &Device::Cpu)
            .err()
            .expect("a head count that does not fit was accepted")
            .to_string();
        assert!(
            err.contains("attn_q.weight")
                || err.contains("attn_k.weight")
                || err.contains("q_proj"),
            "{err}"
        );
    }
    let _ = std::fs::remove_file(&path);
}

/// A file that claims no attention heads is refused with the config's error, for the
/// families whose missing head width is derived from the head count (Phi-3, Gemma 2 and
/// 3 divided by it and panicked).
#[test]
fn no_attention_heads_is_an_error() {
    for (file, arch) in [
        ("gemma3.f32.gguf", "gemma3"),
        ("gemma2.f32.gguf", "gemma2"),
        ("phi3.q8_0.gguf", "phi3"),
        ("llama3.q8_0.gguf", "llama"),
    ] {
        let good = std::fs::read(fixtures().join(file)).unwrap();
        let key = format!("{arch}.attention.head_count\x04\x00\x00\x00");
        let at = good
            .windows(key.len())
            .position(|w| w == key.as_bytes())
            .unwrap_or_else(|| panic!("{file}: no {arch}.attention.head_count"))
            + key.len();
        let mut b = good.clone();
        b[at..at + 4].copy_from_slice(&0u32.to_le_bytes());
        let path = std::env::temp_dir().join(format!(
            "routelm-no-heads-{arch}-{}.gguf",
            std::process::id()
        ));
        std::fs::write(&path, &b).unwrap();
        let err = routelm::arch::load_dir(&path, candle_core::DType::F32, &Device::Cpu)
            .err()
            .unwrap_or_else(|| panic!("{file}: no heads was accepted"))
            .to_string();
        let _ = std::fs::remove_file(&path);
        assert!(err.contains("n_heads must be positive"), "{file}: {err}");
    }
}

/// Every number a model or tokenizer fixture's metadata holds (and the first element of
/// every i32 array, such as the token types), replaced in turn by an extreme (0, 1 and the
/// type's largest for unsigned integers, 0, −1 and both ends for signed ones; 0, −1, NaN
/// and ∞ for floats): loading the model and building the tokenizer (both ways) give a
/// result or an error, never a panic.
#[test]
fn lying_metadata_numbers_never_panic() {
    let models = [
        "gemma.f32.gguf",
        "gemma2.f32.gguf",
        "gemma3.f32.gguf",
        "llama3.q8_0.gguf",
        "mixtral.f32.gguf",
        "olmoe.q8_0.gguf",
        "phi3.q8_0.gguf",
        "qwen2.f32.gguf",
        "qwen2_moe.f32.gguf",
        "qwen3.f32.gguf",
        "qwen3_moe.f32.gguf",
        "tokenizer-default.gguf",
        "tokenizer-gemma.gguf",
        "tokenizer-llama-bpe.gguf",
        "tokenizer-llama-spm.gguf",
        "tokenizer-phi3-spm.gguf",
    ];
    let path = std::env::temp_dir().join(format!("routelm-lying-{}.gguf", std::process::id()));
    let (mut tried, mut panics) = (0, Vec::new());
    for file in models {
        let good = std::fs::read(fixtures().join(file)).unwrap();
        let meta = GgufFile::open(&fixtures().join(file)).unwrap().metadata;
        for (key, value) in &meta {
            // the value's type code, the bytes before the patched number (an integer
            // array's element type and count: its first element is patched), the numbers
            let signed = || {
                [0i32, -1, i32::MAX, i32::MIN]
                    .map(|v| v.to_le_bytes().to_vec())
                    .into()
            };
            let (code, skip, bytes): (u32, usize, Vec<Vec<u8>>) = match value {
                Value::Array(v) if matches!(v.first(), Some(Value::I32(_))) => (9, 12, signed()),
                Value::U32(_) => (
                    4,
                    0,
                    [0u32, 1, u32::MAX].map(|v| v.to_le_bytes().to_vec()).into(),
                ),
                Value::U64(_) => (
                    10,
                    0,
                    [0u64, 1, u64::MAX].map(|v| v.to_le_bytes().to_vec()).into(),
                ),
                Value::I32(_) => (5, 0, signed()),
                Value::F32(_) => (
                    6,
                    0,
                    [0f32, -1.0, f32::NAN, f32::INFINITY]
                        .map(|v| v.to_le_bytes().to_vec())
                        .into(),
                ),
                _ => continue,
            };
            // the key as stored: its length, its bytes, then the value's type
            let mut stored = (key.len() as u64).to_le_bytes().to_vec();
            stored.extend(key.as_bytes());
            stored.extend(code.to_le_bytes());
            let at = good
                .windows(stored.len())
                .position(|w| w == stored.as_slice())
                .unwrap_or_else(|| panic!("{file}: {key} not found"))
                + stored.len()
                + skip;
            for v in bytes {
                let mut b = good.clone();
                b[at..at + v.len()].copy_from_slice(&v);
                std::fs::write(&path, &b).unwrap();
                tried += 1;
                // the model, and the tokenizer both ways (routelm's own and the library's)
                let load = std::panic::catch_unwind(|| {
                    let _ = routelm::arch::load_dir(&path, candle_core::DType::F32, &Device::Cpu);
                    let _ = routelm::Tokenizer::from_gguf(&path);
                    let _ =
                        routelm::Tokenizer::from_gguf_as(&path, routelm::TokenizerBuild::Library);
                });
                if load.is_err() {
                    panics.push(format!("{file}: {key} = {v:?}"));
                }
            }
        }
    }
    let _ = std::fs::remove_file(&path);
    println!("lying metadata: {tried} files loaded");
    assert!(tried > 100, "only {tried} variants tried");
    assert!(
        panics.is_empty(),
        "loading panicked on:\n{}",
        panics.join("\n")
    );
}

/// A `tokenizer.json` with more tokens than the model's embedding rows, or an id far past
/// them, is refused by name when its GGUF metadata is made, before anything is sized by
/// the id (an id of 4 billion sized a 96 GB token list).
#[test]
fn tokenizers_larger_than_the_embedding_are_refused() {
    let routelm::Tokenizer::Hf(source) = routelm::Tokenizer::from_gguf_as(
        &fixtures().join("tokenizer-llama-bpe.gguf"),
        routelm::TokenizerBuild::Library,
    )
    .unwrap() else {
        panic!("not a tokenizer.json tokenizer");
    };
    let dir = std::env::temp_dir().join(format!("routelm-tok-big-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("tokenizer.json");
    source.save(&json, false).unwrap();
    let n = source.get_vocab_size(true);
    let err = routelm::tokenize::gguf_metadata(&json, n - 1, None, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("{n} tokens, more than the model's {}", n - 1)),
        "{err}"
    );
    assert!(err.contains("tokenizer.json"), "{err}");
    let mut spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    spec["added_tokens"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "id": 4_000_000_000u64, "content": "<far>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }));
    std::fs::write(&json, spec.to_string()).unwrap();
    let err = routelm::tokenize::gguf_metadata(&json, n + 3, None, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("4000000001 tokens, more than the model's"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

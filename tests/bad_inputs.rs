//! The bad-input table: each class of damage (truncations, flipped bytes, lying counts,
//! offsets, dimensions and string lengths, wrong dtypes, name mismatches, huge values,
//! invalid UTF-8, empty inputs, out-of-range tokens, prompts past the context) applied to
//! each format routelm reads (safetensors, config.json, GGUF, tokenizer.json, run files,
//! prompts, server requests). Every case must fail with a clear error that names the file
//! (files) or the field (requests), a non-zero exit or a 4xx status, and no panic. The
//! table of what routelm answered is printed (`cargo test --test bad_inputs --
//! --nocapture`) and written to target/bad-inputs.md.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device};
use serde_json::{json, Value};

/// The rows printed at the end: format, class, what routelm said.
static TABLE: Mutex<Vec<(String, String, String)>> = Mutex::new(Vec::new());

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("routelm-bad-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A copy of a fixture folder.
fn copy_dir(from: &str, name: &str) -> PathBuf {
    let d = scratch(name);
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
    }
    d
}

/// `routelm ARGS` must fail without a panic, its error mentioning every one of `expect`;
/// the row goes into the table.
fn refused(format: &str, class: &str, args: &[&str], expect: &[&str]) {
    let out = common::run_routelm(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "{format} / {class}: routelm {args:?} succeeded"
    );
    assert!(
        !err.contains("panicked"),
        "{format} / {class}: a panic: {err}"
    );
    for e in expect {
        assert!(
            err.contains(e),
            "{format} / {class}: the error does not say {e:?}: {err}"
        );
    }
    // the error line, and the first problem when it lists them on the lines below
    let mut lines = err.lines().skip_while(|l| !l.starts_with("error"));
    let mut line = lines.next().unwrap_or_default().to_string();
    if line.ends_with(':') {
        line = format!("{line} {}", lines.next().unwrap_or_default().trim());
    }
    row(
        format,
        class,
        &format!("exit {}: {line}", out.status.code().unwrap_or(-1)),
    );
}

fn row(format: &str, class: &str, said: &str) {
    TABLE
        .lock()
        .unwrap()
        .push((format.into(), class.into(), said.into()));
}

fn generate(model: &Path) -> Vec<String> {
    [
        "generate",
        model.to_str().unwrap(),
        "--prompt-ids",
        "1,2,3",
        "--max-tokens",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn run_generate(format: &str, class: &str, model: &Path, expect: &[&str]) {
    let mut args = generate(model);
    args.insert(1, "--model".into());
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    refused(format, class, &args, expect);
}

/// Ten cut points spread over a file: inside the first bytes, the header and the data.
fn cut_points(len: usize, header_end: usize) -> Vec<usize> {
    let mut at = vec![0, 3, 8, header_end / 2, header_end];
    for i in 1..=5 {
        at.push(header_end + (len - header_end) * i / 6);
    }
    at
}

// ---------------------------------------------------------------------------------------
// safetensors

fn st_split(bytes: &[u8]) -> (Value, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

fn st_join(header: &Value, data: &[u8]) -> Vec<u8> {
    let h = serde_json::to_vec(header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    out
}

/// A copy of the llama3 fixture whose model.safetensors is `edit(original bytes)`.
fn st_case(name: &str, edit: impl Fn(&[u8]) -> Vec<u8>) -> PathBuf {
    let d = copy_dir("tests/fixtures/hf/llama3", name);
    let f = d.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, edit(&bytes)).unwrap();
    d
}

fn st_header_edit(name: &str, edit: impl Fn(&mut serde_json::Map<String, Value>)) -> PathBuf {
    st_case(name, |b| {
        let (mut h, data) = st_split(b);
        edit(h.as_object_mut().unwrap());
        st_join(&h, &data)
    })
}

const EMBED: &str = "model.embed_tokens.weight";

#[test]
fn safetensors() {
    let f = "safetensors";
    let file = "model.safetensors";
    let bytes = std::fs::read("tests/fixtures/hf/llama3/model.safetensors").unwrap();
    let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    for (i, at) in cut_points(bytes.len(), header_end).into_iter().enumerate() {
        let d = st_case(&format!("st-cut{i}"), |b| b[..at].to_vec());
        // past the length prefix, the error says the file is cut short
        let expect: &[&str] = if at > 8 {
            &[file, "cut short"]
        } else {
            &[file]
        };
        run_generate(f, &format!("truncated at byte {at}"), &d, expect);
    }
    let d = st_case("st-flip", |b| {
        let mut b = b.to_vec();
        b[9] = b'}';
        b
    });
    run_generate(
        f,
        "flipped byte in the header",
        &d,
        &[file, "not a valid safetensors"],
    );
    let d = st_case("st-prefix", |b| {
        let mut b = b.to_vec();
        b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        b
    });
    run_generate(f, "lying header length (2^64-1)", &d, &[file]);
    let d = st_header_edit("st-offsets", |h| {
        h[EMBED]["data_offsets"][1] = json!(1u64 << 40);
    });
    run_generate(f, "lying data offsets (end 2^40)", &d, &[file, EMBED]);
    let d = st_header_edit("st-dims", |h| {
        h[EMBED]["shape"][0] = json!(320_000);
    });
    run_generate(
        f,
        "lying dimensions (320 → 320000 rows)",
        &d,
        &[file, EMBED],
    );
    let d = st_header_edit("st-dtype", |h| {
        h[EMBED]["dtype"] = json!("BOOL");
    });
    run_generate(f, "wrong dtype (BOOL)", &d, &[file, EMBED]);
    let d = st_header_edit("st-dtype-size", |h| {
        h[EMBED]["dtype"] = json!("F64");
    });
    run_generate(
        f,
        "dtype that does not fit the bytes (F64)",
        &d,
        &[file, EMBED],
    );
    let d = st_header_edit("st-name", |h| {
        let t = h.remove(EMBED).unwrap();
        h.insert("model.embed_tokenz.weight".into(), t);
    });
    run_generate(
        f,
        "name mismatch (a tensor renamed)",
        &d,
        &[file, "embed_tokenz"],
    );
    let d = st_case("st-utf8", |b| {
        let mut b = b.to_vec();
        let at = b
            .windows(EMBED.len())
            .position(|w| w == EMBED.as_bytes())
            .unwrap();
        b[at + 2] = 0xff;
        b
    });
    run_generate(f, "invalid UTF-8 in the header", &d, &[file]);
    let d = st_case("st-empty", |_| Vec::new());
    run_generate(f, "empty file", &d, &[file]);
    print_table("safetensors");
}

// ---------------------------------------------------------------------------------------
// config.json

fn config_case(name: &str, edit: impl Fn(&str) -> Vec<u8>) -> PathBuf {
    let d = copy_dir("tests/fixtures/hf/llama3", name);
    let f = d.join("config.json");
    let text = std::fs::read_to_string(&f).unwrap();
    std::fs::write(&f, edit(&text)).unwrap();
    d
}

fn config_set(name: &str, key: &str, v: Value) -> PathBuf {
    config_case(name, |t| {
        let mut c: Value = serde_json::from_str(t).unwrap();
        c[key] = v.clone();
        serde_json::to_vec(&c).unwrap()
    })
}

#[test]
fn config_json() {
    let f = "config.json";
    let file = "config.json";
    let d = config_set("cfg-huge", "hidden_size", json!(1_000_000_000_000u64));
    run_generate(
        f,
        "huge value (hidden_size 10^12)",
        &d,
        &[file, "larger than"],
    );
    let d = config_set("cfg-huge-ctx", "max_position_embeddings", json!(1u64 << 40));
    run_generate(f, "huge context (2^40 positions)", &d, &[file]);
    let d = config_set("cfg-neg", "num_hidden_layers", json!(-2));
    run_generate(f, "negative count", &d, &[file]);
    let d = config_set("cfg-type", "hidden_size", json!("big"));
    run_generate(
        f,
        "wrong type (a string for a size)",
        &d,
        &[file, "hidden_size"],
    );
    let d = config_set("cfg-layers", "num_hidden_layers", json!(3));
    run_generate(
        f,
        "config that does not match the tensors",
        &d,
        &["model.layers.2"],
    );
    let d2 = config_case("cfg-arch2", |t| {
        let mut c: Value = serde_json::from_str(t).unwrap();
        c["model_type"] = json!("nonesuch");
        c["architectures"] = json!(["NonesuchForCausalLM"]);
        serde_json::to_vec(&c).unwrap()
    });
    run_generate(f, "unknown architecture", &d2, &[file, "nonesuch"]);
    let d = config_case("cfg-utf8", |t| {
        let mut b = t.as_bytes().to_vec();
        let at = t.find("llama").unwrap();
        b[at] = 0xff;
        b
    });
    run_generate(f, "invalid UTF-8", &d, &[file]);
    let d = config_case("cfg-cut", |t| t.as_bytes()[..t.len() / 2].to_vec());
    run_generate(f, "truncated", &d, &[file]);
    let d = config_case("cfg-empty", |_| Vec::new());
    run_generate(f, "empty file", &d, &[file]);
    print_table("config.json");
}

// ---------------------------------------------------------------------------------------
// GGUF

const GGUF: &str = "tests/fixtures/gguf/llama3.q8_0.gguf";

fn gguf_case(name: &str, edit: impl Fn(&mut Vec<u8>)) -> PathBuf {
    let d = scratch(name);
    let f = d.join("model.gguf");
    let mut bytes = std::fs::read(GGUF).unwrap();
    edit(&mut bytes);
    std::fs::write(&f, bytes).unwrap();
    f
}

fn find(b: &[u8], what: &str) -> usize {
    b.windows(what.len())
        .position(|w| w == what.as_bytes())
        .unwrap_or_else(|| panic!("{what} is not in {GGUF}"))
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn gguf() {
    let f = "GGUF";
    let file = "model.gguf";
    let bytes = std::fs::read(GGUF).unwrap();
    // the tensor table ends where the first tensor's data starts (32-byte aligned)
    let table_end = find(&bytes, "output.weight") + 64;
    for (i, at) in cut_points(bytes.len(), table_end).into_iter().enumerate() {
        let p = gguf_case(&format!("gguf-cut{i}"), |b| b.truncate(at));
        run_generate(f, &format!("truncated at byte {at}"), &p, &[file]);
    }
    let p = gguf_case("gguf-magic", |b| b[0] = b'X');
    run_generate(f, "flipped byte in the magic", &p, &[file, "GGUF"]);
    let p = gguf_case("gguf-version", |b| b[4] = 9);
    run_generate(f, "flipped byte in the version", &p, &[file, "version"]);
    let p = gguf_case("gguf-ntensors", |b| put_u64(b, 8, u64::MAX));
    run_generate(
        f,
        "lying tensor count (2^64-1)",
        &p,
        &[file, "tensor count"],
    );
    let p = gguf_case("gguf-nkv", |b| put_u64(b, 16, 1 << 40));
    run_generate(
        f,
        "lying metadata count (2^40)",
        &p,
        &[file, "metadata count"],
    );
    let p = gguf_case("gguf-strlen", |b| {
        let at = find(b, "general.architecture") - 8;
        put_u64(b, at, 1 << 40)
    });
    run_generate(f, "lying string length (2^40)", &p, &[file]);
    // after a tensor's name: u32 dimension count, u64 dimensions, u32 type, u64 offset
    let name = "token_embd.weight";
    let p = gguf_case("gguf-dims", |b| {
        let at = find(b, name) + name.len() + 4;
        put_u64(b, at, 1 << 40)
    });
    run_generate(f, "lying dimensions (2^40 columns)", &p, &[file, name]);
    let p = gguf_case("gguf-ndims", |b| {
        let at = find(b, name) + name.len();
        b[at..at + 4].copy_from_slice(&1000u32.to_le_bytes())
    });
    run_generate(f, "lying dimension count (1000)", &p, &[file, "dimensions"]);
    let p = gguf_case("gguf-offset", |b| {
        let at = find(b, name) + name.len() + 4 + 16 + 4;
        put_u64(b, at, 1 << 50)
    });
    run_generate(f, "lying data offset (2^50)", &p, &[file, "past the end"]);
    let p = gguf_case("gguf-type", |b| {
        let at = find(b, name) + name.len() + 4 + 16;
        b[at..at + 4].copy_from_slice(&99u32.to_le_bytes())
    });
    run_generate(f, "wrong dtype (type 99)", &p, &[file, "type 99"]);
    let p = gguf_case("gguf-name", |b| {
        let at = find(b, name);
        b[at + name.len() - 1] = b'X'
    });
    run_generate(
        f,
        "name mismatch (a tensor renamed)",
        &p,
        &[file, "token_embd"],
    );
    let p = gguf_case("gguf-huge", |b| {
        let at = find(b, "llama.embedding_length") + "llama.embedding_length".len() + 4;
        b[at..at + 4].copy_from_slice(&0x7fff_ffffu32.to_le_bytes())
    });
    run_generate(f, "huge value (embedding_length 2^31-1)", &p, &[file]);
    let p = gguf_case("gguf-utf8", |b| {
        // the architecture's value, "llama", follows its key, type and length
        let at = find(b, "general.architecture") + "general.architecture".len() + 4 + 8;
        b[at] = 0xff
    });
    run_generate(f, "invalid UTF-8 in a string", &p, &[file]);
    let p = gguf_case("gguf-empty", |b| b.clear());
    run_generate(f, "empty file", &p, &[file]);
    print_table("GGUF");
}

// ---------------------------------------------------------------------------------------
// tokenizer.json

fn tokenizer_case(name: &str, edit: impl Fn(&str) -> Vec<u8>) -> PathBuf {
    let d = copy_dir("tests/fixtures/hf/llama3", name);
    let text = std::fs::read_to_string("tests/fixtures/tokenizer/tokenizer.json").unwrap();
    std::fs::write(d.join("tokenizer.json"), edit(&text)).unwrap();
    d
}

fn tokenize(format: &str, class: &str, d: &Path, expect: &[&str]) {
    refused(
        format,
        class,
        &[
            "tokenize",
            "--model",
            d.to_str().unwrap(),
            "--text",
            "hello",
        ],
        expect,
    );
}

#[test]
fn tokenizer_json() {
    let f = "tokenizer.json";
    let file = "tokenizer.json";
    let d = tokenizer_case("tok-cut", |t| t.as_bytes()[..t.len() / 2].to_vec());
    tokenize(f, "truncated", &d, &[file]);
    let d = tokenizer_case("tok-flip", |t| t.replacen(':', "}", 1).into_bytes());
    tokenize(f, "flipped byte", &d, &[file]);
    let d = tokenizer_case("tok-utf8", |t| {
        let mut b = t.as_bytes().to_vec();
        b[t.find("model").unwrap()] = 0xff;
        b
    });
    tokenize(f, "invalid UTF-8", &d, &[file]);
    let d = tokenizer_case("tok-type", |t| {
        let mut v: Value = serde_json::from_str(t).unwrap();
        v["model"] = json!(5);
        serde_json::to_vec(&v).unwrap()
    });
    tokenize(f, "wrong type (model: 5)", &d, &[file]);
    let d = tokenizer_case("tok-empty", |_| Vec::new());
    tokenize(f, "empty file", &d, &[file]);
    print_table("tokenizer.json");
}

// ---------------------------------------------------------------------------------------
// run files (TOML)

fn run_file(format: &str, class: &str, name: &str, text: &[u8], expect: &[&str]) {
    let d = scratch(name);
    let f = d.join("run.toml");
    std::fs::write(&f, text).unwrap();
    let out = d.join("out");
    refused(
        format,
        class,
        &[
            "train",
            "--config",
            f.to_str().unwrap(),
            "--steps",
            "1",
            "--out",
            out.to_str().unwrap(),
        ],
        &[&["run.toml"], expect].concat(),
    );
}

#[test]
fn run_files() {
    let f = "run file (TOML)";
    let base = "[model]\nvocab_size = 256\nd_model = 32\nn_layers = 1\nn_heads = 2\nd_ff = 64\nmax_seq_len = 32\n";
    run_file(
        f,
        "huge value (d_model 10^9)",
        "run-huge",
        base.replace("d_model = 32", "d_model = 1000000000")
            .as_bytes(),
        &["d_model"],
    );
    run_file(
        f,
        "huge product (each size allowed, the model not)",
        "run-product",
        base.replace("d_model = 32", "d_model = 1048576")
            .replace("vocab_size = 256", "vocab_size = 16000000")
            .as_bytes(),
        &["GiB"],
    );
    run_file(
        f,
        "wrong type",
        "run-type",
        base.replace("d_model = 32", "d_model = \"big\"").as_bytes(),
        &["d_model"],
    );
    run_file(
        f,
        "negative count",
        "run-neg",
        base.replace("n_layers = 1", "n_layers = -1").as_bytes(),
        &["n_layers"],
    );
    run_file(
        f,
        "unknown key",
        "run-key",
        format!("{base}d_moddel = 3\n").as_bytes(),
        &["d_moddel"],
    );
    let mut bad = base.as_bytes().to_vec();
    bad[3] = 0xff;
    run_file(f, "invalid UTF-8", "run-utf8", &bad, &[]);
    run_file(f, "truncated", "run-cut", &base.as_bytes()[..20], &[]);
    print_table("run file");
}

// ---------------------------------------------------------------------------------------
// prompts

#[test]
fn prompts() {
    let f = "prompt";
    let m = "tests/fixtures/hf/llama3";
    refused(
        f,
        "token id out of range",
        &[
            "generate",
            "--model",
            m,
            "--prompt-ids",
            "1,99999",
            "--max-tokens",
            "2",
        ],
        &["99999"],
    );
    let long: Vec<String> = (0..200).map(|i| (i % 300).to_string()).collect();
    refused(
        f,
        "prompt past the context (200 of 128)",
        &[
            "generate",
            "--model",
            m,
            "--prompt-ids",
            &long.join(","),
            "--max-tokens",
            "2",
        ],
        &["128"],
    );
    refused(
        f,
        "empty prompt",
        &[
            "generate",
            "--model",
            m,
            "--prompt",
            "",
            "--max-tokens",
            "2",
        ],
        &["empty"],
    );
    refused(
        f,
        "not a token id",
        &[
            "generate",
            "--model",
            m,
            "--prompt-ids",
            "1,x",
            "--max-tokens",
            "2",
        ],
        &["x"],
    );
    print_table("prompt");
}

// ---------------------------------------------------------------------------------------
// server requests (parsed as `routelm serve` parses them)

#[test]
fn server_requests() {
    use routelm::chat::ChatModel;
    use routelm::serve::http::{parse_chat, parse_completion};
    let cm = ChatModel::load(
        "tests/fixtures/hf/mixtral".as_ref(),
        None,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let cases: Vec<(&str, bool, Vec<u8>, &str)> = vec![
        ("malformed JSON", true, b"{\"messages\": [".to_vec(), "not valid JSON"),
        ("invalid UTF-8", false, b"{\"prompt\": \"\xff\"}".to_vec(), "not valid JSON"),
        ("empty body", false, Vec::new(), "not valid JSON"),
        ("not an object", true, b"[1, 2]".to_vec(), "JSON object"),
        ("wrong type (messages: 3)", true, br#"{"messages": 3}"#.to_vec(), "messages"),
        ("wrong type (temperature: \"hot\")", false, br#"{"prompt": "a", "temperature": "hot"}"#.to_vec(), "temperature"),
        ("empty messages", true, br#"{"messages": []}"#.to_vec(), "must not be empty"),
        ("empty prompt", false, br#"{"prompt": ""}"#.to_vec(), "empty"),
        ("token id out of range", false, br#"{"prompt": [1, 99999]}"#.to_vec(), "out of range"),
        ("huge value (max_tokens 10^20)", false, br#"{"prompt": "a", "max_tokens": 1e20}"#.to_vec(), "max_tokens"),
        ("negative value (max_tokens -1)", false, br#"{"prompt": "a", "max_tokens": -1}"#.to_vec(), "max_tokens"),
        ("NaN-like value (top_p 0)", false, br#"{"prompt": "a", "top_p": 0}"#.to_vec(), "top_p"),
        ("huge value (top_logprobs 10^9)", true, br#"{"messages": [{"role": "user", "content": "a"}], "logprobs": true, "top_logprobs": 1000000000}"#.to_vec(), "top_logprobs"),
    ];
    for (class, chat, body, expect) in cases {
        let r = if chat {
            parse_chat(&cm, 16, &body)
        } else {
            parse_completion(&cm, 16, &body)
        };
        let Err(e) = r else {
            panic!("server request / {class}: accepted")
        };
        assert!((400..500).contains(&e.status()), "{class}: {}", e.status());
        assert!(e.message().contains(expect), "{class}: {}", e.message());
        row(
            "server request",
            class,
            &format!("{}: {}", e.status(), e.message()),
        );
    }
    let long = "x ".repeat(200);
    let body = json!({"prompt": long}).to_string();
    let e = parse_completion(&cm, 16, body.as_bytes()).err().unwrap();
    assert_eq!(e.status(), 400);
    assert!(e.message().contains("context"), "{}", e.message());
    row(
        "server request",
        "prompt past the context",
        &format!("{}: {}", e.status(), e.message()),
    );
    print_table("server request");
}

/// Print this test's rows and append them to target/bad-inputs.md.
fn print_table(format: &str) {
    let rows: Vec<_> = TABLE
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.0.starts_with(format))
        .cloned()
        .collect();
    let mut md = String::new();
    for (f, class, said) in rows {
        let said = said.replace('|', "\\|");
        md.push_str(&format!("| {f} | {class} | {said} |\n"));
    }
    println!("{md}");
    use std::io::Write;
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bad-inputs.md");
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = file.write_all(md.as_bytes());
    }
}

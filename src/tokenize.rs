//! Text ↔ token ids: byte-level (256 ids, the default for training) or a `tokenizer.json`
//! through the `tokenizers` crate, behind one type.

use std::path::Path;

use crate::error::{Error, Result};

pub enum Tokenizer {
    /// Each byte is a token id (0..256).
    Bytes,
    Hf(Box<tokenizers::Tokenizer>),
}

impl Tokenizer {
    /// Load a `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let t = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::parse(path, e))?;
        Ok(Tokenizer::Hf(Box::new(t)))
    }

    /// `DIR/tokenizer.json` when present, otherwise byte-level.
    pub fn for_model_dir(dir: &Path) -> Result<Self> {
        if dir.is_file() && dir.extension().is_some_and(|e| e == "gguf") {
            return Self::from_gguf(dir);
        }
        let p = dir.join("tokenizer.json");
        if p.exists() {
            Self::from_file(&p)
        } else {
            Ok(Tokenizer::Bytes)
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Bytes => 256,
            Tokenizer::Hf(t) => t.get_vocab_size(true),
        }
    }

    /// Token ids of `text`, with the special tokens the tokenizer's post-processor adds
    /// (a BOS for Llama and Gemma), as transformers' `encode` does by default.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, true)
    }

    /// Token ids of `text` alone, no special tokens added (training corpora).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, false)
    }

    fn encode_with(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Bytes => Ok(text.bytes().map(u32::from).collect()),
            Tokenizer::Hf(t) => Ok(t
                .encode(text, special)
                .map_err(|e| Error::Tokenizer(e.to_string()))?
                .get_ids()
                .to_vec()),
        }
    }

    /// The token strings of `ids` (`None` where the vocabulary has none).
    pub fn tokens(&self, ids: &[u32]) -> Vec<Option<String>> {
        match self {
            Tokenizer::Bytes => ids
                .iter()
                .map(|&i| {
                    u8::try_from(i)
                        .ok()
                        .map(|b| String::from_utf8_lossy(&[b]).into_owned())
                })
                .collect(),
            Tokenizer::Hf(t) => ids.iter().map(|&i| t.id_to_token(i)).collect(),
        }
    }

    /// Decode ids to text, special tokens skipped; invalid UTF-8 (a byte sequence cut
    /// mid-character) is replaced.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            Tokenizer::Bytes => {
                let bytes: Vec<u8> = ids.iter().map(|&i| i.min(255) as u8).collect();
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            Tokenizer::Hf(t) => t
                .decode(ids, true)
                .map_err(|e| Error::Tokenizer(e.to_string())),
        }
    }
}

/// GPT-2's byte → character map: printable bytes stand for themselves, the others take
/// the characters from U+0100 on, in byte order (so a byte-level vocabulary is text).
fn byte_alphabet() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        map[b as usize] = if printable {
            b as char
        } else {
            let c = char::from_u32(next).unwrap_or('?');
            next += 1;
            c
        };
    }
    map
}

/// The split before byte-level BPE that a GGUF `tokenizer.ggml.pre` names; `None` for
/// GPT-2's own (the byte-level pre-tokenizer's built-in pattern).
fn gguf_split(pre: &str) -> std::result::Result<Option<&'static str>, String> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Ok(match pre {
        "default" | "gpt2" | "gpt-2" | "smollm" => None,
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "smaug-bpe" | "dbrx" => Some(LLAMA3),
        "qwen2" | "deepseek-r1-qwen" => Some(QWEN2),
        other => {
            return Err(format!(
                "pre-tokenizer '{other}' is not supported (default, gpt-2, smollm, llama-bpe/llama3, qwen2)"
            ))
        }
    })
}

impl Tokenizer {
    /// The tokenizer a GGUF file's metadata describes (`tokenizer.ggml.*`): a byte-level
    /// BPE (`model` `gpt2`) with its vocabulary, merges and pre-tokenizer split; control
    /// tokens are special, user-defined ones added whole; BOS when `add_bos_token` says so.
    /// Built as transformers builds it from the same file.
    pub fn from_gguf(path: &Path) -> Result<Self> {
        use crate::weights::gguf::{GgufFile, Value};
        use serde_json::json;
        let f = GgufFile::open(path)?;
        let bad = |msg: String| Error::Tokenizer(format!("{}: {msg}", path.display()));
        let strings = |key: &str| -> Result<Vec<String>> {
            match f.get(key) {
                Some(Value::Array(v)) => v
                    .iter()
                    .map(|x| x.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| bad(format!("{key} holds a non-string"))),
                _ => Err(bad(format!("no {key} array"))),
            }
        };
        let model = f.get("tokenizer.ggml.model").and_then(Value::as_str);
        if model != Some("gpt2") {
            return Err(bad(format!(
                "tokenizer.ggml.model {model:?}: only byte-level BPE (gpt2) is read so far"
            )));
        }
        let pre = f
            .get("tokenizer.ggml.pre")
            .and_then(Value::as_str)
            .unwrap_or("default");
        let split = gguf_split(pre).map_err(bad)?;
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types: Vec<u64> = match f.get("tokenizer.ggml.token_type") {
            Some(Value::Array(v)) => v.iter().map(|x| x.as_u64().unwrap_or(1)).collect(),
            _ => vec![1; tokens.len()],
        };
        let alphabet = byte_alphabet();
        let mut vocab = serde_json::Map::new();
        let mut added = Vec::new();
        for (id, t) in tokens.iter().enumerate() {
            let spelled = if t.chars().all(|c| alphabet.contains(&c)) {
                t.clone()
            } else {
                t.bytes().map(|b| alphabet[b as usize]).collect()
            };
            let kind = types.get(id).copied().unwrap_or(1);
            // control tokens (3) special, user-defined ones (4) whole but not special; a
            // control token outside the byte alphabet is a mislabel and left alone
            if (kind == 3 && t.chars().all(|c| alphabet.contains(&c))) || kind == 4 {
                added.push(json!({"id": id, "content": t, "single_word": false,
                    "lstrip": false, "rstrip": false, "normalized": false, "special": kind == 3}));
            }
            vocab.insert(spelled, json!(id));
        }
        let merges: Vec<serde_json::Value> = merges
            .iter()
            .map(|m| {
                let (a, b) = m.split_once(' ').unwrap_or((m, ""));
                json!([a, b])
            })
            .collect();
        let byte_level = |regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": regex});
        let pre_tokenizer = match split {
            None => byte_level(true),
            Some(r) => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false},
                byte_level(false)]}),
        };
        let add_bos = matches!(
            f.get("tokenizer.ggml.add_bos_token"),
            Some(Value::Bool(true))
        );
        let bos = f
            .get("tokenizer.ggml.bos_token_id")
            .and_then(Value::as_u64)
            .and_then(|b| tokens.get(b as usize).map(|t| (b, t.clone())));
        let post = match (add_bos, bos) {
            (true, Some((id, t))) => json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": t, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": t, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {t.clone(): {"id": t, "ids": [id], "tokens": [t]}}}),
            _ => serde_json::Value::Null,
        };
        let spec = json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": added, "normalizer": null, "pre_tokenizer": pre_tokenizer,
            "post_processor": post,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": false,
                "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges},
        });
        let t = tokenizers::Tokenizer::from_bytes(spec.to_string())
            .map_err(|e| bad(format!("building the tokenizer: {e}")))?;
        Ok(Tokenizer::Hf(Box::new(t)))
    }
}

//! Text ↔ token ids: byte-level (256 ids, the default for training), a `tokenizer.json`
//! through the `tokenizers` crate, or a GGUF file's vocabulary built by routelm, behind one
//! type.

mod bpe;
mod bytelevel;
mod gguf;
mod spm;

pub use bytelevel::Split;
pub use gguf::{gguf_metadata, Build};

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub enum Tokenizer {
    /// Each byte is a token id (0..256).
    Bytes,
    Hf(Box<tokenizers::Tokenizer>),
    /// Gemma's SentencePiece-style BPE from a GGUF file (the file, to write it out as a
    /// `tokenizer.json`).
    Spm(Box<spm::SpmBpe>, PathBuf),
    /// Byte-level BPE from a GGUF file (GGUF's `gpt2`: SmolLM2, Llama 3, Qwen 2), built by
    /// routelm (the file, to write it out as a `tokenizer.json`).
    ByteLevel(Box<bytelevel::ByteBpe>, PathBuf),
}

impl Tokenizer {
    /// Load a `tokenizer.json`.
    /// The file's JSON is checked first, and a panic inside the `tokenizers` library on
    /// content it does not expect (some damaged decoders make it unwrap) is an error naming
    /// the file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut spec = serde_json::from_str::<serde_json::Value>(&text)
            .map_err(|e| Error::parse(path, format!("not valid JSON: {e}")))?;
        // a BPE model is built from its vocabulary and merges through the builders (see
        // [`assembled`]); anything else as the library reads a description
        let t = quietly(|| match BpeParts::take_from(&mut spec) {
            Some(parts) => assembled(parts).map_err(tokenizers::Error::from),
            None => text.parse::<tokenizers::Tokenizer>(),
        })
        .map_err(|_| {
            Error::parse(
                path,
                "the tokenizers library could not read this file (it failed on its content)",
            )
        })?
        .map_err(|e| Error::parse(path, e))?;
        // a post-processor naming a token the vocabulary lacks loads, then panics on every
        // encode: try one here
        let trial = quietly(|| {
            t.encode("Hello, world! 123", true)
                .map(|e| e.get_ids().to_vec())
        });
        match trial {
            Err(_) => {
                return Err(Error::parse(
                    path,
                    "the tokenizer fails on a short test text (its post-processor or model refers to something it lacks)",
                ))
            }
            Ok(Err(e)) => return Err(Error::parse(path, format!("the tokenizer cannot encode a short test text: {e}"))),
            Ok(Ok(_)) => {}
        }
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

    /// Write the tokenizer as a `tokenizer.json` (a byte-level one has none: nothing is
    /// written, `Ok(false)`).
    pub fn save(&self, path: &Path) -> Result<bool> {
        match self {
            Tokenizer::Bytes => Ok(false),
            Tokenizer::Spm(_, file) | Tokenizer::ByteLevel(_, file) => {
                Self::from_gguf_as(file, Build::Library)?.save(path)
            }
            Tokenizer::Hf(t) => {
                let json = t
                    .to_string(false)
                    .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
                crate::weights::write_atomic(path, json.as_bytes())?;
                Ok(true)
            }
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Bytes => 256,
            Tokenizer::Hf(t) => t.get_vocab_size(true),
            Tokenizer::Spm(t, _) => t.table.size(),
            Tokenizer::ByteLevel(t, _) => t.table.size(),
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

    /// Release what only encoding reads (a byte-level BPE's merges), for a caller that has
    /// encoded all it will, as `generate` has once the prompt is in ids: decoding and
    /// token lookups are unchanged, and a later encode is an error.
    pub fn release_encoder(&mut self) {
        if let Tokenizer::ByteLevel(t, _) = self {
            t.release_merges();
        }
    }

    fn encode_with(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Bytes => Ok(text.bytes().map(u32::from).collect()),
            Tokenizer::Hf(t) => Ok(t
                .encode(text, special)
                .map_err(|e| Error::Tokenizer(e.to_string()))?
                .get_ids()
                .to_vec()),
            Tokenizer::Spm(t, _) => Ok(t.encode(text, special)),
            Tokenizer::ByteLevel(t, _) => t.encode(text, special).ok_or_else(|| {
                Error::Tokenizer("this tokenizer's encoder was released (it decodes only)".into())
            }),
        }
    }

    /// The id of a token string (a special token's, e.g. `<|im_end|>`), when the vocabulary
    /// has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        match self {
            Tokenizer::Bytes => None,
            Tokenizer::Hf(t) => t.token_to_id(token),
            Tokenizer::Spm(t, _) => t.table.id(token),
            Tokenizer::ByteLevel(t, _) => t.table.id(token),
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
            Tokenizer::Spm(t, _) => ids
                .iter()
                .map(|&i| t.table.token(i).map(str::to_string))
                .collect(),
            Tokenizer::ByteLevel(t, _) => ids
                .iter()
                .map(|&i| t.table.token(i).map(str::to_string))
                .collect(),
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
            Tokenizer::Spm(t, _) => Ok(t.decode(ids)),
            Tokenizer::ByteLevel(t, _) => Ok(t.decode(ids)),
        }
    }
}

/// Run `f`, a panic in it caught and returned as `Err` without the panic message (the
/// caller reports its own error). The hook is swapped process-wide for the call: for the
/// short library calls at load time that a damaged file can make panic.
fn quietly<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    out
}

/// A BPE tokenizer on its way from GGUF metadata or a `tokenizer.json`: a description
/// (`spec`) without its model's vocabulary and merges, which are held apart, owned, in the
/// form the library's builder takes.
struct BpeParts {
    spec: serde_json::Value,
    vocab: tokenizers::models::bpe::Vocab,
    merges: tokenizers::models::bpe::Merges,
}

impl BpeParts {
    /// The parts of a `tokenizer.json` description whose model is BPE with a vocabulary
    /// map and merges (as pairs or as "a b" text), moved out of `spec`; `None` (and `spec`
    /// untouched) for anything else, and for a description that truncates or pads, which
    /// the library's own reading sets up.
    fn take_from(spec: &mut serde_json::Value) -> Option<Self> {
        use serde_json::Value;
        let model = spec.get("model")?;
        let bpe = model.get("type").is_none_or(|t| t == "BPE");
        let plain = ["truncation", "padding"]
            .iter()
            .all(|k| spec.get(k).is_none_or(Value::is_null));
        let vocab = model.get("vocab")?.as_object()?;
        let merges = model.get("merges")?.as_array()?;
        fn pair(m: &Value) -> Option<(&str, &str)> {
            match m {
                Value::String(t) => t.split_once(' ').filter(|(_, b)| !b.contains(' ')),
                Value::Array(p) => match p.as_slice() {
                    [Value::String(a), Value::String(b)] => Some((a.as_str(), b.as_str())),
                    _ => None,
                },
                _ => None,
            }
        }
        if !bpe
            || !plain
            || !vocab
                .values()
                .all(|v| v.as_u64().is_some_and(|id| id <= u32::MAX as u64))
            || !merges.iter().all(|m| pair(m).is_some())
        {
            return None;
        }
        // checked: now moved out, leaving nulls in the description
        let mut spec = std::mem::take(spec);
        let (Value::Object(vocab), Value::Array(merges)) = (
            spec["model"]["vocab"].take(),
            spec["model"]["merges"].take(),
        ) else {
            unreachable!("checked above");
        };
        let vocab = vocab
            .into_iter()
            .map(|(t, id)| (t, id.as_u64().unwrap_or_default() as u32))
            .collect();
        let merges = merges
            .into_iter()
            .filter_map(|m| match m {
                Value::Array(p) => match <[Value; 2]>::try_from(p) {
                    Ok([Value::String(a), Value::String(b)]) => Some((a, b)),
                    _ => None,
                },
                m => pair(&m).map(|(a, b)| (a.to_string(), b.to_string())),
            })
            .collect();
        Some(Self {
            spec,
            vocab,
            merges,
        })
    }

    fn new<K: AsRef<str>>(
        spec: serde_json::Value,
        vocab: &HashMap<K, usize>,
        merges: &[[&str; 2]],
    ) -> Self {
        Self {
            spec,
            vocab: vocab
                .iter()
                .map(|(t, &id)| (t.as_ref().to_string(), id as u32))
                .collect(),
            merges: merges
                .iter()
                .map(|[a, b]| (a.to_string(), b.to_string()))
                .collect(),
        }
    }
}

/// The tokenizer of `parts`, built through the library's builders: its own reading of a
/// description takes the model through generic buffers, several copies of a large
/// vocabulary (~90 MB at the peak for a 49k-token one, which the allocator then keeps).
/// The model's options, the normalizer, pre-tokenizer, post-processor, decoder and added
/// tokens are read from the description as that reading takes them.
fn assembled(parts: BpeParts) -> std::result::Result<tokenizers::Tokenizer, String> {
    use serde::de::DeserializeOwned;
    use tokenizers::models::bpe::BPE;
    let BpeParts {
        spec,
        vocab,
        merges,
    } = parts;
    let m = &spec["model"];
    let text = |k: &str| m[k].as_str().map(str::to_string);
    let flag = |k: &str| m[k].as_bool();
    let mut b = BPE::builder().vocab_and_merges(vocab, merges);
    if let Some(d) = m["dropout"].as_f64() {
        b = b.dropout(d as f32);
    }
    if let Some(u) = text("unk_token") {
        b = b.unk_token(u);
    }
    if let Some(p) = text("continuing_subword_prefix") {
        b = b.continuing_subword_prefix(p);
    }
    if let Some(s) = text("end_of_word_suffix") {
        b = b.end_of_word_suffix(s);
    }
    if let Some(f) = flag("fuse_unk") {
        b = b.fuse_unk(f);
    }
    if let Some(f) = flag("byte_fallback") {
        b = b.byte_fallback(f);
    }
    if let Some(f) = flag("ignore_merges") {
        b = b.ignore_merges(f);
    }
    let mut t = tokenizers::Tokenizer::new(b.build().map_err(|e| e.to_string())?);
    fn part<T: DeserializeOwned>(
        spec: &serde_json::Value,
        key: &str,
    ) -> std::result::Result<Option<T>, String> {
        match &spec[key] {
            serde_json::Value::Null => Ok(None),
            v => T::deserialize(v)
                .map(Some)
                .map_err(|e| format!("{key}: {e}")),
        }
    }
    t.with_normalizer(part::<tokenizers::NormalizerWrapper>(&spec, "normalizer")?);
    t.with_pre_tokenizer(part::<tokenizers::PreTokenizerWrapper>(
        &spec,
        "pre_tokenizer",
    )?);
    t.with_post_processor(part::<tokenizers::PostProcessorWrapper>(
        &spec,
        "post_processor",
    )?);
    t.with_decoder(part::<tokenizers::DecoderWrapper>(&spec, "decoder")?);
    let added: Vec<tokenizers::AddedToken> = part(&spec, "added_tokens")?.unwrap_or_default();
    t.add_tokens(&added);
    Ok(t)
}

//! A GGUF file's tokenizer (`tokenizer.ggml.*`): built by routelm, or described as a
//! `tokenizer.json` for the tokenizers library, as transformers builds it from the same
//! file; and the metadata `routelm quantize` writes for a tokenizer.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value as Json;

use super::bytelevel::{self, byte_alphabet};
use super::{assembled, spm, BpeParts, Split, Tokenizer};
use crate::error::{Error, Result};

impl Tokenizer {
    /// The tokenizer a GGUF file's metadata describes (`tokenizer.ggml.*`), built as
    /// transformers builds it from the same file:
    /// - `gpt2`: byte-level BPE with the file's merges and its pre-tokenizer's split;
    /// - `llama` in a Gemma file: SentencePiece-style BPE with byte fallback, the merges
    ///   rebuilt from the vocabulary's order (Gemma files list none).
    ///
    /// Control tokens are special, user-defined ones are matched whole; BOS is added when
    /// `add_bos_token` says so (a SentencePiece vocabulary adds it unless told otherwise).
    pub fn from_gguf(path: &Path) -> Result<Self> {
        Self::from_gguf_as(path, Build::Own)
    }

    /// [`Tokenizer::from_gguf`], built as `build` says where there is a choice.
    pub fn from_gguf_as(path: &Path, build: Build) -> Result<Self> {
        let bad = |msg: String| Error::Tokenizer(format!("{}: {msg}", path.display()));
        let Some(keys) = GgufTokenizerKeys::read(path)? else {
            return Ok(Tokenizer::Bytes);
        };
        let GgufTokenizerKeys {
            model,
            arch,
            pre,
            add_bos,
            bos_id,
            named_ids,
            types,
            scores,
            tokens,
            merges,
        } = keys;
        let parts = GgufVocab {
            tokens: &tokens,
            types: &types,
            bos: bos_id
                .filter(|_| add_bos)
                .and_then(|b| tokens.get(b as usize).map(|t| (b, t.clone()))),
        };
        let bpe = match (model.as_str(), arch.as_str()) {
            ("gpt2", _) => {
                let split = Split::of_gguf(&pre).map_err(bad)?;
                if build == Build::Own {
                    let bos = parts.bos.as_ref().map(|(id, _)| *id as u32);
                    let added = parts.added_tokens(&[]);
                    let t = bytelevel::ByteBpe::new(&tokens, &merges, &added, split, bos)
                        .map_err(bad)?;
                    return Ok(Tokenizer::ByteLevel(Box::new(t), path.to_path_buf()));
                }
                parts.byte_level(&merges, split.pattern())
            }
            ("llama", "gemma" | "gemma2" | "gemma3") if build == Build::Own => {
                let t = parts.gemma_own().map_err(bad)?;
                return Ok(Tokenizer::Spm(Box::new(t), path.to_path_buf()));
            }
            ("llama", "gemma" | "gemma2" | "gemma3") => parts.gemma(),
            ("llama", arch) => {
                let scores = sentencepiece_scores(scores, tokens.len()).map_err(bad)?;
                let named: Vec<&str> = named_ids
                    .iter()
                    .filter_map(|&i| tokens.get(i as usize).map(String::as_str))
                    .collect();
                parts.sentencepiece(&scores, &named, arch == "phi3")
            }
            (model, arch) => {
                return Err(bad(format!(
                    "a '{model}' tokenizer in a '{arch}' file is not read yet (byte-level BPE \
                     and SentencePiece files are)"
                )))
            }
        };
        // only the description and the owned vocabulary and merges go on into the build
        drop((tokens, merges, types));
        let t = assembled(bpe).map_err(|e| bad(format!("building the tokenizer: {e}")))?;
        Ok(Tokenizer::Hf(Box::new(t)))
    }
}

/// A GGUF file's tokenizer keys, the large arrays moved out of its metadata.
struct GgufTokenizerKeys {
    /// `tokenizer.ggml.model`: `gpt2` (byte-level BPE) or `llama` (SentencePiece).
    model: String,
    arch: String,
    /// `tokenizer.ggml.pre`: the split before the merges of a byte-level BPE.
    pre: String,
    add_bos: bool,
    bos_id: Option<u64>,
    /// The unknown, BOS and EOS ids the file names.
    named_ids: Vec<u64>,
    /// llama.cpp's token types, one per token (1, normal, where the file gives none).
    types: Vec<u64>,
    scores: Option<crate::weights::gguf::Value>,
    tokens: Vec<String>,
    merges: Vec<String>,
}

impl GgufTokenizerKeys {
    /// The keys of the file at `path`; `None` for a file without a vocabulary (`none`, or
    /// no tokenizer keys at all: a model trained on bytes, as `quantize` writes one), which
    /// reads bytes as a folder without tokenizer.json does.
    fn read(path: &Path) -> Result<Option<Self>> {
        use crate::weights::gguf::{GgufFile, Value};
        let mut f = GgufFile::open(path)?;
        let bad = |msg: String| Error::Tokenizer(format!("{}: {msg}", path.display()));
        // the large arrays are moved out of the metadata, not copied: a 262k-token
        // vocabulary's values weigh tens of MB
        let strings = |f: &mut GgufFile, key: &str| -> Result<Vec<String>> {
            match f.metadata.remove(key) {
                Some(Value::Array(v)) => v
                    .into_iter()
                    .map(|x| match x {
                        Value::String(s) => Some(s),
                        _ => None,
                    })
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| bad(format!("{key} holds a non-string"))),
                _ => Err(bad(format!("no {key} array"))),
            }
        };
        let text = |f: &GgufFile, key: &str| f.get(key).and_then(Value::as_str).map(str::to_string);
        let model = text(&f, "tokenizer.ggml.model");
        let no_vocab = matches!(model.as_deref(), Some("none" | "no_vocab"))
            || (model.is_none() && f.get("tokenizer.ggml.tokens").is_none());
        if no_vocab {
            return Ok(None);
        }
        let model = model.unwrap_or_else(|| "none".into());
        let add_bos = match f.get("tokenizer.ggml.add_bos_token") {
            Some(Value::Bool(b)) => *b,
            _ => model == "llama",
        };
        let id = |f: &GgufFile, key: &str| f.get(key).and_then(Value::as_u64);
        let named_ids: Vec<u64> = ["unknown", "bos", "eos"]
            .iter()
            .filter_map(|k| id(&f, &format!("tokenizer.ggml.{k}_token_id")))
            .collect();
        let types: Vec<u64> = match f.metadata.remove("tokenizer.ggml.token_type") {
            Some(Value::Array(v)) => v.iter().map(|x| x.as_u64().unwrap_or(1)).collect(),
            _ => Vec::new(),
        };
        let tokens = strings(&mut f, "tokenizer.ggml.tokens")?;
        let merges = match model.as_str() {
            "gpt2" => strings(&mut f, "tokenizer.ggml.merges")?,
            _ => Vec::new(),
        };
        Ok(Some(Self {
            arch: text(&f, "general.architecture").unwrap_or_else(|| "none".into()),
            pre: text(&f, "tokenizer.ggml.pre").unwrap_or_else(|| "default".into()),
            bos_id: id(&f, "tokenizer.ggml.bos_token_id"),
            scores: f.metadata.remove("tokenizer.ggml.scores"),
            types: match types.is_empty() {
                true => vec![1; tokens.len()],
                false => types,
            },
            model,
            add_bos,
            named_ids,
            tokens,
            merges,
        }))
    }
}

/// A SentencePiece vocabulary's scores, one per token of `n`.
fn sentencepiece_scores(
    scores: Option<crate::weights::gguf::Value>,
    n: usize,
) -> std::result::Result<Vec<f32>, String> {
    use crate::weights::gguf::Value;
    let scores: Vec<f32> = match scores {
        Some(Value::Array(v)) => v
            .iter()
            .map(|x| x.as_f64().map(|v| v as f32))
            .collect::<Option<Vec<_>>>()
            .ok_or("tokenizer.ggml.scores holds a non-number")?,
        _ => return Err("no tokenizer.ggml.scores array".into()),
    };
    if scores.len() != n {
        return Err(format!("{} scores for {n} tokens", scores.len()));
    }
    Ok(scores)
}

/// How a GGUF file's tokenizer is built where there is a choice: by routelm (Gemma's by
/// `spm`, byte-level BPE by `bytelevel`; a few MB), or by the tokenizers library
/// (~100 MB for Gemma 3, ~10 MB for SmolLM2; to write a `tokenizer.json`, and to check the
/// first against).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Build {
    Own,
    Library,
}

/// The tokens a Gemma vocabulary's tokenizer treats as special besides its control tokens.
const GEMMA_NAMED: [&str; 5] = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"];

/// A GGUF vocabulary on its way to a `tokenizer.json` description.
struct GgufVocab<'a> {
    tokens: &'a [String],
    /// llama.cpp's token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte.
    types: &'a [u64],
    /// The BOS token to add in front, when the file asks for it.
    bos: Option<(u64, String)>,
}

impl GgufVocab<'_> {
    /// The added tokens: `special` ones (control tokens and `named`), and user-defined
    /// ones matched whole but not special; each only when `keep(token, special)` accepts
    /// it (a user-defined token is kept only as the vocabulary spells it).
    fn added(&self, named: &[&str], keep: impl Fn(&str, bool) -> bool) -> Vec<serde_json::Value> {
        (self.added_tokens(named).into_iter())
            .filter(|&(t, _, special)| keep(t, special))
            .map(|(t, id, special)| {
                serde_json::json!({"id": id, "content": t, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": special})
            })
            .collect()
    }

    /// The tokens that may be added (text, id, special): control tokens and `named` ones
    /// (special), user-defined ones (not special).
    fn added_tokens(&self, named: &[&str]) -> Vec<(&str, u32, bool)> {
        (self.tokens.iter().enumerate())
            .filter_map(|(id, t)| {
                let kind = self.types.get(id).copied().unwrap_or(1);
                let special = kind == 3 || named.contains(&t.as_str());
                (special || kind == 4).then_some((t.as_str(), id as u32, special))
            })
            .collect()
    }

    fn post_processor(&self) -> serde_json::Value {
        match &self.bos {
            Some((id, t)) => serde_json::json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": t, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": t, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": t, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {t.clone(): {"id": t, "ids": [id], "tokens": [t]}}}),
            None => serde_json::Value::Null,
        }
    }

    /// Byte-level BPE: tokens spelled in GPT-2's byte alphabet (any other spelling is
    /// respelled from its UTF-8 bytes), the file's merges, GPT-2's split or `split`.
    fn byte_level(&self, merges: &[String], split: Option<&str>) -> BpeParts {
        use serde_json::json;
        let alphabet = byte_alphabet();
        let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
        let mut vocab: HashMap<String, usize> = HashMap::new();
        for (id, t) in self.tokens.iter().enumerate() {
            let spelled = if in_alphabet(t) {
                t.clone()
            } else {
                t.bytes().map(|b| alphabet[b as usize]).collect()
            };
            vocab.insert(spelled, id);
        }
        // a control token outside the byte alphabet is a mislabel and left alone
        let added = self.added(&[], |t, special| match special {
            true => in_alphabet(t),
            false => vocab.contains_key(t),
        });
        let merges: Vec<[&str; 2]> = merges
            .iter()
            .map(|m| {
                let (a, b) = m.split_once(' ').unwrap_or((m, ""));
                [a, b]
            })
            .collect();
        let byte_level = |regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": regex});
        let pre_tokenizer = match split {
            None => byte_level(true),
            Some(r) => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false},
                byte_level(false)]}),
        };
        let spec = json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": added, "normalizer": null, "pre_tokenizer": pre_tokenizer,
            "post_processor": self.post_processor(),
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": false,
                "byte_fallback": false, "ignore_merges": false},
        });
        BpeParts::new(spec, &vocab, &merges)
    }

    /// Gemma's tokens as the model spells them: a token of plain whitespace with a space
    /// in it is looked up as that many `▁`.
    fn gemma_spelled(&self) -> Vec<String> {
        self.tokens
            .iter()
            .map(|t| {
                if t.contains(' ') && t.trim().is_empty() {
                    "\u{2581}".repeat(t.chars().count())
                } else {
                    t.clone()
                }
            })
            .collect()
    }

    /// [`GgufVocab::gemma`] as [`spm::SpmBpe`] builds it.
    fn gemma_own(&self) -> std::result::Result<spm::SpmBpe, String> {
        let bos = self.bos.as_ref().map(|(id, _)| *id as u32);
        spm::SpmBpe::new(
            &self.gemma_spelled(),
            &self.added_tokens(&GEMMA_NAMED),
            Some("<unk>"),
            bos,
        )
    }

    /// Gemma's SentencePiece-style BPE: spaces written `▁`, byte fallback, `<unk>`; a token
    /// of plain whitespace with a space in it is looked up as that many `▁`; the merges
    /// are every split of a token into two tokens, best (earliest) token first.
    fn gemma(&self) -> BpeParts {
        use serde_json::json;
        let spelled = self.gemma_spelled();
        // the earliest token first: its rank is its score
        let (vocab, merges) = rebuilt_merges(&spelled, |id| -(id as f64));
        let spec = json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": self.added(&GEMMA_NAMED, |t, special| special || vocab.contains_key(t)),
            "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"},
            "pre_tokenizer": {"type": "Split", "pattern": {"String": " "},
                "behavior": "MergedWithPrevious", "invert": false},
            "post_processor": self.post_processor(),
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]},
            "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
                "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
                "byte_fallback": true, "ignore_merges": false},
        });
        BpeParts::new(spec, &vocab, &merges)
    }

    /// SentencePiece-style BPE as transformers' `LlamaTokenizer` builds it from a GGUF
    /// file: merges rebuilt from the vocabulary, best score first; a `▁` in front of the
    /// text and for each space (by `Metaspace`, or for Phi-3 by a normalizer, which also
    /// marks a leading space); byte fallback; the unknown, BOS and EOS tokens special.
    fn sentencepiece(&self, scores: &[f32], named: &[&str], phi3: bool) -> BpeParts {
        use serde_json::json;
        let (vocab, merges) = rebuilt_merges(self.tokens, |id| scores[id] as f64);
        let (normalizer, pre_tokenizer) = if phi3 {
            (
                json!({"type": "Sequence", "normalizers": [
                    {"type": "Prepend", "prepend": "\u{2581}"},
                    {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}]}),
                serde_json::Value::Null,
            )
        } else {
            (
                serde_json::Value::Null,
                json!({"type": "Metaspace", "replacement": "\u{2581}",
                    "prepend_scheme": "first", "split": false}),
            )
        };
        let spec = json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": self.added(named, |t, special| special || vocab.contains_key(t)),
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": self.post_processor(),
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
                "byte_fallback": true, "ignore_merges": false},
        });
        BpeParts::new(spec, &vocab, &merges)
    }
}

/// The vocabulary (token → id, the last id of a repeated token) and the merges a
/// SentencePiece vocabulary implies, as transformers rebuilds them: every split of each
/// token into two tokens, the pieces' ids ordering a token's splits; then all of them by
/// the merged token's score, best first, and longer left and right pieces first (a
/// stable sort).
pub(super) fn rebuilt_merges(
    tokens: &[String],
    score: impl Fn(usize) -> f64,
) -> (HashMap<&str, usize>, Vec<[&str; 2]>) {
    let mut vocab: HashMap<&str, usize> = HashMap::new();
    let mut order: Vec<&str> = Vec::new();
    for (id, t) in tokens.iter().enumerate() {
        if vocab.insert(t, id).is_none() {
            order.push(t);
        }
    }
    // (the merged token's score, the pieces' lengths in characters, the pieces)
    let mut merges: Vec<(f64, usize, usize, &str, &str)> = Vec::new();
    for &t in &order {
        // the score of the token's last occurrence, in its first occurrence's place
        let s = score(vocab[t]);
        let mut local: Vec<_> = t
            .char_indices()
            .skip(1)
            .map(|(at, _)| t.split_at(at))
            .filter(|(l, r)| vocab.contains_key(l) && vocab.contains_key(r))
            .map(|(l, r)| (s, l.chars().count(), r.chars().count(), l, r))
            .collect();
        local.sort_by_key(|&(.., l, r)| (vocab[l], vocab[r]));
        merges.extend(local);
    }
    // best score first, then longer left and right pieces (a stable sort)
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.cmp(&a.1)).then(b.2.cmp(&a.2)));
    let merges = merges.iter().map(|&(.., l, r)| [l, r]).collect();
    (vocab, merges)
}

/// The `tokenizer.ggml.*` metadata of a byte-level BPE `tokenizer.json` (the GPT-2 style
/// that GGUF calls `gpt2`): tokens by id, their types (control for special added tokens,
/// user-defined for other added ones), the merges and the pre-tokenizer's GGUF name (the
/// split [`Tokenizer::from_gguf`] reads back). Other tokenizers are refused by name. The
/// token list is padded to the model's `vocab` rows with unused `[PADi]` tokens, as
/// llama.cpp's converter pads it (llama.cpp sizes the embedding by the token count).
pub fn gguf_metadata(
    path: &Path,
    vocab_rows: usize,
    bos: Option<u32>,
    eos: Option<u32>,
) -> Result<Vec<(String, crate::weights::gguf::Value)>> {
    use crate::weights::gguf::Value;
    let bad = |msg: &str| Error::Tokenizer(format!("{}: {msg}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let spec: Json = serde_json::from_str(&text).map_err(|e| Error::parse(path, e))?;
    let name = gguf_pre_name(&spec).ok_or_else(|| {
        bad(
            "its pre-tokenizer has no GGUF name routelm knows (byte-level BPE with \
             GPT-2's, Llama 3's or Qwen2's split is written)",
        )
    })?;
    if spec["model"]["type"] != "BPE" || !byte_level(&spec["decoder"]) {
        return Err(bad(
            "only byte-level BPE tokenizers are written to GGUF so far (SentencePiece-style ones \
             are not)",
        ));
    }
    let (tokens, types) = gguf_tokens(&spec, vocab_rows).map_err(|e| bad(&e))?;
    let merges: Vec<Value> = spec["model"]["merges"]
        .as_array()
        .ok_or_else(|| bad("model.merges is not an array"))?
        .iter()
        .map(|m| match m {
            Json::String(s) => Some(s.clone()),
            Json::Array(p) => Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?)),
            _ => None,
        })
        .map(|m| {
            m.map(Value::String)
                .ok_or_else(|| bad("a merge is not a pair"))
        })
        .collect::<Result<_>>()?;
    let mut out = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        ("tokenizer.ggml.pre".to_string(), Value::String(name.into())),
        (
            "tokenizer.ggml.tokens".to_string(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type".to_string(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".to_string(), Value::Array(merges)),
        (
            "tokenizer.ggml.add_bos_token".to_string(),
            Value::Bool(false),
        ),
    ];
    for (key, id) in [("bos", bos), ("eos", eos)] {
        if let Some(id) = id.filter(|&i| (i as usize) < vocab_rows) {
            out.push((format!("tokenizer.ggml.{key}_token_id"), Value::U32(id)));
        }
    }
    Ok(out)
}

fn byte_level(p: &Json) -> bool {
    p["type"] == "ByteLevel"
}

/// The GGUF name of a `tokenizer.json`'s pre-tokenizer: `gpt-2` for plain byte-level, or
/// the name whose split pattern it uses (`llama-bpe`, `qwen2`); `None` for any other.
fn gguf_pre_name(spec: &Json) -> Option<&'static str> {
    let pre = &spec["pre_tokenizer"];
    if byte_level(pre) && pre["use_regex"] != false {
        return Some("gpt-2");
    }
    let parts = pre["pretokenizers"].as_array().cloned().unwrap_or_default();
    let split = match parts.as_slice() {
        [s, b] if s["type"] == "Split" && byte_level(b) && b["use_regex"] == false => s["pattern"]
            ["Regex"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    };
    ["llama-bpe", "qwen2"]
        .into_iter()
        .find(|n| Split::of_gguf(n).ok().and_then(Split::pattern) == Some(split.as_str()))
}

/// The tokens by id and their GGUF types (1 normal, 3 control for special added tokens, 4
/// user-defined for other added ones, 5 unused), padded with `[PADi]` to `vocab_rows`.
/// An id at or past `vocab_rows` is refused before anything is sized by it.
fn gguf_tokens(
    spec: &Json,
    vocab_rows: usize,
) -> std::result::Result<(Vec<String>, Vec<i32>), String> {
    let vocab = spec["model"]["vocab"]
        .as_object()
        .ok_or("model.vocab is not an object")?;
    let added = spec["added_tokens"].as_array().cloned().unwrap_or_default();
    let mut ids = Vec::with_capacity(vocab.len() + added.len());
    for (t, id) in vocab {
        let id = id.as_u64().ok_or("a vocabulary id is not a number")?;
        ids.push((id, t.as_str(), 1));
    }
    for a in &added {
        let (Some(id), Some(t)) = (a["id"].as_u64(), a["content"].as_str()) else {
            return Err("an added token without id or content".into());
        };
        ids.push((id, t, if a["special"] == true { 3 } else { 4 }));
    }
    let n = ids
        .iter()
        .map(|&(id, ..)| id.saturating_add(1))
        .max()
        .unwrap_or(0);
    if n > vocab_rows as u64 {
        return Err(format!(
            "{n} tokens, more than the model's {vocab_rows} embedding rows"
        ));
    }
    let mut tokens: Vec<String> = (0..vocab_rows).map(|id| format!("[PAD{id}]")).collect();
    let mut types = vec![5i32; vocab_rows];
    for (id, t, ty) in ids {
        tokens[id as usize] = t.to_string();
        types[id as usize] = ty;
    }
    Ok((tokens, types))
}

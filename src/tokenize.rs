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
            return Err(Error::Tokenizer(format!(
                "{}: reading the tokenizer from GGUF metadata is not built yet; give token \
                 ids (generate --prompt-ids … --ids) or use a folder with tokenizer.json",
                dir.display()
            )));
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

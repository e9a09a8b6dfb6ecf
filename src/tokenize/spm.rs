//! Gemma's SentencePiece-style BPE, read from a GGUF vocabulary into a few MB.
//!
//! The tokenizers library's BPE holds a vocabulary and its merges in hash maps of owned
//! strings; for Gemma 3's 262k tokens and the ~515k merges they imply that is ~100 MB
//! resident for the whole run. Here the tokens are one string with offsets and an
//! open-addressed index of ids (~7 MB), and a merge's rank is computed when it is needed:
//! the merges Gemma's file implies are every split of a token into two tokens, ranked by
//! the merged token's id (earliest first), then the longer left piece first (what
//! transformers rebuilds, and what the library's version of this tokenizer is given). So
//! the ids are the library's: the same added-token split, normalizer (a space is `▁`),
//! byte fallback, merge order (a min-heap on rank, then position, with the same check for
//! stale entries) and decoder.

use super::bpe::{self, AddedTokens, Symbol, Table, Vocab};

pub struct SpmBpe {
    pub(super) table: Table,
    /// `<0xXX>` by byte, where the vocabulary has it.
    bytes: [Option<u32>; 256],
    unk: Option<u32>,
}

impl SpmBpe {
    /// The tokenizer of `tokens` (as the model spells them: a whitespace token's spaces as
    /// `▁`), with `added`: the tokens split on first (text, GGUF id, special; one not
    /// special only where the vocabulary has its text), `unk`, and `bos` (an id) to put
    /// in front.
    pub fn new(
        tokens: &[impl AsRef<str>],
        added: &[(&str, u32, bool)],
        unk: Option<&str>,
        bos: Option<u32>,
    ) -> Result<Self, String> {
        let vocab = Vocab::new(tokens);
        let mut bytes = [None; 256];
        for (b, slot) in bytes.iter_mut().enumerate() {
            *slot = vocab.id(&format!("<0x{b:02X}>"));
        }
        let unk = unk.and_then(|u| vocab.id(u));
        let added = AddedTokens::new(added, &vocab)?;
        Ok(Self {
            table: Table::new(vocab, added, bos),
            bytes,
            unk,
        })
    }

    /// Ids of `text`, the BOS in front when `special` asks for it.
    pub fn encode(&self, text: &str, special: bool) -> Vec<u32> {
        self.table
            .encode(text, special, |piece, ids| self.encode_piece(piece, ids))
    }

    /// A piece between added tokens: spaces written `▁`, then merged as one word.
    fn encode_piece(&self, piece: &str, ids: &mut Vec<u32>) {
        if piece.is_empty() {
            return;
        }
        let word = piece.replace(' ', "\u{2581}");
        let mut symbols: Vec<Symbol> = Vec::with_capacity(word.len());
        // an unknown character's bytes as `<0xXX>` tokens, or (lacking one) the unknown
        // token, a run of them fused into one
        let mut unk_run: Option<usize> = None;
        for (i, c) in word.char_indices() {
            let s = &word[i..i + c.len_utf8()];
            if let Some(id) = self.table.vocab.id(s) {
                if let Some(len) = unk_run.take() {
                    bpe::push(&mut symbols, self.unk.unwrap_or(0), len);
                }
                bpe::push(&mut symbols, id, s.len());
                continue;
            }
            let fallback: Option<Vec<u32>> = s.bytes().map(|b| self.bytes[b as usize]).collect();
            if let Some(fallback) = fallback {
                if let Some(len) = unk_run.take() {
                    bpe::push(&mut symbols, self.unk.unwrap_or(0), len);
                }
                for id in fallback {
                    bpe::push(&mut symbols, id, 1);
                }
            } else if self.unk.is_some() {
                unk_run = Some(unk_run.unwrap_or(0) + s.len());
            }
        }
        if let Some(len) = unk_run {
            bpe::push(&mut symbols, self.unk.unwrap_or(0), len);
        }
        let mut buf = String::new();
        bpe::merge_all(&mut symbols, |a, b| self.merge_of(a, b, &mut buf), ids);
    }

    /// The merge of tokens `a` then `b`: its rank and the merged token, when the
    /// vocabulary has it.
    fn merge_of(&self, a: u32, b: u32, buf: &mut String) -> Option<(u64, u32)> {
        let vocab = &self.table.vocab;
        let (l, r) = (vocab.token(a), vocab.token(b));
        buf.clear();
        buf.push_str(l);
        buf.push_str(r);
        let new_id = vocab.id(buf)?;
        // the merged token's id first, then the longer left piece
        let left = l.chars().count() as u64;
        Some((((new_id as u64) << 32) | (u32::MAX as u64 - left), new_id))
    }

    /// Text of `ids`, special tokens skipped: `▁` read as a space, runs of `<0xXX>`
    /// tokens as their UTF-8 bytes (each byte of an invalid run as U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut out = String::new();
        let mut run: Vec<u8> = Vec::new();
        let flush = |run: &mut Vec<u8>, out: &mut String| {
            if run.is_empty() {
                return;
            }
            match std::str::from_utf8(run) {
                Ok(s) => out.push_str(s),
                Err(_) => out.extend(std::iter::repeat_n('\u{FFFD}', run.len())),
            }
            run.clear();
        };
        for t in self.table.shown(ids) {
            let t = t.replace('\u{2581}', " ");
            let byte = (t.len() == 6 && t.starts_with("<0x") && t.ends_with('>'))
                .then(|| u8::from_str_radix(&t[3..5], 16).ok())
                .flatten();
            match byte {
                Some(b) => run.push(b),
                None => {
                    flush(&mut run, &mut out);
                    out.push_str(&t);
                }
            }
        }
        flush(&mut run, &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::Model;

    /// Random small vocabularies (repeated tokens included) and random words, some with a
    /// character outside the vocabulary: the ids equal the tokenizers library's BPE given
    /// the merges transformers rebuilds for the same vocabulary (Gemma's ranking).
    #[test]
    fn merges_equal_the_library_bpe_on_random_vocabularies() {
        let mut rng = crate::rng::Rng::new(7);
        let letters = ['a', 'b', 'c', '\u{2581}'];
        let mut compared = 0;
        for _ in 0..60 {
            let mut tokens: Vec<String> = (0..256).map(|b| format!("<0x{b:02X}>")).collect();
            tokens.extend(letters.iter().map(|c| c.to_string()));
            for _ in 0..40 {
                let len = 2 + rng.below(4);
                tokens.push((0..len).map(|_| letters[rng.below(4)]).collect());
            }
            let (vocab, merges) = super::super::gguf::rebuilt_merges(&tokens, |id| -(id as f64));
            let lib = tokenizers::models::bpe::BPE::builder()
                .vocab_and_merges(
                    (vocab.iter())
                        .map(|(t, &id)| (t.to_string(), id as u32))
                        .collect::<tokenizers::models::bpe::Vocab>(),
                    merges
                        .iter()
                        .map(|[a, b]| (a.to_string(), b.to_string()))
                        .collect(),
                )
                .byte_fallback(true)
                .build()
                .unwrap();
            let own = SpmBpe::new(&tokens, &[], None, None).unwrap();
            for _ in 0..40 {
                let word: String = (0..1 + rng.below(14))
                    .map(|_| ['a', 'b', 'c', 'a', 'b', '\u{2581}', 'd'][rng.below(7)])
                    .collect();
                let want: Vec<u32> = lib.tokenize(&word).unwrap().iter().map(|t| t.id).collect();
                assert_eq!(
                    own.encode(&word, false),
                    want,
                    "{word:?} over {:?}",
                    &tokens[256..]
                );
                compared += 1;
            }
        }
        assert_eq!(compared, 2400);
    }
}

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

use std::collections::BinaryHeap;

/// A vocabulary's tokens by id, each found by its text.
struct Vocab {
    /// The tokens one after another; token `i` is `text[starts[i]..starts[i + 1]]`.
    text: String,
    starts: Vec<u32>,
    /// Ids by their text's hash (open addressing, `EMPTY` where free); a repeated token
    /// is found as its last id.
    slots: Vec<u32>,
}

const EMPTY: u32 = u32::MAX;

fn hash(s: &str) -> u64 {
    // FNV-1a
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Vocab {
    fn new(tokens: &[impl AsRef<str>]) -> Self {
        let mut text = String::with_capacity(tokens.iter().map(|t| t.as_ref().len()).sum());
        let mut starts = Vec::with_capacity(tokens.len() + 1);
        for t in tokens {
            starts.push(text.len() as u32);
            text.push_str(t.as_ref());
        }
        starts.push(text.len() as u32);
        let mut v = Self {
            text,
            starts,
            slots: vec![EMPTY; (2 * tokens.len()).next_power_of_two().max(2)],
        };
        for id in 0..tokens.len() as u32 {
            let at = v.slot(v.token(id));
            v.slots[at] = id;
        }
        v
    }

    fn len(&self) -> usize {
        self.starts.len() - 1
    }

    fn token(&self, id: u32) -> &str {
        let (a, b) = (self.starts[id as usize], self.starts[id as usize + 1]);
        &self.text[a as usize..b as usize]
    }

    /// The slot holding `s`'s id, or the free slot where it would go.
    fn slot(&self, s: &str) -> usize {
        let mask = self.slots.len() - 1;
        let mut at = hash(s) as usize & mask;
        loop {
            let id = self.slots[at];
            if id == EMPTY || self.token(id) == s {
                return at;
            }
            at = (at + 1) & mask;
        }
    }

    fn id(&self, s: &str) -> Option<u32> {
        Some(self.slots[self.slot(s)]).filter(|&id| id != EMPTY)
    }
}

/// A token the text is split on before anything else: its text, its id, and whether
/// decoding skips it.
struct Added {
    text: String,
    id: u32,
    special: bool,
}

pub struct SpmBpe {
    vocab: Vocab,
    /// The added tokens' texts, matched leftmost-longest in the raw text, and what each is.
    matcher: aho_corasick::AhoCorasick,
    added: Vec<Added>,
    /// (id, index in `added`), by id.
    added_ids: Vec<(u32, usize)>,
    /// Distinct token texts, the vocabulary's and the added ones.
    size: usize,
    /// `<0xXX>` by byte, where the vocabulary has it.
    bytes: [Option<u32>; 256],
    unk: Option<u32>,
    /// Put in front of a text when special tokens are asked for.
    bos: Option<u32>,
}

/// One symbol of a word being merged: a token, linked to its neighbours; `len == 0` once
/// merged into its left neighbour.
#[derive(Clone, Copy)]
struct Symbol {
    id: u32,
    len: u32,
    prev: isize,
    next: isize,
}

/// A pair waiting in the heap: the lowest rank first, then the leftmost.
#[derive(PartialEq, Eq)]
struct Merge {
    rank: u64,
    pos: usize,
    new_id: u32,
}

impl Ord for Merge {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other
            .rank
            .cmp(&self.rank)
            .then_with(|| other.pos.cmp(&self.pos))
    }
}

impl PartialOrd for Merge {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
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
        let added: Vec<(&str, u32, bool)> = (added.iter().copied())
            .filter(|&(t, _, special)| special || vocab.id(t).is_some())
            .collect();
        // an added token takes the id the vocabulary gives its text (the last of a repeat)
        let added_list: Vec<Added> = added
            .iter()
            .map(|&(t, id, special)| Added {
                text: t.to_string(),
                id: vocab.id(t).unwrap_or(id),
                special,
            })
            .collect();
        let mut added_ids: Vec<(u32, usize)> = added_list
            .iter()
            .enumerate()
            .map(|(i, a)| (a.id, i))
            .collect();
        added_ids.sort_unstable();
        let distinct = vocab.slots.iter().filter(|&&s| s != EMPTY).count();
        let apart = added.iter().filter(|a| vocab.id(a.0).is_none()).count();
        let matcher = aho_corasick::AhoCorasick::builder()
            .match_kind(aho_corasick::MatchKind::LeftmostLongest)
            .build(added.iter().map(|a| a.0))
            .map_err(|e| format!("added tokens: {e}"))?;
        Ok(Self {
            vocab,
            matcher,
            added: added_list,
            added_ids,
            size: distinct + apart,
            bytes,
            unk,
            bos,
        })
    }

    /// Ids of `text`, the BOS in front when `special` asks for it.
    pub fn encode(&self, text: &str, special: bool) -> Vec<u32> {
        let mut ids = Vec::new();
        if special {
            ids.extend(self.bos);
        }
        let mut at = 0;
        for m in self.matcher.find_iter(text) {
            self.encode_piece(&text[at..m.start()], &mut ids);
            ids.push(self.added[m.pattern().as_usize()].id);
            at = m.end();
        }
        self.encode_piece(&text[at..], &mut ids);
        ids
    }

    /// A piece between added tokens: spaces written `▁`, then merged as one word.
    fn encode_piece(&self, piece: &str, ids: &mut Vec<u32>) {
        if piece.is_empty() {
            return;
        }
        let word = piece.replace(' ', "\u{2581}");
        let mut symbols: Vec<Symbol> = Vec::with_capacity(word.len());
        let push = |symbols: &mut Vec<Symbol>, id: u32, len: usize| {
            let n = symbols.len() as isize;
            symbols.push(Symbol {
                id,
                len: len as u32,
                prev: n - 1,
                next: n + 1,
            });
        };
        // an unknown character's bytes as `<0xXX>` tokens, or (lacking one) the unknown
        // token, a run of them fused into one
        let mut unk_run: Option<usize> = None;
        for (i, c) in word.char_indices() {
            let s = &word[i..i + c.len_utf8()];
            if let Some(id) = self.vocab.id(s) {
                if let Some(len) = unk_run.take() {
                    push(&mut symbols, self.unk.unwrap_or(0), len);
                }
                push(&mut symbols, id, s.len());
                continue;
            }
            let fallback: Option<Vec<u32>> = s.bytes().map(|b| self.bytes[b as usize]).collect();
            if let Some(fallback) = fallback {
                if let Some(len) = unk_run.take() {
                    push(&mut symbols, self.unk.unwrap_or(0), len);
                }
                for id in fallback {
                    push(&mut symbols, id, 1);
                }
            } else if self.unk.is_some() {
                unk_run = Some(unk_run.unwrap_or(0) + s.len());
            }
        }
        if let Some(len) = unk_run {
            push(&mut symbols, self.unk.unwrap_or(0), len);
        }
        if let Some(last) = symbols.last_mut() {
            last.next = -1;
        }
        self.merge_all(&mut symbols);
        ids.extend(symbols.iter().filter(|s| s.len > 0).map(|s| s.id));
    }

    /// The merge of tokens `a` then `b`: its rank and the merged token, when the
    /// vocabulary has it.
    fn merge_of(&self, a: u32, b: u32, buf: &mut String) -> Option<(u64, u32)> {
        let (l, r) = (self.vocab.token(a), self.vocab.token(b));
        buf.clear();
        buf.push_str(l);
        buf.push_str(r);
        let new_id = self.vocab.id(buf)?;
        // the merged token's id first, then the longer left piece
        let left = l.chars().count() as u64;
        Some((((new_id as u64) << 32) | (u32::MAX as u64 - left), new_id))
    }

    fn merge_all(&self, symbols: &mut [Symbol]) {
        let mut buf = String::new();
        let mut queue: BinaryHeap<Merge> = symbols
            .windows(2)
            .enumerate()
            .filter_map(|(pos, w)| {
                let (rank, new_id) = self.merge_of(w[0].id, w[1].id, &mut buf)?;
                Some(Merge { rank, pos, new_id })
            })
            .collect();
        while let Some(top) = queue.pop() {
            let cur = symbols[top.pos];
            if cur.len == 0 || cur.next == -1 {
                continue;
            }
            let next_pos = cur.next as usize;
            let right = symbols[next_pos];
            // an entry whose pair has changed since is stale
            match self.merge_of(cur.id, right.id, &mut buf) {
                Some((_, id)) if id == top.new_id => {}
                _ => continue,
            }
            symbols[top.pos].id = top.new_id;
            symbols[top.pos].len += right.len;
            symbols[top.pos].next = right.next;
            symbols[next_pos].len = 0;
            if right.next > -1 && (right.next as usize) < symbols.len() {
                symbols[right.next as usize].prev = top.pos as isize;
            }
            let cur = symbols[top.pos];
            if cur.prev >= 0 {
                let prev = cur.prev as usize;
                if let Some((rank, new_id)) = self.merge_of(symbols[prev].id, cur.id, &mut buf) {
                    queue.push(Merge {
                        rank,
                        pos: prev,
                        new_id,
                    });
                }
            }
            if cur.next > -1 && (cur.next as usize) < symbols.len() {
                let next = cur.next as usize;
                if let Some((rank, new_id)) = self.merge_of(cur.id, symbols[next].id, &mut buf) {
                    queue.push(Merge {
                        rank,
                        pos: top.pos,
                        new_id,
                    });
                }
            }
        }
    }

    fn added_of(&self, id: u32) -> Option<&Added> {
        let i = self
            .added_ids
            .binary_search_by_key(&id, |&(id, _)| id)
            .ok()?;
        Some(&self.added[self.added_ids[i].1])
    }

    /// The text of `id`: an added token's, else the vocabulary's where `id` is the id its
    /// text is found as (a repeated token's earlier ids have none).
    pub fn token(&self, id: u32) -> Option<&str> {
        if let Some(a) = self.added_of(id) {
            return Some(&a.text);
        }
        if id as usize >= self.vocab.len() {
            return None;
        }
        let t = self.vocab.token(id);
        (self.vocab.id(t) == Some(id)).then_some(t)
    }

    /// The id of a token's text: an added token's, else the vocabulary's.
    pub fn id(&self, token: &str) -> Option<u32> {
        match self.added.iter().find(|a| a.text == token) {
            Some(a) => Some(a.id),
            None => self.vocab.id(token),
        }
    }

    /// Distinct token texts, the vocabulary's and the added ones.
    pub fn vocab_size(&self) -> usize {
        self.size
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
        for &id in ids {
            if self.added_of(id).is_some_and(|a| a.special) {
                continue;
            }
            let Some(t) = self.token(id) else { continue };
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
            let (vocab, merges) = super::super::rebuilt_merges(&tokens, |id| -(id as f64));
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

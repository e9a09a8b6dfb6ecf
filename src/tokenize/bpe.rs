//! What routelm's own BPE tokenizers share ([`super::spm`], [`super::bytelevel`]): a
//! vocabulary held as one string with offsets and an open-addressed index, the added
//! tokens split off first, and the merge loop.
//!
//! They do what the tokenizers library does with the same vocabulary, in a fraction of
//! its memory: the added tokens matched leftmost-longest in the raw text, a repeated
//! token found as its last id, and the merges applied by a min-heap on (rank, position)
//! with the library's check for stale entries.

use std::collections::BinaryHeap;

/// A vocabulary's tokens by id, each found by its text.
pub(super) struct Vocab {
    /// The tokens one after another; token `i` is `text[starts[i]..starts[i + 1]]`.
    text: String,
    starts: Vec<u32>,
    /// Ids by their text's hash (open addressing, `EMPTY` where free); a repeated token
    /// is found as its last id.
    slots: Vec<u32>,
}

const EMPTY: u32 = u32::MAX;

/// Slots of an open-addressed table for `n` entries: a power of two at most three quarters
/// full, with a free slot always left (a missing key's probe ends there). Half full
/// doubled SmolLM2's 49k merges and vocabulary to 2.5 MiB, most of a small model's heap.
pub(super) fn table_slots(n: usize) -> usize {
    (n + n / 3).max(n + 1).next_power_of_two().max(2)
}

fn hash(s: &str) -> u64 {
    // FNV-1a
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Vocab {
    pub(super) fn new(tokens: &[impl AsRef<str>]) -> Self {
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
            slots: vec![EMPTY; table_slots(tokens.len())],
        };
        for id in 0..tokens.len() as u32 {
            let at = v.slot(v.token(id));
            v.slots[at] = id;
        }
        v
    }

    pub(super) fn len(&self) -> usize {
        self.starts.len() - 1
    }

    /// Token `id`'s text (`id` below [`Vocab::len`]).
    pub(super) fn token(&self, id: u32) -> &str {
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

    pub(super) fn id(&self, s: &str) -> Option<u32> {
        Some(self.slots[self.slot(s)]).filter(|&id| id != EMPTY)
    }

    /// Distinct token texts.
    pub(super) fn distinct(&self) -> usize {
        self.slots.iter().filter(|&&s| s != EMPTY).count()
    }

    /// The text of `id` where `id` is the id its text is found as (a repeated token's
    /// earlier ids have none).
    pub(super) fn text_of(&self, id: u32) -> Option<&str> {
        if id as usize >= self.len() {
            return None;
        }
        let t = self.token(id);
        (self.id(t) == Some(id)).then_some(t)
    }
}

/// A token the text is split on before anything else: its text, its id, and whether
/// decoding skips it.
pub(super) struct Added {
    pub(super) text: String,
    pub(super) id: u32,
    pub(super) special: bool,
}

/// The added tokens of a tokenizer, matched leftmost-longest in the raw text.
pub(super) struct AddedTokens {
    matcher: aho_corasick::AhoCorasick,
    list: Vec<Added>,
    /// (id, index in `list`), by id.
    by_id: Vec<(u32, usize)>,
    /// How many of them the vocabulary lacks.
    apart: usize,
}

impl AddedTokens {
    /// `added`: (text, id, special); a token not special is kept only where the
    /// vocabulary has its text, and a token takes the id the vocabulary gives its text
    /// (the last of a repeat), as the library gives it.
    pub(super) fn new(added: &[(&str, u32, bool)], vocab: &Vocab) -> Result<Self, String> {
        let added: Vec<(&str, u32, bool)> = (added.iter().copied())
            .filter(|&(t, _, special)| special || vocab.id(t).is_some())
            .collect();
        let list: Vec<Added> = added
            .iter()
            .map(|&(t, id, special)| Added {
                text: t.to_string(),
                id: vocab.id(t).unwrap_or(id),
                special,
            })
            .collect();
        let mut by_id: Vec<(u32, usize)> =
            list.iter().enumerate().map(|(i, a)| (a.id, i)).collect();
        by_id.sort_unstable();
        let apart = added.iter().filter(|a| vocab.id(a.0).is_none()).count();
        let matcher = aho_corasick::AhoCorasick::builder()
            .match_kind(aho_corasick::MatchKind::LeftmostLongest)
            .build(added.iter().map(|a| a.0))
            .map_err(|e| format!("added tokens: {e}"))?;
        Ok(Self {
            matcher,
            list,
            by_id,
            apart,
        })
    }

    /// `text` split on the added tokens: each piece between them given to `piece`, each
    /// added token's id pushed to `ids`, in order.
    pub(super) fn split(
        &self,
        text: &str,
        ids: &mut Vec<u32>,
        mut piece: impl FnMut(&str, &mut Vec<u32>),
    ) {
        let mut at = 0;
        for m in self.matcher.find_iter(text) {
            piece(&text[at..m.start()], ids);
            ids.push(self.list[m.pattern().as_usize()].id);
            at = m.end();
        }
        piece(&text[at..], ids);
    }

    pub(super) fn of_id(&self, id: u32) -> Option<&Added> {
        let i = self.by_id.binary_search_by_key(&id, |&(id, _)| id).ok()?;
        Some(&self.list[self.by_id[i].1])
    }

    pub(super) fn id(&self, token: &str) -> Option<u32> {
        self.list.iter().find(|a| a.text == token).map(|a| a.id)
    }

    /// How many of them the vocabulary lacks (they count as tokens of their own).
    pub(super) fn apart(&self) -> usize {
        self.apart
    }
}

/// A vocabulary with its added tokens: where both builds look tokens up.
pub(super) struct Table {
    pub(super) vocab: Vocab,
    pub(super) added: AddedTokens,
    /// Distinct token texts, the vocabulary's and the added ones.
    size: usize,
    /// Put in front of a text when special tokens are asked for.
    bos: Option<u32>,
}

impl Table {
    pub(super) fn new(vocab: Vocab, added: AddedTokens, bos: Option<u32>) -> Self {
        Self {
            size: vocab.distinct() + added.apart(),
            vocab,
            added,
            bos,
        }
    }

    /// Ids of `text`: the BOS in front when `special` asks for it, then the added tokens
    /// split off, each piece between them encoded by `piece`.
    pub(super) fn encode(
        &self,
        text: &str,
        special: bool,
        piece: impl FnMut(&str, &mut Vec<u32>),
    ) -> Vec<u32> {
        let mut ids = Vec::new();
        if special {
            ids.extend(self.bos);
        }
        self.added.split(text, &mut ids, piece);
        ids
    }

    /// The text of `id`: an added token's, else the vocabulary's where `id` is the id its
    /// text is found as (a repeated token's earlier ids have none).
    pub(super) fn token(&self, id: u32) -> Option<&str> {
        match self.added.of_id(id) {
            Some(a) => Some(&a.text),
            None => self.vocab.text_of(id),
        }
    }

    /// The id of a token's text: an added token's, else the vocabulary's.
    pub(super) fn id(&self, token: &str) -> Option<u32> {
        self.added.id(token).or_else(|| self.vocab.id(token))
    }

    /// Distinct token texts, the vocabulary's and the added ones.
    pub(super) fn size(&self) -> usize {
        self.size
    }

    /// The texts decoding shows of `ids`: special added tokens and ids without a text
    /// left out.
    pub(super) fn shown<'a>(&'a self, ids: &'a [u32]) -> impl Iterator<Item = &'a str> {
        ids.iter()
            .filter(|&&id| !self.added.of_id(id).is_some_and(|a| a.special))
            .filter_map(|&id| self.token(id))
    }
}

/// One symbol of a word being merged: a token, linked to its neighbours; `len == 0` once
/// merged into its left neighbour.
#[derive(Clone, Copy)]
pub(super) struct Symbol {
    pub(super) id: u32,
    pub(super) len: u32,
    prev: isize,
    next: isize,
}

/// A word's symbols, each pushed after the last.
pub(super) fn push(symbols: &mut Vec<Symbol>, id: u32, len: usize) {
    let n = symbols.len() as isize;
    if let Some(last) = symbols.last_mut() {
        last.next = n;
    }
    symbols.push(Symbol {
        id,
        len: len as u32,
        prev: n - 1,
        next: -1,
    });
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

/// Apply the merges `merge_of(left, right) -> (rank, merged id)` to `symbols` until none
/// applies, lowest rank first, then leftmost; the ids of the symbols left are pushed to
/// `ids`.
pub(super) fn merge_all(
    symbols: &mut [Symbol],
    mut merge_of: impl FnMut(u32, u32) -> Option<(u64, u32)>,
    ids: &mut Vec<u32>,
) {
    let mut queue: BinaryHeap<Merge> = symbols
        .windows(2)
        .enumerate()
        .filter_map(|(pos, w)| {
            let (rank, new_id) = merge_of(w[0].id, w[1].id)?;
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
        match merge_of(cur.id, right.id) {
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
            if let Some((rank, new_id)) = merge_of(symbols[prev].id, cur.id) {
                queue.push(Merge {
                    rank,
                    pos: prev,
                    new_id,
                });
            }
        }
        if cur.next > -1 && (cur.next as usize) < symbols.len() {
            let next = cur.next as usize;
            if let Some((rank, new_id)) = merge_of(cur.id, symbols[next].id) {
                queue.push(Merge {
                    rank,
                    pos: top.pos,
                    new_id,
                });
            }
        }
    }
    ids.extend(symbols.iter().filter(|s| s.len > 0).map(|s| s.id));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_at_most_three_quarters_full_and_keep_a_free_slot() {
        for n in (0..20).chain([48_900, 49_152, 49_153, 151_643, 262_144]) {
            let s = table_slots(n);
            assert!(s.is_power_of_two() && s > n, "{n} entries, {s} slots");
            assert!(
                4 * n <= 3 * s,
                "{n} entries fill {s} slots past three quarters"
            );
        }
        // SmolLM2's 49,152 tokens fill 65,536 slots, not 131,072
        assert_eq!(table_slots(49_152), 65_536);
        let v = Vocab::new(&["a", "b", "ab"]);
        assert_eq!((v.id("ab"), v.id("ba")), (Some(2), None));
    }
}

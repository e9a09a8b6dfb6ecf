//! Byte-level BPE as GGUF files call it `gpt2` (SmolLM2, Llama 3, Qwen 2 and others),
//! read from a GGUF vocabulary into a few MB.
//!
//! The tokenizers library holds a 49k-token vocabulary and its merges in hash maps of
//! owned strings (~10 MB resident for the whole run), and its regex engines add their code.
//! Here the tokens are [`Vocab`]'s one string with an index, the merges one open-addressed
//! table of id pairs, and the split before the merges (the pattern `tokenizer.ggml.pre`
//! names) is scanned by hand, with the Unicode classes the regex engine would use. The ids
//! are the library's: added tokens split off first, the same words, each byte spelled in
//! GPT-2's byte alphabet, the merges by rank then position, and the same decoder.

use super::bpe::{self, AddedTokens, Symbol, Table, Vocab};

/// The split of a text into words before the merges, as GGUF's `tokenizer.ggml.pre`
/// names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// GPT-2's (the byte-level pre-tokenizer's own pattern; also SmolLM's).
    Gpt2,
    /// Llama 3's: contractions in any case, a letter run with one leading non-letter,
    /// numbers of up to three digits, line breaks kept together.
    Llama3,
    /// Qwen 2's: Llama 3's with one digit at a time.
    Qwen2,
}

const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl Split {
    /// The split a GGUF `tokenizer.ggml.pre` names; an unknown one is refused by name.
    pub fn of_gguf(pre: &str) -> Result<Self, String> {
        Ok(match pre {
            "default" | "gpt2" | "gpt-2" | "smollm" => Split::Gpt2,
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "smaug-bpe" | "dbrx" => Split::Llama3,
            "qwen2" | "deepseek-r1-qwen" => Split::Qwen2,
            other => {
                return Err(format!(
                    "pre-tokenizer '{other}' is not supported (default, gpt-2, smollm, llama-bpe/llama3, qwen2)"
                ))
            }
        })
    }

    /// The regular expression of a split other than GPT-2's (which is the byte-level
    /// pre-tokenizer's built-in one), as a `tokenizer.json` writes it.
    pub fn pattern(self) -> Option<&'static str> {
        match self {
            Split::Gpt2 => None,
            Split::Llama3 => Some(LLAMA3),
            Split::Qwen2 => Some(QWEN2),
        }
    }
}

/// Code point ranges, sorted.
struct Ranges(Vec<(u32, u32)>);

impl Ranges {
    /// The class `pattern` (a single class, such as `\p{L}`) as the regex engine's Unicode
    /// tables define it.
    fn of(pattern: &str) -> Result<Self, String> {
        use regex_syntax::hir::{Class, HirKind};
        let hir = regex_syntax::parse(pattern).map_err(|e| format!("{pattern}: {e}"))?;
        match hir.kind() {
            HirKind::Class(Class::Unicode(c)) => Ok(Ranges(
                c.ranges()
                    .iter()
                    .map(|r| (r.start() as u32, r.end() as u32))
                    .collect(),
            )),
            _ => Err(format!("{pattern} is not a class")),
        }
    }

    fn has(&self, c: char) -> bool {
        let c = c as u32;
        let i = self.0.partition_point(|&(_, end)| end < c);
        self.0.get(i).is_some_and(|&(start, _)| start <= c)
    }
}

/// The Unicode classes the splits test.
struct Classes {
    letter: Ranges,
    number: Ranges,
    space: Ranges,
    /// The letters of the contractions, each with what it matches case-insensitively
    /// (`s` also matches `ſ`).
    folds: Vec<(char, Ranges)>,
}

impl Classes {
    fn new() -> Result<Self, String> {
        Ok(Self {
            letter: Ranges::of(r"\p{L}")?,
            number: Ranges::of(r"\p{N}")?,
            space: Ranges::of(r"\s")?,
            folds: "strevmld"
                .chars()
                .map(|c| Ok((c, Ranges::of(&format!("(?i:{c})"))?)))
                .collect::<Result<_, String>>()?,
        })
    }

    fn letter(&self, c: char) -> bool {
        match c.is_ascii() {
            true => c.is_ascii_alphabetic(),
            false => self.letter.has(c),
        }
    }

    fn number(&self, c: char) -> bool {
        match c.is_ascii() {
            true => c.is_ascii_digit(),
            false => self.number.has(c),
        }
    }

    fn space(&self, c: char) -> bool {
        match c.is_ascii() {
            true => matches!(c, '\t'..='\r' | ' '),
            false => self.space.has(c),
        }
    }

    /// Neither whitespace, a letter nor a number.
    fn other(&self, c: char) -> bool {
        !self.space(c) && !self.letter(c) && !self.number(c)
    }

    /// Whether `c` matches the contraction letter `l`, in any case when `fold`.
    fn same(&self, l: char, c: char, fold: bool) -> bool {
        match fold {
            false => l == c,
            true => (self.folds.iter())
                .find(|(f, _)| *f == l)
                .is_some_and(|(_, r)| r.has(c)),
        }
    }
}

/// The end of the run of characters of `s` from byte `i` that `pred` accepts.
fn run(s: &str, i: usize, pred: impl Fn(char) -> bool) -> usize {
    s[i..]
        .char_indices()
        .find(|&(_, c)| !pred(c))
        .map_or(s.len(), |(j, _)| i + j)
}

/// The end of the whitespace run from `i` as `\s+(?!\S)|\s+` takes it: all of it at the
/// end of the text, else all but its last character (which goes with the word after it),
/// unless that is all there is.
fn spaces(s: &str, i: usize, cls: &Classes) -> usize {
    let j = run(s, i, |c| cls.space(c));
    if j == s.len() {
        return j;
    }
    let last = s[..j].char_indices().next_back().map_or(i, |(k, _)| k);
    if last > i {
        last
    } else {
        j
    }
}

/// The end of the word of `s` that starts at byte `i` (`i` below `s.len()`), as the
/// split's regular expression would match it there (its alternatives tried in order).
fn word_end(s: &str, i: usize, split: Split, cls: &Classes) -> usize {
    let mut chars = s[i..].chars();
    let Some(c) = chars.next() else {
        return s.len();
    };
    let next = chars.next();
    let after = i + c.len_utf8();
    let fold = split != Split::Gpt2;
    if c == '\'' {
        for suffix in ["s", "t", "re", "ve", "m", "ll", "d"] {
            let mut rest = s[after..].chars();
            if suffix
                .chars()
                .all(|l| rest.next().is_some_and(|c| cls.same(l, c, fold)))
            {
                let len: usize = s[after..]
                    .chars()
                    .take(suffix.len())
                    .map(char::len_utf8)
                    .sum();
                return after + len;
            }
        }
    }
    let other = |c: char| cls.other(c);
    match split {
        Split::Gpt2 => {
            // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`
            let classes: [&dyn Fn(char) -> bool; 3] =
                [&|c| cls.letter(c), &|c| cls.number(c), &other];
            for class in classes {
                if c == ' ' && next.is_some_and(class) {
                    return run(s, after, class);
                }
                if class(c) {
                    return run(s, i, class);
                }
            }
        }
        Split::Llama3 | Split::Qwen2 => {
            // `[^\r\n\p{L}\p{N}]?\p{L}+`
            let lead = !matches!(c, '\r' | '\n') && !cls.letter(c) && !cls.number(c);
            if lead && next.is_some_and(|n| cls.letter(n)) {
                return run(s, after, |c| cls.letter(c));
            }
            if cls.letter(c) {
                return run(s, i, |c| cls.letter(c));
            }
            // `\p{N}{1,3}` or `\p{N}`
            if cls.number(c) {
                let most = if split == Split::Llama3 { 3 } else { 1 };
                return i + s[i..]
                    .chars()
                    .take(most)
                    .take_while(|&c| cls.number(c))
                    .map(char::len_utf8)
                    .sum::<usize>();
            }
            // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
            let breaks = |c: char| matches!(c, '\r' | '\n');
            if c == ' ' && next.is_some_and(other) {
                return run(s, run(s, after, other), breaks);
            }
            if other(c) {
                return run(s, run(s, i, other), breaks);
            }
            // `\s*[\r\n]+`: the whitespace run up to its last line break
            if cls.space(c) {
                let j = run(s, i, |c| cls.space(c));
                if let Some(k) = s[i..j].rfind(['\r', '\n']) {
                    return i + k + 1;
                }
            }
        }
    }
    if cls.space(c) {
        return spaces(s, i, cls);
    }
    after
}

/// GPT-2's byte → character map: printable bytes stand for themselves, the others take
/// the characters from U+0100 on, in byte order (so a byte-level vocabulary is text).
pub(super) fn byte_alphabet() -> [char; 256] {
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

/// Merges by their pair of ids: open addressing, `(left << 32 | right, rank, merged id)`,
/// `FREE` keys where free.
struct Merges(Vec<(u64, u32, u32)>);

const FREE: u64 = u64::MAX;

impl Merges {
    fn with_capacity(n: usize) -> Self {
        Merges(vec![(FREE, 0, 0); super::bpe::table_slots(n)])
    }

    fn slot(&self, key: u64) -> usize {
        let mask = self.0.len() - 1;
        // Fibonacci hashing of the pair
        let mut at = (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize & mask;
        while self.0[at].0 != FREE && self.0[at].0 != key {
            at = (at + 1) & mask;
        }
        at
    }

    /// A later merge of the same pair replaces an earlier one, as the library's map does.
    fn insert(&mut self, a: u32, b: u32, rank: u32, id: u32) {
        let key = (a as u64) << 32 | b as u64;
        let at = self.slot(key);
        self.0[at] = (key, rank, id);
    }

    fn get(&self, a: u32, b: u32) -> Option<(u64, u32)> {
        let (key, rank, id) = self.0[self.slot((a as u64) << 32 | b as u64)];
        (key != FREE).then_some((rank as u64, id))
    }
}

pub struct ByteBpe {
    pub(super) table: Table,
    /// `None` once released ([`ByteBpe::release_merges`]).
    merges: Option<Merges>,
    split: Split,
    classes: Classes,
    /// The token of each byte's alphabet character, where the vocabulary has it.
    byte_ids: [Option<u32>; 256],
    /// The byte of each alphabet character (they all lie below U+0144), -1 for none.
    char_bytes: Vec<i16>,
}

impl ByteBpe {
    /// The tokenizer of `tokens` (any token not written in the byte alphabet is respelled
    /// from its UTF-8 bytes), `merges` ("left right", in rank order), `added` (text, GGUF
    /// id, special: a special token only where it is written in the byte alphabet, one
    /// not special only where the vocabulary has its text), the `split`, and `bos` (an id)
    /// to put in front. A merge whose pieces or result the vocabulary lacks is refused,
    /// as the library refuses it.
    pub fn new(
        tokens: &[String],
        merges: &[String],
        added: &[(&str, u32, bool)],
        split: Split,
        bos: Option<u32>,
    ) -> Result<Self, String> {
        let alphabet = byte_alphabet();
        let mut char_bytes = vec![-1i16; 0x144];
        for (b, &c) in alphabet.iter().enumerate() {
            char_bytes[c as usize] = b as i16;
        }
        let in_alphabet = |t: &str| {
            t.chars()
                .all(|c| char_bytes.get(c as usize).is_some_and(|&b| b >= 0))
        };
        let spelled: Vec<std::borrow::Cow<str>> = tokens
            .iter()
            .map(|t| match in_alphabet(t) {
                true => t.as_str().into(),
                false => t
                    .bytes()
                    .map(|b| alphabet[b as usize])
                    .collect::<String>()
                    .into(),
            })
            .collect();
        let vocab = Vocab::new(&spelled);
        drop(spelled);
        let mut pairs = Merges::with_capacity(merges.len());
        let mut joined = String::new();
        for (rank, m) in merges.iter().enumerate() {
            let (a, b) = m.split_once(' ').unwrap_or((m, ""));
            let piece = |t: &str| {
                vocab
                    .id(t)
                    .ok_or_else(|| format!("merge '{m}': the vocabulary has no '{t}'"))
            };
            joined.clear();
            joined.push_str(a);
            joined.push_str(b);
            pairs.insert(piece(a)?, piece(b)?, rank as u32, piece(&joined)?);
        }
        let added: Vec<(&str, u32, bool)> = (added.iter().copied())
            .filter(|&(t, _, special)| !special || in_alphabet(t))
            .collect();
        let added = AddedTokens::new(&added, &vocab)?;
        let mut byte_ids = [None; 256];
        for (b, id) in byte_ids.iter_mut().enumerate() {
            *id = vocab.id(alphabet[b].encode_utf8(&mut [0; 4]));
        }
        Ok(Self {
            table: Table::new(vocab, added, bos),
            merges: Some(pairs),
            split,
            classes: Classes::new()?,
            byte_ids,
            char_bytes,
        })
    }

    /// Ids of `text`, the BOS in front when `special` asks for it.
    /// `None` once the merges have been released ([`ByteBpe::release_merges`]).
    pub fn encode(&self, text: &str, special: bool) -> Option<Vec<u32>> {
        let merges = self.merges.as_ref()?;
        Some(self.table.encode(text, special, |piece, ids| {
            let mut i = 0;
            while i < piece.len() {
                let j = word_end(piece, i, self.split, &self.classes);
                self.encode_word(merges, &piece[i..j], ids);
                i = j;
            }
        }))
    }

    /// One word: its bytes as their alphabet characters' tokens (a byte the vocabulary
    /// lacks is left out), then merged.
    fn encode_word(&self, merges: &Merges, word: &str, ids: &mut Vec<u32>) {
        let mut symbols: Vec<Symbol> = Vec::with_capacity(word.len());
        for b in word.bytes() {
            if let Some(id) = self.byte_ids[b as usize] {
                bpe::push(&mut symbols, id, 1);
            }
        }
        bpe::merge_all(&mut symbols, |a, b| merges.get(a, b), ids);
    }

    /// Drop the merges, which only encoding reads (1 MiB for SmolLM2's 49k): for a caller
    /// that has encoded all it will. Decoding is unchanged.
    pub fn release_merges(&mut self) {
        self.merges = None;
    }

    /// Text of `ids`, special tokens skipped: each token's alphabet characters as their
    /// bytes (a token with a character outside the alphabet as its own UTF-8), the bytes
    /// read as UTF-8 with invalid sequences replaced.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for t in self.table.shown(ids) {
            let start = bytes.len();
            for c in t.chars() {
                match self.char_bytes.get(c as usize).copied() {
                    Some(b) if b >= 0 => bytes.push(b as u8),
                    _ => {
                        bytes.truncate(start);
                        bytes.extend_from_slice(t.as_bytes());
                        break;
                    }
                }
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::{PreTokenizedString, PreTokenizer};

    /// The library's words of `text` under `split` (its regex engine, its pattern).
    fn library_words(text: &str, split: Split) -> Vec<String> {
        use tokenizers::pre_tokenizers::byte_level::ByteLevel;
        use tokenizers::pre_tokenizers::split::{Split as Re, SplitPattern};
        let mut pre = PreTokenizedString::from(text);
        match split.pattern() {
            None => ByteLevel::new(false, false, true)
                .pre_tokenize(&mut pre)
                .unwrap(),
            Some(p) => Re::new(
                SplitPattern::Regex(p.into()),
                tokenizers::SplitDelimiterBehavior::Isolated,
                false,
            )
            .unwrap()
            .pre_tokenize(&mut pre)
            .unwrap(),
        }
        let alphabet = byte_alphabet();
        let spelled = |w: &str| -> String { w.bytes().map(|b| alphabet[b as usize]).collect() };
        pre.get_splits(
            tokenizers::OffsetReferential::Original,
            tokenizers::OffsetType::Byte,
        )
        .into_iter()
        .map(|(w, (a, b), _)| match split {
            // ByteLevel's words come respelled; the split's as they are
            Split::Gpt2 => {
                assert_eq!(w, spelled(&text[a..b]));
                text[a..b].to_string()
            }
            _ => w.to_string(),
        })
        .collect()
    }

    fn own_words(text: &str, split: Split, cls: &Classes) -> Vec<String> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < text.len() {
            let j = word_end(text, i, split, cls);
            assert!(j > i, "no progress at {i} in {text:?}");
            out.push(text[i..].get(..j - i).unwrap().to_string());
            i = j;
        }
        out
    }

    /// Random texts over characters chosen for the patterns' edges (spaces of several
    /// kinds, line breaks, contractions in both cases and with `ſ`, letters, marks and
    /// digits of other scripts, punctuation, emoji): every split's words equal the
    /// library's, which runs the regular expression.
    #[test]
    fn splits_equal_the_regular_expressions() {
        let cls = Classes::new().unwrap();
        let pieces = [
            " ",
            "  ",
            "\t",
            "\n",
            "\r\n",
            "\r",
            "\u{a0}",
            "\u{3000}",
            "\u{2028}",
            "\u{85}",
            "'",
            "'s",
            "'S",
            "'ſ",
            "'re",
            "'RE",
            "'Ll",
            "'d",
            "'ve",
            "'m",
            "'t",
            "'x",
            "a",
            "Z",
            "hello",
            "é",
            "e\u{301}",
            "ß",
            "日本",
            "한",
            "ж",
            "\u{2160}",
            "ǅ",
            "1",
            "12345",
            "٣",
            "²",
            "½",
            "0.5",
            "-",
            "!!",
            "?",
            ",",
            "(",
            "...",
            "#",
            "🤖",
            "👍🏽",
            "\u{200d}",
            "_",
            "$",
            "€",
            "\u{ad}",
            "x\u{fe0f}",
        ];
        let mut rng = crate::rng::Rng::new(11);
        for split in [Split::Gpt2, Split::Llama3, Split::Qwen2] {
            for _ in 0..3000 {
                let text: String = (0..1 + rng.below(12))
                    .map(|_| pieces[rng.below(pieces.len())])
                    .collect();
                assert_eq!(
                    own_words(&text, split, &cls),
                    library_words(&text, split),
                    "{split:?}: {text:?}"
                );
            }
        }
    }

    /// Random vocabularies and merges (repeated merges included): the ids of random words
    /// equal the library's byte-level BPE given the same vocabulary and merges.
    #[test]
    fn merges_equal_the_library_bpe_on_random_vocabularies() {
        use tokenizers::Model;
        let alphabet = byte_alphabet();
        let mut rng = crate::rng::Rng::new(5);
        let letters = ['a', 'b', 'c', 'Ġ'];
        let mut compared = 0;
        for _ in 0..40 {
            let mut tokens: Vec<String> = alphabet.iter().map(|c| c.to_string()).collect();
            let mut merges = Vec::new();
            for _ in 0..60 {
                // a merge of two existing tokens made of the letters
                let pick = |rng: &mut crate::rng::Rng, tokens: &[String]| loop {
                    let t = &tokens[rng.below(tokens.len())];
                    if t.chars().all(|c| letters.contains(&c)) {
                        break t.clone();
                    }
                };
                let (a, b) = (pick(&mut rng, &tokens), pick(&mut rng, &tokens));
                if !tokens.contains(&format!("{a}{b}")) {
                    tokens.push(format!("{a}{b}"));
                }
                merges.push(format!("{a} {b}"));
            }
            let vocab: tokenizers::models::bpe::Vocab = (tokens.iter().enumerate())
                .map(|(i, t)| (t.clone(), i as u32))
                .collect();
            let pairs = (merges.iter())
                .map(|m| {
                    let (a, b) = m.split_once(' ').unwrap();
                    (a.to_string(), b.to_string())
                })
                .collect();
            let lib = tokenizers::models::bpe::BPE::builder()
                .vocab_and_merges(vocab, pairs)
                .build()
                .unwrap();
            let own = ByteBpe::new(&tokens, &merges, &[], Split::Gpt2, None).unwrap();
            for _ in 0..40 {
                let word: String = (0..1 + rng.below(14))
                    .map(|_| ['a', 'b', 'c', 'a', 'b', 'Ġ'][rng.below(6)])
                    .collect();
                let want: Vec<u32> = lib.tokenize(&word).unwrap().iter().map(|t| t.id).collect();
                let mut got = Vec::new();
                // the word as bytes: 'Ġ' is the space's alphabet character
                let table = own.merges.as_ref().unwrap();
                own.encode_word(table, &word.replace('Ġ', " "), &mut got);
                assert_eq!(got, want, "{word:?} with merges {merges:?}");
                compared += 1;
            }
        }
        assert_eq!(compared, 1600);
    }
}

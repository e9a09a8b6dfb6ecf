//! Sampling from a model: a pure sampler (logits + history + RNG → token) and a streaming
//! generator that feeds the model through its KV cache.

pub mod sampler;
pub mod warm;

pub use sampler::{sample, SamplerConfig};

use candle_core::Tensor;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::model::{Cache, Model};
use crate::rng::Rng;
use crate::tokenize::Tokenizer;

#[derive(Debug, Clone)]
pub struct GenerateConfig {
    pub sampler: SamplerConfig,
    /// New tokens at most (generation also stops when the context window is full).
    pub max_tokens: usize,
    /// Stop when the generated text contains any of these (the stop string is not emitted).
    pub stop: Vec<String>,
    /// Stop after any of these tokens (the model's end-of-sequence ids).
    pub eos: Vec<u32>,
    pub seed: u64,
    /// Keep this many of the highest logits of each step (0: none) in
    /// [`GenerateStats::top_logits`].
    pub top_logits: usize,
    /// Stop early when this is set (Ctrl-C in a chat stops the answer, not the program).
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

#[derive(Debug, Clone)]
pub struct GenerateStats {
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub prefill_s: f64,
    pub decode_s: f64,
    /// All ids, prompt first.
    pub ids: Vec<u32>,
    pub text: String,
    /// For each new token, the `top_logits` highest raw logits of its step as `(id,
    /// logit)`, best first (before temperature, penalties and filters).
    pub top_logits: Vec<Vec<(u32, f32)>>,
}

impl GenerateStats {
    /// Decode speed, tokens after the first per second.
    pub fn tokens_per_s(&self) -> f64 {
        if self.decode_s > 0.0 {
            (self.new_tokens.saturating_sub(1)) as f64 / self.decode_s
        } else {
            0.0
        }
    }
}

/// Generate from `prompt` (token ids), calling `on_text` with each new piece of text (a
/// decoder-only model through a fresh [`Session`]). An encoder-decoder reads the prompt as its source and decodes from its start token (the
/// `ids` of the result are then the decoder's, the start token first).
pub fn generate(
    model: &Model,
    tok: &Tokenizer,
    prompt: &[u32],
    cfg: &GenerateConfig,
    on_text: &mut dyn FnMut(&str),
) -> Result<GenerateStats> {
    if model.config.encoder_layers == 0 {
        return Ok(Session::new(model)
            .generate(model, tok, prompt, cfg, on_text)?
            .0);
    }
    let ctx = model.config.max_seq_len;
    let start = model.config.decoder_start;
    // an encoder's source may be longer than the decoder's window
    check_prompt(model, prompt, start.is_none())?;
    let _warm = warm::KeepWarm::start();
    let mut cache = model.new_cache();
    if start.is_none() {
        // sized once for the prompt and the most tokens it may be given, as the server
        // sizes a request's cache (growing it copies every layer's keys and values)
        cache.reserve(prompt.len() + cfg.max_tokens.min(ctx.saturating_sub(prompt.len())))?;
    }
    let t0 = Instant::now();
    let input = Tensor::new(prompt, model.device())?.unsqueeze(0)?;
    let ids = match start {
        Some(s) => {
            model.encode(&input, &mut cache)?;
            vec![s]
        }
        None => prompt.to_vec(),
    };
    let first = Tensor::new(ids.as_slice(), model.device())?.unsqueeze(0)?;
    let logits = model.forward(&first, Some(&mut cache), true)?.logits;
    let prefill_s = t0.elapsed().as_secs_f64();
    let limit = cfg.max_tokens.min(ctx - ids.len());
    let mut step = |next: u32| -> Result<Tensor> {
        let input = Tensor::new(&[next], model.device())?.unsqueeze(0)?;
        Ok(model.forward(&input, Some(&mut cache), true)?.logits)
    };
    let prefill = Prefilled {
        prompt_tokens: prompt.len(),
        prefill_s,
        logits,
        ids,
    };
    sample_loop(prefill, limit, tok, cfg, &mut step, on_text)
}

/// A conversation's model state kept across turns: the cache and the ids it holds. Each
/// turn prefills only what its prompt adds to the longest prefix the cache already holds.
pub struct Session {
    pub cache: Cache,
    /// The ids the cache holds, in order.
    pub fed: Vec<u32>,
}

impl Session {
    pub fn new(model: &Model) -> Self {
        Self {
            cache: model.new_cache(),
            fed: Vec::new(),
        }
    }

    /// Forget everything (a new conversation).
    pub fn reset(&mut self, model: &Model) {
        *self = Self::new(model);
    }

    /// Feed `prompt` (the whole conversation so far) and return the logits of its last
    /// token and how many of its tokens came from the cache. The cache keeps the longest
    /// common prefix of what it held and `prompt` (at least one token is fed, for the
    /// logits); a model whose cache cannot go back restarts from nothing when the prompt
    /// does not extend what it held.
    pub fn prefill(&mut self, model: &Model, prompt: &[u32]) -> Result<(Tensor, usize)> {
        self.prefill_for(model, prompt, 0)
    }

    /// [`Session::prefill`], the cache made room for `room` positions in all (the prompt
    /// and the tokens it may be given) before the prompt goes in.
    fn prefill_for(
        &mut self,
        model: &Model,
        prompt: &[u32],
        room: usize,
    ) -> Result<(Tensor, usize)> {
        check_prompt(model, prompt, true)?;
        let common = self
            .fed
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count()
            .min(prompt.len() - 1);
        let keep = if self.cache.truncate(common) {
            common
        } else {
            self.reset(model);
            0
        };
        self.fed.truncate(keep);
        self.cache.reserve(room)?;
        let input = Tensor::new(&prompt[keep..], model.device())?.unsqueeze(0)?;
        let logits = model.forward(&input, Some(&mut self.cache), true)?.logits;
        self.fed.extend_from_slice(&prompt[keep..]);
        Ok((logits, keep))
    }

    /// [`generate`] through this session's cache: the prompt reuses what the cache holds,
    /// and the cache keeps the answer for the next turn.
    pub fn generate(
        &mut self,
        model: &Model,
        tok: &Tokenizer,
        prompt: &[u32],
        cfg: &GenerateConfig,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<(GenerateStats, usize)> {
        if model.config.encoder_layers > 0 {
            return Err(Error::Generate(
                "a chat session needs a decoder-only model".into(),
            ));
        }
        let _warm = warm::KeepWarm::start();
        let t0 = Instant::now();
        let limit = cfg
            .max_tokens
            .min(model.config.max_seq_len.saturating_sub(prompt.len()));
        // the cache sized once for the prompt and its token limit: doubling it copies every
        // layer's keys and values, and the allocator keeps the buffers it leaves
        let (logits, reused) = self.prefill_for(model, prompt, prompt.len() + limit)?;
        let prefill = Prefilled {
            prompt_tokens: prompt.len(),
            prefill_s: t0.elapsed().as_secs_f64(),
            logits,
            ids: prompt.to_vec(),
        };
        let (cache, fed) = (&mut self.cache, &mut self.fed);
        let mut step = |next: u32| -> Result<Tensor> {
            let input = Tensor::new(&[next], model.device())?.unsqueeze(0)?;
            let logits = model.forward(&input, Some(&mut *cache), true)?.logits;
            fed.push(next);
            Ok(logits)
        };
        let stats = sample_loop(prefill, limit, tok, cfg, &mut step, on_text)?;
        Ok((stats, reused))
    }
}

/// A prompt a model can take: not empty, within the vocabulary and (`in_window`) within
/// the context window.
fn check_prompt(model: &Model, prompt: &[u32], in_window: bool) -> Result<()> {
    let ctx = model.config.max_seq_len;
    if prompt.is_empty() {
        return Err(Error::Generate("the prompt is empty".into()));
    }
    if in_window && prompt.len() > ctx {
        return Err(Error::Generate(format!(
            "the prompt has {} tokens, more than the model's context window of {ctx}",
            prompt.len()
        )));
    }
    let vocab = model.config.vocab_size;
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::Generate(format!(
            "prompt token {bad} is out of range for a vocabulary of {vocab}"
        )));
    }
    Ok(())
}

/// Where sampling starts: the logits of the first new token, the ids so far (what the
/// repetition penalty sees; new text is decoded from what follows them), and the prefill's
/// size and time.
struct Prefilled {
    prompt_tokens: usize,
    prefill_s: f64,
    logits: Tensor,
    ids: Vec<u32>,
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// The token limit (or the context window).
    Length,
    /// Cancelled by its caller.
    Cancelled,
}

impl Finish {
    /// The OpenAI API's `finish_reason`.
    pub fn reason(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length | Finish::Cancelled => "length",
        }
    }
}

/// What one sampled token gave.
#[derive(Debug, Clone)]
pub struct Sampled {
    pub id: u32,
    /// New text to show (may be empty: a partial UTF-8 character is held back, a stop
    /// string and what follows it are cut).
    pub text: String,
    /// Set when the sequence ends with this token (its text still counts).
    pub finish: Option<Finish>,
}

/// The sampling state of one sequence: its ids (what the repetition penalty sees), the text
/// shown so far, its RNG and limits. Feed it each step's logits row; it picks the token,
/// cuts stop strings, holds back partial characters and says when to stop. `generate`,
/// `chat` and each request of `serve` run one.
#[derive(Debug, Clone)]
pub struct Sequence {
    pub ids: Vec<u32>,
    first_new: usize,
    emitted: String,
    limit: usize,
    rng: Rng,
    sampler: SamplerConfig,
    stop: Vec<String>,
    eos: Vec<u32>,
}

impl Sequence {
    /// After `ids` (the prompt), at most `limit` new tokens.
    pub fn new(ids: Vec<u32>, limit: usize, cfg: &GenerateConfig) -> Self {
        Self {
            first_new: ids.len(),
            ids,
            emitted: String::new(),
            limit,
            rng: Rng::new(cfg.seed),
            sampler: cfg.sampler,
            stop: cfg.stop.clone(),
            eos: cfg.eos.clone(),
        }
    }

    /// New tokens so far.
    pub fn new_tokens(&self) -> usize {
        self.ids.len() - self.first_new
    }

    /// The text shown so far.
    pub fn text(&self) -> &str {
        &self.emitted
    }

    /// Length of the longest end of `text` that begins a stop string (held back: the next
    /// token may complete the stop string, and shown text cannot be taken back).
    fn stop_prefix(&self, text: &str) -> usize {
        self.stop
            .iter()
            .flat_map(|s| {
                s.char_indices()
                    .skip(1)
                    .map(|(i, _)| &s[..i])
                    .filter(|p| text.ends_with(p))
                    .map(str::len)
            })
            .max()
            .unwrap_or(0)
    }

    /// Sample the next token from `logits` (one row) and say what it shows.
    pub fn push(&mut self, logits: &[f32], tok: &Tokenizer) -> Result<Sampled> {
        let next = sample(logits, &self.ids, &self.sampler, &mut self.rng);
        self.ids.push(next);
        let text = tok.decode(&self.ids[self.first_new..])?;
        // hold back a trailing partial UTF-8 sequence until it completes
        let stable = text.trim_end_matches('\u{FFFD}');
        let cut = self
            .stop
            .iter()
            .filter_map(|s| stable.find(s.as_str()))
            .min();
        let finish = if cut.is_some() || self.eos.contains(&next) {
            Some(Finish::Stop)
        } else if self.new_tokens() >= self.limit {
            Some(Finish::Length)
        } else {
            None
        };
        let shown = match cut {
            Some(pos) => &stable[..pos],
            // text that may be the start of a stop string waits for the next token
            None if finish.is_none() => &stable[..stable.len() - self.stop_prefix(stable)],
            None => stable,
        };
        let mut piece = String::new();
        if shown.len() > self.emitted.len() && shown.starts_with(self.emitted.as_str()) {
            piece = shown[self.emitted.len()..].to_string();
            self.emitted = shown.to_string();
        }
        Ok(Sampled {
            id: next,
            text: piece,
            finish,
        })
    }
}

/// The `n` highest of `row` as `(id, logit)`, best first.
pub fn top_n(row: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut best: Vec<(u32, f32)> = row
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l))
        .collect();
    let k = n.min(best.len());
    if k == 0 {
        return Vec::new();
    }
    best.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
    best.truncate(k);
    best.sort_by(|a, b| b.1.total_cmp(&a.1));
    best
}

/// One logits tensor (any shape with one row of values) as host floats.
pub fn logits_row(logits: &Tensor) -> Result<Vec<f32>> {
    Ok(logits
        .flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1()?)
}

/// The sampling loop: sample from the logits, stream the new text, feed the token through
/// `step` for the next logits; at most `limit` new tokens, none after an end-of-sequence
/// token or a stop string, none once `cfg.cancel` is set.
fn sample_loop(
    prefill: Prefilled,
    limit: usize,
    tok: &Tokenizer,
    cfg: &GenerateConfig,
    step: &mut dyn FnMut(u32) -> Result<Tensor>,
    on_text: &mut dyn FnMut(&str),
) -> Result<GenerateStats> {
    let t0 = Instant::now();
    let mut logits = prefill.logits;
    let mut seq = Sequence::new(prefill.ids, limit, cfg);
    let mut top_logits = Vec::new();
    let cancelled = || {
        cfg.cancel
            .as_ref()
            .is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
    };
    while seq.new_tokens() < limit && !cancelled() {
        let row = logits_row(&logits)?;
        if cfg.top_logits > 0 {
            top_logits.push(top_n(&row, cfg.top_logits));
        }
        let s = seq.push(&row, tok)?;
        if !s.text.is_empty() {
            on_text(&s.text);
        }
        if s.finish.is_some() {
            break;
        }
        logits = step(s.id)?;
    }
    Ok(GenerateStats {
        prompt_tokens: prefill.prompt_tokens,
        new_tokens: seq.new_tokens(),
        prefill_s: prefill.prefill_s,
        decode_s: t0.elapsed().as_secs_f64(),
        text: seq.emitted,
        ids: seq.ids,
        top_logits,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feed `text` byte by byte (greedy on one-hot rows) and collect the pieces shown.
    fn stream(text: &str, stop: &[&str], limit: usize) -> (Vec<String>, Option<Finish>) {
        let cfg = GenerateConfig {
            sampler: SamplerConfig::default(),
            max_tokens: limit,
            stop: stop.iter().map(|s| s.to_string()).collect(),
            eos: Vec::new(),
            seed: 0,
            top_logits: 0,
            cancel: None,
        };
        let mut seq = Sequence::new(vec![1], limit, &cfg);
        let (mut pieces, mut finish) = (Vec::new(), None);
        for b in text.bytes() {
            let mut row = vec![0f32; 256];
            row[b as usize] = 1.0;
            let s = seq.push(&row, &Tokenizer::Bytes).unwrap();
            pieces.push(s.text);
            if s.finish.is_some() {
                finish = s.finish;
                break;
            }
        }
        (pieces, finish)
    }

    #[test]
    fn a_stop_string_is_never_shown_even_in_part() {
        let (pieces, finish) = stream(" the the", &["e "], 20);
        assert_eq!(pieces.concat(), " th");
        assert_eq!(finish, Some(Finish::Stop));
        // "e" waited for the next token, which completed the stop string
        assert_eq!(pieces[3], "");
        // a held-back start of a stop string that never completes is shown at the end
        let (pieces, finish) = stream("abx", &["xyz"], 3);
        assert_eq!(pieces, ["a", "b", "x"]);
        assert_eq!(finish, Some(Finish::Length));
        let (pieces, _) = stream("abxa", &["xyz"], 9);
        assert_eq!(pieces, ["a", "b", "", "xa"]);
    }
}

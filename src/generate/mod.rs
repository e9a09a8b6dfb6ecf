//! Sampling from a model: a pure sampler (logits + history + RNG → token) and a streaming
//! generator that feeds the model through its KV cache.

pub mod sampler;

pub use sampler::{sample, SamplerConfig};

use candle_core::Tensor;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::model::Model;
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

/// Generate from `prompt` (token ids), calling `on_text` with each new piece of text. An
/// encoder-decoder reads the prompt as its source and decodes from its start token (the
/// `ids` of the result are then the decoder's, the start token first).
pub fn generate(
    model: &Model,
    tok: &Tokenizer,
    prompt: &[u32],
    cfg: &GenerateConfig,
    on_text: &mut dyn FnMut(&str),
) -> Result<GenerateStats> {
    let ctx = model.config.max_seq_len;
    if prompt.is_empty() {
        return Err(Error::Generate("the prompt is empty".into()));
    }
    let start = match model.config.decoder_start {
        Some(s) if model.config.encoder_layers > 0 => Some(s),
        _ => None,
    };
    if start.is_none() && prompt.len() > ctx {
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
    let mut rng = Rng::new(cfg.seed);
    let mut cache = model.new_cache();
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
    sample_loop(
        prefill, limit, &cfg.eos, tok, cfg, &mut rng, &mut step, on_text,
    )
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

/// The sampling loop: sample from the logits, append to the ids, stream
/// the new text (stop strings cut it), feed the token through `step` for the next logits;
/// at most `limit` new tokens, and none after one of `eos`.
#[allow(clippy::too_many_arguments)]
fn sample_loop(
    prefill: Prefilled,
    limit: usize,
    eos: &[u32],
    tok: &Tokenizer,
    cfg: &GenerateConfig,
    rng: &mut Rng,
    step: &mut dyn FnMut(u32) -> Result<Tensor>,
    on_text: &mut dyn FnMut(&str),
) -> Result<GenerateStats> {
    let t0 = Instant::now();
    let (mut logits, mut ids) = (prefill.logits, prefill.ids);
    let first_new = ids.len();
    let mut emitted = String::new();
    let mut new = 0;
    let mut top_logits = Vec::new();
    while new < limit {
        let row: Vec<f32> = logits
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1()?;
        if cfg.top_logits > 0 {
            let mut best: Vec<(u32, f32)> = row
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, l))
                .collect();
            let k = cfg.top_logits.min(best.len());
            best.select_nth_unstable_by(k.saturating_sub(1), |a, b| b.1.total_cmp(&a.1));
            best.truncate(k);
            best.sort_by(|a, b| b.1.total_cmp(&a.1));
            top_logits.push(best);
        }
        let next = sample(&row, &ids, &cfg.sampler, rng);
        ids.push(next);
        new += 1;
        let text = tok.decode(&ids[first_new..])?;
        // hold back a trailing partial UTF-8 sequence until it completes
        let stable = text.trim_end_matches('\u{FFFD}');
        if let Some(pos) = cfg
            .stop
            .iter()
            .filter_map(|s| stable.find(s.as_str()))
            .min()
        {
            if pos > emitted.len() {
                on_text(&stable[emitted.len()..pos]);
            }
            emitted = stable[..pos].to_string();
            break;
        }
        if stable.len() > emitted.len() && stable.starts_with(emitted.as_str()) {
            on_text(&stable[emitted.len()..]);
            emitted = stable.to_string();
        }
        if new >= limit || eos.contains(&next) {
            break;
        }
        logits = step(next)?;
    }
    Ok(GenerateStats {
        prompt_tokens: prefill.prompt_tokens,
        new_tokens: ids.len() - first_new,
        prefill_s: prefill.prefill_s,
        decode_s: t0.elapsed().as_secs_f64(),
        ids,
        text: emitted,
        top_logits,
    })
}

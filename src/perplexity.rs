//! Perplexity as llama.cpp's `llama-perplexity` measures it, so the two compare number for
//! number: the text's tokens (with the tokenizer's BOS) cut into chunks of `ctx` tokens,
//! each chunk's first token replaced by BOS when the tokenizer adds one, and only the
//! second half of each chunk scored (every scored token sees at least `ctx/2` tokens of
//! context): `PPL = exp(mean NLL)` over the scored tokens.

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result};
use crate::model::Model;

/// The result so far.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Perplexity {
    /// Chunks evaluated.
    pub chunks: usize,
    /// Tokens scored.
    pub scored: usize,
    /// Sum of their negative log-likelihoods (nats).
    pub nll: f64,
    /// Over the routed (Mixture-of-Depths) blocks: the token visits they processed, of
    /// all token visits (0 of 0 for a model without routed blocks).
    pub routed: (usize, usize),
}

impl Perplexity {
    pub fn value(&self) -> f64 {
        (self.nll / self.scored.max(1) as f64).exp()
    }
}

/// A held-out text to score models on: its tokens, the tokenizer's BOS (what an empty text
/// encodes to, if anything) and how it is cut.
#[derive(Debug, Clone)]
pub struct HeldOut {
    pub tokens: Vec<u32>,
    pub bos: Option<u32>,
    /// Tokens per chunk.
    pub ctx: usize,
    /// At most this many chunks (default: all the text holds).
    pub chunks: Option<usize>,
}

impl HeldOut {
    /// The text of `path` through `tok`, cut into chunks of `ctx`; an error naming the file
    /// when it cannot be read or does not fill one chunk.
    pub fn read(
        path: &std::path::Path,
        tok: &crate::Tokenizer,
        ctx: usize,
        chunks: Option<usize>,
    ) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let tokens = tok.encode(&text)?;
        if tokens.len() < ctx {
            return Err(Error::Data(format!(
                "{}: {} tokens do not fill one chunk of {ctx}",
                path.display(),
                tokens.len()
            )));
        }
        Ok(Self {
            tokens,
            bos: tok.encode("")?.first().copied(),
            ctx,
            chunks,
        })
    }

    /// The chunks that will be scored.
    pub fn n_chunks(&self) -> usize {
        let all = self.tokens.len() / self.ctx.max(1);
        self.chunks.map_or(all, |c| c.min(all))
    }

    /// [`perplexity`] of `model` on this text.
    pub fn score(
        &self,
        model: &Model,
        on_chunk: &mut dyn FnMut(&Perplexity),
    ) -> Result<Perplexity> {
        perplexity(
            model,
            &self.tokens,
            self.ctx,
            self.bos,
            self.chunks,
            on_chunk,
        )
    }
}

/// The perplexity of `model` on `tokens` in chunks of `ctx`, at most `max_chunks` of them;
/// `bos` replaces each chunk's first token. `on_chunk` sees the running result after
/// each chunk.
pub fn perplexity(
    model: &Model,
    tokens: &[u32],
    ctx: usize,
    bos: Option<u32>,
    max_chunks: Option<usize>,
    on_chunk: &mut dyn FnMut(&Perplexity),
) -> Result<Perplexity> {
    if ctx < 4 || ctx > model.config.max_seq_len {
        return Err(Error::Data(format!(
            "a chunk of {ctx} tokens: it must be at least 4 and at most the model's context of {}",
            model.config.max_seq_len
        )));
    }
    let available = tokens.len() / ctx;
    let n = max_chunks.map_or(available, |m| m.min(available));
    if n == 0 {
        return Err(Error::Data(format!(
            "{} tokens do not fill one chunk of {ctx}",
            tokens.len()
        )));
    }
    let first = ctx / 2;
    let mut r = Perplexity {
        chunks: 0,
        scored: 0,
        nll: 0.0,
        routed: (0, 0),
    };
    let _warm = crate::generate::warm::KeepWarm::start();
    for c in 0..n {
        let mut chunk = tokens[c * ctx..(c + 1) * ctx].to_vec();
        if let Some(b) = bos {
            chunk[0] = b;
        }
        let ids = Tensor::new(chunk.as_slice(), model.device())?.unsqueeze(0)?;
        // routed (Mixture-of-Depths) blocks decide causally, token by token, as when
        // sampling: a training-time top-k would look at the tokens to come
        let opts = crate::model::ForwardOptions {
            depth: Some(crate::routing::DepthDecision::Threshold),
            ..Default::default()
        };
        let out = model.forward_with(&ids, None, opts)?;
        for d in &out.depth {
            r.routed.0 += d.selected;
            r.routed.1 += d.tokens;
        }
        let logits = out.logits.squeeze(0)?;
        // positions first..ctx-1 predict the tokens after them
        let scored = ctx - 1 - first;
        let logits = logits.narrow(0, first, scored)?.to_dtype(DType::F32)?;
        let log_p = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let targets = Tensor::new(&chunk[first + 1..], model.device())?.unsqueeze(1)?;
        let picked: Vec<f32> = log_p.gather(&targets, 1)?.flatten_all()?.to_vec1()?;
        r.nll -= picked.iter().map(|&v| v as f64).sum::<f64>();
        r.scored += scored;
        r.chunks += 1;
        on_chunk(&r);
    }
    Ok(r)
}

//! The cache of a whole model for incremental decoding: one [`KvCache`] per layer, the next
//! position, and what a restart needs.

use candle_core::{DType, Result, Tensor};

pub use crate::nn::kv_cache::KvCache;

/// The cache of a whole model: one [`KvCache`] per layer plus the next position. The
/// position is kept on its own: a routed (Mixture-of-Depths) layer holds only the tokens it
/// processed, so no layer's length is the sequence length.
#[derive(Debug, Clone)]
pub struct Cache {
    pub layers: Vec<KvCache>,
    pos: usize,
    /// The token ids fed so far, kept only by models that may recompute their cache
    /// (LongRoPE's switch to its long factors).
    fed: Vec<Tensor>,
}

impl Cache {
    /// An empty cache of `n_layers` layers, keys and values held in `dtype` (`None`: in
    /// the type they are computed in).
    pub fn new(n_layers: usize, dtype: Option<DType>) -> Self {
        Self {
            layers: vec![KvCache::with_dtype(dtype); n_layers],
            pos: 0,
            fed: Vec::new(),
        }
    }

    /// Keep `ids: (b, t)` as fed.
    pub fn feed(&mut self, ids: &Tensor) {
        self.fed.push(ids.clone());
    }

    /// Every id fed so far, `(b, pos)`.
    pub fn fed(&self) -> Result<Tensor> {
        Tensor::cat(&self.fed, 1)
    }

    /// Whether an encoder's output was set (an encoder-decoder's decoder may run).
    pub fn has_source(&self) -> bool {
        self.layers.iter().any(|l| l.cross().is_some())
    }

    /// Position of the next token to be fed.
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Go back to position `len` (forget the later tokens), when every layer holds every
    /// position: false, and nothing changed, for a routed (Mixture-of-Depths) model, whose
    /// layers hold only the tokens they processed, or one that keeps its fed ids.
    pub fn truncate(&mut self, len: usize) -> bool {
        if len >= self.pos {
            return len == self.pos;
        }
        if !self.fed.is_empty() || self.layers.iter().any(|l| l.len() != self.pos) {
            return false;
        }
        for l in &mut self.layers {
            l.truncate(len);
        }
        self.pos = len;
        true
    }

    /// A batched cache's sequences as caches of their own, sequence `i` at position
    /// `lens[i]` (right-padded prompts forget their padding). Only for a cache whose
    /// layers hold every position and that keeps no fed ids.
    pub fn split(&self, lens: &[usize]) -> Result<Vec<Cache>> {
        if !self.fed.is_empty() || self.layers.iter().any(|l| l.len() != self.pos) {
            candle_core::bail!("a cache whose layers skip positions cannot be split");
        }
        let mut out: Vec<Cache> = lens
            .iter()
            .map(|&len| Cache {
                layers: Vec::with_capacity(self.layers.len()),
                pos: len.min(self.pos),
                fed: Vec::new(),
            })
            .collect();
        for layer in &self.layers {
            for (c, l) in out.iter_mut().zip(layer.split(lens)?) {
                c.layers.push(l);
            }
        }
        Ok(out)
    }

    /// Make room in every layer for `positions` positions in all ([`KvCache::reserve`]).
    pub fn reserve(&mut self, positions: usize) -> Result<()> {
        self.layers
            .iter_mut()
            .try_for_each(|l| l.reserve(positions))
    }

    /// Record that `n` more tokens went through the model.
    pub fn advance(&mut self, n: usize) {
        self.pos += n;
    }
}

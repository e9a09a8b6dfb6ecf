//! Key/value cache for incremental decoding. Each layer keeps preallocated
//! `(b, capacity, h_kv, d)` buffers (the projections' layout) written in place, so steady-state decoding does not
//! reallocate; capacity doubles when a sequence outgrows it.

use candle_core::{Result, Tensor};

#[derive(Debug, Clone, Default)]
pub struct KvCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
}

impl KvCache {
    /// Number of positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Append `k, v: (b, t, h_kv, d)` and return views `(b, len, h_kv, d)` of everything held.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, t, h, d) = k.dims4()?;
        let dv = v.dim(3)?;
        let need = self.len + t;
        let cap = self.k.as_ref().map(|k| k.dim(1)).transpose()?.unwrap_or(0);
        if need > cap {
            let new_cap = need.max(2 * cap).max(16);
            let grow = |old: &Option<Tensor>, d: usize| -> Result<Tensor> {
                let buf = Tensor::zeros((b, new_cap, h, d), k.dtype(), k.device())?;
                if let Some(old) = old {
                    buf.slice_set(&old.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                }
                Ok(buf)
            };
            self.k = Some(grow(&self.k, d)?);
            self.v = Some(grow(&self.v, dv)?);
        }
        let (kb, vb) = match (&self.k, &self.v) {
            (Some(kb), Some(vb)) => (kb, vb),
            _ => candle_core::bail!("kv cache: buffers missing"),
        };
        kb.slice_set(&k.contiguous()?, 1, self.len)?;
        vb.slice_set(&v.contiguous()?, 1, self.len)?;
        self.len = need;
        Ok((kb.narrow(1, 0, need)?, vb.narrow(1, 0, need)?))
    }
}

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
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: vec![KvCache::default(); n_layers],
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

    /// Position of the next token to be fed.
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Record that `n` more tokens went through the model.
    pub fn advance(&mut self, n: usize) {
        self.pos += n;
    }
}

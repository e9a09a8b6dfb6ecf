//! Key/value cache for incremental decoding. Each layer keeps preallocated
//! `(b, h_kv, capacity, d)` buffers written in place, so steady-state decoding does not
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

    /// Append `k, v: (b, h_kv, t, d)` and return views of everything held so far.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, h, t, d) = k.dims4()?;
        let need = self.len + t;
        let cap = self.k.as_ref().map(|k| k.dim(2)).transpose()?.unwrap_or(0);
        if need > cap {
            let new_cap = need.max(2 * cap).max(16);
            let grow = |old: &Option<Tensor>| -> Result<Tensor> {
                let buf = Tensor::zeros((b, h, new_cap, d), k.dtype(), k.device())?;
                if let Some(old) = old {
                    buf.slice_set(&old.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                }
                Ok(buf)
            };
            self.k = Some(grow(&self.k)?);
            self.v = Some(grow(&self.v)?);
        }
        let (kb, vb) = match (&self.k, &self.v) {
            (Some(kb), Some(vb)) => (kb, vb),
            _ => candle_core::bail!("kv cache: buffers missing"),
        };
        kb.slice_set(k, 2, self.len)?;
        vb.slice_set(v, 2, self.len)?;
        self.len = need;
        Ok((kb.narrow(2, 0, need)?, vb.narrow(2, 0, need)?))
    }
}

/// The cache of a whole model: one [`KvCache`] per layer plus the next position.
#[derive(Debug, Clone)]
pub struct Cache {
    pub layers: Vec<KvCache>,
}

impl Cache {
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: vec![KvCache::default(); n_layers],
        }
    }

    /// Position of the next token to be fed.
    pub fn pos(&self) -> usize {
        self.layers.first().map_or(0, |l| l.len())
    }
}

//! One attention layer's key/value cache for incremental decoding: preallocated
//! `(b, h_kv, capacity, d)` buffers written in place, so steady-state decoding does not
//! reallocate; capacity doubles when a sequence outgrows it. Head-major: a key-value head's
//! rows follow each other, so decoding attention streams each head's keys and values from
//! one block (position-major, a head's 256 bytes of every 1 KB row read at a third of the
//! rate). Appends and reads take and give `(b, t, h_kv, d)`, the projections' layout, as
//! views.
//! Latent attention keeps one buffer of latent rows instead of keys and values; a decoder
//! layer of an encoder-decoder also keeps its cross-attention keys and values.
//!
//! Keys and values may be held in a narrower type than they are computed in (f16, as
//! llama.cpp keeps its cache): half the memory a token costs and half the bytes every later
//! step reads; attention converts them back to f32 as it reads them.

use candle_core::{DType, Result, Tensor};

/// One layer's cache: keys and values, or (latent attention) one latent row per token
/// from which both are read.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
    /// A decoder layer's cross-attention keys and values of the encoder output, computed
    /// once per source.
    cross: Option<(Tensor, Tensor)>,
    /// The type keys and values are held in; `None`: the type they come in.
    dtype: Option<DType>,
    /// Positions the first buffers are made for (a reservation made while empty).
    reserved: usize,
}

/// Write `x: (b, t, h, d)` at positions `len..len + t` of `buf` (`(b, h, capacity, d)`),
/// growing it (capacity doubles) when it is too short; a first buffer takes `reserved`
/// positions if more are needed than that. Returns the view `(b, len + t, h, d)` of
/// positions `0..len + t`.
fn write(buf: &mut Option<Tensor>, x: &Tensor, len: usize, reserved: usize) -> Result<Tensor> {
    let (b, t, h, d) = x.dims4()?;
    let need = len + t;
    let cap = buf.as_ref().map(|k| k.dim(2)).transpose()?.unwrap_or(0);
    if need > cap {
        let first = if cap == 0 { reserved } else { 0 };
        let cap = need.max(2 * cap).max(first).max(16);
        grow(buf, (b, h, d), x, cap, len)?;
    }
    let Some(buf) = buf.as_ref() else {
        candle_core::bail!("kv cache: buffer missing")
    };
    buf.slice_set(&x.transpose(1, 2)?.contiguous()?, 2, len)?;
    buf.narrow(2, 0, need)?.transpose(1, 2)
}

/// Replace `buf` with a `(b, h, cap, d)` buffer typed and placed as `like`, holding `buf`'s
/// first `len` positions.
fn grow(
    buf: &mut Option<Tensor>,
    (b, h, d): (usize, usize, usize),
    like: &Tensor,
    cap: usize,
    len: usize,
) -> Result<()> {
    let grown = Tensor::zeros((b, h, cap, d), like.dtype(), like.device())?;
    if let Some(old) = buf.as_ref() {
        if len > 0 {
            grown.slice_set(&old.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
        }
    }
    *buf = Some(grown);
    Ok(())
}

impl KvCache {
    /// An empty cache holding keys and values in `dtype` (`None`: as they come).
    pub fn with_dtype(dtype: Option<DType>) -> Self {
        Self {
            dtype,
            ..Self::default()
        }
    }

    /// Number of positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Append `k, v: (b, t, h_kv, d)` and return views `(b, len, h_kv, d)` of everything held.
    /// In the cache's type, when it has one.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let held = |x: &Tensor| match self.dtype {
            Some(d) if d != x.dtype() => x.to_dtype(d),
            _ => Ok(x.clone()),
        };
        let (k, v) = (held(k)?, held(v)?);
        let kv = (
            write(&mut self.k, &k, self.len, self.reserved)?,
            write(&mut self.v, &v, self.len, self.reserved)?,
        );
        self.len += k.dim(1)?;
        Ok(kv)
    }

    /// Append latent rows `(b, t, 1, d)` (latent attention: each token's compressed key and
    /// value and its rotary key part) and return the view `(b, len, 1, d)` of every row held.
    pub fn append_latent(&mut self, rows: &Tensor) -> Result<Tensor> {
        let all = write(&mut self.k, rows, self.len, self.reserved)?;
        self.len += rows.dim(1)?;
        Ok(all)
    }

    /// Make room for `positions` positions in all (keeping those held), so that appends up
    /// to there neither reallocate nor copy: a server that knows a request's prompt and
    /// token limit allocates its cache once instead of doubling it several times (each
    /// doubling copies the cache, and the allocator keeps the buffers it leaves). An empty
    /// cache makes its first buffers that long.
    pub fn reserve(&mut self, positions: usize) -> Result<()> {
        self.reserved = self.reserved.max(positions);
        for buf in [&mut self.k, &mut self.v] {
            let Some(old) = buf.clone() else { continue };
            let (b, h, cap, d) = old.dims4()?;
            if cap < positions {
                grow(buf, (b, h, d), &old, positions, self.len)?;
            }
        }
        Ok(())
    }

    /// Forget every position from `len` on (the buffers stay; later appends overwrite).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// A batched cache's sequences as caches of their own: sequence `i` keeps its first
    /// `lens[i]` positions, copied out of the shared buffers (each a buffer of its own,
    /// exactly that long).
    pub fn split(&self, lens: &[usize]) -> Result<Vec<KvCache>> {
        let part = |buf: &Option<Tensor>, i: usize, len: usize| -> Result<Option<Tensor>> {
            buf.as_ref()
                .map(|t| t.narrow(0, i, 1)?.narrow(2, 0, len)?.force_contiguous())
                .transpose()
        };
        lens.iter()
            .enumerate()
            .map(|(i, &len)| {
                let len = len.min(self.len);
                Ok(KvCache {
                    k: part(&self.k, i, len)?,
                    v: part(&self.v, i, len)?,
                    len,
                    cross: None,
                    dtype: self.dtype,
                    reserved: 0,
                })
            })
            .collect()
    }

    /// Keep the cross-attention keys and values of a source.
    pub fn set_cross(&mut self, k: Tensor, v: Tensor) {
        self.cross = Some((k, v));
    }

    /// The cross-attention keys and values, once a source was set.
    pub fn cross(&self) -> Option<(&Tensor, &Tensor)> {
        self.cross.as_ref().map(|(k, v)| (k, v))
    }

    /// Bytes held per position of one sequence (what the cache costs per token).
    pub fn bytes_per_token(&self) -> usize {
        [&self.k, &self.v]
            .into_iter()
            .flatten()
            .map(|t| t.dim(1).unwrap_or(0) * t.dim(3).unwrap_or(0) * t.dtype().size_in_bytes())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn rows(t: usize, seed: f32) -> Tensor {
        let v: Vec<f32> = (0..t * 2 * 4).map(|i| seed + i as f32).collect();
        Tensor::from_vec(v, (1, t, 2, 4), &Device::Cpu).unwrap()
    }

    fn cap(c: &KvCache) -> usize {
        c.k.as_ref().unwrap().dim(2).unwrap()
    }

    /// Append `steps` one-position rows to both caches: `reserved` returns the same keys
    /// and values as `plain` after every step, and keeps its capacity of `cap` positions.
    fn append_alike(reserved: &mut KvCache, plain: &mut KvCache, steps: usize, cap: usize) {
        for step in 0..steps {
            let (k, v) = (rows(1, step as f32), rows(1, 50.0 + step as f32));
            let (kr, vr) = reserved.append(&k, &v).unwrap();
            let (kp, vp) = plain.append(&k, &v).unwrap();
            for (x, y) in [(kr, kp), (vr, vp)] {
                let d = (x - y).unwrap().abs().unwrap().max_all().unwrap();
                assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0, "step {step}");
            }
            assert_eq!(
                self::cap(reserved),
                cap,
                "step {step}: the reserved cache regrew"
            );
        }
    }

    /// The views appends return are `(b, len, h_kv, d)` over head-major buffers: a head's
    /// rows follow each other (row stride `d`, head stride the capacity's `cap · d`), and
    /// they hold what was appended, position by position.
    #[test]
    fn views_are_head_major_and_hold_the_appended_rows() {
        let mut c = KvCache::default();
        c.append(&rows(3, 0.0), &rows(3, 100.0)).unwrap();
        let (k, v) = c.append(&rows(2, 10.0), &rows(2, 110.0)).unwrap();
        assert_eq!(k.dims(), &[1, 5, 2, 4]);
        assert_eq!(k.stride()[1..], [4, cap(&c) * 4, 1]);
        let want = |a: f32, b: f32| Tensor::cat(&[rows(3, a), rows(2, b)], 1).unwrap();
        for (got, want) in [(k, want(0.0, 10.0)), (v, want(100.0, 110.0))] {
            let d = (got - want).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
        }
    }

    /// A reserved cache holds what it held, takes appends up to its reservation without
    /// reallocating, and holds what an unreserved cache holds; so does a cache reserved
    /// while empty.
    #[test]
    fn reserve_keeps_the_rows_and_stops_regrowing() {
        let (mut a, mut b) = (KvCache::default(), KvCache::default());
        for c in [&mut a, &mut b] {
            c.append(&rows(3, 0.0), &rows(3, 100.0)).unwrap();
        }
        a.reserve(40).unwrap();
        assert_eq!(cap(&a), 40);
        append_alike(&mut a, &mut b, 37, 40);
        assert!(cap(&b) >= 40);
        // a reservation below the capacity changes nothing
        a.reserve(10).unwrap();
        assert_eq!(cap(&a), 40);
        // an empty cache's first buffers take the reservation
        let (mut e, mut f) = (KvCache::default(), KvCache::default());
        e.reserve(40).unwrap();
        append_alike(&mut e, &mut f, 40, 40);
    }
}

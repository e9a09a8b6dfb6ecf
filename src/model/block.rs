//! One transformer block. Sequential (pre-norm): `x = x + attn(norm(x))`, then
//! `x = x + ffn(norm(x))`; parallel: `x = x + attn(n1(x)) + ffn(n2(x))`. Sandwich norms, when
//! present, normalise each sub-block's output before it is added to the residual. A decoder
//! block of an encoder-decoder adds `x = x + cross_attn(norm(x), source)` between the two.

use candle_core::{Result, Tensor};

use crate::config::{BlockKind, DepthSkip};
use crate::nn::{Attention, KvCache, Mlp, Norm, Positions, RopeTables};
use crate::routing::{dispatch, DepthChoice, MoeLayer, MoeStats, Routing};

/// The feed-forward sub-block: one dense FFN or a Mixture of Experts.
#[derive(Debug, Clone)]
pub enum Ffn {
    Dense(Mlp),
    Moe(Box<MoeLayer>),
}

impl Ffn {
    fn linears_mut(&mut self) -> Vec<&mut crate::nn::Linear> {
        match self {
            Ffn::Dense(m) => m.linears_mut(),
            Ffn::Moe(m) => m.linears_mut(),
        }
    }

    fn forward(&self, x: &Tensor, stats: &mut Option<MoeStats>, aux: bool) -> Result<Tensor> {
        match self {
            Ffn::Dense(m) => m.forward(x),
            Ffn::Moe(m) => {
                let (y, s) = m.forward_with(x, aux)?;
                *stats = Some(s);
                Ok(y)
            }
        }
    }
}

/// The rows of a block's input (flat indices into its `b·t` rows) that go through its
/// feed-forward, and the factor on each one's update (a routed block that skips its
/// feed-forward for the other tokens).
pub struct FfnRows {
    pub rows: Tensor,
    pub scale: Tensor,
}

#[derive(Debug, Clone)]
pub struct Block {
    pub kind: BlockKind,
    pub attn_norm: Norm,
    pub attn: Attention,
    /// Pre-FFN norm (absent when the block shares `attn_norm`).
    pub ffn_norm: Option<Norm>,
    pub ffn: Ffn,
    /// Sandwich norms on the sub-block outputs.
    pub attn_out_norm: Option<Norm>,
    pub ffn_out_norm: Option<Norm>,
    /// Attention to an encoder's output (a decoder block of an encoder-decoder), with its
    /// pre-norm; its keys and values live in the layer's cache.
    pub cross: Option<(Norm, Attention)>,
}

/// A decoder block's cross-attention keys and values, held in its cache.
fn cross_kv(cache: Option<&KvCache>) -> Option<(Tensor, Tensor)> {
    cache
        .and_then(|c| c.cross())
        .map(|(k, v)| (k.clone(), v.clone()))
}

fn maybe(norm: &Option<Norm>, x: Tensor) -> Result<Tensor> {
    match norm {
        Some(n) => n.forward(&x),
        None => Ok(x),
    }
}

impl Block {
    /// Its projections: attention, then feed-forward.
    pub fn linears_mut(&mut self) -> Vec<&mut crate::nn::Linear> {
        let mut v = self.attn.linears_mut();
        if let Some((_, c)) = &mut self.cross {
            v.extend(c.linears_mut());
        }
        v.extend(self.ffn.linears_mut());
        v
    }

    /// The block's output, and its router's statistics when the FFN is a Mixture of Experts.
    pub fn forward(
        &self,
        x: &Tensor,
        pos: Positions,
        cache: Option<&mut KvCache>,
    ) -> Result<(Tensor, Option<MoeStats>)> {
        // decoding through a cache trains nothing: no auxiliary router losses
        let aux = cache.is_none();
        let cross = cross_kv(cache.as_deref());
        self.forward_parts(
            x,
            move |h| self.attn_update(h, pos, cache),
            cross,
            aux,
            None,
        )
    }

    /// The attention sub-block's update: attention on the normalised input `h`, then the
    /// sandwich norm when the block has one.
    fn attn_update(
        &self,
        h: &Tensor,
        pos: Positions,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        maybe(&self.attn_out_norm, self.attn.forward(h, pos, cache)?)
    }

    /// One new token of each of `b` sequences, `x: (b, 1, d)`, each with its own cache and
    /// position (`rope`: `(b, 1, half)` tables): [`Attention::forward_decode`], then the
    /// feed-forward on all `b` rows at once. `attn_rows`: the attention runs on those rows
    /// alone (`rope` and `caches` are theirs), each update scaled, the others skip it;
    /// `ffn_rows`: the same for the feed-forward.
    pub fn forward_decode(
        &self,
        x: &Tensor,
        rope: Option<(&Tensor, &Tensor)>,
        caches: &mut [&mut KvCache],
        attn_rows: Option<&FfnRows>,
        ffn_rows: Option<&FfnRows>,
    ) -> Result<(Tensor, Option<MoeStats>)> {
        self.forward_parts(
            x,
            |h| {
                let Some(sel) = attn_rows else {
                    return maybe(
                        &self.attn_out_norm,
                        self.attn.forward_decode(h, rope, caches)?,
                    );
                };
                let k = sel.rows.dim(0)?;
                if k == 0 {
                    return h.zeros_like();
                }
                let hs = h.index_select(&sel.rows, 0)?;
                let a = maybe(
                    &self.attn_out_norm,
                    self.attn.forward_decode(&hs, rope, caches)?,
                )?;
                let a = a.broadcast_mul(&sel.scale.reshape((k, 1, 1))?.to_dtype(a.dtype())?)?;
                h.zeros_like()?.index_add(&sel.rows, &a, 0)
            },
            None,
            false,
            ffn_rows,
        )
    }

    /// `base + ffn(u)` (with the sandwich norm on the update), the feed-forward on the rows
    /// `rows` names alone when given (the others keep `base`), each update scaled.
    fn add_ffn(
        &self,
        base: Tensor,
        u: &Tensor,
        rows: Option<&FfnRows>,
        stats: &mut Option<MoeStats>,
        aux: bool,
    ) -> Result<Tensor> {
        let Some(sel) = rows else {
            let f = maybe(&self.ffn_out_norm, self.ffn.forward(u, stats, aux)?)?;
            return base + f;
        };
        let (b, t, d) = u.dims3()?;
        let k = sel.rows.dim(0)?;
        if k == 0 {
            return Ok(base);
        }
        let us = u.reshape((b * t, d))?.index_select(&sel.rows, 0)?;
        let f = self.ffn.forward(&us.reshape((1, k, d))?, stats, aux)?;
        let f = maybe(&self.ffn_out_norm, f)?.reshape((k, d))?;
        let f = f.broadcast_mul(&sel.scale.reshape((k, 1))?.to_dtype(f.dtype())?)?;
        base.reshape((b * t, d))?
            .index_add(&sel.rows, &f, 0)?
            .reshape((b, t, d))
    }

    /// The block around its self-attention update `attn` (called on the normalised input,
    /// sandwich norm included), with the cross-attention keys and values of a decoder
    /// block.
    fn forward_parts(
        &self,
        x: &Tensor,
        attn: impl FnOnce(&Tensor) -> Result<Tensor>,
        cross: Option<(Tensor, Tensor)>,
        aux: bool,
        ffn_rows: Option<&FfnRows>,
    ) -> Result<(Tensor, Option<MoeStats>)> {
        let mut stats = None;
        let h = self.attn_norm.forward(x)?;
        let a = attn(&h)?;
        let y = match (self.kind, &self.ffn_norm) {
            (BlockKind::Sequential, Some(n)) => {
                let mut x = (x + a)?;
                if let Some((norm, attn)) = &self.cross {
                    let Some((k, v)) = &cross else {
                        candle_core::bail!("cross-attention needs the encoder output in the cache")
                    };
                    x = (&x + attn.cross(&norm.forward(&x)?, k, v)?)?;
                }
                let u = n.forward(&x)?;
                self.add_ffn(x, &u, ffn_rows, &mut stats, aux)?
            }
            (BlockKind::Parallel, Some(n)) => {
                let u = n.forward(x)?;
                self.add_ffn((x + a)?, &u, ffn_rows, &mut stats, aux)?
            }
            (BlockKind::ParallelSharedNorm, _) => {
                self.add_ffn((x + a)?, &h, ffn_rows, &mut stats, aux)?
            }
            (kind, None) => candle_core::bail!("{kind:?} block needs a pre-FFN norm"),
        };
        Ok((y, stats))
    }
}

impl Block {
    /// A Mixture-of-Depths block on the tokens its router chose (Raposo et al., 2024):
    /// the chosen rows of `x: (b, t, d)` run through the block as sequences of their own,
    /// at their original positions (`start + i`, for the rotary tables and the causal
    /// order), and `σ(r)·(block(x) − x)` is added back to them ([`dispatch()`]); the other
    /// tokens pass unchanged. Sequences that chose different numbers of tokens run one by
    /// one. Every token chosen: the plain block.
    pub fn forward_routed(
        &self,
        x: &Tensor,
        choice: &DepthChoice,
        rope: Option<&RopeTables>,
        start: usize,
        cache: Option<&mut KvCache>,
    ) -> Result<(Tensor, Option<MoeStats>)> {
        let (b, t, d) = x.dims3()?;
        if cache.is_some() && b > 1 {
            // each sequence keeps a different number of tokens in a routed block's cache
            candle_core::bail!("Mixture-of-Depths decoding through a KV cache takes one sequence at a time (got {b})")
        }
        if choice.all {
            let range = rope.map(|r| r.range(start, t)).transpose()?;
            let pos = Positions {
                rope: range.as_ref().map(|(c, s)| (c, s)),
                bias: None,
            };
            return self.forward(x, pos, cache);
        }
        if choice.skip == DepthSkip::Mlp {
            // every token through the attention (and into the cache), the chosen ones
            // through the feed-forward too
            let range = rope.map(|r| r.range(start, t)).transpose()?;
            let pos = Positions {
                rope: range.as_ref().map(|(c, s)| (c, s)),
                bias: None,
            };
            let flat: Vec<u32> = choice
                .rows
                .iter()
                .enumerate()
                .flat_map(|(bi, r)| r.iter().map(move |&i| (bi * t) as u32 + i))
                .collect();
            let rows = Tensor::new(flat.as_slice(), x.device())?;
            let logits = choice.logits.flatten_all()?.index_select(&rows, 0)?;
            let sel = FfnRows {
                scale: crate::routing::update_scale(&logits, choice.scale)?,
                rows,
            };
            let aux = cache.is_none();
            let cross = cross_kv(cache.as_deref());
            return self.forward_parts(
                x,
                move |h| self.attn_update(h, pos, cache),
                cross,
                aux,
                Some(&sel),
            );
        }
        if choice.skip == DepthSkip::Attention {
            // the chosen tokens through the attention (at their positions, attending to one
            // another, into the cache), every token through the feed-forward
            let aux = cache.is_none();
            let cross = cross_kv(cache.as_deref());
            return self.forward_parts(
                x,
                move |h| match on_chosen_rows(h, choice, rope, start, cache, |hs, pos, c| {
                    self.attn_update(hs, pos, c)
                })? {
                    Some(a) => a.reshape((b, t, d)),
                    None => h.zeros_like(),
                },
                cross,
                aux,
                None,
            );
        }
        let mut stats: Option<MoeStats> = None;
        let delta = on_chosen_rows(x, choice, rope, start, cache, |x_sel, pos, c| {
            let (y, moe) = self.forward(x_sel, pos, c)?;
            // every group's router statistics, as one layer's
            stats = match (stats.take(), moe) {
                (Some(a), Some(b)) => Some(a.merge(b)?),
                (a, b) => a.or(b),
            };
            y - x_sel
        })?;
        let out = match delta {
            Some(delta) => (x.reshape((b * t, d))? + delta)?.reshape((b, t, d))?,
            None => x.clone(),
        };
        Ok((out, stats))
    }
}

/// `Σ σ(r)·f(rows)`: the rows of `x: (b, t, d)` that `choice` chose, run through `f` as
/// sequences of their own at their original positions (`start + i`, for the rotary tables
/// and the causal order), each output row scaled by its update factor and scattered into
/// `(b·t, d)` zero rows; `None` when no row was chosen. Sequences that chose different
/// numbers of tokens run one by one.
fn on_chosen_rows(
    x: &Tensor,
    choice: &DepthChoice,
    rope: Option<&RopeTables>,
    start: usize,
    mut cache: Option<&mut KvCache>,
    mut f: impl FnMut(&Tensor, Positions, Option<&mut KvCache>) -> Result<Tensor>,
) -> Result<Option<Tensor>> {
    let (b, t, d) = x.dims3()?;
    let rows = &choice.rows;
    let groups: Vec<Vec<usize>> = if rows.iter().all(|r| r.len() == rows[0].len()) {
        vec![(0..b).collect()]
    } else {
        (0..b).map(|i| vec![i]).collect()
    };
    let xs = x.reshape((b * t, d))?;
    let gates = crate::routing::update_scale(&choice.logits.flatten_all()?, choice.scale)?;
    let mut total: Option<Tensor> = None;
    for group in groups {
        let kk = rows[group[0]].len();
        if kk == 0 {
            continue;
        }
        let flat: Vec<u32> = group
            .iter()
            .flat_map(|&bi| rows[bi].iter().map(move |&i| (bi * t) as u32 + i))
            .collect();
        let pos: Vec<u32> = group
            .iter()
            .flat_map(|&bi| rows[bi].iter().map(|&i| start as u32 + i))
            .collect();
        let n = group.len();
        let weights = gates.index_select(&Tensor::new(flat.as_slice(), x.device())?, 0)?;
        let routing = Routing {
            slots: vec![(0..flat.len() as u32).collect()],
            rows: vec![flat],
            weights,
        };
        let tables = match rope {
            Some(r) => Some(r.gather(&Tensor::from_vec(pos, (n, kk), x.device())?)?),
            None => None,
        };
        let cache = cache.as_deref_mut();
        let delta = dispatch(&xs, &routing, 1, |xg, _| {
            let x_sel = xg.reshape((n, kk, d))?;
            let pos = Positions {
                rope: tables.as_ref().map(|(c, s)| (c, s)),
                bias: None,
            };
            f(&x_sel, pos, cache)?.reshape((n * kk, d))
        })?;
        total = match (total, delta) {
            (Some(a), Some(b)) => Some((a + b)?),
            (a, b) => a.or(b),
        };
    }
    Ok(total)
}

//! One transformer block. Sequential (pre-norm): `x = x + attn(norm(x))`, then
//! `x = x + ffn(norm(x))`; parallel: `x = x + attn(n1(x)) + ffn(n2(x))`. Sandwich norms, when
//! present, normalise each sub-block's output before it is added to the residual. A decoder
//! block of an encoder-decoder adds `x = x + cross_attn(norm(x), source)` between the two.

use candle_core::{Result, Tensor};

use crate::config::BlockKind;
use crate::nn::{Attention, KvCache, Mlp, Norm, Positions};
use crate::routing::{MoeLayer, MoeStats};

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
        mut cache: Option<&mut KvCache>,
    ) -> Result<(Tensor, Option<MoeStats>)> {
        let mut stats = None;
        // decoding through a cache trains nothing: no auxiliary router losses
        let aux = cache.is_none();
        let h = self.attn_norm.forward(x)?;
        let a = maybe(
            &self.attn_out_norm,
            self.attn.forward(&h, pos, cache.as_deref_mut())?,
        )?;
        let y = match (self.kind, &self.ffn_norm) {
            (BlockKind::Sequential, Some(n)) => {
                let mut x = (x + a)?;
                if let Some((norm, attn)) = &self.cross {
                    let Some((k, v)) = cache.as_deref().and_then(|c| c.cross()) else {
                        candle_core::bail!("cross-attention needs the encoder output in the cache")
                    };
                    x = (&x + attn.cross(&norm.forward(&x)?, k, v)?)?;
                }
                let f = maybe(
                    &self.ffn_out_norm,
                    self.ffn.forward(&n.forward(&x)?, &mut stats, aux)?,
                )?;
                (x + f)?
            }
            (BlockKind::Parallel, Some(n)) => {
                (x + a + self.ffn.forward(&n.forward(x)?, &mut stats, aux)?)?
            }
            (BlockKind::ParallelSharedNorm, _) => {
                (x + a + self.ffn.forward(&h, &mut stats, aux)?)?
            }
            (kind, None) => candle_core::bail!("{kind:?} block needs a pre-FFN norm"),
        };
        Ok((y, stats))
    }
}

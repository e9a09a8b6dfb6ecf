//! One transformer block. Sequential (pre-norm): `x = x + attn(norm(x))`, then
//! `x = x + ffn(norm(x))`; parallel: `x = x + attn(n1(x)) + ffn(n2(x))`. Sandwich norms, when
//! present, normalise each sub-block's output before it is added to the residual.

use candle_core::{Result, Tensor};

use crate::config::BlockKind;
use crate::model::cache::KvCache;
use crate::nn::{Attention, Mlp, Norm};

#[derive(Debug, Clone)]
pub struct Block {
    pub kind: BlockKind,
    pub attn_norm: Norm,
    pub attn: Attention,
    /// Pre-FFN norm (absent when the block shares `attn_norm`).
    pub ffn_norm: Option<Norm>,
    pub ffn: Mlp,
    /// Sandwich norms on the sub-block outputs.
    pub attn_out_norm: Option<Norm>,
    pub ffn_out_norm: Option<Norm>,
}

fn maybe(norm: &Option<Norm>, x: Tensor) -> Result<Tensor> {
    match norm {
        Some(n) => n.forward(&x),
        None => Ok(x),
    }
}

impl Block {
    pub fn forward(
        &self,
        x: &Tensor,
        rope: Option<(&Tensor, &Tensor)>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let h = self.attn_norm.forward(x)?;
        let a = maybe(&self.attn_out_norm, self.attn.forward(&h, rope, cache)?)?;
        match (self.kind, &self.ffn_norm) {
            (BlockKind::Sequential, Some(n)) => {
                let x = (x + a)?;
                let f = maybe(&self.ffn_out_norm, self.ffn.forward(&n.forward(&x)?)?)?;
                x + f
            }
            (BlockKind::Parallel, Some(n)) => x + a + self.ffn.forward(&n.forward(x)?)?,
            (BlockKind::ParallelSharedNorm, _) => x + a + self.ffn.forward(&h)?,
            (kind, None) => candle_core::bail!("{kind:?} block needs a pre-FFN norm"),
        }
    }
}

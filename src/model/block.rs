//! One pre-norm transformer block: `x = x + attn(norm(x))`, then `x = x + ffn(norm(x))`.

use candle_core::{Result, Tensor};

use crate::model::cache::KvCache;
use crate::nn::{Attention, Mlp, Norm};

#[derive(Debug, Clone)]
pub struct Block {
    pub attn_norm: Norm,
    pub attn: Attention,
    pub ffn_norm: Norm,
    pub ffn: Mlp,
}

impl Block {
    pub fn forward(
        &self,
        x: &Tensor,
        rope: Option<(&Tensor, &Tensor)>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let x = (x + self
            .attn
            .forward(&self.attn_norm.forward(x)?, rope, cache)?)?;
        &x + self.ffn.forward(&self.ffn_norm.forward(&x)?)?
    }
}

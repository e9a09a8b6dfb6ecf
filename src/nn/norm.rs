//! RMSNorm and LayerNorm behind one type; which one is a config option.

use candle_core::{Result, Tensor};

use super::ops;
use crate::config::NormKind;

#[derive(Debug, Clone)]
pub struct Norm {
    pub kind: NormKind,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub eps: f64,
}

impl Norm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.kind {
            NormKind::RmsNorm => ops::rms_norm(x, &self.weight, self.eps),
            NormKind::LayerNorm => ops::layer_norm(x, &self.weight, self.bias.as_ref(), self.eps),
        }
    }
}

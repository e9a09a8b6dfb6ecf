//! Feed-forward block: gated (`down(act(gate x) * up x)`) or plain (`down(act(up x))`).

use candle_core::{Result, Tensor};

use super::Linear;
use crate::config::FfnKind;

#[derive(Debug, Clone)]
pub struct Mlp {
    pub kind: FfnKind,
    pub gate: Option<Linear>,
    pub up: Linear,
    pub down: Linear,
}

impl Mlp {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = match (self.kind, &self.gate) {
            (FfnKind::Swiglu, Some(g)) => {
                let [g, u] = Linear::forward_many([g, &self.up], x)?;
                (g.silu()? * u)?
            }
            (FfnKind::Geglu, Some(g)) => {
                let [g, u] = Linear::forward_many([g, &self.up], x)?;
                (g.gelu()? * u)?
            }
            (FfnKind::Gelu, _) => self.up.forward(x)?.gelu()?,
            (FfnKind::GeluExact, _) => self.up.forward(x)?.gelu_erf()?,
            (FfnKind::Relu, _) => self.up.forward(x)?.relu()?,
            (kind, None) => candle_core::bail!("{kind:?} feed-forward needs a gate projection"),
        };
        self.down.forward(&h)
    }
}

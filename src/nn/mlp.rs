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
    /// Its projections.
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v: Vec<&mut Linear> = self.gate.iter_mut().collect();
        v.extend([&mut self.up, &mut self.down]);
        v
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(Self::forward_many(&[self], x)?.remove(0))
    }

    /// Several feed-forward blocks on the same input (a decoded token's experts): when
    /// decoding, the input projections of all of them run in one parallel region and the
    /// output projections in another.
    pub fn forward_many(mlps: &[&Mlp], x: &Tensor) -> Result<Vec<Tensor>> {
        let mut ins: Vec<&Linear> = Vec::new();
        for m in mlps {
            match (m.kind.is_gated(), &m.gate) {
                (true, Some(g)) => ins.extend([g, &m.up]),
                (true, None) => {
                    candle_core::bail!("{:?} feed-forward needs a gate projection", m.kind)
                }
                (false, _) => ins.push(&m.up),
            }
        }
        let mut ys = Linear::forward_pairs(&ins, &vec![x; ins.len()])?.into_iter();
        let mut hs = Vec::with_capacity(mlps.len());
        for m in mlps {
            let mut next = || {
                ys.next()
                    .ok_or_else(|| candle_core::Error::Msg("mlp".into()))
            };
            hs.push(match m.kind {
                FfnKind::Swiglu => super::ops::swiglu(&next()?, &next()?)?,
                FfnKind::Geglu => (next()?.gelu()? * next()?)?,
                FfnKind::Gelu => next()?.gelu()?,
                FfnKind::GeluExact => next()?.gelu_erf()?,
                FfnKind::Relu => next()?.relu()?,
            });
        }
        let downs: Vec<&Linear> = mlps.iter().map(|m| &m.down).collect();
        Linear::forward_pairs(&downs, &hs.iter().collect::<Vec<_>>())
    }
}

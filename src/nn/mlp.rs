//! Feed-forward block: gated (`down(act(gate x) * up x)`) or plain (`down(act(up x))`).

use candle_core::{Result, Tensor};

use super::grouped::grouped_swiglu;
use super::Linear;
use crate::config::FfnKind;

#[derive(Debug, Clone)]
pub struct Mlp {
    pub kind: FfnKind,
    pub gate: Option<Linear>,
    pub up: Linear,
    pub down: Linear,
    /// `[gate; up]` held stacked (training a SwiGLU block without biases): `gate` and `up`
    /// are views of it, and the fused SwiGLU op reads it directly.
    pub gate_up: Option<Tensor>,
}

impl Mlp {
    /// Its projections.
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v: Vec<&mut Linear> = self.gate.iter_mut().collect();
        v.extend([&mut self.up, &mut self.down]);
        v
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.fused(x)? {
            return Ok(y);
        }
        Ok(Self::forward_many(&[self], x)?.remove(0))
    }

    /// With `[gate; up]` stacked and more rows than a decode step: the whole SwiGLU block as
    /// one op (one group of [`grouped_swiglu`]), whose gate/up products and hidden
    /// activations are no graph nodes of their own. `None` when that does not apply.
    fn fused(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let Some(gate_up) = &self.gate_up else {
            return Ok(None);
        };
        let plain = |l: &Linear| l.bias.is_none() && l.stored.is_none() && l.lora.is_none();
        let d = x.dim(candle_core::D::Minus1)?;
        let rows = x.elem_count() / d.max(1);
        if self.kind != FfnKind::Swiglu
            || !self.gate.as_ref().is_some_and(plain)
            || !plain(&self.up)
            || !plain(&self.down)
            || rows <= super::matvec::MAX_ROWS
        {
            return Ok(None);
        }
        let y = grouped_swiglu(
            &x.reshape((rows, d))?,
            gate_up,
            &self.down.weight,
            &[0, rows],
            self.up.bf16,
        )?;
        Ok(Some(y.reshape(x.shape())?))
    }

    /// Several feed-forward blocks on the same input (a decoded token's experts): when
    /// decoding, the input projections of all of them run in one parallel region and the
    /// output projections in another.
    pub fn forward_many(mlps: &[&Mlp], x: &Tensor) -> Result<Vec<Tensor>> {
        Self::forward_each(mlps, &vec![x; mlps.len()])
    }

    /// `[m.forward(x) for (m, x) in zip(mlps, xs)]` (a decoding step's experts, each on its
    /// own tokens) in two parallel regions as [`Mlp::forward_many`].
    pub fn forward_each(mlps: &[&Mlp], xs: &[&Tensor]) -> Result<Vec<Tensor>> {
        let mut ins: Vec<&Linear> = Vec::new();
        let mut inputs: Vec<&Tensor> = Vec::new();
        for (m, &x) in mlps.iter().zip(xs) {
            match (m.kind.is_gated(), &m.gate) {
                (true, Some(g)) => {
                    ins.extend([g, &m.up]);
                    inputs.extend([x, x]);
                }
                (true, None) => {
                    candle_core::bail!("{:?} feed-forward needs a gate projection", m.kind)
                }
                (false, _) => {
                    ins.push(&m.up);
                    inputs.push(x);
                }
            }
        }
        let mut ys = Linear::forward_pairs(&ins, &inputs)?.into_iter();
        let mut hs = Vec::with_capacity(mlps.len());
        for m in mlps {
            let mut next = || {
                ys.next()
                    .ok_or_else(|| candle_core::Error::Msg("mlp".into()))
            };
            hs.push(match m.kind {
                FfnKind::Swiglu => super::ops::swiglu(&next()?, &next()?)?,
                FfnKind::Geglu => (super::ops::gelu(&next()?)? * next()?)?,
                FfnKind::Gelu => super::ops::gelu(&next()?)?,
                FfnKind::GeluExact => next()?.gelu_erf()?,
                FfnKind::Relu => next()?.relu()?,
            });
        }
        let downs: Vec<&Linear> = mlps.iter().map(|m| &m.down).collect();
        Linear::forward_pairs(&downs, &hs.iter().collect::<Vec<_>>())
    }
}

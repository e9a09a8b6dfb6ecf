//! Affine map `y = x W^T (+ b)` with `W: (out, in)`, the PyTorch/Hugging Face layout.

use candle_core::{Result, Tensor};

#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// Apply to `x: (.., in)`, giving `(.., out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let d_in = dims[dims.len() - 1];
        let rows = x.elem_count() / d_in.max(1);
        let out = self.weight.dim(0)?;
        let x2 = x.reshape((rows, d_in))?;
        // decoding: a few rows are bound by reading the weight once
        let y = match super::matvec::skinny_matmul(&x2, &self.weight)? {
            Some(y) => y,
            // (rows, in) @ (in, out): the transposed weight is a strided view, no copy
            None => x2.matmul(&self.weight.t()?)?,
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut shape = dims.to_vec();
        *shape.last_mut().unwrap_or(&mut 0) = out;
        y.reshape(shape)
    }

    /// Several maps of the same input, `[l.forward(x) for l in layers]`; when decoding, the
    /// products run in one parallel region.
    pub fn forward_many<const N: usize>(layers: [&Linear; N], x: &Tensor) -> Result<[Tensor; N]> {
        let dims = x.dims();
        let d_in = dims[dims.len() - 1];
        let rows = x.elem_count() / d_in.max(1);
        let ws = layers.map(|l| &l.weight);
        let Some(ys) = super::matvec::skinny_many(&x.reshape((rows, d_in))?, &ws)? else {
            let mut out = Vec::with_capacity(N);
            for l in layers {
                out.push(l.forward(x)?);
            }
            return into_array(out);
        };
        let mut out = Vec::with_capacity(N);
        for (y, l) in ys.into_iter().zip(layers) {
            let y = match &l.bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            };
            let mut shape = dims.to_vec();
            *shape.last_mut().unwrap_or(&mut 0) = l.weight.dim(0)?;
            out.push(y.reshape(shape)?);
        }
        into_array(out)
    }
}

fn into_array<const N: usize>(v: Vec<Tensor>) -> Result<[Tensor; N]> {
    v.try_into()
        .map_err(|_| candle_core::Error::Msg(format!("expected {N} outputs")))
}

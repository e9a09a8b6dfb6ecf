//! Affine map `y = x W^T (+ b)` with `W: (out, in)`, the PyTorch/Hugging Face layout.

use candle_core::{Result, Tensor, D};

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
        // decoding: a few rows are bound by reading the weight once (skinny path)
        let y = super::matvec::matmul_t(&x.reshape((rows, d_in))?, &self.weight)?;
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
        Self::forward_pairs(&layers, &[x; N])?
            .try_into()
            .map_err(|_| candle_core::Error::Msg(format!("expected {N} outputs")))
    }

    /// `[l.forward(x) for (l, x) in zip(layers, xs)]`, inputs with the same leading
    /// dimensions; when decoding, the products run in one parallel region.
    pub fn forward_pairs(layers: &[&Linear], xs: &[&Tensor]) -> Result<Vec<Tensor>> {
        let flat = |x: &Tensor| {
            let d_in = x.dim(D::Minus1)?;
            x.reshape((x.elem_count() / d_in.max(1), d_in))
        };
        let x2 = xs.iter().map(|x| flat(x)).collect::<Result<Vec<_>>>()?;
        let ws: Vec<&Tensor> = layers.iter().map(|l| &l.weight).collect();
        let Some(ys) = super::matvec::skinny_pairs(&x2.iter().collect::<Vec<_>>(), &ws)? else {
            return layers.iter().zip(xs).map(|(l, x)| l.forward(x)).collect();
        };
        ys.into_iter()
            .zip(layers.iter().zip(xs))
            .map(|(y, (l, x))| {
                let y = match &l.bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                };
                let mut shape = x.dims().to_vec();
                *shape.last_mut().unwrap_or(&mut 0) = l.weight.dim(0)?;
                y.reshape(shape)
            })
            .collect()
    }
}

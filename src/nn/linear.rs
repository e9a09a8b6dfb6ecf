//! Affine map `y = x W^T (+ b)` with `W: (out, in)`, the PyTorch/Hugging Face layout.

use candle_core::{Result, Tensor, D};

#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// Mixed precision: products of more than a few rows (and their gradients) with bf16
    /// operands and f32 sums, where the CPU has AVX512-BF16 ([`super::bf16`]).
    pub bf16: bool,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            bf16: false,
        }
    }

    /// Apply to `x: (.., in)`, giving `(.., out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x2 = flat_rows(x)?;
        // decoding: a few rows are bound by reading the weight once (skinny path)
        let y = match self.bf16 && x2.dim(0)? > super::matvec::MAX_ROWS {
            true => super::bf16::matmul_t(&x2, &self.weight)?,
            false => None,
        };
        let y = match y {
            Some(y) => y,
            None => super::matvec::matmul_t(&x2, &self.weight)?,
        };
        self.finish(y, x)
    }

    /// The bias added to the products `y: (rows, out)` of `x: (.., in)`, shaped `(.., out)`.
    fn finish(&self, y: Tensor, x: &Tensor) -> Result<Tensor> {
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut shape = x.dims().to_vec();
        *shape.last_mut().unwrap_or(&mut 0) = self.weight.dim(0)?;
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
        let x2 = xs
            .iter()
            .map(|x| flat_rows(x))
            .collect::<Result<Vec<_>>>()?;
        let ws: Vec<&Tensor> = layers.iter().map(|l| &l.weight).collect();
        let Some(ys) = super::matvec::skinny_pairs(&x2.iter().collect::<Vec<_>>(), &ws)? else {
            return layers.iter().zip(xs).map(|(l, x)| l.forward(x)).collect();
        };
        ys.into_iter()
            .zip(layers.iter().zip(xs))
            .map(|(y, (l, x))| l.finish(y, x))
            .collect()
    }
}

/// `x: (.., in)` as `(rows, in)`.
fn flat_rows(x: &Tensor) -> Result<Tensor> {
    let d_in = x.dim(D::Minus1)?;
    x.reshape((x.elem_count() / d_in.max(1), d_in))
}

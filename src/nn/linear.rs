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
        // (rows, in) @ (in, out): the transposed weight is a strided view, no copy
        let y = x.reshape((rows, d_in))?.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut shape = dims.to_vec();
        *shape.last_mut().unwrap_or(&mut 0) = out;
        y.reshape(shape)
    }
}

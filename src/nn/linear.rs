//! Affine map `y = x W^T (+ b)` with `W: (out, in)`, the PyTorch/Hugging Face layout.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, D};

use std::sync::Arc;

use super::bf16::{product, Strided};
use super::qmatmul::QMatrix;

#[derive(Debug, Clone)]
pub struct Linear {
    /// The weight; for a layer with [`Linear::stored`] weights, a stand-in of the right
    /// shape that holds no values (NaN, so a product with it could not pass unnoticed).
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// Mixed precision: products of more than a few rows (and their gradients) with bf16
    /// operands and f32 sums, where the CPU has AVX512-BF16 ([`super::bf16`]).
    pub bf16: bool,
    /// The weight in its stored form (a GGUF file's quantized blocks), which the products
    /// read in place ([`super::qmatmul`]); inference only.
    pub stored: Option<Arc<QMatrix>>,
    /// A low-rank adapter added to the product.
    pub lora: Option<Lora>,
}

/// A low-rank adapter: `y += scale · (x Aᵀ) Bᵀ`, `A: (r, in)`, `B: (out, r)`.
#[derive(Debug, Clone)]
pub struct Lora {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

/// A stand-in for a weight held in its stored form: the shape, no memory, NaN values.
pub fn stand_in(rows: usize, cols: usize) -> Result<Tensor> {
    Tensor::new(f32::NAN, &candle_core::Device::Cpu)?.broadcast_as((rows, cols))
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            bf16: false,
            stored: None,
            lora: None,
        }
    }

    /// Apply to `x: (.., in)`, giving `(.., out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.forward_base(x)?;
        self.add_lora(y, x)
    }

    /// `y` (this layer's base product of `x`) plus the adapter's product.
    fn add_lora(&self, y: Tensor, x: &Tensor) -> Result<Tensor> {
        let Some(l) = &self.lora else {
            return Ok(y);
        };
        let x2 = flat_rows(x)?;
        let low = x2.matmul(&l.a.t()?)?.matmul(&l.b.t()?)?;
        let low = (low * l.scale)?.reshape(y.shape())?;
        y + low
    }

    /// The product without the adapter.
    fn forward_base(&self, x: &Tensor) -> Result<Tensor> {
        if self.stored.is_some() {
            return Ok(Self::base_pairs(&[self], &[x])?.remove(0));
        }
        if let Some(y) = fused_matmul_t(x, &self.weight, self.bf16)? {
            return match &self.bias {
                Some(b) => y.broadcast_add(b),
                None => Ok(y),
            };
        }
        // decoding: a few rows are bound by reading the weight once (skinny path)
        let y = super::matvec::matmul_t(&flat_rows(x)?, &self.weight)?;
        self.finish(y, x)
    }

    /// The bias added to the products `y: (rows, out)` of `x: (.., in)`, shaped `(.., out)`.
    fn finish(&self, y: Tensor, x: &Tensor) -> Result<Tensor> {
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        y.reshape(super::ops::with_last_dim(x.dims(), self.weight.dim(0)?))
    }

    /// Several maps of the same input, `[l.forward(x) for l in layers]`; when decoding, the
    /// products run in one parallel region.
    pub fn forward_many<const N: usize>(layers: [&Linear; N], x: &Tensor) -> Result<[Tensor; N]> {
        Self::forward_pairs(&layers, &[x; N])?
            .try_into()
            .map_err(|_| candle_core::Error::Msg(format!("expected {N} outputs")))
    }

    /// `[l.forward(x) for (l, x) in zip(layers, xs)]`; when decoding, the products run in
    /// one parallel region (stored weights take inputs of any rows each, f32 weights
    /// inputs with the same leading dimensions).
    pub fn forward_pairs(layers: &[&Linear], xs: &[&Tensor]) -> Result<Vec<Tensor>> {
        let ys = Self::base_pairs(layers, xs)?;
        ys.into_iter()
            .zip(layers.iter().zip(xs))
            .map(|(y, (l, x))| l.add_lora(y, x))
            .collect()
    }

    /// [`Linear::forward_pairs`] without the adapters.
    fn base_pairs(layers: &[&Linear], xs: &[&Tensor]) -> Result<Vec<Tensor>> {
        if layers.iter().any(|l| l.stored.is_some()) {
            return stored_pairs(layers, xs);
        }
        let x2 = xs
            .iter()
            .map(|x| flat_rows(x))
            .collect::<Result<Vec<_>>>()?;
        let ws: Vec<&Tensor> = layers.iter().map(|l| &l.weight).collect();
        let Some(ys) = super::matvec::skinny_pairs(&x2.iter().collect::<Vec<_>>(), &ws)? else {
            return layers
                .iter()
                .zip(xs)
                .map(|(l, x)| l.forward_base(x))
                .collect();
        };
        ys.into_iter()
            .zip(layers.iter().zip(xs))
            .map(|(y, (l, x))| l.finish(y, x))
            .collect()
    }
}

/// [`Linear::forward_pairs`] where some layers hold stored weights: those products in
/// one call of [`super::qmatmul::products`] (one parallel region when decoding), the
/// others one by one. An input given to several layers is read out (and quantized) once.
fn stored_pairs(layers: &[&Linear], xs: &[&Tensor]) -> Result<Vec<Tensor>> {
    let mut out: Vec<Option<Tensor>> = vec![None; layers.len()];
    // the distinct inputs' values, and which of them each stored layer takes
    let mut flat: Vec<(candle_core::TensorId, Vec<f32>)> = Vec::new();
    let mut which = Vec::new();
    for (i, (l, x)) in layers.iter().zip(xs).enumerate() {
        match &l.stored {
            Some(q) => {
                if x.track_op() {
                    candle_core::bail!("a layer with stored (quantized) weights cannot be trained")
                }
                if x.dim(D::Minus1)? != q.cols {
                    candle_core::bail!(
                        "stored product: input {:?} for a {} × {} weight",
                        x.shape(),
                        q.rows,
                        q.cols
                    )
                }
                let at = match flat.iter().position(|(id, _)| *id == x.id()) {
                    Some(at) => at,
                    None => {
                        let v = x.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                        flat.push((x.id(), v));
                        flat.len() - 1
                    }
                };
                which.push((i, at));
            }
            None => out[i] = Some(l.forward_base(x)?),
        }
    }
    let pairs: Vec<(&QMatrix, &[f32])> = which
        .iter()
        .filter_map(|&(i, at)| {
            layers[i]
                .stored
                .as_deref()
                .map(|q| (q, flat[at].1.as_slice()))
        })
        .collect();
    let ys = super::qmatmul::products(&pairs);
    for ((&(i, _), y), (q, x)) in which.iter().zip(ys).zip(&pairs) {
        let y = Tensor::from_vec(y, (x.len() / q.cols, q.rows), xs[i].device())?;
        out[i] = Some(layers[i].finish(y, xs[i])?);
    }
    out.into_iter()
        .map(|y| y.ok_or_else(|| candle_core::Error::Msg("stored product".into())))
        .collect()
}

/// `x (.., in) · wᵀ` as one fused node (f32 products, or bf16 operands with f32 sums when
/// `bf16` and the CPU has AVX512-BF16), for f32 CPU tensors with more rows than the decode
/// path takes; `None` otherwise.
pub(crate) fn fused_matmul_t(x: &Tensor, w: &Tensor, bf16: bool) -> Result<Option<Tensor>> {
    let rows = x.elem_count() / x.dim(D::Minus1)?.max(1);
    let fused = x.device().is_cpu()
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && w.rank() == 2
        && rows > super::matvec::MAX_ROWS;
    if !fused {
        return Ok(None);
    }
    let op = LinearOp {
        part: Part::Y,
        bf16: bf16 && super::bf16::available(),
    };
    Ok(Some(x.contiguous()?.apply_op2(&w.contiguous()?, op)?))
}

/// `x: (.., in)` as `(rows, in)`.
fn flat_rows(x: &Tensor) -> Result<Tensor> {
    let d_in = x.dim(D::Minus1)?;
    x.reshape((x.elem_count() / d_in.max(1), d_in))
}

/// The three products of a linear layer `y = x · Wᵀ` (`x: (.., in)`, `W: (out, in)`); the
/// grouped (MoE) products use the same three per group.
#[derive(Clone, Copy)]
enum Part {
    /// `y = x · Wᵀ` from `(x, W)`; its backward runs the other two.
    Y,
    /// `dx = dy · W` from `(dy, W)`.
    Dx,
    /// `dW = dyᵀ · x` from `(dy, x)`, summed over all leading positions.
    Dw,
}

/// A linear layer's product as one graph node on f32 CPU tensors of any leading shape:
/// no reshapes around it, no transposed weight view, outputs written without a zero fill,
/// and a backward that computes `dx` and `dW` directly (each of those would otherwise be
/// one more node whose gradient candle zero-fills and adds). `bf16`: operands rounded to
/// bf16, sums in f32 ([`super::bf16`]).
struct LinearOp {
    part: Part,
    bf16: bool,
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        match self.part {
            Part::Y => "routelm-linear",
            Part::Dx => "routelm-linear-dx",
            Part::Dw => "routelm-linear-dw",
        }
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let p1 = super::ops::f32_slice(s1, l1, self.name())?.as_ptr();
        let p2 = super::ops::f32_slice(s2, l2, self.name())?.as_ptr();
        // both operands as matrices: all leading dimensions are rows
        let as_matrix = |l: &Layout| {
            let d = l.shape().dims().last().copied().unwrap_or(1);
            (l.shape().elem_count() / d.max(1), d)
        };
        let ((r1, c1), (r2, c2)) = (as_matrix(l1), as_matrix(l2));
        let at = |ptr, rs, cs| Strided { ptr, rs, cs };
        // C (m × n) = A · B, and C's shape
        let with_last = |n| super::ops::with_last_dim(l1.shape().dims(), n);
        let (m, n, k, a, b, fits, shape) = match self.part {
            Part::Y => (
                r1,
                r2,
                c1,
                at(p1, c1, 1),
                at(p2, 1, c2),
                c1 == c2,
                with_last(r2),
            ),
            Part::Dx => (
                r1,
                c2,
                c1,
                at(p1, c1, 1),
                at(p2, c2, 1),
                c1 == r2,
                with_last(c2),
            ),
            Part::Dw => {
                let shape = Shape::from((c1, c2));
                (c1, c2, r1, at(p1, 1, c1), at(p2, c2, 1), r1 == r2, shape)
            }
        };
        if !fits || l2.shape().rank() < 1 {
            candle_core::bail!("{}: {:?} with {:?}", self.name(), l1.shape(), l2.shape())
        }
        // the product writes every value: the buffer is left uninitialised until then
        let mut out: Vec<f32> = Vec::with_capacity(m * n);
        let dst = out.spare_capacity_mut().as_mut_ptr().cast::<f32>();
        // SAFETY: both operands are contiguous and the strides stay inside them; `dst` has
        // room for m × n values and overlaps neither; `product` writes all m × n of them
        // (bf16 only where the CPU has it), so the length may cover them afterwards
        unsafe {
            product(self.bf16, true, m, n, k, dst, a, b);
            out.set_len(m * n);
        }
        Ok((CpuStorage::F32(out), shape))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let op = |part| LinearOp {
            part,
            bf16: self.bf16,
        };
        // a frozen weight (LoRA training) needs no gradient, nor does the model's input
        let dx = match x.track_op() {
            true => Some(dy.apply_op2_no_bwd(w, &op(Part::Dx))?),
            false => None,
        };
        let dw = match w.track_op() {
            true => Some(dy.apply_op2_no_bwd(x, &op(Part::Dw))?),
            false => None,
        };
        Ok((dx, dw))
    }
}

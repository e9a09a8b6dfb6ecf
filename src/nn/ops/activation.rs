//! SwiGLU (`silu(g) · u`) and tanh-approximated GELU, each fused with its backward.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{exp, f32_slice, fused, output_buffer, widest, CResult, PAR_MIN};

/// `silu(g) · u` in one pass; its backward computes both input gradients in another
/// (composed, it is two nodes of the autograd graph, four elementwise passes and two
/// gradient accumulations more).
struct SwiGlu;

pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `f(a_i, b_i)` for each element of two f32 tensors of one shape, as a new storage.
fn map2(
    what: &str,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> CResult<(CpuStorage, Shape)> {
    let a = f32_slice(s1, l1, what)?;
    let b = f32_slice(s2, l2, what)?;
    let mut out = output_buffer(a.len());
    for_chunks(
        &mut out,
        #[inline(always)]
        |at, o| {
            for ((o, &a), &b) in o.iter_mut().zip(&a[at..]).zip(&b[at..]) {
                *o = f(a, b);
            }
        },
    );
    Ok((CpuStorage::F32(out), l1.shape().clone()))
}

/// Apply `f(offset, out_chunk)` over `out` in chunks, in parallel when the work is large,
/// compiled for the widest vectors this CPU has ([`widest`]).
fn for_chunks(out: &mut [f32], f: impl Fn(usize, &mut [f32]) + Sync) {
    const CHUNK: usize = 1 << 12;
    if out.len() >= PAR_MIN {
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(i, o)| {
            widest(
                #[inline(always)]
                || f(i * CHUNK, o),
            )
        });
    } else {
        widest(
            #[inline(always)]
            || f(0, out),
        );
    }
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "routelm-swiglu"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        map2(
            "swiglu",
            (s1, l1),
            (s2, l2),
            #[inline(always)]
            |g, u| g * sigmoid(g) * u,
        )
    }
    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let shape = g.shape().clone();
        // both gradients from one pass, stacked: (2, n)
        let both = g.apply_op3_no_bwd(u, &dy.contiguous()?, &SwiGluBwd)?;
        let part = |i| both.narrow(0, i, 1)?.reshape(&shape);
        Ok((Some(part(0)?), Some(part(1)?)))
    }
}

struct SwiGluBwd;

impl CustomOp3 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "routelm-swiglu-bwd"
    }
    #[allow(clippy::too_many_arguments)]
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let g = f32_slice(s1, l1, "swiglu bwd")?;
        let u = f32_slice(s2, l2, "swiglu bwd")?;
        let dy = f32_slice(s3, l3, "swiglu bwd")?;
        let n = g.len();
        let mut out = output_buffer(2 * n);
        let (dg, du) = out.split_at_mut(n);
        for_chunks(
            dg,
            #[inline(always)]
            |at, o| {
                for (((o, &g), &u), &dy) in o.iter_mut().zip(&g[at..]).zip(&u[at..]).zip(&dy[at..])
                {
                    *o = swiglu_grads(g, u, dy).0;
                }
            },
        );
        for_chunks(
            du,
            #[inline(always)]
            |at, o| {
                for (((o, &g), &u), &dy) in o.iter_mut().zip(&g[at..]).zip(&u[at..]).zip(&dy[at..])
                {
                    *o = swiglu_grads(g, u, dy).1;
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((2, n))))
    }
}

/// `silu(g) · u` (the SwiGLU feed-forward's hidden state).
pub fn swiglu(g: &Tensor, u: &Tensor) -> CResult<Tensor> {
    if fused(g) && fused(u) && g.shape() == u.shape() {
        g.contiguous()?.apply_op2(&u.contiguous()?, SwiGlu)
    } else {
        swiglu_reference(g, u)
    }
}

/// [`swiglu`] from candle's own ops.
pub fn swiglu_reference(g: &Tensor, u: &Tensor) -> CResult<Tensor> {
    g.silu()? * u
}

/// `silu(g) · u` where each row of the input holds `[g | u]` (the gate and up products of
/// one fused projection): `(.., 2h)` → `(.., h)`, one node whose gradient is `(.., 2h)`.
/// `(d/dg, d/du)` of `silu(g) · u` for an incoming gradient `dy`.
pub(crate) fn swiglu_grads(g: f32, u: f32, dy: f32) -> (f32, f32) {
    let sg = sigmoid(g);
    // d/dg silu(g) = σ(g) (1 + g (1 - σ(g)))
    (dy * u * sg * (1.0 + g * (1.0 - sg)), dy * g * sg)
}

// ---------------------------------------------------------------- GELU (tanh form)

/// `√(2/π)`, the tanh form's constant.
const GELU_C: f32 = 0.797_884_6;

/// GELU in its tanh form, `x/2 · (1 + tanh(u))` with `u = √(2/π)(x + 0.044715 x³)`,
/// computed as `x · σ(2u)` (the same function) through [`exp`], so a loop over it
/// vectorises; candle's takes libm's `tanhf` one value at a time on one thread.
#[inline(always)]
pub(crate) fn gelu_tanh(x: f32) -> f32 {
    let u = GELU_C * (x + 0.044_715 * x * x * x);
    x * sigmoid(2.0 * u)
}

/// `d/dx` of [`gelu_tanh`]: `σ + x σ (1 − σ) · 2u'`, `u' = √(2/π)(1 + 3 · 0.044715 x²)`.
#[inline(always)]
pub(crate) fn gelu_tanh_grad(x: f32) -> f32 {
    let u = GELU_C * (x + 0.044_715 * x * x * x);
    let s = sigmoid(2.0 * u);
    let du = GELU_C * (1.0 + 3.0 * 0.044_715 * x * x);
    s + x * s * (1.0 - s) * 2.0 * du
}

/// [`gelu_tanh`] over a tensor, one node with its own backward.
struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "routelm-gelu"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "gelu")?;
        let mut out = output_buffer(x.len());
        for_chunks(
            &mut out,
            #[inline(always)]
            |at, o| {
                for (o, &x) in o.iter_mut().zip(&x[at..]) {
                    *o = gelu_tanh(x);
                }
            },
        );
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&dy.contiguous()?, &GeluBwd)?))
    }
}

struct GeluBwd;

impl CustomOp2 for GeluBwd {
    fn name(&self) -> &'static str {
        "routelm-gelu-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        map2(
            "gelu bwd",
            (s1, l1),
            (s2, l2),
            #[inline(always)]
            |x, dy| dy * gelu_tanh_grad(x),
        )
    }
}

/// GELU, tanh form (PyTorch's `gelu(approximate="tanh")`, `gelu_new`, `gelu_pytorch_tanh`).
pub fn gelu(x: &Tensor) -> CResult<Tensor> {
    if fused(x) {
        x.contiguous()?.apply_op1(Gelu)
    } else {
        x.gelu()
    }
}

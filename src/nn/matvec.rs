//! Skinny matrix products `y = x Wᵀ` for a handful of rows (decoding), as a candle custom
//! op. With one row the product is bound by reading W once, so the kernel streams W's rows
//! contiguously on every core with several independent accumulators per dot product; the
//! generic GEMM path packs W first and reaches a fraction of the memory bandwidth
//! (`routelm bench decode` measures it). The backward uses ordinary matmuls.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

type CResult<T> = candle_core::Result<T>;

/// Rows at most for which [`skinny_matmul`] applies.
pub const MAX_ROWS: usize = 8;

struct Skinny;

/// `Σ a_i b_i` with 64 partial sums (four independent 16-lane accumulators, so
/// consecutive multiply-adds do not wait on each other), then the tail; the same
/// arithmetic in every instruction set (no fused multiply-add), so every path gives the
/// same bits.
#[inline(always)]
fn dot_body(a: &[f32], b: &[f32]) -> f32 {
    const W: usize = 64;
    let mut acc = [0f32; W];
    let chunks = a.len() / W;
    for c in 0..chunks {
        let (x, y) = (&a[c * W..c * W + W], &b[c * W..c * W + W]);
        for i in 0..W {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * W..a.len() {
        s += a[i] * b[i];
    }
    s
}

fn dot_generic(a: &[f32], b: &[f32]) -> f32 {
    dot_body(a, b)
}

/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    dot_body(a, b)
}

/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_body(a, b)
}

/// A dot-product path and its name.
pub type DotPath = (&'static str, fn(&[f32], &[f32]) -> f32);

/// Every dot-product path this CPU can run, the widest first (chosen at run time: one
/// binary built for generic x86-64 uses the best the machine has).
pub fn dot_paths() -> Vec<DotPath> {
    let mut v: Vec<DotPath> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        use crate::nn::cpu::{allows, Level};
        if allows(Level::Avx512) && std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F was just detected
            v.push(("avx512f", |a, b| unsafe { dot_avx512(a, b) }));
        }
        if allows(Level::Avx2) && std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 was just detected
            v.push(("avx2", |a, b| unsafe { dot_avx2(a, b) }));
        }
    }
    v.push(("generic", dot_generic));
    v
}

/// The widest dot-product path the CPU has.
fn dot_fn() -> fn(&[f32], &[f32]) -> f32 {
    dot_paths()[0].1
}

/// For each pair `(x_j (rows, in_j), w_j (out_j, in_j))` the product `x_j w_jᵀ`, in one
/// parallel region over blocks of 64 weight rows of all the weights (one wake-up of the
/// thread pool instead of one per weight: a decoded token makes a few dozen of these
/// products, several of them small enough that the wake-up costs as much as the reading).
/// Returns one row-major `(rows, out_j)` vector per pair.
fn products(rows: usize, pairs: &[(&[f32], &[f32])]) -> Vec<Vec<f32>> {
    const BLOCK: usize = 64;
    let d_in = |j: usize| pairs[j].0.len() / rows.max(1);
    let d_out = |j: usize| pairs[j].1.len() / d_in(j).max(1);
    let jobs: Vec<(usize, usize)> = (0..pairs.len())
        .flat_map(|j| (0..d_out(j).div_ceil(BLOCK)).map(move |b| (j, b)))
        .collect();
    let dot = dot_fn();
    let parts: Vec<Vec<f32>> = jobs
        .par_iter()
        .map(|&(j, bi)| {
            let ((x, w), k) = (pairs[j], d_in(j));
            let (o0, o1) = (bi * BLOCK, ((bi + 1) * BLOCK).min(d_out(j)));
            let n = o1 - o0;
            let mut out = vec![0f32; rows * n];
            for o in o0..o1 {
                let wr = &w[o * k..(o + 1) * k];
                for r in 0..rows {
                    out[r * n + (o - o0)] = dot(wr, &x[r * k..(r + 1) * k]);
                }
            }
            out
        })
        .collect();
    let mut ys: Vec<Vec<f32>> = (0..pairs.len())
        .map(|j| vec![0f32; rows * d_out(j)])
        .collect();
    for (&(j, bi), part) in jobs.iter().zip(&parts) {
        let (o0, n, m) = (bi * BLOCK, part.len() / rows.max(1), d_out(j));
        for r in 0..rows {
            ys[j][r * m + o0..r * m + o0 + n].copy_from_slice(&part[r * n..(r + 1) * n]);
        }
    }
    ys
}

impl CustomOp2 for Skinny {
    fn name(&self) -> &'static str {
        "routelm-skinny-matmul"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let x = super::ops::f32_slice(s1, l1, "skinny_matmul")?;
        let w = super::ops::f32_slice(s2, l2, "skinny_matmul")?;
        let (rows, d_in) = l1.shape().dims2()?;
        let (d_out, d_in2) = l2.shape().dims2()?;
        if d_in != d_in2 {
            candle_core::bail!("skinny_matmul: x {:?} vs w {:?}", l1.shape(), l2.shape())
        }
        let y = products(rows, &[(x, w)]).pop().unwrap_or_default();
        Ok((CpuStorage::F32(y), Shape::from((rows, d_out))))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(dy.matmul(w)?), Some(dy.t()?.matmul(x)?)))
    }
}

/// `x (rows, in) · wᵀ` with `w: (out, in)`, for f32 on the CPU with few rows; `None` when the
/// fast path does not apply.
pub fn skinny_matmul(x: &Tensor, w: &Tensor) -> CResult<Option<Tensor>> {
    let ok = x.device().is_cpu()
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && x.dim(0)? <= MAX_ROWS
        && w.is_contiguous();
    if !ok {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op2(w, Skinny)?))
}

/// [`skinny_matmul`] of several pairs `(x_j, w_j)` with the same number of rows (q, k and
/// v of one input; the experts of a decoded token), in one parallel region. Only for
/// inference: `None` when any operand records gradients, or when the fast path does not
/// apply.
pub fn skinny_pairs(xs: &[&Tensor], ws: &[&Tensor]) -> CResult<Option<Vec<Tensor>>> {
    let Some(x0) = xs.first() else {
        return Ok(Some(Vec::new()));
    };
    let rows = match x0.dims() {
        [r, _] => *r,
        _ => return Ok(None),
    };
    let ok = xs.len() == ws.len()
        && x0.device().is_cpu()
        && rows <= MAX_ROWS
        && xs.iter().zip(ws).all(|(x, w)| {
            let f32_plain = |t: &Tensor| t.dtype() == DType::F32 && t.rank() == 2 && !t.track_op();
            f32_plain(x)
                && f32_plain(w)
                && w.is_contiguous()
                && x.dims()[0] == rows
                && x.dims()[1] == w.dims()[1]
        });
    if !ok {
        return Ok(None);
    }
    let xs = xs
        .iter()
        .map(|x| x.contiguous())
        .collect::<CResult<Vec<_>>>()?;
    let xg: Vec<_> = xs.iter().map(|x| x.storage_and_layout()).collect();
    let wg: Vec<_> = ws.iter().map(|w| w.storage_and_layout()).collect();
    let pairs = xg
        .iter()
        .zip(&wg)
        .map(|(x, w)| {
            let name = "skinny_pairs";
            Ok((
                super::ops::storage_f32(&x.0, x.1, name)?,
                super::ops::storage_f32(&w.0, w.1, name)?,
            ))
        })
        .collect::<CResult<Vec<_>>>()?;
    let ys = products(rows, &pairs);
    drop(pairs);
    let device = x0.device().clone();
    ys.into_iter()
        .zip(ws)
        .map(|(y, w)| Tensor::from_vec(y, (rows, w.dim(0)?), &device))
        .collect::<CResult<Vec<_>>>()
        .map(Some)
}

/// `x (rows, in) · wᵀ`: [`skinny_matmul`] for a few rows, the fused linear product for more
/// (f32 on the CPU), else candle's matmul on the transposed view (no copy).
pub fn matmul_t(x: &Tensor, w: &Tensor) -> CResult<Tensor> {
    if let Some(y) = skinny_matmul(x, w)? {
        return Ok(y);
    }
    match super::linear::fused_matmul_t(x, w, false)? {
        Some(y) => Ok(y),
        None => x.matmul(&w.t()?),
    }
}

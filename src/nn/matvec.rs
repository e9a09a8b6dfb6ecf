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

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // 64 partial sums = four independent 16-lane vector accumulators, so consecutive FMAs
    // do not wait on each other; the compiler vectorises this
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

/// `x (rows, d_in)` times the transpose of each weight `(out_j, d_in)`, in one parallel
/// region over blocks of 64 weight rows of all the weights (one wake-up of the thread pool
/// instead of one per weight: a decoded token makes a few dozen of these products, several
/// of them small enough that the wake-up costs as much as the reading). Returns one
/// row-major `(rows, out_j)` vector per weight.
fn products(x: &[f32], rows: usize, d_in: usize, ws: &[&[f32]]) -> Vec<Vec<f32>> {
    const BLOCK: usize = 64;
    let jobs: Vec<(usize, usize)> = ws
        .iter()
        .enumerate()
        .flat_map(|(j, w)| (0..(w.len() / d_in).div_ceil(BLOCK)).map(move |b| (j, b)))
        .collect();
    let parts: Vec<Vec<f32>> = jobs
        .par_iter()
        .map(|&(j, bi)| {
            let w = ws[j];
            let (o0, o1) = (bi * BLOCK, ((bi + 1) * BLOCK).min(w.len() / d_in));
            let n = o1 - o0;
            let mut out = vec![0f32; rows * n];
            for o in o0..o1 {
                let wr = &w[o * d_in..(o + 1) * d_in];
                for r in 0..rows {
                    out[r * n + (o - o0)] = dot(wr, &x[r * d_in..(r + 1) * d_in]);
                }
            }
            out
        })
        .collect();
    let mut ys: Vec<Vec<f32>> = ws
        .iter()
        .map(|w| vec![0f32; rows * (w.len() / d_in)])
        .collect();
    for (&(j, bi), part) in jobs.iter().zip(&parts) {
        let d_out = ws[j].len() / d_in;
        let (o0, n) = (bi * BLOCK, part.len() / rows.max(1));
        for r in 0..rows {
            ys[j][r * d_out + o0..r * d_out + o0 + n].copy_from_slice(&part[r * n..(r + 1) * n]);
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
        let y = products(x, rows, d_in, &[w]).pop().unwrap_or_default();
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

/// [`skinny_matmul`] with several weights sharing the input (q, k and v; gate and up), in
/// one parallel region. Only for inference: `None` when any operand records gradients, or
/// when the fast path does not apply.
pub fn skinny_many(x: &Tensor, ws: &[&Tensor]) -> CResult<Option<Vec<Tensor>>> {
    let ok = x.device().is_cpu()
        && x.dtype() == DType::F32
        && x.rank() == 2
        && x.dim(0)? <= MAX_ROWS
        && !x.track_op()
        && ws.iter().all(|w| {
            w.dtype() == DType::F32
                && w.is_contiguous()
                && !w.track_op()
                && w.rank() == 2
                && w.dim(1).ok() == x.dim(1).ok()
        });
    if !ok {
        return Ok(None);
    }
    let (rows, d_in) = x.dims2()?;
    let x = x.contiguous()?;
    let (xs, xl) = x.storage_and_layout();
    let guards: Vec<_> = ws.iter().map(|w| w.storage_and_layout()).collect();
    let xv = super::ops::f32_slice(cpu(&xs)?, xl, "skinny_many")?;
    let wv = guards
        .iter()
        .map(|(s, l)| super::ops::f32_slice(cpu(s)?, l, "skinny_many"))
        .collect::<CResult<Vec<_>>>()?;
    let ys = products(xv, rows, d_in, &wv);
    let device = x.device().clone();
    drop(guards);
    ys.into_iter()
        .zip(ws)
        .map(|(y, w)| Tensor::from_vec(y, (rows, w.dim(0)?), &device))
        .collect::<CResult<Vec<_>>>()
        .map(Some)
}

fn cpu(s: &candle_core::Storage) -> CResult<&CpuStorage> {
    match s {
        candle_core::Storage::Cpu(c) => Ok(c),
        _ => candle_core::bail!("skinny_many: expected CPU storage"),
    }
}

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
        // outputs in blocks of 64 rows of W, each block computed for every x row
        let block = 64;
        let parts: Vec<Vec<f32>> = (0..d_out.div_ceil(block))
            .into_par_iter()
            .map(|bi| {
                let (o0, o1) = (bi * block, ((bi + 1) * block).min(d_out));
                let mut out = vec![0f32; rows * (o1 - o0)];
                for o in o0..o1 {
                    let wr = &w[o * d_in..(o + 1) * d_in];
                    for r in 0..rows {
                        out[r * (o1 - o0) + (o - o0)] = dot(wr, &x[r * d_in..(r + 1) * d_in]);
                    }
                }
                out
            })
            .collect();
        let mut y = vec![0f32; rows * d_out];
        for (bi, part) in parts.iter().enumerate() {
            let o0 = bi * block;
            let n = part.len() / rows.max(1);
            for r in 0..rows {
                y[r * d_out + o0..r * d_out + o0 + n].copy_from_slice(&part[r * n..(r + 1) * n]);
            }
        }
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

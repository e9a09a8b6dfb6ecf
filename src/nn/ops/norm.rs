//! RMSNorm fused with its backward (both input gradients), and LayerNorm composed.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::{compute_dtype, f32_slice, for_rows, fused, output_buffer, CResult};

struct RmsNorm {
    eps: f32,
}

pub(super) fn rstd(x: &[f32], eps: f32) -> f32 {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    1.0 / (ms + eps).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "routelm-rms-norm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "rms_norm")?;
        let w = f32_slice(s2, l2, "rms_norm")?;
        let d = w.len();
        let mut out = output_buffer(x.len());
        for_rows(
            &mut out,
            d,
            #[inline(always)]
            |r, o| {
                let xr = &x[r * d..(r + 1) * d];
                let s = rstd(xr, self.eps);
                for i in 0..d {
                    o[i] = xr[i] * s * w[i];
                }
            },
        );
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &dy, &RmsNormBwdX { eps: self.eps })?;
        let dw = x.apply_op2_no_bwd(&dy, &RmsNormBwdW { eps: self.eps })?;
        Ok((Some(dx), Some(dw)))
    }
}

struct RmsNormBwdX {
    eps: f32,
}

impl CustomOp3 for RmsNormBwdX {
    fn name(&self) -> &'static str {
        "routelm-rms-norm-bwd-x"
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
        let x = f32_slice(s1, l1, "rms_norm bwd")?;
        let w = f32_slice(s2, l2, "rms_norm bwd")?;
        let dy = f32_slice(s3, l3, "rms_norm bwd")?;
        let d = w.len();
        let mut out = output_buffer(x.len());
        for_rows(
            &mut out,
            d,
            #[inline(always)]
            |r, o| {
                let xr = &x[r * d..(r + 1) * d];
                let g = &dy[r * d..(r + 1) * d];
                let s = rstd(xr, self.eps);
                // dx = s * (g*w - xhat * mean(g*w*xhat)), xhat = x*s
                let mut dot = 0f32;
                for i in 0..d {
                    dot += g[i] * w[i] * xr[i] * s;
                }
                let m = dot / d as f32;
                for i in 0..d {
                    o[i] = s * (g[i] * w[i] - xr[i] * s * m);
                }
            },
        );
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

struct RmsNormBwdW {
    eps: f32,
}

impl CustomOp2 for RmsNormBwdW {
    fn name(&self) -> &'static str {
        "routelm-rms-norm-bwd-w"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "rms_norm bwd")?;
        let dy = f32_slice(s2, l2, "rms_norm bwd")?;
        let d = l1.shape().dims().last().copied().unwrap_or(1);
        let rows = x.len() / d;
        let chunk = rows.div_ceil(rayon::current_num_threads().max(1)).max(1);
        let partial: Vec<Vec<f32>> = (0..rows)
            .step_by(chunk)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|start| {
                let mut acc = vec![0f32; d];
                for r in start..(start + chunk).min(rows) {
                    let xr = &x[r * d..(r + 1) * d];
                    let s = rstd(xr, self.eps);
                    for i in 0..d {
                        acc[i] += dy[r * d + i] * xr[i] * s;
                    }
                }
                acc
            })
            .collect();
        let mut out = vec![0f32; d];
        for p in partial {
            for i in 0..d {
                out[i] += p[i];
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(d)))
    }
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x²) + eps) * w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> CResult<Tensor> {
    if fused(x) && fused(w) {
        x.contiguous()?.apply_op2(w, RmsNorm { eps: eps as f32 })
    } else {
        rms_norm_reference(x, w, eps)
    }
}

/// RMSNorm from elementwise ops (any device/dtype; the reference for tests).
pub fn rms_norm_reference(x: &Tensor, w: &Tensor, eps: f64) -> CResult<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(compute_dtype(dtype))?;
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let y = x.broadcast_div(&(ms + eps)?.sqrt()?)?;
    y.to_dtype(dtype)?.broadcast_mul(w)
}

/// LayerNorm over the last dimension, with optional bias (composed ops; autograd).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f64) -> CResult<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(compute_dtype(dtype))?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .to_dtype(dtype)?
        .broadcast_mul(w)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

//! Cross-entropy over the last dimension fused with its backward (softmax minus the
//! one-hot target), without a log-softmax tensor.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::{
    compute_dtype, exp, f32_slice, for_rows, fused, max_of, output_buffer, u32_slice, CResult,
};

/// Per-row cross-entropy `logsumexp(z) - z[target]` of `logits: (n, v)`, `targets: (n,)` u32.
struct CrossEntropy;

fn logsumexp(z: &[f32]) -> f32 {
    let max = max_of(z);
    max + z.iter().map(|v| exp(v - max)).sum::<f32>().ln()
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "routelm-cross-entropy"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let z = f32_slice(s1, l1, "cross_entropy")?;
        let y = u32_slice(s2, l2, "cross_entropy")?;
        let (n, v) = l1.shape().dims2()?;
        if let Some(bad) = y.iter().find(|&&t| t as usize >= v) {
            candle_core::bail!("cross_entropy: target {bad} out of range for vocabulary {v}")
        }
        let losses: Vec<f32> = (0..n)
            .into_par_iter()
            .map(|r| {
                let zr = &z[r * v..(r + 1) * v];
                logsumexp(zr) - zr[y[r] as usize]
            })
            .collect();
        Ok((CpuStorage::F32(losses), Shape::from(n)))
    }
    fn bwd(
        &self,
        z: &Tensor,
        y: &Tensor,
        _l: &Tensor,
        dl: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let dz = z.apply_op3_no_bwd(y, &dl.contiguous()?, &CrossEntropyBwd)?;
        Ok((Some(dz), None))
    }
}

struct CrossEntropyBwd;

impl CustomOp3 for CrossEntropyBwd {
    fn name(&self) -> &'static str {
        "routelm-cross-entropy-bwd"
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
        let z = f32_slice(s1, l1, "cross_entropy bwd")?;
        let y = u32_slice(s2, l2, "cross_entropy bwd")?;
        let g = f32_slice(s3, l3, "cross_entropy bwd")?;
        let v = l1.shape().dims2()?.1;
        let mut out = output_buffer(z.len());
        for_rows(
            &mut out,
            v,
            #[inline(always)]
            |r, o| {
                let zr = &z[r * v..(r + 1) * v];
                let lse = logsumexp(zr);
                for j in 0..v {
                    o[j] = exp(zr[j] - lse) * g[r];
                }
                o[y[r] as usize] -= g[r];
            },
        );
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Mean next-token cross-entropy of `logits: (n, v)` against `targets: (n,)` (u32).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> CResult<Tensor> {
    if fused(logits) {
        logits
            .contiguous()?
            .apply_op2(&targets.contiguous()?, CrossEntropy)?
            .mean_all()
    } else {
        cross_entropy_reference(logits, targets)
    }
}

/// Composed-ops reference for [`cross_entropy`].
pub fn cross_entropy_reference(logits: &Tensor, targets: &Tensor) -> CResult<Tensor> {
    let logits = logits.to_dtype(compute_dtype(logits.dtype()))?;
    let lsm = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let picked = lsm.gather(&targets.unsqueeze(1)?, 1)?;
    picked.neg()?.mean_all()
}

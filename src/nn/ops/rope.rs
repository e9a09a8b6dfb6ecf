//! Rotary position embedding fused; its backward is the inverse rotation.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, D};

use super::{f32_slice, for_rows, fused, CResult};

/// Rotary embedding on `x: (b, t, h, d)` with `cos, sin: (t, r/2)` or `(b, t, r/2)`, rotating
/// the first `r` dims of each head in the halves layout: `(x1, x2) -> (x1 c - x2 s, x2 c + x1 s)`.
/// The inverse rotation (`inverse`) is the backward.
struct Rope {
    inverse: bool,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "routelm-rope"
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
        let x = f32_slice(s1, l1, "rope")?;
        let cos = f32_slice(s2, l2, "rope")?;
        let sin = f32_slice(s3, l3, "rope")?;
        let (b, t, h, d) = l1.shape().dims4()?;
        let cdims = l2.shape().dims();
        let half = cdims[cdims.len() - 1];
        let per_batch = cdims.len() == 3;
        if cdims[cdims.len() - 2] != t || (per_batch && cdims[0] != b) || 2 * half > d {
            candle_core::bail!("rope: tables {:?} do not fit input {:?}", cdims, l1.shape())
        }
        let sign = if self.inverse { -1.0f32 } else { 1.0 };
        let mut out = x.to_vec();
        // one (batch, position) per chunk: h heads of width d
        for_rows(
            &mut out,
            h * d,
            #[inline(always)]
            |bt, o| {
                let (bi, ti) = (bt / t, bt % t);
                let row = if per_batch { bi * t + ti } else { ti };
                let c = &cos[row * half..(row + 1) * half];
                let s = &sin[row * half..(row + 1) * half];
                let xr = &x[bt * h * d..(bt + 1) * h * d];
                for hh in 0..h {
                    let base = hh * d;
                    for i in 0..half {
                        let (x1, x2) = (xr[base + i], xr[base + i + half]);
                        let si = sign * s[i];
                        o[base + i] = x1 * c[i] - x2 * si;
                        o[base + i + half] = x2 * c[i] + x1 * si;
                    }
                }
            },
        );
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = dy.contiguous()?.apply_op3_no_bwd(
            cos,
            sin,
            &Rope {
                inverse: !self.inverse,
            },
        )?;
        Ok((Some(dx), None, None))
    }
}

/// Apply rotary embedding to `x: (b, t, h, d)`; see `Rope`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> CResult<Tensor> {
    if fused(x) {
        x.contiguous()?.apply_op3(cos, sin, Rope { inverse: false })
    } else {
        rope_reference(x, cos, sin)
    }
}

/// Composed-ops reference for [`rope`].
pub fn rope_reference(x: &Tensor, cos: &Tensor, sin: &Tensor) -> CResult<Tensor> {
    let (b, t, _h, d) = x.dims4()?;
    let half = cos.dim(D::Minus1)?;
    let (cos, sin) = if cos.rank() == 2 {
        (cos.reshape((1, t, 1, half))?, sin.reshape((1, t, 1, half))?)
    } else {
        (cos.reshape((b, t, 1, half))?, sin.reshape((b, t, 1, half))?)
    };
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let a = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let bb = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    if 2 * half == d {
        Tensor::cat(&[a, bb], D::Minus1)
    } else {
        let rest = x.narrow(D::Minus1, 2 * half, d - 2 * half)?;
        Tensor::cat(&[a, bb, rest], D::Minus1)
    }
}

//! Grouped matrix products for Mixture-of-Experts dispatch: the rows of `x`, sorted by
//! expert, times each expert's own weight, `y[rows of e] = x[rows of e] · W_eᵀ`, with the
//! experts' weights stacked in one `(E·out, in)` tensor. One graph node (and one backward)
//! for all the experts of a layer instead of a gather, three matmuls, a weighting and a
//! full-size gradient per expert.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::bf16::{product, Strided};
use super::ops::{f32_slice, output_buffer};

type CResult<T> = candle_core::Result<T>;

/// Row offsets of the groups: group `e` is rows `offsets[e]..offsets[e + 1]`; `bf16`:
/// products with bf16 operands and f32 sums (mixed precision).
struct Grouped {
    offsets: Vec<usize>,
    bf16: bool,
}

/// Split `out` (row width `w`) into one mutable slice per group.
fn split_groups<'a>(mut out: &'a mut [f32], offsets: &[usize], w: usize) -> Vec<&'a mut [f32]> {
    let mut parts = Vec::with_capacity(offsets.len().saturating_sub(1));
    for pair in offsets.windows(2) {
        let (head, tail) = out.split_at_mut((pair[1] - pair[0]) * w);
        parts.push(head);
        out = tail;
    }
    parts
}

/// `y[rows of e] = a[rows of e] · B_e` for every group `e` (`a: (N, d_a)`, `y: (N, d_y)`),
/// groups in parallel. `B_e` is the `e`-th block of `w`, stored `(d_a, d_y)`, or stored
/// `(d_y, d_a)` and read transposed.
fn rows_times_blocks(
    a: &[f32],
    w: &[f32],
    offsets: &[usize],
    d_a: usize,
    d_y: usize,
    transposed: bool,
    bf16: bool,
) -> Vec<f32> {
    let n = offsets.last().copied().unwrap_or(0);
    if d_a == 0 {
        return vec![0f32; n * d_y];
    }
    // every row belongs to one group, whose product writes it
    let mut y = output_buffer(n * d_y);
    // strides of B_e as (row = index into d_a, column = index into d_y)
    let (rs, cs) = if transposed { (1, d_a) } else { (d_y, 1) };
    let parts = split_groups(&mut y, offsets, d_y);
    parts.into_par_iter().enumerate().for_each(|(e, ye)| {
        let (r0, rows) = (offsets[e], offsets[e + 1] - offsets[e]);
        let we = &w[e * d_a * d_y..(e + 1) * d_a * d_y];
        // SAFETY: ye is rows × d_y; a's rows r0.. are rows × d_a; we holds d_a · d_y values
        // read with the strides above
        unsafe {
            let a = Strided {
                ptr: a[r0 * d_a..].as_ptr(),
                rs: d_a,
                cs: 1,
            };
            let b = Strided {
                ptr: we.as_ptr(),
                rs,
                cs,
            };
            product(bf16, false, rows, d_y, d_a, ye.as_mut_ptr(), a, b)
        }
    });
    y
}

impl Grouped {
    fn check(&self, x: &Layout, w: &Layout) -> CResult<(usize, usize, usize)> {
        let (n, d_in) = x.shape().dims2()?;
        let (rows_w, d_in2) = w.shape().dims2()?;
        let groups = self.offsets.len().saturating_sub(1);
        if d_in != d_in2 || groups == 0 || rows_w % groups != 0 || self.offsets[groups] != n {
            candle_core::bail!(
                "grouped matmul: x {:?}, w {:?}, {} groups ending at row {:?}",
                x.shape(),
                w.shape(),
                groups,
                self.offsets.last()
            )
        }
        Ok((n, d_in, rows_w / groups))
    }
}

impl CustomOp2 for Grouped {
    fn name(&self) -> &'static str {
        "routelm-grouped-matmul"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (n, d_in, d_out) = self.check(l1, l2)?;
        let x = f32_slice(s1, l1, "grouped matmul")?;
        let w = f32_slice(s2, l2, "grouped matmul")?;
        let y = rows_times_blocks(x, w, &self.offsets, d_in, d_out, true, self.bf16);
        Ok((CpuStorage::F32(y), Shape::from((n, d_out))))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let (offsets, bf16) = (self.offsets.clone(), self.bf16);
        let dx = dy.apply_op2_no_bwd(w, &GroupedBwdX { offsets, bf16 })?;
        let offsets = self.offsets.clone();
        let dw = dy.apply_op2_no_bwd(x, &GroupedBwdW { offsets, bf16 })?;
        Ok((Some(dx), Some(dw)))
    }
}

/// `dx[rows of e] = dy[rows of e] · W_e`.
struct GroupedBwdX {
    offsets: Vec<usize>,
    bf16: bool,
}

impl CustomOp2 for GroupedBwdX {
    fn name(&self) -> &'static str {
        "routelm-grouped-matmul-bwd-x"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let dy = f32_slice(s1, l1, "grouped matmul bwd")?;
        let w = f32_slice(s2, l2, "grouped matmul bwd")?;
        let (n, d_out) = l1.shape().dims2()?;
        let (rows_w, d_in) = l2.shape().dims2()?;
        let groups = self.offsets.len() - 1;
        debug_assert_eq!(rows_w, groups * d_out);
        let dx = rows_times_blocks(dy, w, &self.offsets, d_out, d_in, false, self.bf16);
        Ok((CpuStorage::F32(dx), Shape::from((n, d_in))))
    }
}

/// `dW_e = dy[rows of e]ᵀ · x[rows of e]`, stacked like the weights.
struct GroupedBwdW {
    offsets: Vec<usize>,
    bf16: bool,
}

impl CustomOp2 for GroupedBwdW {
    fn name(&self) -> &'static str {
        "routelm-grouped-matmul-bwd-w"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let dy = f32_slice(s1, l1, "grouped matmul bwd")?;
        let x = f32_slice(s2, l2, "grouped matmul bwd")?;
        let (_, d_out) = l1.shape().dims2()?;
        let (_, d_in) = l2.shape().dims2()?;
        let groups = self.offsets.len() - 1;
        let mut dw = output_buffer(groups * d_out * d_in);
        dw.par_chunks_mut(d_out * d_in)
            .enumerate()
            .for_each(|(e, dwe)| {
                let (r0, rows) = (self.offsets[e], self.offsets[e + 1] - self.offsets[e]);
                if rows == 0 {
                    dwe.fill(0.0); // an expert without tokens gets a zero gradient
                    return;
                }
                // SAFETY: dwe is d_out × d_in; dyᵀ of the group is d_out × rows (row
                // stride 1, column stride d_out); x of the group is rows × d_in
                unsafe {
                    let a = Strided {
                        ptr: dy[r0 * d_out..].as_ptr(),
                        rs: 1,
                        cs: d_out,
                    };
                    let b = Strided {
                        ptr: x[r0 * d_in..].as_ptr(),
                        rs: d_in,
                        cs: 1,
                    };
                    product(self.bf16, false, d_out, d_in, rows, dwe.as_mut_ptr(), a, b)
                }
            });
        Ok((CpuStorage::F32(dw), Shape::from((groups * d_out, d_in))))
    }
}

/// `y[offsets[e]..offsets[e+1]] = x[offsets[e]..offsets[e+1]] · W_eᵀ` for `x: (N, in)` and
/// the experts' weights stacked as `w: (E·out, in)`; `offsets` has `E + 1` entries from 0
/// to N. f32 on the CPU runs one fused op (with bf16 operands and f32 sums when `bf16` and
/// the CPU has AVX512-BF16); other dtypes and devices run the products one by one.
pub fn grouped_matmul(x: &Tensor, w: &Tensor, offsets: &[usize], bf16: bool) -> CResult<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32 {
        return x.contiguous()?.apply_op2(
            &w.contiguous()?,
            Grouped {
                offsets: offsets.to_vec(),
                bf16: bf16 && super::bf16::available(),
            },
        );
    }
    grouped_matmul_reference(x, w, offsets)
}

/// [`grouped_matmul`] from candle's own ops: narrow, matmul, concatenate.
pub fn grouped_matmul_reference(x: &Tensor, w: &Tensor, offsets: &[usize]) -> CResult<Tensor> {
    let groups = offsets.len().saturating_sub(1);
    let d_out = w.dim(0)? / groups.max(1);
    let mut parts = Vec::new();
    for e in 0..groups {
        let rows = offsets[e + 1] - offsets[e];
        if rows > 0 {
            let we = w.narrow(0, e * d_out, d_out)?;
            parts.push(x.narrow(0, offsets[e], rows)?.matmul(&we.t()?)?);
        }
    }
    if parts.is_empty() {
        return Tensor::zeros((0, d_out), x.dtype(), x.device());
    }
    Tensor::cat(&parts, 0)
}

/// `out[rows[i]] += w[i] · y[i]` into `n` zero rows: the gate-weighted combine of routed
/// expert outputs, one graph node instead of a broadcast multiply and an indexed add.
struct WeightedScatter {
    rows: Vec<u32>,
    n: usize,
}

impl WeightedScatter {
    fn check(&self, y: &Layout, w: &Layout) -> CResult<usize> {
        let (m, d) = y.shape().dims2()?;
        if w.shape().elem_count() != m
            || self.rows.len() != m
            || self.rows.iter().any(|&r| r as usize >= self.n)
        {
            candle_core::bail!(
                "weighted scatter: y {:?}, w {:?}, {} rows into {}",
                y.shape(),
                w.shape(),
                self.rows.len(),
                self.n
            )
        }
        Ok(d)
    }
}

impl CustomOp2 for WeightedScatter {
    fn name(&self) -> &'static str {
        "routelm-weighted-scatter"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let d = self.check(l1, l2)?;
        let y = f32_slice(s1, l1, "weighted scatter")?;
        let w = f32_slice(s2, l2, "weighted scatter")?;
        let mut out = vec![0f32; self.n * d];
        // sequential: several entries add into the same row
        for (i, &r) in self.rows.iter().enumerate() {
            let o = &mut out[r as usize * d..(r as usize + 1) * d];
            for (o, &v) in o.iter_mut().zip(&y[i * d..(i + 1) * d]) {
                *o += w[i] * v;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((self.n, d))))
    }
    fn bwd(
        &self,
        y: &Tensor,
        w: &Tensor,
        _out: &Tensor,
        dout: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let (m, d) = y.dims2()?;
        let both = y.apply_op3_no_bwd(
            &w.contiguous()?,
            &dout.contiguous()?,
            &WeightedScatterBwd {
                rows: self.rows.clone(),
            },
        )?;
        let dy = both.narrow(0, 0, m * d)?.reshape((m, d))?;
        let dw = both.narrow(0, m * d, m)?.reshape(w.shape())?;
        Ok((Some(dy), Some(dw)))
    }
}

/// `dy[i] = w[i] · dout[rows[i]]` and `dw[i] = dout[rows[i]] · y[i]`, in one buffer.
struct WeightedScatterBwd {
    rows: Vec<u32>,
}

impl CustomOp3 for WeightedScatterBwd {
    fn name(&self) -> &'static str {
        "routelm-weighted-scatter-bwd"
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
        let y = f32_slice(s1, l1, "weighted scatter bwd")?;
        let w = f32_slice(s2, l2, "weighted scatter bwd")?;
        let dout = f32_slice(s3, l3, "weighted scatter bwd")?;
        let (m, d) = l1.shape().dims2()?;
        let mut out = output_buffer(m * d + m);
        let (dy, dw) = out.split_at_mut(m * d);
        dy.par_chunks_mut(d.max(1))
            .zip(dw.par_iter_mut())
            .enumerate()
            .for_each(|(i, (dyi, dwi))| {
                let r = self.rows[i] as usize;
                let g = &dout[r * d..(r + 1) * d];
                let yi = &y[i * d..(i + 1) * d];
                let mut dot = 0f32;
                for ((o, &gv), &yv) in dyi.iter_mut().zip(g).zip(yi) {
                    *o = w[i] * gv;
                    dot += gv * yv;
                }
                *dwi = dot;
            });
        Ok((CpuStorage::F32(out), Shape::from(m * d + m)))
    }
}

/// `out[rows[i]] += w[i] · y[i]` for `y: (M, d)`, `w: (M)`, into `n` rows that start at
/// zero (`rows[i] < n`). f32 on the CPU runs one fused op; otherwise a broadcast multiply
/// and an indexed add.
pub fn weighted_scatter(y: &Tensor, w: &Tensor, rows: &[u32], n: usize) -> CResult<Tensor> {
    if y.device().is_cpu() && y.dtype() == DType::F32 && w.dtype() == DType::F32 {
        return y.contiguous()?.apply_op2(
            &w.contiguous()?,
            WeightedScatter {
                rows: rows.to_vec(),
                n,
            },
        );
    }
    weighted_scatter_reference(y, w, rows, n)
}

/// [`weighted_scatter`] from candle's own ops.
pub fn weighted_scatter_reference(
    y: &Tensor,
    w: &Tensor,
    rows: &[u32],
    n: usize,
) -> CResult<Tensor> {
    let d = y.dim(1)?;
    let out = Tensor::zeros((n, d), y.dtype(), y.device())?;
    let idx = Tensor::new(rows, y.device())?;
    let wy = y.broadcast_mul(&w.reshape((rows.len(), 1))?)?;
    out.index_add(&idx, &wy, 0)
}

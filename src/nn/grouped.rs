//! Grouped matrix products for Mixture-of-Experts dispatch: the rows of `x`, sorted by
//! expert, times each expert's own weight, `y[rows of e] = x[rows of e] · W_eᵀ`, with the
//! experts' weights stacked in one `(E·out, in)` tensor. One graph node (and one backward)
//! for all the experts of a layer instead of a gather, three matmuls, a weighting and a
//! full-size gradient per expert.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::bf16::{product, Strided};
use super::ops::{f32_slice, output_buffer, sigmoid, storage_f32, swiglu_grads};

type CResult<T> = candle_core::Result<T>;

/// Groups of rows `offsets[e]..offsets[e + 1]`: how many.
fn group_count(offsets: &[usize]) -> usize {
    offsets.len().saturating_sub(1)
}

/// Group `e`'s first row and row count.
fn group_rows(offsets: &[usize], e: usize) -> (usize, usize) {
    (offsets[e], offsets[e + 1] - offsets[e])
}

/// Split `out` into one mutable slice per group, `len(e)` values each.
fn split_groups(
    mut out: &mut [f32],
    groups: usize,
    len: impl Fn(usize) -> usize,
) -> Vec<&mut [f32]> {
    let mut parts = Vec::with_capacity(groups);
    for e in 0..groups {
        let (head, tail) = out.split_at_mut(len(e));
        parts.push(head);
        out = tail;
    }
    parts
}

/// `y[offsets[e]..offsets[e+1]] = x[offsets[e]..offsets[e+1]] · W_eᵀ` for `x: (N, in)` and
/// the experts' weights stacked as `w: (E·out, in)`, from candle's own ops (narrow, matmul,
/// concatenate): the reference, and the path of dtypes and devices the fused op does not
/// cover.
pub fn grouped_matmul_reference(x: &Tensor, w: &Tensor, offsets: &[usize]) -> CResult<Tensor> {
    let groups = group_count(offsets);
    let d_out = w.dim(0)? / groups.max(1);
    let mut parts = Vec::new();
    for e in 0..groups {
        let (r0, rows) = group_rows(offsets, e);
        if rows > 0 {
            let we = w.narrow(0, e * d_out, d_out)?;
            parts.push(x.narrow(0, r0, rows)?.matmul(&we.t()?)?);
        }
    }
    if parts.is_empty() {
        return Tensor::zeros((0, d_out), x.dtype(), x.device());
    }
    Tensor::cat(&parts, 0)
}

/// Where a training shard's fused SwiGLU ops put the gradients of their stacked weights,
/// instead of returning them to candle's backward pass (which would add each to a fresh
/// zero tensor: for an MoE layer's experts, two extra passes over three times the dense
/// block's parameters per shard). Keyed by the weight tensor's id; the trainer takes them
/// out after the shard's backward pass and sums the shards in order.
#[derive(Debug, Default)]
pub struct GradSink(std::sync::Mutex<std::collections::HashMap<candle_core::TensorId, Tensor>>);

impl GradSink {
    fn put(&self, w: &Tensor, g: Tensor) -> CResult<()> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let g = match m.remove(&w.id()) {
            Some(prev) => (prev + g)?,
            None => g,
        };
        m.insert(w.id(), g);
        Ok(())
    }

    /// The gradient collected for `w`, if any.
    pub fn take(&self, w: &Tensor) -> Option<Tensor> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&w.id())
    }
}

thread_local! {
    static SINK: std::cell::RefCell<Option<std::sync::Arc<GradSink>>> = const { std::cell::RefCell::new(None) };
}

/// Whether this thread runs under [`with_grad_sink`] (a pass started here must stay on this
/// thread for its fused ops to find the sink).
pub(crate) fn has_grad_sink() -> bool {
    SINK.with(|s| s.borrow().is_some())
}

/// Run `f` with `sink` receiving the stacked-weight gradients of the fused SwiGLU ops that
/// `f` builds on this thread (the trainer wraps each shard's forward pass in it); the
/// previous sink is restored afterwards, so nested runs (a stolen shard) keep their own.
pub fn with_grad_sink<T>(sink: &std::sync::Arc<GradSink>, f: impl FnOnce() -> T) -> T {
    let prev = SINK.with(|s| s.replace(Some(sink.clone())));
    let out = f();
    SINK.with(|s| *s.borrow_mut() = prev);
    out
}

/// An MoE layer's SwiGLU experts on rows sorted by expert, as one graph node:
/// `y_e = (silu(x_e G_eᵀ) ⊙ x_e U_eᵀ) D_eᵀ` for the rows of group `e`, with `[G_e; U_e]`
/// stacked in `gate_up (E·2h, d)` and `D_e` in `down (E·d, h)`. The gate/up products and
/// the hidden activations stay inside the op (kept for the backward, which runs each
/// expert's five products and the SwiGLU derivative on its own rows in one go, while they
/// are in cache): no graph nodes, full-size gradients or extra passes for them.
struct GroupedSwiglu {
    offsets: Vec<usize>,
    bf16: bool,
    /// The forward pass's `[g | u]` rows `(N, 2h)` and hidden rows `(N, h)`.
    saved: std::sync::Mutex<Option<(Vec<f32>, Vec<f32>)>>,
    /// Where the weight gradients go, when training set one ([`with_grad_sink`]).
    sink: Option<std::sync::Arc<GradSink>>,
}

impl GroupedSwiglu {
    /// The units of parallel work `(group, first row, rows)`, in row order: one per group,
    /// or with fewer groups than threads (a dense feed-forward block is one group) each
    /// group's rows split so that every thread gets a share. Every group has at least one.
    fn tasks(&self) -> Vec<(usize, usize, usize)> {
        let groups = group_count(&self.offsets);
        let threads = rayon::current_num_threads();
        let chunks = if groups >= threads {
            1
        } else {
            threads.div_ceil(groups.max(1))
        };
        let mut tasks = Vec::new();
        for e in 0..groups {
            let (r0, rows) = group_rows(&self.offsets, e);
            let pieces = chunks.min(rows).max(1);
            for i in 0..pieces {
                let (a, b) = (rows * i / pieces, rows * (i + 1) / pieces);
                tasks.push((e, r0 + a, b - a));
            }
        }
        tasks
    }

    /// `(N, d, h)` from the shapes of x, gate_up and down.
    fn check(&self, lx: &Layout, lgu: &Layout, ld: &Layout) -> CResult<(usize, usize, usize)> {
        let ((n, d), (r_gu, c_gu), (r_d, h)) = (
            lx.shape().dims2()?,
            lgu.shape().dims2()?,
            ld.shape().dims2()?,
        );
        let groups = group_count(&self.offsets);
        if groups == 0
            || self.offsets[groups] != n
            || c_gu != d
            || r_gu != groups * 2 * h
            || r_d != groups * d
        {
            candle_core::bail!(
                "grouped swiglu: x {:?}, gate_up {:?}, down {:?}, {} groups ending at row {:?}",
                lx.shape(),
                lgu.shape(),
                ld.shape(),
                groups,
                self.offsets.last()
            )
        }
        Ok((n, d, h))
    }
}

impl CustomOp3 for GroupedSwiglu {
    fn name(&self) -> &'static str {
        "routelm-grouped-swiglu"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (n, d, h) = self.check(l1, l2, l3)?;
        let x = f32_slice(s1, l1, self.name())?;
        let gu_w = f32_slice(s2, l2, self.name())?;
        let down_w = f32_slice(s3, l3, self.name())?;
        let tasks = self.tasks();
        let mut y = output_buffer(n * d);
        let mut gu = output_buffer(n * 2 * h);
        let mut hid = output_buffer(n * h);
        let tasks = &tasks;
        let width = |w: usize| move |t: usize| tasks[t].2 * w;
        let parts: Vec<_> = split_groups(&mut y, tasks.len(), width(d))
            .into_iter()
            .zip(split_groups(&mut gu, tasks.len(), width(2 * h)))
            .zip(split_groups(&mut hid, tasks.len(), width(h)))
            .collect();
        let at = |ptr, rs, cs| Strided { ptr, rs, cs };
        parts
            .into_par_iter()
            .zip(tasks)
            .for_each(|(((ye, gue), he), &(e, r0, rows))| {
                // SAFETY: the task's rows of x and its group's weight blocks, read with
                // strides inside them; each output slice is the task's rows, every value
                // written
                unsafe {
                    let xe = at(x.as_ptr().add(r0 * d), d, 1);
                    let gu_e = at(gu_w.as_ptr().add(e * 2 * h * d), 1, d);
                    product(self.bf16, false, rows, 2 * h, d, gue.as_mut_ptr(), xe, gu_e);
                }
                for (o, r) in he.chunks_mut(h.max(1)).zip(gue.chunks(2 * h.max(1))) {
                    let (g, u) = r.split_at(h);
                    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                        *o = g * sigmoid(g) * u;
                    }
                }
                // SAFETY: as above, the hidden rows just written and block e of down
                unsafe {
                    let hx = at(he.as_ptr(), h, 1);
                    let d_e = at(down_w.as_ptr().add(e * d * h), 1, h);
                    product(self.bf16, false, rows, d, h, ye.as_mut_ptr(), hx, d_e);
                }
            });
        *self.saved.lock().unwrap_or_else(|p| p.into_inner()) = Some((gu, hid));
        Ok((CpuStorage::F32(y), Shape::from((n, d))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gate_up: &Tensor,
        down: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self.saved.lock().unwrap_or_else(|p| p.into_inner());
        let Some((gu, hid)) = saved.as_ref() else {
            candle_core::bail!("grouped swiglu: backward before forward")
        };
        let dev = x.device().clone();
        let dy = dy.contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let (gs, gl) = gate_up.storage_and_layout();
        let (ds, dl) = down.storage_and_layout();
        let (ys, yl) = dy.storage_and_layout();
        let (n, d, h) = self.check(xl, gl, dl)?;
        let name = self.name();
        let (x, gu_w, down_w, dy) = (
            storage_f32(&xs, xl, name)?,
            storage_f32(&gs, gl, name)?,
            storage_f32(&ds, dl, name)?,
            storage_f32(&ys, yl, name)?,
        );
        let groups = group_count(&self.offsets);
        let tasks = self.tasks();
        let grads = TaskGrads {
            x,
            gu_w,
            down_w,
            dy,
            gu,
            hid,
            d,
            h,
            bf16: self.bf16,
            // frozen weights (a model trained through adapters) get no gradient
            weights: gate_up.track_op() || down.track_op(),
        };
        let weight_grads = grads.weights;
        let mut dx = output_buffer(n * d);
        let mut dgu_w = output_buffer(groups * 2 * h * d);
        let mut ddown_w = output_buffer(groups * d * h);
        grads.all(&tasks, groups, &mut dx, &mut dgu_w, &mut ddown_w);
        let dgu_w = Tensor::from_vec(dgu_w, (groups * 2 * h, d), &dev)?;
        let ddown_w = Tensor::from_vec(ddown_w, (groups * d, h), &dev)?;
        let dx = Some(Tensor::from_vec(dx, (n, d), &dev)?);
        if !weight_grads {
            return Ok((dx, None, None));
        }
        match &self.sink {
            Some(sink) => {
                sink.put(gate_up, dgu_w)?;
                sink.put(down, ddown_w)?;
                Ok((dx, None, None))
            }
            None => Ok((dx, Some(dgu_w), Some(ddown_w))),
        }
    }
}

/// The operands of [`GroupedSwiglu`]'s backward pass, shared by its tasks.
struct TaskGrads<'a> {
    x: &'a [f32],
    gu_w: &'a [f32],
    down_w: &'a [f32],
    dy: &'a [f32],
    /// The forward pass's `[g | u]` rows and hidden rows.
    gu: &'a [f32],
    hid: &'a [f32],
    d: usize,
    h: usize,
    bf16: bool,
    /// Whether the weights take gradients (not when frozen under adapters).
    weights: bool,
}

impl TaskGrads<'_> {
    /// Every task's share, in parallel: `dx`, and the weight gradients `dgu_w` and
    /// `ddown_w` of each group, straight into their blocks with one task per group, or
    /// summed from the tasks' partial gradients where a group is split.
    fn all(
        &self,
        tasks: &[(usize, usize, usize)],
        groups: usize,
        dx: &mut [f32],
        dgu_w: &mut [f32],
        ddown_w: &mut [f32],
    ) {
        let (d, h) = (self.d, self.h);
        let dx_parts = split_groups(dx, tasks.len(), |t| tasks[t].2 * d);
        if tasks.len() == groups {
            dx_parts
                .into_iter()
                .zip(split_groups(dgu_w, groups, |_| 2 * h * d))
                .zip(split_groups(ddown_w, groups, |_| d * h))
                .collect::<Vec<_>>()
                .into_par_iter()
                .zip(tasks)
                .for_each(|(((dxe, dgue), dde), &task)| self.task(task, dxe, dgue, dde));
            return;
        }
        let partials: Vec<(usize, Vec<f32>, Vec<f32>)> = dx_parts
            .into_par_iter()
            .zip(tasks)
            .map(|(dxe, &task)| {
                let mut pgu = output_buffer(2 * h * d);
                let mut pd = output_buffer(d * h);
                self.task(task, dxe, &mut pgu, &mut pd);
                (task.0, pgu, pd)
            })
            .collect();
        let blocks = split_groups(dgu_w, groups, |_| 2 * h * d)
            .into_iter()
            .zip(split_groups(ddown_w, groups, |_| d * h));
        for (e, (bgu, bd)) in blocks.enumerate() {
            let mut mine = partials.iter().filter(|p| p.0 == e);
            if let Some((_, first_gu, first_d)) = mine.next() {
                bgu.copy_from_slice(first_gu);
                bd.copy_from_slice(first_d);
            }
            for (_, pgu, pd) in mine {
                add_into(bgu, pgu);
                add_into(bd, pd);
            }
        }
    }

    /// One task's rows `(e, r0, rows)` of group `e`: its part of dx into `dxe`, and its
    /// rows' share of the group's weight gradients into `dgue` and `dde` (when the weights
    /// take gradients).
    fn task(
        &self,
        (e, r0, rows): (usize, usize, usize),
        dxe: &mut [f32],
        dgue: &mut [f32],
        dde: &mut [f32],
    ) {
        let (d, h, bf16) = (self.d, self.h, self.bf16);
        let at = |ptr, rs, cs| Strided { ptr, rs, cs };
        let (gue, he) = (&self.gu[r0 * 2 * h..], &self.hid[r0 * h..]);
        let mut dh = output_buffer(rows * h);
        let mut dg = output_buffer(rows * 2 * h);
        // SAFETY: the task's rows of dy, x, the saved [g | u] and hidden rows, and its
        // group's weight blocks, read with strides inside them; the outputs are the
        // task's own slices and the two temporaries, every value written
        unsafe {
            let dye = at(self.dy.as_ptr().add(r0 * d), d, 1);
            // dh = dy_e · D_e
            let d_e = at(self.down_w.as_ptr().add(e * d * h), h, 1);
            product(bf16, false, rows, h, d, dh.as_mut_ptr(), dye, d_e);
            // dD_e = dy_eᵀ · h_e
            if self.weights {
                let dye_t = at(self.dy.as_ptr().add(r0 * d), 1, d);
                let hx = at(he.as_ptr(), h, 1);
                product(bf16, false, d, h, rows, dde.as_mut_ptr(), dye_t, hx);
            }
        }
        for ((o, r), dr) in dg
            .chunks_mut(2 * h.max(1))
            .zip(gue.chunks(2 * h.max(1)))
            .zip(dh.chunks(h.max(1)))
        {
            let (g, u) = r.split_at(h);
            let (og, ou) = o.split_at_mut(h);
            for j in 0..h {
                (og[j], ou[j]) = swiglu_grads(g[j], u[j], dr[j]);
            }
        }
        // SAFETY: as above
        unsafe {
            // dx_e = [dg | du] · [G_e; U_e]
            let dgx = at(dg.as_ptr(), 2 * h, 1);
            let gu_e = at(self.gu_w.as_ptr().add(e * 2 * h * d), d, 1);
            product(bf16, false, rows, d, 2 * h, dxe.as_mut_ptr(), dgx, gu_e);
            // d[G_e; U_e] = [dg | du]ᵀ · x_e
            if self.weights {
                let dgx_t = at(dg.as_ptr(), 1, 2 * h);
                let xe = at(self.x.as_ptr().add(r0 * d), d, 1);
                product(bf16, false, 2 * h, d, rows, dgue.as_mut_ptr(), dgx_t, xe);
            }
        }
    }
}

/// `dst += src`, elementwise.
fn add_into(dst: &mut [f32], src: &[f32]) {
    for (o, v) in dst.iter_mut().zip(src) {
        *o += v;
    }
}

/// The SwiGLU experts of an MoE layer on rows sorted by expert (`offsets`, as for
/// [`grouped_matmul_reference`]): `gate_up (E·2h, d)` holds `[G_e; U_e]` per expert, `down (E·d, h)`
/// holds `D_e`; row `i` of group `e` gives `(silu(x_i G_eᵀ) ⊙ x_i U_eᵀ) D_eᵀ`. f32 on the
/// CPU runs one fused op; elsewhere the grouped products and the SwiGLU one after another.
pub fn grouped_swiglu(
    x: &Tensor,
    gate_up: &Tensor,
    down: &Tensor,
    offsets: &[usize],
    bf16: bool,
) -> CResult<Tensor> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if f32_cpu(x) && f32_cpu(gate_up) && f32_cpu(down) {
        return x.contiguous()?.apply_op3(
            &gate_up.contiguous()?,
            &down.contiguous()?,
            GroupedSwiglu {
                offsets: offsets.to_vec(),
                bf16: bf16 && super::bf16::available(),
                saved: std::sync::Mutex::new(None),
                sink: SINK.with(|s| s.borrow().clone()),
            },
        );
    }
    grouped_swiglu_reference(x, gate_up, down, offsets)
}

/// [`grouped_swiglu`] from the separate grouped products and SwiGLU.
pub fn grouped_swiglu_reference(
    x: &Tensor,
    gate_up: &Tensor,
    down: &Tensor,
    offsets: &[usize],
) -> CResult<Tensor> {
    let gu = grouped_matmul_reference(x, gate_up, offsets)?;
    let h = gu.dim(1)? / 2;
    let hid = super::ops::swiglu_reference(&gu.narrow(1, 0, h)?, &gu.narrow(1, h, h)?)?;
    grouped_matmul_reference(&hid, down, offsets)
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

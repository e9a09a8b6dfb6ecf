//! Fused causal attention for the CPU, as a candle custom op with its backward.
//!
//! Inputs stay in the projections' layout — `q: (b, t, h, d)`, `k, v: (b, t_k, h_kv, d)`,
//! any batch/time/head strides with contiguous `d` (so a KV cache view needs no copy) —
//! and the output is `(b, t, h, d)`: no transposes, no `repeat_kv`, no [T × T] mask.
//! Queries are the last `t` of the `t_k` positions (a KV cache), query `i` sees keys
//! `j <= i + t_k - t`. Work is split over (batch, KV head) pairs; each runs its query heads
//! in row blocks of `BLOCK` and multiplies only the key columns the block can see, with
//! single-threaded `gemm` calls. The backward recomputes the probabilities (no T × T tensor
//! is kept between the passes) and returns dq, dk, dv from one pass.
//! Reference: [`attention_reference`] (composed ops), checked in `tests/gradcheck.rs`.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

type CResult<T> = candle_core::Result<T>;

/// Query rows per block.
const BLOCK: usize = 64;

/// Strided view of a 4-d `(b, t, h, d)` f32 tensor with contiguous `d`.
#[derive(Clone, Copy)]
struct View {
    ptr: *const f32,
    sb: usize,
    st: usize,
    sh: usize,
}

// SAFETY: views point into storages that outlive the parallel section and are only read.
unsafe impl Send for View {}
unsafe impl Sync for View {}

impl View {
    fn new(data: &[f32], l: &Layout, what: &str) -> CResult<(Self, [usize; 4])> {
        let dims = l.shape().dims4()?;
        let s = l.stride();
        if s[3] != 1 {
            candle_core::bail!("causal_attention: {what} must be contiguous in its last dimension")
        }
        // the furthest element must lie inside the storage
        let last = l.start_offset()
            + (dims.0 - 1) * s[0]
            + (dims.1 - 1) * s[1]
            + (dims.2 - 1) * s[2]
            + dims.3;
        if last > data.len() {
            candle_core::bail!("causal_attention: {what} view exceeds its storage")
        }
        // SAFETY: offset checked against the slice length above
        let ptr = unsafe { data.as_ptr().add(l.start_offset()) };
        Ok((
            Self {
                ptr,
                sb: s[0],
                st: s[1],
                sh: s[2],
            },
            [dims.0, dims.1, dims.2, dims.3],
        ))
    }

    /// Pointer to element (b, t, h, 0).
    ///
    /// # Safety
    /// `(b, t, h)` must lie within the dims [`View::new`] validated against the storage,
    /// and the storage must outlive the returned pointer's use.
    unsafe fn at(&self, b: usize, t: usize, h: usize) -> *const f32 {
        // SAFETY: in bounds by the caller's contract, so the offset stays in the allocation
        unsafe { self.ptr.add(b * self.sb + t * self.st + h * self.sh) }
    }
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: parallel tasks write disjoint (batch, head) slices.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The element `offset` past the start (a method, so closures capture the whole
    /// `Sync` wrapper, not the raw field).
    ///
    /// # Safety
    /// `offset` must lie inside the allocation the pointer was taken from, and no other
    /// thread may write the elements the caller writes through the result.
    unsafe fn at(&self, offset: usize) -> *mut f32 {
        // SAFETY: in bounds by the caller's contract
        unsafe { self.0.add(offset) }
    }
}

/// `dst (m×n) = [dst +] scale · lhs (m×k) · rhs (k×n)`, strides as (row, column), on the
/// calling thread.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn mm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const f32,
    rhs_rs: usize,
    rhs_cs: usize,
    scale: f32,
) {
    mm_on(
        Parallelism::None,
        m,
        n,
        k,
        dst,
        dst_rs,
        accumulate,
        lhs,
        lhs_rs,
        lhs_cs,
        rhs,
        rhs_rs,
        rhs_cs,
        scale,
    )
}

/// [`mm`] with the GEMM's own parallelism.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn mm_on(
    par: Parallelism,
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const f32,
    rhs_rs: usize,
    rhs_cs: usize,
    scale: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        1.0,
        scale,
        false,
        false,
        false,
        par,
    );
}

struct Geometry {
    b: usize,
    t: usize,
    tk: usize,
    h: usize,
    hkv: usize,
    /// Query/key width, and the value width (they differ in latent attention).
    d: usize,
    dv: usize,
    /// Keys visible to a query, itself included (usize::MAX: all earlier ones).
    window: usize,
    /// ALiBi biases on the scores.
    alibi: bool,
}

fn geometry(q: [usize; 4], k: [usize; 4], v: [usize; 4], window: usize) -> CResult<Geometry> {
    let g = Geometry {
        b: q[0],
        t: q[1],
        tk: k[1],
        h: q[2],
        hkv: k[2],
        d: q[3],
        dv: v[3],
        window,
        alibi: false,
    };
    if k[..3] != v[..3]
        || k[0] != g.b
        || k[3] != g.d
        || g.hkv == 0
        || !g.h.is_multiple_of(g.hkv)
        || g.t > g.tk
        || g.t == 0
    {
        candle_core::bail!("causal_attention: q {q:?}, k {k:?}, v {v:?} do not fit together")
    }
    Ok(g)
}

/// The q, k and v views of a kernel call's three operands and their geometry.
fn views(
    ops: [(&CpuStorage, &Layout); 3],
    window: usize,
    alibi: bool,
) -> CResult<(View, View, View, Geometry)> {
    let [(s1, l1), (s2, l2), (s3, l3)] = ops;
    let (q, qd) = View::new(cpu_f32(s1)?, l1, "q")?;
    let (k, kd) = View::new(cpu_f32(s2)?, l2, "k")?;
    let (v, vd) = View::new(cpu_f32(s3)?, l3, "v")?;
    let mut g = geometry(qd, kd, vd, window)?;
    g.alibi = alibi;
    Ok((q, k, v, g))
}

/// Scores of one row block against the keys it can see, softmaxed in place into `p`
/// (row stride `g.tk`). Returns the number of key columns used.
#[allow(clippy::too_many_arguments)]
unsafe fn probs(
    g: &Geometry,
    scale: f32,
    q: &View,
    k: &View,
    b: usize,
    h: usize,
    kv: usize,
    i0: usize,
    bl: usize,
    p: &mut [f32],
) -> usize {
    let off = g.tk - g.t;
    let nk = (i0 + bl + off).min(g.tk);
    let slope = g.alibi.then(|| alibi_slopes(g.h)[h]);
    mm(
        bl,
        nk,
        g.d,
        p.as_mut_ptr(),
        g.tk,
        false,
        q.at(b, i0, h),
        q.st,
        1,
        k.at(b, 0, kv),
        1,
        k.st,
        1.0,
    );
    // at the widest vectors this CPU has (the same bits at every width)
    let rows = Rows {
        n0: i0 + off + 1,
        nk,
        window: g.window,
        scale,
        slope,
    };
    super::ops::widest(
        #[inline(always)]
        || softmax_rows(&rows, &mut p[..bl * g.tk], g.tk),
    );
    nk
}

/// What [`softmax_rows`] needs of a row block: row `r` sees keys `..n0 + r` (the last
/// `window` of them) among the block's `nk` columns.
struct Rows {
    n0: usize,
    nk: usize,
    window: usize,
    scale: f32,
    slope: Option<f32>,
}

/// Each row of `p` (stride `tk`) softmaxed over the keys it sees, zero elsewhere; with
/// ALiBi, scale and bias first, otherwise the scale goes into the exponent. Inlined into
/// [`super::ops::widest`]'s loops.
#[inline(always)]
fn softmax_rows(x: &Rows, p: &mut [f32], tk: usize) {
    for (r, row) in p.chunks_exact_mut(tk).enumerate() {
        let row = &mut row[..x.nk];
        let n = x.n0 + r;
        let lo = n.saturating_sub(x.window);
        let s = match x.slope {
            Some(m) => {
                for (j, v) in row[lo..n].iter_mut().enumerate() {
                    *v = *v * x.scale + m * ((lo + j) as f32 - (n - 1) as f32);
                }
                1.0
            }
            None => x.scale,
        };
        super::ops::softmax_in_place(&mut row[lo..n], s);
        row[..lo].iter_mut().for_each(|v| *v = 0.0);
        row[n..].iter_mut().for_each(|v| *v = 0.0);
    }
}

pub(crate) struct CausalAttention {
    pub scale: f32,
    pub window: usize,
    pub alibi: bool,
}

/// BLOOM's ALiBi slopes for `n_heads` heads: `2^(-8i/n)` for `i = 1..=n` when `n` is a
/// power of two; otherwise those of the largest power of two below `n`, then every other
/// slope of the next power of two.
pub fn alibi_slopes(n_heads: usize) -> Vec<f32> {
    if n_heads == 0 {
        return Vec::new();
    }
    let p = 1usize << n_heads.ilog2();
    let base = |n: usize| 2f64.powf(-8.0 / n as f64);
    let mut s: Vec<f32> = (1..=p).map(|i| base(p).powi(i as i32) as f32).collect();
    let extra = (n_heads - p).min(p);
    s.extend((0..extra).map(|i| base(2 * p).powi(2 * i as i32 + 1) as f32));
    s
}

fn cpu_f32(s: &CpuStorage) -> CResult<&[f32]> {
    s.as_slice::<f32>()
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "routelm-causal-attention"
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
        let (q, k, v, g) = views([(s1, l1), (s2, l2), (s3, l3)], self.window, self.alibi)?;
        let mut out = vec![0f32; g.b * g.t * g.h * g.dv];
        let o = OutPtr(out.as_mut_ptr());
        let group = g.h / g.hkv;
        (0..g.b * g.hkv).into_par_iter().for_each(|task| {
            let (b, kv) = (task / g.hkv, task % g.hkv);
            let mut p = vec![0f32; BLOCK.min(g.t) * g.tk];
            for h in kv * group..(kv + 1) * group {
                for i0 in (0..g.t).step_by(BLOCK) {
                    let bl = BLOCK.min(g.t - i0);
                    // SAFETY: all pointers stay inside the validated views; this task alone
                    // writes rows (b, i0..i0+bl, h) of the output.
                    unsafe {
                        let nk = probs(&g, self.scale, &q, &k, b, h, kv, i0, bl, &mut p);
                        let dst = o.at(((b * g.t + i0) * g.h + h) * g.dv);
                        mm(
                            bl,
                            g.dv,
                            nk,
                            dst,
                            g.h * g.dv,
                            false,
                            p.as_ptr(),
                            g.tk,
                            1,
                            v.at(b, 0, kv),
                            v.st,
                            1,
                            1.0,
                        );
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((g.b, g.t, g.h, g.dv))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _o: &Tensor,
        d_out: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d_out = d_out.contiguous()?;
        let all = q.apply_op3_no_bwd(
            k,
            v,
            &CausalAttentionBwd {
                scale: self.scale,
                window: self.window,
                alibi: self.alibi,
                d_out,
            },
        )?;
        let (nq, nk, nv) = (q.elem_count(), k.elem_count(), v.elem_count());
        let dq = all.narrow(0, 0, nq)?.reshape(q.shape())?;
        let dk = all.narrow(0, nq, nk)?.reshape(k.shape())?;
        let dv = all.narrow(0, nq + nk, nv)?.reshape(v.shape())?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// dq, dk, dv concatenated (flat), given the output gradient.
struct CausalAttentionBwd {
    scale: f32,
    window: usize,
    alibi: bool,
    d_out: Tensor,
}

impl CustomOp3 for CausalAttentionBwd {
    fn name(&self) -> &'static str {
        "routelm-causal-attention-bwd"
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
        let (q, k, v, g) = views([(s1, l1), (s2, l2), (s3, l3)], self.window, self.alibi)?;
        let (guard, dl) = self.d_out.storage_and_layout();
        let Storage::Cpu(ds) = &*guard else {
            candle_core::bail!("causal_attention bwd: gradient not on the CPU")
        };
        let (dov, dod) = View::new(cpu_f32(ds)?, dl, "d_out")?;
        let out = [g.b, g.t, g.h, g.dv];
        if dod != out {
            candle_core::bail!("causal_attention bwd: gradient shape {dod:?} for output {out:?}")
        }
        let (nq, nk) = (g.b * g.t * g.h * g.d, g.b * g.tk * g.hkv * g.d);
        let nv = g.b * g.tk * g.hkv * g.dv;
        let mut out = vec![0f32; nq + nk + nv];
        let base = OutPtr(out.as_mut_ptr());
        let group = g.h / g.hkv;
        (0..g.b * g.hkv).into_par_iter().for_each(|task| {
            let (b, kv) = (task / g.hkv, task % g.hkv);
            let rows = BLOCK.min(g.t);
            let mut s = Scratch {
                p: vec![0f32; rows * g.tk],
                dp: vec![0f32; rows * g.tk],
                dk: vec![0f32; g.tk * g.d],
                dv: vec![0f32; g.tk * g.dv],
            };
            let ops = [&q, &k, &v, &dov];
            for h in kv * group..(kv + 1) * group {
                for i0 in (0..g.t).step_by(BLOCK) {
                    let bl = BLOCK.min(g.t - i0);
                    // SAFETY: pointers stay inside the validated views; this task alone writes
                    // dq rows (b, ·, h ∈ group) and dk/dv rows (b, ·, kv).
                    unsafe {
                        let dq = base.at(((b * g.t + i0) * g.h + h) * g.d);
                        self.block(&g, ops, (b, h, kv), i0, bl, &mut s, dq);
                    }
                }
            }
            let (dk, dv) = (&s.dk, &s.dv);
            for j in 0..g.tk {
                let at = ((b * g.tk + j) * g.hkv + kv) * g.d;
                let at_v = ((b * g.tk + j) * g.hkv + kv) * g.dv;
                // SAFETY: rows (b, j, kv) of dk and dv belong to this task alone
                unsafe {
                    std::ptr::copy_nonoverlapping(dk.as_ptr().add(j * g.d), base.at(nq + at), g.d);
                    std::ptr::copy_nonoverlapping(
                        dv.as_ptr().add(j * g.dv),
                        base.at(nq + nk + at_v),
                        g.dv,
                    );
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from(nq + nk + nv)))
    }
}

/// One task's buffers in the backward pass: a block's probabilities and their gradient,
/// and the gradients of its key-value head's keys and values, summed over its heads.
struct Scratch {
    p: Vec<f32>,
    dp: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

impl CausalAttentionBwd {
    /// The gradients of query rows `i0..i0 + bl` of head `h` (sequence `b`, key-value head
    /// `kv`): their dQ written at `dq` (row stride `h · d`), their share of dK and dV added
    /// into the scratch sums.
    ///
    /// # Safety
    /// `ops` (q, k, v, dO) are views validated for `g`, and `dq` points at the first of
    /// `bl` query rows that no one else writes.
    #[allow(clippy::too_many_arguments)]
    unsafe fn block(
        &self,
        g: &Geometry,
        [q, k, v, dov]: [&View; 4],
        (b, h, kv): (usize, usize, usize),
        i0: usize,
        bl: usize,
        s: &mut Scratch,
        dq: *mut f32,
    ) {
        // SAFETY: the caller's promise; every product stays inside its view or buffer
        unsafe {
            let n = probs(g, self.scale, q, k, b, h, kv, i0, bl, &mut s.p);
            let d_o = dov.at(b, i0, h);
            // dV += Pᵀ dO
            let p = s.p.as_ptr();
            mm(
                n,
                g.dv,
                bl,
                s.dv.as_mut_ptr(),
                g.dv,
                true,
                p,
                1,
                g.tk,
                d_o,
                dov.st,
                1,
                1.0,
            );
            // dP = dO Vᵀ
            let vb = v.at(b, 0, kv);
            mm(
                bl,
                n,
                g.dv,
                s.dp.as_mut_ptr(),
                g.tk,
                false,
                d_o,
                dov.st,
                1,
                vb,
                1,
                v.st,
                1.0,
            );
            // dS = scale · P ⊙ (dP − rowsum(dP ⊙ P))
            for r in 0..bl {
                let pr = &s.p[r * g.tk..r * g.tk + n];
                let gr = &mut s.dp[r * g.tk..r * g.tk + n];
                let dot: f32 = pr.iter().zip(gr.iter()).map(|(a, b)| a * b).sum();
                for (x, &pv) in gr.iter_mut().zip(pr) {
                    *x = self.scale * pv * (*x - dot);
                }
            }
            let ds = s.dp.as_ptr();
            // dQ = dS K
            let kb = k.at(b, 0, kv);
            mm(
                bl,
                g.d,
                n,
                dq,
                g.h * g.d,
                false,
                ds,
                g.tk,
                1,
                kb,
                k.st,
                1,
                1.0,
            );
            // dK += dSᵀ Q
            let qb = q.at(b, i0, h);
            mm(
                n,
                g.d,
                bl,
                s.dk.as_mut_ptr(),
                g.d,
                true,
                ds,
                1,
                g.tk,
                qb,
                q.st,
                1,
                1.0,
            );
        }
    }
}

/// Options of one attention call.
#[derive(Debug, Clone)]
pub struct AttentionOptions {
    /// Multiplies the scores (usually `1/sqrt(head_dim)`).
    pub scale: f64,
    /// Sliding window: a query sees itself and the `window - 1` keys before it.
    pub window: Option<usize>,
    /// Scores soft-capped as `cap · tanh(s / cap)` after scaling (Gemma 2).
    pub softcap: Option<f64>,
    /// ALiBi: head `h` adds `slope_h · (j − i)` to the score of query `i`, key `j`
    /// ([`alibi_slopes`]).
    pub alibi: bool,
    /// Query `i` sees keys `j <= i` only (false: every key, an encoder).
    pub causal: bool,
    /// `(h, t, t_k)` added to the scores after scaling (relative position biases).
    pub bias: Option<Tensor>,
}

impl AttentionOptions {
    /// Causal attention with this score scale and nothing else.
    pub fn scaled(scale: f64) -> Self {
        Self {
            scale,
            window: None,
            softcap: None,
            alibi: false,
            causal: true,
            bias: None,
        }
    }
}

/// Attention `softmax(scale · q kᵀ + bias + causal mask) v` with `q: (b, t, h, d)`,
/// `k, v: (b, t_k, h_kv, d)`, giving `(b, t, h, d)`. The fused kernel covers causal f32
/// attention on the CPU without soft-capping or a bias tensor; everything else (encoders,
/// cross-attention, relative positions) takes the composed reference path.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &AttentionOptions,
) -> CResult<Tensor> {
    let fused = q.device().is_cpu()
        && o.softcap.is_none()
        && o.causal
        && o.bias.is_none()
        && [q, k, v].iter().all(|t| t.dtype() == DType::F32);
    if fused {
        let last = |t: &Tensor| -> CResult<Tensor> {
            if t.stride()[3] == 1 {
                Ok(t.clone())
            } else {
                t.contiguous()
            }
        };
        let op = CausalAttention {
            scale: o.scale as f32,
            window: o.window.unwrap_or(usize::MAX),
            alibi: o.alibi,
        };
        last(q)?.apply_op3(&last(k)?, &last(v)?, op)
    } else {
        attention_reference(q, k, v, o)
    }
}

/// Composed-ops reference: transpose to `(b, h, t, d)`, batched matmuls over KV groups,
/// an explicit mask (any device or dtype).
pub fn attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &AttentionOptions,
) -> CResult<Tensor> {
    let (b, t, h, d) = q.dims4()?;
    let (tk, hkv) = (k.dim(1)?, k.dim(2)?);
    let group = h / hkv;
    let q = q
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, hkv, group * t, d))?;
    let k = k.transpose(1, 2)?.contiguous()?;
    let v = v.transpose(1, 2)?.contiguous()?;
    let mut s = (q.matmul(&k.t()?)? * o.scale)?; // (b, hkv, group*t, t_k)
    if let Some(cap) = o.softcap {
        s = ((s / cap)?.tanh()? * cap)?;
    }
    let window = o.window.unwrap_or(usize::MAX);
    let slopes = alibi_slopes(h);
    // rows of query-head group `kv`: head `kv * group + r / t`, position `r % t + (tk - t)`
    let mask: Vec<f32> = (0..hkv * group * t)
        .flat_map(|row| {
            let (kv, r) = (row / (group * t), row % (group * t));
            // (causal only: a cross-attention's t may exceed its t_k)
            let pos = (r % t + tk).saturating_sub(t);
            let m = if o.alibi {
                slopes[kv * group + r / t]
            } else {
                0.0
            };
            (0..tk).map(move |j| {
                if !o.causal {
                    0.0
                } else if j <= pos && pos - j < window {
                    m * (j as f32 - pos as f32)
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    let mut mask = Tensor::from_vec(mask, (hkv, group * t, tk), s.device())?.to_dtype(s.dtype())?;
    if let Some(bias) = &o.bias {
        // (h, t, tk) in the rows' order: head kv·group + r / t, query r % t
        mask = mask.broadcast_add(&bias.reshape((hkv, group * t, tk))?)?;
    }
    let p = candle_nn::ops::softmax(&s.broadcast_add(&mask)?, candle_core::D::Minus1)?;
    let dv = v.dim(3)?;
    p.matmul(&v)?
        .reshape((b, h, t, dv))?
        .transpose(1, 2)?
        .contiguous()
}

//! Fused CPU kernels written as candle custom ops, each with its backward.
//!
//! candle's stock `rms_norm`, `softmax_last_dim` and `rope` have fast forwards but no
//! backward, and composing them from elementwise ops costs several allocations per call.
//! These kernels cover what the transformer needs for training: RMSNorm, causal softmax
//! (mask and scale fused, no [T × T] mask tensor), rotary embedding, and cross-entropy.
//! Each public function falls back to composed tensor ops on devices or dtypes the fused
//! kernel does not cover, so callers never branch. Every kernel is checked against the
//! composed reference and finite differences in `tests/gradcheck.rs`.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

type CResult<T> = candle_core::Result<T>;

/// Rows smaller than this many elements in total are processed on one thread.
const PAR_MIN: usize = 1 << 14;

pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> CResult<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

/// [`f32_slice`] of a tensor's storage, which must be on the CPU.
pub(crate) fn storage_f32<'a>(
    s: &'a candle_core::Storage,
    l: &Layout,
    what: &str,
) -> CResult<&'a [f32]> {
    match s {
        candle_core::Storage::Cpu(c) => f32_slice(c, l, what),
        _ => candle_core::bail!("{what}: expected CPU storage"),
    }
}

/// An output buffer of `n` floats for a kernel to write, zeroed: a safe function never
/// hands out uninitialised floats. Large zeroed blocks come from `calloc` as fresh zero
/// pages; the fill cost is within this machine's noise on `routelm bench train` (455–477
/// ms/step uninitialised, 477–511 zeroed). The largest outputs, the projections', are
/// written uninitialised through `spare_capacity_mut` instead (`nn::linear`).
pub(crate) fn output_buffer(n: usize) -> Vec<f32> {
    vec![0.0; n]
}

/// `dims` with the last dimension replaced by `n`.
pub(crate) fn with_last_dim(dims: &[usize], n: usize) -> Shape {
    let mut d = dims.to_vec();
    if let Some(last) = d.last_mut() {
        *last = n;
    }
    Shape::from(d)
}

fn u32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> CResult<&'a [u32]> {
    let data = s.as_slice::<u32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

/// Run `f(row_index, out_row)` over rows of width `w`, in parallel when the work is large,
/// each row's loops compiled for the widest vectors this CPU has ([`widest`]).
fn for_rows(out: &mut [f32], w: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if out.len() >= PAR_MIN {
        out.par_chunks_mut(w).enumerate().for_each(|(r, o)| {
            widest(
                #[inline(always)]
                || f(r, o),
            )
        });
    } else {
        widest(
            #[inline(always)]
            || {
                for (r, o) in out.chunks_mut(w).enumerate() {
                    f(r, o)
                }
            },
        );
    }
}

/// The widest vector instructions this CPU has, detected once.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Width {
    Baseline,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Width {
    pub(crate) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            static WIDTH: std::sync::OnceLock<Width> = std::sync::OnceLock::new();
            *WIDTH.get_or_init(|| {
                use crate::nn::cpu::{allows, Level};
                let avx2 = allows(Level::Avx2)
                    && is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma");
                if avx2 && allows(Level::Avx512) && is_x86_feature_detected!("avx512f") {
                    Width::Avx512
                } else if avx2 {
                    Width::Avx2
                } else {
                    Width::Baseline
                }
            })
        }
        #[cfg(not(target_arch = "x86_64"))]
        Width::Baseline
    }
}

/// `body()` compiled for the widest vector instructions this CPU has: its loops (with the
/// closures they call inlined) vectorise to 512 or 256 bits instead of baseline x86-64's
/// 128. Elementwise arithmetic gives the same bits at every width (no operation is fused
/// or reordered), so results do not depend on the machine.
///
/// `body` and the closures it calls must be inlined into each width's wrapper, or they
/// stay one baseline copy: mark them `#[inline(always)]` (a large closure called from
/// three wrappers is otherwise left out of line).
#[inline(always)]
pub(crate) fn widest<R>(body: impl FnOnce() -> R) -> R {
    on(Width::detect(), body)
}

/// `body()` compiled for `width` (which this CPU must have).
#[inline(always)]
pub(crate) fn on<R>(width: Width, body: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx2,fma")]
        fn avx512<R>(body: impl FnOnce() -> R) -> R {
            body()
        }
        #[target_feature(enable = "avx2,fma")]
        fn avx2<R>(body: impl FnOnce() -> R) -> R {
            body()
        }
        match width {
            // SAFETY: Width::detect found these features on this CPU
            Width::Avx512 => unsafe { avx512(body) },
            Width::Avx2 => unsafe { avx2(body) },
            Width::Baseline => body(),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = width;
        body()
    }
}

/// Half-precision inputs are normalised in f32; f32 and f64 stay as they are.
fn compute_dtype(d: DType) -> DType {
    match d {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}

fn fused(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

// ---------------------------------------------------------------- exp

/// `e^x` in f32 to about one unit in the last place, written so that loops over it
/// vectorise (libm's `expf` is a scalar call, 7% of a small model's training step).
/// Cody–Waite reduction `x = n ln2 + r`, `|r| ≤ ln2/2`, a degree-6 Taylor polynomial for
/// `e^r` (truncation below 1.2e-7 relative), and `2^n` built in the exponent bits. Below
/// -87 (where `e^x` leaves the normal range) it returns 0; above 88 it saturates at
/// `e^88`.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75; // ln 2 = LN2_HI + LN2_LO, LN2_HI exact in 16 bits
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5·2^23: adding it rounds to an integer
    let xc = x.clamp(-87.0, 88.0);
    let n = (xc * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        p * scale
    }
}

/// Lanes of the partial results in [`sum_of`] and [`max_of`]: independent accumulators
/// let the compiler vectorise a reduction it must otherwise keep in order.
const LANES: usize = 16;

/// Sum of `v`, in `LANES` interleaved partial sums.
#[inline(always)]
pub fn sum_of(v: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = v.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// Maximum of `v` (−∞ when empty; NaNs are skipped as by `f32::max`).
#[inline(always)]
pub fn max_of(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = v.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = a.max(x);
        }
    }
    let rest = chunks.remainder().iter().copied();
    acc.into_iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, f32::max)
}

/// `v ← softmax(scale · v)` in place (max subtracted first); inlined, so that it takes the
/// caller's vector width ([`widest`]).
#[inline(always)]
pub(crate) fn softmax_in_place(v: &mut [f32], scale: f32) {
    let max = max_of(v);
    for x in v.iter_mut() {
        *x = exp((*x - max) * scale);
    }
    let inv = 1.0 / sum_of(v);
    v.iter_mut().for_each(|x| *x *= inv);
}

// ---------------------------------------------------------------- SwiGLU

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

struct RmsNorm {
    eps: f32,
}

fn rstd(x: &[f32], eps: f32) -> f32 {
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

// ---------------------------------------------------------------- causal softmax

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

// ---------------------------------------------------------------- cross-entropy

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

#[cfg(test)]
mod exp_tests {
    /// Against the standard library's `exp` (f64) over the range softmax and sigmoid use.
    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let want = (x as f64).exp();
            let got = super::exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!(super::exp(0.0), 1.0);
        assert_eq!(super::exp(-100.0), 0.0);
        assert_eq!(super::exp(f32::NEG_INFINITY), 0.0);
        assert!(super::exp(f32::NAN).is_nan());
    }

    /// The lane-split reductions against plain folds, with a remainder past the lanes.
    #[test]
    fn lane_reductions() {
        for n in [0usize, 5, 16, 37] {
            let v: Vec<f32> = (0..n).map(|i| ((i * 7919) % 101) as f32 - 50.5).collect();
            let sum: f32 = v.iter().sum();
            assert!((super::sum_of(&v) - sum).abs() < 1e-3, "sum of {n}");
            let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(super::max_of(&v), max, "max of {n}");
        }
    }
}

#[cfg(test)]
mod width_tests {
    use super::*;

    /// The loops of the fused ops give the same bits compiled for every vector width this
    /// CPU has (SwiGLU, GELU, RMS scaling, softmax): nothing is fused or reordered.
    #[test]
    fn every_width_gives_the_same_bits() {
        let n = 4099;
        let x: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 2001) as f32 / 100.0 - 10.0)
            .collect();
        let u: Vec<f32> = (0..n)
            .map(|i| ((i * 104729) % 997) as f32 / 300.0 - 1.5)
            .collect();
        let run = |width: Width| -> Vec<f32> {
            on(width, || {
                let mut out: Vec<f32> = x
                    .iter()
                    .zip(&u)
                    .map(|(&g, &u)| g * sigmoid(g) * u + gelu_tanh(u) + gelu_tanh_grad(g))
                    .collect();
                let r = rstd(&x, 1e-6);
                out.iter_mut().zip(&x).for_each(|(o, &v)| *o += v * r);
                softmax_in_place(&mut out[..1000], 0.5);
                out
            })
        };
        let want = run(Width::Baseline);
        let mut ran = vec!["baseline"];
        #[cfg(target_arch = "x86_64")]
        {
            use crate::nn::cpu::{allows, Level};
            let avx2 = allows(Level::Avx2)
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma");
            for (width, have, name) in [
                (Width::Avx2, avx2, "avx2"),
                (
                    Width::Avx512,
                    avx2 && allows(Level::Avx512) && is_x86_feature_detected!("avx512f"),
                    "avx512",
                ),
            ] {
                if !have {
                    println!(
                        "vector width {name}: SKIPPED (this CPU lacks it, or ROUTELM_CPU caps it)"
                    );
                    continue;
                }
                let got = run(width);
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(a.to_bits(), b.to_bits(), "{name}, value {i}: {a} vs {b}");
                }
                ran.push(name);
            }
        }
        println!("vector widths run: {}", ran.join(", "));
        assert_eq!(Width::detect(), {
            #[cfg(target_arch = "x86_64")]
            {
                match ran.last() {
                    Some(&"avx512") => Width::Avx512,
                    Some(&"avx2") => Width::Avx2,
                    _ => Width::Baseline,
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            Width::Baseline
        });
    }
}

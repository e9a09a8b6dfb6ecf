//! Fused CPU kernels written as candle custom ops, each with its backward.
//!
//! candle's stock `rms_norm`, `softmax_last_dim` and `rope` have fast forwards but no
//! backward, and composing them from elementwise ops costs several allocations per call.
//! These kernels cover what the transformer needs for training: RMSNorm, causal softmax
//! (mask and scale fused, no [T × T] mask tensor), rotary embedding, and cross-entropy.
//! Each public function falls back to composed tensor ops on devices or dtypes the fused
//! kernel does not cover, so callers never branch. Every kernel is checked against the
//! composed reference and finite differences in `tests/gradcheck.rs`.

use candle_core::{CpuStorage, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

type CResult<T> = candle_core::Result<T>;

mod activation;
mod loss;
mod norm;
mod rope;

pub use activation::{gelu, swiglu, swiglu_reference};
pub(crate) use activation::{sigmoid, swiglu_grads};
pub use loss::{cross_entropy, cross_entropy_reference};
pub use norm::{layer_norm, rms_norm, rms_norm_reference};
pub use rope::{rope, rope_reference};

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

/// `v ← exp(v − max v)` in place, unnormalised: returns the max and the sum (a share of a
/// softmax whose parts are merged later); inlined as [`softmax_in_place`].
#[inline(always)]
pub(crate) fn exp_in_place(v: &mut [f32]) -> (f32, f32) {
    let max = max_of(v);
    for x in v.iter_mut() {
        *x = exp(*x - max);
    }
    (max, sum_of(v))
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
    use super::activation::{gelu_tanh, gelu_tanh_grad};
    use super::norm::rstd;
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

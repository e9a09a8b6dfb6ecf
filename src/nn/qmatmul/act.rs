//! Activation rows prepared for the kernels: quantized to 8 bits in blocks of 32 (scale
//! and `d · Σ q` per block) or super-blocks of 256 (scale and sums of 16, for the
//! K-quants), or kept as f32 for the float types.

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::simd;
use crate::weights::quant::GgmlType;

/// How the activations are prepared for a weight type's dot product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ActKind {
    /// Blocks of 32 int8 values with an f32 scale and the block's sum.
    Q8,
    /// Super-blocks of 256 int8 values with an f32 scale and sums of each 16.
    Q8K,
    /// The f32 values themselves (f32, f16, bf16 weights and the K-quants without an
    /// integer kernel).
    F32,
}

pub(super) fn act_kind(ty: GgmlType) -> ActKind {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
            ActKind::Q8
        }
        GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => ActKind::Q8K,
        _ => ActKind::F32,
    }
}

/// Rows of activations prepared for one weight type's dot products.
#[derive(Debug, Clone, Default)]
pub struct QAct {
    pub(super) kind_k: bool,
    pub(super) cols: usize,
    /// int8 values, `cols` per row.
    pub(super) qs: Vec<i8>,
    /// Scale per block (32) or super-block (256).
    pub(super) d: Vec<f32>,
    /// Per 32-block: `d · Σ q` (the 32-element types with a minimum use it).
    pub(super) s: Vec<f32>,
    /// Per 16 values of a super-block: `Σ q`.
    pub(super) bsums: Vec<i32>,
    /// The f32 values (ActKind::F32).
    pub(super) x: Vec<f32>,
}

/// One row of [`QAct`].
#[derive(Clone, Copy)]
pub struct ActRow<'a> {
    pub qs: &'a [i8],
    pub d: &'a [f32],
    pub s: &'a [f32],
    pub bsums: &'a [i32],
    pub x: &'a [f32],
}

impl QAct {
    /// Prepare `m` rows of `x` (`m × cols`) for dot products with weights of type `ty`.
    pub fn new(ty: GgmlType, x: &[f32], cols: usize) -> Self {
        Self::of_kind(act_kind(ty), x, cols)
    }

    pub(super) fn of_kind(kind: ActKind, x: &[f32], cols: usize) -> Self {
        let mut a = Self {
            cols,
            ..Self::default()
        };
        match kind {
            ActKind::F32 => a.x = x.to_vec(),
            ActKind::Q8 => {
                a.qs = vec![0; x.len()];
                a.d = vec![0.0; x.len() / 32];
                a.s = vec![0.0; x.len() / 32];
                quantize_blocks(x, 32, &mut a.qs, &mut a.d, &mut a.s, |_, d, sum, s| {
                    s[0] = d * sum as f32
                });
            }
            ActKind::Q8K => {
                a.kind_k = true;
                a.qs = vec![0; x.len()];
                a.d = vec![0.0; x.len() / 256];
                a.bsums = vec![0; x.len() / 16];
                quantize_blocks(x, 256, &mut a.qs, &mut a.d, &mut a.bsums, |q, _, _, b| {
                    for (b, c) in b.iter_mut().zip(q.chunks_exact(16)) {
                        *b = c.iter().map(|&q| q as i32).sum();
                    }
                });
            }
        }
        a
    }

    /// Row `r`.
    pub fn row(&self, r: usize) -> ActRow<'_> {
        self.rows(r, r + 1)
    }

    /// Rows `r0..r1`, each field's values of those rows one after another.
    pub fn rows(&self, r0: usize, r1: usize) -> ActRow<'_> {
        let c = self.cols;
        if !self.x.is_empty() {
            return ActRow {
                qs: &[],
                d: &[],
                s: &[],
                bsums: &[],
                x: &self.x[r0 * c..r1 * c],
            };
        }
        let nb = c / if self.kind_k { 256 } else { 32 };
        let d = &self.d[r0 * nb..r1 * nb];
        let (s, bsums) = match self.kind_k {
            true => (&[][..], &self.bsums[r0 * c / 16..r1 * c / 16]),
            false => (&self.s[r0 * nb..r1 * nb], &[][..]),
        };
        ActRow {
            qs: &self.qs[r0 * c..r1 * c],
            d,
            s,
            bsums,
            x: &[],
        }
    }
}

/// `x` quantized in blocks of `block` values ([`quantize_block`]) into `qs`, a scale per
/// block into `d`, and `side.len() / d.len()` values per block into `side`, which
/// `fill(block's codes, scale, Σ codes, its side values)` writes. A prompt's rows in
/// parallel, in runs of 2048 values; a decode step's few rows on the calling thread.
fn quantize_blocks<T: Send>(
    x: &[f32],
    block: usize,
    qs: &mut [i8],
    d: &mut [f32],
    side: &mut [T],
    fill: impl Fn(&[i8], f32, i32, &mut [T]) + Sync,
) {
    const RUN: usize = 2048;
    if d.is_empty() {
        return;
    }
    let (blocks, per) = (RUN / block, side.len() / d.len());
    let threads = if x.len() > 8 * RUN {
        rayon::current_num_threads()
    } else {
        1
    };
    x.par_chunks(RUN)
        .with_min_len(x.len().div_ceil(RUN * threads))
        .zip(qs.par_chunks_mut(RUN))
        .zip(
            d.par_chunks_mut(blocks)
                .zip(side.par_chunks_mut(blocks * per)),
        )
        .for_each(|((xr, qr), (dr, sr))| {
            for (((xb, qb), d), s) in xr
                .chunks_exact(block)
                .zip(qr.chunks_exact_mut(block))
                .zip(dr.iter_mut())
                .zip(sr.chunks_exact_mut(per))
            {
                let (scale, sum) = quantize_block(xb, qb);
                *d = scale;
                fill(qb, scale, sum, s);
            }
        });
}

/// Symmetric 8-bit quantization of one block: `q = round(x / d)` with `d = max|x| / 127`
/// (ties to even); returns `d` and `Σ q`.
fn quantize_block(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    #[cfg(target_arch = "x86_64")]
    if x.len().is_multiple_of(32) && q.len() == x.len() && simd::has_avx512() {
        // SAFETY: AVX-512F was detected; both blocks hold the same multiple of 32 values
        return unsafe { quantize_block_avx512(x, q) };
    }
    quantize_block_portable(x, q)
}

/// [`quantize_block`] in plain code, for any block length.
pub(super) fn quantize_block_portable(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    // adding and taking away 1.5 · 2^23 leaves a value under 2^22 in magnitude rounded to
    // an integer, in plain arithmetic the compiler vectorises (`f32::round` is a call to
    // the C library per value on baseline x86-64)
    const ROUND: f32 = 12_582_912.0;
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    for (qi, &xi) in q.iter_mut().zip(x) {
        *qi = ((xi * id + ROUND) - ROUND).clamp(-127.0, 127.0) as i8;
    }
    (d, q.iter().map(|&v| v as i32).sum())
}

/// [`quantize_block`] of a multiple of 32 values, 32 at a time in two 512-bit registers:
/// the same scale and, rounding to nearest even as the portable code does, the same values
/// bit for bit.
///
/// # Safety
/// The CPU has AVX-512F; `x` and `q` hold the same multiple of 32 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn quantize_block_avx512(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    use std::arch::x86_64::*;
    debug_assert!(x.len().is_multiple_of(32) && q.len() == x.len());
    let pair = |i: usize| {
        (
            _mm512_loadu_ps(x.as_ptr().add(i)),
            _mm512_loadu_ps(x.as_ptr().add(i + 16)),
        )
    };
    let mut m = _mm512_setzero_ps();
    for i in (0..x.len()).step_by(32) {
        let (a, b) = pair(i);
        m = _mm512_max_ps(m, _mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    }
    let d = _mm512_reduce_max_ps(m) / 127.0;
    let id = _mm512_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
    let mut sum = _mm512_setzero_si512();
    for i in (0..x.len()).step_by(32) {
        let (a, b) = pair(i);
        // |x · id| ≤ 127 (and a hair), so the saturating narrowing never saturates
        let qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, id));
        let qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, id));
        let out = q.as_mut_ptr().add(i) as *mut __m128i;
        _mm_storeu_si128(out, _mm512_cvtsepi32_epi8(qa));
        _mm_storeu_si128(out.add(1), _mm512_cvtsepi32_epi8(qb));
        sum = _mm512_add_epi32(sum, _mm512_add_epi32(qa, qb));
    }
    (d, _mm512_reduce_add_epi32(sum))
}

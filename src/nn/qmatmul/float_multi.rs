//! Multi-row products ([`MultiDotFn`]) of f32 and bf16 rows on AVX-512: each weight row is
//! read once for 2 to 8 activation rows (several sequences decoded together), instead of
//! once per activation row. Each activation row's arithmetic is exactly that of the
//! one-row kernels (`f32s_512`, `bf16s_512`: the same accumulators, the same order), so a
//! sequence decodes to the same bits alone or in company.

use std::arch::x86_64::*;

use super::simd::tail_dot;
use super::{ActRow, MultiDotFn};
use crate::weights::quant::GgmlType;

/// The multi-row product of float rows of `ty` (f32, bf16), where it has one.
///
/// # Safety
/// The CPU must have AVX-512F, AVX2 and FMA.
pub unsafe fn multi(ty: GgmlType) -> Option<MultiDotFn> {
    match ty {
        GgmlType::F32 => Some(by_rows!(f32s_m)),
        GgmlType::BF16 => Some(by_rows!(bf16s_m)),
        _ => None,
    }
}

/// f32 rows with `M` activation rows: two 16-lane accumulators per activation row over
/// steps of 32 values, summed, reduced, plus the tail, as `f32s_512` does for one.
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn f32s_m<const M: usize>(
    w: &[u8],
    rb: usize,
    acts: &[ActRow<'_>],
    out: *mut f32,
    stride: usize,
) {
    let n = rb / 4;
    assert!(acts.len() == M && acts.iter().all(|a| a.x.len() >= n));
    let rows = w.len() / rb;
    let body = n / 32 * 32;
    let xp: [*const f32; M] = std::array::from_fn(|j| acts[j].x.as_ptr());
    let wp = w.as_ptr() as *const f32;
    for r in 0..rows {
        let row = wp.add(r * n);
        let mut a0 = [_mm512_setzero_ps(); M];
        let mut a1 = [_mm512_setzero_ps(); M];
        let mut i = 0;
        while i < body {
            let w0 = _mm512_loadu_ps(row.add(i));
            let w1 = _mm512_loadu_ps(row.add(i + 16));
            for j in 0..M {
                a0[j] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp[j].add(i)), a0[j]);
                a1[j] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp[j].add(i + 16)), a1[j]);
            }
            i += 32;
        }
        for j in 0..M {
            let tail = tail_dot(GgmlType::F32, row as *const u8, body, &acts[j].x[..n]);
            *out.add(j * stride + r) = _mm512_reduce_add_ps(_mm512_add_ps(a0[j], a1[j])) + tail;
        }
    }
}

/// bf16 rows with `M` activation rows: a cache line of the row per step, its even values
/// (shifted up) and odd ones (masked) against each activation row's even and odd values,
/// one accumulator per activation row, as `bf16s_512` does for one.
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn bf16s_m<const M: usize>(
    w: &[u8],
    rb: usize,
    acts: &[ActRow<'_>],
    out: *mut f32,
    stride: usize,
) {
    let n = rb / 2;
    assert!(acts.len() == M && acts.iter().all(|a| a.x.len() >= n));
    let rows = w.len() / rb;
    let body = n / 32 * 32;
    // each activation row's values split, per 32, into its 16 even then its 16 odd ones
    let mut split = vec![0f32; M * body];
    for (s, a) in split.chunks_exact_mut(body.max(1)).zip(acts) {
        for (s, c) in s.chunks_exact_mut(32).zip(a.x.chunks_exact(32)) {
            for t in 0..16 {
                s[t] = c[2 * t];
                s[16 + t] = c[2 * t + 1];
            }
        }
    }
    let sp: [*const f32; M] = std::array::from_fn(|j| split.as_ptr().wrapping_add(j * body));
    let high = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    let wp = w.as_ptr();
    for r in 0..rows {
        let row = wp.add(r * rb);
        let mut acc = [_mm512_setzero_ps(); M];
        let mut i = 0;
        while i < body {
            let v = _mm512_loadu_si512(row.add(2 * i) as *const _);
            let even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
            let odd = _mm512_castsi512_ps(_mm512_and_si512(v, high));
            for j in 0..M {
                let xe = _mm512_loadu_ps(sp[j].add(i));
                let xo = _mm512_loadu_ps(sp[j].add(i + 16));
                acc[j] = _mm512_fmadd_ps(odd, xo, _mm512_fmadd_ps(even, xe, acc[j]));
            }
            i += 32;
        }
        for j in 0..M {
            let tail = tail_dot(GgmlType::BF16, row, body, &acts[j].x[..n]);
            *out.add(j * stride + r) = _mm512_reduce_add_ps(acc[j]) + tail;
        }
    }
}

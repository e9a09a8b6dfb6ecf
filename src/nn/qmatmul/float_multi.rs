//! Multi-row products ([`MultiDotFn`]) of f32, f16 and bf16 rows: each weight row is read
//! once for 2 to 8 activation rows (several sequences decoded together), instead of once
//! per activation row. Each activation row's arithmetic is exactly that of the one-row
//! kernel of its path (the same accumulators, the same order: `f32s_512` and `bf16s_512`
//! on AVX-512, `f32s_256`, `f16s_256` and `bf16s_256` on AVX2, f16 on both), so a
//! sequence decodes to the same bits alone or in company.

use std::arch::x86_64::*;

use super::simd::{hsum, split_even_odd, tail_dot};
use super::{ActRow, MultiDotFn};
use crate::weights::quant::GgmlType;

/// The AVX-512 path's multi-row product of float rows of `ty`, where it has one (f16 rows
/// stay on 256-bit registers there, as their one-row kernel does).
///
/// # Safety
/// The CPU must have AVX-512F, AVX2, FMA and F16C.
pub unsafe fn multi_512(ty: GgmlType) -> Option<MultiDotFn> {
    match ty {
        GgmlType::F32 => Some(by_rows!(f32s_m)),
        GgmlType::BF16 => Some(by_rows!(bf16s_m)),
        GgmlType::F16 => Some(by_rows!(f16s_m_256)),
        _ => None,
    }
}

/// The AVX2 path's multi-row product of float rows of `ty`, where it has one.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
pub unsafe fn multi_256(ty: GgmlType) -> Option<MultiDotFn> {
    match ty {
        GgmlType::F32 => Some(by_rows!(f32s_m_256)),
        GgmlType::F16 => Some(by_rows!(f16s_m_256)),
        GgmlType::BF16 => Some(by_rows!(bf16s_m_256)),
        _ => None,
    }
}

/// f32 or f16 rows (values of `size` bytes, widened by `load`) with `M` activation rows on
/// 256-bit registers: one 8-lane accumulator per activation row, as `float_rows_256!`
/// does for one.
macro_rules! floats_m_256 {
    ($w:expr, $rb:expr, $acts:expr, $out:expr, $stride:expr, $M:ident, $ty:expr, $size:expr,
     |$p:ident| $load:expr) => {{
        let (w, rb, acts, out, stride): (&[u8], usize, &[ActRow<'_>], *mut f32, usize) =
            ($w, $rb, $acts, $out, $stride);
        let n = rb / $size;
        assert!(acts.len() == $M && acts.iter().all(|a| a.x.len() >= n));
        let rows = w.len() / rb;
        let body = n / 8 * 8;
        let xp: [*const f32; $M] = std::array::from_fn(|j| acts[j].x.as_ptr());
        let wp = w.as_ptr();
        for r in 0..rows {
            let row = wp.add(r * rb);
            let mut acc = [_mm256_setzero_ps(); $M];
            let mut i = 0;
            while i < body {
                let $p = row.add($size * i);
                let wv = $load;
                for j in 0..$M {
                    acc[j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp[j].add(i)), acc[j]);
                }
                i += 8;
            }
            for j in 0..$M {
                let tail = tail_dot($ty, row, body, &acts[j].x[..n]);
                *out.add(j * stride + r) = hsum(acc[j]) + tail;
            }
        }
    }};
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f32s_m_256<const M: usize>(
    w: &[u8],
    rb: usize,
    acts: &[ActRow<'_>],
    out: *mut f32,
    stride: usize,
) {
    floats_m_256!(w, rb, acts, out, stride, M, GgmlType::F32, 4, |p| {
        _mm256_loadu_ps(p as *const f32)
    })
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16s_m_256<const M: usize>(
    w: &[u8],
    rb: usize,
    acts: &[ActRow<'_>],
    out: *mut f32,
    stride: usize,
) {
    floats_m_256!(w, rb, acts, out, stride, M, GgmlType::F16, 2, |p| {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    })
}

/// bf16 rows with `M` activation rows on 256-bit registers: 16 values a step, even ones
/// shifted up and odd ones masked against each activation row's even and odd values, as
/// `bf16s_256` does for one.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bf16s_m_256<const M: usize>(
    w: &[u8],
    rb: usize,
    acts: &[ActRow<'_>],
    out: *mut f32,
    stride: usize,
) {
    let n = rb / 2;
    assert!(acts.len() == M && acts.iter().all(|a| a.x.len() >= n));
    let rows = w.len() / rb;
    let body = n / 16 * 16;
    let split = split_even_odd(acts.iter().map(|a| a.x), body, 16);
    let sp: [*const f32; M] = std::array::from_fn(|j| split.as_ptr().wrapping_add(j * body));
    let high = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
    let wp = w.as_ptr();
    for r in 0..rows {
        let row = wp.add(r * rb);
        let mut acc = [_mm256_setzero_ps(); M];
        let mut i = 0;
        while i < body {
            let v = _mm256_loadu_si256(row.add(2 * i) as *const __m256i);
            let even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
            let odd = _mm256_castsi256_ps(_mm256_and_si256(v, high));
            for j in 0..M {
                let xe = _mm256_loadu_ps(sp[j].add(i));
                let xo = _mm256_loadu_ps(sp[j].add(i + 8));
                acc[j] = _mm256_fmadd_ps(odd, xo, _mm256_fmadd_ps(even, xe, acc[j]));
            }
            i += 16;
        }
        for j in 0..M {
            let tail = tail_dot(GgmlType::BF16, row, body, &acts[j].x[..n]);
            *out.add(j * stride + r) = hsum(acc[j]) + tail;
        }
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
    let split = split_even_odd(acts.iter().map(|a| a.x), body, 32);
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

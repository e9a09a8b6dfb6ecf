//! Products of many activation rows (a prompt) with quantized weights on integers, for
//! CPUs with AVX-512 VNNI: the activations are quantized to 8 bits in blocks of 32 (as a
//! decode step's are), and the weights are repacked, eight rows at a time, into unsigned
//! 8-bit codes with a scale and an offset per row and block of 32 (`w ≈ scale · code −
//! offset`), interleaved four bytes per row so that one `vpdpbusd` adds four products to
//! each of eight rows' sums. A block's sums then take their scales in f32. The weights are
//! repacked once per product and reused by every activation row.
//!
//! Types: the 32-value ones (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and Q4_K/Q5_K (whose scales
//! and minimums are per 32). Q6_K, whose scales are per 16 and whose values are signed,
//! has a kernel of its own ([`kernel_signed`]): its codes stay signed bytes, the
//! activations (quantized per super-block of 256, as llama.cpp's are for the K-quants)
//! take the unsigned side (`q + 128`), and each group of 16 starts its sum at `−128 · Σ
//! codes`, so its sum is exact; the sums take their 8-bit scales in integers and the
//! super-block's scales in f32. Others, and CPUs without VNNI, take the dequantized tiles.

use crate::weights::quant::{half, GgmlType, K45Block};

/// Weight rows interleaved together.
pub const ROWS: usize = 8;

/// Whether [`repack`] takes weights of `ty`.
pub fn supports(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q8_0
            | GgmlType::Q4K
            | GgmlType::Q5K
            | GgmlType::Q6K
    )
}

/// Eight weight rows repacked: for each block of 32 columns, 8 groups of 32 bytes (the
/// 4 codes of group `g` of each row in turn), then 8 scales and 8 offsets (Q6_K: 8
/// scales per super-block; per group of 16, 8 starting sums and 8 integer scales).
#[derive(Default)]
pub struct Packed {
    pub codes: Vec<u8>,
    pub scale: Vec<f32>,
    pub offset: Vec<f32>,
    /// Q6_K: `−128 · Σ codes` and the 8-bit scale per group of 16 and row.
    pub start: Vec<i32>,
    pub iscale: Vec<i32>,
    /// One row's parts on their way in.
    row: Parts,
}

/// One weight row unpacked: a code per value, and per block of 32 a scale and an offset
/// (Q6_K: per super-block of 256 a scale, per group of 16 an 8-bit scale and a starting
/// sum).
#[derive(Default)]
struct Parts {
    codes: Vec<u8>,
    scale: Vec<f32>,
    offset: Vec<f32>,
    start: Vec<i32>,
    iscale: Vec<i32>,
}

/// One row's codes, scales and offsets (as [`Parts`] holds them).
fn unpack_row(ty: GgmlType, row: &[u8], parts: &mut Parts) {
    match ty {
        GgmlType::Q8_0 => unpack_q8_0(row, parts),
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 => {
            unpack_32(ty, row, parts)
        }
        GgmlType::Q4K | GgmlType::Q5K => unpack_k(ty, row, parts),
        GgmlType::Q6K => unpack_q6_k(row, parts),
        _ => unreachable!("supports() gates the types"),
    }
}

/// Q8_0: the signed codes offset by 128.
fn unpack_q8_0(row: &[u8], parts: &mut Parts) {
    let Parts {
        codes,
        scale,
        offset,
        ..
    } = parts;
    for (b, blk) in row.chunks_exact(34).enumerate() {
        let d = half(blk, 0);
        for (c, &q) in codes[32 * b..32 * b + 32].iter_mut().zip(&blk[2..34]) {
            *c = (q as i8 as i16 + 128) as u8;
        }
        scale[b] = d;
        offset[b] = 128.0 * d;
    }
}

/// Q4_0, Q4_1, Q5_0 and Q5_1: each byte's low nibble, then its high one, with the fifth
/// bits of the Q5 types.
fn unpack_32(ty: GgmlType, row: &[u8], parts: &mut Parts) {
    let Parts {
        codes,
        scale,
        offset,
        ..
    } = parts;
    let (size, at) = match ty {
        GgmlType::Q4_0 => (18, 2),
        GgmlType::Q4_1 => (20, 4),
        GgmlType::Q5_0 => (22, 2),
        _ => (24, 4),
    };
    let five = matches!(ty, GgmlType::Q5_0 | GgmlType::Q5_1);
    for (b, blk) in row.chunks_exact(size).enumerate() {
        let d = half(blk, 0);
        let (qh, qs) = match five {
            true => (
                u32::from_le_bytes([blk[at], blk[at + 1], blk[at + 2], blk[at + 3]]),
                &blk[at + 4..at + 20],
            ),
            false => (0, &blk[at..at + 16]),
        };
        let bit = |i: usize| (((qh >> i) & 1) as u8) << 4;
        for (i, &q) in qs.iter().enumerate() {
            codes[32 * b + i] = (q & 0x0F) | bit(i);
            codes[32 * b + 16 + i] = (q >> 4) | bit(16 + i);
        }
        scale[b] = d;
        offset[b] = match ty {
            GgmlType::Q4_0 => 8.0 * d,
            GgmlType::Q5_0 => 16.0 * d,
            _ => -half(blk, 2),
        };
    }
}

/// Q4_K and Q5_K: a scale and an offset per block of 32 of each super-block.
fn unpack_k(ty: GgmlType, row: &[u8], parts: &mut Parts) {
    let Parts {
        codes,
        scale,
        offset,
        ..
    } = parts;
    let five = ty == GgmlType::Q5K;
    let size = if five { 176 } else { 144 };
    for (sb, blk) in row.chunks_exact(size).enumerate() {
        let k = K45Block::new(blk, five);
        for j in 0..8 {
            for i in 0..32 {
                codes[256 * sb + 32 * j + i] = k.code(j, i);
            }
            scale[8 * sb + j] = k.d * k.scales[j] as f32;
            offset[8 * sb + j] = k.dmin * k.mins[j] as f32;
        }
    }
}

/// Q6_K: signed 6-bit codes, a scale per super-block, an 8-bit scale and a starting sum
/// per group of 16.
fn unpack_q6_k(row: &[u8], parts: &mut Parts) {
    let Parts {
        codes,
        scale,
        start,
        iscale,
        ..
    } = parts;
    for (sb, blk) in row.chunks_exact(210).enumerate() {
        let (ql, qh, sc) = (&blk[0..128], &blk[128..192], &blk[192..208]);
        let d = half(blk, 208);
        let out = &mut codes[256 * sb..256 * sb + 256];
        // values 128h + 32s + i: the low nibble (shift 4 · (s / 2)) of byte
        // 32 · (s % 2) + i of the half's 64, the bit pair (shift 2s) of byte i of
        // its 32
        for h in 0..2 {
            for s in 0..4 {
                let low = &ql[64 * h + 32 * (s % 2)..][..32];
                let high = &qh[32 * h..][..32];
                let o = &mut out[128 * h + 32 * s..][..32];
                for i in 0..32 {
                    let l = (low[i] >> (4 * (s / 2))) & 0x0F;
                    let u = (high[i] >> (2 * s)) & 0x03;
                    o[i] = (l | (u << 4)).wrapping_sub(32);
                }
            }
        }
        for (g, group) in out.chunks_exact(16).enumerate() {
            let sum: i32 = group.iter().map(|&c| c as i8 as i32).sum();
            iscale[16 * sb + g] = sc[g] as i8 as i32;
            start[16 * sb + g] = -128 * sum;
        }
        scale[sb] = d;
    }
}

/// Rows `r0..r0 + ROWS` of `w` (`row_bytes` each, `cols` values) repacked; rows past the
/// matrix are zeros.
pub fn repack(
    ty: GgmlType,
    w: &[u8],
    row_bytes: usize,
    rows: usize,
    cols: usize,
    r0: usize,
    out: &mut Packed,
) {
    let nb = cols / 32;
    // Q6_K: a scale per super-block, an 8-bit scale and a starting sum per 16 values
    let (ns, n16) = match ty {
        GgmlType::Q6K => (cols / 256, cols / 16),
        _ => (nb, 0),
    };
    out.codes.resize(nb * 32 * ROWS, 0);
    out.scale.resize(ns * ROWS, 0.0);
    out.offset.resize(nb * ROWS, 0.0);
    out.start.resize(n16 * ROWS, 0);
    out.iscale.resize(n16 * ROWS, 0);
    let mut row = std::mem::take(&mut out.row);
    row.codes.resize(cols, 0);
    row.scale.resize(ns, 0.0);
    row.offset.resize(nb, 0.0);
    row.start.resize(n16, 0);
    row.iscale.resize(n16, 0);
    for k in 0..ROWS {
        let r = r0 + k;
        if r < rows {
            unpack_row(ty, &w[r * row_bytes..(r + 1) * row_bytes], &mut row);
        } else {
            row.codes.iter_mut().for_each(|c| *c = 0);
            row.scale.iter_mut().for_each(|s| *s = 0.0);
            row.offset.iter_mut().for_each(|s| *s = 0.0);
            row.start.iter_mut().for_each(|s| *s = 0);
            row.iscale.iter_mut().for_each(|s| *s = 0);
        }
        for b in 0..nb {
            for g in 0..8 {
                let (at, from) = (b * 256 + g * 32 + 4 * k, 32 * b + 4 * g);
                out.codes[at..at + 4].copy_from_slice(&row.codes[from..from + 4]);
            }
            out.offset[b * ROWS + k] = row.offset[b];
        }
        for b in 0..ns {
            out.scale[b * ROWS + k] = row.scale[b];
        }
        for g in 0..n16 {
            out.start[g * ROWS + k] = row.start[g];
            out.iscale[g * ROWS + k] = row.iscale[g];
        }
    }
    out.row = row;
}

/// `y[r][0..8] = Σ_b (scale_b · d_a[r][b] · Σ codes·a_q − offset_b · s_a[r][b])` for each
/// activation row `r` of `qs` (int8, `cols` per row), with its block scales `d` and `d ·
/// Σ q` sums `s`; the first `valid` of the 8 written at `y + r · stride`.
///
/// # Safety
/// The CPU has AVX-512 VNNI, VL and AVX2 with FMA; `y + r · stride` has `valid` writable
/// values for each of the `m` rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512vnni,avx512vl")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn kernel(
    p: &Packed,
    qs: &[i8],
    d: &[f32],
    s: &[f32],
    m: usize,
    cols: usize,
    y: *mut f32,
    stride: usize,
    valid: usize,
) {
    use std::arch::x86_64::*;
    let nb = cols / 32;
    assert!(qs.len() >= m * cols && d.len() >= m * nb && s.len() >= m * nb);
    assert!(p.codes.len() >= nb * 256 && p.scale.len() >= nb * ROWS);
    let (cp, ap) = (p.codes.as_ptr(), qs.as_ptr() as *const u8);
    let mut r = 0;
    while r < m {
        let n = (m - r).min(4);
        let mut acc = [_mm256_setzero_ps(); 4];
        for b in 0..nb {
            let w = cp.add(b * 256);
            let wv: [__m256i; 8] =
                std::array::from_fn(|g| _mm256_loadu_si256(w.add(32 * g) as *const __m256i));
            let sc = _mm256_loadu_ps(p.scale.as_ptr().add(b * ROWS));
            let off = _mm256_loadu_ps(p.offset.as_ptr().add(b * ROWS));
            for (k, acc) in acc.iter_mut().enumerate().take(n) {
                let row = r + k;
                let a = ap.add(row * cols + 32 * b);
                let mut sum = _mm256_setzero_si256();
                for (g, wg) in wv.iter().enumerate() {
                    let a4 = _mm256_set1_epi32((a.add(4 * g) as *const i32).read_unaligned());
                    sum = _mm256_dpbusd_epi32(sum, *wg, a4);
                }
                let da = _mm256_set1_ps(*d.get_unchecked(row * nb + b));
                let sa = _mm256_set1_ps(*s.get_unchecked(row * nb + b));
                *acc = _mm256_fmadd_ps(_mm256_mul_ps(sc, da), _mm256_cvtepi32_ps(sum), *acc);
                *acc = _mm256_fnmadd_ps(off, sa, *acc);
            }
        }
        for (k, a) in acc.iter().enumerate().take(n) {
            let mut v = [0f32; ROWS];
            _mm256_storeu_ps(v.as_mut_ptr(), *a);
            std::ptr::copy_nonoverlapping(v.as_ptr(), y.add((r + k) * stride), valid.min(ROWS));
        }
        r += n;
    }
}

/// [`kernel`] for Q6_K's signed codes and activations quantized per super-block of 256
/// (scale `d_a`): `y[r][0..8] = Σ_sb d_sb · d_a[r][sb] · Σ_g sc_g · (Σ_16 (a_q + 128) ·
/// code − 128 · Σ_16 code)` over the sixteen groups of 16 `g` of each super-block, the
/// inner sums in integers; `au` holds the activations' int8 values plus 128 as unsigned
/// bytes. Four activation rows share each load of the weights.
///
/// # Safety
/// As [`kernel`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512vnni,avx512vl")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn kernel_signed(
    p: &Packed,
    au: &[u8],
    d: &[f32],
    m: usize,
    cols: usize,
    y: *mut f32,
    stride: usize,
    valid: usize,
) {
    let (nb, nsb) = (cols / 32, cols / 256);
    assert!(au.len() >= m * cols && d.len() >= m * nsb);
    assert!(p.codes.len() >= nb * 256 && p.scale.len() >= nsb * ROWS);
    assert!(p.start.len() >= 2 * nb * ROWS && p.iscale.len() >= 2 * nb * ROWS);
    let mut r = 0;
    while r < m {
        let (a, d, y) = (&au[r * cols..], &d[r * nsb..], y.add(r * stride));
        // SAFETY (both): the caller's guarantees, for rows r.. of the checked lengths
        r += match m - r {
            4.. => signed_rows::<4>(p, a, d, cols, y, stride, valid),
            _ => signed_rows::<1>(p, a, d, cols, y, stride, valid),
        };
    }
}

/// [`kernel_signed`] for `N` activation rows; returns `N`.
///
/// # Safety
/// As [`kernel`], with `m = N`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512vnni,avx512vl")]
unsafe fn signed_rows<const N: usize>(
    p: &Packed,
    au: &[u8],
    d: &[f32],
    cols: usize,
    y: *mut f32,
    stride: usize,
    valid: usize,
) -> usize {
    use std::arch::x86_64::*;
    let nsb = cols / 256;
    let (cp, ap) = (p.codes.as_ptr(), au.as_ptr());
    let vec = |v: &[i32], i: usize| _mm256_loadu_si256(v.as_ptr().add(i * ROWS) as *const __m256i);
    let mut acc = [_mm256_setzero_ps(); N];
    for sb in 0..nsb {
        let mut isum = [_mm256_setzero_si256(); N];
        for b in 8 * sb..8 * sb + 8 {
            let w = cp.add(b * 256);
            let wv: [__m256i; 8] =
                std::array::from_fn(|g| _mm256_loadu_si256(w.add(32 * g) as *const __m256i));
            let (sc0, sc1) = (vec(&p.iscale, 2 * b), vec(&p.iscale, 2 * b + 1));
            let (st0, st1) = (vec(&p.start, 2 * b), vec(&p.start, 2 * b + 1));
            for (k, isum) in isum.iter_mut().enumerate() {
                let a = ap.add(k * cols + 32 * b);
                let a4 =
                    |g: usize| _mm256_set1_epi32((a.add(4 * g) as *const i32).read_unaligned());
                let (mut s0, mut s1) = (st0, st1);
                for g in 0..4 {
                    s0 = _mm256_dpbusd_epi32(s0, a4(g), wv[g]);
                    s1 = _mm256_dpbusd_epi32(s1, a4(g + 4), wv[g + 4]);
                }
                *isum = _mm256_add_epi32(
                    *isum,
                    _mm256_add_epi32(_mm256_mullo_epi32(s0, sc0), _mm256_mullo_epi32(s1, sc1)),
                );
            }
        }
        let dw = _mm256_loadu_ps(p.scale.as_ptr().add(sb * ROWS));
        for (k, acc) in acc.iter_mut().enumerate() {
            let da = _mm256_set1_ps(*d.get_unchecked(k * nsb + sb));
            *acc = _mm256_fmadd_ps(_mm256_mul_ps(dw, da), _mm256_cvtepi32_ps(isum[k]), *acc);
        }
    }
    for (k, a) in acc.iter().enumerate() {
        let mut v = [0f32; ROWS];
        _mm256_storeu_ps(v.as_mut_ptr(), *a);
        std::ptr::copy_nonoverlapping(v.as_ptr(), y.add(k * stride), valid.min(ROWS));
    }
    N
}

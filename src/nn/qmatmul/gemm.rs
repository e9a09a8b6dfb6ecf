//! Products of many activation rows (a prompt) with quantized weights on integers, for
//! CPUs with AVX-512 VNNI: the activations are quantized to 8 bits in blocks of 32 (as a
//! decode step's are), and the weights are repacked, eight rows at a time, into unsigned
//! 8-bit codes with a scale and an offset per row and block of 32 (`w ≈ scale · code −
//! offset`), interleaved four bytes per row so that one `vpdpbusd` adds four products to
//! each of eight rows' sums. A block's sums then take their scales in f32. The weights are
//! repacked once per product and reused by every activation row.
//!
//! Types: the 32-value ones (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and Q4_K/Q5_K (whose scales
//! and minimums are per 32). Others, and CPUs without VNNI, take the dequantized tiles.

use crate::weights::quant::{half, scale_min_k4, GgmlType};

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
    )
}

/// Eight weight rows repacked: for each block of 32 columns, 8 groups of 32 bytes (the
/// 4 codes of group `g` of each row in turn), then 8 scales and 8 offsets.
#[derive(Default)]
pub struct Packed {
    pub codes: Vec<u8>,
    pub scale: Vec<f32>,
    pub offset: Vec<f32>,
    /// One row's codes, scales and offsets on their way in.
    row: (Vec<u8>, Vec<f32>, Vec<f32>),
}

/// One row's codes, scales and offsets, per block of 32 (`cols / 32` of each).
fn unpack_row(ty: GgmlType, row: &[u8], codes: &mut [u8], scale: &mut [f32], offset: &mut [f32]) {
    match ty {
        GgmlType::Q8_0 => {
            for (b, blk) in row.chunks_exact(34).enumerate() {
                let d = half(blk, 0);
                for (c, &q) in codes[32 * b..32 * b + 32].iter_mut().zip(&blk[2..34]) {
                    *c = (q as i8 as i16 + 128) as u8;
                }
                scale[b] = d;
                offset[b] = 128.0 * d;
            }
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let (size, at) = if ty == GgmlType::Q4_0 {
                (18, 2)
            } else {
                (20, 4)
            };
            for (b, blk) in row.chunks_exact(size).enumerate() {
                let d = half(blk, 0);
                for (i, &q) in blk[at..at + 16].iter().enumerate() {
                    codes[32 * b + i] = q & 0x0F;
                    codes[32 * b + 16 + i] = q >> 4;
                }
                scale[b] = d;
                offset[b] = if ty == GgmlType::Q4_0 {
                    8.0 * d
                } else {
                    -half(blk, 2)
                };
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let (size, at) = if ty == GgmlType::Q5_0 {
                (22, 2)
            } else {
                (24, 4)
            };
            for (b, blk) in row.chunks_exact(size).enumerate() {
                let d = half(blk, 0);
                let qh = u32::from_le_bytes([blk[at], blk[at + 1], blk[at + 2], blk[at + 3]]);
                let qs = &blk[at + 4..at + 20];
                for i in 0..32 {
                    let low = if i < 16 {
                        qs[i] & 0x0F
                    } else {
                        qs[i - 16] >> 4
                    };
                    codes[32 * b + i] = low | ((((qh >> i) & 1) as u8) << 4);
                }
                scale[b] = d;
                offset[b] = if ty == GgmlType::Q5_0 {
                    16.0 * d
                } else {
                    -half(blk, 2)
                };
            }
        }
        GgmlType::Q4K | GgmlType::Q5K => {
            let five = ty == GgmlType::Q5K;
            let size = if five { 176 } else { 144 };
            for (sb, blk) in row.chunks_exact(size).enumerate() {
                let (d, dmin) = (half(blk, 0), half(blk, 2));
                let (s, m) = scale_min_k4(&blk[4..16]);
                let (qh, qs) = if five {
                    (&blk[16..48], &blk[48..176])
                } else {
                    (&blk[0..0], &blk[16..144])
                };
                for j in 0..8 {
                    let (c, h) = (j / 2, j % 2);
                    for i in 0..32 {
                        let mut q = (qs[32 * c + i] >> (4 * h)) & 0x0F;
                        if five {
                            q |= ((qh[i] >> j) & 1) << 4;
                        }
                        codes[256 * sb + 32 * j + i] = q;
                    }
                    scale[8 * sb + j] = d * s[j] as f32;
                    offset[8 * sb + j] = dmin * m[j] as f32;
                }
            }
        }
        _ => unreachable!("supports() gates the types"),
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
    out.codes.resize(nb * 32 * ROWS, 0);
    out.scale.resize(nb * ROWS, 0.0);
    out.offset.resize(nb * ROWS, 0.0);
    let (mut codes, mut scale, mut offset) = std::mem::take(&mut out.row);
    codes.resize(cols, 0);
    scale.resize(nb, 0.0);
    offset.resize(nb, 0.0);
    for k in 0..ROWS {
        let r = r0 + k;
        if r < rows {
            unpack_row(
                ty,
                &w[r * row_bytes..(r + 1) * row_bytes],
                &mut codes,
                &mut scale,
                &mut offset,
            );
        } else {
            codes.iter_mut().for_each(|c| *c = 0);
            scale.iter_mut().for_each(|s| *s = 0.0);
            offset.iter_mut().for_each(|s| *s = 0.0);
        }
        for b in 0..nb {
            for g in 0..8 {
                let at = b * 256 + g * 32 + 4 * k;
                out.codes[at..at + 4].copy_from_slice(&codes[32 * b + 4 * g..32 * b + 4 * g + 4]);
            }
            out.scale[b * ROWS + k] = scale[b];
            out.offset[b * ROWS + k] = offset[b];
        }
    }
    out.row = (codes, scale, offset);
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

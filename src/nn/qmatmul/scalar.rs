//! The portable dot products: integer sums per block, as the SIMD paths compute them,
//! one element at a time. Also the reference the SIMD paths are tested against.

use super::{ActRow, DotFn};
use crate::weights::quant::{half, GgmlType, K45Block};

/// Rows one by one through a one-row dot product.
macro_rules! rows_of {
    ($name:ident, $one:expr) => {
        fn $name(w: &[u8], rb: usize, a: ActRow<'_>, out: &mut [f32]) {
            for (o, r) in out.iter_mut().zip(w.chunks_exact(rb)) {
                *o = $one(r, a);
            }
        }
    };
}

rows_of!(q8_0_rows, q8_0);
rows_of!(q4_0_rows, q4_0);
rows_of!(q4_1_rows, q4_1);
rows_of!(q5_0_rows, q5_0);
rows_of!(q5_1_rows, q5_1);
rows_of!(q4_k_rows, q4_k);
rows_of!(q5_k_rows, q5_k);
rows_of!(q6_k_rows, q6_k);
rows_of!(f32_rows, |w, a: ActRow<'_>| dequantized(
    GgmlType::F32,
    w,
    a.x
));
rows_of!(f16_rows, |w, a: ActRow<'_>| dequantized(
    GgmlType::F16,
    w,
    a.x
));
rows_of!(bf16_rows, |w, a: ActRow<'_>| dequantized(
    GgmlType::BF16,
    w,
    a.x
));
rows_of!(q2_k_rows, |w, a: ActRow<'_>| dequantized(
    GgmlType::Q2K,
    w,
    a.x
));
rows_of!(q3_k_rows, |w, a: ActRow<'_>| dequantized(
    GgmlType::Q3K,
    w,
    a.x
));

/// The portable dot products of `ty`.
pub fn dot(ty: GgmlType) -> DotFn {
    match ty {
        GgmlType::Q8_0 => q8_0_rows,
        GgmlType::Q4_0 => q4_0_rows,
        GgmlType::Q4_1 => q4_1_rows,
        GgmlType::Q5_0 => q5_0_rows,
        GgmlType::Q5_1 => q5_1_rows,
        GgmlType::Q4K => q4_k_rows,
        GgmlType::Q5K => q5_k_rows,
        GgmlType::Q6K => q6_k_rows,
        GgmlType::F32 => f32_rows,
        GgmlType::F16 => f16_rows,
        GgmlType::BF16 => bf16_rows,
        GgmlType::Q2K => q2_k_rows,
        GgmlType::Q3K => q3_k_rows,
    }
}

/// Weights without an integer kernel: 256 values at a time dequantized, then an f32 dot
/// product.
pub(super) fn dequantized(ty: GgmlType, w: &[u8], x: &[f32]) -> f32 {
    let (block, bytes) = ty.block();
    let per = 256 / block;
    let mut buf = [0f32; 256];
    let mut acc = 0f32;
    for (wb, xb) in w.chunks(per * bytes).zip(x.chunks(256)) {
        let n = xb.len();
        crate::weights::quant::dequantize_into(ty, wb, &mut buf[..n]);
        acc += buf[..n].iter().zip(xb).map(|(p, q)| p * q).sum::<f32>();
    }
    acc
}

fn idot(w: impl Iterator<Item = i32>, a: &[i8]) -> i32 {
    w.zip(a).map(|(p, &q)| p * q as i32).sum()
}

/// The 32 values of a Q4 block's 16 bytes: low nibbles first, then high.
fn nibbles(qs: &[u8]) -> impl Iterator<Item = i32> + '_ {
    (0..32).map(move |i| match i < 16 {
        true => (qs[i] & 0x0F) as i32,
        false => (qs[i - 16] >> 4) as i32,
    })
}

/// The 32 five-bit values of a Q5 block (nibbles plus the bits of `qh`).
fn fives(qh: u32, qs: &[u8]) -> impl Iterator<Item = i32> + '_ {
    nibbles(qs)
        .enumerate()
        .map(move |(i, v)| v | ((((qh >> i) & 1) as i32) << 4))
}

fn q8_0(w: &[u8], a: ActRow<'_>) -> f32 {
    let mut acc = 0f32;
    for (b, blk) in w.chunks_exact(34).enumerate() {
        let s = idot(blk[2..34].iter().map(|&q| q as i8 as i32), &a.qs[b * 32..]);
        acc += half(blk, 0) * a.d[b] * s as f32;
    }
    acc
}

fn q4_0(w: &[u8], a: ActRow<'_>) -> f32 {
    let mut acc = 0f32;
    for (b, blk) in w.chunks_exact(18).enumerate() {
        let s = idot(nibbles(&blk[2..18]).map(|v| v - 8), &a.qs[b * 32..]);
        acc += half(blk, 0) * a.d[b] * s as f32;
    }
    acc
}

fn q4_1(w: &[u8], a: ActRow<'_>) -> f32 {
    let mut acc = 0f32;
    for (b, blk) in w.chunks_exact(20).enumerate() {
        let s = idot(nibbles(&blk[4..20]), &a.qs[b * 32..]);
        acc += half(blk, 0) * a.d[b] * s as f32 + half(blk, 2) * a.s[b];
    }
    acc
}

fn qh(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn q5_0(w: &[u8], a: ActRow<'_>) -> f32 {
    let mut acc = 0f32;
    for (b, blk) in w.chunks_exact(22).enumerate() {
        let s = idot(
            fives(qh(blk, 2), &blk[6..22]).map(|v| v - 16),
            &a.qs[b * 32..],
        );
        acc += half(blk, 0) * a.d[b] * s as f32;
    }
    acc
}

fn q5_1(w: &[u8], a: ActRow<'_>) -> f32 {
    let mut acc = 0f32;
    for (b, blk) in w.chunks_exact(24).enumerate() {
        let s = idot(fives(qh(blk, 4), &blk[8..24]), &a.qs[b * 32..]);
        acc += half(blk, 0) * a.d[b] * s as f32 + half(blk, 2) * a.s[b];
    }
    acc
}

/// Q4_K and Q5_K: sub-block `j` of 32 is the low (even `j`) or high nibbles of
/// `qs[32 (j / 2)..]`, plus bit `j` of each `qh` byte for Q5_K; value `d s_j q − dmin m_j`.
fn q45_k(w: &[u8], a: ActRow<'_>, five: bool) -> f32 {
    let bytes = if five { 176 } else { 144 };
    let mut acc = 0f32;
    for (b, blk) in w.chunks_exact(bytes).enumerate() {
        let k = K45Block::new(blk, five);
        let aq = &a.qs[b * 256..(b + 1) * 256];
        let bs = &a.bsums[b * 16..(b + 1) * 16];
        let (mut sum, mut mins) = (0i32, 0i32);
        for j in 0..8 {
            let q = (0..32).map(|i| k.code(j, i) as i32);
            sum += k.scales[j] as i32 * idot(q, &aq[j * 32..]);
            mins += k.mins[j] as i32 * (bs[2 * j] + bs[2 * j + 1]);
        }
        acc += a.d[b] * (k.d * sum as f32 - k.dmin * mins as f32);
    }
    acc
}

fn q4_k(w: &[u8], a: ActRow<'_>) -> f32 {
    q45_k(w, a, false)
}

fn q5_k(w: &[u8], a: ActRow<'_>) -> f32 {
    q45_k(w, a, true)
}

/// Q6_K: piece `p` of 32 (`h = p / 4`, `s = p % 4`) takes its low 4 bits from
/// `ql[64 h + 32 (s % 2)..]` (nibble `s / 2`) and 2 high bits from `qh[32 h..]` (bits
/// `2 s`); value `d sc_i (q − 32)` with a scale per 16.
fn q6_k(w: &[u8], a: ActRow<'_>) -> f32 {
    let mut acc = 0f32;
    for (b, blk) in w.chunks_exact(210).enumerate() {
        let (ql, qh, scales) = (&blk[0..128], &blk[128..192], &blk[192..208]);
        let aq = &a.qs[b * 256..(b + 1) * 256];
        let bs = &a.bsums[b * 16..(b + 1) * 16];
        let mut sum = 0i32;
        for p in 0..8 {
            let (h, s) = (p / 4, p % 4);
            let q: [i32; 32] = std::array::from_fn(|i| {
                let low = (ql[64 * h + 32 * (s % 2) + i] >> (4 * (s / 2))) & 0x0F;
                let high = (qh[32 * h + i] >> (2 * s)) & 0x03;
                (low | (high << 4)) as i32
            });
            for g in 0..2 {
                let i = 2 * p + g;
                let part = idot(
                    q[16 * g..16 * g + 16].iter().copied(),
                    &aq[32 * p + 16 * g..],
                );
                sum += scales[i] as i8 as i32 * (part - 32 * bs[i]);
            }
        }
        acc += half(blk, 208) * a.d[b] * sum as f32;
    }
    acc
}

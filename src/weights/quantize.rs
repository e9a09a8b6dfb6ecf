//! Quantization of f32 values into ggml's block types (the inverse of
//! [`super::quant::dequantize_into`]), for `routelm quantize`.
//!
//! * Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 use ggml's reference rounding (one scale per 32 values from the
//!   block's extreme values), so they give the bytes llama.cpp's reference quantizer gives.
//! * Q4_K and Q6_K choose each sub-block's scale (and Q4_K's minimum) by a small search:
//!   candidate scales around the one that maps the extremes onto the end codes, each
//!   followed by a least-squares refit of scale and offset to the codes it gives, keeping
//!   the one with the least squared error. The sub-block scales are then quantized to 6
//!   (Q4_K) or 8 (Q6_K) bits against the super-block's f16 scale, and the values are
//!   coded against the scales as stored.

use half::{bf16, f16};
use rayon::prelude::*;

use super::quant::GgmlType;

/// The values `x` (a whole number of blocks) in `ty`'s stored form; `None` for a type
/// routelm does not write or a length that is not whole blocks.
pub fn quantize(ty: GgmlType, x: &[f32]) -> Option<Vec<u8>> {
    let (block, bytes) = ty.block();
    if !x.len().is_multiple_of(block) {
        return None;
    }
    if !WRITTEN.contains(&ty) {
        return None;
    }
    // runs of 64 blocks in parallel (the K-quants' scale search is the costly part)
    let runs: Vec<Vec<u8>> = x
        .par_chunks(64 * block)
        .map(|run| blocks(ty, run, bytes))
        .collect();
    Some(runs.concat())
}

/// Whole blocks of `x` in `ty` (one of [`WRITTEN`]).
fn blocks(ty: GgmlType, x: &[f32], bytes: usize) -> Vec<u8> {
    let block = ty.block().0;
    let mut out = Vec::with_capacity(x.len() / block * bytes);
    for b in x.chunks_exact(block) {
        match ty {
            GgmlType::F32 => out.extend_from_slice(&b[0].to_le_bytes()),
            GgmlType::F16 => out.extend_from_slice(&f16::from_f32(b[0]).to_le_bytes()),
            GgmlType::BF16 => out.extend_from_slice(&bf16::from_f32(b[0]).to_le_bytes()),
            GgmlType::Q8_0 => q8_0(b, &mut out),
            GgmlType::Q4_0 => q4_0(b, &mut out),
            GgmlType::Q4_1 => q4_1(b, &mut out),
            GgmlType::Q5_0 => q5(b, &mut out, false),
            GgmlType::Q5_1 => q5(b, &mut out, true),
            GgmlType::Q4K => q4_k(b, &mut out),
            GgmlType::Q6K => q6_k(b, &mut out),
            _ => unreachable!("quantize checks the type"),
        }
    }
    out
}

/// The types [`quantize`] writes.
pub const WRITTEN: [GgmlType; 10] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q4K,
    GgmlType::Q6K,
];

/// An f16 and the f32 it stands for.
fn f16_of(v: f32) -> ([u8; 2], f32) {
    let h = f16::from_f32(v);
    (h.to_le_bytes(), h.to_f32())
}

fn recip(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// `d = max|x| / 127`, `q = round(x / d)`.
fn q8_0(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = recip(d);
    out.extend_from_slice(&f16_of(d).0);
    out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
}

/// `d = m / −8` for the value `m` of largest magnitude, `q = min(15, ⌊x / d + 8.5⌋)`;
/// low nibbles hold values 0..16, high nibbles 16..32.
fn q4_0(x: &[f32], out: &mut Vec<u8>) {
    let m = x
        .iter()
        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    let d = m / -8.0;
    let id = recip(d);
    out.extend_from_slice(&f16_of(d).0);
    let code = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
    out.extend((0..16).map(|j| code(x[j]) | (code(x[j + 16]) << 4)));
}

/// `d = (max − min) / 15`, `q = min(15, ⌊(x − min) / d + 0.5⌋)`, minimum stored.
fn q4_1(x: &[f32], out: &mut Vec<u8>) {
    let (lo, hi) = x
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let d = (hi - lo) / 15.0;
    let id = recip(d);
    out.extend_from_slice(&f16_of(d).0);
    out.extend_from_slice(&f16_of(lo).0);
    let code = |v: f32| (((v - lo) * id + 0.5) as i8).min(15) as u8;
    out.extend((0..16).map(|j| code(x[j]) | (code(x[j + 16]) << 4)));
}

/// Q5_0 (`d = m / −16` for the value of largest magnitude, `q = min(31, ⌊x / d + 16.5⌋)`)
/// and Q5_1 (`d = (max − min) / 31`, minimum stored): low nibbles as Q4's, the fifth
/// bits of the 32 values in one u32.
fn q5(x: &[f32], out: &mut Vec<u8>, with_min: bool) {
    let (d, lo) = if with_min {
        let (lo, hi) = x
            .iter()
            .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        ((hi - lo) / 31.0, lo)
    } else {
        let m = x
            .iter()
            .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        (m / -16.0, 0.0)
    };
    let id = recip(d);
    out.extend_from_slice(&f16_of(d).0);
    let code: Vec<u8> = x
        .iter()
        .map(|&v| {
            let c = if with_min {
                (v - lo) * id + 0.5
            } else {
                v * id + 16.5
            };
            (c as i8).min(31) as u8
        })
        .collect();
    if with_min {
        out.extend_from_slice(&f16_of(lo).0);
    }
    let qh = code
        .iter()
        .enumerate()
        .fold(0u32, |h, (i, &c)| h | (((c >> 4) as u32 & 1) << i));
    out.extend_from_slice(&qh.to_le_bytes());
    out.extend((0..16).map(|j| (code[j] & 0x0F) | ((code[j + 16] & 0x0F) << 4)));
}

/// Least-squares fit of `x ≈ a · q + b` to codes `q`: `(a, b)`; `b` is held at 0 when
/// `no_offset`, and kept ≤ 0 otherwise (Q4_K stores a non-negative minimum `−b`).
fn refit(x: &[f32], q: &[f32], no_offset: bool) -> (f32, f32) {
    let n = x.len() as f32;
    let (sq, sx) = (q.iter().sum::<f32>(), x.iter().sum::<f32>());
    let sqq: f32 = q.iter().map(|v| v * v).sum();
    let sqx: f32 = q.iter().zip(x).map(|(a, b)| a * b).sum();
    let through_zero = || {
        if sqq > 0.0 {
            (sqx / sqq, 0.0)
        } else {
            (0.0, 0.0)
        }
    };
    if no_offset {
        return through_zero();
    }
    let det = n * sqq - sq * sq;
    if det <= 0.0 {
        return through_zero();
    }
    let a = (n * sqx - sq * sx) / det;
    let b = (sx - a * sq) / n;
    if b > 0.0 {
        through_zero()
    } else {
        (a, b)
    }
}

/// The best `(scale, offset)` of one sub-block for codes `0..=levels` (with an offset)
/// or `−half..half` (without): candidate inverse scales around the one mapping the
/// extremes onto the end codes, each refitted; least squared error wins.
fn fit(x: &[f32], levels: i32, signed: bool) -> (f32, f32) {
    let (lo, hi) = x
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let err = |a: f32, b: f32, q: &[f32]| -> f32 {
        x.iter()
            .zip(q)
            .map(|(v, c)| (v - (a * c + b)).powi(2))
            .sum()
    };
    let mut q = vec![0f32; x.len()];
    let mut best = (0f32, 0f32, f32::MAX);
    if signed {
        // codes −half..half − 1; the largest magnitude onto −half
        let half = (levels + 1) / 2;
        let m = x
            .iter()
            .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        if m == 0.0 {
            return (0.0, 0.0);
        }
        for step in -9..=9 {
            let iscale = -(half as f32 + 0.1 * step as f32) / m;
            for (c, v) in q.iter_mut().zip(x) {
                *c = (v * iscale).round().clamp(-half as f32, (half - 1) as f32);
            }
            let (a, _) = refit(x, &q, true);
            let e = err(a, 0.0, &q);
            if e < best.2 {
                best = (a, 0.0, e);
            }
        }
        return (best.0, 0.0);
    }
    let lo = lo.min(0.0);
    if hi <= lo {
        return (0.0, lo);
    }
    for step in -10..=10 {
        let iscale = (levels as f32 + 0.1 * step as f32) / (hi - lo);
        for (c, v) in q.iter_mut().zip(x) {
            *c = ((v - lo) * iscale).round().clamp(0.0, levels as f32);
        }
        let (a, b) = refit(x, &q, false);
        if a <= 0.0 {
            continue;
        }
        let e = err(a, b, &q);
        if e < best.2 {
            best = (a, b, e);
        }
    }
    if best.2 == f32::MAX {
        return ((hi - lo) / levels as f32, lo);
    }
    (best.0, best.1)
}

/// Q4_K: 8 sub-blocks of 32, `x ≈ (d · sc) · q − dmin · m` with 6-bit `sc`, `m`.
fn q4_k(x: &[f32], out: &mut Vec<u8>) {
    let fits: Vec<(f32, f32)> = x.chunks_exact(32).map(|s| fit(s, 15, false)).collect();
    let max_scale = fits.iter().fold(0f32, |m, f| m.max(f.0));
    let max_min = fits.iter().fold(0f32, |m, f| m.max(-f.1));
    let (d_bytes, d) = f16_of(max_scale / 63.0);
    let (m_bytes, dmin) = f16_of(max_min / 63.0);
    let (id, imin) = (recip(d), recip(dmin));
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for (j, &(a, b)) in fits.iter().enumerate() {
        ls[j] = (a * id).round().clamp(0.0, 63.0) as u8;
        lm[j] = (-b * imin).round().clamp(0.0, 63.0) as u8;
    }
    let mut sc = [0u8; 12];
    for j in 0..4 {
        sc[j] = ls[j] | ((ls[j + 4] >> 4) << 6);
        sc[j + 4] = lm[j] | ((lm[j + 4] >> 4) << 6);
        sc[j + 8] = (ls[j + 4] & 0x0F) | ((lm[j + 4] & 0x0F) << 4);
    }
    let mut q = [0u8; 256];
    for (j, s) in x.chunks_exact(32).enumerate() {
        let dl = d * ls[j] as f32;
        let ml = dmin * lm[j] as f32;
        let idl = recip(dl);
        for (c, v) in q[32 * j..32 * (j + 1)].iter_mut().zip(s) {
            *c = ((v + ml) * idl).round().clamp(0.0, 15.0) as u8;
        }
    }
    out.extend_from_slice(&d_bytes);
    out.extend_from_slice(&m_bytes);
    out.extend_from_slice(&sc);
    for c in 0..4 {
        out.extend((0..32).map(|j| q[64 * c + j] | (q[64 * c + 32 + j] << 4)));
    }
}

/// Q6_K: 16 sub-blocks of 16, `x ≈ (d · sc) · (q − 32)` with signed 8-bit `sc`.
fn q6_k(x: &[f32], out: &mut Vec<u8>) {
    let scales: Vec<f32> = x.chunks_exact(16).map(|s| fit(s, 63, true).0).collect();
    let m = scales
        .iter()
        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    let (d_bytes, d) = f16_of(m / -128.0);
    let id = recip(d);
    let sc: Vec<i8> = scales
        .iter()
        .map(|s| (s * id).round().clamp(-128.0, 127.0) as i8)
        .collect();
    let mut q = [0u8; 256];
    for (j, s) in x.chunks_exact(16).enumerate() {
        let idl = recip(d * sc[j] as f32);
        for (c, v) in q[16 * j..16 * (j + 1)].iter_mut().zip(s) {
            *c = ((v * idl).round().clamp(-32.0, 31.0) + 32.0) as u8;
        }
    }
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for h in 0..2 {
        for j in 0..64 {
            ql[64 * h + j] = (q[128 * h + j] & 0x0F) | ((q[128 * h + 64 + j] & 0x0F) << 4);
        }
        for j in 0..32 {
            qh[32 * h + j] = (0..4)
                .map(|s| ((q[128 * h + 32 * s + j] >> 4) & 3) << (2 * s))
                .fold(0, |a, b| a | b);
        }
    }
    out.extend_from_slice(&ql);
    out.extend_from_slice(&qh);
    out.extend(sc.iter().map(|&s| s as u8));
    out.extend_from_slice(&d_bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::quant::dequantize_into;

    fn round_trip(ty: GgmlType, x: &[f32]) -> Vec<f32> {
        let bytes = quantize(ty, x).unwrap();
        assert_eq!(bytes.len(), ty.bytes_for(x.len()).unwrap(), "{}", ty.name());
        let mut y = vec![0f32; x.len()];
        dequantize_into(ty, &bytes, &mut y);
        y
    }

    fn rel_rmse(x: &[f32], y: &[f32]) -> f64 {
        let e: f64 = x.iter().zip(y).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
        let n: f64 = x.iter().map(|a| (*a as f64).powi(2)).sum();
        (e / n).sqrt()
    }

    /// Gaussian values with a few outliers, as weights have.
    fn weights(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::rng::Rng::new(seed);
        (0..n)
            .map(|i| {
                let v = rng.normal() as f32 * 0.02;
                if i % 97 == 0 {
                    v * 8.0
                } else {
                    v
                }
            })
            .collect()
    }

    /// Every written type reads back through the dequantizer (its bit layout is the one
    /// the reader decodes) within the error its bits allow, and more bits give less error.
    #[test]
    fn quantized_values_read_back_within_their_precision() {
        let x = weights(4096, 1);
        let err = |ty| rel_rmse(&x, &round_trip(ty, &x));
        assert_eq!(round_trip(GgmlType::F32, &x), x);
        assert!(err(GgmlType::F16) < 1e-3);
        assert!(err(GgmlType::BF16) < 5e-3);
        let (q8, q6, q4k, q41, q40) = (
            err(GgmlType::Q8_0),
            err(GgmlType::Q6K),
            err(GgmlType::Q4K),
            err(GgmlType::Q4_1),
            err(GgmlType::Q4_0),
        );
        let (q51, q50) = (err(GgmlType::Q5_1), err(GgmlType::Q5_0));
        println!("relative RMS error: Q8_0 {q8:.4}, Q6_K {q6:.4}, Q5_1 {q51:.4}, Q5_0 {q50:.4}, Q4_K {q4k:.4}, Q4_1 {q41:.4}, Q4_0 {q40:.4}");
        assert!(q50 < q40 && q51 < q41, "a fifth bit, less error");
        assert!(q8 < 0.01 && q6 < 0.03 && q4k < 0.1 && q41 < 0.12 && q40 < 0.15);
        assert!(q8 < q6 && q6 < q4k && q4k < q40, "more bits, less error");
    }

    /// Each value of a Q8_0 block is within half a step of its scale (ggml's reference
    /// rounding) plus the scale's f16 rounding (2⁻¹¹ relative, times codes up to 127),
    /// and a block of zeros stays zeros in every type.
    #[test]
    fn reference_rounding_and_zeros() {
        let x = weights(256, 2);
        let y = round_trip(GgmlType::Q8_0, &x);
        for (b, (xs, ys)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
            let d = xs.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            for (a, c) in xs.iter().zip(ys) {
                assert!(
                    (a - c).abs() <= d * (0.5 + 127.0 / 2048.0) + 1e-7,
                    "block {b}: {a} vs {c}"
                );
            }
        }
        for ty in WRITTEN {
            assert!(
                round_trip(ty, &[0.0; 256]).iter().all(|&v| v == 0.0),
                "{}",
                ty.name()
            );
        }
        assert!(quantize(GgmlType::Q4K, &[0.0; 100]).is_none());
    }
}

//! x86-64 dot products of quantized rows with 8-bit activations, 32 values per 256-bit
//! register. Two instruction sets share the code (one macro, two modules) and differ in
//! the unsigned × signed byte product summed into 32-bit lanes: AVX2 multiplies to 16-bit
//! pairs and adds them (`vpmaddubsw` + `vpmaddwd`), AVX-512 VNNI does it in one
//! instruction (`vpdpbusd`, on 256-bit registers through AVX-512VL). Each is chosen only
//! where [`has_avx2`] / [`has_vnni`] detected it at run time.
//!
//! f32, f16 and bf16 rows are widened to f32 in registers and multiplied with the f32
//! activations (exact products); bf16 on AVX-512 takes a cache line per load.
//!
//! Products stay within range: an unsigned operand is at most 128 (|w| of an int8, or a
//! 4-6 bit quant), a signed one at most 127 in magnitude, so a 16-bit pair sum is at most
//! 2 · 128 · 127 < 2^15.

use super::{ActRow, DotFn, MultiDotFn};
use crate::weights::quant::scale_min_k4;
use crate::weights::quant::GgmlType;

/// AVX2 with FMA and F16C (every AVX2 CPU since Haswell has the three).
pub fn has_avx2() -> bool {
    crate::nn::cpu::allows(crate::nn::cpu::Level::Avx2)
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// AVX-512F (512-bit registers), with AVX2's features.
pub fn has_avx512() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        has_avx2()
            && crate::nn::cpu::allows(crate::nn::cpu::Level::Avx512)
            && is_x86_feature_detected!("avx512f")
    })
}

/// AVX-512 VNNI on 256-bit registers (AVX-512VL), with AVX2's features.
pub fn has_vnni() -> bool {
    has_avx512() && is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl")
}

/// The dot product of a float row's values from `body` on with `x[body..]` (`x` as long
/// as the row): the tail a vector loop leaves, one value at a time, since a vector load
/// would read past the row (and past the file's end on its last row).
///
/// Inlined, with no call for a row of whole vector steps (a call per row cost ~10% of a
/// decode-sized product).
///
/// # Safety
/// `row` points at a row of `x.len()` values of `ty` (f32, f16 or bf16).
#[inline(always)]
pub(super) unsafe fn tail_dot(ty: GgmlType, row: *const u8, body: usize, x: &[f32]) -> f32 {
    if body == x.len() {
        return 0.0;
    }
    let size = ty.block().1;
    let bytes = std::slice::from_raw_parts(row.add(size * body), size * (x.len() - body));
    super::scalar::dequantized(ty, bytes, &x[body..])
}

macro_rules! kernels {
    ($m:ident, $feat:literal, $f32:path, $f16:path, $bf16:path, |$u:ident, $s:ident| $us8:block) => {
        pub mod $m {
            use super::*;
            use std::arch::x86_64::*;

            /// `Σ` over each 4 bytes of `u (unsigned) · s (signed)`, as 8 i32 lanes.
            #[target_feature(enable = $feat)]
            #[inline]
            unsafe fn us8($u: __m256i, $s: __m256i) -> __m256i $us8

            /// Signed × signed: `|w| · sign(w) a`.
            #[target_feature(enable = $feat)]
            #[inline]
            unsafe fn i8s(w: __m256i, a: __m256i) -> __m256i {
                us8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w))
            }

            /// The f16 at `p`.
            #[target_feature(enable = $feat)]
            #[inline]
            unsafe fn half(p: *const u8) -> f32 {
                let bits = u16::from_le_bytes([*p, *p.add(1)]);
                _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
            }

            #[target_feature(enable = $feat)]
            #[inline]
            unsafe fn load(p: *const u8) -> __m256i {
                _mm256_loadu_si256(p as *const __m256i)
            }

            /// The 32 nibbles of 16 bytes: low nibbles first, then high.
            #[target_feature(enable = $feat)]
            #[inline]
            unsafe fn nibbles(p: *const u8) -> __m256i {
                let x = _mm_loadu_si128(p as *const __m128i);
                let both = _mm256_set_m128i(_mm_srli_epi16(x, 4), x);
                _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
            }

            /// `0x10` in byte `i` where bit `i` of the u32 at `p` is set.
            #[target_feature(enable = $feat)]
            #[inline]
            unsafe fn fifth_bits(p: *const u8) -> __m256i {
                let qh = u32::from_le_bytes([*p, *p.add(1), *p.add(2), *p.add(3)]);
                let v = _mm256_set1_epi32(qh as i32);
                let spread = _mm256_setr_epi8(
                    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3,
                    3, 3, 3, 3, 3, 3,
                );
                let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
                let set = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(v, spread), bit), bit);
                _mm256_and_si256(set, _mm256_set1_epi8(0x10))
            }

            /// Dot products of the rows of `w` (`out.len()` rows of `rb` bytes, `nb` blocks
            /// each) with `a`, four rows at a time sharing each activation load:
            /// `$block(row pointer, block index)` gives a block's `(scale, i32 sums,
            /// extra)`, whose `scale · Σ sums + extra` is the block's part of the dot.
            macro_rules! rows {
                ($w:expr, $rb:expr, $bytes:expr, $out:expr, |$row:ident, $b:ident| $block:expr) => {{
                    let nb = $rb / $bytes;
                    let (w, rb, out): (&[u8], usize, &mut [f32]) = ($w, $rb, $out);
                    assert!(w.len() >= out.len() * rb);
                    let wp = w.as_ptr();
                    let mut r = 0;
                    while r + 4 <= out.len() {
                        let mut acc = [_mm256_setzero_ps(); 4];
                        let mut extra = [0f32; 4];
                        for $b in 0..nb {
                            for k in 0..4 {
                                let $row = wp.add((r + k) * rb);
                                // the same block sixteen rows on (four groups ahead), every
                                // cache line it may touch (blocks are not line-aligned),
                                // into L2: an L1 hint keeps fewer lines in flight, and
                                // decoding was 15-40% slower with it
                                let ahead = $row.wrapping_add(16 * rb + $b * $bytes);
                                for line in 0..($bytes as usize + 95) / 64 {
                                    _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(64 * line) as *const i8);
                                }
                                let (d, p, e): (f32, __m256i, f32) = $block;
                                acc[k] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(p), acc[k]);
                                extra[k] += e;
                            }
                        }
                        for k in 0..4 {
                            out[r + k] = hsum(acc[k]) + extra[k];
                        }
                        r += 4;
                    }
                    while r < out.len() {
                        let mut acc = _mm256_setzero_ps();
                        let mut extra = 0f32;
                        for $b in 0..nb {
                            let $row = wp.add(r * rb);
                            let (d, p, e): (f32, __m256i, f32) = $block;
                            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(p), acc);
                            extra += e;
                        }
                        out[r] = hsum(acc) + extra;
                        r += 1;
                    }
                }};
            }

            /// Dot products of every row of `w` (rows of `rb` bytes) with `M` activation
            /// rows at once: each weight block is unpacked once (`$unpack`, from the row
            /// pointer and block index, bound to `$pat`) and multiplied with each activation (`$per`, for
            /// activation `j`, giving the block's `(scale, i32 sums, extra)` as in
            /// `rows!`). The same arithmetic per (row, activation) as `rows!`, so the same
            /// results bit for bit; activation `j`'s product with row `r` goes to
            /// `out[j · stride + r]`.
            macro_rules! rows_m {
                ($M:ident, $w:expr, $rb:expr, $bytes:expr, $out:expr, $stride:expr, $dt:expr, $st:expr,
                 |$row:ident, $b:ident| let $pat:pat = $unpack:expr; scale $dw:expr, extra $ew:expr;
                 |$j:ident| $per:expr) => {{
                    let nb = $rb / $bytes;
                    let (w, rb, out, stride): (&[u8], usize, *mut f32, usize) = ($w, $rb, $out, $stride);
                    let (dt, st): (&[f32], &[f32]) = ($dt, $st);
                    assert!(dt.len() >= 8 * nb && st.len() >= 8 * nb);
                    let rows = w.len() / rb;
                    let wp = w.as_ptr();
                    for r in 0..rows {
                        let $row = wp.add(r * rb);
                        let mut acc = [_mm256_setzero_ps(); $M];
                        let mut extra = _mm256_setzero_ps();
                        for $b in 0..nb {
                            // the same block eight rows on, into L2 (as `rows!` does)
                            let ahead = $row.wrapping_add(8 * rb + $b * $bytes);
                            for line in 0..($bytes as usize + 95) / 64 {
                                _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(64 * line) as *const i8);
                            }
                            let $pat = $unpack;
                            // every activation's block scale and extra term at once (lane j:
                            // activation j), the same products `rows!` takes one at a time
                            let scales = _mm256_mul_ps(_mm256_set1_ps($dw), _mm256_loadu_ps(dt.as_ptr().add(8 * $b)));
                            extra = _mm256_add_ps(extra, _mm256_mul_ps(_mm256_set1_ps($ew), _mm256_loadu_ps(st.as_ptr().add(8 * $b))));
                            for $j in 0..$M {
                                let p: __m256i = $per;
                                let d = _mm256_permutevar8x32_ps(scales, _mm256_set1_epi32($j as i32));
                                acc[$j] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc[$j]);
                            }
                        }
                        let mut e = [0f32; 8];
                        _mm256_storeu_ps(e.as_mut_ptr(), extra);
                        for $j in 0..$M {
                            *out.add($j * stride + r) = hsum(acc[$j]) + e[$j];
                        }
                    }
                }};
            }

            /// Each activation's quants as raw pointers (`M` of them), and the scales and
            /// sums of its blocks transposed, eight lanes a block (lane `j`: activation
            /// `j`), after checking they cover `nb` blocks of `block` values.
            #[inline]
            fn act_ptrs<const M: usize>(acts: &[ActRow<'_>], nb: usize, block: usize, sums: bool) -> ([*const u8; M], Vec<f32>, Vec<f32>) {
                assert!(acts.len() == M && M <= 8);
                let mut dt = vec![0f32; 8 * nb];
                let mut st = vec![0f32; 8 * nb];
                for (j, a) in acts.iter().enumerate() {
                    assert!(a.qs.len() >= block * nb && a.d.len() >= nb && (!sums || a.s.len() >= nb));
                    for b in 0..nb {
                        dt[8 * b + j] = a.d[b];
                        if sums {
                            st[8 * b + j] = a.s[b];
                        }
                    }
                }
                (std::array::from_fn(|j| acts[j].qs.as_ptr() as *const u8), dt, st)
            }

            #[target_feature(enable = $feat)]
            unsafe fn q8_0_m<const M: usize>(w: &[u8], rb: usize, acts: &[ActRow<'_>], out: *mut f32, stride: usize) {
                let (ap, dt, st) = act_ptrs::<M>(acts, rb / 34, 32, false);
                rows_m!(M, w, rb, 34, out, stride, &dt, &st, |row, b| let (q, qa, qs) = {
                    let blk = row.add(34 * b);
                    let q = load(blk.add(2));
                    (q, _mm256_sign_epi8(q, q), half(blk))
                }; scale qs, extra 0.0; |j| us8(qa, _mm256_sign_epi8(load(ap[j].add(32 * b)), q)))
            }

            #[target_feature(enable = $feat)]
            unsafe fn q4_0_m<const M: usize>(w: &[u8], rb: usize, acts: &[ActRow<'_>], out: *mut f32, stride: usize) {
                let (ap, dt, st) = act_ptrs::<M>(acts, rb / 18, 32, false);
                rows_m!(M, w, rb, 18, out, stride, &dt, &st, |row, b| let (q, qa, qs) = {
                    let blk = row.add(18 * b);
                    let q = _mm256_sub_epi8(nibbles(blk.add(2)), _mm256_set1_epi8(8));
                    (q, _mm256_sign_epi8(q, q), half(blk))
                }; scale qs, extra 0.0; |j| us8(qa, _mm256_sign_epi8(load(ap[j].add(32 * b)), q)))
            }

            #[target_feature(enable = $feat)]
            unsafe fn q4_1_m<const M: usize>(w: &[u8], rb: usize, acts: &[ActRow<'_>], out: *mut f32, stride: usize) {
                let (ap, dt, st) = act_ptrs::<M>(acts, rb / 20, 32, true);
                rows_m!(M, w, rb, 20, out, stride, &dt, &st, |row, b| let (q, qs, qm) = {
                    let blk = row.add(20 * b);
                    (nibbles(blk.add(4)), half(blk), half(blk.add(2)))
                }; scale qs, extra qm; |j| us8(q, load(ap[j].add(32 * b))))
            }

            #[target_feature(enable = $feat)]
            unsafe fn q5_0_m<const M: usize>(w: &[u8], rb: usize, acts: &[ActRow<'_>], out: *mut f32, stride: usize) {
                let (ap, dt, st) = act_ptrs::<M>(acts, rb / 22, 32, false);
                rows_m!(M, w, rb, 22, out, stride, &dt, &st, |row, b| let (q, qa, qs) = {
                    let blk = row.add(22 * b);
                    let q = _mm256_or_si256(nibbles(blk.add(6)), fifth_bits(blk.add(2)));
                    let q = _mm256_sub_epi8(q, _mm256_set1_epi8(16));
                    (q, _mm256_sign_epi8(q, q), half(blk))
                }; scale qs, extra 0.0; |j| us8(qa, _mm256_sign_epi8(load(ap[j].add(32 * b)), q)))
            }

            #[target_feature(enable = $feat)]
            unsafe fn q5_1_m<const M: usize>(w: &[u8], rb: usize, acts: &[ActRow<'_>], out: *mut f32, stride: usize) {
                let (ap, dt, st) = act_ptrs::<M>(acts, rb / 24, 32, true);
                rows_m!(M, w, rb, 24, out, stride, &dt, &st, |row, b| let (q, qs, qm) = {
                    let blk = row.add(24 * b);
                    (_mm256_or_si256(nibbles(blk.add(8)), fifth_bits(blk.add(4))), half(blk), half(blk.add(2)))
                }; scale qs, extra qm; |j| us8(q, load(ap[j].add(32 * b))))
            }

            #[target_feature(enable = $feat)]
            pub unsafe fn q8_0(w: &[u8], rb: usize, a: ActRow<'_>, out: &mut [f32]) {
                let nb = rb / 34;
                assert!(a.qs.len() >= 32 * nb && a.d.len() >= nb);
                let (ap, ad) = (a.qs.as_ptr() as *const u8, a.d.as_ptr());
                rows!(w, rb, 34, out, |row, b| {
                    let blk = row.add(34 * b);
                    let p = i8s(load(blk.add(2)), load(ap.add(32 * b)));
                    (half(blk) * *ad.add(b), p, 0.0)
                })
            }

            #[target_feature(enable = $feat)]
            pub unsafe fn q4_0(w: &[u8], rb: usize, a: ActRow<'_>, out: &mut [f32]) {
                let nb = rb / 18;
                assert!(a.qs.len() >= 32 * nb && a.d.len() >= nb);
                let (ap, ad) = (a.qs.as_ptr() as *const u8, a.d.as_ptr());
                rows!(w, rb, 18, out, |row, b| {
                    let blk = row.add(18 * b);
                    let q = _mm256_sub_epi8(nibbles(blk.add(2)), _mm256_set1_epi8(8));
                    (half(blk) * *ad.add(b), i8s(q, load(ap.add(32 * b))), 0.0)
                })
            }

            #[target_feature(enable = $feat)]
            pub unsafe fn q4_1(w: &[u8], rb: usize, a: ActRow<'_>, out: &mut [f32]) {
                let nb = rb / 20;
                assert!(a.qs.len() >= 32 * nb && a.d.len() >= nb && a.s.len() >= nb);
                let (ap, ad, asum) = (a.qs.as_ptr() as *const u8, a.d.as_ptr(), a.s.as_ptr());
                rows!(w, rb, 20, out, |row, b| {
                    let blk = row.add(20 * b);
                    let p = us8(nibbles(blk.add(4)), load(ap.add(32 * b)));
                    (half(blk) * *ad.add(b), p, half(blk.add(2)) * *asum.add(b))
                })
            }

            #[target_feature(enable = $feat)]
            pub unsafe fn q5_0(w: &[u8], rb: usize, a: ActRow<'_>, out: &mut [f32]) {
                let nb = rb / 22;
                assert!(a.qs.len() >= 32 * nb && a.d.len() >= nb);
                let (ap, ad) = (a.qs.as_ptr() as *const u8, a.d.as_ptr());
                rows!(w, rb, 22, out, |row, b| {
                    let blk = row.add(22 * b);
                    let q = _mm256_or_si256(nibbles(blk.add(6)), fifth_bits(blk.add(2)));
                    let q = _mm256_sub_epi8(q, _mm256_set1_epi8(16));
                    (half(blk) * *ad.add(b), i8s(q, load(ap.add(32 * b))), 0.0)
                })
            }

            #[target_feature(enable = $feat)]
            pub unsafe fn q5_1(w: &[u8], rb: usize, a: ActRow<'_>, out: &mut [f32]) {
                let nb = rb / 24;
                assert!(a.qs.len() >= 32 * nb && a.d.len() >= nb && a.s.len() >= nb);
                let (ap, ad, asum) = (a.qs.as_ptr() as *const u8, a.d.as_ptr(), a.s.as_ptr());
                rows!(w, rb, 24, out, |row, b| {
                    let blk = row.add(24 * b);
                    let q = _mm256_or_si256(nibbles(blk.add(8)), fifth_bits(blk.add(4)));
                    let p = us8(q, load(ap.add(32 * b)));
                    (half(blk) * *ad.add(b), p, half(blk.add(2)) * *asum.add(b))
                })
            }

            /// One Q4_K (`five` false) or Q5_K super-block: `(d · d_a, Σ_j s_j Σ q a, −dmin · d_a · Σ_j m_j Σ a)`.
            #[target_feature(enable = $feat)]
            #[inline]
            unsafe fn q45_k_block(blk: *const u8, aq: *const u8, da: f32, bs: *const i32, five: bool) -> (f32, __m256i, f32) {
                let low = _mm256_set1_epi8(0x0F);
                let (sc, mn) = scale_min_k4(std::slice::from_raw_parts(blk.add(4), 12));
                let qs = blk.add(if five { 48 } else { 16 });
                let qh = if five { load(blk.add(16)) } else { _mm256_setzero_si256() };
                let mut sum = _mm256_setzero_si256();
                for c in 0..4 {
                    let x = load(qs.add(32 * c));
                    let q = [
                        _mm256_and_si256(x, low),
                        _mm256_and_si256(_mm256_srli_epi16(x, 4), low),
                    ];
                    for (h, &qv) in q.iter().enumerate() {
                        let j = 2 * c + h;
                        let mut qv = qv;
                        if five {
                            let m = _mm256_set1_epi8((1u8 << j) as i8);
                            let set = _mm256_cmpeq_epi8(_mm256_and_si256(qh, m), m);
                            qv = _mm256_or_si256(qv, _mm256_and_si256(set, _mm256_set1_epi8(0x10)));
                        }
                        let p = us8(qv, load(aq.add(32 * j)));
                        sum = _mm256_add_epi32(sum, _mm256_mullo_epi32(p, _mm256_set1_epi32(sc[j] as i32)));
                    }
                }
                let m: i32 = (0..8).map(|j| mn[j] as i32 * (*bs.add(2 * j) + *bs.add(2 * j + 1))).sum();
                (half(blk) * da, sum, -half(blk.add(2)) * da * m as f32)
            }

            #[target_feature(enable = $feat)]
            pub unsafe fn q4_k(w: &[u8], rb: usize, a: ActRow<'_>, out: &mut [f32]) {
                let nb = rb / 144;
                assert!(a.qs.len() >= 256 * nb && a.d.len() >= nb && a.bsums.len() >= 16 * nb);
                let (ap, ad, bs) = (a.qs.as_ptr() as *const u8, a.d.as_ptr(), a.bsums.as_ptr());
                rows!(w, rb, 144, out, |row, b| {
                    q45_k_block(row.add(144 * b), ap.add(256 * b), *ad.add(b), bs.add(16 * b), false)
                })
            }

            #[target_feature(enable = $feat)]
            pub unsafe fn q5_k(w: &[u8], rb: usize, a: ActRow<'_>, out: &mut [f32]) {
                let nb = rb / 176;
                assert!(a.qs.len() >= 256 * nb && a.d.len() >= nb && a.bsums.len() >= 16 * nb);
                let (ap, ad, bs) = (a.qs.as_ptr() as *const u8, a.d.as_ptr(), a.bsums.as_ptr());
                rows!(w, rb, 176, out, |row, b| {
                    q45_k_block(row.add(176 * b), ap.add(256 * b), *ad.add(b), bs.add(16 * b), true)
                })
            }

            /// One Q6_K super-block: `(d · d_a, Σ_i sc_i (Σ q a − 32 Σ a), 0)`.
            #[target_feature(enable = $feat)]
            #[inline]
            unsafe fn q6_k_block(blk: *const u8, aq: *const u8, da: f32, bs: *const i32) -> (f32, __m256i, f32) {
                let (low, two) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x03));
                let sc = std::slice::from_raw_parts(blk.add(192) as *const i8, 16);
                let mut sum = _mm256_setzero_si256();
                for h in 0..2 {
                    let ql0 = load(blk.add(64 * h));
                    let ql1 = load(blk.add(64 * h + 32));
                    let qh = load(blk.add(128 + 32 * h));
                    let lows = [
                        _mm256_and_si256(ql0, low),
                        _mm256_and_si256(ql1, low),
                        _mm256_and_si256(_mm256_srli_epi16(ql0, 4), low),
                        _mm256_and_si256(_mm256_srli_epi16(ql1, 4), low),
                    ];
                    let highs = [
                        _mm256_and_si256(qh, two),
                        _mm256_and_si256(_mm256_srli_epi16(qh, 2), two),
                        _mm256_and_si256(_mm256_srli_epi16(qh, 4), two),
                        _mm256_and_si256(_mm256_srli_epi16(qh, 6), two),
                    ];
                    for s in 0..4 {
                        let p = 4 * h + s;
                        let q = _mm256_or_si256(lows[s], _mm256_slli_epi16(highs[s], 4));
                        let prod = us8(q, load(aq.add(32 * p)));
                        let (s0, s1) = (sc[2 * p] as i32, sc[2 * p + 1] as i32);
                        let scale = _mm256_setr_epi32(s0, s0, s0, s0, s1, s1, s1, s1);
                        sum = _mm256_add_epi32(sum, _mm256_mullo_epi32(prod, scale));
                    }
                }
                let offset: i32 = (0..16).map(|i| sc[i] as i32 * *bs.add(i)).sum();
                let sum = _mm256_sub_epi32(sum, _mm256_setr_epi32(32 * offset, 0, 0, 0, 0, 0, 0, 0));
                (half(blk.add(208)) * da, sum, 0.0)
            }

            #[target_feature(enable = $feat)]
            pub unsafe fn q6_k(w: &[u8], rb: usize, a: ActRow<'_>, out: &mut [f32]) {
                let nb = rb / 210;
                assert!(a.qs.len() >= 256 * nb && a.d.len() >= nb && a.bsums.len() >= 16 * nb);
                let (ap, ad, bs) = (a.qs.as_ptr() as *const u8, a.d.as_ptr(), a.bsums.as_ptr());
                rows!(w, rb, 210, out, |row, b| {
                    q6_k_block(row.add(210 * b), ap.add(256 * b), *ad.add(b), bs.add(16 * b))
                })
            }

            /// This instruction set's dot product of `ty`.
            ///
            /// # Safety
            /// The CPU must have the module's features (the caller detected them).
            pub unsafe fn dot(ty: GgmlType) -> DotFn {
                // SAFETY (each closure): the caller detected the features
                match ty {
                    GgmlType::Q8_0 => |w, rb, a, out| unsafe { q8_0(w, rb, a, out) },
                    GgmlType::Q4_0 => |w, rb, a, out| unsafe { q4_0(w, rb, a, out) },
                    GgmlType::Q4_1 => |w, rb, a, out| unsafe { q4_1(w, rb, a, out) },
                    GgmlType::Q5_0 => |w, rb, a, out| unsafe { q5_0(w, rb, a, out) },
                    GgmlType::Q5_1 => |w, rb, a, out| unsafe { q5_1(w, rb, a, out) },
                    GgmlType::Q4K => |w, rb, a, out| unsafe { q4_k(w, rb, a, out) },
                    GgmlType::Q5K => |w, rb, a, out| unsafe { q5_k(w, rb, a, out) },
                    GgmlType::Q6K => |w, rb, a, out| unsafe { q6_k(w, rb, a, out) },
                    GgmlType::F32 => |w, rb, a, out| unsafe { $f32(w, rb, a, out) },
                    GgmlType::F16 => |w, rb, a, out| unsafe { $f16(w, rb, a, out) },
                    GgmlType::BF16 => |w, rb, a, out| unsafe { $bf16(w, rb, a, out) },
                    other => super::super::scalar::dot(other),
                }
            }

            /// This instruction set's product of `ty` with several activation rows at
            /// once ([`MultiDotFn`]), where it has one.
            ///
            /// # Safety
            /// The CPU must have the module's features (the caller detected them).
            pub unsafe fn multi(ty: GgmlType) -> Option<MultiDotFn> {
                match ty {
                    GgmlType::Q8_0 => Some(by_rows!(q8_0_m)),
                    GgmlType::Q4_0 => Some(by_rows!(q4_0_m)),
                    GgmlType::Q4_1 => Some(by_rows!(q4_1_m)),
                    GgmlType::Q5_0 => Some(by_rows!(q5_0_m)),
                    GgmlType::Q5_1 => Some(by_rows!(q5_1_m)),
                    _ => None,
                }
            }
        }
    };
}

kernels!(
    avx2,
    "avx2,fma,f16c",
    super::f32s_256,
    super::f16s_256,
    super::bf16s_256,
    |u, s| { _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)) }
);

kernels!(
    vnni,
    "avx2,fma,f16c,avx512vnni,avx512vl",
    super::f32s_512,
    super::f16s_256,
    super::bf16s_512,
    |u, s| { _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s) }
);

/// The sum of the 8 lanes of `v`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn hsum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// The first `body` values of each activation row of `xs`, per `step` values its even ones
/// then its odd ones (the order a bf16 row's 32-bit words give), row after row: what the
/// bf16 kernels multiply a row's shifted and masked words with.
pub(super) fn split_even_odd<'a>(
    xs: impl IntoIterator<Item = &'a [f32]>,
    body: usize,
    step: usize,
) -> Vec<f32> {
    let half = step / 2;
    let mut split = Vec::new();
    for x in xs {
        for c in x[..body].chunks_exact(step) {
            split.extend((0..half).map(|t| c[2 * t]));
            split.extend((0..half).map(|t| c[2 * t + 1]));
        }
    }
    split
}

/// bf16 rows: 16 values (32 bytes) a step, no shuffles. In each 32-bit word
/// of a row the high half is the odd value and the low half the even one, so
/// `word & 0xFFFF0000` is the odd value as an f32 and `word << 16` the even
/// one; they multiply the activations split into even and odd lanes (once per
/// call). The AVX2 path's; AVX-512 takes [`bf16s_512`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bf16s_256(w: &[u8], rb: usize, a: ActRow<'_>, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = rb / 2;
    let x = a.x;
    assert!(w.len() >= out.len() * rb && x.len() >= n);
    let body = n / 16 * 16;
    let split = split_even_odd([x], body, 16);
    let (wp, sp) = (w.as_ptr(), split.as_ptr());
    let high = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
    let tail = |row: *const u8| tail_dot(GgmlType::BF16, row, body, &x[..n]);
    let one = |p: *const u8, xe: __m256, xo: __m256, acc: __m256| {
        let v = _mm256_loadu_si256(p as *const __m256i);
        let even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        let odd = _mm256_castsi256_ps(_mm256_and_si256(v, high));
        _mm256_fmadd_ps(odd, xo, _mm256_fmadd_ps(even, xe, acc))
    };
    let mut r = 0;
    while r + 4 <= out.len() {
        let rows = [0, 1, 2, 3].map(|k| wp.add((r + k) * rb));
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i < body {
            let xe = _mm256_loadu_ps(sp.add(i));
            let xo = _mm256_loadu_ps(sp.add(i + 8));
            for k in 0..4 {
                let p = rows[k].add(2 * i);
                // each cache line, sixteen rows on (four groups ahead)
                if (2 * i) % 64 == 0 {
                    _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(16 * rb) as *const i8);
                }
                acc[k] = one(p, xe, xo, acc[k]);
            }
            i += 16;
        }
        for k in 0..4 {
            out[r + k] = hsum(acc[k]) + tail(rows[k]);
        }
        r += 4;
    }
    while r < out.len() {
        let row = wp.add(r * rb);
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i < body {
            acc = one(
                row.add(2 * i),
                _mm256_loadu_ps(sp.add(i)),
                _mm256_loadu_ps(sp.add(i + 8)),
                acc,
            );
            i += 16;
        }
        out[r] = hsum(acc) + tail(row);
        r += 1;
    }
}

/// Dot products of f32 or f16 rows (`$size` bytes a value) with f32 activations on the
/// AVX2 path, four rows at a time sharing each activation load; `$load(p)` widens the 8
/// values at `p` to f32 (exactly: every f16 is an f32). AVX-512 takes [`f32s_512`] for
/// f32 rows and this for f16 rows.
macro_rules! float_rows_256 {
    ($w:expr, $rb:expr, $a:expr, $out:expr, $ty:expr, $size:expr, |$p:ident| $load:expr) => {{
        use std::arch::x86_64::*;
        let (w, rb, out, x): (&[u8], usize, &mut [f32], &[f32]) = ($w, $rb, $out, $a.x);
        let n = rb / $size;
        assert!(w.len() >= out.len() * rb && x.len() >= n);
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let body = n / 8 * 8;
        let tail = |row: *const u8| tail_dot($ty, row, body, &x[..n]);
        let mut r = 0;
        while r + 4 <= out.len() {
            let rows = [0, 1, 2, 3].map(|k| wp.add((r + k) * rb));
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i < body {
                let xv = _mm256_loadu_ps(xp.add(i));
                for k in 0..4 {
                    let $p = rows[k].add($size * i);
                    // each cache line, sixteen rows on (four groups ahead)
                    if ($size * i) % 64 < $size * 8 {
                        _mm_prefetch::<_MM_HINT_T1>($p.wrapping_add(16 * rb) as *const i8);
                    }
                    acc[k] = _mm256_fmadd_ps($load, xv, acc[k]);
                }
                i += 8;
            }
            for k in 0..4 {
                out[r + k] = hsum(acc[k]) + tail(rows[k]);
            }
            r += 4;
        }
        while r < out.len() {
            let row = wp.add(r * rb);
            let mut acc = _mm256_setzero_ps();
            let mut i = 0;
            while i < body {
                let $p = row.add($size * i);
                acc = _mm256_fmadd_ps($load, _mm256_loadu_ps(xp.add(i)), acc);
                i += 8;
            }
            out[r] = hsum(acc) + tail(row);
            r += 1;
        }
    }};
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f32s_256(w: &[u8], rb: usize, a: ActRow<'_>, out: &mut [f32]) {
    float_rows_256!(w, rb, a, out, GgmlType::F32, 4, |p| _mm256_loadu_ps(
        p as *const f32
    ))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16s_256(w: &[u8], rb: usize, a: ActRow<'_>, out: &mut [f32]) {
    float_rows_256!(w, rb, a, out, GgmlType::F16, 2, |p| _mm256_cvtph_ps(
        _mm_loadu_si128(p as *const __m128i)
    ))
}

/// f32 rows on 512-bit registers (the AVX-512 path), one row after another, each with two
/// sums over 32 values a step. The rows are read as one sequential stream: measured on
/// dense-110m f32 decode (Zen 4, 2 threads, alternating), 73-78 tokens/s against 59-68
/// when four rows were read side by side (four short streams, which the hardware
/// prefetchers follow worse); a single sum per row on 256-bit registers needs four rows at
/// once to hide the addition's latency, 512-bit ones do not. f16 rows stay on the 256-bit
/// kernel: widened 16 at a time they decoded slower (110-131 against 141-154 tokens/s,
/// dense-110m f16).
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn f32s_512(w: &[u8], rb: usize, a: ActRow<'_>, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let x = a.x;
    let n = rb / 4;
    assert!(w.len() >= out.len() * rb && x.len() >= n);
    let (wp, xp) = (w.as_ptr() as *const f32, x.as_ptr());
    let body = n / 32 * 32;
    for (r, o) in out.iter_mut().enumerate() {
        let row = wp.add(r * n);
        let mut acc = [_mm512_setzero_ps(); 2];
        let mut i = 0;
        while i < body {
            acc[0] = _mm512_fmadd_ps(
                _mm512_loadu_ps(row.add(i)),
                _mm512_loadu_ps(xp.add(i)),
                acc[0],
            );
            acc[1] = _mm512_fmadd_ps(
                _mm512_loadu_ps(row.add(i + 16)),
                _mm512_loadu_ps(xp.add(i + 16)),
                acc[1],
            );
            i += 32;
        }
        let tail = tail_dot(GgmlType::F32, row as *const u8, body, &x[..n]);
        *o = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1])) + tail;
    }
}

/// bf16 rows on 512-bit registers (the AVX-512 path), one row after another as for
/// [`f32s_512`] (155-160 against 132-147 tokens/s four rows at a time, dense-110m bf16): a
/// cache line of the row per step, even and odd values split by a shift and a mask.
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn bf16s_512(w: &[u8], rb: usize, a: ActRow<'_>, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = rb / 2;
    let x = a.x;
    assert!(w.len() >= out.len() * rb && x.len() >= n);
    let body = n / 32 * 32;
    let split = split_even_odd([x], body, 32);
    let (wp, sp) = (w.as_ptr(), split.as_ptr());
    let high = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    for (r, o) in out.iter_mut().enumerate() {
        let row = wp.add(r * rb);
        let mut acc = _mm512_setzero_ps();
        let mut i = 0;
        while i < body {
            let v = _mm512_loadu_si512(row.add(2 * i) as *const _);
            let even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
            let odd = _mm512_castsi512_ps(_mm512_and_si512(v, high));
            let (xe, xo) = (_mm512_loadu_ps(sp.add(i)), _mm512_loadu_ps(sp.add(i + 16)));
            acc = _mm512_fmadd_ps(odd, xo, _mm512_fmadd_ps(even, xe, acc));
            i += 32;
        }
        *o = _mm512_reduce_add_ps(acc) + tail_dot(GgmlType::BF16, row, body, &x[..n]);
    }
}

/// The AVX2 path's dot product of `ty` (the portable one where the CPU lacks AVX2).
pub fn avx2_dot(ty: GgmlType) -> DotFn {
    match has_avx2() {
        // SAFETY: AVX2, FMA and F16C were just detected
        true => unsafe { avx2::dot(ty) },
        false => super::scalar::dot(ty),
    }
}

/// The AVX2 path's multi-row product of `ty`, where it has one.
pub fn avx2_multi(ty: GgmlType) -> Option<MultiDotFn> {
    match has_avx2() {
        // SAFETY: AVX2, FMA and F16C were just detected
        true => unsafe { avx2::multi(ty).or_else(|| super::float_multi::multi_256(ty)) },
        false => None,
    }
}

/// The AVX-512 VNNI path's multi-row product of `ty`, where it has one.
pub fn vnni_multi(ty: GgmlType) -> Option<MultiDotFn> {
    match has_vnni() {
        // SAFETY: VNNI, AVX-512VL and AVX2's features (AVX-512F among them) were just
        // detected
        true => unsafe { vnni::multi(ty).or_else(|| super::float_multi::multi_512(ty)) },
        false => None,
    }
}

/// The AVX-512 VNNI path's dot product of `ty` (the portable one where the CPU lacks it).
pub fn vnni_dot(ty: GgmlType) -> DotFn {
    match has_vnni() {
        // SAFETY: VNNI, AVX-512VL and AVX2's features were just detected
        true => unsafe { vnni::dot(ty) },
        false => super::scalar::dot(ty),
    }
}

//! Mixed-precision matrix products for CPUs with AVX512-BF16: both operands are rounded to
//! bfloat16 (nearest even) while they are packed, and the products are accumulated in f32
//! by `vdpbf16ps`, which multiplies and adds two bf16 pairs per f32 lane: twice the f32
//! FMA rate, half the bytes per operand. The same rounding as PyTorch's bf16 autocast
//! (operands in bf16, sums in f32).
//!
//! Layout: `k` is split into pairs. A packed A panel holds, for each pair `p`, the `MR`
//! rows' `(A[r, 2p], A[r, 2p+1])` as one 32-bit word; a packed B panel holds, for each pair,
//! the `NR` columns' `(B[2p, j], B[2p+1, j])`. The micro-kernel broadcasts one A word and
//! multiplies it with two 16-lane B vectors, into `MR × NR` f32 accumulators.

use rayon::prelude::*;

/// Rows of a micro tile.
const MR: usize = 8;
/// Columns of a micro tile (two 16-lane vectors).
const NR: usize = 32;
/// Pairs of `k` per packed block (1024 values of `k`).
const KCP: usize = 256;

/// Whether this CPU runs the bf16 kernel (AVX-512 F, BW, VL and BF16).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::nn::cpu::allows(crate::nn::cpu::Level::Avx512)
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A matrix read through strides: element `(i, j)` at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub struct Strided {
    pub ptr: *const f32,
    pub rs: usize,
    pub cs: usize,
}

// SAFETY: only read, from threads that the caller's borrow outlives
unsafe impl Send for Strided {}
unsafe impl Sync for Strided {}

impl Strided {
    /// The base pointer (a method, so that closures capture the whole `Sync` struct).
    fn base(&self) -> *const f32 {
        self.ptr
    }
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);

impl OutPtr {
    /// The element `offset` past the start.
    ///
    /// # Safety
    /// `offset` must lie inside the output allocation, and no other thread may write the
    /// elements the caller writes through the result.
    unsafe fn at(&self, offset: usize) -> *mut f32 {
        // SAFETY: in bounds by the caller's contract
        unsafe { self.0.add(offset) }
    }
}
// SAFETY: each task writes a disjoint block of rows
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Nearest-even bf16 bits of `x` (NaN stays NaN).
fn bf16_bits(x: f32) -> u32 {
    half::bf16::from_f32(x).to_bits() as u32
}

/// What a pack reads: lines `l0..l0 + count` of `src(l, kk) = ptr[l·ls + kk·ks]`, the
/// pairs `p0..p0 + kcp` of `k` values.
#[derive(Clone, Copy)]
struct PackJob {
    ptr: *const f32,
    ls: usize,
    ks: usize,
    l0: usize,
    count: usize,
    p0: usize,
    kcp: usize,
    k: usize,
}

impl PackJob {
    /// Zero the packed block (padding lines and the odd tail stay zero) and return the end
    /// of the `k` values read.
    fn clear(&self, out: &mut [u32], width: usize) -> usize {
        out[..self.kcp * width].fill(0);
        (2 * (self.p0 + self.kcp)).min(self.k)
    }
}

/// Pack `count` (≤ `width`) lines of `src` starting at line `l0` for the pairs
/// `p0..p0 + kcp`: `out[p · width + l] = (src[l, 2p], src[l, 2p+1])`, lines past `count`
/// and values past `k` zero. `src(l, kk)` is at `ptr + l·ls + kk·ks`.
///
/// # Safety
/// Every `(l0 + l, kk)` with `l < count`, `kk < k` must be readable.
unsafe fn pack_scalar(out: &mut [u32], width: usize, job: PackJob) {
    let k_hi = job.clear(out, width);
    for l in 0..job.count {
        let line = job.ptr.add((job.l0 + l) * job.ls);
        for kk in 2 * job.p0..k_hi {
            let v = bf16_bits(*line.add(kk * job.ks));
            let p = kk / 2 - job.p0;
            out[p * width + l] |= if kk.is_multiple_of(2) { v } else { v << 16 };
        }
    }
}

/// [`pack_scalar`], vectorised where the pairs or the lines are contiguous in memory
/// (every case a linear layer's forward and backward meet).
///
/// # Safety
/// As [`pack_scalar`], and [`available`] must be true.
unsafe fn pack(out: &mut [u32], width: usize, job: PackJob) {
    #[cfg(target_arch = "x86_64")]
    if job.ks == 1 || job.ls == 1 {
        return kernel::pack(out, width, job);
    }
    pack_scalar(out, width, job)
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use super::{bf16_bits, PackJob, MR, NR};
    use std::arch::x86_64::*;

    /// [`super::pack_scalar`] for `ks == 1` (each line's pairs adjacent: 32 values become 16
    /// words per conversion) or `ls == 1` (lines adjacent: two rows of 8 lines interleave
    /// into 8 words).
    ///
    /// # Safety
    /// As [`super::pack_scalar`]; needs avx512f, avx512bf16, avx512vl.
    #[target_feature(enable = "avx512f,avx512bf16,avx512vl,avx512bw")]
    pub unsafe fn pack(out: &mut [u32], width: usize, job: PackJob) {
        let k_hi = job.clear(out, width);
        let PackJob {
            ptr,
            ls,
            ks,
            l0,
            count,
            p0,
            ..
        } = job;
        let word = |kk: usize, v: f32| {
            let b = bf16_bits(v);
            if kk.is_multiple_of(2) {
                b
            } else {
                b << 16
            }
        };
        if ks == 1 {
            let mut words = [0u32; 16];
            for l in 0..count {
                let line = ptr.add((l0 + l) * ls);
                let mut kk = 2 * p0;
                while kk + 32 <= k_hi {
                    let lo = _mm512_loadu_ps(line.add(kk));
                    let hi = _mm512_loadu_ps(line.add(kk + 16));
                    let v = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
                    _mm512_storeu_si512(words.as_mut_ptr() as *mut _, v);
                    let p = kk / 2 - p0;
                    for (i, &w) in words.iter().enumerate() {
                        *out.get_unchecked_mut((p + i) * width + l) = w;
                    }
                    kk += 32;
                }
                for kk in kk..k_hi {
                    out[(kk / 2 - p0) * width + l] |= word(kk, *line.add(kk));
                }
            }
        } else {
            for kk in (2 * p0..k_hi).step_by(2) {
                let p = kk / 2 - p0;
                let even = ptr.add(kk * ks + l0);
                let odd = (kk + 1 < k_hi).then(|| ptr.add((kk + 1) * ks + l0));
                let dst = out.as_mut_ptr().add(p * width);
                let mut l = 0;
                while l + 8 <= count {
                    let bits = |v: __m128bh| std::mem::transmute::<__m128bh, __m128i>(v);
                    let e = bits(_mm256_cvtneps_pbh(_mm256_loadu_ps(even.add(l))));
                    let o = match odd {
                        Some(q) => bits(_mm256_cvtneps_pbh(_mm256_loadu_ps(q.add(l)))),
                        None => _mm_setzero_si128(),
                    };
                    _mm_storeu_si128(dst.add(l) as *mut _, _mm_unpacklo_epi16(e, o));
                    _mm_storeu_si128(dst.add(l + 4) as *mut _, _mm_unpackhi_epi16(e, o));
                    l += 8;
                }
                for l in l..count {
                    let mut w = word(kk, *even.add(l));
                    if let Some(q) = odd {
                        w |= word(kk + 1, *q.add(l));
                    }
                    *dst.add(l) = w;
                }
            }
        }
    }

    /// `tile (MR × NR, row-major) = Σ_p a[p] ⊗ b[p]` over `kcp` pairs.
    ///
    /// # Safety
    /// Needs avx512f and avx512bf16; `a` holds `kcp · MR` words, `b` `kcp · NR`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn tile(kcp: usize, a: *const u32, b: *const u32, tile: &mut [f32; MR * NR]) {
        let mut acc = [_mm512_setzero_ps(); 2 * MR];
        for p in 0..kcp {
            let b0 = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                b.add(p * NR) as *const _
            ));
            let b1 = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                b.add(p * NR + 16) as *const _,
            ));
            let ap = a.add(p * MR);
            for r in 0..MR {
                let av =
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(*ap.add(r) as i32));
                acc[2 * r] = _mm512_dpbf16_ps(acc[2 * r], av, b0);
                acc[2 * r + 1] = _mm512_dpbf16_ps(acc[2 * r + 1], av, b1);
            }
        }
        for r in 0..MR {
            _mm512_storeu_ps(tile.as_mut_ptr().add(r * NR), acc[2 * r]);
            _mm512_storeu_ps(tile.as_mut_ptr().add(r * NR + 16), acc[2 * r + 1]);
        }
    }
}

/// `C (m × n, row stride ldc) = A · B` (or `+=` when `accumulate`) with `A: m × k` and
/// `B: k × n` read through strides, operands rounded to bf16, sums in f32. Row panels of
/// C run in parallel.
///
/// # Safety
/// [`available`] must be true; A, B and C must cover the given shapes and strides, and C
/// must not overlap A or B.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    a: Strided,
    b: Strided,
) {
    if m == 0 || n == 0 {
        return;
    }
    let c = OutPtr(c);
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                // zero bits are 0.0; no reference to the unwritten output is made
                std::ptr::write_bytes(c.at(i * ldc), 0, n);
            }
        }
        return;
    }
    let pairs = k.div_ceil(2);
    let (m_panels, n_panels) = (m.div_ceil(MR), n.div_ceil(NR));
    let mut packed_b = vec![0u32; n_panels * KCP.min(pairs) * NR];
    for p0 in (0..pairs).step_by(KCP) {
        let kcp = KCP.min(pairs - p0);
        let first = p0 == 0;
        packed_b
            .par_chunks_mut(kcp * NR)
            .take(n_panels)
            .enumerate()
            .for_each(|(jp, out)| {
                let j0 = jp * NR;
                // columns of B are the lines: B(kk, j) at ptr + j·cs + kk·rs
                let (ptr, ls, ks, count) = (b.base(), b.cs, b.rs, NR.min(n - j0));
                let job = PackJob {
                    ptr,
                    ls,
                    ks,
                    l0: j0,
                    count,
                    p0,
                    kcp,
                    k,
                };
                pack(out, NR, job);
            });
        let packed_b = &packed_b;
        (0..m_panels).into_par_iter().for_each_init(
            || (vec![0u32; kcp * MR], [0f32; MR * NR]),
            |(pa, tile), ip| {
                let i0 = ip * MR;
                let rows = MR.min(m - i0);
                let (ptr, ls, ks) = (a.base(), a.rs, a.cs);
                let job = PackJob {
                    ptr,
                    ls,
                    ks,
                    l0: i0,
                    count: rows,
                    p0,
                    kcp,
                    k,
                };
                pack(pa, MR, job);
                for jp in 0..n_panels {
                    let j0 = jp * NR;
                    let cols = NR.min(n - j0);
                    #[cfg(target_arch = "x86_64")]
                    kernel::tile(kcp, pa.as_ptr(), packed_b.as_ptr().add(jp * kcp * NR), tile);
                    for r in 0..rows {
                        let dst = c.at((i0 + r) * ldc + j0);
                        let src = &tile[r * NR..r * NR + cols];
                        if first && !accumulate {
                            // the first write of these values: through the pointer, as
                            // the output may be uninitialised until now
                            std::ptr::copy_nonoverlapping(src.as_ptr(), dst, cols);
                        } else {
                            let dst = std::slice::from_raw_parts_mut(dst, cols);
                            for (d, s) in dst.iter_mut().zip(src) {
                                *d += s;
                            }
                        }
                    }
                }
            },
        );
    }
}

/// `dst (m × n, row stride n) = A · B`: with bf16 operands (this module's kernel; only
/// where [`available`]; row panels in parallel) or in f32 (the f32 GEMM, on the whole
/// thread pool when `parallel`, as candle's matmul runs it; on the calling thread
/// otherwise, for callers that already run products side by side).
///
/// # Safety
/// The operands cover their shapes and strides; `dst` holds m × n values and overlaps
/// neither operand.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn product(
    bf16: bool,
    parallel: bool,
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    a: Strided,
    b: Strided,
) {
    if bf16 {
        return gemm(m, n, k, dst, n, false, a, b);
    }
    if k == 0 {
        // zero bits are 0.0 (no reference to the possibly uninitialised output is made)
        std::ptr::write_bytes(dst, 0, m * n);
        return;
    }
    let threads = rayon::current_num_threads();
    let par = match parallel && threads > 1 {
        true => ::gemm::Parallelism::Rayon(threads),
        false => ::gemm::Parallelism::None,
    };
    super::causal_attention::mm_on(
        par, m, n, k, dst, n, false, a.ptr, a.rs, a.cs, b.ptr, b.rs, b.cs, 1.0,
    )
}

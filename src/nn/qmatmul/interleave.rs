//! Weights of the 32-value types Q4_0, Q4_1 and Q8_0 (and of Q4_K) with eight rows interleaved, for
//! CPUs with AVX-512 VNNI or AVX2: in each block of 32 columns, four bytes of each of the
//! eight rows in turn, so that one `vpdpbusd` (on AVX2, `vpmaddubsw` then `vpmaddwd`; see
//! [`Kernel`]) of 32 weight bytes with four activation bytes broadcast adds four products
//! to each of the eight rows' sums. A block's integer sums are exact; they then take the
//! block's scales in f32, eight rows at once.
//!
//! The layout keeps the file's size (four-bit codes stay four bits, scales stay f16) and
//! is built once per matrix. Every activation row runs through the same instructions
//! whatever the number of rows next to it, so one sequence decoded alone, several decoded
//! together and a prompt's rows get the same results bit for bit; and no product has to
//! unpack or repack its weights for the next row.
//!
//! Per octet of rows and block of 32 columns:
//! * Q4_0 / Q4_1: 128 bytes of codes: for `g` in 0..4, bytes `4g..4g+4` of each row's 16
//!   (their low nibbles are values `4g..4g+4`, their high nibbles values `16+4g..`);
//! * Q8_0: 256 bytes: for `g` in 0..8, values `4g..4g+4` of each row, plus 128 (unsigned);
//! * each row's f16 scale (8 of them) and, for Q4_1, its f16 minimum.
//!
//! In codes `c` (0..15, or 0..255 for Q8_0) a weight is `d · c + o`, with `o` the Q4_1
//! minimum, `−8 d` (Q4_0) or `−128 d` (Q8_0); a block's part of a dot product with
//! 8-bit activations `a` (scale `d_a`, `s_a = d_a · Σ a`) is `d · d_a · Σ c a + o · s_a`.
//!
//! Q4_K, per octet and super-block of 256 columns: 1024 bytes of codes, for chunk `c` in
//! 0..4 and `g` in 0..8, bytes `32c + 4g..+4` of each row's 128 (their low nibbles are
//! values `64c + 4g..` of sub-block `2c`, their high nibbles the same of sub-block `2c + 1`);
//! the eight 6-bit scales `s_j` and minimums `m_j` unpacked to a byte each (sub-block, row);
//! each row's f16 `d` and `dmin`. A weight is `d · s_j · c − dmin · m_j`; with 8-bit
//! activations of the super-block's scale `d_a` and sums `A_j` of sub-block `j`, the
//! super-block's part is `d · d_a · Σ_j s_j Σ c a − dmin · d_a · Σ_j m_j A_j`, both sums
//! in integers. The layout is 1184 bytes per octet and super-block, against 1152 stored.

use super::pages::PageVec;
use crate::weights::quant::GgmlType;

/// Rows interleaved together.
pub const ROWS: usize = 8;

/// How far ahead of the block being multiplied its weights are prefetched, in bytes.
const AHEAD: usize = 1024;

/// Bytes of the stored matrix read between two reports of [`Interleaved::new`]'s progress
/// (after which the caller hands those pages back, so a large matrix is not resident
/// twice while it is interleaved).
const DONE_BYTES: usize = 4 << 20;

/// Whether [`Interleaved::new`] takes weights of `ty`.
pub fn supports(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 | GgmlType::Q4K
    )
}

/// The instructions an interleaved layout's products run on: AVX-512 VNNI (`vpdpbusd` adds
/// four byte products to each of eight rows' sums), or AVX2 (`vpmaddubsw` then `vpmaddwd`
/// do the same in two steps; Q8_0's codes are taken signed there, their magnitudes against
/// the activations with the codes' signs, so that no pair of products overflows 16 bits).
/// The same layout serves both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Vnni,
    Avx2,
}

impl Kernel {
    /// The kernels this CPU runs, the best first (`super::simd`'s detection, so
    /// `ROUTELM_CPU` caps it too).
    pub fn available() -> Vec<Kernel> {
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if super::simd::has_vnni() {
                v.push(Kernel::Vnni);
            }
            if super::simd::has_avx2() {
                v.push(Kernel::Avx2);
            }
        }
        v
    }

    /// Activation rows at most per pass over an octet's weights (AVX2 has 16 vector
    /// registers, AVX-512 VL 32: eight rows' sums and the weights fit there only).
    fn rows(self) -> usize {
        match self {
            Kernel::Vnni => 8,
            Kernel::Avx2 => 4,
        }
    }
}

/// Four-byte dot products into eight 32-bit lanes, per kernel (see [`Kernel`]).
#[cfg(target_arch = "x86_64")]
trait Dot4 {
    /// Whether Q8_0's codes are taken signed (`q`, no offset) rather than as `q + 128`.
    const SIGNED_Q8: bool;
    /// `acc + Σ₄ w·a` per lane: `w` unsigned codes, `a` signed activations.
    unsafe fn dot(
        acc: std::arch::x86_64::__m256i,
        w: std::arch::x86_64::__m256i,
        a: std::arch::x86_64::__m256i,
    ) -> std::arch::x86_64::__m256i;
    /// The same with signed codes `w` (Q8_0 where [`Dot4::SIGNED_Q8`]).
    unsafe fn dot_signed(
        acc: std::arch::x86_64::__m256i,
        w: std::arch::x86_64::__m256i,
        a: std::arch::x86_64::__m256i,
    ) -> std::arch::x86_64::__m256i;
}

#[cfg(target_arch = "x86_64")]
struct Vnni;
#[cfg(target_arch = "x86_64")]
struct Avx2;

#[cfg(target_arch = "x86_64")]
impl Dot4 for Vnni {
    const SIGNED_Q8: bool = false;
    #[inline(always)]
    unsafe fn dot(
        acc: std::arch::x86_64::__m256i,
        w: std::arch::x86_64::__m256i,
        a: std::arch::x86_64::__m256i,
    ) -> std::arch::x86_64::__m256i {
        std::arch::x86_64::_mm256_dpbusd_epi32(acc, w, a)
    }
    #[inline(always)]
    unsafe fn dot_signed(
        acc: std::arch::x86_64::__m256i,
        w: std::arch::x86_64::__m256i,
        a: std::arch::x86_64::__m256i,
    ) -> std::arch::x86_64::__m256i {
        Self::dot(acc, w, a)
    }
}

#[cfg(target_arch = "x86_64")]
impl Dot4 for Avx2 {
    const SIGNED_Q8: bool = true;
    #[inline(always)]
    unsafe fn dot(
        acc: std::arch::x86_64::__m256i,
        w: std::arch::x86_64::__m256i,
        a: std::arch::x86_64::__m256i,
    ) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        // codes ≤ 15 (the nibble types): a pair of products stays within 16 bits
        let pairs = _mm256_maddubs_epi16(w, a);
        _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }
    #[inline(always)]
    unsafe fn dot_signed(
        acc: std::arch::x86_64::__m256i,
        w: std::arch::x86_64::__m256i,
        a: std::arch::x86_64::__m256i,
    ) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        // |w| (≤ 128, read unsigned) against a with w's sign (|a| ≤ 127): a pair of
        // products stays within 2 · 128 · 127 < 2^15, for every code −128..127
        let pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(a, w));
        _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }
}

/// Columns of one block of `ty` in the layout (a super-block for Q4_K).
fn block_cols(ty: GgmlType) -> usize {
    if ty == GgmlType::Q4K {
        256
    } else {
        32
    }
}

/// A matrix's rows interleaved eight at a time (see the module's text).
#[derive(Debug)]
pub struct Interleaved {
    ty: GgmlType,
    cols: usize,
    /// The instructions its products run on.
    kernel: Kernel,
    /// Codes: octet after octet, block after block, `code_bytes` a block.
    codes: PageVec<u8>,
    /// f16 scales: octet, block, row (8).
    scales: PageVec<u16>,
    /// f16 minimums (Q4_1; Q4_K's `dmin`), as the scales.
    mins: PageVec<u16>,
    /// Q4_K's 6-bit sub-block scales and minimums, a byte each: octet, super-block,
    /// sub-block (8), row (8).
    k_scales: PageVec<u8>,
    k_mins: PageVec<u8>,
}

/// For Q4_0, Q4_1 and Q8_0: bytes of a stored block of 32, where its codes start in it,
/// and bytes of one block's codes for an octet of rows here.
fn block_layout(ty: GgmlType) -> (usize, usize, usize) {
    match ty {
        GgmlType::Q4_0 => (18, 2, 128),
        GgmlType::Q4_1 => (20, 4, 128),
        _ => (34, 2, 256),
    }
}

/// A code byte as this layout holds it from as the file stores it, and back: Q8_0's
/// signed codes are held as `q + 128` (the sign bit flipped), the others as they are.
fn flip(ty: GgmlType, c: u8) -> u8 {
    match ty {
        GgmlType::Q8_0 => c ^ 0x80,
        _ => c,
    }
}

impl Interleaved {
    /// The rows of `data` (`row_bytes` each, `cols` values of `ty`, a type [`supports`]
    /// takes), or where `order` is given, rows `order[0]`, `order[1]`… of it; a multiple of
    /// [`ROWS`] rows, for products on `kernel` (which the CPU must run). `done(n)` is told,
    /// every few MB (rows in order) or only at the end (out of order), that the first `n`
    /// bytes of `data` have been read for the last time.
    pub fn new(
        kernel: Kernel,
        ty: GgmlType,
        data: &[u8],
        order: Option<&[usize]>,
        cols: usize,
        row_bytes: usize,
        done: &mut dyn FnMut(usize),
    ) -> Self {
        let rows = order.map_or(data.len() / row_bytes.max(1), <[usize]>::len);
        assert!(supports(ty) && rows.is_multiple_of(ROWS) && cols.is_multiple_of(32));
        // row `r` of the matrix (stored row `order[r]`)
        let row = |r: usize| &data[order.map_or(r, |o| o[r]) * row_bytes..][..row_bytes];
        // octets read between two calls of `done`
        let every = (DONE_BYTES / (ROWS * row_bytes).max(1)).max(1);
        let mut progress = |o: usize| {
            if (order.is_none() && (o + 1).is_multiple_of(every)) || o + 1 == rows / ROWS {
                done((o + 1) * ROWS * row_bytes);
            }
        };
        if ty == GgmlType::Q4K {
            return Self::new_q4_k(kernel, &row, rows, cols, row_bytes, &mut progress);
        }
        let nb = cols / 32;
        let (block_bytes, at, code_bytes) = block_layout(ty);
        assert_eq!(row_bytes, nb * block_bytes);
        let octets = rows / ROWS;
        let mut codes = PageVec::zeroed(octets * nb * code_bytes);
        let mut scales = PageVec::zeroed(octets * nb * ROWS);
        let mut mins = match ty {
            GgmlType::Q4_1 => PageVec::zeroed(octets * nb * ROWS),
            _ => PageVec::default(),
        };
        let h = |b: &[u8], i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        for o in 0..octets {
            for k in 0..ROWS {
                let row = row(o * ROWS + k);
                for (b, blk) in row.chunks_exact(block_bytes).enumerate() {
                    let ob = o * nb + b;
                    scales[ob * ROWS + k] = h(blk, 0);
                    if ty == GgmlType::Q4_1 {
                        mins[ob * ROWS + k] = h(blk, 2);
                    }
                    let q = &blk[at..];
                    let out = &mut codes[ob * code_bytes..][..code_bytes];
                    for g in 0..code_bytes / 32 {
                        for i in 0..4 {
                            out[32 * g + 4 * k + i] = flip(ty, q[4 * g + i]);
                        }
                    }
                }
            }
            progress(o);
        }
        Self {
            ty,
            cols,
            kernel,
            codes,
            scales,
            mins,
            k_scales: PageVec::default(),
            k_mins: PageVec::default(),
        }
    }

    /// [`Interleaved::new`] for Q4_K (see the module's text).
    fn new_q4_k<'a>(
        kernel: Kernel,
        row: &dyn Fn(usize) -> &'a [u8],
        rows: usize,
        cols: usize,
        row_bytes: usize,
        progress: &mut dyn FnMut(usize),
    ) -> Self {
        assert!(cols.is_multiple_of(256));
        let nsb = cols / 256;
        assert_eq!(row_bytes, nsb * 144);
        let octets = rows / ROWS;
        let mut codes = PageVec::zeroed(octets * nsb * 1024);
        let mut scales = PageVec::zeroed(octets * nsb * ROWS);
        let mut mins = PageVec::zeroed(octets * nsb * ROWS);
        let mut k_scales = PageVec::zeroed(octets * nsb * 64);
        let mut k_mins = PageVec::zeroed(octets * nsb * 64);
        let h = |b: &[u8], i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        for o in 0..octets {
            for k in 0..ROWS {
                let row = row(o * ROWS + k);
                for (sb, blk) in row.chunks_exact(144).enumerate() {
                    let at = o * nsb + sb;
                    scales[at * ROWS + k] = h(blk, 0);
                    mins[at * ROWS + k] = h(blk, 2);
                    let (sc, mn) = crate::weights::quant::scale_min_k4(&blk[4..16]);
                    for j in 0..8 {
                        k_scales[at * 64 + 8 * j + k] = sc[j];
                        k_mins[at * 64 + 8 * j + k] = mn[j];
                    }
                    let q = &blk[16..];
                    let out = &mut codes[at * 1024..][..1024];
                    for c in 0..4 {
                        for g in 0..8 {
                            for i in 0..4 {
                                out[256 * c + 32 * g + 4 * k + i] = q[32 * c + 4 * g + i];
                            }
                        }
                    }
                }
            }
            progress(o);
        }
        Self {
            ty: GgmlType::Q4K,
            cols,
            kernel,
            codes,
            scales,
            mins,
            k_scales,
            k_mins,
        }
    }

    /// Row `r`'s blocks as the file stores them (`out`: the row's bytes), read back from
    /// this layout: so an embedding tied to the head looks its rows up here, and the
    /// file's pages, handed back when the rows were interleaved, are not read again.
    pub fn stored_row(&self, r: usize, out: &mut [u8]) {
        let (o, k) = (r / ROWS, r % ROWS);
        let h = |v: u16| v.to_le_bytes();
        if self.ty == GgmlType::Q4K {
            let nsb = self.cols / 256;
            for (sb, blk) in out.chunks_exact_mut(144).enumerate().take(nsb) {
                let at = o * nsb + sb;
                blk[0..2].copy_from_slice(&h(self.scales[at * ROWS + k]));
                blk[2..4].copy_from_slice(&h(self.mins[at * ROWS + k]));
                let sc = |j: usize| self.k_scales[at * 64 + 8 * j + k];
                let mn = |j: usize| self.k_mins[at * 64 + 8 * j + k];
                // the 6-bit scales and minimums packed back into 12 bytes
                for j in 0..4 {
                    blk[4 + j] = sc(j) | ((sc(j + 4) >> 4) << 6);
                    blk[8 + j] = mn(j) | ((mn(j + 4) >> 4) << 6);
                    blk[12 + j] = (sc(j + 4) & 0x0F) | ((mn(j + 4) & 0x0F) << 4);
                }
                let codes = &self.codes[at * 1024..][..1024];
                for c in 0..4 {
                    for g in 0..8 {
                        for i in 0..4 {
                            blk[16 + 32 * c + 4 * g + i] = codes[256 * c + 32 * g + 4 * k + i];
                        }
                    }
                }
            }
            return;
        }
        let nb = self.cols / 32;
        let (block_bytes, at, code_bytes) = block_layout(self.ty);
        for (b, blk) in out.chunks_exact_mut(block_bytes).enumerate().take(nb) {
            let ob = o * nb + b;
            blk[0..2].copy_from_slice(&h(self.scales[ob * ROWS + k]));
            if self.ty == GgmlType::Q4_1 {
                blk[2..4].copy_from_slice(&h(self.mins[ob * ROWS + k]));
            }
            let codes = &self.codes[ob * code_bytes..][..code_bytes];
            for g in 0..code_bytes / 32 {
                for i in 0..4 {
                    blk[at + 4 * g + i] = flip(self.ty, codes[32 * g + 4 * k + i]);
                }
            }
        }
    }

    /// Whether the activations this layout takes are quantized in super-blocks of 256
    /// with sums of each 16 ([`super::QAct`]'s K kind) rather than blocks of 32.
    pub fn takes_k_activations(&self) -> bool {
        self.ty == GgmlType::Q4K
    }

    /// Octets of rows.
    pub fn octets(&self) -> usize {
        self.scales.len() / (ROWS * (self.cols / block_cols(self.ty))).max(1)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.codes.len()
            + 2 * (self.scales.len() + self.mins.len())
            + self.k_scales.len()
            + self.k_mins.len()
    }

    /// The dot products of octet `o`'s eight rows with each of the `m` activation rows of
    /// `a` (as [`super::QAct`] prepares them for this layout's type: int8 values, `cols`
    /// per row, a scale per block of 32 and the block's sum, or for Q4_K
    /// ([`Interleaved::takes_k_activations`]) a scale per 256 values and the sums of each
    /// 16): activation `r`'s eight go to `y + r · stride`. Up to eight activation rows
    /// share one pass over the octet's weights (each weight vector loaded and unpacked
    /// once for all of them), so a decoding batch of eight streams the weights once while
    /// it computes; each row runs the same instructions whatever is beside it.
    ///
    /// # Safety
    /// The CPU has AVX-512 VNNI and VL with AVX2, FMA and F16C (`super::simd::has_vnni`);
    /// `y + r · stride` has 8 writable values for each `r < m`.
    #[cfg(target_arch = "x86_64")]
    pub unsafe fn octet(
        &self,
        o: usize,
        a: super::ActRow<'_>,
        m: usize,
        y: *mut f32,
        stride: usize,
    ) {
        // SAFETY (both): the caller's guarantees; the kernel was chosen from the CPU's
        // features ([`Kernel::available`])
        match self.kernel {
            Kernel::Vnni => self.octet_vnni(o, a, m, y, stride),
            Kernel::Avx2 => self.octet_avx2(o, a, m, y, stride),
        }
    }

    /// [`Interleaved::octet`] on AVX-512 VNNI.
    ///
    /// # Safety
    /// As [`Interleaved::octet`]'s.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vnni,avx512vl")]
    unsafe fn octet_vnni(
        &self,
        o: usize,
        a: super::ActRow<'_>,
        m: usize,
        y: *mut f32,
        stride: usize,
    ) {
        self.octet_on::<Vnni>(o, a, m, y, stride)
    }

    /// [`Interleaved::octet`] on AVX2.
    ///
    /// # Safety
    /// As [`Interleaved::octet`]'s, on a CPU with AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn octet_avx2(
        &self,
        o: usize,
        a: super::ActRow<'_>,
        m: usize,
        y: *mut f32,
        stride: usize,
    ) {
        self.octet_on::<Avx2>(o, a, m, y, stride)
    }

    /// [`Interleaved::octet`]'s loop over runs of activation rows, inlined into each
    /// kernel's wrapper.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn octet_on<D: Dot4>(
        &self,
        o: usize,
        a: super::ActRow<'_>,
        m: usize,
        y: *mut f32,
        stride: usize,
    ) {
        let cols = self.cols;
        // per activation row: scales, block sums and sums of each 16
        let (nd, ns, nbs) = match self.takes_k_activations() {
            true => (cols / 256, 0, cols / 16),
            false => (cols / 32, cols / 32, 0),
        };
        assert!(o < self.octets());
        assert!(a.qs.len() >= m * cols && a.d.len() >= m * nd);
        assert!(a.s.len() >= m * ns && a.bsums.len() >= m * nbs);
        let mut r = 0;
        while r < m {
            let n = (m - r).min(self.kernel.rows());
            let (qs, d) = (&a.qs[r * cols..], &a.d[r * nd..]);
            let (s, b) = (&a.s[r * ns..], &a.bsums[r * nbs..]);
            let y = y.add(r * stride);
            // SAFETY (all arms): the caller's guarantees, for rows r..r + n
            match n {
                8 => self.rows_of::<8, D>(o, qs, d, s, b, y, stride),
                7 => self.rows_of::<7, D>(o, qs, d, s, b, y, stride),
                6 => self.rows_of::<6, D>(o, qs, d, s, b, y, stride),
                5 => self.rows_of::<5, D>(o, qs, d, s, b, y, stride),
                4 => self.rows_of::<4, D>(o, qs, d, s, b, y, stride),
                3 => self.rows_of::<3, D>(o, qs, d, s, b, y, stride),
                2 => self.rows_of::<2, D>(o, qs, d, s, b, y, stride),
                _ => self.rows_of::<1, D>(o, qs, d, s, b, y, stride),
            }
            r += n;
        }
    }

    /// `N` activation rows through the pass of this layout's type.
    ///
    /// # Safety
    /// As [`Interleaved::octet`]'s, with `m = N`.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn rows_of<const N: usize, D: Dot4>(
        &self,
        o: usize,
        qs: &[i8],
        d: &[f32],
        s: &[f32],
        bsums: &[i32],
        y: *mut f32,
        stride: usize,
    ) {
        // Q8_0's signed codes have no offset: their pass skips its product
        let signed_q8 = self.ty == GgmlType::Q8_0 && D::SIGNED_Q8;
        match (self.takes_k_activations(), signed_q8) {
            (true, _) => self.pass_k::<N, D>(o, qs, d, bsums, y, stride),
            (false, true) => self.pass::<N, D, false>(o, qs, d, s, y, stride),
            (false, false) => self.pass::<N, D, true>(o, qs, d, s, y, stride),
        }
    }

    /// [`Interleaved::octet`] for `N` activation rows (the lengths checked by the caller);
    /// `OFFSET`: whether the codes have an offset (all but Q8_0 taken signed), whose
    /// product with each block's activation sum is added.
    ///
    /// # Safety
    /// As [`Interleaved::octet`]'s, with `m = N`.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn pass<const N: usize, D: Dot4, const OFFSET: bool>(
        &self,
        o: usize,
        qs: &[i8],
        d: &[f32],
        s: &[f32],
        y: *mut f32,
        stride: usize,
    ) {
        use std::arch::x86_64::*;
        let (cols, nb) = (self.cols, self.cols / 32);
        let q8 = self.ty == GgmlType::Q8_0;
        let code_bytes = if q8 { 256 } else { 128 };
        let codes = self.codes.as_ptr().add(o * nb * code_bytes);
        let scales = self.scales.as_ptr().add(o * nb * ROWS);
        let mins = self.mins.as_ptr().wrapping_add(o * nb * ROWS);
        let ap = qs.as_ptr() as *const u8;
        let low = _mm256_set1_epi8(0x0F);
        // Q8_0's codes signed (`q`, from the stored `q + 128`) where the kernel takes them so
        let signed = !OFFSET;
        let flip = _mm256_set1_epi8(0x80u8 as i8);
        // where group g's four activation bytes start in a block: nibble codes' group
        // g < 4 holds values 4g.., group g ≥ 4 values 16 + 4(g − 4)..
        let mut at = [0usize; 8];
        for (g, a) in at.iter_mut().enumerate() {
            *a = if q8 || g < 4 { 4 * g } else { 16 + 4 * (g - 4) };
        }
        let mut acc = [_mm256_setzero_ps(); N];
        for b in 0..nb {
            let w = codes.add(b * code_bytes);
            // the weights a few blocks on (past the octet's end: the next octet's), so
            // the stream from memory keeps ahead of the products
            for l in (0..code_bytes).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(AHEAD + l) as *const i8);
            }
            let mut wv = [_mm256_setzero_si256(); 8];
            if q8 {
                for (g, v) in wv.iter_mut().enumerate() {
                    *v = _mm256_loadu_si256(w.add(32 * g) as *const __m256i);
                    if signed {
                        *v = _mm256_xor_si256(*v, flip);
                    }
                }
            } else {
                for g in 0..4 {
                    let v = _mm256_loadu_si256(w.add(32 * g) as *const __m256i);
                    wv[g] = _mm256_and_si256(v, low);
                    wv[g + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                }
            }
            let sc = _mm256_cvtph_ps(_mm_loadu_si128(scales.add(b * ROWS) as *const __m128i));
            let off = match self.ty {
                GgmlType::Q4_1 => {
                    _mm256_cvtph_ps(_mm_loadu_si128(mins.add(b * ROWS) as *const __m128i))
                }
                GgmlType::Q4_0 => _mm256_mul_ps(sc, _mm256_set1_ps(-8.0)),
                // Q8_0 read as `q + 128` (signed codes have no offset: `OFFSET` is false)
                _ => _mm256_mul_ps(sc, _mm256_set1_ps(-128.0)),
            };
            for (k, acc) in acc.iter_mut().enumerate() {
                let a = ap.add(k * cols + 32 * b);
                // two chains of four, so the products overlap
                let mut s0 = _mm256_setzero_si256();
                let mut s1 = _mm256_setzero_si256();
                for g in (0..8).step_by(2) {
                    let a0 = _mm256_set1_epi32((a.add(at[g]) as *const i32).read_unaligned());
                    let a1 = _mm256_set1_epi32((a.add(at[g + 1]) as *const i32).read_unaligned());
                    if signed {
                        s0 = D::dot_signed(s0, wv[g], a0);
                        s1 = D::dot_signed(s1, wv[g + 1], a1);
                    } else {
                        s0 = D::dot(s0, wv[g], a0);
                        s1 = D::dot(s1, wv[g + 1], a1);
                    }
                }
                let sum = _mm256_add_epi32(s0, s1);
                let da = _mm256_set1_ps(*d.get_unchecked(k * nb + b));
                *acc = _mm256_fmadd_ps(_mm256_mul_ps(sc, da), _mm256_cvtepi32_ps(sum), *acc);
                if OFFSET {
                    let sa = _mm256_set1_ps(*s.get_unchecked(k * nb + b));
                    *acc = _mm256_fmadd_ps(off, sa, *acc);
                }
            }
        }
        for (k, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(y.add(k * stride), *a);
        }
    }

    /// [`Interleaved::octet`] for Q4_K and `N` activation rows: per super-block, each chunk's
    /// 32-byte code vectors unpacked once for all `N` rows; each row's integer sums over
    /// the eight sub-blocks take their scales in integers, then the super-block's f32
    /// scaling.
    ///
    /// # Safety
    /// As [`Interleaved::octet`]'s, with `m = N`.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn pass_k<const N: usize, D: Dot4>(
        &self,
        o: usize,
        qs: &[i8],
        d: &[f32],
        bsums: &[i32],
        y: *mut f32,
        stride: usize,
    ) {
        use std::arch::x86_64::*;
        let (cols, nsb) = (self.cols, self.cols / 256);
        let codes = self.codes.as_ptr().add(o * nsb * 1024);
        let dd = self.scales.as_ptr().add(o * nsb * ROWS);
        let dm = self.mins.as_ptr().add(o * nsb * ROWS);
        let ks = self.k_scales.as_ptr().add(o * nsb * 64);
        let km = self.k_mins.as_ptr().add(o * nsb * 64);
        let ap = qs.as_ptr() as *const u8;
        let low = _mm256_set1_epi8(0x0F);
        let bytes8 = |p: *const u8| _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i));
        let mut acc = [_mm256_setzero_ps(); N];
        for sb in 0..nsb {
            let w = codes.add(sb * 1024);
            for l in (0..1024).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(AHEAD + l) as *const i8);
            }
            let mut isum = [_mm256_setzero_si256(); N];
            for c in 0..4 {
                let wc = w.add(256 * c);
                let mut lo = [_mm256_setzero_si256(); 8];
                let mut hi = [_mm256_setzero_si256(); 8];
                for g in 0..8 {
                    let v = _mm256_loadu_si256(wc.add(32 * g) as *const __m256i);
                    lo[g] = _mm256_and_si256(v, low);
                    hi[g] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                }
                let sc_lo = bytes8(ks.add(sb * 64 + 8 * (2 * c)));
                let sc_hi = bytes8(ks.add(sb * 64 + 8 * (2 * c + 1)));
                for (k, isum) in isum.iter_mut().enumerate() {
                    let a = ap.add(k * cols + 256 * sb + 64 * c);
                    let at =
                        |i: usize| _mm256_set1_epi32((a.add(i) as *const i32).read_unaligned());
                    // four chains of four, so the products overlap
                    let (mut s0, mut s1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                    let (mut s2, mut s3) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                    for g in (0..8).step_by(2) {
                        s0 = D::dot(s0, lo[g], at(4 * g));
                        s1 = D::dot(s1, lo[g + 1], at(4 * g + 4));
                        s2 = D::dot(s2, hi[g], at(32 + 4 * g));
                        s3 = D::dot(s3, hi[g + 1], at(36 + 4 * g));
                    }
                    let part = _mm256_add_epi32(
                        _mm256_mullo_epi32(_mm256_add_epi32(s0, s1), sc_lo),
                        _mm256_mullo_epi32(_mm256_add_epi32(s2, s3), sc_hi),
                    );
                    *isum = _mm256_add_epi32(*isum, part);
                }
            }
            let dv = _mm256_cvtph_ps(_mm_loadu_si128(dd.add(sb * ROWS) as *const __m128i));
            let dmv = _mm256_cvtph_ps(_mm_loadu_si128(dm.add(sb * ROWS) as *const __m128i));
            let mut mins = [_mm256_setzero_si256(); 8];
            for (j, v) in mins.iter_mut().enumerate() {
                *v = bytes8(km.add(sb * 64 + 8 * j));
            }
            for (k, acc) in acc.iter_mut().enumerate() {
                let b = bsums.as_ptr().add(k * cols / 16 + 16 * sb);
                let mut msum = _mm256_setzero_si256();
                for (j, v) in mins.iter().enumerate() {
                    let a_j = _mm256_set1_epi32(*b.add(2 * j) + *b.add(2 * j + 1));
                    msum = _mm256_add_epi32(msum, _mm256_mullo_epi32(*v, a_j));
                }
                let da = _mm256_set1_ps(*d.get_unchecked(k * nsb + sb));
                *acc = _mm256_fmadd_ps(_mm256_mul_ps(dv, da), _mm256_cvtepi32_ps(isum[k]), *acc);
                *acc = _mm256_fnmadd_ps(_mm256_mul_ps(dmv, da), _mm256_cvtepi32_ps(msum), *acc);
            }
        }
        for (k, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(y.add(k * stride), *a);
        }
    }
}

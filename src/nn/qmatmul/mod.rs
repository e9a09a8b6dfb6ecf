//! Projections whose weights stay in their stored form (GGUF's quantized blocks, f16 and
//! bf16 values), read in place by the kernels: a model keeps the file's bytes, not an f32
//! copy, so resident memory is about the file's size.
//!
//! * **Q4_0, Q4_1, Q8_0 and Q4_K on CPUs with AVX-512 VNNI or AVX2, any number of rows**: the weights
//!   are interleaved eight rows at a time on first use ([`interleave`]; the file's mapped
//!   pages are then handed back, so the model is resident once), and each activation row
//!   takes exact integer block sums for eight weight rows per instruction: one sequence
//!   alone, a batch of them and a prompt's rows get the same bits.
//! * **A few rows (decoding)**, other types or CPUs: the activations are quantized to 8 bits (blocks of 32
//!   with an f32 scale for the 32-element types, super-blocks of 256 with sums of 16 for
//!   the K-quants), and each weight row's dot product is taken on integers, one f32
//!   multiply-add per block or sub-block (`dot`). The instruction set is chosen at run
//!   time ([`paths`]): AVX-512 VNNI, AVX2, or the portable loop.
//! * **More rows (prefill)**: on CPUs with AVX-512 VNNI, for the types whose scales are
//!   per 32 values and Q6_K, an integer GEMM (`gemm`): the rows quantized to 8 bits once, the
//!   weights repacked eight rows at a time. Otherwise tiles of weight rows are dequantized
//!   into a small f32 buffer and multiplied by all rows at once with the f32 GEMM. Either
//!   way each weight is decoded once per forward pass, not once per row.

#[cfg(target_arch = "x86_64")]
mod gemm;
pub mod interleave;
mod pages;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod simd;

use std::sync::Arc;

use rayon::prelude::*;

use crate::weights::quant::{dequantize_into, GgmlType};
pub use interleave::Interleaved;

/// Weights kept in their stored form, by canonical parameter name.
pub type StoredWeights = std::collections::HashMap<String, Arc<QMatrix>>;

/// A weight matrix's stored bytes: in place in a memory-mapped file, or owned (rows
/// reordered at load).
#[derive(Debug, Clone)]
pub enum QBytes {
    Mapped {
        map: Arc<memmap2::Mmap>,
        start: usize,
        len: usize,
    },
    Owned(Vec<u8>),
}

impl QBytes {
    /// Bytes `start..start + len` of these (a view into the same map, or a copy).
    pub fn slice(&self, start: usize, len: usize) -> Self {
        match self {
            Self::Mapped { map, start: s, .. } => Self::Mapped {
                map: map.clone(),
                start: s + start,
                len,
            },
            Self::Owned(v) => Self::Owned(v[start..start + len].to_vec()),
        }
    }

    /// Hand bytes `from..to` of a mapped file's pages back to the system (their copy
    /// elsewhere is what the products read now): resident memory then holds the model
    /// once. A later read, of an embedding row say, faults the pages it needs back in from
    /// the file.
    ///
    /// A fault maps the cached pages around it too (Linux maps up to 64 KiB around), so
    /// the range's first and last pieces take that much of their neighbours along: tensors
    /// released before this one was read would otherwise keep those pages resident.
    fn release(&self, from: usize, to: usize) {
        #[cfg(unix)]
        if let Self::Mapped { map, start, len } = self {
            const AROUND: usize = 64 << 10;
            let to = to.min(*len);
            if from >= to {
                return;
            }
            let first = match from {
                0 => start.saturating_sub(AROUND),
                _ => start + from,
            };
            let last = match to == *len {
                true => (start + to + AROUND).min(map.len()),
                false => start + to,
            };
            // SAFETY: the map is a read-only mapping of the file, never written through,
            // so the pages dropped read back from the file unchanged; `madvise` widens the
            // range to whole pages, neighbours included, which read back the same way
            let _ = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, first, last - first)
            };
        }
        #[cfg(not(unix))]
        let _ = (from, to);
    }

    pub fn as_slice(&self) -> &[u8] {
        match self {
            Self::Mapped { map, start, len } => &map[*start..*start + *len],
            Self::Owned(v) => v,
        }
    }
}

/// A `(rows, cols)` weight matrix in a ggml element type, row-major: each row is
/// `cols / block` whole blocks.
#[derive(Debug, Clone)]
pub struct QMatrix {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    row_bytes: usize,
    data: QBytes,
    /// Where the rows are stored in another order (row `i` is stored row `order[i]`:
    /// [`QMatrix::permute_rows`]).
    order: Option<Arc<[usize]>>,
    /// The stored rows gathered into the matrix's order, by the first path that reads them
    /// as one run of bytes (interleaving reads them through `order` instead).
    gathered: std::sync::OnceLock<Vec<u8>>,
    /// The rows interleaved eight at a time, made by the first product that can use them.
    interleaved: std::sync::OnceLock<Option<Arc<Interleaved>>>,
}

/// How the activations are prepared for a weight type's dot product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ActKind {
    /// Blocks of 32 int8 values with an f32 scale and the block's sum.
    Q8,
    /// Super-blocks of 256 int8 values with an f32 scale and sums of each 16.
    Q8K,
    /// The f32 values themselves (f32, f16, bf16 weights and the K-quants without an
    /// integer kernel).
    F32,
}

fn act_kind(ty: GgmlType) -> ActKind {
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
    kind_k: bool,
    cols: usize,
    /// int8 values, `cols` per row.
    qs: Vec<i8>,
    /// Scale per block (32) or super-block (256).
    d: Vec<f32>,
    /// Per 32-block: `d · Σ q` (the 32-element types with a minimum use it).
    s: Vec<f32>,
    /// Per 16 values of a super-block: `Σ q`.
    bsums: Vec<i32>,
    /// The f32 values (ActKind::F32).
    x: Vec<f32>,
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

    fn of_kind(kind: ActKind, x: &[f32], cols: usize) -> Self {
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
fn quantize_block_portable(x: &[f32], q: &mut [i8]) -> (f32, i32) {
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
unsafe fn quantize_block_avx512(x: &[f32], q: &mut [i8]) -> (f32, i32) {
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

/// Dot products of weight rows with one prepared activation row: `(rows' bytes, bytes
/// per row, activations, one output per row)`.
pub type DotFn = fn(&[u8], usize, ActRow<'_>, &mut [f32]);

/// Products of weight rows with 2 to 8 prepared activation rows at once, each weight block
/// unpacked once for all of them: `(rows' bytes, bytes per row, activations, out,
/// stride)`; activation `j`'s product with row `r` goes to `out[j · stride + r]`.
///
/// # Safety
/// `out` must be valid for writes at `j · stride + r` for every activation `j` and row `r`.
pub type MultiDotFn = unsafe fn(&[u8], usize, &[ActRow<'_>], *mut f32, usize);

/// A named kernel path: the dot product of each weight type on one instruction set, and
/// its multi-row product where it has one (several sequences decoded together).
#[derive(Clone, Copy)]
pub struct Path {
    pub name: &'static str,
    pub dot: fn(GgmlType) -> DotFn,
    pub multi: fn(GgmlType) -> Option<MultiDotFn>,
}

/// Every kernel path this CPU can run, the fastest first (chosen at run time: one binary
/// built for generic x86-64 uses the best the machine has).
pub fn paths() -> Vec<Path> {
    let mut v = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if simd::has_vnni() {
            v.push(Path {
                name: "avx512-vnni",
                dot: simd::vnni_dot,
                multi: simd::vnni_multi,
            });
        }
        if simd::has_avx2() {
            v.push(Path {
                name: "avx2",
                dot: simd::avx2_dot,
                multi: simd::avx2_multi,
            });
        }
    }
    v.push(Path {
        name: "portable",
        dot: scalar::dot,
        multi: |_| None,
    });
    v
}

/// The fastest path's dot product for `ty`.
fn best_dot(ty: GgmlType) -> DotFn {
    (best_path().dot)(ty)
}

/// The fastest path's multi-row product for `ty`, where it has one.
fn best_multi(ty: GgmlType) -> Option<MultiDotFn> {
    (best_path().multi)(ty)
}

fn best_path() -> Path {
    static BEST: std::sync::OnceLock<Path> = std::sync::OnceLock::new();
    *BEST.get_or_init(|| paths()[0])
}

/// Rows at most that take the integer dot products; more take dequantized tiles and
/// the f32 GEMM.
pub const MAX_DOT_ROWS: usize = 8;

/// Rows at most that take the multi-row products (eight at a time) for the types that
/// have them, rather than the integer GEMM, which repacks the weights on every call.
pub const MAX_MULTI_ROWS: usize = 16;

impl QMatrix {
    /// A matrix over `data` (`rows` rows of `cols` values of `ty`); `Err` with the problem
    /// when the sizes do not fit.
    pub fn new(ty: GgmlType, rows: usize, cols: usize, data: QBytes) -> Result<Self, String> {
        let row_bytes = ty
            .bytes_for(cols)
            .ok_or_else(|| format!("{cols} columns are not whole {} blocks", ty.name()))?;
        let want = row_bytes.checked_mul(rows).ok_or("size overflows")?;
        if data.as_slice().len() != want {
            return Err(format!(
                "{} bytes for {rows} × {cols} {} (expected {want})",
                data.as_slice().len(),
                ty.name()
            ));
        }
        Ok(Self {
            ty,
            rows,
            cols,
            row_bytes,
            data,
            order: None,
            gathered: Default::default(),
            interleaved: Default::default(),
        })
    }

    /// The rows interleaved eight at a time ([`interleave`]), made on the first call, where
    /// this CPU and type take them: AVX-512 VNNI or AVX2, Q4_0, Q4_1, Q8_0 or Q4_K, whole
    /// octets of rows.
    pub fn interleaved(&self) -> Option<&Interleaved> {
        self.interleaved
            .get_or_init(|| self.interleave(interleave::Kernel::available().first().copied()))
            .as_deref()
    }

    /// The rows interleaved for `kernel` (`None`: not interleaved), where the type takes it.
    fn interleave(&self, kernel: Option<interleave::Kernel>) -> Option<Arc<Interleaved>> {
        let kernel = kernel?;
        (interleave::supports(self.ty) && self.rows.is_multiple_of(interleave::ROWS)).then(|| {
            // the file's pages handed back as they are read, so a large matrix
            // (a tied embedding) is not resident twice on its way
            let mut released = 0;
            let packed = Interleaved::new(
                kernel,
                self.ty,
                self.data.as_slice(),
                self.order.as_deref(),
                self.cols,
                self.row_bytes,
                &mut |read| {
                    self.data.release(released, read);
                    released = read;
                },
            );
            Arc::new(packed)
        })
    }

    /// This matrix with its rows interleaved for `kernel` (before any product made them for
    /// the best one): to test each kernel the CPU has.
    #[cfg(test)]
    fn interleaved_for(self, kernel: interleave::Kernel) -> Self {
        let _ = self.interleaved.set(self.interleave(Some(kernel)));
        self
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    /// Bytes of the whole matrix (what one product reads).
    pub fn bytes(&self) -> usize {
        self.row_bytes * self.rows
    }

    /// The rows in order, one after another (gathered on the first call where the
    /// stored order differs).
    fn in_order(&self) -> &[u8] {
        let Some(order) = &self.order else {
            return self.data.as_slice();
        };
        self.gathered.get_or_init(|| {
            let stored = self.data.as_slice();
            let mut v = Vec::with_capacity(order.len() * self.row_bytes);
            for &o in order.iter() {
                v.extend_from_slice(&stored[o * self.row_bytes..][..self.row_bytes]);
            }
            self.data.release(0, stored.len());
            v
        })
    }

    #[cfg(test)]
    fn row(&self, r: usize) -> &[u8] {
        &self.in_order()[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    /// Rows `r0..r1` dequantized into `out` (`(r1 − r0) × cols`); from the interleaved
    /// rows where they have been made (a tied embedding's lookups leave the file alone).
    pub fn dequantize_rows(&self, r0: usize, r1: usize, out: &mut [f32]) {
        if let Some(Some(packed)) = self.interleaved.get() {
            let mut row = vec![0u8; self.row_bytes];
            for (r, out) in (r0..r1).zip(out.chunks_exact_mut(self.cols)) {
                packed.stored_row(r, &mut row);
                dequantize_into(self.ty, &row, out);
            }
            return;
        }
        let b = &self.in_order()[r0 * self.row_bytes..r1 * self.row_bytes];
        dequantize_into(self.ty, b, out);
    }

    /// Rows `r0..r1` as a matrix of their own (a view of the same bytes).
    pub fn rows_range(&self, r0: usize, r1: usize) -> Self {
        let (start, len) = (r0 * self.row_bytes, (r1 - r0) * self.row_bytes);
        let data = match &self.order {
            None => self.data.slice(start, len),
            Some(_) => QBytes::Owned(self.in_order()[start..start + len].to_vec()),
        };
        Self {
            ty: self.ty,
            rows: r1 - r0,
            cols: self.cols,
            row_bytes: self.row_bytes,
            data,
            order: None,
            gathered: Default::default(),
            interleaved: Default::default(),
        }
    }

    /// The matrix with its rows in `order` (row `i` of the result is row `order[i]`), a
    /// view of the same bytes: products over interleaved rows read them in this order
    /// and the others gather them on first use.
    pub fn permute_rows(&self, order: &[usize]) -> Self {
        assert!(
            order.iter().all(|&o| o < self.rows),
            "row order out of range"
        );
        let order: Arc<[usize]> = match &self.order {
            None => order.into(),
            Some(inner) => order.iter().map(|&o| inner[o]).collect(),
        };
        Self {
            ty: self.ty,
            rows: order.len(),
            cols: self.cols,
            row_bytes: self.row_bytes,
            data: self.data.clone(),
            order: Some(order),
            gathered: Default::default(),
            interleaved: Default::default(),
        }
    }
}

/// For each pair `(w_j, x_j)` with `x_j: (m, w_j.cols)` row-major, `x_j · w_jᵀ` as an
/// `(m, w_j.rows)` row-major vector. Few rows: integer dot products in one parallel
/// region over blocks of 64 weight rows of all the matrices; more: dequantized tiles
/// and the f32 GEMM.
pub fn products(pairs: &[(&QMatrix, &[f32])], m: usize) -> Vec<Vec<f32>> {
    // interleaved weights take any number of rows; the others as below
    let packed: Vec<Option<&Interleaved>> = pairs.iter().map(|(w, _)| w.interleaved()).collect();
    if packed.iter().any(Option::is_some) {
        let (mut inter, mut inter_at, mut rest, mut rest_at) = (vec![], vec![], vec![], vec![]);
        for (i, (&(w, x), p)) in pairs.iter().zip(&packed).enumerate() {
            match p {
                Some(p) => {
                    inter.push((w, *p, x));
                    inter_at.push(i);
                }
                None => {
                    rest.push((w, x));
                    rest_at.push(i);
                }
            }
        }
        let mut ys = vec![Vec::new(); pairs.len()];
        for (i, y) in inter_at.into_iter().zip(interleaved_products(&inter, m)) {
            ys[i] = y;
        }
        if !rest.is_empty() {
            for (i, y) in rest_at.into_iter().zip(products_in_place(&rest, m)) {
                ys[i] = y;
            }
        }
        return ys;
    }
    products_in_place(pairs, m)
}

/// Whether this CPU has AVX-512 VNNI (detected once): what the interleaved weights
/// ([`interleave`]) and the integer GEMM ([`gemm`]) need.
fn vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *VNNI.get_or_init(simd::has_vnni)
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// [`products`] of interleaved weights, for any number of rows: each distinct input
/// quantized once (q, k and v share theirs), then runs of octets of rows in parallel,
/// taking the activation rows 64 at a time so that a run's weights stay in cache.
fn interleaved_products(pairs: &[(&QMatrix, &Interleaved, &[f32])], m: usize) -> Vec<Vec<f32>> {
    let mut acts: Vec<QAct> = Vec::new();
    let mut of_pair = Vec::with_capacity(pairs.len());
    let kind = |p: &Interleaved| match p.takes_k_activations() {
        true => ActKind::Q8K,
        false => ActKind::Q8,
    };
    for (j, (w, p, x)) in pairs.iter().enumerate() {
        let same = pairs[..j]
            .iter()
            .position(|(v, q, y)| v.cols == w.cols && std::ptr::eq(*x, *y) && kind(q) == kind(p));
        of_pair.push(match same {
            Some(i) => of_pair[i],
            None => {
                acts.push(QAct::of_kind(kind(p), x, w.cols));
                acts.len() - 1
            }
        });
    }
    let total: usize = pairs.iter().map(|(_, p, _)| p.octets()).sum();
    let chunk = (total / (4 * rayon::current_num_threads())).max(8);
    let jobs: Vec<(usize, usize, usize)> = pairs
        .iter()
        .enumerate()
        .flat_map(|(j, (_, p, _))| {
            let n = p.octets();
            (0..n.div_ceil(chunk)).map(move |c| (j, c * chunk, ((c + 1) * chunk).min(n)))
        })
        .collect();
    let mut ys: Vec<Vec<f32>> = pairs
        .iter()
        .map(|(w, _, _)| vec![0f32; m * w.rows])
        .collect();
    let outs: Vec<OutPtr> = ys.iter_mut().map(|y| OutPtr(y.as_mut_ptr())).collect();
    let run = |&(j, o0, o1): &(usize, usize, usize)| {
        let (w, p, _) = pairs[j];
        let a = &acts[of_pair[j]];
        for r0 in (0..m).step_by(64) {
            let n = (m - r0).min(64);
            let rows = a.rows(r0, r0 + n);
            for o in o0..o1 {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: interleaved() made `p` for a kernel this CPU runs; activation rows
                // r0..r0 + n take outputs 8o..8o + 8 of their rows of matrix j's m × rows
                // vector, which no other job writes
                unsafe {
                    p.octet(
                        o,
                        rows,
                        n,
                        outs[j].at(r0 * w.rows + interleave::ROWS * o),
                        w.rows,
                    );
                }
                #[cfg(not(target_arch = "x86_64"))]
                let _ = (p, rows, n, o);
            }
        }
    };
    jobs.par_iter().for_each(run);
    ys
}

/// [`products`] of weights read in their stored layout.
fn products_in_place(pairs: &[(&QMatrix, &[f32])], m: usize) -> Vec<Vec<f32>> {
    // several rows: each weight block unpacked once for all of them, where the type has it
    let multi: Vec<Option<MultiDotFn>> = pairs
        .iter()
        .map(|(w, _)| if m >= 2 { best_multi(w.ty) } else { None })
        .collect();
    if m > MAX_DOT_ROWS && !(m <= MAX_MULTI_ROWS && multi.iter().all(Option::is_some)) {
        return pairs
            .iter()
            .map(|(w, x)| match int8_gemm(w.ty) {
                true => int8_tiles(w, x, m),
                false => tiled(w, x, m),
            })
            .collect();
    }
    let acts: Vec<QAct> = pairs
        .iter()
        .map(|(w, x)| QAct::new(w.ty, x, w.cols))
        .collect();
    // a few jobs per thread, each a run of at least 64 rows (a job costs about a
    // microsecond to hand out, as long as reading 20-60 kB of weights)
    let total: usize = pairs.iter().map(|(w, _)| w.rows).sum();
    let chunk = (total / (4 * rayon::current_num_threads())).max(64);
    let jobs: Vec<(usize, usize, usize)> = pairs
        .iter()
        .enumerate()
        .flat_map(|(j, (w, _))| {
            (0..w.rows.div_ceil(chunk)).map(move |c| (j, c * chunk, ((c + 1) * chunk).min(w.rows)))
        })
        .collect();
    let mut ys: Vec<Vec<f32>> = pairs.iter().map(|(w, _)| vec![0f32; m * w.rows]).collect();
    let outs: Vec<OutPtr> = ys.iter_mut().map(|y| OutPtr(y.as_mut_ptr())).collect();
    let act_rows: Vec<Vec<ActRow<'_>>> = acts
        .iter()
        .map(|a| (0..m).map(|r| a.row(r)).collect())
        .collect();
    jobs.par_iter().for_each(|&(j, o0, o1)| {
        let w = pairs[j].0;
        let rb = w.row_bytes;
        let rows = &w.in_order()[o0 * rb..o1 * rb];
        if let Some(f) = multi[j] {
            // eight activation rows at a time over this job's weight rows (which stay in
            // cache); a last single row takes the one-row product
            for r0 in (0..m).step_by(8) {
                let acts = &act_rows[j][r0..(r0 + 8).min(m)];
                let out = outs[j].at(r0 * w.rows + o0);
                if acts.len() == 1 {
                    // SAFETY: row r0's outputs o0..o1 of matrix j, written by this job alone
                    let y = unsafe { std::slice::from_raw_parts_mut(out, o1 - o0) };
                    best_dot(w.ty)(rows, rb, acts[0], y);
                } else {
                    // SAFETY: activation r's outputs o0..o1 of matrix j are at r · rows + o0..
                    // of its m × rows vector, which no other job writes
                    unsafe { f(rows, rb, acts, out, w.rows) };
                }
            }
            return;
        }
        let dot = best_dot(w.ty);
        for r in 0..m {
            // SAFETY: row r's outputs o0..o1 of matrix j lie inside its m × rows vector,
            // and no other job writes them
            let y =
                unsafe { std::slice::from_raw_parts_mut(outs[j].0.add(r * w.rows + o0), o1 - o0) };
            dot(rows, rb, acts[j].row(r), y);
        }
    });
    ys
}

/// A raw output pointer shared by the jobs or tiles, which write disjoint parts.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: each job or tile writes its own part of the output only
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer `i` values on (a method, so closures capture the whole wrapper).
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// Whether many rows of `ty` take the integer GEMM ([`gemm`]): a type it repacks, on a
/// CPU with AVX-512 VNNI.
fn int8_gemm(ty: GgmlType) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        vnni() && gemm::supports(ty)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = ty;
        false
    }
}

/// How the integer GEMM ([`gemm`]) quantizes the activations for weights of `ty`: per 256
/// for Q6_K (its integer sums run over a super-block), per 32 for the others.
fn gemm_activations(ty: GgmlType) -> ActKind {
    match ty {
        GgmlType::Q6K => ActKind::Q8K,
        _ => ActKind::Q8,
    }
}

/// `x (m × cols) · wᵀ` for many rows on integers: the rows quantized to 8 bits once, the
/// weights repacked eight rows at a time ([`gemm`]), runs of such tiles in parallel.
#[cfg(target_arch = "x86_64")]
fn int8_tiles(w: &QMatrix, x: &[f32], m: usize) -> Vec<f32> {
    let (n, k) = (w.rows, w.cols);
    let act = QAct::of_kind(gemm_activations(w.ty), x, k);
    // Q6_K's signed codes take the activations as unsigned bytes, q + 128
    let unsigned: Vec<u8> = match w.ty {
        GgmlType::Q6K => act.qs.iter().map(|&q| q as u8 ^ 0x80).collect(),
        _ => Vec::new(),
    };
    let tiles = n.div_ceil(gemm::ROWS);
    let per = (tiles / (4 * rayon::current_num_threads())).max(1);
    let mut y = vec![0f32; m * n];
    let out = OutPtr(y.as_mut_ptr());
    let data = w.in_order();
    (0..tiles.div_ceil(per))
        .into_par_iter()
        .for_each_init(gemm::Packed::default, |packed, job| {
            for t in job * per..((job + 1) * per).min(tiles) {
                let r0 = t * gemm::ROWS;
                gemm::repack(w.ty, data, w.row_bytes, n, k, r0, packed);
                let valid = gemm::ROWS.min(n - r0);
                // SAFETY: int8_gemm checked the CPU; columns r0..r0 + valid of each of the
                // m output rows (stride n) belong to this tile alone
                unsafe {
                    match w.ty {
                        GgmlType::Q6K => gemm::kernel_signed(
                            packed,
                            &unsigned,
                            &act.d,
                            m,
                            k,
                            out.at(r0),
                            n,
                            valid,
                        ),
                        _ => gemm::kernel(
                            packed,
                            &act.qs,
                            &act.d,
                            &act.s,
                            m,
                            k,
                            out.at(r0),
                            n,
                            valid,
                        ),
                    }
                }
            }
        });
    y
}

#[cfg(not(target_arch = "x86_64"))]
fn int8_tiles(w: &QMatrix, x: &[f32], m: usize) -> Vec<f32> {
    tiled(w, x, m)
}

/// `x (m × cols) · wᵀ` for many rows: tiles of weight rows dequantized into an f32
/// buffer and multiplied with the f32 GEMM, tiles in parallel. A tile is as wide as
/// keeps two per thread (32 to 256 rows): the GEMM packs `x` once per tile, so narrow
/// tiles would spend their time packing.
fn tiled(w: &QMatrix, x: &[f32], m: usize) -> Vec<f32> {
    let (n, k) = (w.rows, w.cols);
    let tile = (n / (2 * rayon::current_num_threads())).clamp(32, 256) / 16 * 16;
    let mut y = vec![0f32; m * n];
    let out = OutPtr(y.as_mut_ptr());
    (0..n.div_ceil(tile))
        .into_par_iter()
        .for_each_init(Vec::new, |buf, t| {
            let (o0, o1) = (t * tile, ((t + 1) * tile).min(n));
            let cols = o1 - o0;
            // f32 rows in place where they are aligned (a memory-mapped file's are
            // wherever the writer aligned them); anything else decoded into the tile
            let at = &w.in_order()[o0 * w.row_bytes..];
            let b = if w.ty == GgmlType::F32 && at.as_ptr().align_offset(4) == 0 {
                at.as_ptr().cast::<f32>()
            } else {
                buf.resize(tile * k, 0.0);
                w.dequantize_rows(o0, o1, &mut buf[..cols * k]);
                buf.as_ptr()
            };
            // SAFETY: x holds m × k values, b cols × k; the destination is column block
            // o0..o1 of the m × n output (row stride n), which no other tile writes
            unsafe {
                super::causal_attention::mm(
                    m,
                    cols,
                    k,
                    out.at(o0),
                    n,
                    false,
                    x.as_ptr(),
                    k,
                    1,
                    b,
                    1,
                    k,
                    1.0,
                );
            }
        });
    y
}

#[cfg(test)]
mod tests;

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

/// A [`MultiDotFn`] calling `f::<M>` for the number `M` of activation rows it is given (2
/// to 8), `f` being a kernel of the caller's instruction set.
#[cfg(target_arch = "x86_64")]
macro_rules! by_rows {
    ($f:ident) => {
        |w, rb, acts, out, stride| {
            // SAFETY (each arm): the MultiDotFn's contract, on a CPU with `f`'s features
            // (whoever hands out the function detected them)
            unsafe {
                match acts.len() {
                    2 => $f::<2>(w, rb, acts, out, stride),
                    3 => $f::<3>(w, rb, acts, out, stride),
                    4 => $f::<4>(w, rb, acts, out, stride),
                    5 => $f::<5>(w, rb, acts, out, stride),
                    6 => $f::<6>(w, rb, acts, out, stride),
                    7 => $f::<7>(w, rb, acts, out, stride),
                    8 => $f::<8>(w, rb, acts, out, stride),
                    m => panic!("multi-row product of {m} rows (2 to 8 are made)"),
                }
            }
        }
    };
}

mod act;
#[cfg(target_arch = "x86_64")]
mod float_multi;
#[cfg(target_arch = "x86_64")]
mod gemm;
pub mod interleave;
mod pages;
mod product;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod simd;

use std::sync::Arc;

use crate::weights::quant::{dequantize_into, GgmlType};
use act::ActKind;
pub use act::{ActRow, QAct};
pub use interleave::Interleaved;
pub(crate) use pages::trim as trim_pages;
pub use product::products;

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
    /// each range takes that much before it along (the read of its first page mapped the
    /// end of the range released before it again), and the matrix's last piece that much
    /// after it: those pages would otherwise stay resident.
    fn release(&self, from: usize, to: usize) {
        #[cfg(unix)]
        if let Self::Mapped { map, start, len } = self {
            const AROUND: usize = 64 << 10;
            let to = to.min(*len);
            if from >= to {
                return;
            }
            let first = (start + from).saturating_sub(AROUND);
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
    /// The rows copied from the file onto huge pages, in the matrix's order, by the first
    /// path that reads them as one run of bytes (interleaving reads them through `order`
    /// instead): [`QMatrix::in_order`].
    copied: std::sync::OnceLock<Arc<pages::PageVec<u8>>>,
    /// The rows interleaved eight at a time, made by the first product that can use them.
    interleaved: std::sync::OnceLock<Option<Arc<Interleaved>>>,
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
            copied: Default::default(),
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

    /// The layout the products read, made now rather than by the first product: the rows
    /// interleaved where this CPU and type take that, else copied off the mapped file onto
    /// huge pages.
    pub fn prepare(&self) {
        if self.interleaved().is_none() {
            self.in_order();
        }
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

    /// The rows in order, one after another. Rows in a mapped file are copied onto huge
    /// pages on the first call (gathered into order where they are stored in another), and
    /// the file's pages handed back as they are copied, so the matrix stays resident once.
    /// Decoding streams every row once per token: from 4 KiB pages of the file it did so
    /// 10-20% slower (dense-110m f32 and bf16 `bench decode`, Zen 4, alternating runs).
    fn in_order(&self) -> &[u8] {
        if let (QBytes::Owned(v), None) = (&self.data, &self.order) {
            return v;
        }
        self.copied.get_or_init(|| {
            let stored = self.data.as_slice();
            let rb = self.row_bytes;
            let mut v = pages::PageVec::zeroed(self.rows * rb);
            match &self.order {
                Some(order) => {
                    for (dst, &o) in v.chunks_exact_mut(rb.max(1)).zip(order.iter()) {
                        dst.copy_from_slice(&stored[o * rb..][..rb]);
                    }
                    self.data.release(0, stored.len());
                }
                None => {
                    const STEP: usize = 4 << 20;
                    for at in (0..stored.len()).step_by(STEP) {
                        let end = (at + STEP).min(stored.len());
                        v[at..end].copy_from_slice(&stored[at..end]);
                        self.data.release(at, end);
                    }
                }
            }
            Arc::new(v)
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
        // an untied embedding's lookups read the file in place, without copying the table
        let rows = match (self.copied.get(), &self.order) {
            (Some(copy), _) => &copy[..],
            (None, None) => self.data.as_slice(),
            (None, Some(_)) => self.in_order(),
        };
        dequantize_into(
            self.ty,
            &rows[r0 * self.row_bytes..r1 * self.row_bytes],
            out,
        );
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
            copied: Default::default(),
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
            copied: Default::default(),
            interleaved: Default::default(),
        }
    }
}

#[cfg(test)]
mod tests;

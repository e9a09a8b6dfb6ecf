//! The products: each distinct input prepared once, then the weight rows of all the
//! pairs in one parallel region (interleaved octets, or rows in their stored layout), or
//! for many rows the integer GEMM or dequantized tiles through the f32 GEMM.

use rayon::prelude::*;

use super::act::act_kind;
use super::{
    best_dot, best_multi, interleave, ActKind, ActRow, Interleaved, MultiDotFn, QAct, QMatrix,
    MAX_DOT_ROWS, MAX_MULTI_ROWS,
};
#[cfg(target_arch = "x86_64")]
use super::{gemm, simd};
use crate::weights::quant::GgmlType;

/// For each pair `(w_j, x_j)` with `x_j: (m_j, w_j.cols)` row-major, `x_j · w_jᵀ` as an
/// `(m_j, w_j.rows)` row-major vector; the pairs may differ in rows (a decoding step's
/// experts, each on its own tokens). Few rows: integer dot products in one parallel
/// region over blocks of 64 weight rows of all the matrices; more: dequantized tiles
/// and the f32 GEMM, matrix by matrix.
pub fn products(pairs: &[(&QMatrix, &[f32])]) -> Vec<Vec<f32>> {
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
        for (i, y) in inter_at.into_iter().zip(interleaved_products(&inter)) {
            ys[i] = y;
        }
        if !rest.is_empty() {
            for (i, y) in rest_at.into_iter().zip(products_in_place(&rest)) {
                ys[i] = y;
            }
        }
        return ys;
    }
    products_in_place(pairs)
}

/// The rows of `x` as the input of `w`.
fn rows_of(w: &QMatrix, x: &[f32]) -> usize {
    x.len() / w.cols.max(1)
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
fn interleaved_products(pairs: &[(&QMatrix, &Interleaved, &[f32])]) -> Vec<Vec<f32>> {
    let kind = |p: &Interleaved| match p.takes_k_activations() {
        true => ActKind::Q8K,
        false => ActKind::Q8,
    };
    let (acts, of_pair) = shared_acts(pairs.iter().map(|(w, p, x)| (kind(p), *x, w.cols)));
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
        .map(|(w, _, x)| vec![0f32; rows_of(w, x) * w.rows])
        .collect();
    let outs: Vec<OutPtr> = ys.iter_mut().map(|y| OutPtr(y.as_mut_ptr())).collect();
    let run = |&(j, o0, o1): &(usize, usize, usize)| {
        let (w, p, x) = pairs[j];
        let m = rows_of(w, x);
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

/// Each distinct input `(kind, x, cols)` prepared once: the prepared inputs, and for each
/// input the index of its own (inputs that are the same slice for the same kind, as q, k
/// and v's are, share one).
fn shared_acts<'a>(
    inputs: impl Iterator<Item = (ActKind, &'a [f32], usize)>,
) -> (Vec<QAct>, Vec<usize>) {
    let mut seen: Vec<(ActKind, &[f32], usize)> = Vec::new();
    let mut acts = Vec::new();
    let of = inputs
        .map(|(kind, x, cols)| {
            let same = seen
                .iter()
                .position(|&(k, y, c)| k == kind && c == cols && std::ptr::eq(x, y));
            same.unwrap_or_else(|| {
                seen.push((kind, x, cols));
                acts.push(QAct::of_kind(kind, x, cols));
                acts.len() - 1
            })
        })
        .collect();
    (acts, of)
}

/// [`products`] of weights read in their stored layout.
fn products_in_place(pairs: &[(&QMatrix, &[f32])]) -> Vec<Vec<f32>> {
    let rows: Vec<usize> = pairs.iter().map(|(w, x)| rows_of(w, x)).collect();
    // several rows: each weight block unpacked once for all of them, where the type has it
    let multi: Vec<Option<MultiDotFn>> = pairs
        .iter()
        .zip(&rows)
        .map(|((w, _), &m)| if m >= 2 { best_multi(w.ty) } else { None })
        .collect();
    // many rows: a GEMM per matrix; the others' dot products in one parallel region
    let gemm = |j: usize| {
        let m = rows[j];
        m > MAX_DOT_ROWS && !(m <= MAX_MULTI_ROWS && multi[j].is_some())
    };
    let mut ys: Vec<Vec<f32>> = vec![Vec::new(); pairs.len()];
    for (j, &(w, x)) in pairs.iter().enumerate().filter(|&(j, _)| gemm(j)) {
        ys[j] = match int8_gemm(w.ty) {
            true => int8_tiles(w, x, rows[j]),
            false => tiled(w, x, rows[j]),
        };
    }
    let dots: Vec<usize> = (0..pairs.len()).filter(|&j| !gemm(j)).collect();
    if dots.is_empty() {
        return ys;
    }
    let (acts, act_of) = shared_acts(dots.iter().map(|&j| {
        let (w, x) = pairs[j];
        (act_kind(w.ty), x, w.cols)
    }));
    // a few jobs per thread, each a run of at least 64 rows (a job costs about a
    // microsecond to hand out, as long as reading 20-60 kB of weights)
    let total: usize = dots.iter().map(|&j| pairs[j].0.rows).sum();
    let chunk = (total / (4 * rayon::current_num_threads())).max(64);
    let jobs: Vec<(usize, usize, usize)> = dots
        .iter()
        .flat_map(|&j| {
            let n = pairs[j].0.rows;
            (0..n.div_ceil(chunk)).map(move |c| (j, c * chunk, ((c + 1) * chunk).min(n)))
        })
        .collect();
    for &j in &dots {
        ys[j] = vec![0f32; rows[j] * pairs[j].0.rows];
    }
    let outs: Vec<OutPtr> = ys.iter_mut().map(|y| OutPtr(y.as_mut_ptr())).collect();
    let mut act_rows: Vec<Vec<ActRow<'_>>> = vec![Vec::new(); pairs.len()];
    for (&j, &a) in dots.iter().zip(&act_of) {
        act_rows[j] = (0..rows[j]).map(|r| acts[a].row(r)).collect();
    }
    jobs.par_iter().for_each(|&(j, o0, o1)| {
        let w = pairs[j].0;
        let m = rows[j];
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
        for (r, &a) in act_rows[j].iter().enumerate() {
            // SAFETY: row r's outputs o0..o1 of matrix j lie inside its m × rows vector,
            // and no other job writes them
            let y =
                unsafe { std::slice::from_raw_parts_mut(outs[j].0.add(r * w.rows + o0), o1 - o0) };
            dot(rows, rb, a, y);
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
pub(super) fn int8_gemm(ty: GgmlType) -> bool {
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
pub(super) fn gemm_activations(ty: GgmlType) -> ActKind {
    match ty {
        GgmlType::Q6K => ActKind::Q8K,
        _ => ActKind::Q8,
    }
}

/// `x (m × cols) · wᵀ` for many rows on integers: the rows quantized to 8 bits once, the
/// weights repacked eight rows at a time ([`gemm`]), runs of such tiles in parallel.
#[cfg(target_arch = "x86_64")]
pub(super) fn int8_tiles(w: &QMatrix, x: &[f32], m: usize) -> Vec<f32> {
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
pub(super) fn int8_tiles(w: &QMatrix, x: &[f32], m: usize) -> Vec<f32> {
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
                crate::nn::causal_attention::mm(
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

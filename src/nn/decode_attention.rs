//! Attention of one new token of each of several sequences over its own cached keys and
//! values, in one parallel region over (sequence, key-value head) pairs: what a batched
//! decoding step needs, where each sequence's cache has its own length. Scores, softmax
//! and the weighted sum of values are plain loops over the cached rows (a single query row
//! gains nothing from a GEMM, whose set-up cost dominated per-sequence calls). Caches
//! may hold their keys and values in f32 or f16; f16 values are widened as they are read.
//! A cache is read through its strides (each row contiguous), so a head-major cache, whose
//! head's rows follow each other, streams each task's keys and values from one block.

use candle_core::{DType, Result, Storage, Tensor};
use half::f16;
use rayon::prelude::*;

use super::causal_attention::alibi_slopes;
use super::ops::Width;

/// Where an operand's values are: a contiguous CPU tensor of `dtype` (the queries).
fn view(t: &Tensor, what: &str, dtype: DType) -> Result<(usize, usize)> {
    if t.dtype() != dtype || !t.is_contiguous() || !t.device().is_cpu() {
        candle_core::bail!("decode attention: {what} must be a contiguous {dtype:?} CPU tensor")
    }
    let (_, layout) = t.storage_and_layout();
    Ok((layout.start_offset(), t.elem_count()))
}

/// One sequence's cached keys or values, `(1, len, h_kv, w)`, as a slice of their storage
/// from the first element: element `(pos, head, c)` at `pos · row + head · head_stride + c`.
#[derive(Clone, Copy)]
struct Geo {
    len: usize,
    row: usize,
    head: usize,
}

/// The geometry of cached keys or values `t` of `dtype` and where their values lie in the
/// storage (`start..end`): rows contiguous, any position and head strides.
fn strided(t: &Tensor, what: &str, dtype: DType) -> Result<(Geo, usize, usize)> {
    let (n, len, h, w) = t.dims4()?;
    let st = t.stride();
    if n != 1 || t.dtype() != dtype || (w > 1 && st[3] != 1) || !t.device().is_cpu() {
        candle_core::bail!(
            "decode attention: {what} must be a {dtype:?} CPU tensor of one sequence with \
             contiguous rows"
        )
    }
    let (_, layout) = t.storage_and_layout();
    let start = layout.start_offset();
    let end = start + (len.max(1) - 1) * st[1] + (h.max(1) - 1) * st[2] + w;
    let geo = Geo {
        len,
        row: st[1],
        head: st[2],
    };
    Ok((geo, start, end))
}

/// A type cached keys and values are held in: f32, or f16 widened as it is read.
pub(crate) trait Elem: Copy + Send + Sync + candle_core::WithDType {
    /// `row` as f32: itself, or converted into `buf` (at least as long).
    fn as_f32<'a>(row: &'a [Self], buf: &'a mut [f32]) -> &'a [f32];
    /// Sixteen values from `p` as f32.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `p` has sixteen readable values.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl Elem for f32 {
    #[inline(always)]
    fn as_f32<'a>(row: &'a [f32], _: &'a mut [f32]) -> &'a [f32] {
        row
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller's
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn as_f32<'a>(row: &'a [f16], buf: &'a mut [f32]) -> &'a [f32] {
        use half::slice::HalfFloatSliceExt;
        let out = &mut buf[..row.len()];
        row.convert_to_f32_slice(out);
        out
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
    }
}

/// `q: (b, 1, h, d)` against `keys[i], values[i]: (1, len_i, h_kv, d|dv)` (sequence `i`'s
/// whole cache, the new token's last): `(b, 1, h, dv)`. `window`: keys visible to the query,
/// itself included; `alibi`: BLOOM's position biases. Grouped heads share their key-value
/// head.
pub fn decode_attention(
    q: &Tensor,
    keys: &[Tensor],
    values: &[Tensor],
    scale: f32,
    window: Option<usize>,
    alibi: bool,
) -> Result<Tensor> {
    attention_on(Width::detect(), q, keys, values, scale, window, alibi)
}

/// [`decode_attention`] on a given instruction set.
fn attention_on(
    width: Width,
    q: &Tensor,
    keys: &[Tensor],
    values: &[Tensor],
    scale: f32,
    window: Option<usize>,
    alibi: bool,
) -> Result<Tensor> {
    let (b, t, h, d) = q.dims4()?;
    if t != 1 || keys.len() != b || values.len() != b {
        candle_core::bail!(
            "decode attention: {b} queries of one token for {} caches",
            keys.len()
        )
    }
    let q = q.to_dtype(DType::F32)?.contiguous()?;
    let hkv = keys[0].dim(2)?;
    let dv = values[0].dim(3)?;
    if hkv == 0 || !h.is_multiple_of(hkv) {
        candle_core::bail!("decode attention: {h} heads over {hkv} key-value heads")
    }
    for (k, v) in keys.iter().zip(values) {
        let (kd, vd) = (k.dims4()?, v.dims4()?);
        if kd.1 != vd.1 || kd.1 == 0 || kd.2 != hkv || vd.2 != hkv || kd.3 != d || vd.3 != dv {
            candle_core::bail!(
                "decode attention: keys {kd:?} and values {vd:?} do not fit {h} heads of {d}"
            )
        }
    }
    let shape = Shape {
        h,
        hkv,
        d,
        dv,
        scale,
        window,
        alibi,
    };
    let out = match keys[0].dtype() {
        DType::F16 => attend_all::<f16>(width, &q, keys, values, &shape)?,
        _ => attend_all::<f32>(width, &q, keys, values, &shape)?,
    };
    Tensor::from_vec(out, (b, 1, h, dv), q.device())
}

/// One call's shape and options.
struct Shape {
    h: usize,
    hkv: usize,
    d: usize,
    dv: usize,
    scale: f32,
    window: Option<usize>,
    alibi: bool,
}

/// The outputs `(b, h, dv)` of [`attention_on`] for caches holding `E`.
fn attend_all<E: Elem>(
    width: Width,
    q: &Tensor,
    keys: &[Tensor],
    values: &[Tensor],
    sh: &Shape,
) -> Result<Vec<f32>> {
    let b = keys.len();
    let (h, dv) = (sh.h, sh.dv);
    // hold every operand's storage while the raw slices are read
    let guards: Vec<_> = keys
        .iter()
        .chain(values)
        .map(|t| t.storage_and_layout())
        .collect();
    let mut slices: Vec<&[E]> = Vec::with_capacity(guards.len());
    let mut geos = Vec::with_capacity(guards.len());
    for (i, (g, _)) in guards.iter().enumerate() {
        let Storage::Cpu(s) = &**g else {
            candle_core::bail!("decode attention: operands must be on the CPU")
        };
        let (geo, start, end) = match i {
            _ if i < b => strided(&keys[i], "keys", E::DTYPE)?,
            _ => strided(&values[i - b], "values", E::DTYPE)?,
        };
        let Some(slice) = s.as_slice::<E>()?.get(start..end) else {
            candle_core::bail!("decode attention: a cache view exceeds its storage")
        };
        slices.push(slice);
        geos.push(geo);
    }
    let (qg, _) = q.storage_and_layout();
    let Storage::Cpu(qs) = &*qg else {
        candle_core::bail!("decode attention: operands must be on the CPU")
    };
    let (start, n) = view(q, "queries", DType::F32)?;
    let qs = &qs.as_slice::<f32>()?[start..start + n];
    let (ks, vs) = slices.split_at(b);
    let (kgeo, vgeo) = geos.split_at(b);
    let slopes = sh.alibi.then(|| alibi_slopes(h));
    let group = h / sh.hkv;
    let mut out = vec![0f32; b * h * dv];
    let visible = kgeo
        .iter()
        .map(|g| visible(g.len, sh.window))
        .min()
        .unwrap_or(0);
    let parts = parts(b * sh.hkv, rayon::current_num_threads(), visible);
    let heads = Heads {
        ks,
        vs,
        kgeo,
        vgeo,
        qs,
        hkv: sh.hkv,
        d: sh.d,
        dv,
        group,
        h,
        scale: sh.scale,
        window: sh.window,
        slopes: slopes.as_deref(),
        parts,
    };
    if parts == 1 {
        out.par_chunks_mut(group * dv)
            .enumerate()
            .for_each(|(task, o)| run(width, &heads, task, o));
        return Ok(out);
    }
    // each part's unnormalised outputs, then its heads' maxima and sums
    let stride = group * (dv + 2);
    let mut shares = vec![0f32; b * sh.hkv * parts * stride];
    shares
        .par_chunks_mut(stride)
        .enumerate()
        .for_each(|(task, o)| run(width, &heads, task, o));
    for (pair, o) in out.chunks_exact_mut(group * dv).enumerate() {
        let share = |c: usize| &shares[(pair * parts + c) * stride..][..stride];
        for (g, o) in o.chunks_exact_mut(dv).enumerate() {
            let max = (0..parts)
                .map(|c| share(c)[group * dv + g])
                .fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for c in 0..parts {
                let sc = share(c);
                let w = super::ops::exp(sc[group * dv + g] - max);
                sum += w * sc[group * dv + group + g];
                for (a, &x) in o.iter_mut().zip(&sc[g * dv..(g + 1) * dv]) {
                    *a += w * x;
                }
            }
            o.iter_mut().for_each(|a| *a /= sum);
        }
    }
    Ok(out)
}

/// How many of a cache's `len` positions a query sees through `window` (the last ones).
fn visible(len: usize, window: Option<usize>) -> usize {
    window.map_or(len, |w| len.min(w))
}

/// Into how many parts each (sequence, key-value head) task's positions are split: one,
/// unless there are fewer tasks than two per thread (one sequence over three key-value
/// heads leaves one of two threads idle half the time) and each part keeps at least
/// [`MIN_PART`] of the `visible` positions.
fn parts(tasks: usize, threads: usize, visible: usize) -> usize {
    const MIN_PART: usize = 64;
    if tasks == 0 || tasks >= 2 * threads {
        return 1;
    }
    (2 * threads).div_ceil(tasks).min(visible / MIN_PART).max(1)
}

/// One call's operands and shape, shared by the tasks.
struct Heads<'a, E> {
    ks: &'a [&'a [E]],
    vs: &'a [&'a [E]],
    /// Each sequence's key and value geometry (length and strides).
    kgeo: &'a [Geo],
    vgeo: &'a [Geo],
    qs: &'a [f32],
    hkv: usize,
    d: usize,
    dv: usize,
    group: usize,
    h: usize,
    scale: f32,
    window: Option<usize>,
    slopes: Option<&'a [f32]>,
    /// Parts each task's positions are split into ([`parts`]).
    parts: usize,
}

impl<E> Heads<'_, E> {
    /// Task `task`'s sequence, key-value head, and visible positions `lo..lo + n`.
    fn task(&self, task: usize) -> (usize, usize, usize, usize) {
        let (pair, part) = (task / self.parts, task % self.parts);
        let (i, kv) = (pair / self.hkv, pair % self.hkv);
        let len = self.kgeo[i].len;
        let all = visible(len, self.window);
        let first = len - all;
        let lo = first + all * part / self.parts;
        let hi = first + all * (part + 1) / self.parts;
        (i, kv, lo, hi - lo)
    }

    /// Head `g`'s scores `row` made weights: softmaxed when the task is whole; else
    /// exponentiated against their max, with the max and the sum kept in `stats`
    /// (`[max; group]` then `[sum; group]`) for the merge.
    #[inline(always)]
    fn weights(&self, row: &mut [f32], g: usize, stats: &mut [f32]) {
        if self.parts == 1 {
            super::ops::softmax_in_place(row, 1.0);
        } else {
            let (max, sum) = super::ops::exp_in_place(row);
            stats[g] = max;
            stats[self.group + g] = sum;
        }
    }
}

/// Task `task` (a sequence and key-value head) on the loops compiled for `width`: its query
/// heads' outputs into `o`.
fn run<E: Elem>(width: Width, x: &Heads<E>, task: usize, o: &mut [f32]) {
    match width {
        // SAFETY: Width::detect found AVX-512F on this CPU
        #[cfg(target_arch = "x86_64")]
        Width::Avx512 => unsafe { avx512::attend(x, task, o) },
        w => super::ops::on(w, || attend(x, task, o)),
    }
}

/// The 512-bit loops, written out: a key row is loaded once for every query head of its
/// group, each head's score accumulates in its own register; the output rows of the group
/// stay in registers while the value rows stream past, each loaded once. Head widths that
/// are not a multiple of 16, or groups of more than 8 heads, take the compiled loops.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Elem, Geo, Heads};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn attend<E: Elem>(x: &Heads<E>, task: usize, o: &mut [f32]) {
        if !x.d.is_multiple_of(16) || !x.dv.is_multiple_of(16) {
            return super::attend(x, task, o);
        }
        // SAFETY (all arms): the caller checked avx512f
        unsafe {
            match x.group {
                1 => grouped::<E, 1>(x, task, o),
                2 => grouped::<E, 2>(x, task, o),
                3 => grouped::<E, 3>(x, task, o),
                4 => grouped::<E, 4>(x, task, o),
                5 => grouped::<E, 5>(x, task, o),
                6 => grouped::<E, 6>(x, task, o),
                7 => grouped::<E, 7>(x, task, o),
                8 => grouped::<E, 8>(x, task, o),
                _ => super::attend(x, task, o),
            }
        }
    }

    /// The sums of eight 16-lane vectors, lane `t` of the result the sum of `v[t]`: halves
    /// added, then pairs added horizontally.
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn sum8(v: &[__m512; 8]) -> __m256 {
        let half = |a: __m512| {
            _mm256_add_ps(
                _mm512_castps512_ps256(a),
                _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)),
            )
        };
        let h: [__m256; 8] = [
            half(v[0]),
            half(v[1]),
            half(v[2]),
            half(v[3]),
            half(v[4]),
            half(v[5]),
            half(v[6]),
            half(v[7]),
        ];
        // per 128-bit half: [Σ of 4 lanes of v0, v1, v2, v3] (low half lanes 0-3 of each,
        // high half lanes 4-7), then the two halves added
        let a = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
        let b = _mm256_hadd_ps(_mm256_hadd_ps(h[4], h[5]), _mm256_hadd_ps(h[6], h[7]));
        _mm256_add_ps(
            _mm256_permute2f128_ps(a, b, 0x20),
            _mm256_permute2f128_ps(a, b, 0x31),
        )
    }

    /// `G` query heads sharing one key-value head; `d` and `dv` multiples of 16.
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn grouped<E: Elem, const G: usize>(x: &Heads<E>, task: usize, o: &mut [f32]) {
        let (d, dv) = (x.d, x.dv);
        let (i, kv, lo, n) = x.task(task);
        let (k, v) = (x.ks[i], x.vs[i]);
        let len = x.kgeo[i].len;
        let first = kv * G;
        let q0 = (i * x.h + first) * d;
        let qs = &x.qs[q0..q0 + G * d];
        let rows = |data, geo: Geo, width| Rows {
            data,
            n,
            lo,
            row: geo.row,
            at: kv * geo.head,
            width,
        };
        let mut p = vec![0f32; G * n];
        // SAFETY: the caller checked avx512f; d is a multiple of 16
        unsafe { dots::<E, G>(&rows(k, x.kgeo[i], d), qs, &mut p) };
        let (o, stats) = o.split_at_mut(G * dv);
        for (g, row) in p.chunks_exact_mut(n.max(1)).enumerate() {
            for (j, s) in row.iter_mut().enumerate() {
                *s *= x.scale;
                if let Some(sl) = x.slopes {
                    *s += sl[first + g] * ((lo + j) as f32 - (len - 1) as f32);
                }
            }
            x.weights(row, g, stats);
        }
        // the group's outputs, up to 64 columns at a time
        let values = rows(v, x.vgeo[i], dv);
        let mut c = 0;
        while c < dv {
            let nv = ((dv - c) / 16).min(4);
            // SAFETY (all arms): the caller checked avx512f; c + 16 · nv <= dv
            unsafe {
                match nv {
                    4 => weighted::<E, G, 4>(&values, &p, c, o),
                    3 => weighted::<E, G, 3>(&values, &p, c, o),
                    2 => weighted::<E, G, 2>(&values, &p, c, o),
                    _ => weighted::<E, G, 1>(&values, &p, c, o),
                }
            }
            c += 16 * nv;
        }
    }

    /// One task's cached key or value rows: `n` visible from position `lo`, `width` wide,
    /// position `p`'s row at `at + p · row` (`at`: where the task's head starts).
    struct Rows<'a, E> {
        data: &'a [E],
        n: usize,
        lo: usize,
        row: usize,
        at: usize,
        width: usize,
    }

    impl<E> Rows<'_, E> {
        /// Where visible row `j` starts in the cache.
        fn start(&self, j: usize) -> usize {
            self.at + (self.lo + j) * self.row
        }
    }

    /// The dot products of the `G` query rows `qs` with each visible key row, into `p`
    /// (`G` rows of `keys.n`): eight keys at a time for each head, their sums reduced
    /// together, a few instructions a key instead of a whole 16-lane reduction each.
    ///
    /// # Safety
    /// avx512f; the key width is a multiple of 16, `qs` holds `G` rows of it.
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn dots<E: Elem, const G: usize>(keys: &Rows<'_, E>, qs: &[f32], p: &mut [f32]) {
        let (k, n, d) = (keys.data, keys.n, keys.width);
        let row = |j: usize| &k[keys.start(j)..keys.start(j) + d];
        // rows this far ahead are fetched while the current ones are multiplied
        const AHEAD: usize = 16;
        let line = 64 / std::mem::size_of::<E>();
        let mut j = 0;
        while j + 8 <= n {
            for t in 0..8 {
                let at = keys.start(j + t + AHEAD).min(k.len() - 1);
                for c in (0..d).step_by(line) {
                    _mm_prefetch::<_MM_HINT_T0>(k.as_ptr().wrapping_add(at + c) as *const i8);
                }
            }
            // SAFETY: the caller's promise; each row is d long
            let sums = unsafe { eight::<E, G>(std::array::from_fn(|t| row(j + t)), qs, d) };
            for (g, s) in sums.iter().enumerate() {
                // SAFETY: j + 8 <= n, so the eight scores lie in head g's row of p
                unsafe { _mm256_storeu_ps(p.as_mut_ptr().add(g * n + j), *s) };
            }
            j += 8;
        }
        for j in j..n {
            let kr = row(j);
            let mut acc = [_mm512_setzero_ps(); G];
            for c in (0..d).step_by(16) {
                // SAFETY: c + 16 <= d, the length of kr and of each query row
                let kc = unsafe { E::load16(kr.as_ptr().add(c)) };
                for (g, a) in acc.iter_mut().enumerate() {
                    let qc = unsafe { _mm512_loadu_ps(qs.as_ptr().add(g * d + c)) };
                    *a = _mm512_fmadd_ps(qc, kc, *a);
                }
            }
            for (g, a) in acc.iter().enumerate() {
                p[g * n + j] = _mm512_reduce_add_ps(*a);
            }
        }
    }

    /// The dot products of eight key rows with each of the `G` query rows (all `d` long):
    /// lane `t` of sum `g` is query `g` · key `t`.
    ///
    /// # Safety
    /// avx512f; `d` is a multiple of 16.
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn eight<E: Elem, const G: usize>(keys: [&[E]; 8], qs: &[f32], d: usize) -> [__m256; G] {
        let mut sums = [_mm256_setzero_ps(); G];
        if G <= 3 {
            // each key chunk loaded (and widened) once for all the group's heads: their
            // 8 · G sums fit in the registers
            let mut acc = [[_mm512_setzero_ps(); 8]; G];
            for c in (0..d).step_by(16) {
                let mut qc = [_mm512_setzero_ps(); G];
                for (g, q) in qc.iter_mut().enumerate() {
                    // SAFETY: c + 16 <= d, the length of each query row
                    *q = unsafe { _mm512_loadu_ps(qs.as_ptr().add(g * d + c)) };
                }
                for (t, kr) in keys.iter().enumerate() {
                    // SAFETY: c + 16 <= d, the length of each key row
                    let kc = unsafe { E::load16(kr.as_ptr().add(c)) };
                    for (a, q) in acc.iter_mut().zip(&qc) {
                        a[t] = _mm512_fmadd_ps(*q, kc, a[t]);
                    }
                }
            }
            for (s, acc) in sums.iter_mut().zip(&acc) {
                *s = sum8(acc);
            }
        } else {
            for (g, s) in sums.iter_mut().enumerate() {
                let mut acc = [_mm512_setzero_ps(); 8];
                for c in (0..d).step_by(16) {
                    // SAFETY: c + 16 <= d, the length of each key row and query row
                    let qc = unsafe { _mm512_loadu_ps(qs.as_ptr().add(g * d + c)) };
                    for (a, kr) in acc.iter_mut().zip(&keys) {
                        let kc = unsafe { E::load16(kr.as_ptr().add(c)) };
                        *a = _mm512_fmadd_ps(qc, kc, *a);
                    }
                }
                *s = sum8(&acc);
            }
        }
        sums
    }

    /// Columns `c..c + 16 · NV` of the `G` heads' outputs: the value rows weighted by the
    /// softmaxed scores `p` (`G` rows of `n`). The `G · NV` sums stay in registers while the
    /// rows stream past, each loaded once; where they are fewer than four, consecutive
    /// rows go to four sets of sums (added at the end), so each addition does not wait
    /// for the one before.
    ///
    /// # Safety
    /// avx512f; `c + 16 · NV <= dv`, `p` holds `G · n` scores, `o` `G · dv` outputs.
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn weighted<E: Elem, const G: usize, const NV: usize>(
        x: &Rows<'_, E>,
        p: &[f32],
        c: usize,
        o: &mut [f32],
    ) {
        const AHEAD: usize = 16;
        let line = 64 / std::mem::size_of::<E>();
        let (v, n, dv) = (x.data, x.n, x.width);
        let sets = if G * NV < 4 { 4 } else { 1 };
        let at = |j: usize| x.start(j) + c;
        let mut acc = [[[_mm512_setzero_ps(); NV]; G]; 4];
        let add = |acc: &mut [[__m512; NV]; G], j: usize| {
            for l in (0..16 * NV).step_by(line) {
                let ahead = v.as_ptr().wrapping_add(at(j + AHEAD) + l);
                _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
            }
            // SAFETY: row j's columns c..c + 16 · NV lie in the cache (c + 16 · NV <= dv)
            let vc: [__m512; NV] =
                std::array::from_fn(|r| unsafe { E::load16(v.as_ptr().add(at(j) + 16 * r)) });
            for (g, a) in acc.iter_mut().enumerate() {
                let w = _mm512_set1_ps(p[g * n + j]);
                for (a, &vc) in a.iter_mut().zip(&vc) {
                    *a = _mm512_fmadd_ps(w, vc, *a);
                }
            }
        };
        let mut j = 0;
        while j + sets <= n {
            for (t, acc) in acc.iter_mut().take(sets).enumerate() {
                add(acc, j + t);
            }
            j += sets;
        }
        for j in j..n {
            add(&mut acc[0], j);
        }
        for g in 0..G {
            for r in 0..NV {
                let mut sum = acc[0][g][r];
                for set in acc.iter().take(sets).skip(1) {
                    sum = _mm512_add_ps(sum, set[g][r]);
                }
                // SAFETY: g · dv + c + 16 · (r + 1) <= G · dv, the length of o
                unsafe { _mm512_storeu_ps(o.as_mut_ptr().add(g * dv + c + 16 * r), sum) };
            }
        }
    }
}

/// Scores of the task's query heads over the visible keys, softmax, weighted values
/// (inlined into each instruction set's wrapper, which vectorises its loops).
#[inline(always)]
fn attend<E: Elem>(x: &Heads<E>, task: usize, o: &mut [f32]) {
    let (d, dv) = (x.d, x.dv);
    let (i, kv, lo, n) = x.task(task);
    let (k, v) = (x.ks[i], x.vs[i]);
    let (kg, vg) = (x.kgeo[i], x.vgeo[i]);
    let len = kg.len;
    let group = x.group;
    let (o, stats) = o.split_at_mut(group * dv);
    // each cached key and value row is read once for all the query heads that share it
    let mut p = vec![0f32; group * n];
    let mut buf = vec![0f32; d.max(dv)];
    let first = kv * group;
    let q0 = (i * x.h + first) * d;
    let qs = &x.qs[q0..q0 + group * d];
    for j in 0..n {
        let pos = lo + j;
        let at = pos * kg.row + kv * kg.head;
        let kr = E::as_f32(&k[at..at + d], &mut buf);
        for g in 0..group {
            let mut s = dot(&qs[g * d..(g + 1) * d], kr) * x.scale;
            if let Some(sl) = x.slopes {
                s += sl[first + g] * (pos as f32 - (len - 1) as f32);
            }
            p[g * n + j] = s;
        }
    }
    for (g, row) in p.chunks_exact_mut(n.max(1)).enumerate() {
        x.weights(row, g, stats);
    }
    for j in 0..n {
        let pos = lo + j;
        let at = pos * vg.row + kv * vg.head;
        let vr = E::as_f32(&v[at..at + dv], &mut buf);
        for g in 0..group {
            let w = p[g * n + j];
            for (a, &b) in o[g * dv..(g + 1) * dv].iter_mut().zip(vr) {
                *a += w * b;
            }
        }
    }
}

/// `a · b` in eight independent lanes (so it vectorises), then summed.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Attention of the last row over all visible rows, in f64, straight from the definition.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        (h, hkv, d, dv): (usize, usize, usize, usize),
        len: usize,
        scale: f32,
        window: Option<usize>,
        slopes: Option<&[f32]>,
    ) -> Vec<f64> {
        let group = h / hkv;
        let lo = window.map_or(0, |w| len.saturating_sub(w));
        let mut out = vec![0f64; h * dv];
        for head in 0..h {
            let kv = head / group;
            let s: Vec<f64> = (lo..len)
                .map(|pos| {
                    let dot: f64 = (0..d)
                        .map(|c| q[head * d + c] as f64 * k[(pos * hkv + kv) * d + c] as f64)
                        .sum();
                    let bias =
                        slopes.map_or(0.0, |sl| sl[head] as f64 * (pos as f64 - (len - 1) as f64));
                    dot * scale as f64 + bias
                })
                .collect();
            let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
            let z: f64 = e.iter().sum();
            for (j, pos) in (lo..len).enumerate() {
                for c in 0..dv {
                    out[head * dv + c] += e[j] / z * v[(pos * hkv + kv) * dv + c] as f64;
                }
            }
        }
        out
    }

    /// `n` values uniform in `-half..half` from a linear congruential stream.
    fn uniform(seed: &mut u64, n: usize, half: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 * half - half
            })
            .collect()
    }

    /// The values a cache of `dtype` holds for `x` (f16 rounds them).
    fn held(x: Vec<f32>, dtype: DType) -> Vec<f32> {
        match dtype {
            DType::F16 => x.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
            _ => x,
        }
    }

    /// [`attention_on`]'s outputs, flattened.
    #[allow(clippy::too_many_arguments)]
    fn attend_flat(
        simd: Width,
        q: &Tensor,
        ks: &[Tensor],
        vs: &[Tensor],
        scale: f32,
        window: Option<usize>,
        alibi: bool,
    ) -> Vec<f32> {
        attention_on(simd, q, ks, vs, scale, window, alibi)
            .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
            .unwrap()
    }

    /// Each output within 1e-5 (relative, past 1) of the definition's; `what` names the case.
    fn assert_close(got: &[f32], want: &[f64], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: output count");
        for (c, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
                "{what}, output {c}: {g} against {w}"
            );
        }
    }

    fn paths() -> Vec<(Width, bool)> {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            vec![
                (Width::Baseline, true),
                (Width::Avx2, avx2),
                (Width::Avx512, avx2 && is_x86_feature_detected!("avx512f")),
            ]
        }
        #[cfg(not(target_arch = "x86_64"))]
        vec![(Width::Baseline, true)]
    }

    /// Every instruction set the machine has, on grouped and plain heads, widths that are
    /// and are not multiples of 16 (the 512-bit loops' steps of 16 to 64 columns, with one
    /// or four sets of sums, and their fallback), groups up to 8 and beyond, windows and ALiBi, caches of several lengths,
    /// held in f32 and in f16, position-major and head-major (a strided view): within 1e-5
    /// of the f64 definition on the values the cache holds (f16 keys and values rounded
    /// first).
    #[test]
    fn every_path_equals_the_definition() {
        let dev = Device::Cpu;
        // (heads, key-value heads, key width, value width)
        let shapes = [
            (9, 3, 64, 64),
            (4, 4, 80, 80),
            (8, 1, 96, 96),
            (12, 1, 64, 64),
            (6, 2, 32, 48),
            (4, 2, 24, 24),
            (16, 2, 128, 128),
            (8, 8, 32, 32),
            (4, 2, 16, 16),
        ];
        let lens = [1usize, 17, 70];
        let mut seed = 7u64;
        let mut rand = |n: usize| uniform(&mut seed, n, 1.0);
        let mut ran = Vec::new();
        for (simd, have) in paths() {
            if !have {
                println!("decode attention: {simd:?} skipped (this CPU lacks it)");
                continue;
            }
            ran.push(format!("{simd:?}"));
            for (&(h, hkv, d, dv), dtype) in shapes
                .iter()
                .flat_map(|s| [(s, DType::F32), (s, DType::F16)])
            {
                let held = |x: Vec<f32>| held(x, dtype);
                for (window, alibi) in [(None, false), (Some(5), false), (None, true)] {
                    let b = lens.len();
                    let qv = rand(b * h * d);
                    let q = Tensor::from_vec(qv.clone(), (b, 1, h, d), &dev).unwrap();
                    let (mut ks, mut vs, mut kv_data) = (Vec::new(), Vec::new(), Vec::new());
                    for (si, &len) in lens.iter().enumerate() {
                        let k = held(rand(len * hkv * d));
                        let v = held(rand(len * hkv * dv));
                        let cached = |x: &[f32], w: usize| {
                            let t = Tensor::from_vec(x.to_vec(), (1, len, hkv, w), &dev)
                                .and_then(|t| t.to_dtype(dtype))
                                .unwrap();
                            if si % 2 == 0 {
                                return t;
                            }
                            // head-major, as a cache holds them: (1, h_kv, capacity, w) with
                            // room to spare, read through the transposed view
                            let hm = t.transpose(1, 2).unwrap().contiguous().unwrap();
                            let spare = Tensor::zeros((1, hkv, 5, w), dtype, &dev).unwrap();
                            let view = Tensor::cat(&[hm, spare], 2)
                                .and_then(|t| t.narrow(2, 0, len)?.transpose(1, 2))
                                .unwrap();
                            assert!(hkv == 1 || len == 1 || !view.is_contiguous());
                            view
                        };
                        ks.push(cached(&k, d));
                        vs.push(cached(&v, dv));
                        kv_data.push((k, v));
                    }
                    let scale = 1.0 / (d as f32).sqrt();
                    let got = attend_flat(simd, &q, &ks, &vs, scale, window, alibi);
                    let slopes = alibi.then(|| alibi_slopes(h));
                    for (i, (&len, (k, v))) in lens.iter().zip(&kv_data).enumerate() {
                        let want = reference(
                            &qv[i * h * d..(i + 1) * h * d],
                            k,
                            v,
                            (h, hkv, d, dv),
                            len,
                            scale,
                            window,
                            slopes.as_deref(),
                        );
                        assert_close(
                            &got[i * h * dv..(i + 1) * h * dv],
                            &want,
                            &format!("{simd:?}, {dtype:?} cache, heads {h}/{hkv}, widths {d}/{dv}, window {window:?}, alibi {alibi}, sequence {i} (length {len})"),
                        );
                    }
                }
            }
        }
        println!("decode attention: paths run: {}", ran.join(", "));
    }

    /// One sequence over few key-value heads splits its positions into parts (so every
    /// thread has work) and merges their softmax shares: equal to the definition on every
    /// path, with windows and ALiBi, f32 and f16 caches.
    #[test]
    fn split_positions_merge_to_the_definition() {
        let dev = Device::Cpu;
        let threads = rayon::current_num_threads();
        // (heads, key-value heads, width): one head of keys splits on any thread count
        let shapes = [(4, 1, 64), (9, 3, 64), (2, 1, 24)];
        let len = 300;
        assert!(
            parts(1, threads, len) > 1,
            "one key-value head over {len} positions"
        );
        let mut seed = 11u64;
        let mut rand = |n: usize| uniform(&mut seed, n, 2.0);
        for (simd, have) in paths() {
            if !have {
                println!("split decode attention: {simd:?} skipped (this CPU lacks it)");
                continue;
            }
            for (&(h, hkv, d), dtype) in shapes
                .iter()
                .flat_map(|s| [(s, DType::F32), (s, DType::F16)])
            {
                let held = |x: Vec<f32>| held(x, dtype);
                for (window, alibi) in [(None, false), (Some(200), false), (None, true)] {
                    let (qv, k, v) = (
                        rand(h * d),
                        held(rand(len * hkv * d)),
                        held(rand(len * hkv * d)),
                    );
                    let q = Tensor::from_vec(qv.clone(), (1, 1, h, d), &dev).unwrap();
                    let cached = |x: &[f32]| {
                        Tensor::from_vec(x.to_vec(), (1, len, hkv, d), &dev)
                            .and_then(|t| t.to_dtype(dtype))
                            .unwrap()
                    };
                    let (ks, vs) = ([cached(&k)], [cached(&v)]);
                    let scale = 1.0 / (d as f32).sqrt();
                    let got = attend_flat(simd, &q, &ks, &vs, scale, window, alibi);
                    let slopes = alibi.then(|| alibi_slopes(h));
                    let want = reference(
                        &qv,
                        &k,
                        &v,
                        (h, hkv, d, d),
                        len,
                        scale,
                        window,
                        slopes.as_deref(),
                    );
                    assert_close(
                        &got,
                        &want,
                        &format!("{simd:?}, {dtype:?} cache, heads {h}/{hkv}, width {d}, window {window:?}, alibi {alibi}"),
                    );
                }
            }
        }
    }
}

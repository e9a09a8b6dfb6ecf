//! Attention of one new token of each of several sequences over its own cached keys and
//! values, in one parallel region over (sequence, key-value head) pairs: what a batched
//! decoding step needs, where each sequence's cache has its own length. Scores, softmax
//! and the weighted sum of values are plain loops over the cached rows (a single query row
//! gains nothing from a GEMM, whose set-up cost dominated per-sequence calls).

use candle_core::{DType, Result, Storage, Tensor};
use rayon::prelude::*;

use super::causal_attention::alibi_slopes;

/// Where an operand's values are: a contiguous f32 CPU tensor (keys and values one
/// sequence's, `(1, len, h_kv, d)`).
fn view(t: &Tensor, what: &str, one: bool) -> Result<(usize, usize)> {
    let (n, _, _, _) = t.dims4()?;
    if (one && n != 1) || t.dtype() != DType::F32 || !t.is_contiguous() || !t.device().is_cpu() {
        candle_core::bail!(
            "decode attention: {what} must be a contiguous f32 CPU tensor of one sequence"
        )
    }
    let (_, layout) = t.storage_and_layout();
    Ok((layout.start_offset(), t.elem_count()))
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
    // hold every operand's storage while the raw slices are read
    let guards: Vec<_> = keys
        .iter()
        .chain(values)
        .chain(std::iter::once(&q))
        .map(|t| t.storage_and_layout())
        .collect();
    let mut slices = Vec::with_capacity(guards.len());
    for (i, (g, _)) in guards.iter().enumerate() {
        let Storage::Cpu(s) = &**g else {
            candle_core::bail!("decode attention: operands must be on the CPU")
        };
        let t = if i < b {
            &keys[i]
        } else if i < 2 * b {
            &values[i - b]
        } else {
            &q
        };
        let (start, n) = match i {
            _ if i < b => view(t, "keys", true)?,
            _ if i < 2 * b => view(t, "values", true)?,
            _ => view(t, "queries", false)?,
        };
        slices.push(&s.as_slice::<f32>()?[start..start + n]);
    }
    let (ks, rest) = slices.split_at(b);
    let (vs, qs) = rest.split_at(b);
    let qs = qs[0];
    let slopes = alibi.then(|| alibi_slopes(h));
    let group = h / hkv;
    let mut out = vec![0f32; b * h * dv];
    let heads = Heads {
        ks,
        vs,
        qs,
        hkv,
        d,
        dv,
        group,
        h,
        scale,
        window,
        slopes: slopes.as_deref(),
    };
    let simd = Simd::detect();
    out.par_chunks_mut(group * dv)
        .enumerate()
        .for_each(|(task, o)| simd.run(&heads, task, o));
    drop(slices);
    drop(guards);
    Tensor::from_vec(out, (b, 1, h, dv), q.device())
}

/// One call's operands and shape, shared by the tasks.
struct Heads<'a> {
    ks: &'a [&'a [f32]],
    vs: &'a [&'a [f32]],
    qs: &'a [f32],
    hkv: usize,
    d: usize,
    dv: usize,
    group: usize,
    h: usize,
    scale: f32,
    window: Option<usize>,
    slopes: Option<&'a [f32]>,
}

/// The instruction set the loops are compiled for, chosen at run time.
#[derive(Clone, Copy)]
enum Simd {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Simd {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                return Simd::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Simd::Avx2;
            }
        }
        Simd::Portable
    }

    /// Task `task` (a sequence and key-value head): its query heads' outputs into `o`.
    fn run(self, x: &Heads, task: usize, o: &mut [f32]) {
        match self {
            Simd::Portable => attend(x, task, o),
            // SAFETY: the features were detected at run time
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => unsafe { attend_avx2(x, task, o) },
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 => unsafe { attend_avx512(x, task, o) },
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(x: &Heads, task: usize, o: &mut [f32]) {
    attend(x, task, o)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn attend_avx512(x: &Heads, task: usize, o: &mut [f32]) {
    attend(x, task, o)
}

/// Scores of the task's query heads over the visible keys, softmax, weighted values
/// (inlined into each instruction set's wrapper, which vectorises its loops).
#[inline(always)]
fn attend(x: &Heads, task: usize, o: &mut [f32]) {
    let (hkv, d, dv) = (x.hkv, x.d, x.dv);
    let (i, kv) = (task / hkv, task % hkv);
    let (k, v) = (x.ks[i], x.vs[i]);
    let len = k.len() / (hkv * d);
    let lo = x.window.map_or(0, |w| len.saturating_sub(w));
    let n = len - lo;
    let group = x.group;
    // each cached key and value row is read once for all the query heads that share it
    let mut p = vec![0f32; group * n];
    let first = kv * group;
    let q0 = (i * x.h + first) * d;
    let qs = &x.qs[q0..q0 + group * d];
    for j in 0..n {
        let pos = lo + j;
        let kr = &k[(pos * hkv + kv) * d..(pos * hkv + kv + 1) * d];
        for g in 0..group {
            let mut s = dot(&qs[g * d..(g + 1) * d], kr) * x.scale;
            if let Some(sl) = x.slopes {
                s += sl[first + g] * (pos as f32 - (len - 1) as f32);
            }
            p[g * n + j] = s;
        }
    }
    for row in p.chunks_exact_mut(n) {
        super::ops::softmax_in_place(row, 1.0);
    }
    for j in 0..n {
        let pos = lo + j;
        let vr = &v[(pos * hkv + kv) * dv..(pos * hkv + kv + 1) * dv];
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

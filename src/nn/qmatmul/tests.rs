#[cfg(target_arch = "x86_64")]
use super::act::quantize_block_avx512;
use super::act::quantize_block_portable;
use super::product::{gemm_activations, int8_gemm, int8_tiles};
use super::*;
use crate::rng::Rng;
use half::{bf16, f16};

const TYPES: [GgmlType; 13] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2K,
    GgmlType::Q3K,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];

/// Byte offsets of a block's f16 scales (random bytes elsewhere are valid quants).
fn half_fields(ty: GgmlType) -> &'static [usize] {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
        GgmlType::Q2K => &[80, 82],
        GgmlType::Q3K => &[108],
        GgmlType::Q6K => &[208],
        _ => &[],
    }
}

/// `rows × cols` random weights of `ty`: random quants, scales of a realistic size.
fn random_matrix(ty: GgmlType, rows: usize, cols: usize, rng: &mut Rng) -> QMatrix {
    let n = rows * cols;
    let bytes = ty.bytes_for(n).unwrap();
    let mut v: Vec<u8> = (0..bytes).map(|_| rng.next_u64() as u8).collect();
    let value = |rng: &mut Rng| (rng.normal() * 0.05) as f32;
    match ty {
        GgmlType::F32 => {
            for c in v.chunks_exact_mut(4) {
                c.copy_from_slice(&value(rng).to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for c in v.chunks_exact_mut(2) {
                c.copy_from_slice(&f16::from_f32(value(rng)).to_le_bytes());
            }
        }
        GgmlType::BF16 => {
            for c in v.chunks_exact_mut(2) {
                c.copy_from_slice(&bf16::from_f32(value(rng)).to_le_bytes());
            }
        }
        _ => {
            let per = ty.block().1;
            for blk in v.chunks_exact_mut(per) {
                for &at in half_fields(ty) {
                    let s = f16::from_f32(value(rng).abs() * 0.1 + 1e-4);
                    blk[at..at + 2].copy_from_slice(&s.to_le_bytes());
                }
            }
        }
    }
    QMatrix::new(ty, rows, cols, QBytes::Owned(v)).unwrap()
}

fn random_x(n: usize, rng: &mut Rng) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32).collect()
}

/// The activations a kernel actually multiplies: the quantized values times their
/// scales (the f32 values where the type takes them as they are).
fn as_seen(act: &QAct, r: usize, cols: usize) -> Vec<f64> {
    let a = act.row(r);
    if !a.x.is_empty() {
        return a.x.iter().map(|&v| v as f64).collect();
    }
    let per = cols / a.d.len();
    (0..cols)
        .map(|i| a.qs[i] as f64 * a.d[i / per] as f64)
        .collect()
}

fn dequantized(w: &QMatrix) -> Vec<f32> {
    let mut wf = vec![0f32; w.rows * w.cols];
    w.dequantize_rows(0, w.rows, &mut wf);
    wf
}

/// `x (m × cols) · wᵀ` in f64 with the dequantized weights.
fn reference(w: &QMatrix, x: &[f32], m: usize) -> Vec<f32> {
    let wf = dequantized(w);
    let mut y = vec![0f32; m * w.rows];
    for r in 0..m {
        let a = &x[r * w.cols..(r + 1) * w.cols];
        for (o, b) in wf.chunks_exact(w.cols).enumerate() {
            y[r * w.rows + o] = a
                .iter()
                .zip(b)
                .map(|(p, q)| (*p as f64) * (*q as f64))
                .sum::<f64>() as f32;
        }
    }
    y
}

/// `Σ w a` in f64 and `Σ |w a|` (the scale of its rounding error).
fn exact_and_magnitude(w: &[f32], a: &[f64]) -> (f64, f64) {
    let products = || w.iter().zip(a).map(|(p, q)| *p as f64 * q);
    (products().sum(), products().map(f64::abs).sum())
}

/// Each path's dot product equals the dequantized weights times the quantized
/// activations (integer sums are exact, so only the f32 accumulation differs), for every
/// type; and is within the activations' quantization error of the f32 product.
#[test]
fn every_path_equals_the_dequantized_product() {
    let mut rng = Rng::new(7);
    let names: Vec<&str> = paths().iter().map(|p| p.name).collect();
    println!("qmatmul paths run on this CPU: {}", names.join(", "));
    for missing in ["avx512-vnni", "avx2"] {
        if !names.contains(&missing) {
            println!("qmatmul path {missing}: SKIPPED, this CPU lacks it (or ROUTELM_CPU caps it)");
        }
    }
    let (rows, cols) = (3, 768);
    for ty in TYPES {
        let w = random_matrix(ty, rows, cols, &mut rng);
        let wf = dequantized(&w);
        let x = random_x(2 * cols, &mut rng);
        let act = QAct::new(ty, &x, cols);
        for path in paths() {
            let dot = (path.dot)(ty);
            for r in 0..2 {
                let seen = as_seen(&act, r, cols);
                let xr = &x[r * cols..(r + 1) * cols];
                for o in 0..rows {
                    let wr = &wf[o * cols..(o + 1) * cols];
                    let mut y = [0f32; 1];
                    dot(w.row(o), w.row_bytes(), act.row(r), &mut y);
                    let got = y[0] as f64;
                    let (exact, mag) = exact_and_magnitude(wr, &seen);
                    assert!(
                        (got - exact).abs() <= 1e-5 * mag + 1e-7,
                        "{} {}: row {o}: {got} vs {exact} (magnitude {mag})",
                        path.name,
                        ty.name()
                    );
                    // quantizing a block moves each activation by at most half its scale
                    let f32_product: f64 =
                        wr.iter().zip(xr).map(|(p, q)| *p as f64 * *q as f64).sum();
                    let step = |i: usize| match act.row(r).d.len() {
                        0 => 0.0,
                        nb => act.row(r).d[i / (cols / nb)] as f64 / 2.0,
                    };
                    let bound: f64 = (0..cols).map(|i| wr[i].abs() as f64 * step(i)).sum();
                    assert!(
                        (got - f32_product).abs() <= bound * 1.001 + 1e-5 * mag + 1e-7,
                        "{} {}: {got} vs f32 {f32_product} (bound {bound})",
                        path.name,
                        ty.name()
                    );
                }
            }
        }
    }
}

/// Rows computed together (four at a time, then the rest) equal rows computed alone.
#[test]
fn rows_together_equal_rows_alone() {
    let mut rng = Rng::new(5);
    for ty in TYPES {
        let w = random_matrix(ty, 7, 512, &mut rng);
        let x = random_x(512, &mut rng);
        let act = QAct::new(ty, &x, 512);
        for path in paths() {
            let dot = (path.dot)(ty);
            let mut all = [0f32; 7];
            dot(w.data.as_slice(), w.row_bytes(), act.row(0), &mut all);
            for (o, &got) in all.iter().enumerate() {
                let mut one = [0f32; 1];
                dot(w.row(o), w.row_bytes(), act.row(0), &mut one);
                assert_eq!(got, one[0], "{} {} row {o}", path.name, ty.name());
            }
        }
    }
}

/// The parallel products (rows spread over blocks of 64, several matrices at once) and the
/// tiled GEMM for many rows equal the f64 product of the dequantized weights within the
/// activation quantization (few rows) or f32 rounding (many rows).
#[test]
fn products_and_tiles_match_the_reference() {
    let mut rng = Rng::new(11);
    let a = random_matrix(GgmlType::Q8_0, 70, 64, &mut rng);
    let b = random_matrix(GgmlType::Q6K, 130, 256, &mut rng);
    let c = random_matrix(GgmlType::F32, 320, 64, &mut rng);
    let d = random_matrix(GgmlType::BF16, 96, 40, &mut rng);
    for m in [1, 3, MAX_DOT_ROWS + 3] {
        let xa = random_x(m * 64, &mut rng);
        let xb = random_x(m * 256, &mut rng);
        let xc = random_x(m * 64, &mut rng);
        let xd = random_x(m * 40, &mut rng);
        let all = [(&a, &xa), (&b, &xb), (&c, &xc), (&d, &xd)];
        let pairs: Vec<(&QMatrix, &[f32])> = all.iter().map(|(w, x)| (*w, x.as_slice())).collect();
        let ys = products(&pairs);
        for ((w, x), y) in all.into_iter().zip(&ys) {
            let want = reference(w, x, m);
            assert_eq!(y.len(), want.len());
            let scale = want.iter().fold(0f32, |s, v| s.max(v.abs()));
            // many rows: f32 tiles, unless the multi-row products (up to MAX_MULTI_ROWS) or
            // the integer GEMM take them (8-bit activations for the quantized types)
            let multi = m <= MAX_MULTI_ROWS && best_multi(w.ty).is_some();
            let tol = if m > MAX_DOT_ROWS && !multi && !int8_gemm(w.ty) {
                1e-5
            } else {
                2e-2
            };
            for (g, e) in y.iter().zip(&want) {
                assert!((g - e).abs() <= tol * scale, "{:?} m {m}: {g} vs {e}", w.ty);
            }
        }
    }
}

#[test]
fn sizes_that_do_not_fit_are_refused() {
    let err = QMatrix::new(GgmlType::Q8_0, 2, 48, QBytes::Owned(vec![0; 68])).unwrap_err();
    assert!(err.contains("not whole Q8_0 blocks"), "{err}");
    let err = QMatrix::new(GgmlType::Q8_0, 2, 64, QBytes::Owned(vec![0; 100])).unwrap_err();
    assert!(err.contains("expected 136"), "{err}");
}

#[test]
fn permuted_rows_are_the_rows() {
    let mut rng = Rng::new(3);
    let w = random_matrix(GgmlType::Q4K, 4, 256, &mut rng);
    let p = w.permute_rows(&[2, 0, 3, 1]);
    let (wf, pf) = (dequantized(&w), dequantized(&p));
    for (i, &o) in [2, 0, 3, 1].iter().enumerate() {
        assert_eq!(pf[i * 256..(i + 1) * 256], wf[o * 256..(o + 1) * 256]);
    }
}

/// Rows read back from the interleaved layout (a tied embedding's lookups) are the
/// stored rows, bit for bit, on each kernel this CPU has, in any order.
#[test]
fn interleaved_rows_read_back_as_stored() {
    use super::interleave::Kernel;
    let mut rng = Rng::new(22);
    let (rows, cols) = (16, 512);
    let order: Vec<usize> = (0..rows).map(|i| (i * 7 + 5) % rows).collect();
    for kernel in Kernel::available() {
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q8_0,
            GgmlType::Q4K,
        ] {
            let w = random_matrix(ty, rows, cols, &mut rng);
            let want = dequantized(&w);
            let p = w.clone().permute_rows(&order).interleaved_for(kernel);
            let w = w.interleaved_for(kernel);
            assert!(w.interleaved.get().is_some_and(Option::is_some));
            for r in 0..rows {
                let mut row = vec![0u8; w.row_bytes()];
                w.interleaved().unwrap().stored_row(r, &mut row);
                assert_eq!(
                    row,
                    w.data.as_slice()[r * w.row_bytes()..][..w.row_bytes()],
                    "{kernel:?} {ty:?} row {r}"
                );
            }
            assert_eq!(dequantized(&w), want, "{kernel:?} {ty:?}");
            let got = dequantized(&p);
            for (i, &o) in order.iter().enumerate() {
                assert_eq!(
                    got[i * cols..(i + 1) * cols],
                    want[o * cols..(o + 1) * cols]
                );
            }
        }
    }
}

/// A matrix whose rows are stored in another order (llama.cpp's query and key rows) is
/// read through that order: interleaved on each kernel this CPU has, and gathered for the
/// types and products that read rows in place; each output is the stored row's, bit for bit.
#[test]
fn rows_in_another_order_are_read_in_that_order() {
    use super::interleave::Kernel;
    let mut rng = Rng::new(21);
    let (rows, cols) = (16, 256);
    let order: Vec<usize> = (0..rows).map(|i| (i * 5 + 3) % rows).collect();
    let mut kernels: Vec<Option<Kernel>> = Kernel::available().into_iter().map(Some).collect();
    kernels.push(None);
    for ty in [GgmlType::Q8_0, GgmlType::Q4_1, GgmlType::Q4K, GgmlType::Q6K] {
        for &kernel in &kernels {
            let w = random_matrix(ty, rows, cols, &mut rng);
            let p = w.permute_rows(&order);
            let (w, p) = match kernel {
                Some(k) if interleave::supports(ty) => (w.interleaved_for(k), p.interleaved_for(k)),
                Some(_) => continue,
                None => {
                    // kept as stored: products read the rows in place (or gathered)
                    let _ = (w.interleaved.set(None), p.interleaved.set(None));
                    (w, p)
                }
            };
            for m in [1, 3, 40] {
                let x = random_x(m * cols, &mut rng);
                let yw = products(&[(&w, &x)]).pop().unwrap();
                let yp = products(&[(&p, &x)]).pop().unwrap();
                for r in 0..m {
                    for (i, &o) in order.iter().enumerate() {
                        assert_eq!(
                            yp[r * rows + i].to_bits(),
                            yw[r * rows + o].to_bits(),
                            "{ty:?} {kernel:?} m {m} row {r} out {i}"
                        );
                    }
                }
            }
            // an order of an order composes
            let back: Vec<usize> = (0..rows)
                .map(|i| order.iter().position(|&o| o == i).unwrap())
                .collect();
            assert_eq!(dequantized(&p.permute_rows(&back)), dequantized(&w));
        }
    }
}

/// f32, f16 and bf16 rows whose length is a multiple of the vector width or not (the last
/// values go one at a time, never read past the row): every path equals the f64 product
/// of the widened weights, four rows together and the rest alone.
#[test]
fn float_rows_of_any_length_match_the_reference() {
    let mut rng = Rng::new(13);
    for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
        for cols in [5, 8, 64, 771] {
            let w = random_matrix(ty, 6, cols, &mut rng);
            let x = random_x(cols, &mut rng);
            let want = reference(&w, &x, 1);
            let act = QAct::new(ty, &x, cols);
            for path in paths() {
                let mut y = [0f32; 6];
                (path.dot)(ty)(w.data.as_slice(), w.row_bytes(), act.row(0), &mut y);
                let mag: f32 = want.iter().map(|v| v.abs()).sum::<f32>() + 1.0;
                for (g, e) in y.iter().zip(&want) {
                    assert!(
                        (g - e).abs() <= 1e-5 * mag,
                        "{} {} cols {cols}: {g} vs {e}",
                        path.name,
                        ty.name()
                    );
                }
            }
        }
    }
}

/// Many rows on integers (AVX-512 VNNI): each output equals the dequantized weights times
/// the 8-bit activations (as a decode step computes it) within f32 rounding, for every
/// type the GEMM repacks, rows in groups of four and the rest, a last tile of fewer than
/// eight weight rows.
#[test]
fn integer_gemm_equals_the_quantized_product() {
    let any = [
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ];
    if !any.iter().any(|&t| int8_gemm(t)) {
        println!("integer GEMM: SKIPPED, this CPU lacks AVX-512 VNNI (or ROUTELM_CPU caps it)");
        return;
    }
    println!("integer GEMM: runs (AVX-512 VNNI)");
    let mut rng = Rng::new(17);
    let (rows, cols, m) = (21, 768, 13);
    for ty in any {
        assert!(int8_gemm(ty), "{}", ty.name());
        let w = random_matrix(ty, rows, cols, &mut rng);
        let wf = dequantized(&w);
        let x = random_x(m * cols, &mut rng);
        let y = int8_tiles(&w, &x, m);
        let act = QAct::of_kind(gemm_activations(ty), &x, cols);
        for r in 0..m {
            let seen = as_seen(&act, r, cols);
            for o in 0..rows {
                let wr = &wf[o * cols..(o + 1) * cols];
                let (exact, mag) = exact_and_magnitude(wr, &seen);
                let got = y[r * rows + o] as f64;
                assert!(
                    (got - exact).abs() <= 1e-5 * mag + 1e-6,
                    "{} row {r} out {o}: {got} vs {exact} ({mag})",
                    ty.name()
                );
            }
        }
    }
}

/// The multi-row products (several sequences decoded together) give each activation row
/// exactly what the one-row dot product gives it, bit for bit, on every path and row count
/// that has them (float rows also of a length with a tail); the types without one say so.
#[test]
fn multi_row_products_equal_one_row_products() {
    let mut rng = Rng::new(11);
    let rows = 13;
    for path in paths() {
        let mut made = Vec::new();
        for ty in TYPES {
            let Some(multi) = (path.multi)(ty) else {
                continue;
            };
            made.push(format!("{ty:?}"));
            let float = matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16);
            for cols in [256, 200].into_iter().filter(|&c| c == 256 || float) {
                let w = random_matrix(ty, rows, cols, &mut rng);
                for m in 2..=8 {
                    let x = random_x(m * cols, &mut rng);
                    let act = QAct::new(ty, &x, cols);
                    let acts: Vec<ActRow<'_>> = (0..m).map(|r| act.row(r)).collect();
                    let mut got = vec![f32::NAN; m * rows];
                    // SAFETY: `got` holds m × rows outputs at stride `rows`
                    unsafe {
                        multi(
                            w.data.as_slice(),
                            w.row_bytes(),
                            &acts,
                            got.as_mut_ptr(),
                            rows,
                        )
                    };
                    for (r, a) in acts.iter().enumerate() {
                        let mut want = vec![0f32; rows];
                        (path.dot)(ty)(w.data.as_slice(), w.row_bytes(), *a, &mut want);
                        assert_eq!(
                            &got[r * rows..(r + 1) * rows],
                            &want[..],
                            "{} {ty:?}, {m} rows of {cols}: activation {r} differs",
                            path.name
                        );
                    }
                }
            }
        }
        println!(
            "multi-row products on {}: {}",
            path.name,
            if made.is_empty() {
                "none".to_string()
            } else {
                made.join(", ")
            }
        );
    }
}

/// Pairs with different row counts in one call of [`products`] (a decoding step's experts,
/// each on its own tokens: one row, a few, more than the dot products take) give each pair
/// what it gets alone, bit for bit, for types with and without multi-row products.
#[test]
fn pairs_of_different_row_counts_equal_each_pair_alone() {
    let mut rng = Rng::new(13);
    let (rows, cols) = (72, 256);
    for ty in [GgmlType::Q8_0, GgmlType::Q4K, GgmlType::Q6K, GgmlType::Q5_0] {
        let ws: Vec<QMatrix> = (0..4)
            .map(|_| random_matrix(ty, rows, cols, &mut rng))
            .collect();
        let xs: Vec<Vec<f32>> = [1, 3, 8, 12]
            .iter()
            .map(|m| random_x(m * cols, &mut rng))
            .collect();
        let pairs: Vec<(&QMatrix, &[f32])> =
            ws.iter().zip(&xs).map(|(w, x)| (w, x.as_slice())).collect();
        let together = products(&pairs);
        for (j, (y, pair)) in together.iter().zip(&pairs).enumerate() {
            let alone = products(std::slice::from_ref(pair)).pop().unwrap();
            assert_eq!(y.len(), pair.1.len() / cols * rows, "{ty:?} pair {j}: size");
            assert_eq!(y, &alone, "{ty:?} pair {j}: differs from its product alone");
        }
    }
    // pairs reading one input (as q, k and v do), of types prepared alike and not: the
    // input is prepared once per kind, and each product is still its own
    let types = [
        GgmlType::Q6K,
        GgmlType::F32,
        GgmlType::Q8_0,
        GgmlType::Q6K,
        GgmlType::BF16,
        GgmlType::Q5_0,
    ];
    let ws: Vec<QMatrix> = types
        .iter()
        .map(|&ty| random_matrix(ty, rows, cols, &mut rng))
        .collect();
    for m in [1, 3, 12] {
        let x = random_x(m * cols, &mut rng);
        let pairs: Vec<(&QMatrix, &[f32])> = ws.iter().map(|w| (w, x.as_slice())).collect();
        let together = products(&pairs);
        for (j, (y, pair)) in together.iter().zip(&pairs).enumerate() {
            let own = x.clone();
            let alone = products(&[(pair.0, own.as_slice())]).pop().unwrap();
            assert_eq!(y, &alone, "{:?} on a shared input of {m} rows", types[j]);
        }
    }
}

/// Interleaved weights, on each kernel this CPU runs (AVX-512 VNNI, AVX2), give each
/// activation row the dequantized weights' product with its quantized values (integer sums
/// exact, f32 scaling), and the same bits whether the row is multiplied alone, beside one
/// other or among a prompt's 70; matrices whose rows are not whole octets keep their
/// stored layout.
#[test]
fn interleaved_products_are_exact_and_the_same_for_any_rows() {
    use super::interleave::Kernel;
    let kernels = Kernel::available();
    for missing in [Kernel::Vnni, Kernel::Avx2] {
        if !kernels.contains(&missing) {
            println!(
                "interleaved weights on {missing:?}: SKIPPED, this CPU lacks it (or ROUTELM_CPU caps it)"
            );
        }
    }
    let mut rng = Rng::new(12);
    let (rows, cols) = (24, 512);
    let types = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
    ];
    for (kernel, ty) in kernels.iter().flat_map(|&k| types.map(|t| (k, t))) {
        assert!(random_matrix(ty, 13, cols, &mut rng)
            .interleaved()
            .is_none());
        let w = random_matrix(ty, rows, cols, &mut rng).interleaved_for(kernel);
        assert!(
            w.interleaved().is_some(),
            "{kernel:?} {ty:?} not interleaved"
        );
        let wf = dequantized(&w);
        let m = 70;
        let x = random_x(m * cols, &mut rng);
        let all = products(&[(&w, &x)]).pop().unwrap();
        let act = QAct::new(ty, &x, cols);
        for r in 0..m {
            let seen = as_seen(&act, r, cols);
            for o in 0..rows {
                let (exact, mag) = exact_and_magnitude(&wf[o * cols..(o + 1) * cols], &seen);
                let got = all[r * rows + o] as f64;
                assert!(
                    (got - exact).abs() <= 1e-5 * mag + 1e-6,
                    "{kernel:?} {ty:?} row {r} out {o}: {got} vs {exact} ({mag})"
                );
            }
            let xr = &x[r * cols..(r + 1) * cols];
            let alone = products(&[(&w, xr)]).pop().unwrap();
            assert_eq!(
                &all[r * rows..(r + 1) * rows],
                &alone[..],
                "{kernel:?} {ty:?} row {r} alone"
            );
        }
        // two rows together, and the same input twice in one call (q, k and v share it)
        let two = products(&[(&w, &x[..2 * cols]), (&w, &x[..2 * cols])]);
        for y in &two {
            assert_eq!(&y[..], &all[..2 * rows], "{kernel:?} {ty:?}: two rows");
        }
        // pairs of different row counts in one call (a decoding step's experts)
        let spans = [(0, 3), (3, 8), (8, 9)];
        let pairs: Vec<(&QMatrix, &[f32])> = spans
            .iter()
            .map(|&(a, b)| (&w, &x[a * cols..b * cols]))
            .collect();
        for (y, &(a, b)) in products(&pairs).iter().zip(&spans) {
            assert_eq!(
                &y[..],
                &all[a * rows..b * rows],
                "{kernel:?} {ty:?}: rows {a}..{b}"
            );
        }
    }
    println!("interleaved weights: checked on {kernels:?} (Q4_0, Q4_1, Q8_0, Q4_K)");
}

/// The AVX-512 block quantizer gives the portable one's scale, values and sum bit for bit:
/// random blocks, a block of zeros, blocks with ties at half a step, large and tiny values.
#[test]
fn avx512_quantizer_equals_the_portable_one() {
    #[cfg(target_arch = "x86_64")]
    if simd::has_avx512() {
        let mut rng = Rng::new(5);
        let mut blocks: Vec<Vec<f32>> = (0..500).map(|_| random_x(32, &mut rng)).collect();
        blocks.push(vec![0.0; 32]);
        // max 127 → d = 1: values at k + 0.5 are ties
        blocks.push(
            (0..32)
                .map(|i| if i == 0 { 127.0 } else { i as f32 - 15.5 })
                .collect(),
        );
        blocks.push((0..32).map(|i| (i as f32 - 16.0) * 1e30).collect());
        blocks.push((0..32).map(|i| (i as f32 - 16.0) * 1e-30).collect());
        // super-blocks of 256 (the K-quants' activations), their maximum in any part
        for at in [0, 100, 255] {
            let mut x = random_x(256, &mut rng);
            x[at] = 9.0;
            blocks.push(x);
        }
        for x in &blocks {
            let n = x.len();
            let (mut qa, mut qb) = (vec![0i8; n], vec![0i8; n]);
            // SAFETY: AVX-512F detected; the same multiple of 32 values each
            let a = unsafe { quantize_block_avx512(x, &mut qa) };
            let b = quantize_block_portable(x, &mut qb);
            assert_eq!((a.0.to_bits(), a.1), (b.0.to_bits(), b.1), "{x:?}");
            assert_eq!(qa, qb, "{x:?}");
        }
        println!("avx512 quantizer: checked on {} blocks", blocks.len());
        return;
    }
    println!("avx512 quantizer: SKIPPED, this CPU lacks AVX-512F (or ROUTELM_CPU caps it)");
}

/// Rows in a memory-mapped file, read in place: row lookups (an untied embedding's) leave
/// the file alone, the first product copies the rows off the file, and products and
/// lookups give the file's values bit for bit before and after.
#[test]
fn mapped_rows_read_the_same_before_and_after_their_copy() {
    let mut rng = Rng::new(31);
    let (rows, cols) = (40, 256);
    let path = std::env::temp_dir().join(format!("routelm-mapped-{}.bin", std::process::id()));
    for ty in [GgmlType::F32, GgmlType::BF16, GgmlType::Q6K] {
        let owned = random_matrix(ty, rows, cols, &mut rng);
        let _ = owned.interleaved.set(None);
        // a few bytes ahead of the matrix, as tensors sit in a file
        let mut file = vec![7u8; 96];
        file.extend_from_slice(owned.in_order());
        std::fs::write(&path, &file).unwrap();
        // SAFETY: the file is this test's own, not changed while mapped
        let map = std::sync::Arc::new(
            unsafe { memmap2::Mmap::map(&std::fs::File::open(&path).unwrap()) }.unwrap(),
        );
        let data = QBytes::Mapped {
            map,
            start: 96,
            len: file.len() - 96,
        };
        let mapped = QMatrix::new(ty, rows, cols, data).unwrap();
        let _ = mapped.interleaved.set(None);
        let lookup = |w: &QMatrix| {
            let mut out = vec![0f32; 3 * cols];
            w.dequantize_rows(5, 8, &mut out);
            out
        };
        assert_eq!(
            lookup(&mapped),
            lookup(&owned),
            "{ty:?} lookup from the file"
        );
        assert!(
            mapped.copied.get().is_none(),
            "{ty:?}: a lookup copied the rows"
        );
        for m in [1, 3] {
            let x = random_x(m * cols, &mut rng);
            let want = products(&[(&owned, &x)]).pop().unwrap();
            assert_eq!(
                products(&[(&mapped, &x)]).pop().unwrap(),
                want,
                "{ty:?} m {m}"
            );
        }
        assert!(
            mapped.copied.get().is_some(),
            "{ty:?}: products read the file in place"
        );
        assert_eq!(
            lookup(&mapped),
            lookup(&owned),
            "{ty:?} lookup from the copy"
        );
    }
    let _ = std::fs::remove_file(&path);
}

//! Mixed-precision products: the AVX512-BF16 kernel against an f64 product of the same
//! bf16-rounded operands, forward and both gradients, across the packing paths (odd `k`,
//! several `k` blocks, ragged tiles), and a short training run that tracks f32.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use routelm::nn::bf16;
use routelm::train::data::Dataset;
use routelm::train::Precision;
use routelm::Trainer;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = routelm::rng::Rng::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// `t` rounded to bf16 (nearest even) and back.
fn round(t: &Tensor) -> Tensor {
    t.to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

fn f64_matmul(a: &Tensor, b: &Tensor) -> Tensor {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    a.matmul(&b).unwrap().to_dtype(DType::F32).unwrap()
}

/// Largest difference relative to the reference's largest magnitude.
fn rel_diff(a: &Tensor, reference: &Tensor) -> f32 {
    let d = common::max_abs_diff(a, reference);
    let scale = reference
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    d as f32 / scale.max(1e-6)
}

#[test]
fn bf16_products_match_the_rounded_operands_product() {
    // without the kernel the layer computes in f32: only bf16 rounding apart
    let tol = if bf16::available() { 1e-5 } else { 2e-2 };
    // (rows, in, out): ragged tiles; k = 1 (one half-empty pair); k over several blocks
    for (i, &(rows, d_in, d_out)) in [(37, 45, 70), (9, 1, 3), (64, 1030, 33), (16, 32, 32)]
        .iter()
        .enumerate()
    {
        let seed = 10 * i as u64;
        let x = Var::from_tensor(&randn(&[rows, d_in], seed)).unwrap();
        let w = Var::from_tensor(&randn(&[d_out, d_in], seed + 1)).unwrap();
        // the incoming gradient is exactly representable in bf16
        let g = round(&randn(&[rows, d_out], seed + 2));
        let mut layer = routelm::nn::Linear::new(w.as_tensor().clone(), None);
        layer.bf16 = true;
        let y = layer.forward(x.as_tensor()).unwrap();
        let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let (xr, wr) = (round(x.as_tensor()), round(w.as_tensor()));
        let y_ref = f64_matmul(&xr, &wr.t().unwrap());
        let dx_ref = f64_matmul(&g, &wr);
        let dw_ref = f64_matmul(&g.t().unwrap(), &xr);
        let dx = grads.get(x.as_tensor()).unwrap();
        let dw = grads.get(w.as_tensor()).unwrap();
        for (name, got, want) in [("y", &y, &y_ref), ("dx", dx, &dx_ref), ("dw", dw, &dw_ref)] {
            let d = rel_diff(got, want);
            assert!(
                d < tol,
                "{rows}x{d_in}x{d_out} {name}: relative difference {d}"
            );
        }
        // and bf16 rounding is what separates it from the f32 product
        let f32_ref = x.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
        assert!(rel_diff(&y, &f32_ref) < 2e-2);
    }
}

#[test]
fn bf16_gemm_accumulates_into_a_strided_output() {
    if !bf16::available() {
        return;
    }
    let (m, n, k, ldc) = (11, 40, 7, 45);
    let a = round(&randn(&[m, k], 5));
    let b = round(&randn(&[k, n], 6));
    let c0 = randn(&[m, ldc], 7);
    let mut c: Vec<f32> = c0.flatten_all().unwrap().to_vec1().unwrap();
    let (av, bv): (Vec<f32>, Vec<f32>) = (
        a.flatten_all().unwrap().to_vec1().unwrap(),
        b.flatten_all().unwrap().to_vec1().unwrap(),
    );
    // SAFETY: the kernel is available; a is m × k, b is k × n (read transposed through
    // strides: B(p, j) at p·n + j), c is m × ldc with n ≤ ldc
    unsafe {
        bf16::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            ldc,
            true,
            bf16::Strided {
                ptr: av.as_ptr(),
                rs: k,
                cs: 1,
            },
            bf16::Strided {
                ptr: bv.as_ptr(),
                rs: n,
                cs: 1,
            },
        )
    };
    let c = Tensor::from_vec(c, (m, ldc), &Device::Cpu).unwrap();
    let want = (c0.narrow(1, 0, n).unwrap() + f64_matmul(&a, &b)).unwrap();
    assert!(rel_diff(&c.narrow(1, 0, n).unwrap(), &want) < 1e-5);
    // columns past n are untouched
    assert_eq!(
        common::max_abs_diff(
            &c.narrow(1, n, ldc - n).unwrap(),
            &c0.narrow(1, n, ldc - n).unwrap()
        ),
        0.0
    );
}

/// The experts' grouped SwiGLU op with bf16 products against the f64 composition on the
/// bf16-rounded operands (forward and the three gradients). The op also rounds the hidden
/// activations to bf16 before the down product, so the bound is bf16's relative precision.
#[test]
fn bf16_grouped_swiglu_matches_the_rounded_operands_composition() {
    if !bf16::available() {
        println!("skipped: this CPU has no AVX512-BF16 (the grouped op runs its f32 products)");
        return;
    }
    // 4 experts of hidden width 5 (one without rows), inputs of width 7 (odd: a half pair)
    let offsets = [0usize, 9, 9, 20, 37];
    let x = Var::from_tensor(&randn(&[37, 7], 30)).unwrap();
    let gu = Var::from_tensor(&randn(&[4 * 2 * 5, 7], 31)).unwrap();
    let dn = Var::from_tensor(&randn(&[4 * 7, 5], 33)).unwrap();
    let g = round(&randn(&[37, 7], 32));
    let y = routelm::nn::grouped::grouped_swiglu(
        x.as_tensor(),
        gu.as_tensor(),
        dn.as_tensor(),
        &offsets,
        true,
    )
    .unwrap();
    let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let f64var = |t: &Tensor| Var::from_tensor(&round(t).to_dtype(DType::F64).unwrap()).unwrap();
    let (xr, gur, dnr) = (
        f64var(x.as_tensor()),
        f64var(gu.as_tensor()),
        f64var(dn.as_tensor()),
    );
    let y_ref = routelm::nn::grouped::grouped_swiglu_reference(
        xr.as_tensor(),
        gur.as_tensor(),
        dnr.as_tensor(),
        &offsets,
    )
    .unwrap();
    let g64 = g.to_dtype(DType::F64).unwrap();
    let ref_grads = (&y_ref * &g64)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let grad =
        |s: &candle_core::backprop::GradStore, v: &Var| s.get(v.as_tensor()).unwrap().clone();
    let pairs = [
        ("y", y.clone(), y_ref.clone()),
        ("dx", grad(&grads, &x), grad(&ref_grads, &xr)),
        ("d gate_up", grad(&grads, &gu), grad(&ref_grads, &gur)),
        ("d down", grad(&grads, &dn), grad(&ref_grads, &dnr)),
    ];
    for (name, got, want) in pairs {
        let d = rel_diff(&got, &want.to_dtype(DType::F32).unwrap());
        assert!(d < 1e-2, "grouped swiglu {name}: relative difference {d}");
    }
}

#[test]
fn bf16_training_tracks_f32() {
    for variant in [0, 7] {
        training_tracks_f32(variant);
    }
}

/// Dense (variant 0) or MoE (variant 7) tiny model: 12 steps in f32 and in bf16.
fn training_tracks_f32(variant: usize) {
    let cfg = common::tiny(variant);
    // a periodic sequence: learnable in a few steps
    let tokens: Vec<u32> = (0..4000).map(|i| (i * 7 % 11) as u32).collect();
    let mut losses = Vec::new();
    for precision in [Precision::F32, Precision::Bf16] {
        let train = routelm::train::TrainConfigFile {
            steps: Some(12),
            batch_size: Some(4),
            lr: Some(1e-2),
            seq_len: Some(12),
            precision: Some(precision),
            ..Default::default()
        }
        .resolve(cfg.max_seq_len, "test")
        .unwrap();
        let data = Dataset::split(tokens.clone(), 0.1, train.seq_len).unwrap();
        let mut t = Trainer::new(&cfg, &train, &Device::Cpu).unwrap();
        let l: Vec<f64> = (0..12).map(|_| t.train_step(&data).unwrap().0).collect();
        losses.push(l);
    }
    let (f, b) = (&losses[0], &losses[1]);
    assert!(
        b[11] < b[0] - 0.1,
        "variant {variant}: bf16 training does not learn: {b:?}"
    );
    for (s, (x, y)) in f.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() < 0.03 * x,
            "step {s}: f32 {x} vs bf16 {y}\n{f:?}\n{b:?}"
        );
    }
    if bf16::available() {
        // the products really ran in bf16
        assert!(f.iter().zip(b).any(|(x, y)| x != y));
    }
}

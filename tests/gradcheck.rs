//! Gradients against finite differences, and the fused CPU kernels against their composed
//! references (forward and backward).
//!
//! The fused kernels run in f32 only, where finite differences are too noisy to be exact,
//! so the chain of evidence is: (1) in f64 the composed references match central finite
//! differences; (2) in f32 each fused kernel's output and gradient match the reference's.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{max_abs_diff, tiny, VARIANTS};
use routelm::model::{init::init_params, Model};
use routelm::nn::causal_attention::{attention_reference, causal_attention, AttentionOptions};
use routelm::nn::ops;

/// Central finite differences of `f` at `x` against autograd, every element.
fn check_fd(x: &Tensor, f: &dyn Fn(&Tensor) -> Tensor, tol: f64) {
    let var = Var::from_tensor(x).unwrap();
    let y = f(var.as_tensor());
    let grads = y.backward().unwrap();
    let g = grads
        .get(var.as_tensor())
        .expect("no gradient")
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let base = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let h = 1e-6;
    for i in 0..base.len() {
        let eval = |delta: f64| {
            let mut v = base.clone();
            v[i] += delta;
            let t = Tensor::from_vec(v, x.shape(), x.device()).unwrap();
            f(&t).to_scalar::<f64>().unwrap()
        };
        let fd = (eval(h) - eval(-h)) / (2.0 * h);
        assert!(
            (fd - g[i]).abs() <= tol * (1.0 + fd.abs()),
            "element {i}: finite difference {fd}, autograd {}",
            g[i]
        );
    }
}

fn randn(shape: &[usize], dtype: DType, seed: u64) -> Tensor {
    let mut rng = routelm::rng::Rng::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// A scalar that mixes every output element with distinct weights.
fn project(y: &Tensor, seed: u64) -> Tensor {
    let w = randn(y.dims(), y.dtype(), seed);
    (y * w).unwrap().sum_all().unwrap()
}

#[test]
fn references_match_finite_differences_f64() {
    let x = randn(&[3, 8], DType::F64, 1);
    let w = randn(&[8], DType::F64, 2);
    let b = randn(&[8], DType::F64, 3);
    check_fd(
        &x,
        &|x| project(&ops::rms_norm_reference(x, &w, 1e-5).unwrap(), 9),
        1e-6,
    );
    check_fd(
        &w,
        &|w| project(&ops::rms_norm_reference(&x, w, 1e-5).unwrap(), 9),
        1e-6,
    );
    check_fd(
        &x,
        &|x| project(&ops::layer_norm(x, &w, Some(&b), 1e-5).unwrap(), 9),
        1e-6,
    );
    check_fd(
        &b,
        &|b| project(&ops::layer_norm(&x, &w, Some(b), 1e-5).unwrap(), 9),
        1e-6,
    );
    let q = randn(&[2, 3, 2, 6], DType::F64, 5);
    let cos = randn(&[3, 2], DType::F64, 6);
    let sin = randn(&[3, 2], DType::F64, 7);
    check_fd(
        &q,
        &|q| project(&ops::rope_reference(q, &cos, &sin).unwrap(), 9),
        1e-6,
    );
    let (k, v) = (
        randn(&[1, 5, 2, 3], DType::F64, 12),
        randn(&[1, 5, 2, 3], DType::F64, 13),
    );
    let q = randn(&[1, 3, 4, 3], DType::F64, 14); // GQA 4/2, 3 queries after 2 cached keys
    check_fd(
        &q,
        &|q| {
            project(
                &attention_reference(q, &k, &v, &AttentionOptions::scaled(0.6)).unwrap(),
                9,
            )
        },
        1e-6,
    );
    let q = randn(&[1, 3, 4, 3], DType::F64, 14);
    check_fd(
        &k,
        &|k| {
            project(
                &attention_reference(&q, k, &v, &AttentionOptions::scaled(0.6)).unwrap(),
                9,
            )
        },
        1e-6,
    );
    check_fd(
        &v,
        &|v| {
            project(
                &attention_reference(&q, &k, v, &AttentionOptions::scaled(0.6)).unwrap(),
                9,
            )
        },
        1e-6,
    );
    let z = randn(&[5, 7], DType::F64, 8);
    let t = Tensor::new(&[0u32, 6, 3, 3, 1], &Device::Cpu).unwrap();
    check_fd(&z, &|z| ops::cross_entropy_reference(z, &t).unwrap(), 1e-6);
}

/// Forward output and input gradients of a fused kernel and its reference, in f32.
fn compare(
    inputs: &[Tensor],
    fused: &dyn Fn(&[Tensor]) -> Tensor,
    reference: &dyn Fn(&[Tensor]) -> Tensor,
    tol: f64,
) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let (yf, yr) = (fused(&ts), reference(&ts));
    assert!(
        max_abs_diff(&yf, &yr) < tol,
        "forward differs by {}",
        max_abs_diff(&yf, &yr)
    );
    let gf = project(&yf, 11).backward().unwrap();
    let gr = project(&yr, 11).backward().unwrap();
    for (i, t) in ts.iter().enumerate() {
        match (gf.get(t), gr.get(t)) {
            (Some(a), Some(b)) => assert!(
                max_abs_diff(a, b) < tol,
                "input {i}: gradient differs by {}",
                max_abs_diff(a, b)
            ),
            (None, None) => {}
            (a, b) => panic!(
                "input {i}: gradient present in fused {} / reference {}",
                a.is_some(),
                b.is_some()
            ),
        }
    }
}

#[test]
fn fused_kernels_match_references_f32() {
    let f = DType::F32;
    compare(
        &[randn(&[4, 5, 16], f, 1), randn(&[16], f, 2)],
        &|t| ops::rms_norm(&t[0], &t[1], 1e-5).unwrap(),
        &|t| ops::rms_norm_reference(&t[0], &t[1], 1e-5).unwrap(),
        1e-5,
    );
    let cos = randn(&[5, 3], f, 4);
    let sin = randn(&[5, 3], f, 5);
    compare(
        &[randn(&[2, 5, 3, 8], f, 6)],
        &|t| ops::rope(&t[0], &cos, &sin).unwrap(),
        &|t| ops::rope_reference(&t[0], &cos, &sin).unwrap(),
        1e-5,
    );
    let cos_b = randn(&[2, 5, 3], f, 7);
    let sin_b = randn(&[2, 5, 3], f, 8);
    compare(
        &[randn(&[2, 5, 3, 6], f, 9)],
        &|t| ops::rope(&t[0], &cos_b, &sin_b).unwrap(),
        &|t| ops::rope_reference(&t[0], &cos_b, &sin_b).unwrap(),
        1e-5,
    );
    // attention: MHA, GQA and MQA; more queries than one row block; queries after cached
    // keys; and a strided K/V view like the KV cache hands out
    for (t, tk, h, hkv) in [(70, 70, 2, 2), (67, 130, 4, 2), (5, 9, 3, 1)] {
        let q = randn(&[2, t, h, 8], f, 20);
        let k = randn(&[2, tk, hkv, 8], f, 21);
        let v = randn(&[2, tk, hkv, 8], f, 22);
        // ALiBi with 3 heads also covers the slopes of a head count that is no power of two
        for (window, alibi) in [
            (None, false),
            (Some(3), false),
            (Some(40), false),
            (None, true),
            (Some(40), true),
        ] {
            let o = AttentionOptions {
                window,
                alibi,
                ..AttentionOptions::scaled(0.35)
            };
            compare(
                &[q.clone(), k.clone(), v.clone()],
                &|x| causal_attention(&x[0], &x[1], &x[2], &o).unwrap(),
                &|x| attention_reference(&x[0], &x[1], &x[2], &o).unwrap(),
                1e-5,
            );
        }
    }
    // values narrower than queries and keys (latent attention: v_head_dim != qk_head_dim)
    let o = AttentionOptions {
        window: Some(5),
        ..AttentionOptions::scaled(0.35)
    };
    compare(
        &[
            randn(&[2, 9, 4, 8], f, 26),
            randn(&[2, 9, 2, 8], f, 27),
            randn(&[2, 9, 2, 5], f, 28),
        ],
        &|x| causal_attention(&x[0], &x[1], &x[2], &o).unwrap(),
        &|x| attention_reference(&x[0], &x[1], &x[2], &o).unwrap(),
        1e-5,
    );
    let kbuf = randn(&[2, 16, 2, 8], f, 23);
    let vbuf = randn(&[2, 16, 2, 8], f, 24);
    let (k, v) = (
        kbuf.narrow(1, 0, 11).unwrap(),
        vbuf.narrow(1, 0, 11).unwrap(),
    );
    assert!(!k.is_contiguous());
    let q = randn(&[2, 4, 4, 8], f, 25);
    let d = max_abs_diff(
        &causal_attention(&q, &k, &v, &AttentionOptions::scaled(0.35)).unwrap(),
        &attention_reference(&q, &k, &v, &AttentionOptions::scaled(0.35)).unwrap(),
    );
    assert!(d < 1e-5, "strided K/V view: {d}");
    // the skinny (decode) matmul and its backward against candle's matmul
    let w = randn(&[70, 33], f, 30);
    compare(
        &[randn(&[3, 33], f, 31), w.clone()],
        &|t| {
            routelm::nn::matvec::skinny_matmul(&t[0], &t[1])
                .unwrap()
                .unwrap()
        },
        &|t| t[0].matmul(&t[1].t().unwrap()).unwrap(),
        1e-5,
    );
    // several products in one region (q, k, v of one input; a decoded token's experts):
    // blocks of 64 rows cross the weights' boundaries, inputs differ in width; each output
    // equals its own matmul
    let xs = [
        randn(&[3, 33], f, 32),
        randn(&[3, 33], f, 33),
        randn(&[3, 7], f, 34),
    ];
    let ws = [w.clone(), randn(&[130, 33], f, 35), randn(&[5, 7], f, 36)];
    let ys =
        routelm::nn::matvec::skinny_pairs(&[&xs[0], &xs[1], &xs[2]], &[&ws[0], &ws[1], &ws[2]])
            .unwrap()
            .expect("f32 rows <= 8 take the fast path");
    for ((y, x), w) in ys.iter().zip(&xs).zip(&ws) {
        let d = max_abs_diff(y, &x.matmul(&w.t().unwrap()).unwrap());
        assert!(d < 1e-5, "skinny_pairs vs matmul: {d}");
    }
    // it has no backward: operands that record gradients take the ordinary path
    let var = candle_core::Var::from_tensor(&w).unwrap();
    assert!(
        routelm::nn::matvec::skinny_pairs(&[&xs[0]], &[var.as_tensor()])
            .unwrap()
            .is_none()
    );
    // an MoE layer's SwiGLU experts as one op (gate/up product, SwiGLU, down product):
    // 4 experts with hidden width 3 on 17 rows, one expert without rows
    let offsets = [0usize, 3, 3, 10, 17];
    compare(
        &[
            randn(&[17, 6], f, 50),
            randn(&[4 * 2 * 3, 6], f, 51),
            randn(&[4 * 6, 3], f, 52),
        ],
        &|t| routelm::nn::grouped::grouped_swiglu(&t[0], &t[1], &t[2], &offsets, false).unwrap(),
        &|t| routelm::nn::grouped::grouped_swiglu_reference(&t[0], &t[1], &t[2], &offsets).unwrap(),
        1e-5,
    );
    // the same op on one group (a dense SwiGLU block: its rows split over the threads and
    // the partial weight gradients summed) and on two
    for offsets in [vec![0usize, 17], vec![0, 9, 17]] {
        let groups = offsets.len() - 1;
        compare(
            &[
                randn(&[17, 6], f, 53),
                randn(&[groups * 2 * 3, 6], f, 54),
                randn(&[groups * 6, 3], f, 55),
            ],
            &|t| {
                routelm::nn::grouped::grouped_swiglu(&t[0], &t[1], &t[2], &offsets, false).unwrap()
            },
            &|t| {
                routelm::nn::grouped::grouped_swiglu_reference(&t[0], &t[1], &t[2], &offsets)
                    .unwrap()
            },
            1e-5,
        );
    }
    // the linear layer's fused product on a 3-d input (18 rows: past the decode path),
    // with a bias, against candle's matmul
    compare(
        &[
            randn(&[2, 9, 6], f, 46),
            randn(&[5, 6], f, 47),
            randn(&[5], f, 48),
        ],
        &|t| {
            routelm::nn::Linear::new(t[1].clone(), Some(t[2].clone()))
                .forward(&t[0])
                .unwrap()
        },
        &|t| {
            t[0].broadcast_matmul(&t[1].t().unwrap())
                .unwrap()
                .broadcast_add(&t[2])
                .unwrap()
        },
        1e-5,
    );
    // the gate-weighted combine: rows receive several entries, one row (2) none
    let rows = [4u32, 0, 4, 1, 3, 0, 4];
    compare(
        &[randn(&[7, 6], f, 44), randn(&[7], f, 45)],
        &|t| routelm::nn::grouped::weighted_scatter(&t[0], &t[1], &rows, 5).unwrap(),
        &|t| routelm::nn::grouped::weighted_scatter_reference(&t[0], &t[1], &rows, 5).unwrap(),
        1e-5,
    );
    // SwiGLU in one pass, large enough to run in parallel chunks
    compare(
        &[randn(&[3, 50, 130], f, 40), randn(&[3, 50, 130], f, 41)],
        &|t| ops::swiglu(&t[0], &t[1]).unwrap(),
        &|t| ops::swiglu_reference(&t[0], &t[1]).unwrap(),
        1e-5,
    );
    // GELU (tanh form) through exp, against candle's tanh; wide inputs reach both tails
    compare(
        &[(randn(&[3, 40, 120], f, 46) * 4.0).unwrap()],
        &|t| ops::gelu(&t[0]).unwrap(),
        &|t| t[0].gelu().unwrap(),
        1e-5,
    );
    let tg = Tensor::new(&[1u32, 0, 9, 4, 4, 2], &Device::Cpu).unwrap();
    compare(
        &[randn(&[6, 10], f, 10)],
        &|t| ops::cross_entropy(&t[0], &tg).unwrap(),
        &|t| ops::cross_entropy_reference(&t[0], &tg).unwrap(),
        1e-5,
    );
}

fn model_loss(
    cfg: &routelm::ModelConfig,
    params: &std::collections::BTreeMap<String, Tensor>,
) -> Tensor {
    let model = Model::new(cfg, params, "test").unwrap();
    let x = common::ids(&[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8], 2);
    let y = common::ids(&[1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9], 2);
    model.loss(&x, &y).unwrap().total
}

/// Every parameter of every layer type: autograd through the whole f64 model equals finite
/// differences (a sample of elements per tensor), and the f32 model with fused kernels
/// gives the same gradients as the f64 model.
#[test]
fn whole_model_gradients() {
    for variant in 0..VARIANTS {
        let cfg = tiny(variant);
        let p64 = init_params(&cfg, 7, DType::F64, &Device::Cpu).unwrap();
        let vars: std::collections::BTreeMap<String, Var> = p64
            .iter()
            .map(|(k, t)| (k.clone(), Var::from_tensor(t).unwrap()))
            .collect();
        let tensors = vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        let g64 = model_loss(&cfg, &tensors).backward().unwrap();
        let p32: std::collections::BTreeMap<String, Var> = p64
            .iter()
            .map(|(k, t)| {
                (
                    k.clone(),
                    Var::from_tensor(&t.to_dtype(DType::F32).unwrap()).unwrap(),
                )
            })
            .collect();
        let t32 = p32
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        let g32 = model_loss(&cfg, &t32).backward().unwrap();
        for (name, var) in &vars {
            if name.ends_with("e_score_correction_bias") {
                // chooses experts only: no gradient reaches it, by design
                assert!(g64.get(var.as_tensor()).is_none(), "{name} got a gradient");
                continue;
            }
            let g = g64
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("variant {variant}: no gradient for {name}"));
            let g_f32 = g32.get(p32[name].as_tensor()).unwrap();
            let diff = max_abs_diff(g, g_f32);
            assert!(
                diff < 1e-4,
                "variant {variant} {name}: f32 fused vs f64 gradient differ by {diff}"
            );
            // the MoD decider (the predictor, else the router) reads its input with the
            // gradient stopped: its loss depends on every earlier parameter but by design
            // trains the decider alone, so the other parameters are checked against the loss
            // without it (the variants route one block, or decide by a predictor, so a
            // decider's own loss is the only one it moves)
            let mut fd_cfg = cfg.clone();
            for dc in fd_cfg.layers.iter_mut().filter_map(|l| l.depth.as_mut()) {
                let decider = if dc.predictor > 0 {
                    "depth_predictor"
                } else {
                    "depth_router"
                };
                if !name.contains(decider) {
                    dc.aux_loss_coef = 0.0;
                }
            }
            let flat = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let n = flat.len();
            for i in [0, n / 3, n / 2, n - 1] {
                let perturbed = |delta: f64| {
                    let mut v = p64[name].flatten_all().unwrap().to_vec1::<f64>().unwrap();
                    v[i] += delta;
                    let mut p = p64.clone();
                    p.insert(
                        name.clone(),
                        Tensor::from_vec(v, p64[name].shape(), &Device::Cpu).unwrap(),
                    );
                    model_loss(&fd_cfg, &p).to_scalar::<f64>().unwrap()
                };
                let h = 1e-5;
                let fd = (perturbed(h) - perturbed(-h)) / (2.0 * h);
                assert!(
                    (fd - flat[i]).abs() < 1e-6 * (1.0 + fd.abs()),
                    "variant {variant} {name}[{i}]: finite difference {fd}, autograd {}",
                    flat[i]
                );
            }
        }
    }
}

/// Every dot-product path of the decode kernel that this CPU has (chosen at run time) gives
/// the generic path's bits and the f64 sum to rounding; the paths it lacks are named as
/// skipped.
#[test]
fn decode_dot_paths_agree() {
    let paths = routelm::nn::matvec::dot_paths();
    let have: Vec<&str> = paths.iter().map(|p| p.0).collect();
    for name in ["avx512f", "avx2", "generic"] {
        if !have.contains(&name) {
            println!("dot path {name}: skipped (this CPU lacks it)");
        }
    }
    let generic = paths.last().unwrap().1;
    let mut rng = routelm::rng::Rng::new(5);
    for n in [0usize, 1, 7, 63, 64, 65, 130, 1000] {
        let a: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        let b: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        for (name, f) in &paths {
            let got = f(&a, &b);
            assert_eq!(got.to_bits(), generic(&a, &b).to_bits(), "{name}, n = {n}");
            assert!(
                (got as f64 - exact).abs() <= 1e-4 * (1.0 + exact.abs()),
                "{name} n {n}"
            );
        }
    }
    println!("dot paths run: {have:?}");
}

//! The Mixture-of-Experts layer against a slow reference that loops over tokens and
//! experts, for every routing variant; equivalences and pitfalls that other engines
//! shipped as bugs.

mod common;

use common::max_abs_diff as max_diff;

use candle_core::{DType, Device, IndexOp, Tensor};
use routelm::config::{FfnKind, MoeConfig, Scoring};
use routelm::nn::{Linear, Mlp};
use routelm::rng::Rng;
use routelm::routing::MoeLayer;

const D: usize = 8;

fn randn(shape: &[usize], std: f64, rng: &mut Rng) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| (rng.normal() * std) as f32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn mlp(width: usize, rng: &mut Rng) -> Mlp {
    let lin = |o, i, rng: &mut Rng| Linear::new(randn(&[o, i], 0.4, rng), None);
    Mlp {
        kind: FfnKind::Swiglu,
        gate: Some(lin(width, D, rng)),
        up: lin(width, D, rng),
        down: lin(D, width, rng),
        gate_up: None,
    }
}

fn base() -> MoeConfig {
    MoeConfig {
        norm_topk: false,
        ..MoeConfig::new(6, 2, 5)
    }
}

fn layer(c: MoeConfig, seed: u64) -> MoeLayer {
    let mut rng = Rng::new(seed);
    MoeLayer {
        layer: 0,
        config: c,
        router: randn(&[c.slots(), D], 1.0, &mut rng),
        selection_bias: c.selection_bias.then(|| randn(&[c.slots()], 0.5, &mut rng)),
        experts: (0..c.n_experts)
            .map(|_| mlp(c.d_expert, &mut rng))
            .collect(),
        shared: (c.d_shared > 0).then(|| mlp(c.d_shared, &mut rng)),
        shared_gate: c
            .shared_gate
            .then(|| Linear::new(randn(&[1, D], 0.5, &mut rng), None)),
        stacked: Default::default(),
    }
}

/// The slow reference: every token on its own, scores in f64, experts one by one.
fn reference(m: &MoeLayer, x: &Tensor) -> Tensor {
    let c = m.config;
    let rows = x.dims()[0] * x.dims()[1];
    let xs = x.reshape((rows, D)).unwrap();
    let w = m
        .router
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    let bias: Vec<f64> = m.selection_bias.as_ref().map_or(vec![0.0; c.slots()], |b| {
        b.to_dtype(DType::F64).unwrap().to_vec1().unwrap()
    });
    let mut out = Vec::new();
    for t in 0..rows {
        let xt = xs.i(t..t + 1).unwrap();
        let xv = xt
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let logits: Vec<f64> = w
            .iter()
            .map(|r| r.iter().zip(&xv).map(|(a, b)| a * b).sum())
            .collect();
        let scores: Vec<f64> = match c.scoring {
            Scoring::Softmax => {
                let m = logits.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = logits.iter().map(|l| (l - m).exp()).sum();
                logits.iter().map(|l| (l - m).exp() / z).collect()
            }
            Scoring::Sigmoid => logits.iter().map(|l| 1.0 / (1.0 + (-l).exp())).collect(),
            Scoring::SparseMixer { .. } => logits.clone(),
        };
        let biased: Vec<f64> = scores.iter().zip(&bias).map(|(s, b)| s + b).collect();
        let gs = c.slots() / c.n_groups;
        let mut groups: Vec<(usize, f64)> = (0..c.n_groups)
            .map(|g| {
                let mut v = biased[g * gs..(g + 1) * gs].to_vec();
                v.sort_by(|a, b| b.partial_cmp(a).unwrap());
                (g, v.iter().take(2).sum())
            })
            .collect();
        groups.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap());
        let kept: Vec<usize> = groups.iter().take(c.topk_groups).map(|g| g.0).collect();
        let mut cand: Vec<usize> = (0..c.slots())
            .filter(|e| kept.contains(&(e / gs)))
            .collect();
        cand.sort_by(|&a, &b| biased[b].partial_cmp(&biased[a]).unwrap());
        let chosen = &cand[..c.top_k];
        let mut weights: Vec<f64> = match c.scoring {
            // softmax over the experts not chosen before whose logit is within the
            // relative threshold of this choice's
            Scoring::SparseMixer { eps } => (0..c.top_k)
                .map(|j| {
                    let m = logits[chosen[j]];
                    let kept = (0..c.n_experts).filter(|i| {
                        !chosen[..j].contains(i)
                            && (m - logits[*i]) / logits[*i].abs().max(m) <= 2.0 * eps
                    });
                    let z: f64 = kept.map(|i| (logits[i] - m).exp()).sum();
                    1.0 / z
                })
                .collect(),
            _ => chosen.iter().map(|&e| scores[e]).collect(),
        };
        if c.norm_topk {
            let s: f64 = weights.iter().sum::<f64>() + 1e-20;
            weights.iter_mut().for_each(|w| *w /= s);
        }
        let mut y = Tensor::zeros((1, D), DType::F32, &Device::Cpu).unwrap();
        // a no-op expert (integrated MoDE) adds nothing
        for (&e, &wt) in chosen
            .iter()
            .zip(&weights)
            .filter(|(&e, _)| e < c.n_experts)
        {
            y = (y + (m.experts[e].forward(&xt).unwrap() * (wt * c.routed_scale)).unwrap())
                .unwrap();
        }
        if let Some(s) = &m.shared {
            let mut sy = s.forward(&xt).unwrap();
            if let Some(g) = &m.shared_gate {
                let gl = g
                    .forward(&xt)
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()[0];
                sy = (sy * (1.0 / (1.0 + (-gl).exp()))).unwrap();
            }
            y = (y + sy).unwrap();
        }
        out.push(y);
    }
    Tensor::cat(&out, 0).unwrap().reshape(x.dims()).unwrap()
}

#[test]
fn every_routing_variant_matches_the_slow_reference() {
    let variants: Vec<(&str, MoeConfig)> = vec![
        ("softmax", base()),
        (
            "softmax renormalised",
            MoeConfig {
                norm_topk: true,
                ..base()
            },
        ),
        (
            "sigmoid, scaled, renormalised",
            MoeConfig {
                scoring: Scoring::Sigmoid,
                norm_topk: true,
                routed_scale: 2.5,
                ..base()
            },
        ),
        (
            "sigmoid, groups, selection bias",
            MoeConfig {
                scoring: Scoring::Sigmoid,
                n_groups: 3,
                topk_groups: 2,
                selection_bias: true,
                norm_topk: true,
                ..base()
            },
        ),
        (
            "integrated MoDE: 2 no-op experts, renormalised",
            MoeConfig {
                noop_experts: 2,
                expert_choice: false,
                norm_topk: true,
                ..base()
            },
        ),
        (
            "integrated MoDE: no-op experts with a selection bias",
            MoeConfig {
                noop_experts: 3,
                expert_choice: false,
                scoring: Scoring::Sigmoid,
                selection_bias: true,
                top_k: 3,
                ..base()
            },
        ),
        (
            "sparse mixer, top-2",
            MoeConfig {
                scoring: Scoring::SparseMixer { eps: 0.2 },
                ..base()
            },
        ),
        (
            "sparse mixer, top-3, wide threshold",
            MoeConfig {
                scoring: Scoring::SparseMixer { eps: 2.0 },
                top_k: 3,
                ..base()
            },
        ),
        (
            "shared expert with gate",
            MoeConfig {
                d_shared: 7,
                shared_gate: true,
                top_k: 3,
                ..base()
            },
        ),
        (
            "shared expert, no gate, fine-grained",
            MoeConfig {
                d_shared: 4,
                d_expert: 2,
                n_experts: 12,
                top_k: 4,
                ..base()
            },
        ),
    ];
    let mut rng = Rng::new(99);
    let x = randn(&[2, 7, D], 1.0, &mut rng);
    for (seed, (name, c)) in variants.into_iter().enumerate() {
        let m = layer(c, seed as u64);
        let (y, stats) = m.forward(&x).unwrap();
        let r = reference(&m, &x);
        let d = max_diff(&y, &r);
        assert!(d <= 1e-5, "{name}: differs from the slow reference by {d}");
        assert_eq!(stats.load.iter().sum::<usize>(), 14 * c.top_k, "{name}");
        // the decoding paths give the same rows: one token alone (its experts run
        // directly, weights and sum on the host) and a few rows (weights on the host)
        for (b, t, len) in [(0, 0, 1), (1, 6, 1), (1, 1, 5)] {
            let part = |v: &Tensor| v.narrow(0, b, 1).unwrap().narrow(1, t, len).unwrap();
            let (yt, _) = m.forward_with(&part(&x), false).unwrap();
            let d = max_diff(&yt, &part(&r));
            assert!(
                d <= 1e-5,
                "{name}: {len} token(s) at ({b}, {t}) differ by {d}"
            );
        }
    }
}

#[test]
fn all_experts_identical_with_top_k_all_equals_the_dense_ffn() {
    let c = MoeConfig {
        top_k: 6,
        norm_topk: true,
        ..base()
    };
    let mut m = layer(c, 3);
    let dense = m.experts[0].clone();
    m.experts = vec![dense.clone(); 6];
    let mut rng = Rng::new(5);
    let x = randn(&[1, 9, D], 1.0, &mut rng);
    let d = max_diff(&m.forward(&x).unwrap().0, &dense.forward(&x).unwrap());
    assert!(d <= 1e-5, "{d}");
}

/// Sigmoid routing: the correction bias only chooses; weights come from unbiased scores.
#[test]
fn selection_bias_does_not_leak_into_the_weights() {
    let c = MoeConfig {
        scoring: Scoring::Sigmoid,
        selection_bias: true,
        top_k: 1,
        ..base()
    };
    let mut m = layer(c, 4);
    let mut rng = Rng::new(6);
    let x = randn(&[1, 1, D], 1.0, &mut rng);
    // a huge bias on expert 5 forces the choice
    m.selection_bias = Some(Tensor::new(&[0f32, 0., 0., 0., 0., 100.], &Device::Cpu).unwrap());
    let (y, stats) = m.forward(&x).unwrap();
    assert_eq!(stats.load[5], 1);
    let logit = x
        .reshape((1, D))
        .unwrap()
        .matmul(&m.router.t().unwrap())
        .unwrap()
        .i((0, 5))
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let score = 1.0 / (1.0 + (-logit).exp());
    let expected =
        (m.experts[5].forward(&x.reshape((1, D)).unwrap()).unwrap() * score as f64).unwrap();
    assert!(max_diff(&y.reshape((1, D)).unwrap(), &expected) <= 1e-6);
}

/// The routed scaling factor multiplies once (not again after renormalisation or in the
/// shared path).
#[test]
fn routed_scale_is_applied_once() {
    let mut rng = Rng::new(8);
    let x = randn(&[1, 5, D], 1.0, &mut rng);
    let c = MoeConfig {
        scoring: Scoring::Sigmoid,
        norm_topk: true,
        d_shared: 3,
        ..base()
    };
    let one = layer(c, 9);
    let mut three = one.clone();
    three.config.routed_scale = 3.0;
    let shared = one.shared.as_ref().unwrap().forward(&x).unwrap();
    let routed_one = (one.forward(&x).unwrap().0 - &shared).unwrap();
    let routed_three = (three.forward(&x).unwrap().0 - &shared).unwrap();
    assert!(max_diff(&(routed_one * 3.0).unwrap(), &routed_three) <= 1e-5);
}

/// Renormalising the chosen weights stays finite when every score underflows to 0.
#[test]
fn renormalisation_survives_underflow() {
    let c = MoeConfig {
        scoring: Scoring::Sigmoid,
        norm_topk: true,
        ..base()
    };
    let mut m = layer(c, 10);
    m.router = (m.router.ones_like().unwrap() * -1e4).unwrap(); // sigmoid(-huge) = 0
    let mut rng = Rng::new(11);
    let x = randn(&[1, 3, D], 1.0, &mut rng).abs().unwrap();
    let (y, _) = m.forward(&x).unwrap();
    let v = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(v.iter().all(|f| f.is_finite()), "{v:?}");
}

/// With a capacity limit, assignments past it are dropped: a token whose every choice was
/// dropped gets exactly zero from the layer (its block output equals its input).
#[test]
fn dropped_tokens_pass_through() {
    let c = MoeConfig {
        top_k: 1,
        capacity_factor: Some(0.5),
        ..base()
    };
    let mut m = layer(c, 12);
    // make expert 0 everyone's first choice
    let mut r = m.router.to_vec2::<f32>().unwrap();
    r[0] = vec![0.0; D];
    for row in r.iter_mut().skip(1) {
        row.iter_mut().for_each(|v| *v = -50.0);
    }
    m.router = Tensor::new(r, &Device::Cpu).unwrap();
    let mut rng = Rng::new(13);
    let x = randn(&[1, 12, D], 1.0, &mut rng).abs().unwrap(); // positive: expert 0 always wins
    let (y, stats) = m.forward(&x).unwrap();
    let cap = (0.5f64 * 12.0 / 6.0).ceil() as usize; // 1
    assert_eq!(stats.load[0], cap);
    assert_eq!(stats.dropped, 12 - cap);
    for t in cap..12 {
        let row = y
            .i((0, t))
            .unwrap()
            .abs()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(row, 0.0, "token {t} was dropped but got an update");
    }
}

/// The balancing loss is E·Σ f·P: with uniform probabilities and a perfectly even load it is
/// exactly the coefficient, and it reaches the router by gradient.
#[test]
fn balancing_loss_value_and_gradient() {
    let c = MoeConfig {
        aux_loss_coef: 0.01,
        z_loss_coef: 0.0,
        top_k: 1,
        n_experts: 2,
        ..base()
    };
    let mut m = layer(c, 14);
    let var =
        candle_core::Var::from_tensor(&Tensor::zeros((2, D), DType::F32, &Device::Cpu).unwrap())
            .unwrap();
    m.router = var.as_tensor().clone();
    // with a zero router every token ties: ties go to expert 0, so f = (1, 0), P = (0.5, 0.5)
    let mut rng = Rng::new(15);
    let x = randn(&[1, 4, D], 1.0, &mut rng);
    let (_, s) = m.forward(&x).unwrap();
    let aux = s.aux_loss.unwrap();
    assert!((aux.to_scalar::<f32>().unwrap() - 0.01 * 2.0 * 0.5).abs() < 1e-7);
    let g = aux.backward().unwrap();
    let gr = g
        .get(var.as_tensor())
        .expect("router gets a gradient")
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(gr > 0.0);
}

/// Auxiliary-loss-free balancing moves a skewed load toward uniform.
#[test]
fn selection_bias_updates_balance_a_skewed_router() {
    let c = MoeConfig {
        scoring: Scoring::Sigmoid,
        selection_bias: true,
        top_k: 1,
        n_experts: 4,
        ..base()
    };
    let mut m = layer(c, 20);
    // expert 0 is everyone's favourite
    let mut r = m.router.to_vec2::<f32>().unwrap();
    r[0].iter_mut().for_each(|v| *v = 1.0);
    m.router = Tensor::new(r, &Device::Cpu).unwrap();
    let mut rng = Rng::new(21);
    let x = randn(&[1, 64, D], 1.0, &mut rng).abs().unwrap();
    let mut bias = vec![0f32; 4];
    let spread = |load: &[usize]| {
        *load.iter().max().unwrap() as f64 / (load.iter().sum::<usize>() as f64 / load.len() as f64)
    };
    m.selection_bias = Some(Tensor::new(bias.as_slice(), &Device::Cpu).unwrap());
    let first = spread(&m.forward(&x).unwrap().1.load);
    let mut spreads = Vec::new();
    for _ in 0..400 {
        let load = m.forward(&x).unwrap().1.load;
        spreads.push(spread(&load));
        routelm::routing::update_selection_bias(&mut bias, &load, 0.005);
        m.selection_bias = Some(Tensor::new(bias.as_slice(), &Device::Cpu).unwrap());
    }
    // sign updates settle into a small oscillation: judge the average of the last 50 steps
    let last = spreads[spreads.len() - 50..].iter().sum::<f64>() / 50.0;
    assert!(first > 2.5, "the toy router is not skewed: {first}");
    assert!(
        last < 1.5,
        "load spread {first} -> {last} (last 50 steps: {:?})",
        &spreads[spreads.len() - 50..]
    );
}

/// Expert choice, slowly: per sequence, each expert takes the tokens that score it highest
/// (scores in f64), and each token sums the outputs of the experts that took it.
fn reference_expert_choice(m: &MoeLayer, x: &Tensor) -> Tensor {
    let c = m.config;
    let (b, t) = (x.dims()[0], x.dims()[1]);
    let xs = x.reshape((b * t, D)).unwrap();
    let w = m
        .router
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    let xv = xs.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
    let scores: Vec<Vec<f64>> = xv
        .iter()
        .map(|x| {
            let l: Vec<f64> = w
                .iter()
                .map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum())
                .collect();
            match c.scoring {
                Scoring::Sigmoid => l.iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect(),
                _ => {
                    let z: f64 = l.iter().map(|v| v.exp()).sum();
                    l.iter().map(|v| v.exp() / z).collect()
                }
            }
        })
        .collect();
    let per = ((c.capacity_factor.unwrap_or(1.0) * (t * c.top_k) as f64) / c.n_experts as f64)
        .ceil() as usize;
    let mut rows: Vec<Tensor> = (0..b * t)
        .map(|_| Tensor::zeros((1, D), DType::F32, &Device::Cpu).unwrap())
        .collect();
    for bi in 0..b {
        for (e, expert) in m.experts.iter().enumerate() {
            let mut tokens: Vec<usize> = (bi * t..(bi + 1) * t).collect();
            tokens.sort_by(|&i, &j| scores[j][e].partial_cmp(&scores[i][e]).unwrap());
            for &i in &tokens[..per.min(t)] {
                let y = expert.forward(&xs.i(i..i + 1).unwrap()).unwrap();
                rows[i] = (&rows[i] + (y * scores[i][e]).unwrap()).unwrap();
            }
        }
    }
    for (i, r) in rows.iter_mut().enumerate() {
        if let Some(s) = &m.shared {
            *r = (&*r + s.forward(&xs.i(i..i + 1).unwrap()).unwrap()).unwrap();
        }
    }
    Tensor::cat(&rows, 0).unwrap().reshape(x.dims()).unwrap()
}

#[test]
fn expert_choice_matches_the_slow_reference() {
    for (name, c) in [
        (
            "softmax",
            MoeConfig {
                expert_choice: true,
                ..base()
            },
        ),
        (
            "sigmoid, capacity factor 2, shared expert",
            MoeConfig {
                expert_choice: true,
                scoring: Scoring::Sigmoid,
                capacity_factor: Some(2.0),
                d_shared: 3,
                ..base()
            },
        ),
    ] {
        let m = layer(c, 11);
        let mut rng = Rng::new(12);
        let x = randn(&[2, 7, D], 1.0, &mut rng);
        let (y, stats) = m.forward(&x).unwrap();
        let d = max_diff(&y, &reference_expert_choice(&m, &x));
        assert!(d < 1e-5, "{name}: differs from the slow reference by {d}");
        // every expert takes the same number of tokens: perfectly balanced by construction
        assert!(
            stats.load.iter().all(|&l| l == stats.load[0]),
            "{:?}",
            stats.load
        );
    }
}

/// Expert choice is not causal: a model using it refuses to decode through a cache.
#[test]
fn expert_choice_refuses_to_sample() {
    let mut cfg = common::tiny(7);
    for m in cfg.layers.iter_mut().filter_map(|l| l.moe.as_mut()) {
        m.expert_choice = true;
        m.selection_bias = false;
        m.n_groups = 1;
        m.topk_groups = 1;
        m.scoring = Scoring::Softmax;
    }
    assert!(cfg.problems().is_empty(), "{:?}", cfg.problems());
    let p = routelm::model::init::init_params(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
    let model = routelm::Model::new(&cfg, &p, "t").unwrap();
    let ids = common::ids(&[1, 2, 3], 1);
    assert!(model.forward(&ids, None, false).is_ok());
    let mut cache = model.new_cache();
    let err = model
        .forward(&ids, Some(&mut cache), true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("expert choice"), "{err}");
}

/// Gradients reach the router through expert choice's weights: autograd equals central
/// finite differences (float64).
#[test]
fn expert_choice_router_gradient_matches_finite_differences() {
    let c = MoeConfig {
        expert_choice: true,
        ..base()
    };
    let mut m = layer(c, 13);
    let f64_ = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    let lin = |l: &Linear| Linear::new(f64_(&l.weight), None);
    for e in &mut m.experts {
        e.gate = e.gate.as_ref().map(lin);
        e.up = lin(&e.up);
        e.down = lin(&e.down);
    }
    let mut rng = Rng::new(14);
    let x = f64_(&randn(&[2, 6, D], 1.0, &mut rng));
    let r = f64_(&randn(&[2, 6, D], 1.0, &mut rng));
    let router = f64_(&m.router);
    let loss = |m: &MoeLayer| (m.forward(&x).unwrap().0 * &r).unwrap().sum_all().unwrap();
    let var = candle_core::Var::from_tensor(&router).unwrap();
    m.router = var.as_tensor().clone();
    let grads = loss(&m).backward().unwrap();
    let g = grads
        .get(var.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let flat = router.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    for i in [0, 7, 20, flat.len() - 1] {
        let at = |delta: f64| {
            let mut v = flat.clone();
            v[i] += delta;
            let mut m = m.clone();
            m.router = Tensor::from_vec(v, router.shape(), &Device::Cpu).unwrap();
            loss(&m).to_scalar::<f64>().unwrap()
        };
        let h = 1e-6;
        let fd = (at(h) - at(-h)) / (2.0 * h);
        assert!(
            (fd - g[i]).abs() < 1e-6 * (1.0 + fd.abs()),
            "router[{i}]: finite difference {fd}, autograd {}",
            g[i]
        );
        assert!(g[i] != 0.0, "router[{i}] gets no gradient");
    }
}

/// Experts held stacked, as the model holds them (one variable per kind of projection, each
/// expert's weights views of it; the grouped kernel), give the separate experts' output
/// (each expert's own products), and the stacked variables get the separate experts'
/// gradients in stacking order. The two paths sum in different orders: 1e-5.
#[test]
fn stacked_experts_match_separate_experts() {
    let c = base();
    let de = c.d_expert;
    let m = layer(c, 21);
    let var = |t: &Tensor| candle_core::Var::from_tensor(t).unwrap();
    let mut separate = m.clone();
    let mut vars = Vec::new();
    for e in &mut separate.experts {
        for l in e.linears_mut() {
            let v = var(&l.weight);
            l.weight = v.as_tensor().clone();
            vars.push(v);
        }
    }
    // linears_mut order per expert: gate, up, down
    let pick =
        |k: usize| -> Vec<Tensor> { vars.chunks(3).map(|v| v[k].as_tensor().detach()).collect() };
    let (gates, ups, downs) = (pick(0), pick(1), pick(2));
    let gate_up: Vec<Tensor> = gates
        .iter()
        .zip(&ups)
        .flat_map(|(g, u)| [g.clone(), u.clone()])
        .collect();
    let gu = var(&Tensor::cat(&gate_up, 0).unwrap());
    let dn = var(&Tensor::cat(&downs, 0).unwrap());
    let mut stacked = m.clone();
    for (e, ex) in stacked.experts.iter_mut().enumerate() {
        ex.gate.as_mut().unwrap().weight = gu.as_tensor().narrow(0, 2 * e * de, de).unwrap();
        ex.up.weight = gu.as_tensor().narrow(0, (2 * e + 1) * de, de).unwrap();
        ex.down.weight = dn.as_tensor().narrow(0, e * D, D).unwrap();
    }
    stacked.stacked = routelm::routing::StackedExperts {
        gate_up: Some(gu.as_tensor().clone()),
        down: Some(dn.as_tensor().clone()),
    };
    let mut rng = Rng::new(22);
    let x = randn(&[2, 5, D], 1.0, &mut rng);
    let r = randn(&[2, 5, D], 1.0, &mut rng);
    let (ya, _) = separate.forward(&x).unwrap();
    let (yb, _) = stacked.forward(&x).unwrap();
    assert!(max_diff(&ya, &yb) <= 1e-5, "{}", max_diff(&ya, &yb));
    let ga = (ya * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let gb = (yb * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let grad = |v: &candle_core::Var| ga.get(v.as_tensor()).unwrap().clone();
    let want_gu: Vec<Tensor> = vars
        .chunks(3)
        .flat_map(|v| [grad(&v[0]), grad(&v[1])])
        .collect();
    let want_dn: Vec<Tensor> = vars.chunks(3).map(|v| grad(&v[2])).collect();
    for (want, got) in [(want_gu, &gu), (want_dn, &dn)] {
        let want = Tensor::cat(&want, 0).unwrap();
        let got = gb.get(got.as_tensor()).unwrap();
        assert!(max_abs(&want) > 1e-3, "no gradient reached the experts");
        assert!(max_diff(&want, got) <= 1e-5, "{}", max_diff(&want, got));
    }
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Under a gradient sink (as each training shard runs), the fused SwiGLU op hands its
/// weight gradients to the sink instead of the backward pass: the same values as the
/// backward pass gives without a sink, summed over two uses, and the input's gradient
/// unchanged.
#[test]
fn gradient_sink_collects_the_fused_ops_weight_gradients() {
    use routelm::nn::grouped::{grouped_swiglu, with_grad_sink, GradSink};
    let mut rng = Rng::new(50);
    let var = |t: Tensor| candle_core::Var::from_tensor(&t).unwrap();
    let x = var(randn(&[11, D], 1.0, &mut rng));
    let gu = var(randn(&[3 * 2 * 4, D], 0.5, &mut rng));
    let dn = var(randn(&[3 * D, 4], 0.5, &mut rng));
    let r = randn(&[11, D], 1.0, &mut rng);
    let offsets = [0usize, 4, 4, 11];
    // the op used twice, so the sink sums two contributions per weight
    let op = || {
        grouped_swiglu(
            x.as_tensor(),
            gu.as_tensor(),
            dn.as_tensor(),
            &offsets,
            false,
        )
        .unwrap()
    };
    let loss = || {
        let (y, y2) = (op(), op());
        ((y * &r).unwrap().sum_all().unwrap() + (y2 * 0.5).unwrap().sum_all().unwrap()).unwrap()
    };
    let plain = loss().backward().unwrap();
    let sink = std::sync::Arc::new(GradSink::default());
    let sunk = with_grad_sink(&sink, loss).backward().unwrap();
    for w in [&gu, &dn] {
        assert!(
            sunk.get(w.as_tensor()).is_none(),
            "the sink takes the weight gradient"
        );
        let got = sink
            .take(w.as_tensor())
            .expect("the sink has the weight gradient");
        let want = plain.get(w.as_tensor()).unwrap();
        assert!(max_diff(&got, want) < 1e-5, "{}", max_diff(&got, want));
        assert!(max_abs(want) > 1e-3);
    }
    let (a, b) = (
        plain.get(x.as_tensor()).unwrap(),
        sunk.get(x.as_tensor()).unwrap(),
    );
    assert!(max_diff(a, b) < 1e-6);
}

/// Random selection (the ablation of learned routing): each token goes to `top_k` distinct
/// experts drawn at random, each weighted `routed_scale / top_k`, whatever the router
/// says; the draws change from one forward pass to the next and spread evenly; no
/// auxiliary loss; the output is the chosen experts' weighted sum (checked token by token).
#[test]
fn random_selection_ignores_the_router() {
    use routelm::config::Selection;
    let c = MoeConfig {
        selection: Selection::Random,
        routed_scale: 1.5,
        aux_loss_coef: 0.01,
        ..base()
    };
    let m = layer(c, 7);
    let mut rng = Rng::new(3);
    let x = randn(&[1, 96, D], 1.0, &mut rng);
    let (y, stats) = m.forward(&x).unwrap();
    assert!(stats.aux_loss.is_none());
    let xs = x.reshape((96, D)).unwrap();
    let mut load = [0usize; 6];
    for (t, experts) in stats.token_experts.iter().enumerate() {
        assert_eq!(experts.len(), 2, "token {t}: {experts:?}");
        assert_ne!(experts[0], experts[1], "token {t}: {experts:?}");
        let xt = xs.i(t..t + 1).unwrap();
        let mut want = Tensor::zeros((1, D), DType::F32, &Device::Cpu).unwrap();
        for &e in experts {
            load[e as usize] += 1;
            let f = m.experts[e as usize].forward(&xt).unwrap();
            want = (want + (f * (1.5 / 2.0)).unwrap()).unwrap();
        }
        let got = y.i((0, t..t + 1)).unwrap();
        assert!(max_diff(&got, &want) < 1e-5, "token {t}");
    }
    // 192 assignments over 6 experts: 32 each expected
    assert!(load.iter().all(|&l| (12..=56).contains(&l)), "{load:?}");
    // the draws are a function of the pass's inputs (a run reproduces and resumes
    // exactly), not of which experts the router scores highest
    let (_, again) = m.forward(&x).unwrap();
    assert_eq!(stats.token_experts, again.token_experts);
    let learned = layer(
        MoeConfig {
            selection: Selection::Learned,
            ..c
        },
        7,
    );
    let (_, by_router) = learned.forward(&x).unwrap();
    let same = stats
        .token_experts
        .iter()
        .zip(&by_router.token_experts)
        .filter(|(a, b)| {
            let mut b = b.to_vec();
            b.sort_unstable();
            **a == b
        })
        .count();
    // 1 in 15 pairs of 6 experts by chance: about 6 of 96
    assert!(
        same < 20,
        "{same} of 96 tokens got the router's own experts"
    );
    // a token decoded alone goes through the same arithmetic
    let (y1, s1) = m.forward_with(&x.i((.., 0..1)).unwrap(), false).unwrap();
    let e = &s1.token_experts[0];
    let x0 = xs.i(0..1).unwrap();
    let want = e.iter().fold(
        Tensor::zeros((1, D), DType::F32, &Device::Cpu).unwrap(),
        |acc, &e| (acc + (m.experts[e as usize].forward(&x0).unwrap() * 0.75).unwrap()).unwrap(),
    );
    assert!(max_diff(&y1.reshape((1, D)).unwrap(), &want) < 1e-5);
}

/// A training shard's pass started on a thread outside rayon's pool (a library caller's own
/// thread) stays on that thread while it runs under a gradient sink: the sink is kept per
/// thread, and the fused experts' weight gradients must reach it, not the backward pass.
#[test]
fn a_gradient_sink_on_a_thread_outside_the_pool_gets_the_experts_gradients() {
    use routelm::nn::grouped::{with_grad_sink, GradSink};
    assert!(rayon::current_thread_index().is_none(), "a test thread");
    let cfg = common::tiny(8);
    let mut params = routelm::model::init::init_params(&cfg, 3, DType::F32, &Device::Cpu).unwrap();
    // each stack one variable, as the trainer holds them (the model's parts are views)
    let mut stacked = Vec::new();
    for s in routelm::weights::names::param_stacks(&cfg) {
        let parts: Vec<Tensor> = s.parts.iter().map(|n| params.remove(n).unwrap()).collect();
        let var = candle_core::Var::from_tensor(&Tensor::cat(&parts, 0).unwrap()).unwrap();
        params.insert(s.name.clone(), var.as_tensor().clone());
        stacked.push((s.name, var));
    }
    assert!(!stacked.is_empty(), "a model with stacked experts");
    let model = routelm::model::Model::new(&cfg, &params, "test").unwrap();
    let x = common::ids(&[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8], 2);
    let y = common::ids(&[1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9], 2);
    let sink = std::sync::Arc::new(GradSink::default());
    let loss = with_grad_sink(&sink, || model.loss(&x, &y).unwrap().total);
    let store = loss.backward().unwrap();
    for (name, var) in &stacked {
        let w = var.as_tensor();
        let g = sink.take(w);
        assert!(g.is_some(), "{name}: the sink has its gradient");
        assert!(store.get(w).is_none(), "{name}: the backward pass does not");
    }
}

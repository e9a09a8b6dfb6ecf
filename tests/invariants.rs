//! Invariants of the model: causality, KV-cache decoding equals the full forward,
//! save → load gives identical logits, same seed gives the same weights.

mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::{ids, max_abs_diff, tiny, VARIANTS};
use routelm::model::{init::init_params, ForwardOptions, Model};
use routelm::routing::DepthDecision;

/// A full forward with causal decisions in routed (Mixture-of-Depths) blocks: each token by
/// its own router logit, as sampling decides. (Top-k routing looks at the whole sequence.)
fn causal(m: &Model, ids: &Tensor) -> Tensor {
    let opts = ForwardOptions {
        depth: Some(DepthDecision::Threshold),
        ..Default::default()
    };
    m.forward_with(ids, None, opts).unwrap().logits
}

fn model(variant: usize, seed: u64) -> Model {
    let cfg = tiny(variant);
    let p = init_params(&cfg, seed, DType::F32, &Device::Cpu).unwrap();
    Model::new(&cfg, &p, "test").unwrap()
}

const SEQ: [u32; 10] = [5, 17, 3, 39, 22, 8, 0, 31, 12, 7];

#[test]
fn changing_a_later_token_leaves_earlier_logits_unchanged() {
    for v in 0..VARIANTS {
        let m = model(v, 1);
        let a = causal(&m, &ids(&SEQ, 1));
        for t in [3usize, 9] {
            let mut s = SEQ;
            s[t] = (s[t] + 1) % 40;
            let b = causal(&m, &ids(&s, 1));
            let before = max_abs_diff(&a.i((.., ..t, ..)).unwrap(), &b.i((.., ..t, ..)).unwrap());
            // dense models: bit-identical. MoE: a later token's routing changes how many rows
            // each expert multiplies at once, which changes float rounding (≈1e-7), not values.
            let tol = if m.config.moe_layers().next().is_some() {
                1e-5
            } else {
                0.0
            };
            assert!(
                before <= tol,
                "variant {v}: changing token {t} moved earlier logits by {before}"
            );
            let at = max_abs_diff(&a.i((.., t, ..)).unwrap(), &b.i((.., t, ..)).unwrap());
            assert!(
                at > 1e-4,
                "variant {v}: changing token {t} did not change its own logits"
            );
        }
    }
}

#[test]
fn kv_cache_decoding_equals_full_forward() {
    for v in 0..VARIANTS {
        let m = model(v, 2);
        let batch: Vec<u32> = SEQ.iter().chain(SEQ.iter().rev()).copied().collect();
        // routed blocks decode one sequence at a time: test the rows separately
        let rows: Vec<Tensor> = if m.config.depth_layers().next().is_some() {
            vec![ids(&SEQ, 1), ids(&batch[SEQ.len()..], 1)]
        } else {
            vec![ids(&batch, 2)]
        };
        for x in rows {
            let full = causal(&m, &x);
            // prefill 4 tokens, then one token at a time (the cache grows past its first capacity
            // only for longer sequences; capacity growth is covered by the long test below)
            let mut cache = m.new_cache();
            let first = m
                .forward(&x.i((.., ..4)).unwrap(), Some(&mut cache), false)
                .unwrap()
                .logits;
            let mut parts = vec![first];
            for t in 4..SEQ.len() {
                parts.push(
                    m.forward(&x.i((.., t..t + 1)).unwrap(), Some(&mut cache), false)
                        .unwrap()
                        .logits,
                );
            }
            let inc = Tensor::cat(&parts, 1).unwrap();
            let d = max_abs_diff(&full, &inc);
            assert!(
                d <= 1e-5,
                "variant {v}: cached decoding differs from the full forward by {d}"
            );
        }
    }
}

#[test]
fn kv_cache_survives_growth_past_initial_capacity() {
    let mut cfg = tiny(2);
    cfg.max_seq_len = 40;
    assert!(cfg.problems().is_empty(), "{:?}", cfg.problems());
    let p = init_params(&cfg, 3, DType::F32, &Device::Cpu).unwrap();
    let m = Model::new(&cfg, &p, "test").unwrap();
    let seq: Vec<u32> = (0..40).map(|i| (i * 7 % 40) as u32).collect();
    let full = m.forward(&ids(&seq, 1), None, false).unwrap().logits;
    let mut cache = m.new_cache();
    let mut parts = Vec::new();
    for t in 0..seq.len() {
        parts.push(
            m.forward(&ids(&seq[t..t + 1], 1), Some(&mut cache), false)
                .unwrap()
                .logits,
        );
    }
    let d = max_abs_diff(&full, &Tensor::cat(&parts, 1).unwrap());
    assert!(d <= 1e-5, "{d}");
    // and the context window is enforced
    let err = m
        .forward(&ids(&[1], 1), Some(&mut cache), false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("context window of 40"), "{err}");
}

#[test]
fn save_then_load_gives_identical_logits() {
    let dir = tempdir("saveload");
    for v in 0..VARIANTS {
        let cfg = tiny(v);
        let p = init_params(&cfg, 4, DType::F32, &Device::Cpu).unwrap();
        let m = Model::new(&cfg, &p, "test").unwrap();
        routelm::weights::save_model_dir(&dir, &cfg, &p).unwrap();
        let (_, back_cfg, back_p) =
            routelm::arch::load_params(&dir, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(back_cfg, cfg);
        let back = Model::new(&back_cfg, &back_p, "test").unwrap();
        let a = m.forward(&ids(&SEQ, 2), None, false).unwrap().logits;
        let b = back.forward(&ids(&SEQ, 2), None, false).unwrap().logits;
        assert_eq!(max_abs_diff(&a, &b), 0.0, "variant {v}");
        // loaded for inference, the projections are read in place from the file: the
        // same weights, summed in another order
        let mapped = routelm::arch::load_dir(&dir, DType::F32, &Device::Cpu)
            .unwrap()
            .model;
        assert_eq!(mapped.config, cfg);
        for rows in [&SEQ[..], &SEQ[..1]] {
            let a = m.forward(&ids(rows, 1), None, false).unwrap().logits;
            let c = mapped.forward(&ids(rows, 1), None, false).unwrap().logits;
            assert!(
                max_abs_diff(&a, &c) <= 1e-5,
                "variant {v}: {}",
                max_abs_diff(&a, &c)
            );
        }
    }
}

#[test]
fn same_seed_same_weights_other_seed_other_weights() {
    let cfg = tiny(0);
    let a = init_params(&cfg, 9, DType::F32, &Device::Cpu).unwrap();
    let b = init_params(&cfg, 9, DType::F32, &Device::Cpu).unwrap();
    let c = init_params(&cfg, 10, DType::F32, &Device::Cpu).unwrap();
    let w = "model.layers.0.self_attn.q_proj.weight";
    assert_eq!(max_abs_diff(&a[w], &b[w]), 0.0);
    assert!(max_abs_diff(&a[w], &c[w]) > 0.0);
}

#[test]
fn out_of_range_token_is_an_error() {
    let m = model(0, 1);
    let err = m
        .forward(&ids(&[1, 40], 1), None, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("token id 40 is out of range"), "{err}");
}

pub fn tempdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("routelm-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Continuous batching: prompts of different lengths prefilled together (right-padded),
/// then fed one token each per batched pass, each sequence with its own cache, give the
/// logits and routes of each sequence fed alone; with caches in the compute type and in f16.
#[test]
fn batched_decoding_equals_each_sequence_alone() {
    use routelm::model::{Cache, TokenRoute};
    for (v, kv) in (0..VARIANTS).flat_map(|v| [(v, None), (v, Some(DType::F16))]) {
        let mut m = model(v, 3);
        m.set_kv_cache_dtype(kv);
        let prompts: [&[u32]; 3] = [&SEQ[..2], &SEQ[3..8], &SEQ[1..4]];
        let mut alone: Vec<Cache> = prompts.iter().map(|_| m.new_cache()).collect();
        let firsts: Vec<_> = prompts
            .iter()
            .zip(alone.iter_mut())
            .map(|(p, c)| m.forward(&ids(p, 1), Some(c), true).unwrap())
            .collect();
        let (mut batch, logits, routes) = m.prefill_batch(&prompts).unwrap();
        for (i, (out, p)) in firsts.iter().zip(&prompts).enumerate() {
            let d = max_abs_diff(
                &out.logits.reshape((1, 40)).unwrap(),
                &logits.i(i..i + 1).unwrap(),
            );
            assert!(
                d <= 1e-5,
                "variant {v} (cache {kv:?}), prompt {i}: prefilled logits differ by {d}"
            );
            assert_eq!(routes[i], TokenRoute::of_last(&out.moe, &out.depth));
            assert_eq!(batch[i].pos(), p.len());
        }
        let mut saw_route = false;
        for step in 0..3u32 {
            let tokens: Vec<u32> = (0..3u32).map(|i| (7 * i + 11 * step + 1) % 40).collect();
            let mut refs: Vec<&mut Cache> = batch.iter_mut().collect();
            let (logits, routes) = m.decode_batch(&tokens, &mut refs).unwrap();
            assert_eq!(logits.dims(), &[3, 40]);
            for (i, (&t, c)) in tokens.iter().zip(alone.iter_mut()).enumerate() {
                let out = m.forward(&ids(&[t], 1), Some(c), true).unwrap();
                let d = max_abs_diff(
                    &out.logits.reshape((1, 40)).unwrap(),
                    &logits.i(i..i + 1).unwrap(),
                );
                assert!(
                    d <= 1e-5,
                    "variant {v} (cache {kv:?}), step {step}, row {i}: batched logits differ by {d}"
                );
                let want = TokenRoute::of_last(&out.moe, &out.depth);
                assert_eq!(
                    routes[i], want,
                    "variant {v} (cache {kv:?}), step {step}, row {i}: routes differ"
                );
                saw_route |= !want.experts.is_empty() || !want.blocks.is_empty();
            }
            for (a, b) in alone.iter().zip(&batch) {
                assert_eq!(a.pos(), b.pos());
            }
        }
        let routed =
            m.config.moe_layers().next().is_some() || m.config.depth_layers().next().is_some();
        assert_eq!(
            saw_route, routed,
            "variant {v} (cache {kv:?}): routes reported for a routed model only"
        );
    }
}

/// Caches holding keys and values in f16: half the bytes a token costs; decoding token by
/// token stays within f16's rounding of the uncached forward (and is not bit-equal to the
/// f32 cache's, so the cache really holds f16). (Batched against alone with f16 caches:
/// `batched_decoding_equals_each_sequence_alone`.)
#[test]
fn f16_caches_decode_within_rounding() {
    use routelm::model::Cache;
    for v in 0..VARIANTS {
        let mut m = model(v, 5);
        if m.config.encoder_layers > 0 {
            continue;
        }
        let full = causal(&m, &ids(&SEQ[..6], 1));
        let step_by_step = |m: &Model| -> (Tensor, Cache) {
            let mut c = m.new_cache();
            let rows: Vec<Tensor> = SEQ[..6]
                .iter()
                .map(|&t| {
                    let out = m.forward(&ids(&[t], 1), Some(&mut c), true).unwrap();
                    out.logits.reshape((1, 40)).unwrap()
                })
                .collect();
            (Tensor::cat(&rows, 0).unwrap(), c)
        };
        let (f32_steps, f32_cache) = step_by_step(&m);
        m.set_kv_cache_dtype(Some(DType::F16));
        let (f16_steps, f16_cache) = step_by_step(&m);
        let full = full.reshape((6, 40)).unwrap();
        let scale = 1.0 + max_abs_diff(&full, &full.zeros_like().unwrap());
        let (d32, d16) = (
            max_abs_diff(&f32_steps, &full),
            max_abs_diff(&f16_steps, &full),
        );
        assert!(d32 <= 1e-4 * scale, "variant {v}: f32 cache off by {d32}");
        assert!(
            d16 <= 1.5e-3 * scale,
            "variant {v}: f16 cache off by {d16} (logits up to {scale})"
        );
        let held = |c: &Cache| c.layers.iter().map(|l| l.bytes_per_token()).sum::<usize>();
        // (latent attention keeps its latent rows as computed)
        if m.config.mla.is_none() {
            assert_eq!(held(&f16_cache) * 2, held(&f32_cache), "variant {v}");
            assert!(d16 != d32, "variant {v}: the f16 cache changed nothing");
        }
    }
}

/// A chat session's later turn prefills only what it adds, through the cache of the earlier
/// turns, and gets the logits of a fresh prefill of the whole conversation; a prompt that
/// parts from what the cache holds goes back to the common prefix (or, for a routed model,
/// starts over) with the same result.
#[test]
fn session_turns_reuse_the_cache_and_equal_a_fresh_prefill() {
    use routelm::generate::Session;
    for v in 0..VARIANTS {
        let m = model(v, 4);
        if m.config.encoder_layers > 0 {
            continue;
        }
        let fresh = |p: &[u32]| {
            let l = causal(&m, &ids(p, 1));
            l.i((.., p.len() - 1, ..)).unwrap()
        };
        let mut s = Session::new(&m);
        let turn1 = &SEQ[..4];
        let (_, reused) = s.prefill(&m, turn1).unwrap();
        assert_eq!(reused, 0);
        // the next turn extends the first
        let turn2 = &SEQ[..8];
        let (logits, reused) = s.prefill(&m, turn2).unwrap();
        assert_eq!(reused, 4, "variant {v}");
        let d = max_abs_diff(&logits.reshape((1, 40)).unwrap(), &fresh(turn2));
        assert!(
            d <= 1e-5,
            "variant {v}: extended turn differs from a fresh prefill by {d}"
        );
        // a turn that parts from the cache after 6 tokens
        let mut turn3 = SEQ[..10].to_vec();
        turn3[6] = (turn3[6] + 1) % 40;
        let (logits, reused) = s.prefill(&m, &turn3).unwrap();
        let routed = m.config.depth_layers().next().is_some();
        assert_eq!(reused, if routed { 0 } else { 6 }, "variant {v}");
        let d = max_abs_diff(&logits.reshape((1, 40)).unwrap(), &fresh(&turn3));
        assert!(
            d <= 1e-5,
            "variant {v}: diverging turn differs from a fresh prefill by {d}"
        );
        assert_eq!(s.fed, turn3);
        assert_eq!(s.cache.pos(), turn3.len());
    }
}

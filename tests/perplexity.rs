//! Perplexity follows llama-perplexity's protocol: chunks of `ctx` tokens, each chunk's
//! first token replaced by BOS, only positions `ctx/2 .. ctx-1` scored (each predicting the
//! next token), `exp(mean NLL)`. Checked against a slow f64 recomputation from the logits.

mod common;

use candle_core::{DType, Device, Tensor};
use routelm::model::init::init_params;
use routelm::perplexity::perplexity;
use routelm::Model;

fn model() -> Model {
    let cfg = common::tiny(0);
    let p = init_params(&cfg, 7, DType::F32, &Device::Cpu).unwrap();
    Model::new(&cfg, &p, "tiny").unwrap()
}

/// The protocol by hand: per chunk, log-softmax in f64 of each scored row.
fn by_hand(m: &Model, tokens: &[u32], ctx: usize, bos: Option<u32>, chunks: usize) -> f64 {
    let (mut nll, mut n) = (0f64, 0usize);
    for c in 0..chunks {
        let mut chunk = tokens[c * ctx..(c + 1) * ctx].to_vec();
        if let Some(b) = bos {
            chunk[0] = b;
        }
        let ids = Tensor::new(chunk.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits: Vec<Vec<f32>> = m
            .forward(&ids, None, false)
            .unwrap()
            .logits
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        for i in ctx / 2..ctx - 1 {
            let row = &logits[i];
            let max = row.iter().fold(f64::MIN, |a, &v| a.max(v as f64));
            let lse = max
                + row
                    .iter()
                    .map(|&v| (v as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            nll += lse - row[chunk[i + 1] as usize] as f64;
            n += 1;
        }
    }
    (nll / n as f64).exp()
}

#[test]
fn perplexity_follows_llama_perplexity_protocol() {
    let m = model();
    let tokens: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % 40).collect();
    for (ctx, bos, chunks) in [(8, None, None), (8, Some(1), None), (12, Some(2), Some(2))] {
        let mut seen = 0;
        let r = perplexity(&m, &tokens, ctx, bos, chunks, &mut |_| seen += 1).unwrap();
        let n = chunks.unwrap_or(tokens.len() / ctx);
        assert_eq!((r.chunks, seen), (n, n));
        assert_eq!(r.scored, n * (ctx - 1 - ctx / 2));
        let want = by_hand(&m, &tokens, ctx, bos, n);
        let rel = (r.value() - want).abs() / want;
        assert!(rel < 1e-5, "ctx {ctx} bos {bos:?}: {} vs {want}", r.value());
    }
    // BOS replaces each chunk's first token, and that changes the result
    let a = perplexity(&m, &tokens, 8, None, None, &mut |_| {}).unwrap();
    let b = perplexity(&m, &tokens, 8, Some(1), None, &mut |_| {}).unwrap();
    assert_ne!(a.value(), b.value());
}

#[test]
fn perplexity_refuses_what_it_cannot_measure() {
    let m = model();
    let tokens: Vec<u32> = (0..10).collect();
    let err = perplexity(&m, &tokens, 64, None, None, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("context of 12"), "{err}");
    let err = perplexity(&m, &tokens, 11, None, None, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("do not fill one chunk"), "{err}");
}

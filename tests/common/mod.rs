//! Shared helpers for the integration tests: tiny configurations covering every layer
//! option, and tensor comparisons.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use routelm::config::{FfnKind, ModelConfigFile, NormKind};
use routelm::ModelConfig;

/// A tiny config; `variant` picks the layer options so that together they cover every
/// norm, FFN kind, position scheme, head layout and bias setting.
pub fn tiny(variant: usize) -> ModelConfig {
    let mut f = ModelConfigFile {
        vocab_size: Some(40),
        d_model: Some(16),
        n_layers: Some(2),
        n_heads: Some(4),
        max_seq_len: Some(12),
        d_ff: Some(24),
        init_std: Some(0.3),
        ..Default::default()
    };
    match variant {
        0 => {} // Llama-like: RMSNorm, SwiGLU, RoPE, MHA, tied
        1 => {
            // GPT-2-like: LayerNorm with bias, GELU, learned positions, biases, untied
            f.norm = Some(NormKind::LayerNorm);
            f.norm_bias = Some(true);
            f.ffn = Some(FfnKind::Gelu);
            f.position = Some("learned".into());
            f.qkv_bias = Some(true);
            f.out_bias = Some(true);
            f.ffn_bias = Some(true);
            f.tie_embeddings = Some(false);
        }
        2 => {
            // GQA with GeGLU, partial rotary, q/k/v biases
            f.n_kv_heads = Some(2);
            f.ffn = Some(FfnKind::Geglu);
            f.rotary_dim = Some(2);
            f.qkv_bias = Some(true);
        }
        3 => {
            // MQA, ReLU, no positions, LayerNorm without bias
            f.n_kv_heads = Some(1);
            f.ffn = Some(FfnKind::Relu);
            f.norm = Some(NormKind::LayerNorm);
            f.position = Some("none".into());
        }
        _ => panic!("no variant {variant}"),
    }
    f.resolve("tiny").unwrap()
}

pub const VARIANTS: usize = 4;

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

pub fn ids(v: &[u32], b: usize) -> Tensor {
    Tensor::from_slice(v, (b, v.len() / b), &Device::Cpu).unwrap()
}

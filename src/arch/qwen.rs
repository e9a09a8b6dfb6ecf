//! Qwen2 (biased q/k/v projections) and Qwen3 (per-head q/k RMSNorm): Llama layout.

use super::llama::{self, Windows};
use super::RawConfig;
use crate::config::{ModelConfig, QkNorm};

pub fn config_qwen2(raw: &RawConfig) -> ModelConfig {
    let mut c = llama::base(raw);
    c.layers = llama::windows(raw, c.n_layers, Windows::FromMaxWindowLayers);
    c.qkv_bias = true;
    c.out_bias = false;
    c
}

pub fn config_qwen3(raw: &RawConfig) -> ModelConfig {
    let mut c = llama::base(raw);
    c.layers = llama::windows(raw, c.n_layers, Windows::FromMaxWindowLayers);
    c.qk_norm = QkNorm::PerHead;
    c
}

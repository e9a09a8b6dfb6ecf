//! Qwen2 (biased q/k/v projections) and Qwen3 (per-head q/k RMSNorm): Llama layout.

use super::{llama, RawConfig};
use crate::config::{ModelConfig, QkNorm};

pub fn config_qwen2(raw: &RawConfig) -> ModelConfig {
    let mut c = llama::base(raw);
    c.qkv_bias = true;
    c.out_bias = false;
    c
}

pub fn config_qwen3(raw: &RawConfig) -> ModelConfig {
    let mut c = llama::base(raw);
    c.qk_norm = QkNorm::PerHead;
    c
}

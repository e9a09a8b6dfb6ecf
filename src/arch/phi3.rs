//! Phi-3: Llama layout with fused `qkv_proj` ([q; k; v] rows) and `gate_up_proj`
//! ([gate; up] rows), split at load.

use super::{llama, RawConfig, TensorMap};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::weights::Params;

pub fn config(raw: &RawConfig) -> ModelConfig {
    let mut c = llama::base(raw);
    c.layers = llama::windows(raw, c.n_layers, llama::Windows::Every);
    c
}

pub fn tensors(cfg: &ModelConfig, map: &mut TensorMap) -> Result<Params> {
    let mut out = Params::new();
    for l in 0..cfg.n_layers {
        let p = format!("model.layers.{l}");
        let attn = |proj: &str, n| (format!("{p}.self_attn.{proj}.weight"), n);
        map.split_rows(
            &mut out,
            &format!("{p}.self_attn.qkv_proj.weight"),
            &[
                attn("q_proj", cfg.q_dim()),
                attn("k_proj", cfg.kv_dim()),
                attn("v_proj", cfg.kv_dim()),
            ],
            false,
        )?;
        let mlp = |proj: &str| (format!("{p}.mlp.{proj}.weight"), cfg.d_ff);
        map.split_rows(
            &mut out,
            &format!("{p}.mlp.gate_up_proj.weight"),
            &[mlp("gate_proj"), mlp("up_proj")],
            false,
        )?;
    }
    map.take_canonical(cfg, &mut out);
    Ok(out)
}

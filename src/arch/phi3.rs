//! Phi-3: Llama layout with fused `qkv_proj` ([q; k; v] rows) and `gate_up_proj`
//! ([gate; up] rows), split at load.

use super::{llama, split, RawConfig, TensorMap};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::weights::Params;

pub fn config(raw: &RawConfig) -> ModelConfig {
    llama::base(raw)
}

pub fn tensors(cfg: &ModelConfig, map: &mut TensorMap) -> Result<Params> {
    let mut out = Params::new();
    for l in 0..cfg.n_layers {
        let p = format!("model.layers.{l}");
        if let Some(qkv) = map.take(&format!("{p}.self_attn.qkv_proj.weight")) {
            let parts = split(&qkv, 0, &[cfg.q_dim(), cfg.kv_dim(), cfg.kv_dim()])?;
            for (name, t) in ["q_proj", "k_proj", "v_proj"].iter().zip(parts) {
                out.insert(format!("{p}.self_attn.{name}.weight"), t);
            }
        }
        if let Some(gu) = map.take(&format!("{p}.mlp.gate_up_proj.weight")) {
            let parts = split(&gu, 0, &[cfg.d_ff, cfg.d_ff])?;
            for (name, t) in ["gate_proj", "up_proj"].iter().zip(parts) {
                out.insert(format!("{p}.mlp.{name}.weight"), t);
            }
        }
    }
    map.take_canonical(cfg, &mut out);
    Ok(out)
}

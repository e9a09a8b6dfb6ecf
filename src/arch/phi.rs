//! Phi-1/Phi-2: attention and MLP in parallel from one LayerNorm, partial rotary, biases
//! everywhere (a biased head too), GELU (tanh) MLP named `fc1`/`fc2`.

use super::{llama, RawConfig, TensorMap};
use crate::config::{BlockKind, ModelConfig};
use crate::error::Result;
use crate::weights::Params;

pub fn config(raw: &RawConfig) -> ModelConfig {
    let mut c = llama::layer_norm_base(raw);
    c.qkv_bias = true;
    c.out_bias = true;
    c.head_bias = true;
    c.block = BlockKind::ParallelSharedNorm;
    if raw.bool_or("qk_layernorm", false) {
        raw.problem("qk_layernorm is not supported yet".into());
    }
    c
}

pub fn tensors(cfg: &ModelConfig, map: &mut TensorMap) -> Result<Params> {
    let mut out = Params::new();
    for l in 0..cfg.n_layers {
        let p = format!("model.layers.{l}");
        for (from, to) in [
            ("self_attn.dense", "self_attn.o_proj"),
            ("mlp.fc1", "mlp.up_proj"),
            ("mlp.fc2", "mlp.down_proj"),
        ] {
            for kind in ["weight", "bias"] {
                map.rename(
                    &mut out,
                    &format!("{p}.{from}.{kind}"),
                    &format!("{p}.{to}.{kind}"),
                );
            }
        }
    }
    for kind in ["weight", "bias"] {
        map.rename(
            &mut out,
            &format!("model.final_layernorm.{kind}"),
            &format!("model.norm.{kind}"),
        );
    }
    map.take_canonical(cfg, &mut out);
    Ok(out)
}

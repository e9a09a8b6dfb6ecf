//! Phi-1/Phi-2: attention and MLP in parallel from one LayerNorm, partial rotary, biases
//! everywhere (a biased head too), GELU (tanh) MLP named `fc1`/`fc2`.

use super::{llama, RawConfig, TensorMap};
use crate::config::{BlockKind, ModelConfig, QkNorm};
use crate::error::Result;
use crate::weights::Params;

pub fn config(raw: &RawConfig) -> ModelConfig {
    let mut c = llama::layer_norm_base(raw);
    c.qkv_bias = true;
    c.out_bias = true;
    c.head_bias = true;
    c.block = BlockKind::ParallelSharedNorm;
    if raw.bool_or("qk_layernorm", false) {
        // LayerNorms (with bias) over each head's queries and keys, before rotary
        c.qk_norm = QkNorm::PerHead;
    }
    c
}

pub fn tensors(cfg: &ModelConfig, map: &mut TensorMap) -> Result<Params> {
    let mut out = Params::new();
    for l in 0..cfg.n_layers {
        let p = format!("model.layers.{l}");
        let qk_norms = [
            ("self_attn.q_layernorm", "self_attn.q_norm"),
            ("self_attn.k_layernorm", "self_attn.k_norm"),
        ];
        let qk_norms = if cfg.qk_norm == QkNorm::None {
            &qk_norms[..0]
        } else {
            &qk_norms[..]
        };
        for &(from, to) in [
            ("self_attn.dense", "self_attn.o_proj"),
            ("mlp.fc1", "mlp.up_proj"),
            ("mlp.fc2", "mlp.down_proj"),
        ]
        .iter()
        .chain(qk_norms)
        {
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

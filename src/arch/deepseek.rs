//! DeepSeek-V3: multi-head latent attention, dense first layers then MoE layers with
//! sigmoid scores, a selection-only correction bias, group-limited top-k, renormalised
//! and scaled weights, and shared experts.
//!
//! Its rotary part is stored interleaved (pairs `(x0, x1), (x2, x3), …` rotate together,
//! `rope_interleave`); our rotary kernel rotates halves. Reordering the rotary rows of the
//! query and key projections at load (`x0, x2, …, x1, x3, …`) makes the two equal, since
//! attention only sees `q · k`.

use super::{llama, RawConfig, TensorMap};
use crate::config::{LayerSpec, MlaConfig, ModelConfig, MoeConfig, Position, RopeScaling, Scoring};
use crate::error::Result;
use crate::weights::Params;

pub fn config(raw: &RawConfig) -> ModelConfig {
    let mut c = llama::base(raw);
    let mla = MlaConfig {
        q_lora_rank: raw.opt_usize(&["q_lora_rank"]),
        kv_lora_rank: raw.usize(&["kv_lora_rank"]),
        qk_nope_dim: raw.usize(&["qk_nope_head_dim"]),
        qk_rope_dim: raw.usize(&["qk_rope_head_dim"]),
        v_head_dim: raw.usize(&["v_head_dim"]),
    };
    c.head_dim = mla.qk_nope_dim + mla.qk_rope_dim;
    // latent attention expands keys and values for every query head
    if c.n_kv_heads != c.n_heads {
        raw.problem(format!(
            "num_key_value_heads ({}) must equal num_attention_heads ({}) with latent attention",
            c.n_kv_heads, c.n_heads
        ));
    }
    c.n_kv_heads = c.n_heads;
    if let Position::Rope { rotary_dim, .. } = &mut c.position {
        *rotary_dim = mla.qk_rope_dim;
    }
    if !raw.bool_or("rope_interleave", true) {
        raw.problem("rope_interleave false is not supported (DeepSeek's rotary dims are read as interleaved pairs)".into());
    }
    if let Some(q) = raw.opt_usize(&["qk_head_dim"]) {
        if q != c.head_dim {
            raw.problem(format!(
                "qk_head_dim ({q}) must be qk_nope_head_dim + qk_rope_head_dim ({})",
                c.head_dim
            ));
        }
    }
    // multi-token-prediction layers: a training aid transformers does not load either
    raw.acknowledge(&["num_nextn_predict_layers"]);
    c.mla = Some(mla);
    // DeepSeek's YaRN also sharpens the softmax: scale · mscale(factor, mscale_all_dim)²
    // (transformers' `yarn_apply_mscale`)
    if let (Position::Rope { scaling, .. }, Some(all), Some(factor)) = (
        &c.position,
        raw.rope_scaling_value("mscale_all_dim")
            .filter(|m| *m != 0.0),
        raw.rope_scaling_value("factor"),
    ) {
        if *scaling != RopeScaling::None {
            let m = super::raw::yarn_mscale(factor, all);
            c.attn_scale = Some(m * m / (c.head_dim as f64).sqrt());
        }
    }
    let n_shared = raw.opt_usize(&["n_shared_experts"]).unwrap_or(0);
    let d_expert = raw.usize(&["moe_intermediate_size"]);
    let moe = MoeConfig {
        scoring: match raw.str(&["scoring_func"]).unwrap_or("sigmoid") {
            "softmax" => Scoring::Softmax,
            _ => Scoring::Sigmoid,
        },
        norm_topk: raw.bool_or("norm_topk_prob", true),
        routed_scale: raw.f64_or(&["routed_scaling_factor"], 1.0),
        n_groups: raw.opt_usize(&["n_group"]).unwrap_or(1),
        topk_groups: raw.opt_usize(&["topk_group"]).unwrap_or(1),
        selection_bias: true,
        d_shared: d_expert * n_shared,
        ..MoeConfig::new(
            raw.usize(&["n_routed_experts"]),
            raw.usize(&["num_experts_per_tok"]),
            d_expert,
        )
    };
    let first_dense = raw.opt_usize(&["first_k_dense_replace"]).unwrap_or(0);
    let every = raw.opt_usize(&["moe_layer_freq"]).unwrap_or(1).max(1);
    c.layers = (0..c.n_layers)
        .map(|l| LayerSpec {
            moe: (l >= first_dense && (l - first_dense).is_multiple_of(every)).then_some(moe),
            ..Default::default()
        })
        .collect();
    c
}

/// The row order (of `rows` rows) that turns the `rot` rows starting at each `start` from
/// interleaved pairs into halves.
fn deinterleave(rows: usize, starts: impl Iterator<Item = usize>, rot: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..rows as u32).collect();
    for s in starts {
        for i in 0..rot / 2 {
            order[s + i] = (s + 2 * i) as u32;
            order[s + rot / 2 + i] = (s + 2 * i + 1) as u32;
        }
    }
    order
}

pub fn tensors(cfg: &ModelConfig, map: &mut TensorMap) -> Result<Params> {
    let mut out = Params::new();
    let Some(a) = cfg.mla else { return Ok(out) };
    let (h, rot) = (cfg.n_heads, a.qk_rope_dim);
    for l in 0..cfg.n_layers {
        let p = format!("model.layers.{l}");
        for proj in ["gate_proj", "up_proj", "down_proj"] {
            map.rename_opt(
                &mut out,
                &format!("{p}.mlp.shared_experts.{proj}.weight"),
                &format!("{p}.mlp.shared_expert.{proj}.weight"),
            );
        }
        let q_name = if a.q_lora_rank.is_some() {
            "q_b_proj"
        } else {
            "q_proj"
        };
        let per_head = a.qk_nope_dim + rot;
        let q_key = format!("{p}.self_attn.{q_name}.weight");
        let order = deinterleave(
            h * per_head,
            (0..h).map(|i| i * per_head + a.qk_nope_dim),
            rot,
        );
        map.permute_rows(&mut out, &q_key, &q_key, order)?;
        let kv_key = format!("{p}.self_attn.kv_a_proj_with_mqa.weight");
        let order = deinterleave(a.kv_lora_rank + rot, std::iter::once(a.kv_lora_rank), rot);
        map.permute_rows(&mut out, &kv_key, &kv_key, order)?;
    }
    map.take_canonical(cfg, &mut out);
    Ok(out)
}

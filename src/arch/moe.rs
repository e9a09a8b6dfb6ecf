//! Mixture-of-Experts families on the Llama layout: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
//! PhiMoE. Softmax routing over all experts, top-k, renormalised or not; Qwen2-MoE adds a
//! shared expert behind a sigmoid gate and dense layers between sparse ones; PhiMoE routes
//! by SparseMixer and uses biased LayerNorms, attention biases and a head bias.

use super::llama::{self, Windows};
use super::{qwen, RawConfig, TensorMap};
use crate::config::{LayerSpec, ModelConfig, MoeConfig, NormKind, QkNorm, Scoring};
use crate::error::Result;
use crate::weights::Params;

fn moe(raw: &RawConfig, d_expert_keys: &[&str], norm_topk_default: bool) -> MoeConfig {
    MoeConfig {
        norm_topk: raw.bool_or("norm_topk_prob", norm_topk_default),
        // used when fine-tuning
        aux_loss_coef: raw.f64_or(&["router_aux_loss_coef"], 0.0),
        ..MoeConfig::new(
            raw.usize(&["num_experts", "num_local_experts", "n_routed_experts"]),
            raw.usize(&["num_experts_per_tok"]),
            raw.usize(d_expert_keys),
        )
    }
}

/// Give layers the Mixture of Experts `m`: all but `mlp_only_layers`, every
/// `decoder_sparse_step`-th.
fn mark_layers(raw: &RawConfig, c: &mut ModelConfig, m: MoeConfig) {
    let step = raw.opt_usize(&["decoder_sparse_step"]).unwrap_or(1).max(1);
    let dense: Vec<usize> = raw.usize_list("mlp_only_layers").unwrap_or_default();
    if c.layers.is_empty() {
        c.layers = vec![LayerSpec::default(); c.n_layers];
    }
    for (l, spec) in c.layers.iter_mut().enumerate() {
        let sparse = !dense.contains(&l) && (l + 1).is_multiple_of(step);
        spec.moe = sparse.then_some(m);
    }
}

pub fn config_mixtral(raw: &RawConfig) -> ModelConfig {
    let mut c = llama::base(raw);
    c.layers = llama::windows(raw, c.n_layers, Windows::Every);
    // noise on the router's input while training only
    raw.acknowledge(&["router_jitter_noise"]);
    let m = MoeConfig {
        norm_topk: true,
        ..moe(raw, &["intermediate_size"], true)
    };
    mark_layers(raw, &mut c, m);
    c
}

pub fn config_phimoe(raw: &RawConfig) -> ModelConfig {
    let mut c = config_mixtral(raw);
    c.norm = NormKind::LayerNorm;
    c.norm_bias = true;
    c.head_bias = raw.bool_or("lm_head_bias", false);
    let eps = raw.f64_or(&["router_jitter_noise"], 0.01);
    for m in c.layers.iter_mut().filter_map(|l| l.moe.as_mut()) {
        m.scoring = Scoring::SparseMixer { eps };
        m.norm_topk = false;
    }
    c
}

pub fn config_qwen2_moe(raw: &RawConfig) -> ModelConfig {
    let mut c = qwen::config_qwen2(raw);
    c.layers = llama::windows(raw, c.n_layers, Windows::EvenBelowMaxWindowLayers);
    c.qkv_bias = raw.bool_or("qkv_bias", true);
    let mut m = moe(raw, &["moe_intermediate_size"], false);
    m.d_shared = raw
        .opt_usize(&["shared_expert_intermediate_size"])
        .unwrap_or(0);
    m.shared_gate = m.d_shared > 0;
    mark_layers(raw, &mut c, m);
    c
}

pub fn config_qwen3_moe(raw: &RawConfig) -> ModelConfig {
    let mut c = qwen::config_qwen3(raw);
    c.layers = llama::windows(raw, c.n_layers, Windows::EveryIfUsed);
    let m = moe(raw, &["moe_intermediate_size"], false);
    mark_layers(raw, &mut c, m);
    c
}

pub fn config_olmoe(raw: &RawConfig) -> ModelConfig {
    let mut c = llama::base(raw);
    c.qk_norm = QkNorm::Full;
    c.clip_qkv = raw.opt_f64(&["clip_qkv"]);
    let m = moe(raw, &["intermediate_size"], false);
    mark_layers(raw, &mut c, m);
    c
}

/// Mixtral's names: `block_sparse_moe.gate`, experts' `w1` (gate), `w3` (up), `w2` (down).
pub fn tensors_mixtral(cfg: &ModelConfig, map: &mut TensorMap) -> Result<Params> {
    let mut out = Params::new();
    for l in 0..cfg.n_layers {
        let n = cfg.layer(l).moe.map_or(0, |m| m.n_experts);
        let (from, to) = (
            format!("model.layers.{l}.block_sparse_moe"),
            format!("model.layers.{l}.mlp"),
        );
        map.rename(
            &mut out,
            &format!("{from}.gate.weight"),
            &format!("{to}.gate.weight"),
        );
        for e in 0..n {
            for (w, proj) in [("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")] {
                map.rename(
                    &mut out,
                    &format!("{from}.experts.{e}.{w}.weight"),
                    &format!("{to}.experts.{e}.{proj}.weight"),
                );
            }
        }
    }
    map.take_canonical(cfg, &mut out);
    Ok(out)
}

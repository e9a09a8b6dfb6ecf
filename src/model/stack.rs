//! Parameters that train stacked in one variable: a SwiGLU block's gate and up
//! projections, an MoE layer's expert projections. The fused feed-forward ops read the
//! stack directly (no concatenation per step, one gradient per stack); the model's
//! per-projection weights are views of it, and checkpoints keep the per-projection names.

use crate::config::{FfnKind, ModelConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StackKind {
    /// A dense block's `[gate; up]`: `(2·d_ff, d)`.
    GateUp,
    /// An MoE layer's `[gate_e; up_e]` for each expert in turn: `(E·2·d_expert, d)`.
    ExpertsGateUp,
    /// An MoE layer's `down_e` for each expert in turn: `(E·d, d_expert)`.
    ExpertsDown,
}

/// One stacked variable: its name, and its parts' canonical names in stacking order
/// (along the first dimension).
#[derive(Debug, Clone)]
pub struct ParamStack {
    pub layer: usize,
    pub kind: StackKind,
    pub name: String,
    pub parts: Vec<String>,
}

/// The stacks of a model: in every layer whose feed-forward block is SwiGLU without
/// biases (the fused ops' case), the dense block's gate and up, or the MoE layer's experts.
pub fn param_stacks(cfg: &ModelConfig) -> Vec<ParamStack> {
    if cfg.ffn != FfnKind::Swiglu || cfg.ffn_bias {
        return Vec::new();
    }
    let mut v = Vec::new();
    for l in 0..cfg.n_layers {
        let p = format!("model.layers.{l}.mlp");
        let stack = |kind, name: String, parts| ParamStack {
            layer: l,
            kind,
            name,
            parts,
        };
        match (&cfg.moe, cfg.layer(l).moe) {
            (Some(m), true) => {
                let part = |e: usize, proj: &str| format!("{p}.experts.{e}.{proj}.weight");
                v.push(stack(
                    StackKind::ExpertsGateUp,
                    format!("{p}.experts.gate_up_proj"),
                    (0..m.n_experts)
                        .flat_map(|e| [part(e, "gate_proj"), part(e, "up_proj")])
                        .collect(),
                ));
                v.push(stack(
                    StackKind::ExpertsDown,
                    format!("{p}.experts.down_proj"),
                    (0..m.n_experts).map(|e| part(e, "down_proj")).collect(),
                ));
            }
            _ => v.push(stack(
                StackKind::GateUp,
                format!("{p}.gate_up_proj"),
                vec![
                    format!("{p}.gate_proj.weight"),
                    format!("{p}.up_proj.weight"),
                ],
            )),
        }
    }
    v
}

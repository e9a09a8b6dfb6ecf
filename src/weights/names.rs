//! The canonical parameter table: every tensor a [`ModelConfig`] implies, with its name
//! (Hugging Face Llama layout), shape, initialiser and whether weight decay applies.
//! Initialisation, loading, saving and parameter counts all read this one table.

use candle_core::Tensor;
use std::collections::{BTreeMap, HashMap};

use crate::config::{BlockKind, FfnKind, ModelConfig, NormKind, Position, QkNorm};

/// How a parameter is initialised for training from scratch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Normal(f64),
    Ones,
    Zeros,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
    /// AdamW weight decay applies (matrices of projections and the head).
    pub decay: bool,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

fn matrix(name: String, out: usize, inp: usize, std: f64) -> ParamSpec {
    ParamSpec {
        name,
        shape: vec![out, inp],
        init: Init::Normal(std),
        decay: true,
    }
}

fn vector(name: String, n: usize, init: Init) -> ParamSpec {
    ParamSpec {
        name,
        shape: vec![n],
        init,
        decay: false,
    }
}

/// Every parameter of the model described by `cfg`, in a stable order.
pub fn param_specs(cfg: &ModelConfig) -> Vec<ParamSpec> {
    let std = cfg.init_std;
    // GPT-2's scaled init for projections that write into the residual stream
    let out_std = std / (2.0 * cfg.n_layers as f64).sqrt();
    let d = cfg.d_model;
    let mut v = Vec::new();
    let mut embed = matrix("model.embed_tokens.weight".into(), cfg.vocab_size, d, std);
    embed.decay = false;
    v.push(embed);
    if cfg.position == Position::Learned {
        let mut pos = matrix(
            "model.embed_positions.weight".into(),
            cfg.max_seq_len,
            d,
            std,
        );
        pos.decay = false;
        v.push(pos);
    }
    // a norm of the model's kind over `width` features
    let norm_of = |v: &mut Vec<ParamSpec>, prefix: String, width: usize| {
        v.push(vector(format!("{prefix}.weight"), width, Init::Ones));
        if cfg.norm == NormKind::LayerNorm && cfg.norm_bias {
            v.push(vector(format!("{prefix}.bias"), width, Init::Zeros));
        }
    };
    let norm = |v: &mut Vec<ParamSpec>, prefix: String| norm_of(v, prefix, d);
    if cfg.embed_norm {
        norm(&mut v, "model.embed_norm".into());
    }
    // one feed-forward network of hidden width `width` under `prefix`
    let ffn = |v: &mut Vec<ParamSpec>, prefix: String, width: usize| {
        let mut ffn_in = vec!["up_proj"];
        if cfg.ffn.is_gated() {
            ffn_in.insert(0, "gate_proj");
        }
        for proj in ffn_in {
            v.push(matrix(format!("{prefix}.{proj}.weight"), width, d, std));
            if cfg.ffn_bias {
                v.push(vector(format!("{prefix}.{proj}.bias"), width, Init::Zeros));
            }
        }
        v.push(matrix(
            format!("{prefix}.down_proj.weight"),
            d,
            width,
            out_std,
        ));
        if cfg.ffn_bias {
            v.push(vector(format!("{prefix}.down_proj.bias"), d, Init::Zeros));
        }
    };
    // standard q, k, v projections (self- or cross-attention) under `prefix`
    let qkv = |v: &mut Vec<ParamSpec>, prefix: String| {
        for (proj, width) in [
            ("q_proj", cfg.q_dim()),
            ("k_proj", cfg.kv_dim()),
            ("v_proj", cfg.kv_dim()),
        ] {
            v.push(matrix(format!("{prefix}.{proj}.weight"), width, d, std));
            if cfg.qkv_bias {
                v.push(vector(format!("{prefix}.{proj}.bias"), width, Init::Zeros));
            }
        }
    };
    let out = |v: &mut Vec<ParamSpec>, prefix: String| {
        let o = format!("{prefix}.o_proj");
        v.push(matrix(
            format!("{o}.weight"),
            d,
            cfg.attn_out_dim(),
            out_std,
        ));
        if cfg.out_bias {
            v.push(vector(format!("{o}.bias"), d, Init::Zeros));
        }
    };
    // relative position tables: the decoder's, and the encoder's
    if let Position::Relative { buckets, .. } = cfg.position {
        let mut stacks = vec!["model"];
        if cfg.encoder_layers > 0 {
            stacks.push("model.encoder");
        }
        for s in stacks {
            let mut table = matrix(
                format!("{s}.relative_bias.weight"),
                buckets,
                cfg.n_heads,
                std,
            );
            table.decay = false;
            v.push(table);
        }
    }
    // the encoder: plain blocks (bidirectional self-attention, dense FFN) and a final norm
    for l in 0..cfg.encoder_layers {
        let p = format!("model.encoder.layers.{l}");
        norm(&mut v, format!("{p}.input_layernorm"));
        qkv(&mut v, format!("{p}.self_attn"));
        out(&mut v, format!("{p}.self_attn"));
        norm(&mut v, format!("{p}.post_attention_layernorm"));
        ffn(&mut v, format!("{p}.mlp"), cfg.d_ff);
    }
    if cfg.encoder_layers > 0 {
        norm(&mut v, "model.encoder.norm".into());
    }
    for l in 0..cfg.n_layers {
        let p = format!("model.layers.{l}");
        norm(&mut v, format!("{p}.input_layernorm"));
        match &cfg.mla {
            Some(a) => {
                let a_ = format!("{p}.self_attn");
                match a.q_lora_rank {
                    Some(r) => {
                        v.push(matrix(format!("{a_}.q_a_proj.weight"), r, d, std));
                        v.push(vector(format!("{a_}.q_a_layernorm.weight"), r, Init::Ones));
                        v.push(matrix(format!("{a_}.q_b_proj.weight"), cfg.q_dim(), r, std));
                    }
                    None => v.push(matrix(format!("{a_}.q_proj.weight"), cfg.q_dim(), d, std)),
                }
                let kv = a.kv_lora_rank;
                v.push(matrix(
                    format!("{a_}.kv_a_proj_with_mqa.weight"),
                    kv + a.qk_rope_dim,
                    d,
                    std,
                ));
                v.push(vector(
                    format!("{a_}.kv_a_layernorm.weight"),
                    kv,
                    Init::Ones,
                ));
                let width = cfg.n_heads * (a.qk_nope_dim + a.v_head_dim);
                v.push(matrix(format!("{a_}.kv_b_proj.weight"), width, kv, std));
            }
            None => qkv(&mut v, format!("{p}.self_attn")),
        }
        out(&mut v, format!("{p}.self_attn"));
        if cfg.encoder_layers > 0 {
            norm(&mut v, format!("{p}.cross_attn_layernorm"));
            qkv(&mut v, format!("{p}.cross_attn"));
            out(&mut v, format!("{p}.cross_attn"));
        }
        let qk_widths = match cfg.qk_norm {
            QkNorm::None => None,
            QkNorm::PerHead => Some((cfg.head_dim, cfg.head_dim)),
            QkNorm::Full => Some((cfg.q_dim(), cfg.kv_dim())),
        };
        if let Some((wq, wk)) = qk_widths {
            norm_of(&mut v, format!("{p}.self_attn.q_norm"), wq);
            norm_of(&mut v, format!("{p}.self_attn.k_norm"), wk);
        }
        if cfg.block != BlockKind::ParallelSharedNorm {
            norm(&mut v, format!("{p}.post_attention_layernorm"));
        }
        if cfg.sandwich_norms {
            norm(&mut v, format!("{p}.attn_out_norm"));
            norm(&mut v, format!("{p}.ffn_out_norm"));
        }
        if let Some(dc) = cfg.layer(l).depth {
            v.push(matrix(format!("{p}.depth_router.weight"), 1, d, std));
            let h = dc.predictor;
            if h > 0 {
                v.push(matrix(format!("{p}.depth_predictor.fc1.weight"), h, d, std));
                v.push(matrix(format!("{p}.depth_predictor.fc2.weight"), 1, h, std));
            }
        }
        match cfg.layer(l).moe {
            Some(m) => {
                v.push(matrix(format!("{p}.mlp.gate.weight"), m.slots(), d, std));
                if m.selection_bias {
                    v.push(vector(
                        format!("{p}.mlp.gate.e_score_correction_bias"),
                        m.slots(),
                        Init::Zeros,
                    ));
                }
                for e in 0..m.n_experts {
                    ffn(&mut v, format!("{p}.mlp.experts.{e}"), m.d_expert);
                }
                if m.d_shared > 0 {
                    ffn(&mut v, format!("{p}.mlp.shared_expert"), m.d_shared);
                }
                if m.shared_gate {
                    v.push(matrix(
                        format!("{p}.mlp.shared_expert_gate.weight"),
                        1,
                        d,
                        std,
                    ));
                }
            }
            _ => ffn(&mut v, format!("{p}.mlp"), cfg.d_ff),
        }
    }
    norm(&mut v, "model.norm".into());
    if !cfg.tie_embeddings {
        v.push(matrix("lm_head.weight".into(), cfg.vocab_size, d, std));
    }
    if cfg.head_bias {
        v.push(vector("lm_head.bias".into(), cfg.vocab_size, Init::Zeros));
    }
    v
}

// ---------------------------------------------------------------- stacked parameters

// Parameters that train stacked in one variable: a SwiGLU block's gate and up
// projections, an MoE layer's expert projections. The fused feed-forward op reads the
// stack directly (no concatenation per step, one gradient per stack); the model's
// per-projection weights are views of it, and checkpoints keep the per-projection names.

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
        match cfg.layer(l).moe {
            Some(m) => {
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

/// A stack and its tensor.
pub type Stacked = (ParamStack, Tensor);

/// The parameters as the model holds them: every stack of [`param_stacks`] as one tensor,
/// and its parts (under their canonical names) as views of it. A stack is taken as given
/// under its own name (the trainer's variable) or concatenated once from its parts (a
/// loaded checkpoint); a stack whose pieces do not fit together is left alone for the
/// parameter check to report.
pub fn with_stacks(
    cfg: &ModelConfig,
    params: &BTreeMap<String, Tensor>,
) -> candle_core::Result<(BTreeMap<String, Tensor>, Vec<Stacked>)> {
    let mut out = params.clone();
    let mut stacks = Vec::new();
    let shapes: HashMap<String, Vec<usize>> = param_specs(cfg)
        .into_iter()
        .map(|s| (s.name, s.shape))
        .collect();
    for stack in param_stacks(cfg) {
        let Some(parts) = stack
            .parts
            .iter()
            .map(|n| shapes.get(n).filter(|s| s.len() == 2).map(|s| (s[0], s[1])))
            .collect::<Option<Vec<_>>>()
        else {
            continue;
        };
        let rows: usize = parts.iter().map(|p| p.0).sum();
        let cols = parts.first().map_or(0, |p| p.1);
        let given = match out.remove(&stack.name) {
            Some(t) if t.dims() == [rows, cols] => Some(t),
            Some(t) => {
                out.insert(stack.name.clone(), t);
                continue;
            }
            None => None,
        };
        let t = match given {
            Some(t) => t,
            None => {
                let pieces: Option<Vec<Tensor>> = stack
                    .parts
                    .iter()
                    .zip(&parts)
                    .map(|(n, &(r, c))| out.get(n).filter(|t| t.dims() == [r, c]).cloned())
                    .collect();
                match pieces {
                    Some(p) if parts.iter().all(|q| q.1 == cols) => Tensor::cat(&p, 0)?,
                    _ => continue,
                }
            }
        };
        let mut at = 0;
        for (name, &(r, _)) in stack.parts.iter().zip(&parts) {
            out.insert(name.clone(), t.narrow(0, at, r)?);
            at += r;
        }
        stacks.push((stack, t));
    }
    Ok((out, stacks))
}

/// Check a name → tensor map against the parameter table; every problem listed.
pub fn check_params(cfg: &ModelConfig, params: &BTreeMap<String, Tensor>) -> Vec<String> {
    let specs = param_specs(cfg);
    tensor_problems(
        specs.iter().map(|s| (s.name.as_str(), s.shape.as_slice())),
        params,
    )
}

/// Missing, misshapen and unexpected tensors of `params` against the expected
/// `(name, shape)` list, every one listed.
pub fn tensor_problems<'a>(
    expected: impl Iterator<Item = (&'a str, &'a [usize])> + Clone,
    params: &BTreeMap<String, Tensor>,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, shape) in expected.clone() {
        match params.get(name) {
            None => problems.push(format!("missing tensor {name} {shape:?}")),
            Some(t) if t.dims() != shape => problems.push(format!(
                "tensor {name} has shape {:?}, the config implies {shape:?}",
                t.dims()
            )),
            _ => {}
        }
    }
    // one pass over each side: checkpoints carry up to ~10⁵ tensors
    let known: std::collections::HashSet<&str> = expected.map(|(n, _)| n).collect();
    for name in params.keys() {
        if !known.contains(name.as_str()) {
            problems.push(format!(
                "unexpected tensor {name} (not part of this config)"
            ));
        }
    }
    problems
}

//! The canonical parameter table: every tensor a [`ModelConfig`] implies, with its name
//! (Hugging Face Llama layout), shape, initialiser and whether weight decay applies.
//! Initialisation, loading, saving and parameter counts all read this one table.

use candle_core::Tensor;
use std::collections::{BTreeMap, HashMap};

use crate::config::{
    BlockKind, FfnKind, MlaConfig, ModelConfig, MoeConfig, NormKind, Position, QkNorm,
};

/// How a parameter is initialised for training from scratch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Normal(f64),
    /// Uniform on `[-b, b]`.
    Uniform(f64),
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

/// The parameter table being written, one method per piece.
struct Table<'a> {
    cfg: &'a ModelConfig,
    v: Vec<ParamSpec>,
    /// The initialiser's standard deviation.
    std: f64,
    /// GPT-2's scaled init for projections that write into the residual stream.
    out_std: f64,
}

impl Table<'_> {
    fn matrix(&mut self, name: String, out: usize, inp: usize, std: f64) {
        self.v.push(matrix(name, out, inp, std));
    }

    /// A parameter without weight decay (embeddings, tables).
    fn table(&mut self, name: String, rows: usize, cols: usize) {
        let mut t = matrix(name, rows, cols, self.std);
        t.decay = false;
        self.v.push(t);
    }

    fn bias(&mut self, prefix: &str, width: usize, on: bool) {
        if on {
            self.v
                .push(vector(format!("{prefix}.bias"), width, Init::Zeros));
        }
    }

    /// A norm of the model's kind over `width` features.
    fn norm_of(&mut self, prefix: &str, width: usize) {
        let c = self.cfg;
        self.v
            .push(vector(format!("{prefix}.weight"), width, Init::Ones));
        self.bias(prefix, width, c.norm == NormKind::LayerNorm && c.norm_bias);
    }

    fn norm(&mut self, prefix: &str) {
        self.norm_of(prefix, self.cfg.d_model);
    }

    /// One feed-forward network of hidden width `width` under `prefix`.
    fn ffn(&mut self, prefix: &str, width: usize) {
        let (c, d) = (self.cfg, self.cfg.d_model);
        let mut ffn_in = vec!["up_proj"];
        if c.ffn.is_gated() {
            ffn_in.insert(0, "gate_proj");
        }
        for proj in ffn_in {
            let p = format!("{prefix}.{proj}");
            self.matrix(format!("{p}.weight"), width, d, self.std);
            self.bias(&p, width, c.ffn_bias);
        }
        let p = format!("{prefix}.down_proj");
        self.matrix(format!("{p}.weight"), d, width, self.out_std);
        self.bias(&p, d, c.ffn_bias);
    }

    /// Standard q, k, v projections (self- or cross-attention) under `prefix`.
    fn qkv(&mut self, prefix: &str) {
        let c = self.cfg;
        for (proj, width) in [
            ("q_proj", c.q_dim()),
            ("k_proj", c.kv_dim()),
            ("v_proj", c.kv_dim()),
        ] {
            let p = format!("{prefix}.{proj}");
            self.matrix(format!("{p}.weight"), width, c.d_model, self.std);
            self.bias(&p, width, c.qkv_bias);
        }
    }

    /// Latent attention's projections under `prefix` (DeepSeek's names).
    fn latent(&mut self, prefix: &str, a: &MlaConfig) {
        let c = self.cfg;
        let (d, std) = (c.d_model, self.std);
        match a.q_lora_rank {
            Some(r) => {
                self.matrix(format!("{prefix}.q_a_proj.weight"), r, d, std);
                // the bottlenecks' norms are RMSNorms: weights only
                let norm = format!("{prefix}.q_a_layernorm.weight");
                self.v.push(vector(norm, r, Init::Ones));
                self.matrix(format!("{prefix}.q_b_proj.weight"), c.q_dim(), r, std);
            }
            None => self.matrix(format!("{prefix}.q_proj.weight"), c.q_dim(), d, std),
        }
        let kv = a.kv_lora_rank;
        let p = format!("{prefix}.kv_a_proj_with_mqa.weight");
        self.matrix(p, kv + a.qk_rope_dim, d, std);
        let norm = format!("{prefix}.kv_a_layernorm.weight");
        self.v.push(vector(norm, kv, Init::Ones));
        let width = c.n_heads * (a.qk_nope_dim + a.v_head_dim);
        self.matrix(format!("{prefix}.kv_b_proj.weight"), width, kv, std);
    }

    fn out(&mut self, prefix: &str) {
        let c = self.cfg;
        let o = format!("{prefix}.o_proj");
        self.matrix(
            format!("{o}.weight"),
            c.d_model,
            c.attn_out_dim(),
            self.out_std,
        );
        self.bias(&o, c.d_model, c.out_bias);
    }

    /// A Mixture of Experts under `p` (`….mlp`): router, selection bias, experts, shared
    /// expert and its gate.
    fn moe(&mut self, p: &str, m: &MoeConfig) {
        let d = self.cfg.d_model;
        self.matrix(format!("{p}.gate.weight"), m.slots(), d, self.std);
        if m.selection_bias {
            let name = format!("{p}.gate.e_score_correction_bias");
            self.v.push(vector(name, m.slots(), Init::Zeros));
        }
        for e in 0..m.n_experts {
            self.ffn(&format!("{p}.experts.{e}"), m.d_expert);
        }
        if m.d_shared > 0 {
            self.ffn(&format!("{p}.shared_expert"), m.d_shared);
        }
        if m.shared_gate {
            self.matrix(format!("{p}.shared_expert_gate.weight"), 1, d, self.std);
        }
    }

    /// An encoder block: bidirectional self-attention and a dense FFN.
    fn encoder_layer(&mut self, l: usize) {
        let p = format!("model.encoder.layers.{l}");
        self.norm(&format!("{p}.input_layernorm"));
        self.qkv(&format!("{p}.self_attn"));
        self.out(&format!("{p}.self_attn"));
        self.norm(&format!("{p}.post_attention_layernorm"));
        self.ffn(&format!("{p}.mlp"), self.cfg.d_ff);
    }

    /// Decoder layer `l`.
    fn layer(&mut self, l: usize) {
        let (c, d) = (self.cfg, self.cfg.d_model);
        let p = format!("model.layers.{l}");
        let spec = c.layer(l);
        self.norm(&format!("{p}.input_layernorm"));
        match &c.mla {
            Some(a) => self.latent(&format!("{p}.self_attn"), a),
            None => self.qkv(&format!("{p}.self_attn")),
        }
        self.out(&format!("{p}.self_attn"));
        if c.encoder_layers > 0 {
            self.norm(&format!("{p}.cross_attn_layernorm"));
            self.qkv(&format!("{p}.cross_attn"));
            self.out(&format!("{p}.cross_attn"));
        }
        let qk_widths = match c.qk_norm {
            QkNorm::None => None,
            QkNorm::PerHead => Some((c.head_dim, c.head_dim)),
            QkNorm::Full => Some((c.q_dim(), c.kv_dim())),
        };
        if let Some((wq, wk)) = qk_widths {
            self.norm_of(&format!("{p}.self_attn.q_norm"), wq);
            self.norm_of(&format!("{p}.self_attn.k_norm"), wk);
        }
        if c.block != BlockKind::ParallelSharedNorm {
            self.norm(&format!("{p}.post_attention_layernorm"));
        }
        if c.sandwich_norms {
            self.norm(&format!("{p}.attn_out_norm"));
            self.norm(&format!("{p}.ffn_out_norm"));
        }
        if let Some(dc) = spec.depth {
            self.matrix(format!("{p}.depth_router.weight"), 1, d, self.std);
            let h = dc.predictor;
            if h > 0 {
                self.matrix(format!("{p}.depth_predictor.fc1.weight"), h, d, self.std);
                self.matrix(format!("{p}.depth_predictor.fc2.weight"), 1, h, self.std);
            }
        }
        match spec.moe {
            Some(m) => self.moe(&format!("{p}.mlp"), &m),
            None => self.ffn(&format!("{p}.mlp"), c.d_ff),
        }
    }
}

/// Every parameter of the model described by `cfg`, in a stable order.
pub fn param_specs(cfg: &ModelConfig) -> Vec<ParamSpec> {
    let std = cfg.init_std;
    let mut t = Table {
        cfg,
        v: Vec::new(),
        std,
        out_std: std / (2.0 * cfg.n_layers as f64).sqrt(),
    };
    let d = cfg.d_model;
    t.table("model.embed_tokens.weight".into(), cfg.vocab_size, d);
    if cfg.position == Position::Learned {
        t.table("model.embed_positions.weight".into(), cfg.max_seq_len, d);
    }
    if cfg.embed_norm {
        t.norm("model.embed_norm");
    }
    // relative position tables: the decoder's, and the encoder's
    if let Position::Relative { buckets, .. } = cfg.position {
        t.table("model.relative_bias.weight".into(), buckets, cfg.n_heads);
        if cfg.encoder_layers > 0 {
            t.table(
                "model.encoder.relative_bias.weight".into(),
                buckets,
                cfg.n_heads,
            );
        }
    }
    for l in 0..cfg.encoder_layers {
        t.encoder_layer(l);
    }
    if cfg.encoder_layers > 0 {
        t.norm("model.encoder.norm");
    }
    for l in 0..cfg.n_layers {
        t.layer(l);
    }
    t.norm("model.norm");
    if !cfg.tie_embeddings {
        t.matrix("lm_head.weight".into(), cfg.vocab_size, d, std);
    }
    t.bias("lm_head", cfg.vocab_size, cfg.head_bias);
    if let Some(lora) = &cfg.lora {
        let adapters = lora_specs(lora, &t.v);
        t.v.extend(adapters);
    }
    t.v
}

/// The adapters of `lora` on the projections among `base`: for a projection `P.weight`
/// `(out, in)`, `P.lora_A.weight` `(r, in)` drawn as PEFT draws it (uniform on
/// `±1/sqrt(in)`) and `P.lora_B.weight` `(out, r)` zero, so that the adapted model starts
/// equal to the base model.
fn lora_specs(lora: &crate::config::LoraConfig, base: &[ParamSpec]) -> Vec<ParamSpec> {
    let mut v = Vec::new();
    for s in base {
        let Some(module) = s.name.strip_suffix(".weight") else {
            continue;
        };
        let [out, inp] = s.shape[..] else {
            continue;
        };
        if !module.starts_with("model.") || module.contains("embed") || !lora.targets_module(module)
        {
            continue;
        }
        v.push(ParamSpec {
            name: format!("{module}.lora_A.weight"),
            shape: vec![lora.r, inp],
            init: Init::Uniform(1.0 / (inp as f64).sqrt()),
            decay: true,
        });
        v.push(ParamSpec {
            name: format!("{module}.lora_B.weight"),
            shape: vec![out, lora.r],
            init: Init::Zeros,
            decay: true,
        });
    }
    v
}

/// Whether `name` is what a retrofit adds to a published model: an adapter's tensor or
/// a Mixture-of-Depths router's or predictor's.
pub fn is_added(name: &str) -> bool {
    is_adapter(name) || name.contains(".depth_router.") || name.contains(".depth_predictor.")
}

/// Whether `name` is an adapter's tensor (`….lora_A.weight`, `….lora_B.weight`).
pub fn is_adapter(name: &str) -> bool {
    name.ends_with(".lora_A.weight") || name.ends_with(".lora_B.weight")
}

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
/// parameter check to report, and so is one with a part `kept_apart` names (a weight held
/// in its stored form).
pub fn with_stacks(
    cfg: &ModelConfig,
    params: BTreeMap<String, Tensor>,
    kept_apart: &dyn Fn(&str) -> bool,
) -> candle_core::Result<(BTreeMap<String, Tensor>, Vec<Stacked>)> {
    // a part is replaced by its view as soon as its stack exists: with nothing else
    // holding the parts, only one stack's parts are ever held twice
    let mut out = params;
    let mut stacks = Vec::new();
    let shapes: HashMap<String, Vec<usize>> = param_specs(cfg)
        .into_iter()
        .map(|s| (s.name, s.shape))
        .collect();
    for stack in param_stacks(cfg) {
        if stack.parts.iter().any(|n| kept_apart(n)) {
            continue;
        }
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

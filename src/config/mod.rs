//! Model configuration in two stages (STYLE 3): [`ModelConfigFile`] is what a person writes
//! in TOML or JSON (optional fields, unknown keys rejected); [`ModelConfigFile::resolve`] fills
//! the defaults and validates, giving a [`ModelConfig`] with nothing left for the forward pass
//! to interpret. `ModelConfig` is the single description of a network: the model, the
//! initialiser, the weight loader and the FLOP ledger all read it and nothing else.

use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::error::{Error, Result};

/// Normalisation layer used before attention, before the FFN and at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormKind {
    /// RMSNorm (Zhang & Sennrich, 2019): `x / rms(x) * w`.
    RmsNorm,
    /// LayerNorm (Ba et al., 2016): `(x - mean) / std * w (+ b)`.
    LayerNorm,
}

/// Feed-forward block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FfnKind {
    /// `down(silu(gate(x)) * up(x))` (Shazeer, 2020).
    Swiglu,
    /// `down(gelu_tanh(gate(x)) * up(x))`.
    Geglu,
    /// `down(gelu_tanh(up(x)))`.
    Gelu,
    /// `down(gelu(up(x)))` with the exact (erf) GELU.
    GeluExact,
    /// `down(relu(up(x)))`.
    Relu,
}

impl FfnKind {
    /// Gated variants have a third projection (`gate_proj`).
    pub fn is_gated(self) -> bool {
        matches!(self, FfnKind::Swiglu | FfnKind::Geglu)
    }
}

/// Rotary frequency scaling for contexts beyond the trained length (transformers'
/// `modeling_rope_utils`: one variant per `rope_type`). Values that a file may leave out
/// (YaRN's and LongRoPE's attention factor, `original_max_position_embeddings`) are
/// resolved by the family adapter, so nothing here is left to interpret.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum RopeScaling {
    #[default]
    None,
    /// Positions divided by `factor` (all frequencies divided by `factor`).
    Linear { factor: f64 },
    /// Llama 3.1: low frequencies divided by `factor`, high ones kept, a smooth ramp between
    /// (wavelengths measured against `original_max_position_embeddings`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// Dynamic NTK: once a forward pass reaches `len > max_position_embeddings` positions,
    /// the base becomes `theta · (factor · len / max − (factor − 1))^(r / (r − 2))` for that
    /// pass (keys already cached keep the rotation they were given).
    Dynamic {
        factor: f64,
        max_position_embeddings: f64,
    },
    /// YaRN (Peng et al., 2023): frequencies interpolated by `factor` below a ramp between
    /// the dims that rotate `beta_fast` and `beta_slow` times over the original context,
    /// extrapolated above it; cos and sin multiplied by `attention_factor`.
    Yarn {
        factor: f64,
        original_max_position_embeddings: f64,
        beta_fast: f64,
        beta_slow: f64,
        /// Round the ramp's ends outward to whole dims (transformers' `truncate`, default true).
        truncate: bool,
        attention_factor: f64,
    },
    /// LongRoPE (Phi-3): per-frequency divisors, `short_factor` while a forward pass
    /// reaches at most `original_max_position_embeddings` positions, `long_factor` beyond;
    /// cos and sin multiplied by `attention_factor`.
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_position_embeddings: f64,
        attention_factor: f64,
    },
}

impl RopeScaling {
    /// The length past which the frequencies depend on how many positions a forward pass
    /// reaches (dynamic NTK, LongRoPE); `None` for fixed frequencies.
    pub fn switch_length(&self) -> Option<usize> {
        match self {
            RopeScaling::Dynamic {
                max_position_embeddings: m,
                ..
            }
            | RopeScaling::LongRope {
                original_max_position_embeddings: m,
                ..
            } => Some(*m as usize),
            _ => None,
        }
    }

    /// What cos and sin are multiplied by (YaRN's and LongRoPE's attention factor).
    pub fn attention_factor(&self) -> f64 {
        match self {
            RopeScaling::Yarn {
                attention_factor, ..
            }
            | RopeScaling::LongRope {
                attention_factor, ..
            } => *attention_factor,
            _ => 1.0,
        }
    }

    /// Problems with the values, for a head whose rotary part has `rotary_dim` dims.
    fn problems(&self, rotary_dim: usize, p: &mut Vec<String>) {
        let positive = |name: &str, v: f64, p: &mut Vec<String>| {
            if !(v > 0.0 && v.is_finite()) {
                p.push(format!("rope scaling: {name} ({v}) must be positive"));
            }
        };
        match self {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => positive("factor", *factor, p),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                positive("factor", *factor, p);
                positive("low_freq_factor", *low_freq_factor, p);
                positive(
                    "original_max_position_embeddings",
                    *original_max_position_embeddings,
                    p,
                );
                if high_freq_factor <= low_freq_factor {
                    p.push(format!("rope scaling: high_freq_factor ({high_freq_factor}) must exceed low_freq_factor ({low_freq_factor})"));
                }
            }
            RopeScaling::Dynamic {
                factor,
                max_position_embeddings,
            } => {
                positive("factor", *factor, p);
                positive("max_position_embeddings", *max_position_embeddings, p);
                if rotary_dim <= 2 {
                    p.push("dynamic rope scaling needs a rotary part of more than 2 dims".into());
                }
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                attention_factor,
                ..
            } => {
                positive("factor", *factor, p);
                positive(
                    "original_max_position_embeddings",
                    *original_max_position_embeddings,
                    p,
                );
                positive("beta_fast", *beta_fast, p);
                positive("beta_slow", *beta_slow, p);
                positive("attention_factor", *attention_factor, p);
            }
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor,
            } => {
                positive(
                    "original_max_position_embeddings",
                    *original_max_position_embeddings,
                    p,
                );
                positive("attention_factor", *attention_factor, p);
                for (name, f) in [("short_factor", short_factor), ("long_factor", long_factor)] {
                    if f.len() != rotary_dim / 2 {
                        p.push(format!(
                            "rope scaling: {name} has {} values, the rotary part needs {} (rotary dims / 2)",
                            f.len(),
                            rotary_dim / 2
                        ));
                    }
                    if f.iter().any(|v| !(*v > 0.0 && v.is_finite())) {
                        p.push(format!("rope scaling: every {name} value must be positive"));
                    }
                }
            }
        }
    }
}

/// How the attention and feed-forward sub-blocks are wired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockKind {
    /// `x = x + attn(n1(x)); x = x + ffn(n2(x))`.
    #[default]
    Sequential,
    /// `x = x + attn(n1(x)) + ffn(n2(x))` (GPT-NeoX).
    Parallel,
    /// `x = x + attn(n1(x)) + ffn(n1(x))`, one norm (GPT-J, Phi-2).
    ParallelSharedNorm,
}

/// RMSNorm of queries and keys before the rotary embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QkNorm {
    #[default]
    None,
    /// Over each head (`head_dim` weights; Qwen3, Gemma 3).
    PerHead,
    /// Over all heads together (`n_heads·head_dim` weights; OLMoE).
    Full,
}

/// Options that can differ from layer to layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerSpec {
    /// Sliding-window attention: a query sees itself and the `window - 1` keys before it.
    #[serde(default)]
    pub window: Option<usize>,
    /// The feed-forward block is the Mixture-of-Experts layer described by
    /// [`ModelConfig::moe`] instead of the dense FFN.
    #[serde(default)]
    pub moe: bool,
    /// A Mixture-of-Depths block: only the tokens its router picks (see
    /// [`ModelConfig::depth`]) go through it; the others skip it on the residual path.
    #[serde(default)]
    pub routed: bool,
}

/// Mixture-of-Depths (Raposo et al., 2024, arXiv:2404.02258) for the layers whose
/// [`LayerSpec::routed`] is set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DepthConfig {
    /// Share of a sequence's tokens that go through a routed block (k = ceil(capacity · T)).
    pub capacity: f64,
    /// Weight of the auxiliary binary cross-entropy that teaches the causal decider (the
    /// predictor when there is one, else the router's own score) to predict top-k
    /// membership; its sign decides at sampling time.
    #[serde(default = "one")]
    pub aux_loss_coef: f64,
    /// Hidden width of a small MLP predictor of top-k membership, trained on the block
    /// input with the gradient stopped (the paper's second method); 0: none, the router's
    /// own score decides.
    #[serde(default)]
    pub predictor: usize,
    /// How training picks the tokens: the router's top-k (learned) or k at random (an
    /// ablation; sampling then processes each token with probability `capacity`).
    #[serde(default)]
    pub selection: DepthSelection,
}

/// How a routed block's tokens are selected in training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DepthSelection {
    #[default]
    Learned,
    Random,
}

/// Multi-head latent attention (DeepSeek-V2/V3, arXiv:2405.04434 §2.1): queries and
/// keys/values pass through low-rank bottlenecks; each head's query and key are a
/// position-free part (`qk_nope_dim`) and a rotary part (`qk_rope_dim`), the key's rotary
/// part shared by all heads. `head_dim` is `qk_nope_dim + qk_rope_dim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlaConfig {
    /// Query bottleneck width (None: a full-rank query projection).
    pub q_lora_rank: Option<usize>,
    /// Key/value bottleneck width.
    pub kv_lora_rank: usize,
    pub qk_nope_dim: usize,
    pub qk_rope_dim: usize,
    pub v_head_dim: usize,
}

/// How router logits become expert scores.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scoring {
    /// Softmax over all experts (Switch, Mixtral, Qwen-MoE, OLMoE).
    #[default]
    Softmax,
    /// Independent sigmoids (DeepSeek-V3).
    Sigmoid,
    /// SparseMixer (PhiMoE, arXiv:2409.12136), deterministic form: the `j`-th choice is the
    /// best logit `m` not chosen yet, and its weight is its softmax among the experts not
    /// chosen yet whose logit `s` is close to it, `(m − s) / max(|s|, m) ≤ 2·eps`. No
    /// renormalisation; the gradient is the masked softmax's.
    SparseMixer { eps: f64 },
}

/// A Mixture-of-Experts feed-forward layer (used by layers whose [`LayerSpec::moe`] is set).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeConfig {
    /// Routed experts.
    pub n_experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Hidden width of one expert (fine-grained experts: smaller than a dense FFN).
    pub d_expert: usize,
    #[serde(default)]
    pub scoring: Scoring,
    /// Divide the chosen experts' weights by their sum.
    #[serde(default)]
    pub norm_topk: bool,
    /// Multiplies the routed experts' combined output (DeepSeek-V3's routed_scaling_factor).
    #[serde(default = "one")]
    pub routed_scale: f64,
    /// Group-limited routing: experts form `n_groups` groups and only the best `topk_groups`
    /// groups (by the sum of their two best scores) are eligible.
    #[serde(default = "one_usize")]
    pub n_groups: usize,
    #[serde(default = "one_usize")]
    pub topk_groups: usize,
    /// A per-expert bias added to the scores for choosing experts only (auxiliary-loss-free
    /// balancing; DeepSeek-V3's `e_score_correction_bias`).
    #[serde(default)]
    pub selection_bias: bool,
    /// Always-on shared experts' total hidden width (0: none).
    #[serde(default)]
    pub d_shared: usize,
    /// The shared expert's output is scaled by `sigmoid(w · x)` (Qwen2-MoE).
    #[serde(default)]
    pub shared_gate: bool,
    /// Load-balancing loss coefficient (Switch Transformer, arXiv:2101.03961 eq. 4).
    #[serde(default)]
    pub aux_loss_coef: f64,
    /// Router z-loss coefficient (ST-MoE, arXiv:2202.08906 eq. 5).
    #[serde(default)]
    pub z_loss_coef: f64,
    /// Auxiliary-loss-free balancing (DeepSeek-V3): after each training step every expert's
    /// selection bias moves by this much toward equal load (needs `selection_bias`).
    #[serde(default)]
    pub bias_update_rate: f64,
    /// Expert capacity as a multiple of the even share `tokens·top_k/n_experts`;
    /// assignments past it are dropped (the token keeps its residual). None: dropless.
    #[serde(default)]
    pub capacity_factor: Option<f64>,
    /// No-op experts routed like the others (integrated MoDE, Raposo et al. §3.5): a token
    /// sent to one gets nothing from that slot and keeps its residual, so compute per token
    /// varies. They take router rows `n_experts..n_experts + noop_experts`.
    #[serde(default)]
    pub noop_experts: usize,
    /// Expert choice (Zhou et al., 2022): each expert takes its top
    /// `capacity_factor · t · top_k / n_experts` tokens of each sequence instead of each
    /// token its top-k experts. It looks at the whole sequence, so models that use it
    /// train and evaluate but do not sample.
    #[serde(default)]
    pub expert_choice: bool,
}

impl MoeConfig {
    /// `top_k` of `n_experts` experts of width `d_expert`, softmax scores renormalised over
    /// the chosen ones, and nothing else: no groups, selection bias, shared or no-op
    /// experts, capacity limit or auxiliary losses. Variants change fields from here.
    pub fn new(n_experts: usize, top_k: usize, d_expert: usize) -> Self {
        MoeConfig {
            n_experts,
            top_k,
            d_expert,
            scoring: Scoring::Softmax,
            norm_topk: true,
            routed_scale: 1.0,
            n_groups: 1,
            topk_groups: 1,
            selection_bias: false,
            d_shared: 0,
            shared_gate: false,
            aux_loss_coef: 0.0,
            z_loss_coef: 0.0,
            capacity_factor: None,
            noop_experts: 0,
            expert_choice: false,
            bias_update_rate: 0.0,
        }
    }

    /// Router outputs: the experts and the no-op experts.
    pub fn slots(&self) -> usize {
        self.n_experts + self.noop_experts
    }
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

fn one() -> f64 {
    1.0
}

fn one_usize() -> usize {
    1
}

/// How token positions enter the network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Position {
    /// Rotary embedding (Su et al., 2021) on the first `rotary_dim` dims of each head,
    /// halves layout (`rotate_half`, as Hugging Face Llama).
    Rope {
        theta: f64,
        rotary_dim: usize,
        #[serde(default)]
        scaling: RopeScaling,
    },
    /// A learned absolute position embedding added to the token embedding.
    Learned,
    /// No positional information (the causal mask alone).
    None,
    /// Attention with linear biases (Press et al., 2022): each head adds
    /// `slope_h · (j − i)` to the score of query `i` and key `j`; BLOOM's slopes.
    Alibi,
    /// Learned relative position biases (T5, Raffel et al., 2020): each head adds a learned
    /// scalar for the bucket of `j − i` (exact for short distances, logarithmic up to
    /// `max_distance`; a bidirectional encoder gives each direction half the buckets). One
    /// table per stack, used by all its layers.
    Relative { buckets: usize, max_distance: usize },
}

/// A resolved, validated model description.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Number of token ids.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Number of query heads.
    pub n_heads: usize,
    /// Number of key/value heads (`n_heads`: MHA, 1: MQA, in between: GQA).
    pub n_kv_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// Hidden width of the feed-forward block.
    pub d_ff: usize,
    /// Longest sequence the model accepts (context window).
    pub max_seq_len: usize,
    pub norm: NormKind,
    pub norm_eps: f64,
    /// LayerNorm with a bias term (ignored for RMSNorm).
    pub norm_bias: bool,
    pub ffn: FfnKind,
    /// Biases on the FFN projections.
    pub ffn_bias: bool,
    /// Biases on the q, k, v projections.
    pub qkv_bias: bool,
    /// Bias on the attention output projection.
    pub out_bias: bool,
    pub position: Position,
    /// LM head shares the token embedding matrix.
    pub tie_embeddings: bool,
    /// Standard deviation of the normal initialiser (output projections are scaled by
    /// `1/sqrt(2 n_layers)` as in GPT-2).
    pub init_std: f64,
    /// Per-layer options; empty means every layer uses the defaults.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<LayerSpec>,
    #[serde(default)]
    pub block: BlockKind,
    #[serde(default)]
    pub qk_norm: QkNorm,
    /// Attention score scale (default `1/sqrt(head_dim)`).
    #[serde(default)]
    pub attn_scale: Option<f64>,
    /// Attention logits soft-capped as `cap · tanh(s / cap)` (Gemma 2).
    #[serde(default)]
    pub attn_softcap: Option<f64>,
    /// Final logits soft-capped the same way.
    #[serde(default)]
    pub final_softcap: Option<f64>,
    /// Extra norms on the attention and FFN outputs before the residual add (Gemma 2/3).
    #[serde(default)]
    pub sandwich_norms: bool,
    /// Norms multiply by `offset + weight` (Gemma stores weights around 0: offset 1).
    #[serde(default)]
    pub norm_offset: f64,
    /// Token embeddings multiplied by this (Gemma: `sqrt(d_model)`).
    #[serde(default)]
    pub embed_scale: Option<f64>,
    /// Bias on the LM head (Phi-2).
    #[serde(default)]
    pub head_bias: bool,
    /// Multi-head latent attention instead of q/k/v projections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mla: Option<MlaConfig>,
    /// Mixture-of-Depths settings for layers whose [`LayerSpec::routed`] is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depth: Option<DepthConfig>,
    /// The Mixture-of-Experts layer used where [`LayerSpec::moe`] is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moe: Option<MoeConfig>,
    /// Rotary base of the sliding-window layers, which then use
    /// [`ModelConfig::local_rope_scaling`] (Gemma 3's local layers); `None`: every layer
    /// uses [`ModelConfig::position`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_rope_theta: Option<f64>,
    /// Rope scaling of the sliding-window layers when they have their own base.
    #[serde(default, skip_serializing_if = "is_default")]
    pub local_rope_scaling: RopeScaling,
    /// A norm on the token embeddings before the first block (BLOOM).
    #[serde(default)]
    pub embed_norm: bool,
    /// Query, key and value projections clamped to `[-c, c]` after the full q/k norms (OLMoE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_qkv: Option<f64>,
    /// An encoder-decoder (T5): a bidirectional encoder of this many blocks reads the
    /// source, and every one of the `n_layers` (causal) decoder blocks attends to its
    /// output through a cross-attention sub-block. 0: decoder-only.
    #[serde(default, skip_serializing_if = "is_default")]
    pub encoder_layers: usize,
    /// The first decoder input of an encoder-decoder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoder_start: Option<u32>,
    /// The final hidden state is multiplied by this before the head (T5 with a tied head:
    /// `d_model^-0.5`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_scale: Option<f64>,
}

/// The file form of [`ModelConfig`]: every field optional where a default makes sense.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfigFile {
    /// Number of token ids (default 256: byte-level).
    pub vocab_size: Option<usize>,
    pub d_model: Option<usize>,
    pub n_layers: Option<usize>,
    pub n_heads: Option<usize>,
    /// Default: `n_heads`.
    pub n_kv_heads: Option<usize>,
    /// Default: `d_model / n_heads`.
    pub head_dim: Option<usize>,
    /// Default: 4·d_model for plain FFNs, 8/3·d_model rounded up to a multiple of 32 for gated.
    pub d_ff: Option<usize>,
    /// Default 256.
    pub max_seq_len: Option<usize>,
    /// Default `rms_norm`.
    pub norm: Option<NormKind>,
    /// Default 1e-5.
    pub norm_eps: Option<f64>,
    pub norm_bias: Option<bool>,
    /// Default `swiglu`.
    pub ffn: Option<FfnKind>,
    pub ffn_bias: Option<bool>,
    pub qkv_bias: Option<bool>,
    pub out_bias: Option<bool>,
    /// `rope` (default), `learned`, `alibi` or `none`.
    pub position: Option<String>,
    /// Rotary base (default 10000).
    pub rope_theta: Option<f64>,
    /// Rotary dims per head (default `head_dim`).
    pub rotary_dim: Option<usize>,
    /// Default true.
    pub tie_embeddings: Option<bool>,
    /// Default 0.02.
    pub init_std: Option<f64>,
    /// Sliding-window attention in every layer (default: none).
    pub sliding_window: Option<usize>,
    /// `sequential` (default), `parallel` or `parallel_shared_norm`.
    pub block: Option<BlockKind>,
    /// `none` (default), `per_head` or `full`.
    pub qk_norm: Option<QkNorm>,
    /// A Mixture-of-Experts FFN in some or all layers (`[model.moe]`).
    pub moe: Option<MoeFile>,
    /// Mixture-of-Depths routing of some blocks (`[model.depth]`).
    pub depth: Option<DepthFile>,
}

/// The file form of [`DepthConfig`] plus which blocks are routed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DepthFile {
    /// Default 0.125.
    pub capacity: Option<f64>,
    /// Default 1.0.
    pub aux_loss_coef: Option<f64>,
    /// Hidden width of the MLP predictor of top-k membership (default 0: none, the
    /// router's own score decides at sampling time).
    pub predictor: Option<usize>,
    /// `learned` (default) or `random` (ablation).
    pub selection: Option<DepthSelection>,
    /// Route every `every`-th block, the last of each group (default 2: blocks 1, 3, 5, …),
    /// unless `layers` lists them.
    pub every: Option<usize>,
    pub layers: Option<Vec<usize>>,
}

/// The file form of [`MoeConfig`] plus which layers use it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeFile {
    /// Default 8.
    pub n_experts: Option<usize>,
    /// Default 2.
    pub top_k: Option<usize>,
    /// Expert width; default `d_ff / top_k` (the dense FFN's active FLOPs per token).
    pub d_expert: Option<usize>,
    /// `softmax` (default) or `sigmoid`.
    pub scoring: Option<Scoring>,
    /// Default true.
    pub norm_topk: Option<bool>,
    /// Default 1.
    pub routed_scale: Option<f64>,
    /// Default 1 (no group limit).
    pub n_groups: Option<usize>,
    pub topk_groups: Option<usize>,
    /// Default false.
    pub selection_bias: Option<bool>,
    /// Shared expert width; default 0 (none).
    pub d_shared: Option<usize>,
    pub shared_gate: Option<bool>,
    /// Default 0.01.
    pub aux_loss_coef: Option<f64>,
    /// Default 0.001.
    pub z_loss_coef: Option<f64>,
    /// Default: dropless.
    pub capacity_factor: Option<f64>,
    /// Default 0 (off); with it, `selection_bias` defaults to true.
    pub bias_update_rate: Option<f64>,
    /// No-op experts among the experts (integrated MoDE); default 0.
    pub noop_experts: Option<usize>,
    /// Expert-choice routing (default false: token choice); not causal, so no sampling.
    pub expert_choice: Option<bool>,
    /// MoE in every `every`-th layer (default 1) after the first `first_dense` (default 0),
    /// unless `layers` lists them explicitly.
    pub every: Option<usize>,
    pub first_dense: Option<usize>,
    pub layers: Option<Vec<usize>>,
}

impl MoeFile {
    fn resolve(&self, d_ff: usize, n_layers: usize) -> (MoeConfig, Vec<bool>) {
        let top_k = self.top_k.unwrap_or(2);
        let n_groups = self.n_groups.unwrap_or(1);
        let c = MoeConfig {
            n_experts: self.n_experts.unwrap_or(8),
            top_k,
            d_expert: self.d_expert.unwrap_or(d_ff / top_k.max(1)),
            scoring: self.scoring.unwrap_or_default(),
            norm_topk: self.norm_topk.unwrap_or(true),
            routed_scale: self.routed_scale.unwrap_or(1.0),
            n_groups,
            topk_groups: self.topk_groups.unwrap_or(n_groups),
            selection_bias: self
                .selection_bias
                .unwrap_or(self.bias_update_rate.is_some_and(|r| r > 0.0)),
            bias_update_rate: self.bias_update_rate.unwrap_or(0.0),
            d_shared: self.d_shared.unwrap_or(0),
            shared_gate: self.shared_gate.unwrap_or(false),
            aux_loss_coef: self.aux_loss_coef.unwrap_or(0.01),
            z_loss_coef: self.z_loss_coef.unwrap_or(0.001),
            capacity_factor: self.capacity_factor,
            noop_experts: self.noop_experts.unwrap_or(0),
            expert_choice: self.expert_choice.unwrap_or(false),
        };
        let (every, first) = (
            self.every.unwrap_or(1).max(1),
            self.first_dense.unwrap_or(0),
        );
        let marks = (0..n_layers)
            .map(|l| match &self.layers {
                Some(list) => list.contains(&l),
                None => l >= first && (l - first).is_multiple_of(every),
            })
            .collect();
        (c, marks)
    }
}

impl From<(&MoeConfig, &[LayerSpec])> for MoeFile {
    fn from((m, layers): (&MoeConfig, &[LayerSpec])) -> Self {
        MoeFile {
            n_experts: Some(m.n_experts),
            top_k: Some(m.top_k),
            d_expert: Some(m.d_expert),
            scoring: Some(m.scoring),
            norm_topk: Some(m.norm_topk),
            routed_scale: Some(m.routed_scale),
            n_groups: Some(m.n_groups),
            topk_groups: Some(m.topk_groups),
            selection_bias: Some(m.selection_bias),
            d_shared: Some(m.d_shared),
            shared_gate: Some(m.shared_gate),
            aux_loss_coef: Some(m.aux_loss_coef),
            z_loss_coef: Some(m.z_loss_coef),
            capacity_factor: m.capacity_factor,
            bias_update_rate: Some(m.bias_update_rate),
            noop_experts: Some(m.noop_experts),
            expert_choice: Some(m.expert_choice),
            every: None,
            first_dense: None,
            layers: Some(
                layers
                    .iter()
                    .enumerate()
                    .filter(|(_, l)| l.moe)
                    .map(|(i, _)| i)
                    .collect(),
            ),
        }
    }
}

impl ModelConfigFile {
    /// Fill defaults and validate. `origin` names the file in errors.
    pub fn resolve(&self, origin: &str) -> Result<ModelConfig> {
        let mut problems = Vec::new();
        let need = |v: Option<usize>, name: &str, problems: &mut Vec<String>| {
            v.unwrap_or_else(|| {
                problems.push(format!("{name} is required"));
                0
            })
        };
        let d_model = need(self.d_model, "d_model", &mut problems);
        let n_layers = need(self.n_layers, "n_layers", &mut problems);
        let n_heads = need(self.n_heads, "n_heads", &mut problems);
        if !problems.is_empty() {
            return Err(Error::Config {
                origin: origin.into(),
                problems,
            });
        }
        let ffn = self.ffn.unwrap_or(FfnKind::Swiglu);
        let head_dim = self
            .head_dim
            .unwrap_or(d_model.checked_div(n_heads).unwrap_or(0));
        if self.head_dim.is_none() && n_heads > 0 && !d_model.is_multiple_of(n_heads) {
            problems.push(format!(
                "n_heads ({n_heads}) must divide d_model ({d_model}), or set head_dim"
            ));
        }
        let d_ff = self.d_ff.unwrap_or(if ffn.is_gated() {
            (8 * d_model / 3).div_ceil(32) * 32
        } else {
            4 * d_model
        });
        let position = match self.position.as_deref().unwrap_or("rope") {
            "rope" => Position::Rope {
                theta: self.rope_theta.unwrap_or(10_000.0),
                rotary_dim: self.rotary_dim.unwrap_or(head_dim),
                scaling: RopeScaling::None,
            },
            "learned" => Position::Learned,
            "none" => Position::None,
            "alibi" => Position::Alibi,
            other => {
                problems.push(format!(
                    "position '{other}' is unknown (rope, learned, alibi, none)"
                ));
                Position::None
            }
        };
        let cfg = ModelConfig {
            vocab_size: self.vocab_size.unwrap_or(256),
            d_model,
            n_layers,
            n_heads,
            n_kv_heads: self.n_kv_heads.unwrap_or(n_heads),
            head_dim,
            d_ff,
            max_seq_len: self.max_seq_len.unwrap_or(256),
            norm: self.norm.unwrap_or(NormKind::RmsNorm),
            norm_eps: self.norm_eps.unwrap_or(1e-5),
            norm_bias: self.norm_bias.unwrap_or(false),
            ffn,
            ffn_bias: self.ffn_bias.unwrap_or(false),
            qkv_bias: self.qkv_bias.unwrap_or(false),
            out_bias: self.out_bias.unwrap_or(false),
            position,
            tie_embeddings: self.tie_embeddings.unwrap_or(true),
            init_std: self.init_std.unwrap_or(0.02),
            layers: match self.sliding_window {
                Some(w) => vec![
                    LayerSpec {
                        window: Some(w),
                        moe: false,
                        routed: false
                    };
                    n_layers
                ],
                None => Vec::new(),
            },
            block: self.block.unwrap_or_default(),
            qk_norm: self.qk_norm.unwrap_or_default(),
            ..ModelConfig::default()
        };
        let mut cfg = cfg;
        if let Some(df) = &self.depth {
            if cfg.layers.is_empty() {
                cfg.layers = vec![LayerSpec::default(); n_layers];
            }
            let every = df.every.unwrap_or(2).max(1);
            for (l, spec) in cfg.layers.iter_mut().enumerate() {
                spec.routed = match &df.layers {
                    Some(list) => list.contains(&l),
                    None => l % every == every - 1,
                };
            }
            cfg.depth = Some(DepthConfig {
                capacity: df.capacity.unwrap_or(0.125),
                aux_loss_coef: df.aux_loss_coef.unwrap_or(1.0),
                predictor: df.predictor.unwrap_or(0),
                selection: df.selection.unwrap_or_default(),
            });
        }
        if let Some(mf) = &self.moe {
            let (m, marks) = mf.resolve(cfg.d_ff, n_layers);
            if cfg.layers.is_empty() {
                cfg.layers = vec![LayerSpec::default(); n_layers];
            }
            for (spec, on) in cfg.layers.iter_mut().zip(marks) {
                spec.moe = on;
            }
            cfg.moe = Some(m);
        }
        problems.extend(cfg.problems());
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(Error::Config {
                origin: origin.into(),
                problems,
            })
        }
    }
}

impl Default for ModelConfig {
    /// A base for struct-update syntax: the option fields at their neutral values (no
    /// routing, no caps, pre-norm RMSNorm, SwiGLU, RoPE); the sizes are zero, so a config
    /// that forgets one fails [`ModelConfig::problems`].
    fn default() -> Self {
        Self {
            vocab_size: 0,
            d_model: 0,
            n_layers: 0,
            n_heads: 0,
            n_kv_heads: 0,
            head_dim: 0,
            d_ff: 0,
            max_seq_len: 0,
            norm: NormKind::RmsNorm,
            norm_eps: 1e-5,
            norm_bias: false,
            ffn: FfnKind::Swiglu,
            ffn_bias: false,
            qkv_bias: false,
            out_bias: false,
            position: Position::None,
            tie_embeddings: false,
            init_std: 0.02,
            layers: Vec::new(),
            block: BlockKind::Sequential,
            qk_norm: QkNorm::None,
            attn_scale: None,
            attn_softcap: None,
            final_softcap: None,
            sandwich_norms: false,
            norm_offset: 0.0,
            embed_scale: None,
            head_bias: false,
            mla: None,
            depth: None,
            moe: None,
            local_rope_theta: None,
            local_rope_scaling: RopeScaling::None,
            embed_norm: false,
            clip_qkv: None,
            encoder_layers: 0,
            decoder_start: None,
            output_scale: None,
        }
    }
}

/// Upper bounds that catch absurd files before anything is allocated.
const MAX_DIM: usize = 1 << 20;
const MAX_VOCAB: usize = 1 << 24;

impl ModelConfig {
    /// Every problem with this configuration, empty when it is valid.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let positive = [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("d_ff", self.d_ff),
            ("max_seq_len", self.max_seq_len),
        ];
        for (name, v) in positive {
            if v == 0 {
                p.push(format!("{name} must be positive"));
            }
        }
        for (name, v) in [
            ("d_model", self.d_model),
            ("d_ff", self.d_ff),
            ("head_dim", self.head_dim),
        ] {
            if v > MAX_DIM {
                p.push(format!("{name} ({v}) is larger than {MAX_DIM}"));
            }
        }
        if self.vocab_size > MAX_VOCAB {
            p.push(format!(
                "vocab_size ({}) is larger than {MAX_VOCAB}",
                self.vocab_size
            ));
        }
        if self.n_layers > 1024 || self.n_heads > 4096 || self.max_seq_len > 1 << 22 {
            p.push("n_layers, n_heads or max_seq_len is absurdly large".into());
        }
        if self.n_kv_heads > 0 && !self.n_heads.is_multiple_of(self.n_kv_heads) {
            p.push(format!(
                "n_kv_heads ({}) must divide n_heads ({})",
                self.n_kv_heads, self.n_heads
            ));
        }
        if !self.layers.is_empty() && self.layers.len() != self.n_layers {
            p.push(format!(
                "layers has {} entries for {} layers",
                self.layers.len(),
                self.n_layers
            ));
        }
        match &self.depth {
            Some(dc) => {
                if !(dc.capacity > 0.0 && dc.capacity <= 1.0) {
                    p.push(format!(
                        "depth.capacity ({}) must be in (0, 1]",
                        dc.capacity
                    ));
                }
                if !self.layers.iter().any(|l| l.routed) {
                    p.push("depth is set but no layer is routed".into());
                }
                if self.layers.iter().any(|l| l.routed && l.window.is_some()) {
                    p.push(
                        "a routed (Mixture-of-Depths) layer cannot also use a sliding window"
                            .into(),
                    );
                }
            }
            None if self.layers.iter().any(|l| l.routed) => {
                p.push("a layer is routed but the config has no depth section".into())
            }
            None => {}
        }
        if let Some(a) = &self.mla {
            if a.qk_nope_dim + a.qk_rope_dim != self.head_dim || self.n_kv_heads != self.n_heads {
                p.push(format!(
                    "mla: head_dim ({}) must be qk_nope_dim + qk_rope_dim ({} + {}) and n_kv_heads = n_heads",
                    self.head_dim, a.qk_nope_dim, a.qk_rope_dim
                ));
            }
            if !matches!(self.position, Position::Rope { rotary_dim, .. } if rotary_dim == a.qk_rope_dim)
            {
                p.push("mla: the rotary part must be rope with rotary_dim = qk_rope_dim".into());
            }
            if self.qkv_bias
                || self.qk_norm != QkNorm::None
                || a.kv_lora_rank == 0
                || a.v_head_dim == 0
            {
                p.push(
                    "mla: no q/k/v biases or q/k norms; kv_lora_rank and v_head_dim positive"
                        .into(),
                );
            }
        }
        if let Some(m) = &self.moe {
            if m.n_experts == 0 || m.top_k == 0 || m.top_k > m.slots() || m.d_expert == 0 {
                p.push(format!(
                    "moe: need 0 < top_k ({}) <= n_experts ({}) and d_expert ({}) > 0",
                    m.top_k, m.n_experts, m.d_expert
                ));
            }
            if m.n_experts > 1 << 16 || m.d_expert > MAX_DIM {
                p.push("moe: n_experts or d_expert is absurdly large".into());
            }
            if m.expert_choice
                && (m.noop_experts > 0
                    || m.n_groups > 1
                    || m.selection_bias
                    || matches!(m.scoring, Scoring::SparseMixer { .. }))
            {
                p.push("moe: expert choice takes softmax or sigmoid scores, without no-op experts, groups or a selection bias".into());
            }
            if m.noop_experts > 0 && m.n_groups > 1 {
                p.push("moe: no-op experts do not combine with group-limited routing".into());
            }
            if m.n_groups == 0
                || m.n_experts % m.n_groups.max(1) != 0
                || m.topk_groups == 0
                || m.topk_groups > m.n_groups
            {
                p.push(format!(
                    "moe: n_groups ({}) must divide n_experts ({}) and 0 < topk_groups ({}) <= n_groups",
                    m.n_groups, m.n_experts, m.topk_groups
                ));
            }
        } else if self.layers.iter().any(|l| l.moe) {
            p.push("a layer is marked moe but the config has no moe section".into());
        }
        if self.layers.iter().any(|l| l.window == Some(0)) {
            p.push("a sliding window must be positive".into());
        }
        for (name, v) in [
            ("attn_softcap", self.attn_softcap),
            ("final_softcap", self.final_softcap),
            ("attn_scale", self.attn_scale),
            ("clip_qkv", self.clip_qkv),
        ] {
            if v.is_some_and(|v| !(v > 0.0 && v.is_finite())) {
                p.push(format!("{name} must be positive"));
            }
        }
        if let Position::Rope {
            theta,
            rotary_dim,
            ref scaling,
        } = self.position
        {
            scaling.problems(rotary_dim, &mut p);
            self.local_rope_scaling.problems(rotary_dim, &mut p);
            if self.depth.is_some()
                && (scaling.switch_length().is_some()
                    || self.local_rope_scaling.switch_length().is_some())
            {
                p.push("length-dependent rope scaling (dynamic, longrope) in routed (Mixture-of-Depths) blocks is not supported".into());
            }
            if rotary_dim % 2 != 0 || rotary_dim > self.head_dim || rotary_dim == 0 {
                p.push(format!(
                    "rotary_dim ({rotary_dim}) must be even, positive and at most head_dim ({})",
                    self.head_dim
                ));
            }
            if !(theta > 0.0 && theta.is_finite()) {
                p.push(format!("rope_theta ({theta}) must be positive"));
            }
        }
        if self
            .local_rope_theta
            .is_some_and(|t| !(t > 0.0 && t.is_finite()))
        {
            p.push("local_rope_theta must be positive".into());
        }
        if let Position::Relative {
            buckets,
            max_distance,
        } = self.position
        {
            if buckets < 4 || max_distance < buckets || buckets > MAX_DIM {
                p.push(format!(
                    "relative positions need 4 <= buckets <= max_distance (got {buckets} and {max_distance})"
                ));
            }
            if self.depth.is_some() {
                p.push(
                    "relative positions in routed (Mixture-of-Depths) blocks are not supported"
                        .into(),
                );
            }
        }
        if self.encoder_layers > 1024 {
            p.push(format!(
                "encoder_layers ({}) is absurdly large",
                self.encoder_layers
            ));
        }
        if self.encoder_layers > 0 {
            match self.decoder_start {
                Some(s) if (s as usize) < self.vocab_size => {}
                _ => p.push(
                    "an encoder-decoder needs a decoder_start id inside the vocabulary".into(),
                ),
            }
            if self.block != BlockKind::Sequential || self.mla.is_some() || self.depth.is_some() {
                p.push("an encoder-decoder takes sequential blocks without latent attention or Mixture-of-Depths".into());
            }
        }
        if self
            .output_scale
            .is_some_and(|s| !(s > 0.0 && s.is_finite()))
        {
            p.push("output_scale must be positive".into());
        }
        if self.position == Position::Alibi && self.depth.is_some() {
            p.push("ALiBi positions in routed (Mixture-of-Depths) blocks are not supported".into());
        }
        if !(self.norm_eps > 0.0 && self.norm_eps < 1.0) {
            p.push(format!("norm_eps ({}) must be in (0, 1)", self.norm_eps));
        }
        if !(self.init_std > 0.0 && self.init_std.is_finite()) {
            p.push(format!("init_std ({}) must be positive", self.init_std));
        }
        p
    }

    /// The options of layer `l`.
    pub fn layer(&self, l: usize) -> LayerSpec {
        self.layers.get(l).copied().unwrap_or_default()
    }

    /// Query width `n_heads * head_dim`.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of the attention output (the o_proj input): `n_heads * v_head_dim` with latent
    /// attention, `q_dim()` otherwise.
    pub fn attn_out_dim(&self) -> usize {
        match &self.mla {
            Some(a) => self.n_heads * a.v_head_dim,
            None => self.q_dim(),
        }
    }

    /// Key (and value) width `n_kv_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Read a model config from a TOML or JSON file: either a bare model table or a run
    /// preset with a `[model]` table.
    pub fn from_file(path: &Path) -> Result<Self> {
        let preset = RunFile::from_file(path)?;
        preset.model.resolve(&path.display().to_string())
    }
}

/// A run preset: the model and, optionally, the training recipe (our TOML presets).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunFile {
    pub model: ModelConfigFile,
    #[serde(default)]
    pub train: crate::train::TrainConfigFile,
}

impl RunFile {
    /// Parse a preset file; `.json` as JSON, anything else as TOML. A file without a
    /// `[model]` table is read as a bare model table.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let is_json = path.extension().is_some_and(|e| e == "json");
        Self::parse(&text, is_json).map_err(|msg| Error::parse(path, msg))
    }

    /// Parse preset text (TOML or JSON).
    pub fn parse(text: &str, is_json: bool) -> std::result::Result<Self, String> {
        if is_json {
            let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
            if v.get("model").is_some() {
                serde_json::from_value(v).map_err(|e| e.to_string())
            } else {
                let model = serde_json::from_value(v).map_err(|e| e.to_string())?;
                Ok(RunFile {
                    model,
                    train: Default::default(),
                })
            }
        } else {
            let v: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
            if v.contains_key("model") {
                toml::from_str(text).map_err(|e| e.to_string())
            } else {
                let model = toml::from_str(text).map_err(|e| e.to_string())?;
                Ok(RunFile {
                    model,
                    train: Default::default(),
                })
            }
        }
    }
}

impl From<&ModelConfig> for ModelConfigFile {
    fn from(c: &ModelConfig) -> Self {
        let (position, rope_theta, rotary_dim) = match c.position {
            Position::Rope {
                theta, rotary_dim, ..
            } => ("rope", Some(theta), Some(rotary_dim)),
            Position::Learned => ("learned", None, None),
            Position::None => ("none", None, None),
            Position::Alibi => ("alibi", None, None),
            // not expressible in the file form (encoder-decoders come from their family)
            Position::Relative { .. } => ("none", None, None),
        };
        ModelConfigFile {
            vocab_size: Some(c.vocab_size),
            d_model: Some(c.d_model),
            n_layers: Some(c.n_layers),
            n_heads: Some(c.n_heads),
            n_kv_heads: Some(c.n_kv_heads),
            head_dim: Some(c.head_dim),
            d_ff: Some(c.d_ff),
            max_seq_len: Some(c.max_seq_len),
            norm: Some(c.norm),
            norm_eps: Some(c.norm_eps),
            norm_bias: Some(c.norm_bias),
            ffn: Some(c.ffn),
            ffn_bias: Some(c.ffn_bias),
            qkv_bias: Some(c.qkv_bias),
            out_bias: Some(c.out_bias),
            position: Some(position.into()),
            rope_theta,
            rotary_dim,
            tie_embeddings: Some(c.tie_embeddings),
            init_std: Some(c.init_std),
            sliding_window: c.layers.first().and_then(|l| l.window),
            block: Some(c.block),
            qk_norm: Some(c.qk_norm),
            moe: c
                .moe
                .as_ref()
                .map(|m| MoeFile::from((m, c.layers.as_slice()))),
            depth: c.depth.map(|dc| DepthFile {
                capacity: Some(dc.capacity),
                aux_loss_coef: Some(dc.aux_loss_coef),
                predictor: Some(dc.predictor),
                selection: Some(dc.selection),
                every: None,
                layers: Some(
                    c.layers
                        .iter()
                        .enumerate()
                        .filter(|(_, l)| l.routed)
                        .map(|(i, _)| i)
                        .collect(),
                ),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_lists_every_problem() {
        let f = ModelConfigFile {
            d_model: Some(100),
            n_layers: Some(2),
            n_heads: Some(3),
            n_kv_heads: Some(2),
            norm_eps: Some(0.0),
            ..Default::default()
        };
        let err = f.resolve("test.toml").unwrap_err().to_string();
        assert!(
            err.contains("n_heads (3) must divide d_model (100)"),
            "{err}"
        );
        assert!(
            err.contains("n_kv_heads (2) must divide n_heads (3)"),
            "{err}"
        );
        assert!(err.contains("norm_eps"), "{err}");
        assert!(err.starts_with("test.toml"), "{err}");
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = RunFile::parse("[model]\nd_model = 8\nn_layer = 2\n", false).unwrap_err();
        assert!(err.contains("n_layer"), "{err}");
    }

    #[test]
    fn resolved_config_round_trips_through_file_form() {
        let f = ModelConfigFile {
            d_model: Some(64),
            n_layers: Some(2),
            n_heads: Some(4),
            n_kv_heads: Some(2),
            ..Default::default()
        };
        let c = f.resolve("x").unwrap();
        let again = ModelConfigFile::from(&c).resolve("x").unwrap();
        assert_eq!(c, again);
        assert_eq!(c.d_ff, 192); // 8/3 * 64 = 170.7 -> next multiple of 32
    }
}

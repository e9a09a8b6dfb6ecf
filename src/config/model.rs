//! The resolved model description: [`ModelConfig`] and the option types it is made of,
//! with nothing left for the forward pass to interpret. `ModelConfig` is the single
//! description of a network: the model, the initialiser, the weight loader and the FLOP
//! ledger all read it and nothing else.

use super::LoraConfig;
use serde::{Deserialize, Serialize};

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

/// Options that can differ from layer to layer: published models mix dense and
/// Mixture-of-Experts layers (DeepSeek's dense first layers, Qwen2-MoE's sparse step) and
/// route some blocks only (Mixture-of-Depths every other block), each with its own settings.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerSpec {
    /// Sliding-window attention: a query sees itself and the `window - 1` keys before it.
    #[serde(default)]
    pub window: Option<usize>,
    /// The feed-forward block is this Mixture of Experts instead of the dense FFN (`d_ff`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moe: Option<MoeConfig>,
    /// A Mixture-of-Depths block: only the tokens its router picks go through it; the
    /// others skip it on the residual path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depth: Option<DepthConfig>,
}

/// Mixture-of-Depths (Raposo et al., 2024, arXiv:2404.02258) of one routed block.
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
    pub selection: Selection,
    /// What a processed token's update is multiplied by.
    #[serde(default, skip_serializing_if = "is_default")]
    pub scale: DepthScale,
    /// The first token of a sequence always goes through the block (and counts toward its
    /// capacity): published models park attention on it (an attention sink, often with
    /// huge activations), and a block whose tokens cannot see it computes garbage.
    #[serde(default, skip_serializing_if = "is_default")]
    pub keep_first: bool,
    /// What a token the router passes over skips.
    #[serde(default, skip_serializing_if = "is_default")]
    pub skip: DepthSkip,
    /// The router reads the RMS-normalised block input: a published model's residual
    /// stream has features thousands of times larger than the rest, which would decide
    /// every score alone.
    #[serde(default, skip_serializing_if = "is_default")]
    pub norm_input: bool,
}

/// What a token skips in a routed block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DepthSkip {
    /// The whole block (Mixture-of-Depths): only the chosen tokens run it, attending to
    /// one another; the block's KV cache holds them alone.
    #[default]
    Block,
    /// The feed-forward sub-block: every token runs the attention (and enters the KV
    /// cache), the chosen ones also the feed-forward.
    Mlp,
    /// The attention sub-block: the chosen tokens run the attention, attending to one
    /// another (the block's KV cache holds them alone); every token runs the feed-forward.
    Attention,
}

/// The factor on a routed block's update for the tokens it processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DepthScale {
    /// `σ(r)`, the router's weight (Mixture-of-Depths as trained from scratch): the router
    /// learns through the language-model loss.
    #[default]
    Router,
    /// `1 + σ(r) − sg(σ(r))`: exactly 1 in the forward pass, so a processed token gets the
    /// block's full update, as in the dense model the block came from (a depth retrofit),
    /// while the router still gets the loss's gradient through `σ(r)`.
    Unit,
}

/// How a router's choices are made: a routed block's tokens, a Mixture-of-Experts layer's
/// experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Selection {
    /// By the learned router.
    #[default]
    Learned,
    /// At random, whatever the router says (an ablation: does learned routing earn its
    /// keep?).
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

/// A Mixture-of-Experts feed-forward layer ([`LayerSpec::moe`]).
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
    /// `random`: each token's `top_k` experts drawn uniformly at random (fresh draws every
    /// forward pass, in training and sampling alike), each weighted `routed_scale / top_k`;
    /// the router is not used and no auxiliary loss applies (an ablation).
    #[serde(default, skip_serializing_if = "is_default")]
    pub selection: Selection,
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
            selection: Selection::Learned,
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
    /// Low-rank adapters on chosen projections ([`LoraConfig`]); their tensors sit beside
    /// the projections' (`….q_proj.lora_A.weight`, `….q_proj.lora_B.weight`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraConfig>,
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
            local_rope_theta: None,
            local_rope_scaling: RopeScaling::None,
            embed_norm: false,
            clip_qkv: None,
            encoder_layers: 0,
            decoder_start: None,
            output_scale: None,
            lora: None,
        }
    }
}

impl ModelConfig {
    /// The options of layer `l`.
    pub fn layer(&self, l: usize) -> LayerSpec {
        self.layers.get(l).copied().unwrap_or_default()
    }

    /// Every Mixture-of-Experts layer with its config, in layer order.
    pub fn moe_layers(&self) -> impl Iterator<Item = (usize, MoeConfig)> + '_ {
        (0..self.n_layers).filter_map(|l| self.layer(l).moe.map(|m| (l, m)))
    }

    /// Every Mixture-of-Depths (routed) block with its config, in layer order.
    pub fn depth_layers(&self) -> impl Iterator<Item = (usize, DepthConfig)> + '_ {
        (0..self.n_layers).filter_map(|l| self.layer(l).depth.map(|d| (l, d)))
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
}

//! The decoder-only transformer (GPT-2 / Llama shape and their descendants), one
//! implementation for every configuration: the options in [`ModelConfig`] select norms,
//! positions, block wiring and attention variants; nothing here knows model families.

use candle_core::{Device, Result as CResult, Tensor};
use std::collections::BTreeMap;

use super::block::{Block, Ffn};
use super::cache::Cache;
use crate::config::{BlockKind, ModelConfig, Position, QkNorm, RopeScaling};
use crate::error::{Error, Result};
use crate::nn::attention::{Latent, Projections};
use crate::nn::{Attention, Linear, Mlp, Norm, RopeTables};
use crate::routing::{DepthDecision, DepthRouter, DepthStats, DepthStep, MoeLayer, MoeStats};
use crate::weights::names::{param_specs, with_stacks, ParamStack, StackKind};

/// What one forward pass produces.
#[derive(Debug)]
pub struct ModelOutput {
    /// `(b, t, vocab)`, or `(b, 1, vocab)` when only the last position was asked for.
    pub logits: Tensor,
    /// With [`ForwardOptions::hidden_states`]: the input of the first block, the output of
    /// every block but the last, and the last block's output after the final norm
    /// (`n_layers + 1` tensors of `(b, t, d_model)`, transformers' convention).
    pub hidden_states: Vec<Tensor>,
    /// What each Mixture-of-Experts layer's router did, in layer order.
    pub moe: Vec<MoeStats>,
    /// What each Mixture-of-Depths router did, in layer order.
    pub depth: Vec<DepthStats>,
}

impl ModelOutput {
    /// The sum of the routers' weighted auxiliary losses, if any layer has one.
    pub fn aux_loss(&self) -> CResult<Option<Tensor>> {
        let mut total: Option<Tensor> = None;
        let depth = self.depth.iter().filter_map(|s| s.aux_loss.as_ref());
        for l in self
            .moe
            .iter()
            .filter_map(|s| s.aux_loss.as_ref())
            .chain(depth)
        {
            total = Some(match total {
                Some(t) => (t + l)?,
                None => l.clone(),
            });
        }
        Ok(total)
    }
}

/// A training loss and what produced it.
#[derive(Debug)]
pub struct Loss {
    /// Mean next-token cross-entropy (nats).
    pub ce: Tensor,
    /// `ce` plus the routers' weighted auxiliary losses.
    pub total: Tensor,
    pub moe: Vec<MoeStats>,
    /// What each Mixture-of-Depths router did, in layer order.
    pub depth: Vec<DepthStats>,
}

/// What to compute in a forward pass.
#[derive(Debug, Clone, Copy, Default)]
pub struct ForwardOptions {
    /// Logits for the last position only (sampling).
    pub last_only: bool,
    /// Keep the hidden states between blocks.
    pub hidden_states: bool,
    /// How routed (Mixture-of-Depths) blocks choose tokens; default: top-k without a cache,
    /// causal thresholds with one.
    pub depth: Option<DepthDecision>,
    /// Seed of the routers' random draws (random Mixture-of-Depths selection, an
    /// ablation): the draws are a pure function of it, the layer and the token's position.
    /// The trainer passes one per run, step and shard.
    pub seed: u64,
}

#[derive(Debug, Clone)]
pub struct Model {
    pub config: ModelConfig,
    embed: Tensor,
    positions: Option<Tensor>,
    blocks: Vec<Block>,
    norm: Norm,
    head: Linear,
    rope: Option<RopeTables>,
    /// Rotary tables of the sliding-window layers when their base differs.
    local_rope: Option<RopeTables>,
    /// Norm on the token embeddings.
    embed_norm: Option<Norm>,
    /// Mixture-of-Depths routers of routed blocks.
    routers: Vec<Option<DepthRouter>>,
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

impl Model {
    /// Mixed precision for every projection and the head: products of more than a few rows
    /// (forward and backward) with bf16 operands and f32 sums, on CPUs with AVX512-BF16
    /// (elsewhere they stay f32). Parameters, activations and the optimizer stay f32.
    pub fn set_bf16_matmul(&mut self, on: bool) {
        for b in &mut self.blocks {
            for l in b.linears_mut() {
                l.bf16 = on;
            }
        }
        self.head.bf16 = on;
    }

    /// Give the feed-forward block of a stack's layer its stacked weights (of which that
    /// block's projections are views); `false` when the layer's block is not of the
    /// stack's kind.
    fn attach_stack(&mut self, stack: &ParamStack, t: Tensor) -> bool {
        let Some(b) = self.blocks.get_mut(stack.layer) else {
            return false;
        };
        match (&mut b.ffn, stack.kind) {
            (Ffn::Dense(m), StackKind::GateUp) => m.gate_up = Some(t),
            (Ffn::Moe(m), StackKind::ExpertsGateUp) => m.stacked.gate_up = Some(t),
            (Ffn::Moe(m), StackKind::ExpertsDown) => m.stacked.down = Some(t),
            _ => return false,
        }
        true
    }

    /// Whether the projections compute in mixed precision ([`Model::set_bf16_matmul`] on a
    /// CPU with AVX512-BF16).
    pub fn bf16_matmul(&self) -> bool {
        self.head.bf16 && crate::nn::bf16::available()
    }

    /// Build the model from its parameters; `origin` names where they came from in errors.
    /// SwiGLU feed-forward weights are held stacked (a dense block's `[gate; up]`, an MoE
    /// layer's experts), as the fused and grouped kernels read them: given stacked under the
    /// stack's name, or stacked here once from the per-projection tensors.
    pub fn new(
        config: &ModelConfig,
        params: &BTreeMap<String, Tensor>,
        origin: &str,
    ) -> Result<Self> {
        let (params, stacks) = with_stacks(config, params)?;
        let mut model = Self::from_params(config, &params, origin)?;
        for (s, t) in stacks {
            model.attach_stack(&s, t);
        }
        Ok(model)
    }

    fn from_params(
        config: &ModelConfig,
        params: &BTreeMap<String, Tensor>,
        origin: &str,
    ) -> Result<Self> {
        let problems = check_params(config, params);
        if !problems.is_empty() {
            return Err(Error::WeightMismatch {
                path: origin.into(),
                problems,
            });
        }
        let get = |name: &str| -> Result<Tensor> {
            params
                .get(name)
                .cloned()
                .ok_or_else(|| Error::WeightMismatch {
                    path: origin.into(),
                    problems: vec![format!("missing tensor {name}")],
                })
        };
        let opt = |name: &str| params.get(name).cloned();
        let norm = |prefix: &str| -> Result<Norm> {
            let w = get(&format!("{prefix}.weight"))?;
            let weight = if config.norm_offset != 0.0 {
                (w + config.norm_offset)?
            } else {
                w
            };
            Ok(Norm {
                kind: config.norm,
                weight,
                bias: opt(&format!("{prefix}.bias")),
                eps: config.norm_eps,
            })
        };
        let linear = |prefix: &str| -> Result<Linear> {
            Ok(Linear::new(
                get(&format!("{prefix}.weight"))?,
                opt(&format!("{prefix}.bias")),
            ))
        };
        let embed = get("model.embed_tokens.weight")?;
        let mut blocks = Vec::with_capacity(config.n_layers);
        let mut routers = Vec::with_capacity(config.n_layers);
        for l in 0..config.n_layers {
            let p = format!("model.layers.{l}");
            let qk = |which: &str| -> Result<Option<Norm>> {
                Ok(match config.qk_norm {
                    QkNorm::None => None,
                    _ => Some(norm(&format!("{p}.self_attn.{which}_norm"))?),
                })
            };
            let attn = Attention {
                proj: match &config.mla {
                    None => Projections::Standard {
                        q: linear(&format!("{p}.self_attn.q_proj"))?,
                        k: linear(&format!("{p}.self_attn.k_proj"))?,
                        v: linear(&format!("{p}.self_attn.v_proj"))?,
                    },
                    Some(a) => {
                        let s = format!("{p}.self_attn");
                        let (q_a, q_b) = match a.q_lora_rank {
                            Some(_) => (
                                Some((
                                    linear(&format!("{s}.q_a_proj"))?,
                                    norm(&format!("{s}.q_a_layernorm"))?,
                                )),
                                linear(&format!("{s}.q_b_proj"))?,
                            ),
                            None => (None, linear(&format!("{s}.q_proj"))?),
                        };
                        Projections::Latent(Box::new(Latent {
                            q_a,
                            q_b,
                            kv_a: linear(&format!("{s}.kv_a_proj_with_mqa"))?,
                            kv_norm: norm(&format!("{s}.kv_a_layernorm"))?,
                            kv_b: linear(&format!("{s}.kv_b_proj"))?,
                            config: *a,
                        }))
                    }
                },
                o: linear(&format!("{p}.self_attn.o_proj"))?,
                n_heads: config.n_heads,
                n_kv_heads: config.n_kv_heads,
                head_dim: config.head_dim,
                q_norm: qk("q")?,
                k_norm: qk("k")?,
                qk_norm: config.qk_norm,
                scale: config
                    .attn_scale
                    .unwrap_or(1.0 / (config.head_dim as f64).sqrt()),
                window: config.layer(l).window,
                softcap: config.attn_softcap,
                alibi: config.position == Position::Alibi,
                clip: config.clip_qkv,
            };
            let mlp = |prefix: &str| -> Result<Mlp> {
                Ok(Mlp {
                    kind: config.ffn,
                    gate: if config.ffn.is_gated() {
                        Some(linear(&format!("{prefix}.gate_proj"))?)
                    } else {
                        None
                    },
                    up: linear(&format!("{prefix}.up_proj"))?,
                    down: linear(&format!("{prefix}.down_proj"))?,
                    gate_up: None,
                })
            };
            let ffn = match (config.layer(l).moe, &config.moe) {
                (true, Some(m)) => Ffn::Moe(Box::new(MoeLayer {
                    layer: l,
                    config: *m,
                    router: get(&format!("{p}.mlp.gate.weight"))?,
                    selection_bias: opt(&format!("{p}.mlp.gate.e_score_correction_bias")),
                    experts: (0..m.n_experts)
                        .map(|e| mlp(&format!("{p}.mlp.experts.{e}")))
                        .collect::<Result<_>>()?,
                    shared: if m.d_shared > 0 {
                        Some(mlp(&format!("{p}.mlp.shared_expert"))?)
                    } else {
                        None
                    },
                    shared_gate: if m.shared_gate {
                        Some(linear(&format!("{p}.mlp.shared_expert_gate"))?)
                    } else {
                        None
                    },
                    stacked: Default::default(),
                })),
                _ => Ffn::Dense(mlp(&format!("{p}.mlp"))?),
            };
            let sandwich = |name: &str| -> Result<Option<Norm>> {
                Ok(if config.sandwich_norms {
                    Some(norm(&format!("{p}.{name}"))?)
                } else {
                    None
                })
            };
            routers.push(match (&config.depth, config.layer(l).routed) {
                (Some(dc), true) => Some(DepthRouter {
                    layer: l,
                    weight: get(&format!("{p}.depth_router.weight"))?,
                    predictor: match dc.predictor {
                        0 => None,
                        _ => Some((
                            get(&format!("{p}.depth_predictor.fc1.weight"))?,
                            get(&format!("{p}.depth_predictor.fc2.weight"))?,
                        )),
                    },
                    config: *dc,
                }),
                _ => None,
            });
            blocks.push(Block {
                kind: config.block,
                attn_norm: norm(&format!("{p}.input_layernorm"))?,
                attn,
                ffn_norm: match config.block {
                    BlockKind::ParallelSharedNorm => None,
                    _ => Some(norm(&format!("{p}.post_attention_layernorm"))?),
                },
                ffn,
                attn_out_norm: sandwich("attn_out_norm")?,
                ffn_out_norm: sandwich("ffn_out_norm")?,
            });
        }
        let (rope, local_rope) = match &config.position {
            Position::Rope {
                theta,
                rotary_dim,
                scaling,
            } => {
                let tables = |theta, scaling: &RopeScaling| {
                    RopeTables::new(
                        theta,
                        *rotary_dim,
                        scaling.clone(),
                        config.max_seq_len,
                        embed.dtype(),
                        embed.device(),
                    )
                };
                let local = match config.local_rope_theta {
                    Some(t) => Some(tables(t, &config.local_rope_scaling)?),
                    None => None,
                };
                (Some(tables(*theta, scaling)?), local)
            }
            _ => (None, None),
        };
        let head_w = if config.tie_embeddings {
            embed.clone()
        } else {
            get("lm_head.weight")?
        };
        Ok(Self {
            config: config.clone(),
            positions: opt("model.embed_positions.weight"),
            embed,
            blocks,
            norm: norm("model.norm")?,
            head: Linear::new(head_w, opt("lm_head.bias")),
            rope,
            local_rope,
            embed_norm: if config.embed_norm {
                Some(norm("model.embed_norm")?)
            } else {
                None
            },
            routers,
        })
    }

    /// Whether layer `l` uses the local rotary tables (a sliding-window layer of a model
    /// that has them).
    fn is_local(&self, l: usize) -> bool {
        self.local_rope.is_some() && self.config.layer(l).window.is_some()
    }

    /// The rotary tables layer `l` uses.
    fn rope_of(&self, l: usize) -> Option<&RopeTables> {
        if self.is_local(l) {
            self.local_rope.as_ref()
        } else {
            self.rope.as_ref()
        }
    }

    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    /// Forward `ids: (b, t)` (u32). With a cache, the tokens continue the cached sequence;
    /// `last_only` computes the head for the last position only (sampling).
    pub fn forward(
        &self,
        ids: &Tensor,
        cache: Option<&mut Cache>,
        last_only: bool,
    ) -> Result<ModelOutput> {
        self.forward_with(
            ids,
            cache,
            ForwardOptions {
                last_only,
                ..Default::default()
            },
        )
    }

    /// Forward with explicit [`ForwardOptions`].
    pub fn forward_with(
        &self,
        ids: &Tensor,
        mut cache: Option<&mut Cache>,
        opts: ForwardOptions,
    ) -> Result<ModelOutput> {
        let (b, t) = ids.dims2()?;
        if cache.is_some() && self.config.moe.is_some_and(|m| m.expert_choice) {
            return Err(Error::Generate(
                "this model routes by expert choice, which picks tokens by looking at the whole \
                 sequence: it cannot decode token by token (train it with token-choice routing \
                 to sample)"
                    .into(),
            ));
        }
        let start = cache.as_ref().map_or(0, |c| c.pos());
        if let (Some(c), Some(switch)) = (cache.as_deref_mut(), self.restart_length()) {
            if start > 0 && start <= switch && start + t > switch {
                return self.forward_restarted(ids, c, opts);
            }
            // past the switch the cache is never rebuilt again
            if start + t <= switch {
                c.feed(ids);
            }
        }
        if start + t > self.config.max_seq_len {
            return Err(Error::Generate(format!(
                "sequence of {} tokens exceeds the context window of {}",
                start + t,
                self.config.max_seq_len
            )));
        }
        let max_id = ids.flatten_all()?.max(0)?.to_scalar::<u32>()? as usize;
        if max_id >= self.config.vocab_size {
            return Err(Error::Generate(format!(
                "token id {max_id} is out of range for a vocabulary of {}",
                self.config.vocab_size
            )));
        }
        let out = self.forward_inner(ids, b, t, start, &mut cache, opts)?;
        if let Some(c) = cache {
            c.advance(t);
        }
        Ok(out)
    }

    /// The length at which a cached sequence is recomputed from its start: LongRoPE's
    /// original length, where its frequencies switch from the short to the long factors.
    /// transformers drops the cache there for the families that publish LongRoPE (Phi-3,
    /// PhiMoE: `prepare_inputs_for_generation`), so every key is rotated with the long
    /// factors from then on.
    fn restart_length(&self) -> Option<usize> {
        match &self.config.position {
            Position::Rope {
                scaling: s @ RopeScaling::LongRope { .. },
                ..
            } => s.switch_length(),
            _ => None,
        }
    }

    /// Rebuild `cache` from every token it was fed plus `ids`, and return the outputs of
    /// the positions of `ids`.
    fn forward_restarted(
        &self,
        ids: &Tensor,
        cache: &mut Cache,
        opts: ForwardOptions,
    ) -> Result<ModelOutput> {
        let t = ids.dim(1)?;
        let all = Tensor::cat(&[cache.fed()?, ids.clone()], 1)?;
        *cache = self.new_cache();
        let mut out = self.forward_with(&all, Some(cache), opts)?;
        let total = all.dim(1)?;
        let tail = |x: &Tensor| x.narrow(1, total - t, t);
        if !opts.last_only {
            out.logits = tail(&out.logits)?;
        }
        out.hidden_states = out.hidden_states.iter().map(tail).collect::<CResult<_>>()?;
        Ok(out)
    }

    fn forward_inner(
        &self,
        ids: &Tensor,
        b: usize,
        t: usize,
        start: usize,
        cache: &mut Option<&mut Cache>,
        opts: ForwardOptions,
    ) -> CResult<ModelOutput> {
        let d = self.config.d_model;
        let mut x = self
            .embed
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, d))?;
        if let Some(s) = self.config.embed_scale {
            x = (x * s)?;
        }
        if let Some(pos) = &self.positions {
            x = x.broadcast_add(&pos.narrow(0, start, t)?)?;
        }
        if let Some(n) = &self.embed_norm {
            x = n.forward(&x)?;
        }
        let tables = |r: Option<&RopeTables>| r.map(|r| r.range(start, t)).transpose();
        let (rope, local_rope) = (
            tables(self.rope.as_ref())?,
            tables(self.local_rope.as_ref())?,
        );
        let mut hidden = Vec::new();
        let mut moe = Vec::new();
        let mut depth = Vec::new();
        // routed blocks: top-k when training on whole sequences, causal thresholds when
        // decoding through a cache, unless the caller says otherwise
        let decision = opts.depth.unwrap_or(if cache.is_some() {
            DepthDecision::Threshold
        } else {
            DepthDecision::TopK
        });
        for (l, block) in self.blocks.iter().enumerate() {
            if opts.hidden_states {
                hidden.push(x.clone());
            }
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[l]);
            let layer = || format!("layer {l}");
            let (y, stats) = match &self.routers[l] {
                Some(r) => {
                    let step = DepthStep {
                        start,
                        decision,
                        seed: opts.seed,
                    };
                    let (y, stats, d) = r
                        .forward(block, &x, self.rope_of(l), layer_cache, step)
                        .map_err(|e| e.context(layer()))?;
                    depth.push(d);
                    (y, stats)
                }
                None => {
                    let rope = if self.is_local(l) {
                        local_rope.as_ref()
                    } else {
                        rope.as_ref()
                    };
                    block
                        .forward(&x, rope.map(|(c, s)| (c, s)), layer_cache)
                        .map_err(|e| e.context(layer()))?
                }
            };
            x = y;
            moe.extend(stats);
        }
        let x = if opts.last_only {
            x.narrow(1, t - 1, 1)?
        } else {
            x
        };
        let x = self.norm.forward(&x)?;
        if opts.hidden_states {
            hidden.push(x.clone());
        }
        let mut logits = self.head.forward(&x)?;
        if let Some(cap) = self.config.final_softcap {
            logits = ((logits / cap)?.tanh()? * cap)?;
        }
        Ok(ModelOutput {
            logits,
            hidden_states: hidden,
            moe,
            depth,
        })
    }

    /// Mean next-token cross-entropy of `ids: (b, t)` predicting `targets: (b, t)`.
    /// The cross-entropy plus the routers' auxiliary losses (`total`, what training
    /// minimises), with the routers' statistics.
    pub fn loss(&self, ids: &Tensor, targets: &Tensor) -> Result<Loss> {
        self.loss_with(ids, targets, ForwardOptions::default())
    }

    /// [`Model::loss`] with explicit [`ForwardOptions`] (the trainer's routing seed).
    pub fn loss_with(&self, ids: &Tensor, targets: &Tensor, opts: ForwardOptions) -> Result<Loss> {
        let out = self.forward_with(ids, None, opts)?;
        let v = self.config.vocab_size;
        let logits = out.logits.reshape(((), v))?;
        let ce = crate::nn::ops::cross_entropy(&logits, &targets.flatten_all()?)?;
        let total = match out.aux_loss()? {
            Some(aux) => (&ce + aux)?,
            None => ce.clone(),
        };
        Ok(Loss {
            ce,
            total,
            moe: out.moe,
            depth: out.depth,
        })
    }

    /// A fresh cache for this model.
    /// Run layer `l` alone on hidden states `x: (b, t, d)` (inspection and tests): a routed
    /// layer routes by top-k at positions `0..t`; a plain one runs at `positions` (one per
    /// token, shared by the batch; default `0..t`).
    pub fn run_layer(&self, l: usize, x: &Tensor, positions: Option<&[u32]>) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let block = self
            .blocks
            .get(l)
            .ok_or_else(|| Error::Generate(format!("no layer {l}")))?;
        if let Some(r) = &self.routers[l] {
            let step = DepthStep {
                start: 0,
                decision: DepthDecision::TopK,
                seed: 0,
            };
            return Ok(r.forward(block, x, self.rope_of(l), None, step)?.0);
        }
        let pos: Vec<u32> = positions.map_or_else(|| (0..t as u32).collect(), |p| p.to_vec());
        let tables = match self.rope_of(l) {
            Some(r) => {
                let idx = Tensor::new(pos.as_slice(), x.device())?;
                let half = r.cos.dim(1)?;
                let cos = r
                    .cos
                    .index_select(&idx, 0)?
                    .unsqueeze(0)?
                    .broadcast_as((b, t, half))?
                    .contiguous()?;
                let sin = r
                    .sin
                    .index_select(&idx, 0)?
                    .unsqueeze(0)?
                    .broadcast_as((b, t, half))?
                    .contiguous()?;
                Some((cos, sin))
            }
            None => None,
        };
        Ok(block
            .forward(x, tables.as_ref().map(|(c, s)| (c, s)), None)?
            .0)
    }

    pub fn new_cache(&self) -> Cache {
        Cache::new(self.blocks.len())
    }
}

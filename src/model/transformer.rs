//! The decoder-only transformer (GPT-2 / Llama shape and their descendants), one
//! implementation for every configuration: the options in [`ModelConfig`] select norms,
//! positions, block wiring and attention variants; nothing here knows model families.

use candle_core::{DType, Device, Result as CResult, Tensor};
use std::collections::BTreeMap;

use super::block::{Block, Ffn};
use super::cache::Cache;
use crate::config::{BlockKind, ModelConfig, Position, QkNorm, RopeScaling};
use crate::error::{Error, Result};
use crate::nn::attention::{Latent, Projections};
use crate::nn::qmatmul::{QMatrix, StoredWeights};
use crate::nn::relative::relative_bias;
use crate::nn::{Attention, Linear, Mlp, Norm, Positions, RopeTables};
use crate::routing::{DepthDecision, DepthRouter, DepthStats, DepthStep, MoeLayer, MoeStats};
use crate::weights::names::{check_params, with_stacks, ParamStack, StackKind};
use std::sync::Arc;

mod decode;
pub use decode::TokenRoute;

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
    /// The token embeddings in their stored form (`embed` is then a stand-in): rows are
    /// dequantized as tokens look them up.
    embed_stored: Option<Arc<QMatrix>>,
    /// `(values, bytes)` of the stored weights a decoded token reads (every stored
    /// matrix but an untied embedding table, of which it reads one row).
    stored_read: (usize, usize),
    /// The stored weights that products read (not embeddings only looked up).
    products: Vec<std::sync::Arc<QMatrix>>,
    /// The type decoding caches hold keys and values in; `None`: the compute type.
    kv_dtype: Option<DType>,
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
    /// `(buckets, n_heads)` relative-position table of the (decoder) self-attention.
    relative: Option<Tensor>,
    /// The encoder of an encoder-decoder.
    encoder: Option<Encoder>,
}

/// The parameters of one model being assembled into its layers: each method builds one
/// piece from its canonical names, errors naming `origin`.
struct Parts<'a> {
    config: &'a ModelConfig,
    params: &'a BTreeMap<String, Tensor>,
    /// Weights in their stored form, by canonical name (the parameters hold stand-ins).
    stored: &'a StoredWeights,
    origin: &'a str,
}

impl Parts<'_> {
    fn get(&self, name: &str) -> Result<Tensor> {
        self.params
            .get(name)
            .cloned()
            .ok_or_else(|| Error::WeightMismatch {
                path: self.origin.into(),
                problems: vec![format!("missing tensor {name}")],
            })
    }

    fn opt(&self, name: &str) -> Option<Tensor> {
        self.params.get(name).cloned()
    }

    fn norm(&self, prefix: &str) -> Result<Norm> {
        let c = self.config;
        let w = self.get(&format!("{prefix}.weight"))?;
        let weight = if c.norm_offset != 0.0 {
            (w + c.norm_offset)?
        } else {
            w
        };
        Ok(Norm {
            kind: c.norm,
            weight,
            bias: self.opt(&format!("{prefix}.bias")),
            eps: c.norm_eps,
        })
    }

    fn linear(&self, prefix: &str) -> Result<Linear> {
        let name = format!("{prefix}.weight");
        let mut l = Linear::new(self.get(&name)?, self.opt(&format!("{prefix}.bias")));
        l.stored = self.stored.get(&name).cloned();
        if let Some(lora) = &self.config.lora {
            // the parameter table holds adapters for exactly the targeted projections
            if let Some(a) = self.opt(&format!("{prefix}.lora_A.weight")) {
                l.lora = Some(crate::nn::linear::Lora {
                    a,
                    b: self.get(&format!("{prefix}.lora_B.weight"))?,
                    scale: lora.scale(),
                });
            }
        }
        Ok(l)
    }

    fn mlp(&self, prefix: &str) -> Result<Mlp> {
        let c = self.config;
        Ok(Mlp {
            kind: c.ffn,
            gate: if c.ffn.is_gated() {
                Some(self.linear(&format!("{prefix}.gate_proj"))?)
            } else {
                None
            },
            up: self.linear(&format!("{prefix}.up_proj"))?,
            down: self.linear(&format!("{prefix}.down_proj"))?,
            gate_up: None,
        })
    }

    /// The attention under `prefix` (`….self_attn`, `….cross_attn`); `layer`: the decoder
    /// layer whose options (window, latent attention, q/k norms) apply, `None` for an
    /// encoder's or a cross-attention's plain one.
    fn attention(&self, prefix: &str, layer: Option<usize>, causal: bool) -> Result<Attention> {
        let c = self.config;
        let standard = || -> Result<Projections> {
            Ok(Projections::Standard {
                q: self.linear(&format!("{prefix}.q_proj"))?,
                k: self.linear(&format!("{prefix}.k_proj"))?,
                v: self.linear(&format!("{prefix}.v_proj"))?,
            })
        };
        let proj = match (&c.mla, layer) {
            (Some(a), Some(_)) => {
                let (q_a, q_b) = match a.q_lora_rank {
                    Some(_) => (
                        Some((
                            self.linear(&format!("{prefix}.q_a_proj"))?,
                            self.norm(&format!("{prefix}.q_a_layernorm"))?,
                        )),
                        self.linear(&format!("{prefix}.q_b_proj"))?,
                    ),
                    None => (None, self.linear(&format!("{prefix}.q_proj"))?),
                };
                Projections::Latent(Box::new(Latent {
                    q_a,
                    q_b,
                    kv_a: self.linear(&format!("{prefix}.kv_a_proj_with_mqa"))?,
                    kv_norm: self.norm(&format!("{prefix}.kv_a_layernorm"))?,
                    kv_b: self.linear(&format!("{prefix}.kv_b_proj"))?,
                    config: *a,
                }))
            }
            _ => standard()?,
        };
        let qk = |which: &str| -> Result<Option<Norm>> {
            Ok(match (c.qk_norm, layer) {
                (QkNorm::None, _) | (_, None) => None,
                _ => Some(self.norm(&format!("{prefix}.{which}_norm"))?),
            })
        };
        Ok(Attention {
            proj,
            o: self.linear(&format!("{prefix}.o_proj"))?,
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            q_norm: qk("q")?,
            k_norm: qk("k")?,
            qk_norm: if layer.is_some() {
                c.qk_norm
            } else {
                QkNorm::None
            },
            scale: c.attn_scale.unwrap_or(1.0 / (c.head_dim as f64).sqrt()),
            window: layer.and_then(|l| c.layer(l).window),
            softcap: c.attn_softcap,
            alibi: c.position == Position::Alibi,
            clip: c.clip_qkv,
            causal,
        })
    }

    /// The feed-forward sub-block of decoder layer `layer` (`None`: an encoder's, dense).
    fn ffn(&self, prefix: &str, layer: Option<usize>) -> Result<Ffn> {
        let c = self.config;
        let moe = layer.and_then(|l| c.layer(l).moe);
        let (Some(m), Some(l)) = (moe, layer) else {
            return Ok(Ffn::Dense(self.mlp(&format!("{prefix}.mlp"))?));
        };
        let p = format!("{prefix}.mlp");
        Ok(Ffn::Moe(Box::new(MoeLayer {
            layer: l,
            config: m,
            router: self.get(&format!("{p}.gate.weight"))?,
            selection_bias: self.opt(&format!("{p}.gate.e_score_correction_bias")),
            experts: (0..m.n_experts)
                .map(|e| self.mlp(&format!("{p}.experts.{e}")))
                .collect::<Result<_>>()?,
            shared: if m.d_shared > 0 {
                Some(self.mlp(&format!("{p}.shared_expert"))?)
            } else {
                None
            },
            shared_gate: if m.shared_gate {
                Some(self.linear(&format!("{p}.shared_expert_gate"))?)
            } else {
                None
            },
            stacked: Default::default(),
        })))
    }

    /// The block under `prefix`: decoder layer `layer`, or an encoder block (`None`).
    fn block(&self, prefix: &str, layer: Option<usize>) -> Result<Block> {
        let c = self.config;
        let decoder = layer.is_some();
        let sandwich = |name: &str| -> Result<Option<Norm>> {
            Ok(match c.sandwich_norms && decoder {
                true => Some(self.norm(&format!("{prefix}.{name}"))?),
                false => None,
            })
        };
        let cross = match (decoder, c.encoder_layers) {
            (true, 1..) => Some((
                self.norm(&format!("{prefix}.cross_attn_layernorm"))?,
                self.attention(&format!("{prefix}.cross_attn"), None, false)?,
            )),
            _ => None,
        };
        let kind = if decoder {
            c.block
        } else {
            BlockKind::Sequential
        };
        Ok(Block {
            kind,
            attn_norm: self.norm(&format!("{prefix}.input_layernorm"))?,
            attn: self.attention(&format!("{prefix}.self_attn"), layer, decoder)?,
            ffn_norm: match kind {
                BlockKind::ParallelSharedNorm => None,
                _ => Some(self.norm(&format!("{prefix}.post_attention_layernorm"))?),
            },
            ffn: self.ffn(prefix, layer)?,
            attn_out_norm: sandwich("attn_out_norm")?,
            ffn_out_norm: sandwich("ffn_out_norm")?,
            cross,
        })
    }

    /// Decoder layer `l`'s Mixture-of-Depths router, when it is a routed block.
    fn depth_router(&self, l: usize) -> Result<Option<DepthRouter>> {
        let p = format!("model.layers.{l}");
        Ok(match self.config.layer(l).depth {
            Some(dc) => Some(DepthRouter {
                layer: l,
                weight: self.get(&format!("{p}.depth_router.weight"))?,
                predictor: match dc.predictor {
                    0 => None,
                    _ => Some((
                        self.get(&format!("{p}.depth_predictor.fc1.weight"))?,
                        self.get(&format!("{p}.depth_predictor.fc2.weight"))?,
                    )),
                },
                config: dc,
            }),
            None => None,
        })
    }
}

/// The encoder of an encoder-decoder: bidirectional blocks, a final norm, and the
/// relative-position table of its self-attention.
#[derive(Debug, Clone)]
struct Encoder {
    blocks: Vec<Block>,
    norm: Norm,
    relative: Option<Tensor>,
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

    /// `(values, bytes)` of the weights held in their stored form that decoding a token
    /// reads; `(0, 0)` for a model whose weights are all tensors.
    pub fn stored_read(&self) -> (usize, usize) {
        self.stored_read
    }

    /// Make now, in parallel, the layouts the products read (stored rows interleaved,
    /// where the CPU and type take them), which the first product of each weight would
    /// otherwise make: a server calls it before it takes requests, so that its first
    /// request does not wait for all of them (0.8 s on a 434 MB Mixture-of-Experts file).
    /// Every weight is then resident, an expert no token has chosen yet too.
    pub fn prepare_products(&self) {
        use rayon::prelude::*;
        self.products.par_iter().for_each(|q| {
            q.interleaved();
        });
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
        Self::from_owned(config, params.clone(), origin)
    }

    /// [`Model::new`] taking the parameters: loading hands them over, so each stacked
    /// weight's parts are freed as soon as the stack is built (peak memory stays near the
    /// weights' size).
    pub fn from_owned(
        config: &ModelConfig,
        params: BTreeMap<String, Tensor>,
        origin: &str,
    ) -> Result<Self> {
        Self::from_stored(config, params, StoredWeights::new(), origin)
    }

    /// [`Model::from_owned`] with some weights in their stored form (a GGUF file's
    /// quantized blocks, or a safetensors file's values, read in place by the kernels;
    /// `params` holds a stand-in of the right shape for each). Such a model runs
    /// inference only.
    pub fn from_stored(
        config: &ModelConfig,
        params: BTreeMap<String, Tensor>,
        stored: StoredWeights,
        origin: &str,
    ) -> Result<Self> {
        // an expert is read by the tokens routed to it: top_k of n_experts on average
        let share = |name: &str| -> (usize, usize) {
            let layer = name
                .strip_prefix("model.layers.")
                .and_then(|r| r.split('.').next()?.parse::<usize>().ok());
            match (name.contains(".mlp.experts."), layer) {
                (true, Some(l)) => config
                    .layer(l)
                    .moe
                    .map_or((1, 1), |m| (m.top_k, m.n_experts.max(1))),
                _ => (1, 1),
            }
        };
        let multiplied = |n: &str| config.tie_embeddings || n != "model.embed_tokens.weight";
        let stored_read =
            stored
                .iter()
                .filter(|(n, _)| multiplied(n))
                .fold((0, 0), |(v, b), (n, q)| {
                    let (k, e) = share(n);
                    (v + q.rows * q.cols * k / e, b + q.bytes() * k / e)
                });
        let products: Vec<std::sync::Arc<QMatrix>> = stored
            .iter()
            .filter(|(n, _)| multiplied(n))
            .map(|(_, q)| q.clone())
            .collect();
        let (params, stacks) = with_stacks(config, params, &|n| stored.contains_key(n))?;
        let mut model = Self::from_params(config, &params, &stored, origin)?;
        model.stored_read = stored_read;
        model.products = products;
        for (s, t) in stacks {
            model.attach_stack(&s, t);
        }
        Ok(model)
    }

    fn from_params(
        config: &ModelConfig,
        params: &BTreeMap<String, Tensor>,
        stored: &StoredWeights,
        origin: &str,
    ) -> Result<Self> {
        let problems = check_params(config, params);
        if !problems.is_empty() {
            return Err(Error::WeightMismatch {
                path: origin.into(),
                problems,
            });
        }
        let parts = Parts {
            config,
            params,
            stored,
            origin,
        };
        let embed = parts.get("model.embed_tokens.weight")?;
        let mut blocks = Vec::with_capacity(config.n_layers);
        let mut routers = Vec::with_capacity(config.n_layers);
        for l in 0..config.n_layers {
            blocks.push(parts.block(&format!("model.layers.{l}"), Some(l))?);
            routers.push(parts.depth_router(l)?);
        }
        let encoder = match config.encoder_layers {
            0 => None,
            n => Some(Encoder {
                blocks: (0..n)
                    .map(|l| parts.block(&format!("model.encoder.layers.{l}"), None))
                    .collect::<Result<_>>()?,
                norm: parts.norm("model.encoder.norm")?,
                relative: parts.opt("model.encoder.relative_bias.weight"),
            }),
        };
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
        let embed_stored = stored.get("model.embed_tokens.weight").cloned();
        let head = if config.tie_embeddings {
            let mut l = Linear::new(embed.clone(), parts.opt("lm_head.bias"));
            l.stored = embed_stored.clone();
            l
        } else {
            parts.linear("lm_head")?
        };
        Ok(Self {
            config: config.clone(),
            positions: parts.opt("model.embed_positions.weight"),
            embed,
            blocks,
            norm: parts.norm("model.norm")?,
            embed_stored,
            stored_read: (0, 0),
            products: Vec::new(),
            kv_dtype: None,
            head,
            rope,
            local_rope,
            relative: parts.opt("model.relative_bias.weight"),
            embed_norm: if config.embed_norm {
                Some(parts.norm("model.embed_norm")?)
            } else {
                None
            },
            routers,
            encoder,
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
        let t = ids.dim(1)?;
        if cache.is_some() && self.config.moe_layers().any(|(_, m)| m.expert_choice) {
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
        self.check_ids(ids)?;
        if self.encoder.is_some() && !cache.as_ref().is_some_and(|c| c.has_source()) {
            return Err(Error::Generate(
                "an encoder-decoder decodes through a cache that holds its source: run \
                 Model::encode on the source first"
                    .into(),
            ));
        }
        let out = self.forward_inner(ids, start, &mut cache, opts, None)?;
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
        start: usize,
        cache: &mut Option<&mut Cache>,
        opts: ForwardOptions,
        // the head only at these positions, one per sequence (a batch of right-padded
        // prompts): logits `(b, 1, vocab)`
        heads_at: Option<&[usize]>,
    ) -> CResult<ModelOutput> {
        let (b, t) = ids.dims2()?;
        let mut x = self.embed_tokens(ids, b, t, start)?;
        let mut out = ModelOutput {
            logits: x.clone(),
            hidden_states: Vec::new(),
            moe: Vec::new(),
            depth: Vec::new(),
        };
        // routed blocks: top-k when training on whole sequences, causal thresholds when
        // decoding through a cache, unless the caller says otherwise
        let decision = opts.depth.unwrap_or(if cache.is_some() {
            DepthDecision::Threshold
        } else {
            DepthDecision::TopK
        });
        let step = DepthStep {
            start,
            decision,
            seed: opts.seed,
        };
        let tables = |r: Option<&RopeTables>| r.map(|r| r.range(start, t)).transpose();
        let (rope, local_rope) = (
            tables(self.rope.as_ref())?,
            tables(self.local_rope.as_ref())?,
        );
        let bias = self.relative_bias(self.relative.as_ref(), start, t, start + t, false)?;
        for (l, block) in self.blocks.iter().enumerate() {
            if opts.hidden_states {
                out.hidden_states.push(x.clone());
            }
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[l]);
            let run = || -> CResult<_> {
                if let Some(r) = &self.routers[l] {
                    let choice = r.choose(&x, step)?;
                    let rope = self.rope_of(l);
                    let (y, moe) = block.forward_routed(&x, &choice, rope, start, layer_cache)?;
                    return Ok((y, moe, Some(choice.stats)));
                }
                let rope = if self.is_local(l) { &local_rope } else { &rope };
                let pos = Positions {
                    rope: rope.as_ref().map(|(c, s)| (c, s)),
                    bias: bias.as_ref(),
                };
                let (y, moe) = block.forward(&x, pos, layer_cache)?;
                Ok((y, moe, None))
            };
            let (y, moe, depth) = run().map_err(|e| e.context(format!("layer {l}")))?;
            x = y;
            out.moe.extend(moe);
            out.depth.extend(depth);
        }
        let x = match heads_at {
            Some(at) => {
                let rows = at
                    .iter()
                    .enumerate()
                    .map(|(i, &p)| x.narrow(0, i, 1)?.narrow(1, p, 1))
                    .collect::<CResult<Vec<_>>>()?;
                Tensor::cat(&rows, 0)?
            }
            None if opts.last_only => x.narrow(1, t - 1, 1)?,
            None => x,
        };
        let x = self.norm.forward(&x)?;
        if opts.hidden_states {
            out.hidden_states.push(x.clone());
        }
        out.logits = self.logits(x)?;
        Ok(out)
    }

    /// The token embeddings of `ids: (b, t)` at positions `start..start + t`, scaled,
    /// with learned positions added and the embedding norm applied where configured.
    fn embed_tokens(&self, ids: &Tensor, b: usize, t: usize, start: usize) -> CResult<Tensor> {
        let d = self.config.d_model;
        let mut x = match &self.embed_stored {
            Some(q) => {
                let ids = ids.flatten_all()?.to_vec1::<u32>()?;
                let mut v = vec![0f32; ids.len() * d];
                for (row, &id) in v.chunks_exact_mut(d).zip(&ids) {
                    let id = id as usize;
                    q.dequantize_rows(id, id + 1, row);
                }
                Tensor::from_vec(v, (b, t, d), self.embed.device())?
            }
            None => self
                .embed
                .index_select(&ids.flatten_all()?, 0)?
                .reshape((b, t, d))?,
        };
        if let Some(s) = self.config.embed_scale {
            x = (x * s)?;
        }
        if let Some(pos) = &self.positions {
            x = x.broadcast_add(&pos.narrow(0, start, t)?)?;
        }
        if let Some(n) = &self.embed_norm {
            x = n.forward(&x)?;
        }
        Ok(x)
    }

    /// The head on the final hidden states: output scale, product, soft-cap.
    fn logits(&self, mut x: Tensor) -> CResult<Tensor> {
        if let Some(s) = self.config.output_scale {
            x = (x * s)?;
        }
        let mut logits = self.head.forward(&x)?;
        if let Some(cap) = self.config.final_softcap {
            logits = ((logits / cap)?.tanh()? * cap)?;
        }
        Ok(logits)
    }

    /// The `(n_heads, t, t_k)` relative-position biases of `table` for queries at
    /// `q0..q0 + t` over keys `0..t_k`, when the model has relative positions.
    fn relative_bias(
        &self,
        table: Option<&Tensor>,
        q0: usize,
        t: usize,
        t_k: usize,
        bidirectional: bool,
    ) -> CResult<Option<Tensor>> {
        match (table, &self.config.position) {
            (Some(table), Position::Relative { max_distance, .. }) => Ok(Some(relative_bias(
                table,
                q0,
                t,
                t_k,
                bidirectional,
                *max_distance,
            )?)),
            _ => Ok(None),
        }
    }

    /// Run the encoder of an encoder-decoder on the source `ids: (b, s)` and give every
    /// decoder layer of `cache` its cross-attention keys and values of the result; the
    /// decoder then continues through `cache`. Returns the encoder's hidden states
    /// (embeddings, each block's output but the last, the last after the final norm).
    pub fn encode(&self, ids: &Tensor, cache: &mut Cache) -> Result<Vec<Tensor>> {
        let Some(enc) = &self.encoder else {
            return Err(Error::Generate(
                "this model has no encoder (it is decoder-only)".into(),
            ));
        };
        self.check_ids(ids)?;
        let (b, s) = ids.dims2()?;
        let mut x = self.embed.index_select(&ids.flatten_all()?, 0)?.reshape((
            b,
            s,
            self.config.d_model,
        ))?;
        let bias = self.relative_bias(enc.relative.as_ref(), 0, s, s, true)?;
        let pos = Positions {
            rope: None,
            bias: bias.as_ref(),
        };
        let mut hidden = Vec::with_capacity(enc.blocks.len() + 1);
        for (l, block) in enc.blocks.iter().enumerate() {
            hidden.push(x.clone());
            x = block
                .forward(&x, pos, None)
                .map_err(|e| e.context(format!("encoder layer {l}")))?
                .0;
        }
        let x = enc.norm.forward(&x)?;
        hidden.push(x.clone());
        for (block, layer) in self.blocks.iter().zip(&mut cache.layers) {
            if let Some((_, attn)) = &block.cross {
                let (k, v) = attn.keys_values(&x)?;
                layer.set_cross(k, v);
            }
        }
        Ok(hidden)
    }

    /// Token ids must index the vocabulary.
    fn check_ids(&self, ids: &Tensor) -> Result<()> {
        let max_id = ids.flatten_all()?.max(0)?.to_scalar::<u32>()? as usize;
        if max_id >= self.config.vocab_size {
            return Err(Error::Generate(format!(
                "token id {max_id} is out of range for a vocabulary of {}",
                self.config.vocab_size
            )));
        }
        Ok(())
    }

    /// Mean next-token cross-entropy of `ids: (b, t)` predicting `targets: (b, t)`.
    /// The cross-entropy plus the routers' auxiliary losses (`total`, what training
    /// minimises), with the routers' statistics.
    pub fn loss(&self, ids: &Tensor, targets: &Tensor) -> Result<Loss> {
        self.loss_with(ids, targets, ForwardOptions::default())
    }

    /// [`Model::loss`] with explicit [`ForwardOptions`] (the trainer's routing seed).
    pub fn loss_with(&self, ids: &Tensor, targets: &Tensor, opts: ForwardOptions) -> Result<Loss> {
        if self.encoder.is_some() {
            return Err(Error::Data(
                "the next-token loss takes a decoder-only model; this one is an \
                 encoder-decoder (it needs source/target pairs)"
                    .into(),
            ));
        }
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
            let choice = r.choose(x, step)?;
            return Ok(block
                .forward_routed(x, &choice, self.rope_of(l), 0, None)?
                .0);
        }
        let pos: Vec<u32> = positions.map_or_else(|| (0..t as u32).collect(), |p| p.to_vec());
        let tables = match self.rope_of(l) {
            Some(r) => {
                let idx = Tensor::new(pos.as_slice(), x.device())?;
                let (cos, sin) = r.gather(&idx)?;
                let half = cos.dim(1)?;
                let cos = cos.unsqueeze(0)?.broadcast_as((b, t, half))?.contiguous()?;
                let sin = sin.unsqueeze(0)?.broadcast_as((b, t, half))?.contiguous()?;
                Some((cos, sin))
            }
            None => None,
        };
        let pos = Positions {
            rope: tables.as_ref().map(|(c, s)| (c, s)),
            bias: None,
        };
        Ok(block.forward(x, pos, None)?.0)
    }

    pub fn new_cache(&self) -> Cache {
        Cache::new(self.blocks.len(), self.kv_dtype)
    }

    /// Hold the keys and values of the caches made from now on in `dtype` (`None`: the
    /// compute type). f16 halves a cached token's memory and what each step reads of it;
    /// attention still computes in f32. A model starts with caches of its compute type.
    pub fn set_kv_cache_dtype(&mut self, dtype: Option<DType>) {
        self.kv_dtype = dtype;
    }

    /// The type caches hold keys and values in (`None`: the compute type).
    pub fn kv_cache_dtype(&self) -> Option<DType> {
        self.kv_dtype
    }
}

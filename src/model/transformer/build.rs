//! Assembling a [`Model`] from its canonical parameters: each layer built from its names
//! (norms, projections held as tensors or in their stored form, attention, feed-forward,
//! routers), SwiGLU weights stacked as the fused kernels read them, every problem with the
//! parameters reported at once.

use candle_core::Tensor;
use std::collections::BTreeMap;

use super::{Encoder, Model};
use crate::config::{BlockKind, ModelConfig, Position, QkNorm, RopeScaling};
use crate::error::{Error, Result};
use crate::model::block::{Block, Ffn};
use crate::nn::attention::{Latent, Projections};
use crate::nn::qmatmul::{QMatrix, StoredWeights};
use crate::nn::{Attention, Linear, Mlp, Norm, RopeTables};
use crate::routing::{DepthRouter, MoeLayer};
use crate::weights::names::{check_params, with_stacks, ParamStack, StackKind};

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

impl Model {
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
}

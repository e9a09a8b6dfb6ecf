//! The file form of a model description: [`ModelConfigFile`] is what a person writes in
//! TOML or JSON (optional fields, unknown keys rejected); [`ModelConfigFile::resolve`]
//! fills the defaults and validates, giving a [`ModelConfig`].

use serde::{Deserialize, Serialize};

use super::{
    BlockKind, DepthConfig, FfnKind, LayerSpec, ModelConfig, MoeConfig, NormKind, Position, QkNorm,
    RopeScaling, Scoring, Selection,
};
use crate::error::{Error, Result};

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
    pub selection: Option<Selection>,
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
    /// `learned` (default) or `random` (ablation: each token's experts drawn at random).
    pub selection: Option<Selection>,
    /// MoE in every `every`-th layer (default 1) after the first `first_dense` (default 0),
    /// unless `layers` lists them explicitly. (Layers with different MoE settings are
    /// written in the resolved form, `config.json`'s per-layer `layers`.)
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
            selection: self.selection.unwrap_or_default(),
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
        // before anything is built per layer or computed from the width
        if n_layers > super::MAX_LAYERS {
            problems.push(format!(
                "n_layers ({n_layers}) is larger than {}",
                super::MAX_LAYERS
            ));
        }
        if d_model > super::validate::MAX_DIM {
            problems.push(format!(
                "d_model ({d_model}) is larger than {}",
                super::validate::MAX_DIM
            ));
        }
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
        let d_ff = self.d_ff.unwrap_or_else(|| match ffn.is_gated() {
            true => (8 * d_model / 3).div_ceil(32) * 32,
            false => 4 * d_model,
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
                        ..Default::default()
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
        self.mark_routed_layers(&mut cfg, &mut problems);
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

    /// The layers' Mixture-of-Depths and Mixture-of-Experts settings from `[depth]` and
    /// `[moe]` (which layers, and the settings each of them gets).
    fn mark_routed_layers(&self, cfg: &mut ModelConfig, problems: &mut Vec<String>) {
        let n_layers = cfg.n_layers;
        if let Some(df) = &self.depth {
            if cfg.layers.is_empty() {
                cfg.layers = vec![LayerSpec::default(); n_layers];
            }
            let dc = DepthConfig {
                capacity: df.capacity.unwrap_or(0.125),
                aux_loss_coef: df.aux_loss_coef.unwrap_or(1.0),
                predictor: df.predictor.unwrap_or(0),
                selection: df.selection.unwrap_or_default(),
                scale: Default::default(),
                keep_first: false,
                skip: Default::default(),
                norm_input: false,
            };
            let every = df.every.unwrap_or(2).max(1);
            for (l, spec) in cfg.layers.iter_mut().enumerate() {
                let routed = match &df.layers {
                    Some(list) => list.contains(&l),
                    None => l % every == every - 1,
                };
                spec.depth = routed.then_some(dc);
            }
            if cfg.layers.iter().all(|l| l.depth.is_none()) {
                problems.push("[depth] is set but no layer is routed".into());
            }
        }
        if let Some(mf) = &self.moe {
            let (m, marks) = mf.resolve(cfg.d_ff, n_layers);
            if cfg.layers.is_empty() {
                cfg.layers = vec![LayerSpec::default(); n_layers];
            }
            for (spec, on) in cfg.layers.iter_mut().zip(marks) {
                spec.moe = on.then_some(m);
            }
        }
    }
}

/// Parse routelm's own resolved `config.json`. Files written before layers carried their
/// own Mixture-of-Experts and Mixture-of-Depths settings (one top-level `moe` / `depth`
/// section and per-layer `moe` / `routed` flags) are read by moving each section into the
/// layers that were flagged.
pub fn parse_resolved(text: &str) -> serde_json::Result<ModelConfig> {
    let mut v: serde_json::Value = serde_json::from_str(text)?;
    if let Some(obj) = v.as_object_mut() {
        let moe = obj.remove("moe");
        let depth = obj.remove("depth");
        if let Some(layers) = obj.get_mut("layers").and_then(|l| l.as_array_mut()) {
            for layer in layers.iter_mut().filter_map(|l| l.as_object_mut()) {
                for (flag, key, section) in [("moe", "moe", &moe), ("routed", "depth", &depth)] {
                    // only the earlier layout's flags (the per-layer form has objects here)
                    let Some(on) = layer.get(flag).and_then(|f| f.as_bool()) else {
                        continue;
                    };
                    layer.remove(flag);
                    if let (true, Some(section)) = (on, section) {
                        layer.insert(key.into(), section.clone());
                    }
                }
            }
        }
    }
    serde_json::from_value(v)
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

    /// An absurd layer count is refused before the per-layer settings of `[moe]`,
    /// `[depth]` or a sliding window are built (30 million layers took 2.5 GB), and an
    /// absurd width before sizes are computed from it (they overflowed).
    #[test]
    fn absurd_layer_counts_and_widths_are_refused_before_use() {
        let text =
            "[model]\nd_model = 256\nn_layers = 30002028\nn_heads = 8\nsliding_window = 64\n\
                    [model.moe]\nn_experts = 8\ntop_k = 2\n\
                    [model.depth]\ncapacity = 0.5\n";
        let run = crate::RunFile::parse(text, false).unwrap();
        let err = run.model.resolve("big.toml").unwrap_err().to_string();
        assert!(
            err.contains("n_layers (30002028) is larger than 1024"),
            "{err}"
        );
        // a width whose default feed-forward size overflowed, though d_ff is given
        let text =
            "[model]\nd_model = 2563333333333333303\nn_layers = 6\nn_heads = 8\nd_ff = 704\n";
        let run = crate::RunFile::parse(text, false).unwrap();
        let err = run.model.resolve("wide.toml").unwrap_err().to_string();
        assert!(
            err.contains("d_model (2563333333333333303) is larger than"),
            "{err}"
        );
    }

    /// A config.json of the earlier layout (one `moe` section, layers flagged) reads as
    /// the per-layer form, and the per-layer form reads back as itself.
    #[test]
    fn earlier_resolved_layout_is_upgraded() {
        let f = ModelConfigFile {
            d_model: Some(16),
            n_layers: Some(3),
            n_heads: Some(2),
            moe: Some(MoeFile {
                first_dense: Some(1),
                ..Default::default()
            }),
            ..Default::default()
        };
        let c = f.resolve("x").unwrap();
        let m = serde_json::to_value(c.layer(1).moe.unwrap()).unwrap();
        let old = serde_json::json!({
            "layers": [{"window": null, "moe": false, "routed": false},
                       {"window": null, "moe": true, "routed": false},
                       {"window": null, "moe": true, "routed": false}],
            "moe": m,
        });
        let mut v = serde_json::to_value(&c).unwrap();
        let new_layers = v["layers"].clone();
        for (k, x) in old.as_object().unwrap() {
            v[k] = x.clone();
        }
        let text = serde_json::to_string(&v).unwrap();
        assert_eq!(parse_resolved(&text).unwrap(), c);
        v["layers"] = new_layers;
        v.as_object_mut().unwrap().remove("moe");
        assert_eq!(parse_resolved(&v.to_string()).unwrap(), c);
    }

    #[test]
    fn gated_d_ff_defaults_to_a_multiple_of_32() {
        let f = ModelConfigFile {
            d_model: Some(64),
            n_layers: Some(2),
            n_heads: Some(4),
            n_kv_heads: Some(2),
            ..Default::default()
        };
        let c = f.resolve("x").unwrap();
        assert_eq!(c.d_ff, 192); // 8/3 * 64 = 170.7 -> next multiple of 32
        assert_eq!((c.n_kv_heads, c.head_dim), (2, 16));
    }
}

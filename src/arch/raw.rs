//! A parsed Hugging Face `config.json` with getters that accept the families' historical
//! aliases and both rope layouts, collecting every problem for one report.

use serde_json::Value;
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::config::{ModelConfig, RopeScaling, MAX_LAYERS};
use crate::error::{Error, Result};

/// YaRN's attention temperature for a context stretched by `scale` (Peng et al., 2023;
/// DeepSeek weights it by `m`): `0.1 · m · ln(scale) + 1`, or 1 when not stretched.
pub fn yarn_mscale(scale: f64, m: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * m * scale.ln() + 1.0
    }
}

/// The problem reported for a key no adapter reads.
fn refusal(key: &str) -> String {
    format!(
        "{key} is not supported: routelm does not implement what it changes, so it refuses the model rather than compute something else"
    )
}

pub struct RawConfig {
    value: Value,
    path: PathBuf,
    problems: RefCell<Vec<String>>,
    /// Top-level keys an adapter looked at: the others are refused ([`RawConfig::check`])
    /// unless they cannot change what the model computes ([`NO_EFFECT`]).
    read: RefCell<BTreeSet<String>>,
}

/// `config.json` keys that never change what a forward pass computes: metadata, token ids,
/// training-only settings (dropout, initialisation, auxiliary losses) and output switches.
const NO_EFFECT: &[&str] = &[
    "_name_or_path",
    "_model_name_or_path",
    "_attn_implementation",
    "_commit_hash",
    "attn_implementation",
    "torchscript",
    "use_bfloat16",
    "tf_legacy_loss",
    "tie_encoder_decoder",
    "keys_to_ignore_at_inference",
    "cache_implementation",
    "unk_token_id",
    "mask_token_id",
    "cls_token_id",
    "architectures",
    "transformers_version",
    "model_type",
    "dtype",
    "torch_dtype",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    "use_cache",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "output_router_logits",
    "id2label",
    "label2id",
    "problem_type",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "is_decoder",
    "add_cross_attention",
    "initializer_range",
    "initializer_factor",
    "attention_dropout",
    "attn_pdrop",
    "embd_pdrop",
    "resid_pdrop",
    "hidden_dropout",
    "dropout_rate",
    "classifier_dropout",
    "summary_activation",
    "summary_first_dropout",
    "summary_proj_to_labels",
    "summary_type",
    "summary_use_proj",
    "router_aux_loss_coef",
    "router_z_loss_coef",
    "input_jitter_noise",
    "pretraining_tp",
    // BLOOM's tensor-parallel slicing of the same sum (only with pretraining_tp > 1)
    "slow_but_exact",
    "auto_map",
    // generation settings some older config.json files carry (generation_config.json's job)
    "max_length",
    "min_length",
    "do_sample",
    "early_stopping",
    "num_beams",
    "num_beam_groups",
    "num_return_sequences",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "diversity_penalty",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
    "output_scores",
    "return_dict_in_generate",
    "finetuning_task",
    "tokenizer_class",
    "quantization_config",
    "task_specific_params",
    "prefix",
    "n_ctx",
];

impl RawConfig {
    pub fn new(value: Value, path: PathBuf) -> Self {
        Self {
            value,
            path,
            problems: RefCell::new(Vec::new()),
            read: RefCell::new(BTreeSet::new()),
        }
    }

    /// The object under `key` as a config of its own (a multimodal model's `text_config`),
    /// with `key` recorded as read; [`RawConfig::absorb`] brings its problems back.
    pub fn nested(&self, key: &str) -> Option<RawConfig> {
        let v = self.get(key).filter(|v| v.is_object())?;
        Some(RawConfig::new(v.clone(), self.path.clone()))
    }

    /// Take over the problems (and unread keys) of a nested config, prefixed by its key.
    pub fn absorb(&self, key: &str, nested: &RawConfig) {
        let mut p = self.problems.borrow_mut();
        p.extend(
            nested
                .problems
                .borrow()
                .iter()
                .map(|m| format!("{key}.{m}")),
        );
        p.extend(
            nested
                .unread()
                .into_iter()
                .map(|k| refusal(&format!("{key}.{k}"))),
        );
    }

    /// The top-level value of `key` (recorded as read).
    fn get(&self, key: &str) -> Option<&Value> {
        self.read.borrow_mut().insert(key.to_string());
        self.value.get(key)
    }

    /// Mark keys as read: the adapter honours them through another path.
    pub fn acknowledge(&self, keys: &[&str]) {
        self.read
            .borrow_mut()
            .extend(keys.iter().map(|k| k.to_string()));
    }

    /// Keys present (and not null) that no adapter read and that can change the output.
    fn unread(&self) -> Vec<String> {
        let read = self.read.borrow();
        self.value
            .as_object()
            .map(|o| {
                o.iter()
                    .filter(|(k, v)| {
                        !v.is_null() && !read.contains(*k) && !NO_EFFECT.contains(&k.as_str())
                    })
                    .map(|(k, _)| k.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn model_type(&self) -> Option<String> {
        self.get("model_type")
            .and_then(|v| v.as_str())
            .map(str::to_string)
    }

    /// The first of `keys` present (every alias counts as read).
    fn first(&self, keys: &[&str]) -> Option<&Value> {
        self.acknowledge(keys);
        keys.iter()
            .filter_map(|k| self.value.get(*k))
            .find(|v| !v.is_null())
    }

    /// Whether the nested key `path` is present and not null.
    pub fn has(&self, path: &[&str]) -> bool {
        let mut v = &self.value;
        if let Some(k) = path.first() {
            self.get(k);
        }
        for k in path {
            match v.get(*k) {
                Some(x) if !x.is_null() => v = x,
                _ => return false,
            }
        }
        true
    }

    /// Record a problem, reported with all others by [`RawConfig::finish`].
    pub fn problem(&self, msg: String) {
        self.problems.borrow_mut().push(msg);
    }

    /// A required size under any of `keys`.
    pub fn usize(&self, keys: &[&str]) -> usize {
        self.opt_usize(keys).unwrap_or_else(|| {
            self.problem(format!("{} is required", keys.join(" / ")));
            0
        })
    }

    /// A required layer count under any of `keys`, at most [`MAX_LAYERS`] (a larger one is
    /// a problem, and 0 is returned, so that nothing is built per layer from it).
    pub fn layers(&self, keys: &[&str]) -> usize {
        let n = self.usize(keys);
        self.bounded(keys, n)
    }

    /// [`RawConfig::layers`] for a count that may be absent.
    pub fn opt_layers(&self, keys: &[&str]) -> Option<usize> {
        self.opt_usize(keys).map(|n| self.bounded(keys, n))
    }

    /// `n` when at most [`MAX_LAYERS`], else 0 and a problem naming `keys[0]`.
    fn bounded(&self, keys: &[&str], n: usize) -> usize {
        if n <= MAX_LAYERS {
            return n;
        }
        self.problem(format!(
            "{} ({n}) is absurdly large (at most {MAX_LAYERS})",
            keys[0]
        ));
        0
    }

    pub fn opt_usize(&self, keys: &[&str]) -> Option<usize> {
        let v = self.first(keys)?;
        match v.as_u64() {
            Some(n) => usize::try_from(n).ok(),
            None => {
                self.problem(format!(
                    "{} must be a non-negative integer, got {v}",
                    keys[0]
                ));
                None
            }
        }
    }

    pub fn f64_or(&self, keys: &[&str], default: f64) -> f64 {
        self.opt_f64(keys).unwrap_or(default)
    }

    pub fn opt_f64(&self, keys: &[&str]) -> Option<f64> {
        let v = self.first(keys)?;
        let f = v.as_f64();
        if f.is_none() {
            self.problem(format!("{} must be a number, got {v}", keys[0]));
        }
        f
    }

    pub fn bool_or(&self, key: &str, default: bool) -> bool {
        self.get(key).and_then(|v| v.as_bool()).unwrap_or(default)
    }

    /// A list of integers (e.g. `mlp_only_layers`).
    pub fn usize_list(&self, key: &str) -> Option<Vec<usize>> {
        let list = self.get(key)?.as_array()?;
        Some(
            list.iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as usize)
                .collect(),
        )
    }

    /// A list of strings (e.g. `layer_types`).
    pub fn str_list(&self, key: &str) -> Option<Vec<String>> {
        let list = self.get(key)?.as_array()?;
        Some(
            list.iter()
                .map(|v| v.as_str().unwrap_or_default().to_string())
                .collect(),
        )
    }

    pub fn str(&self, keys: &[&str]) -> Option<&str> {
        self.first(keys).and_then(|v| v.as_str())
    }

    /// The rope block: transformers 5's `rope_parameters` (optionally one per layer type,
    /// picked by `layer_type`), or 4.x's top-level `rope_theta` / `rope_scaling` /
    /// `partial_rotary_factor` / `rotary_pct` / `rotary_emb_base`.
    /// Returns (theta, partial rotary factor, scaling).
    pub fn rope(&self, layer_type: Option<&str>) -> (f64, f64, RopeScaling) {
        // every rope key of both layouts is looked at: what a layout leaves out comes from
        // the other, as in transformers' `convert_rope_params_to_dict`
        self.acknowledge(&[
            "rope_theta",
            "rope_scaling",
            "rotary_emb_base",
            "partial_rotary_factor",
            "rotary_pct",
        ]);
        let params = self.get("rope_parameters").filter(|v| v.is_object());
        let nested = params.zip(layer_type).and_then(|(p, lt)| p.get(lt));
        let params = nested.or(params);
        let get = |k: &str| params.and_then(|p| p.get(k)).and_then(|v| v.as_f64());
        let theta = get("rope_theta")
            .or_else(|| self.opt_f64(&["rope_theta", "rotary_emb_base"]))
            .unwrap_or(10_000.0);
        let partial = get("partial_rotary_factor")
            .or_else(|| self.opt_f64(&["partial_rotary_factor", "rotary_pct"]))
            .unwrap_or(1.0);
        let scaling = match params.or_else(|| self.get("rope_scaling").filter(|v| v.is_object())) {
            None => RopeScaling::None,
            Some(s) => self.rope_scaling(s, nested.is_some()),
        };
        (theta, partial, scaling)
    }

    /// One rope-scaling object (`rope_scaling`, or a `rope_parameters` block) as
    /// transformers' `modeling_rope_utils` reads it, defaults resolved.
    fn rope_scaling(&self, s: &Value, nested: bool) -> RopeScaling {
        let kind = s
            .get("rope_type")
            .or_else(|| s.get("type"))
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let max_pos = self.opt_f64(&["max_position_embeddings"]);
        // Phi-3 keeps the pretraining length at top level, where transformers gives it
        // priority for a single (not per-layer-type) rope block
        let top_original = self
            .get("original_max_position_embeddings")
            .and_then(|v| v.as_f64())
            .filter(|_| !nested);
        let b = ScalingBlock {
            raw: self,
            s,
            kind,
            max_pos,
            original: None,
        };
        let original = top_original
            .or_else(|| b.f("original_max_position_embeddings"))
            .or(max_pos);
        let b = ScalingBlock { original, ..b };
        match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: b.need("factor", b.f("factor")),
            },
            "llama3" => RopeScaling::Llama3 {
                factor: b.need("factor", b.f("factor")),
                low_freq_factor: b.need("low_freq_factor", b.f("low_freq_factor")),
                high_freq_factor: b.need("high_freq_factor", b.f("high_freq_factor")),
                original_max_position_embeddings: b
                    .need("original_max_position_embeddings", original),
            },
            "dynamic" => RopeScaling::Dynamic {
                factor: b.need("factor", b.f("factor")),
                max_position_embeddings: b.need("max_position_embeddings", max_pos),
            },
            "yarn" => b.yarn(),
            // "su" is what the first Phi-3 128k configs called LongRoPE
            "longrope" | "su" => b.longrope(),
            other => {
                self.problem(format!(
                    "rope scaling type '{other}' is not supported (default, linear, llama3, dynamic, yarn, longrope)"
                ));
                RopeScaling::None
            }
        }
    }

    /// The raw scaling object's `key`, for adapters that read one more value of it
    /// (DeepSeek-V3's softmax-scale correction).
    pub fn rope_scaling_value(&self, key: &str) -> Option<f64> {
        self.get("rope_parameters")
            .filter(|v| v.is_object())
            .or_else(|| self.get("rope_scaling"))
            .and_then(|s| s.get(key))
            .and_then(|v| v.as_f64())
    }

    /// Every problem seen while reading, plus the resolved config's own checks.
    pub fn finish(&self, cfg: ModelConfig) -> Result<ModelConfig> {
        self.check(|| cfg.problems())?;
        Ok(cfg)
    }

    /// The problems seen while reading, else those `own` finds in the result.
    pub fn check(&self, own: impl FnOnce() -> Vec<String>) -> Result<()> {
        let mut p = self.problems.borrow().clone();
        for key in self.unread() {
            p.push(refusal(&key));
        }
        if p.is_empty() {
            p.extend(own());
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(Error::Config {
                origin: self.path.display().to_string(),
                problems: p,
            })
        }
    }
}

/// One rope-scaling object being read: its keys, the lengths it is resolved against, and
/// the config where problems are noted.
struct ScalingBlock<'a> {
    raw: &'a RawConfig,
    s: &'a Value,
    kind: &'a str,
    max_pos: Option<f64>,
    /// The pretraining length: the block's, Phi-3's top-level one, or the context.
    original: Option<f64>,
}

impl ScalingBlock<'_> {
    /// The block's number `k` (0 reads as absent).
    fn f(&self, k: &str) -> Option<f64> {
        self.s.get(k).and_then(|v| v.as_f64()).filter(|v| *v != 0.0)
    }

    /// `v`, or a problem naming what this kind of scaling needs.
    fn need(&self, name: &str, v: Option<f64>) -> f64 {
        v.unwrap_or_else(|| {
            self.raw
                .problem(format!("{} rope scaling needs {name}", self.kind));
            1.0
        })
    }

    /// The factor given, else the ratio of the extended to the original length.
    fn factor(&self) -> f64 {
        match (self.f("factor"), self.max_pos, self.original) {
            (Some(x), _, _) => x,
            (None, Some(m), Some(o)) => m / o,
            _ => self.need("factor", None),
        }
    }

    fn yarn(&self) -> RopeScaling {
        let factor = self.factor();
        let attention_factor = self.f("attention_factor").unwrap_or_else(|| {
            match (self.f("mscale"), self.f("mscale_all_dim")) {
                (Some(m), Some(all)) => yarn_mscale(factor, m) / yarn_mscale(factor, all),
                _ => yarn_mscale(factor, 1.0),
            }
        });
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings: self
                .need("original_max_position_embeddings", self.original),
            beta_fast: self.f("beta_fast").unwrap_or(32.0),
            beta_slow: self.f("beta_slow").unwrap_or(1.0),
            truncate: self
                .s
                .get("truncate")
                .and_then(|v| v.as_bool())
                .unwrap_or(true),
            attention_factor,
        }
    }

    fn longrope(&self) -> RopeScaling {
        let list = |k: &str| -> Vec<f64> {
            match self.s.get(k).and_then(|v| v.as_array()) {
                Some(a) => a.iter().map(|v| v.as_f64().unwrap_or(f64::NAN)).collect(),
                None => {
                    self.raw.problem(format!(
                        "longrope rope scaling needs {k} (a list of numbers)"
                    ));
                    Vec::new()
                }
            }
        };
        let original = self.need("original_max_position_embeddings", self.original);
        let factor = self.factor();
        let attention_factor = self.f("attention_factor").unwrap_or(if factor <= 1.0 {
            1.0
        } else {
            (1.0 + factor.ln() / original.ln()).sqrt()
        });
        RopeScaling::LongRope {
            short_factor: list("short_factor"),
            long_factor: list("long_factor"),
            original_max_position_embeddings: original,
            attention_factor,
        }
    }
}

//! A parsed Hugging Face `config.json` with getters that accept the families' historical
//! aliases and both rope layouts, collecting every problem for one report.

use serde_json::Value;
use std::cell::RefCell;
use std::path::{Path, PathBuf};

use crate::config::{ModelConfig, RopeScaling};
use crate::error::{Error, Result};

pub struct RawConfig {
    value: Value,
    path: PathBuf,
    problems: RefCell<Vec<String>>,
}

impl RawConfig {
    pub fn new(value: Value, path: PathBuf) -> Self {
        Self {
            value,
            path,
            problems: RefCell::new(Vec::new()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn model_type(&self) -> Option<String> {
        self.value
            .get("model_type")
            .and_then(|v| v.as_str())
            .map(str::to_string)
    }

    fn first(&self, keys: &[&str]) -> Option<&Value> {
        keys.iter()
            .filter_map(|k| self.value.get(*k))
            .find(|v| !v.is_null())
    }

    /// Whether the nested key `path` is present and not null.
    pub fn has(&self, path: &[&str]) -> bool {
        let mut v = &self.value;
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
        self.value
            .get(key)
            .and_then(|v| v.as_bool())
            .unwrap_or(default)
    }

    /// A list of integers (e.g. `mlp_only_layers`).
    pub fn usize_list(&self, key: &str) -> Option<Vec<usize>> {
        let list = self.value.get(key)?.as_array()?;
        Some(
            list.iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as usize)
                .collect(),
        )
    }

    /// A list of strings (e.g. `layer_types`).
    pub fn str_list(&self, key: &str) -> Option<Vec<String>> {
        let list = self.value.get(key)?.as_array()?;
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
        let params = self.value.get("rope_parameters").filter(|v| v.is_object());
        let params = match (params, layer_type) {
            (Some(p), Some(lt)) if p.get(lt).is_some() => p.get(lt),
            (p, _) => p,
        };
        let get = |k: &str| params.and_then(|p| p.get(k)).and_then(|v| v.as_f64());
        let theta = get("rope_theta")
            .or_else(|| self.opt_f64(&["rope_theta", "rotary_emb_base"]))
            .unwrap_or(10_000.0);
        let partial = get("partial_rotary_factor")
            .or_else(|| self.opt_f64(&["partial_rotary_factor", "rotary_pct"]))
            .unwrap_or(1.0);
        let scaling_obj = match params {
            Some(p) => Some(p),
            None => self.value.get("rope_scaling").filter(|v| v.is_object()),
        };
        let scaling = match scaling_obj {
            None => RopeScaling::None,
            Some(s) => {
                let kind = s
                    .get("rope_type")
                    .or_else(|| s.get("type"))
                    .and_then(|v| v.as_str())
                    .unwrap_or("default");
                let f = |k: &str| s.get(k).and_then(|v| v.as_f64());
                match kind {
                    "default" => RopeScaling::None,
                    "linear" => RopeScaling::Linear {
                        factor: f("factor").unwrap_or(1.0),
                    },
                    "llama3" => match (
                        f("factor"),
                        f("low_freq_factor"),
                        f("high_freq_factor"),
                        f("original_max_position_embeddings"),
                    ) {
                        (Some(factor), Some(low), Some(high), Some(orig)) => RopeScaling::Llama3 {
                            factor,
                            low_freq_factor: low,
                            high_freq_factor: high,
                            original_max_position_embeddings: orig,
                        },
                        _ => {
                            self.problem("llama3 rope scaling needs factor, low_freq_factor, high_freq_factor and original_max_position_embeddings".into());
                            RopeScaling::None
                        }
                    },
                    other => {
                        self.problem(format!("rope scaling type '{other}' is not supported yet (default, linear, llama3)"));
                        RopeScaling::None
                    }
                }
            }
        };
        (theta, partial, scaling)
    }

    /// Every problem seen while reading, plus the resolved config's own checks.
    pub fn finish(&self, cfg: ModelConfig) -> Result<ModelConfig> {
        self.check(|| cfg.problems())?;
        Ok(cfg)
    }

    /// The problems seen while reading, else those `own` finds in the result.
    pub fn check(&self, own: impl FnOnce() -> Vec<String>) -> Result<()> {
        let mut p = self.problems.borrow().clone();
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

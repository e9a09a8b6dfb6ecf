//! Low-rank adapters (LoRA, Hu et al. 2021) on chosen projections: a projection `W` computes
//! `x Wᵀ + (alpha / r) · (x Aᵀ) Bᵀ` with `A: (r, in)` and `B: (out, r)`. Training updates
//! only `A` and `B`; `W` stays as loaded.

use serde::{Deserialize, Serialize};
use std::str::FromStr;

/// Which projections get adapters, their rank and scale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank of each adapter.
    pub r: usize,
    /// Scale numerator: the adapter's product is multiplied by `alpha / r`.
    pub alpha: f64,
    /// Module names (the last part of a projection's name, e.g. `q_proj`, `down_proj`):
    /// every projection of the model whose module name is in the list gets an adapter.
    pub targets: Vec<String>,
}

/// The short names `--lora targets=…` accepts, with the module each stands for.
pub const SHORT_TARGETS: &[(&str, &str)] = &[
    ("q", "q_proj"),
    ("k", "k_proj"),
    ("v", "v_proj"),
    ("o", "o_proj"),
    ("gate", "gate_proj"),
    ("up", "up_proj"),
    ("down", "down_proj"),
];

impl LoraConfig {
    /// The factor on the adapter's product.
    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }

    /// Whether the projection named `module` (`….self_attn.q_proj`) gets an adapter.
    pub fn targets_module(&self, module: &str) -> bool {
        let leaf = module.rsplit('.').next().unwrap_or(module);
        self.targets.iter().any(|t| t == leaf)
    }
}

impl FromStr for LoraConfig {
    type Err = String;

    /// `r=16,alpha=32,targets=q,k,v,o,gate,up,down`: after `targets=`, every comma-separated
    /// word without `=` is one more target (a short name or a module name such as
    /// `kv_b_proj`). Defaults: r 8, alpha 2·r, targets q and v.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut r = 8usize;
        let mut alpha = None;
        let mut targets: Option<Vec<String>> = None;
        let mut in_targets = false;
        for pair in super::options::pairs(s) {
            let (key, value) = match pair {
                Ok(kv) => kv,
                Err(part) if in_targets => {
                    targets.get_or_insert_with(Vec::new).push(part.to_string());
                    continue;
                }
                Err(part) => return Err(super::options::not_pair(part)),
            };
            in_targets = false;
            match key.trim() {
                "r" => {
                    r = value
                        .parse::<usize>()
                        .ok()
                        .filter(|&r| (1..=4096).contains(&r))
                        .ok_or_else(|| {
                            format!("r must be a whole number from 1 to 4096, got {value:?}")
                        })?
                }
                "alpha" => {
                    alpha = Some(
                        value
                            .parse::<f64>()
                            .ok()
                            .filter(|a| a.is_finite() && *a > 0.0)
                            .ok_or_else(|| format!("alpha must be a number > 0, got {value:?}"))?,
                    )
                }
                "targets" => {
                    in_targets = true;
                    let t = targets.get_or_insert_with(Vec::new);
                    if !value.trim().is_empty() {
                        t.push(value.trim().to_string());
                    }
                }
                "dropout" => {
                    let p: f64 = value
                        .parse()
                        .map_err(|_| format!("dropout must be a number, got {value:?}"))?;
                    if p != 0.0 {
                        return Err(
                            "dropout on the adapters' input is not supported; leave it at 0".into(),
                        );
                    }
                }
                other => {
                    return Err(format!(
                        "unknown key {other:?} (known: r, alpha, targets, dropout)"
                    ))
                }
            }
        }
        let mut names = Vec::new();
        for t in targets.unwrap_or_else(|| vec!["q".into(), "v".into()]) {
            let module = SHORT_TARGETS
                .iter()
                .find(|(short, _)| *short == t)
                .map_or(t.clone(), |(_, m)| m.to_string());
            let ok = !module.is_empty()
                && module
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                return Err(format!("{t:?} is not a module name"));
            }
            if !names.contains(&module) {
                names.push(module);
            }
        }
        Ok(LoraConfig {
            r,
            alpha: alpha.unwrap_or(2.0 * r as f64),
            targets: names,
        })
    }
}

//! Expert upcycling (Komatsuzaki et al., "Sparse Upcycling", ICLR 2023): a dense model's
//! feed-forward blocks become Mixture-of-Experts layers whose experts all start as copies
//! of the dense block. The router is random; since the chosen experts' weights are
//! renormalised to sum to one and every expert computes the same function, the model's
//! outputs are those of the dense model at step 0 whatever the router picks. Training then
//! lets the experts drift apart on the tokens each one receives.

use std::str::FromStr;

use candle_core::Tensor;

use crate::config::{options, ModelConfig, MoeConfig};
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::weights::Params;

/// How to upcycle: `n_experts=8,top_k=2[,every=1][,aux=0.01]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Upcycle {
    /// Experts per upcycled layer (each a copy of the dense block).
    pub n_experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Upcycle every `every`-th layer, starting with the first (1: all).
    pub every: usize,
    /// Load-balancing loss coefficient of the new layers.
    pub aux_loss_coef: f64,
}

impl FromStr for Upcycle {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let mut u = Upcycle {
            n_experts: 0,
            top_k: 0,
            every: 1,
            aux_loss_coef: 0.01,
        };
        for pair in options::key_values(s) {
            let (key, value) = pair?;
            let count = || options::whole(key, value);
            match key {
                "n_experts" => u.n_experts = count()?,
                "top_k" => u.top_k = count()?,
                "every" => u.every = count()?,
                "aux" => u.aux_loss_coef = options::non_negative(key, value)?,
                _ => {
                    return Err(format!(
                        "unknown key {key:?} (known: n_experts, top_k, every, aux)"
                    ))
                }
            }
        }
        if u.n_experts < 2 {
            return Err("n_experts must be at least 2".into());
        }
        if u.top_k == 0 || u.top_k > u.n_experts {
            return Err(format!(
                "top_k must be from 1 to n_experts ({}), got {}",
                u.n_experts, u.top_k
            ));
        }
        if u.every == 0 {
            return Err("every must be at least 1".into());
        }
        Ok(u)
    }
}

/// The upcycled model: every chosen layer's dense feed-forward block replaced by
/// `n_experts` copies of it behind a router initialised with `seed` (normal, the model's
/// `init_std`). Layers that already route their tokens to experts are left as they are.
pub fn upcycle(
    cfg: &ModelConfig,
    mut params: Params,
    u: &Upcycle,
    seed: u64,
) -> Result<(ModelConfig, Params)> {
    let problem = |msg: String| Error::Config {
        origin: "--upcycle".into(),
        problems: vec![msg],
    };
    if cfg.encoder_layers > 0 {
        return Err(problem(
            "an encoder-decoder model cannot be upcycled (training takes decoder-only models)"
                .into(),
        ));
    }
    let mut out = cfg.clone();
    out.layers.resize(cfg.n_layers, Default::default());
    let moe = MoeConfig {
        aux_loss_coef: u.aux_loss_coef,
        ..MoeConfig::new(u.n_experts, u.top_k, cfg.d_ff)
    };
    let mut rng = Rng::new(seed);
    let mut upcycled = 0;
    for l in (0..cfg.n_layers).step_by(u.every) {
        if out.layers[l].moe.is_some() {
            continue;
        }
        out.layers[l].moe = Some(moe);
        let p = format!("model.layers.{l}.mlp.");
        let dense: Vec<(String, Tensor)> = params
            .iter()
            .filter(|(k, _)| k.starts_with(&p))
            .map(|(k, t)| (k[p.len()..].to_string(), t.clone()))
            .collect();
        if dense.is_empty() {
            return Err(problem(format!(
                "layer {l} has no dense feed-forward weights ({p}…) to copy"
            )));
        }
        for (rest, _) in &dense {
            params.remove(&format!("{p}{rest}"));
        }
        for e in 0..u.n_experts {
            for (rest, t) in &dense {
                params.insert(format!("{p}experts.{e}.{rest}"), t.clone());
            }
        }
        let d = cfg.d_model;
        let router: Vec<f32> = (0..u.n_experts * d)
            .map(|_| (rng.normal() * cfg.init_std) as f32)
            .collect();
        let dev = dense[0].1.device();
        let router =
            Tensor::from_vec(router, (u.n_experts, d), dev)?.to_dtype(dense[0].1.dtype())?;
        params.insert(format!("{p}gate.weight"), router);
        upcycled += 1;
    }
    if upcycled == 0 {
        return Err(problem(
            "no layer left to upcycle: the chosen layers are Mixture-of-Experts already".into(),
        ));
    }
    let problems = crate::weights::names::check_params(&out, &params);
    if !problems.is_empty() {
        return Err(Error::WeightMismatch {
            path: "--upcycle".into(),
            problems,
        });
    }
    Ok((out, params))
}

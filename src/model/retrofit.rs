//! Depth retrofit: a published dense model becomes a Mixture-of-Depths model. Chosen
//! blocks get a router (and optionally a small causal predictor); a token the router
//! passes over skips the block on the residual path. The processed tokens' updates keep
//! their full size ([`DepthScale::Unit`]), so at capacity 1 the model is the dense one, and
//! below it the only change is which tokens skip. Training then teaches the routers which
//! tokens can skip (the base frozen, with LoRA, or in full).

use std::str::FromStr;

use candle_core::Tensor;

use crate::config::{options, DepthConfig, DepthScale, DepthSkip, ModelConfig, Selection};
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::weights::Params;

/// How to retrofit: `capacity=0.5[,every=2][,layers=1:3:5][,predictor=0][,aux=0.1][,skip=block|attention|mlp]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Retrofit {
    /// Share of a sequence's tokens a routed block processes in training.
    pub capacity: f64,
    /// Route every `every`-th block, the last of each group (2: blocks 1, 3, 5, …).
    pub every: usize,
    /// The routed blocks by index, instead of `every`.
    pub layers: Option<Vec<usize>>,
    /// Hidden width of the causal predictor (0: the router's sign decides at sampling).
    pub predictor: usize,
    /// Weight of the auxiliary loss that teaches the causal decider.
    pub aux_loss_coef: f64,
    /// What a passed-over token skips: the whole block, or its feed-forward.
    pub skip: DepthSkip,
}

impl FromStr for Retrofit {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let mut r = Retrofit {
            capacity: 0.5,
            every: 2,
            layers: None,
            predictor: 0,
            aux_loss_coef: 0.1,
            skip: DepthSkip::Block,
        };
        for pair in options::key_values(s) {
            let (key, value) = pair?;
            let count = |v: &str| options::whole(key, v);
            match key {
                "capacity" => {
                    r.capacity = value
                        .parse::<f64>()
                        .ok()
                        .filter(|c| *c > 0.0 && *c <= 1.0)
                        .ok_or_else(|| format!("capacity must be in (0, 1], got {value:?}"))?
                }
                "every" => {
                    r.every = count(value)?;
                    if r.every == 0 {
                        return Err("every must be at least 1".into());
                    }
                }
                "layers" => {
                    r.layers = Some(value.split(':').map(count).collect::<std::result::Result<_, _>>()?)
                }
                "predictor" => r.predictor = count(value)?,
                "aux" => r.aux_loss_coef = options::non_negative(key, value)?,
                "skip" => {
                    r.skip = match value {
                        "block" => DepthSkip::Block,
                        "mlp" => DepthSkip::Mlp,
                        "attention" | "attn" => DepthSkip::Attention,
                        _ => {
                            return Err(format!(
                                "skip={value}: a passed-over token skips its whole block (skip=block), its attention (skip=attention) or its feed-forward (skip=mlp)"
                            ))
                        }
                    }
                }
                _ => {
                    return Err(format!(
                        "unknown key {key:?} (known: capacity, every, layers, predictor, aux, skip)"
                    ))
                }
            }
        }
        Ok(r)
    }
}

/// The blocks `r` routes in a model of `n_layers`.
fn routed(r: &Retrofit, n_layers: usize) -> Vec<usize> {
    match &r.layers {
        Some(v) => v.clone(),
        None => (0..n_layers)
            .filter(|l| l % r.every == r.every - 1)
            .collect(),
    }
}

/// `cfg` and `params` with routers on the chosen blocks, drawn from `seed` (the router
/// and predictor tables of [`crate::weights::names::param_specs`], at the model's init
/// scale).
pub fn retrofit(
    cfg: &ModelConfig,
    mut params: Params,
    r: &Retrofit,
    seed: u64,
) -> Result<(ModelConfig, Params)> {
    let bad = |msg: String| Error::Config {
        origin: "--retrofit".into(),
        problems: vec![msg],
    };
    if cfg.encoder_layers > 0 {
        return Err(bad(
            "an encoder-decoder has no decoder-only blocks to route".into(),
        ));
    }
    let layers = routed(r, cfg.n_layers);
    if layers.is_empty() {
        return Err(bad(format!(
            "no block of the model's {} is routed",
            cfg.n_layers
        )));
    }
    if let Some(&l) = layers.iter().find(|&&l| l >= cfg.n_layers) {
        return Err(bad(format!(
            "block {l} does not exist (the model has {})",
            cfg.n_layers
        )));
    }
    let mut out = cfg.clone();
    if out.layers.len() < cfg.n_layers {
        out.layers.resize(cfg.n_layers, Default::default());
    }
    for &l in &layers {
        if out.layers[l].depth.is_some() {
            return Err(bad(format!("block {l} is routed already")));
        }
        out.layers[l].depth = Some(DepthConfig {
            capacity: r.capacity,
            aux_loss_coef: r.aux_loss_coef,
            predictor: r.predictor,
            selection: Selection::Learned,
            scale: DepthScale::Unit,
            keep_first: true,
            skip: r.skip,
            norm_input: true,
        });
    }
    let problems = out.problems();
    if !problems.is_empty() {
        return Err(Error::Config {
            origin: "--retrofit".into(),
            problems,
        });
    }
    let mut rng = Rng::new(seed ^ 0xDE97);
    let device = params
        .values()
        .next()
        .map_or(candle_core::Device::Cpu, |t| t.device().clone());
    for spec in crate::weights::names::param_specs(&out) {
        if params.contains_key(&spec.name) {
            continue;
        }
        let std = match spec.init {
            crate::weights::names::Init::Normal(s) => s,
            _ => cfg.init_std,
        };
        let n = spec.numel();
        let v: Vec<f32> = (0..n).map(|_| (rng.normal() * std) as f32).collect();
        params.insert(
            spec.name.clone(),
            Tensor::from_vec(v, spec.shape.as_slice(), &device)?,
        );
    }
    Ok((out, params))
}

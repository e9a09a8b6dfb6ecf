//! Deterministic initialisation for training from scratch, from the parameter table.

use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::weights::names::{param_specs, Init};

/// Memory this process can still take, in bytes (Linux's `MemAvailable`); `None` where
/// the system does not say.
pub fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Whether `copies` f32 copies of every parameter of `cfg` (1 for a model, 4 to train
/// it: weights, gradients and AdamW's two moments) fit in the memory available; if not,
/// what to tell the user. Each size of a config can be within its limit while their
/// product is not: this is checked before anything is allocated (an allocation of
/// terabytes fails late, or makes the machine swap).
pub fn fits_in_memory(cfg: &ModelConfig, copies: u64) -> std::result::Result<(), String> {
    // with adapters, only they train: the base weights are held once
    let specs = param_specs(cfg);
    let count = |s: &crate::weights::names::ParamSpec| -> u128 {
        s.shape.iter().map(|&d| d as u128).product::<u128>()
    };
    let params: u128 = specs.iter().map(count).sum();
    let need: u128 = specs
        .iter()
        .map(|s| {
            let trains = cfg.lora.is_none() || crate::weights::names::is_adapter(&s.name);
            count(s) * 4 * if trains { copies as u128 } else { 1 }
        })
        .sum();
    let gib = |b: u128| b as f64 / (1u64 << 30) as f64;
    match available_memory() {
        Some(have) if need > have as u128 => Err(format!(
            "the model has {params} parameters: {:.1} GiB{}, more than the {:.1} GiB of memory available",
            gib(need),
            if copies > 1 {
                format!(" for its weights, gradients and optimizer state ({copies} f32 copies)")
            } else {
                " in f32".into()
            },
            gib(have as u128)
        )),
        _ => Ok(()),
    }
}

/// Fresh parameters for `cfg`, drawn from `seed` (same seed, same weights, on any device).
/// A model larger than the memory available is an error, before anything is allocated.
pub fn init_params(
    cfg: &ModelConfig,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<BTreeMap<String, Tensor>> {
    fits_in_memory(cfg, 1).map_err(|msg| Error::Config {
        origin: "new model".into(),
        problems: vec![msg],
    })?;
    draw(param_specs(cfg), seed, dtype, device)
}

/// Fresh values for the adapters of `cfg.lora` alone (the base weights come from a file),
/// drawn from `seed`.
pub fn init_adapters(
    cfg: &ModelConfig,
    seed: u64,
    device: &Device,
) -> Result<BTreeMap<String, Tensor>> {
    let specs = param_specs(cfg)
        .into_iter()
        .filter(|s| crate::weights::names::is_adapter(&s.name))
        .collect();
    draw(specs, seed, DType::F32, device)
}

/// Each parameter of `specs` drawn by its initialiser, in order, from one stream.
fn draw(
    specs: Vec<crate::weights::names::ParamSpec>,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<BTreeMap<String, Tensor>> {
    let mut rng = Rng::new(seed);
    let mut out = BTreeMap::new();
    for spec in specs {
        let n = spec.numel();
        let data: Vec<f32> = match spec.init {
            Init::Normal(std) => (0..n).map(|_| (rng.normal() * std) as f32).collect(),
            Init::Uniform(b) => (0..n)
                .map(|_| ((2.0 * rng.uniform() - 1.0) * b) as f32)
                .collect(),
            Init::Ones => vec![1.0; n],
            Init::Zeros => vec![0.0; n],
        };
        let t = Tensor::from_vec(data, spec.shape.as_slice(), device)?.to_dtype(dtype)?;
        out.insert(spec.name, t);
    }
    Ok(out)
}

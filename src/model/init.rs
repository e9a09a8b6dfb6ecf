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
    let params: u128 = param_specs(cfg)
        .iter()
        .map(|s| s.shape.iter().map(|&d| d as u128).product::<u128>())
        .sum();
    let need = params * 4 * copies as u128;
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
    let mut rng = Rng::new(seed);
    let mut out = BTreeMap::new();
    for spec in param_specs(cfg) {
        let n = spec.numel();
        let data: Vec<f32> = match spec.init {
            Init::Normal(std) => (0..n).map(|_| (rng.normal() * std) as f32).collect(),
            Init::Ones => vec![1.0; n],
            Init::Zeros => vec![0.0; n],
        };
        let t = Tensor::from_vec(data, spec.shape.as_slice(), device)?.to_dtype(dtype)?;
        out.insert(spec.name, t);
    }
    Ok(out)
}

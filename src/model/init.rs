//! Deterministic initialisation for training from scratch, from the parameter table.

use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;

use crate::config::ModelConfig;
use crate::error::Result;
use crate::rng::Rng;
use crate::weights::names::{param_specs, Init};

/// Fresh parameters for `cfg`, drawn from `seed` (same seed, same weights, on any device).
pub fn init_params(
    cfg: &ModelConfig,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<BTreeMap<String, Tensor>> {
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

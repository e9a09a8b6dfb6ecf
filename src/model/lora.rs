//! Low-rank adapters on a loaded model ([`LoraConfig`]): adding fresh ones for training,
//! merging them into the base weights, and the PEFT adapter folder
//! (`adapter_config.json` + `adapter_model.safetensors`) that transformers + `peft` load.
//!
//! PEFT names a tensor after the module it adapts in the published model,
//! `base_model.model.<module>.lora_A.weight`; the caller passes the translation between
//! our canonical module names and the published ones ([`ModuleNames`]).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::config::{LoraConfig, ModelConfig};
use crate::error::{Error, Result};
use crate::weights::{self, names::is_adapter, Params};

/// PEFT's prefix on every tensor name of a causal language model's adapter.
const PEFT_PREFIX: &str = "base_model.model.";

/// How a canonical projection appears in the published model: its module name there and,
/// when the published rows come in another order, `rows[i]` = the published row of
/// canonical row `i` (DeepSeek's interleaved rotary rows).
#[derive(Debug, Clone, PartialEq)]
pub struct Published {
    pub module: String,
    pub rows: Option<Vec<u32>>,
}

/// Canonical module name (`model.layers.0.self_attn.q_proj`) → published one; `None`: the
/// two are the same (a GGUF file or routelm checkpoint, whose canonical names follow
/// transformers' Llama layout).
pub type ModuleNames = Option<BTreeMap<String, Published>>;

/// `params` (a base model's) with fresh adapters of `lora` drawn from `seed`: the model's
/// outputs are unchanged (every `B` starts at zero). An error when no projection matches
/// the targets, listing the ones the model has.
pub fn attach(
    cfg: &ModelConfig,
    mut params: Params,
    lora: &LoraConfig,
    seed: u64,
) -> Result<(ModelConfig, Params)> {
    if cfg.lora.is_some() {
        return Err(config_error(
            "the model already has adapters: merge them first (train --merge)",
        ));
    }
    let mut out = cfg.clone();
    out.lora = Some(lora.clone());
    let fresh = crate::model::init::init_adapters(&out, seed, &Device::Cpu)?;
    if fresh.is_empty() {
        return Err(config_error(&format!(
            "no projection of this model is named {}; its projections: {}",
            lora.targets.join(", "),
            module_kinds(cfg).join(", ")
        )));
    }
    let device = params
        .values()
        .next()
        .map_or(Device::Cpu, |t| t.device().clone());
    for (name, t) in fresh {
        params.insert(name, t.to_device(&device)?);
    }
    Ok((out, params))
}

fn config_error(msg: &str) -> Error {
    Error::Config {
        origin: "--lora".into(),
        problems: vec![msg.to_string()],
    }
}

/// The distinct module names of the model's projections (`q_proj`, `down_proj`, …).
fn module_kinds(cfg: &ModelConfig) -> Vec<String> {
    let mut kinds: Vec<String> = crate::weights::names::param_specs(cfg)
        .iter()
        .filter(|s| s.shape.len() == 2 && s.name.starts_with("model.layers."))
        .filter_map(|s| s.name.strip_suffix(".weight"))
        .filter_map(|m| m.rsplit('.').next())
        .map(str::to_string)
        .collect();
    kinds.sort();
    kinds.dedup();
    kinds
}

/// The adapted projections' canonical module names, each with its `(A, B)`.
fn pairs(params: &Params) -> Result<Vec<(String, Tensor, Tensor)>> {
    let mut v = Vec::new();
    for (name, a) in params {
        let Some(module) = name.strip_suffix(".lora_A.weight") else {
            continue;
        };
        let b = params
            .get(&format!("{module}.lora_B.weight"))
            .ok_or_else(|| Error::WeightMismatch {
                path: "adapters".into(),
                problems: vec![format!("{module} has lora_A but no lora_B")],
            })?;
        v.push((module.to_string(), a.clone(), b.clone()));
    }
    Ok(v)
}

/// The adapters folded into the base weights, `W + (alpha / r) · B A`: a plain model of
/// the same family, as fast as the base.
pub fn merge(cfg: &ModelConfig, params: &Params) -> Result<(ModelConfig, Params)> {
    let Some(lora) = &cfg.lora else {
        return Ok((cfg.clone(), params.clone()));
    };
    let mut out: Params = params
        .iter()
        .filter(|(n, _)| !is_adapter(n))
        .map(|(n, t)| (n.clone(), t.clone()))
        .collect();
    for (module, a, b) in pairs(params)? {
        let name = format!("{module}.weight");
        let w = out.get(&name).ok_or_else(|| Error::WeightMismatch {
            path: "adapters".into(),
            problems: vec![format!("an adapter for {module}, which the model lacks")],
        })?;
        let delta = (b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)? * lora.scale())?;
        let merged = (w.to_dtype(DType::F32)? + delta)?.to_dtype(w.dtype())?;
        out.insert(name, merged);
    }
    let mut cfg = cfg.clone();
    cfg.lora = None;
    Ok((cfg, out))
}

/// Write the adapters of `params` as a PEFT adapter folder: `adapter_config.json` and
/// `adapter_model.safetensors` (float32), under the published module names, assembled
/// beside `dir` and renamed into place. `base` is recorded as `base_model_name_or_path`.
pub fn save_peft(
    dir: &Path,
    cfg: &ModelConfig,
    params: &Params,
    names: &ModuleNames,
    base: &str,
) -> Result<()> {
    let Some(lora) = &cfg.lora else {
        return Err(config_error("the model has no adapters to save"));
    };
    let mut tensors = Params::new();
    let mut targets: Vec<String> = Vec::new();
    for (module, a, b) in pairs(params)? {
        let (published, b) = match names {
            None => (module.clone(), b),
            Some(map) => {
                let p = map.get(&module).ok_or_else(|| {
                    config_error(&format!(
                        "{module} is not one module in the published layout (a fused projection), so PEFT cannot name its adapter; save the merged weights instead"
                    ))
                })?;
                let b = match &p.rows {
                    None => b,
                    Some(rows) => {
                        // published row rows[i] holds canonical row i
                        let mut inverse = vec![0u32; rows.len()];
                        for (i, &r) in rows.iter().enumerate() {
                            inverse[r as usize] = i as u32;
                        }
                        let idx = Tensor::from_vec(inverse, rows.len(), b.device())?;
                        b.index_select(&idx, 0)?
                    }
                };
                (p.module.clone(), b)
            }
        };
        let leaf = published
            .rsplit('.')
            .next()
            .unwrap_or(&published)
            .to_string();
        if !targets.contains(&leaf) {
            targets.push(leaf);
        }
        let f32 = |t: Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.contiguous()?) };
        tensors.insert(format!("{PEFT_PREFIX}{published}.lora_A.weight"), f32(a)?);
        tensors.insert(format!("{PEFT_PREFIX}{published}.lora_B.weight"), f32(b)?);
    }
    targets.sort();
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    });
    let tmp = dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    weights::save_safetensors(&tmp.join("adapter_model.safetensors"), &tensors)?;
    let text = serde_json::to_string_pretty(&config).map_err(|e| Error::parse(&tmp, e))?;
    weights::write_atomic(&tmp.join("adapter_config.json"), text.as_bytes())?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    weights::rename_durably(&tmp, dir)
}

/// The subset of PEFT's `adapter_config.json` routelm reads.
#[derive(serde::Deserialize)]
struct PeftConfig {
    peft_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    rank_pattern: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    alpha_pattern: serde_json::Map<String, serde_json::Value>,
}

/// Read a PEFT LoRA adapter folder for the base model `cfg`: the config with its adapters
/// declared, and the adapters' tensors under canonical names (to add to the base's
/// parameters). Every tensor must adapt a projection the model has, with the shapes it
/// needs; what PEFT can express and routelm does not run (DoRA, rsLoRA, per-module ranks,
/// adapters on embeddings or the head) is refused by name.
pub fn load_peft(
    dir: &Path,
    cfg: &ModelConfig,
    names: &ModuleNames,
) -> Result<(ModelConfig, Params)> {
    let pc = read_peft_config(&dir.join("adapter_config.json"))?;
    let path = dir.join("adapter_model.safetensors");
    let tensors = weights::load_safetensors(&path, Some(DType::F32), &Device::Cpu)?;
    let mut problems = Vec::new();
    let (params, targets) = canonical_adapters(tensors, names, &mut problems)?;
    let mut out = cfg.clone();
    out.lora = Some(LoraConfig {
        r: pc.r,
        alpha: pc.lora_alpha,
        targets,
    });
    // the table the config now implies must be exactly what the file holds
    let expected: BTreeMap<String, Vec<usize>> = crate::weights::names::param_specs(&out)
        .into_iter()
        .filter(|s| is_adapter(&s.name))
        .map(|s| (s.name, s.shape))
        .collect();
    for (name, shape) in &expected {
        match params.get(name) {
            None => problems.push(format!("no adapter for {name}")),
            Some(t) if t.dims() != shape.as_slice() => problems.push(format!(
                "{name}: shape {:?}, the model needs {shape:?}",
                t.dims()
            )),
            Some(_) => {}
        }
    }
    for name in params.keys() {
        if !expected.contains_key(name) {
            problems.push(format!("{name}: adapts no projection of the model"));
        }
    }
    if params.is_empty() && problems.is_empty() {
        problems.push("the file holds no adapters".into());
    }
    if !problems.is_empty() {
        return Err(Error::WeightMismatch { path, problems });
    }
    Ok((out, params))
}

/// A PEFT `adapter_config.json` that routelm can run: LoRA with one rank and alpha, no
/// option that changes what the adapter computes; anything else refused by name.
fn read_peft_config(path: &Path) -> Result<PeftConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let pc: PeftConfig = serde_json::from_str(&text).map_err(|e| Error::parse(path, e))?;
    let refuse = |what: &str| Error::parse(path, what.to_string());
    if pc.peft_type.as_deref().is_some_and(|t| t != "LORA") {
        return Err(refuse(&format!(
            "peft_type {:?}: routelm reads LoRA adapters",
            pc.peft_type.unwrap_or_default()
        )));
    }
    if pc.use_rslora || pc.use_dora || pc.fan_in_fan_out {
        return Err(refuse(
            "rsLoRA, DoRA and fan_in_fan_out adapters are not supported",
        ));
    }
    if !pc.rank_pattern.is_empty() || !pc.alpha_pattern.is_empty() {
        return Err(refuse("per-module ranks or alphas are not supported"));
    }
    // options that change what the adapter computes, which routelm does not run: each
    // must be absent, null, false or empty
    let raw: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::parse(path, e))?;
    for key in [
        "lora_bias",
        "use_qalora",
        "use_bdlora",
        "layers_to_transform",
        "layer_replication",
        "modules_to_save",
        "target_parameters",
        "trainable_token_indices",
        "alora_invocation_tokens",
    ] {
        let set = match raw.get(key) {
            None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => false,
            Some(serde_json::Value::Array(v)) => !v.is_empty(),
            Some(serde_json::Value::Object(v)) => !v.is_empty(),
            Some(_) => true,
        };
        if set {
            return Err(refuse(&format!(
                "{key} is set: routelm does not run such adapters"
            )));
        }
    }
    if pc.r == 0 || !(pc.lora_alpha.is_finite() && pc.lora_alpha > 0.0) {
        return Err(refuse("r and lora_alpha must be positive"));
    }
    Ok(pc)
}

/// The adapter file's tensors under canonical names (`{projection}.lora_A.weight`,
/// `….lora_B.weight`; a published projection that is rows of a canonical one, its B's
/// rows picked) and the projections' leaf names adapted, in order of appearance; a tensor
/// that is no adapter of a projection the model publishes goes to `problems`.
fn canonical_adapters(
    tensors: impl IntoIterator<Item = (String, Tensor)>,
    names: &ModuleNames,
    problems: &mut Vec<String>,
) -> Result<(Params, Vec<String>)> {
    // published module → canonical one
    let back: Option<BTreeMap<&str, (&str, &Published)>> = names.as_ref().map(|m| {
        m.iter()
            .map(|(c, p)| (p.module.as_str(), (c.as_str(), p)))
            .collect()
    });
    let mut params = Params::new();
    let mut targets: Vec<String> = Vec::new();
    for (name, t) in tensors {
        let Some(rest) = name.strip_prefix(PEFT_PREFIX) else {
            problems.push(format!("{name}: not a PEFT causal-LM adapter tensor"));
            continue;
        };
        let (module, kind) = match (
            rest.strip_suffix(".lora_A.weight"),
            rest.strip_suffix(".lora_B.weight"),
        ) {
            (Some(m), _) => (m, "lora_A"),
            (_, Some(m)) => (m, "lora_B"),
            _ => {
                problems.push(format!("{name}: not a lora_A or lora_B weight"));
                continue;
            }
        };
        let (canonical, t) = match &back {
            None => (module.to_string(), t),
            Some(b) => match b.get(module) {
                None => {
                    problems.push(format!("{name}: the base model has no projection {module}"));
                    continue;
                }
                Some((c, p)) => match (&p.rows, kind) {
                    (Some(rows), "lora_B") => {
                        let idx = Tensor::from_vec(rows.clone(), rows.len(), t.device())?;
                        (c.to_string(), t.index_select(&idx, 0)?)
                    }
                    _ => (c.to_string(), t),
                },
            },
        };
        let leaf = canonical.rsplit('.').next().unwrap_or_default().to_string();
        if !targets.contains(&leaf) {
            targets.push(leaf);
        }
        params.insert(format!("{canonical}.{kind}.weight"), t);
    }
    Ok((params, targets))
}

//! Published model families. A family is an adapter: it turns a Hugging Face `config.json`
//! into our [`ModelConfig`] and maps its tensor names (and layouts) onto the canonical
//! parameter table. This is the only module that knows Hugging Face keys or tensor names.
//!
//! Adding a family: one file with `config` and `tensors` functions, one line in
//! [`FAMILIES`]. A mechanism the family needs belongs in `nn/` or `model/` as an option.

mod bloom;
mod deepseek;
mod gemma;
mod gguf;
pub mod gguf_export;
mod gpt2;
mod gpt_neox;
mod llama;
mod moe;
mod phi;
mod phi3;
mod qwen;
mod raw;
mod t5;

pub use raw::RawConfig;

use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::weights::{self, Params};

/// One family: which `model_type` values it answers to and its two translations.
pub struct Family {
    pub name: &'static str,
    pub model_types: &'static [&'static str],
    /// `config.json` → resolved config.
    pub config: fn(&RawConfig) -> ModelConfig,
    /// The family's tensors → canonical names and layouts.
    pub tensors: fn(&ModelConfig, &mut TensorMap) -> Result<Params>,
}

/// Every family routelm loads.
pub static FAMILIES: &[Family] = &[
    Family {
        name: "llama",
        model_types: &["llama", "mistral"],
        config: llama::config,
        tensors: llama::tensors,
    },
    Family {
        name: "qwen2",
        model_types: &["qwen2"],
        config: qwen::config_qwen2,
        tensors: llama::tensors,
    },
    Family {
        name: "qwen3",
        model_types: &["qwen3"],
        config: qwen::config_qwen3,
        tensors: llama::tensors,
    },
    Family {
        name: "gemma",
        model_types: &["gemma"],
        config: gemma::config_gemma,
        tensors: llama::tensors,
    },
    Family {
        name: "gemma2",
        model_types: &["gemma2"],
        config: gemma::config_gemma2,
        tensors: gemma::tensors_gemma2,
    },
    Family {
        name: "gemma3",
        model_types: &["gemma3_text"],
        config: gemma::config_gemma3,
        tensors: gemma::tensors_gemma2,
    },
    Family {
        name: "gemma3_multimodal",
        model_types: &["gemma3"],
        config: gemma::config_gemma3_multimodal,
        tensors: gemma::tensors_gemma3_multimodal,
    },
    Family {
        name: "phi3",
        model_types: &["phi3"],
        config: phi3::config,
        tensors: phi3::tensors,
    },
    Family {
        name: "phi",
        model_types: &["phi"],
        config: phi::config,
        tensors: phi::tensors,
    },
    Family {
        name: "gpt2",
        model_types: &["gpt2"],
        config: gpt2::config,
        tensors: gpt2::tensors,
    },
    Family {
        name: "deepseek_v3",
        model_types: &["deepseek_v3"],
        config: deepseek::config,
        tensors: deepseek::tensors,
    },
    Family {
        name: "mixtral",
        model_types: &["mixtral"],
        config: moe::config_mixtral,
        tensors: moe::tensors_mixtral,
    },
    Family {
        name: "phimoe",
        model_types: &["phimoe"],
        config: moe::config_phimoe,
        tensors: moe::tensors_mixtral,
    },
    Family {
        name: "qwen2_moe",
        model_types: &["qwen2_moe"],
        config: moe::config_qwen2_moe,
        tensors: llama::tensors,
    },
    Family {
        name: "qwen3_moe",
        model_types: &["qwen3_moe"],
        config: moe::config_qwen3_moe,
        tensors: llama::tensors,
    },
    Family {
        name: "olmoe",
        model_types: &["olmoe"],
        config: moe::config_olmoe,
        tensors: llama::tensors,
    },
    Family {
        name: "bloom",
        model_types: &["bloom"],
        config: bloom::config,
        tensors: bloom::tensors,
    },
    Family {
        name: "gpt_neox",
        model_types: &["gpt_neox"],
        config: gpt_neox::config,
        tensors: gpt_neox::tensors,
    },
    Family {
        name: "t5",
        model_types: t5::MODEL_TYPES,
        config: t5::config,
        tensors: t5::tensors,
    },
];

/// The family of a parsed `config.json`, or an error listing the known ones.
pub fn detect(raw: &RawConfig) -> Result<&'static Family> {
    let mt = raw.model_type().unwrap_or_default();
    FAMILIES
        .iter()
        .find(|f| f.model_types.contains(&mt.as_str()))
        .ok_or_else(|| {
            let known: Vec<&str> = FAMILIES
                .iter()
                .flat_map(|f| f.model_types.iter().copied())
                .chain(t5::MODEL_TYPES.iter().copied())
                .collect();
            Error::parse(
                raw.path(),
                format!(
                    "unknown architecture model_type '{mt}' (known: {})",
                    known.join(", ")
                ),
            )
        })
}

/// How canonical tensors came from one file tensor, so that they can be written back.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    /// The file tensor under another (or the same) name.
    Renamed,
    /// Consecutive row blocks of the file tensor, transposed first when `transposed`
    /// (GPT-2's Conv1D stores `[in, out]`).
    Split { transposed: bool },
    /// Rows interleaved per head as `[h, 3, d]` → q, k, v (GPT-NeoX, BLOOM).
    Interleaved { heads: usize, head_dim: usize },
    /// Rows reordered: canonical row `i` is file row `order[i]`.
    Rows(Vec<u32>),
}

/// One file tensor and the canonical tensors made from it.
#[derive(Debug, Clone)]
pub struct Provenance {
    pub file: String,
    pub parts: Vec<String>,
    pub origin: Origin,
}

/// Tensors by their file names, taken out as an adapter maps them; what is left over at
/// the end is reported as unexpected. Every mapping is recorded, so a family's layout can
/// be written back ([`export_dir`]).
pub struct TensorMap {
    pub origin: PathBuf,
    pub tensors: BTreeMap<String, Tensor>,
    problems: Vec<String>,
    pub provenance: Vec<Provenance>,
    /// Name prefixes moved by [`TensorMap::move_prefix`] (file prefix, map prefix), undone
    /// in the provenance.
    moved: Vec<(String, String)>,
}

impl TensorMap {
    pub fn new(origin: PathBuf, tensors: BTreeMap<String, Tensor>) -> Self {
        Self {
            origin,
            tensors,
            problems: Vec::new(),
            provenance: Vec::new(),
            moved: Vec::new(),
        }
    }

    /// Give every tensor named `from…` the name `to…` (a language model nested in a
    /// multimodal checkpoint), so the family's own rules apply; the provenance keeps the
    /// file's names.
    pub fn move_prefix(&mut self, from: &str, to: &str) {
        let names: Vec<String> = self
            .tensors
            .keys()
            .filter(|k| k.starts_with(from))
            .cloned()
            .collect();
        for name in names {
            if let Some(t) = self.tensors.remove(&name) {
                self.tensors
                    .insert(format!("{to}{}", &name[from.len()..]), t);
            }
        }
        self.moved.push((from.to_string(), to.to_string()));
    }

    /// Drop every tensor named `prefix…` (parts of a checkpoint routelm does not run);
    /// returns how many.
    pub fn skip_prefix(&mut self, prefix: &str) -> usize {
        let before = self.tensors.len();
        self.tensors.retain(|k, _| !k.starts_with(prefix));
        before - self.tensors.len()
    }

    fn record(&mut self, file: &str, parts: Vec<String>, origin: Origin) {
        let file = self
            .moved
            .iter()
            .find_map(|(from, to)| file.strip_prefix(to.as_str()).map(|r| format!("{from}{r}")))
            .unwrap_or_else(|| file.to_string());
        self.provenance.push(Provenance {
            file,
            parts,
            origin,
        });
    }

    /// Cut `from` into consecutive row blocks named and sized by `to` (after a transpose
    /// when `transposed`).
    pub fn split_rows(
        &mut self,
        out: &mut Params,
        from: &str,
        to: &[(String, usize)],
        transposed: bool,
    ) -> Result<()> {
        let Some(t) = self.take(from) else {
            return Ok(());
        };
        let t = if transposed { t.t()? } else { t };
        let sizes: Vec<usize> = to.iter().map(|p| p.1).collect();
        for ((name, _), part) in to.iter().zip(split(&t, 0, &sizes)?) {
            out.insert(name.clone(), part);
        }
        let parts = to.iter().map(|p| p.0.clone()).collect();
        self.record(from, parts, Origin::Split { transposed });
        Ok(())
    }

    /// Split rows interleaved per head as `[heads, 3, head_dim, ..]` into q, k, v.
    pub fn unfuse_heads(
        &mut self,
        out: &mut Params,
        from: &str,
        to: [String; 3],
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        let Some(t) = self.take(from) else {
            return Ok(());
        };
        let rest: Vec<usize> = t.dims()[1..].to_vec();
        let shape: Vec<usize> = [heads, 3, head_dim].iter().chain(&rest).copied().collect();
        let t = t.reshape(shape)?;
        let flat: Vec<usize> = [heads * head_dim].iter().chain(&rest).copied().collect();
        for (i, name) in to.iter().enumerate() {
            let part = t.narrow(1, i, 1)?.contiguous()?.reshape(flat.as_slice())?;
            out.insert(name.clone(), part);
        }
        self.record(from, to.to_vec(), Origin::Interleaved { heads, head_dim });
        Ok(())
    }

    /// Reorder the rows of `from` (canonical row `i` = file row `order[i]`) into `to`.
    pub fn permute_rows(
        &mut self,
        out: &mut Params,
        from: &str,
        to: &str,
        order: Vec<u32>,
    ) -> Result<()> {
        let Some(t) = self.take(from) else {
            return Ok(());
        };
        let idx = Tensor::from_vec(order.clone(), order.len(), t.device())?;
        out.insert(to.to_string(), t.index_select(&idx, 0)?);
        self.record(from, vec![to.to_string()], Origin::Rows(order));
        Ok(())
    }

    /// Remove and return a tensor; a missing one is recorded (all reported together).
    pub fn take(&mut self, name: &str) -> Option<Tensor> {
        let t = self.tensors.remove(name);
        if t.is_none() {
            self.problems.push(format!("missing tensor {name}"));
        }
        t
    }

    /// Whether a tensor of this name is still unclaimed.
    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Remove a tensor that may be absent.
    pub fn take_opt(&mut self, name: &str) -> Option<Tensor> {
        self.tensors.remove(name)
    }

    /// Move `from` to `to` in `out` (recording a missing one).
    pub fn rename(&mut self, out: &mut Params, from: &str, to: &str) {
        if let Some(t) = self.take(from) {
            out.insert(to.to_string(), t);
            self.record(from, vec![to.to_string()], Origin::Renamed);
        }
    }

    /// Move `from` to `to` if present.
    pub fn rename_opt(&mut self, out: &mut Params, from: &str, to: &str) {
        if let Some(t) = self.take_opt(from) {
            out.insert(to.to_string(), t);
            self.record(from, vec![to.to_string()], Origin::Renamed);
        }
    }

    /// Every canonical tensor of `cfg` not yet in `out`, taken under its own name (the
    /// family stores it as we do); missing ones are recorded.
    pub fn take_canonical(&mut self, cfg: &ModelConfig, out: &mut Params) {
        for spec in crate::weights::names::param_specs(cfg) {
            if !out.contains_key(&spec.name) {
                self.rename(out, &spec.name, &spec.name);
            }
        }
    }

    /// Errors for missing tensors, and for tensors no adapter rule consumed.
    pub fn finish(mut self) -> Result<()> {
        for name in self.tensors.keys() {
            self.problems.push(format!("unexpected tensor {name}"));
        }
        if self.problems.is_empty() {
            Ok(())
        } else {
            Err(Error::WeightMismatch {
                path: self.origin,
                problems: self.problems,
            })
        }
    }
}

/// A loaded model and the family it came from (`None`: routelm's own format).
pub struct Loaded {
    pub family: Option<&'static str>,
    pub model: Model,
}

/// Split `t` along `dim` into pieces of the given sizes.
pub fn split(t: &Tensor, dim: usize, sizes: &[usize]) -> Result<Vec<Tensor>> {
    let mut out = Vec::with_capacity(sizes.len());
    let mut at = 0;
    for &n in sizes {
        out.push(t.narrow(dim, at, n)?.contiguous()?);
        at += n;
    }
    Ok(out)
}

/// A sharded checkpoint's weight map: tensor name → shard file.
type WeightMap = serde_json::Map<String, serde_json::Value>;

/// The safetensors files of a folder (`model.safetensors`, or the shards listed by
/// `model.safetensors.index.json`) and the path errors name; with the index's weight map
/// to check every listed tensor against.
fn weight_files(dir: &Path) -> Result<(PathBuf, Vec<PathBuf>, Option<WeightMap>)> {
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        let path = dir.join("model.safetensors");
        return Ok((path.clone(), vec![path], None));
    }
    let map = weight_map(&index)?;
    let mut files: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
    files.sort_unstable();
    files.dedup();
    let mut paths = Vec::new();
    for f in files {
        let path = dir.join(f);
        if !path.exists() {
            return Err(Error::parse(
                &index,
                format!("shard {f} is listed but missing"),
            ));
        }
        paths.push(path);
    }
    Ok((index, paths, Some(map)))
}

/// Every tensor an index lists is in some shard (`found`).
fn check_listed(index: &Path, map: &WeightMap, found: &dyn Fn(&str) -> bool) -> Result<()> {
    match map.keys().find(|n| !found(n)) {
        Some(name) => Err(Error::parse(
            index,
            format!("tensor {name} is listed but in no shard"),
        )),
        None => Ok(()),
    }
}

/// Read every safetensors file of a folder: `model.safetensors`, or the shards listed by
/// `model.safetensors.index.json`.
pub fn read_weights(dir: &Path, dtype: DType, device: &Device) -> Result<(PathBuf, Params)> {
    let (origin, files, map) = weight_files(dir)?;
    let mut params = BTreeMap::new();
    for path in &files {
        params.extend(weights::load_safetensors(path, Some(dtype), device)?);
    }
    if let Some(map) = &map {
        check_listed(&origin, map, &|n| params.contains_key(n))?;
    }
    Ok((origin, params))
}

/// The configuration of a model folder without reading its weights: the family (None for
/// routelm's own format) and the resolved config.
pub fn load_config(dir: &Path) -> Result<(Option<&'static Family>, ModelConfig)> {
    if is_gguf(dir) {
        return gguf::config(dir);
    }
    let (cfg_path, value) = read_config_json(dir)?;
    if value.get("model_type").is_none() && value.get("architectures").is_none() {
        return Ok((None, weights::load_config(dir)?));
    }
    let raw = RawConfig::new(value, cfg_path.clone());
    let family = detect(&raw)?;
    let cfg = raw.finish((family.config)(&raw))?;
    Ok((Some(family), cfg))
}

/// The resolved config and canonical parameters of a model folder, checked against each
/// other (every problem reported at once).
pub fn load_params(
    dir: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(Option<&'static str>, ModelConfig, Params)> {
    if is_gguf(dir) {
        return gguf::load(dir, dtype, device);
    }
    let (family, cfg) = load_config(dir)?;
    let Some(family) = family else {
        let path = dir.join("model.safetensors");
        let params = weights::load_safetensors(&path, Some(dtype), device)?;
        let problems = crate::weights::names::check_params(&cfg, &params);
        if !problems.is_empty() {
            return Err(Error::WeightMismatch { path, problems });
        }
        return Ok((None, cfg, params));
    };
    let (origin, params) = read_weights(dir, dtype, device)?;
    warn_non_finite(&params, &origin)?;
    let canonical = canonical_params(family, &cfg, params, origin)?;
    Ok((Some(family.name), cfg, canonical))
}

/// A family's tensors (under the file's names) through the family's rules to the
/// canonical parameters, every leftover, missing or misshapen tensor reported at once.
fn canonical_params(
    family: &Family,
    cfg: &ModelConfig,
    params: Params,
    origin: PathBuf,
) -> Result<Params> {
    Ok(canonical_params_traced(family, cfg, params, origin)?.0)
}

/// [`canonical_params`] with the provenance of each canonical tensor.
fn canonical_params_traced(
    family: &Family,
    cfg: &ModelConfig,
    params: Params,
    origin: PathBuf,
) -> Result<(Params, Vec<Provenance>)> {
    let mut map = TensorMap::new(origin.clone(), params);
    let canonical = (family.tensors)(cfg, &mut map)?;
    let provenance = std::mem::take(&mut map.provenance);
    map.finish()?;
    let problems = crate::weights::names::check_params(cfg, &canonical);
    if !problems.is_empty() {
        return Err(Error::WeightMismatch {
            path: origin,
            problems,
        });
    }
    Ok((canonical, provenance))
}

/// Files of a Hugging Face folder that travel with exported weights.
const COMPANION_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
];

/// Write `params` (canonical names, e.g. after fine-tuning) into `dst` in the layout of
/// the Hugging Face folder `src` they were loaded from, so that routelm and transformers
/// load the result like `src`: the family's tensor names and fused or reordered layouts
/// (replayed backwards from what the loader recorded), one float32 `model.safetensors`,
/// and `config.json`, `generation_config.json` and the tokenizer files copied. Tensors the
/// loader dropped (a tied head's stored copy, rotary or mask buffers) are not written.
/// The folder is assembled as `dst.tmp` and renamed into place.
pub fn export_dir(src: &Path, dst: &Path, params: &Params) -> Result<()> {
    let (family, cfg) = load_config(src)?;
    let Some(family) = family else {
        return Err(Error::parse(
            src.join("config.json"),
            "a routelm checkpoint has no published layout to export to",
        ));
    };
    let (origin, file_params) = read_weights(src, DType::F32, &Device::Cpu)?;
    let mut map = TensorMap::new(origin.clone(), file_params);
    (family.tensors)(&cfg, &mut map)?;
    let mut out = Params::new();
    for p in &map.provenance {
        let parts = p
            .parts
            .iter()
            .map(|n| {
                params
                    .get(n)
                    .map(|t| t.to_dtype(DType::F32))
                    .transpose()?
                    .ok_or_else(|| Error::WeightMismatch {
                        path: origin.clone(),
                        problems: vec![format!("no parameter {n} to write {} from", p.file)],
                    })
            })
            .collect::<Result<Vec<Tensor>>>()?;
        let t = match &p.origin {
            Origin::Renamed => parts[0].clone(),
            Origin::Split { transposed } => {
                let t = Tensor::cat(&parts, 0)?;
                if *transposed {
                    t.t()?
                } else {
                    t
                }
            }
            Origin::Interleaved { heads, head_dim } => {
                let rest: Vec<usize> = parts[0].dims()[1..].to_vec();
                let shape: Vec<usize> = [*heads, 1, *head_dim]
                    .iter()
                    .chain(&rest)
                    .copied()
                    .collect();
                let parts = parts
                    .iter()
                    .map(|t| t.reshape(shape.as_slice()))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let rows: Vec<usize> = [3 * heads * head_dim]
                    .iter()
                    .chain(&rest)
                    .copied()
                    .collect();
                Tensor::cat(&parts, 1)?.reshape(rows.as_slice())?
            }
            Origin::Rows(order) => {
                let mut inverse = vec![0u32; order.len()];
                for (i, &o) in order.iter().enumerate() {
                    inverse[o as usize] = i as u32;
                }
                let idx = Tensor::from_vec(inverse, order.len(), parts[0].device())?;
                parts[0].index_select(&idx, 0)?
            }
        };
        out.insert(p.file.clone(), t.contiguous()?);
    }
    let tmp = dst.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    weights::save_safetensors(&tmp.join("model.safetensors"), &out)?;
    for f in COMPANION_FILES {
        let from = src.join(f);
        if from.exists() {
            std::fs::copy(&from, tmp.join(f)).map_err(|e| Error::io(&from, e))?;
        }
    }
    if dst.exists() {
        std::fs::remove_dir_all(dst).map_err(|e| Error::io(dst, e))?;
    }
    std::fs::rename(&tmp, dst).map_err(|e| Error::io(dst, e))
}

/// The tensor names a folder's weights hold (`model.safetensors` or the shards of its
/// index), read from the file headers alone.
pub fn stored_names(dir: &Path) -> Result<std::collections::HashSet<String>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        return Ok(weight_map(&index)?.keys().cloned().collect());
    }
    let (_, _, meta) = weights::read_header(&dir.join("model.safetensors"))?;
    Ok(meta.tensors().into_keys().collect())
}

/// The `weight_map` (tensor name → shard file) of a sharded checkpoint's index.
fn weight_map(index: &Path) -> Result<WeightMap> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let mut v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::parse(index, e))?;
    match v.get_mut("weight_map").map(serde_json::Value::take) {
        Some(serde_json::Value::Object(m)) => Ok(m),
        _ => Err(Error::parse(index, "no weight_map object")),
    }
}

/// Whether `path` names a GGUF file (rather than a model folder).
pub fn is_gguf(path: &Path) -> bool {
    path.is_file() && path.extension().is_some_and(|e| e == "gguf")
}

/// Load a model folder (a Hugging Face checkpoint of a known family, or routelm's own) or
/// a GGUF file. Loaded in f32 on the CPU, the projections, embeddings and head stay in
/// their stored form, read in place from the memory-mapped file by the kernels (GGUF's
/// quantized blocks; f32, bf16 or f16 safetensors), so resident memory is about the
/// file's size and a bf16 file is read at half the bytes of its f32 upcast. In another
/// dtype or on another device, or through [`load_params`], every tensor is converted.
pub fn load_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Loaded> {
    load_dir_with(dir, None, dtype, device)
}

/// [`load_dir`] with a PEFT LoRA adapter folder applied to the model (`adapter`): the
/// adapters run beside the base weights, which stay in their stored form.
pub fn load_dir_with(
    dir: &Path,
    adapter: Option<&Path>,
    dtype: DType,
    device: &Device,
) -> Result<Loaded> {
    load_dir_as(dir, adapter, dtype, device, true)
}

/// [`load_dir_with`]; `in_place: false` converts every weight to `dtype` tensors (a GGUF
/// file's dequantized: exact products in f32 instead of the quantized kernels' 8-bit
/// activations, for comparing with a reference that dequantized the same file).
pub fn load_dir_as(
    dir: &Path,
    adapter: Option<&Path>,
    dtype: DType,
    device: &Device,
    in_place: bool,
) -> Result<Loaded> {
    let adapt = |cfg: ModelConfig, mut params: Params| -> Result<(ModelConfig, Params)> {
        let Some(a) = adapter else {
            return Ok((cfg, params));
        };
        let (cfg, adapters) = crate::model::lora::load_peft(a, &cfg, &published_modules(dir)?)?;
        for (name, t) in adapters {
            params.insert(name, t.to_dtype(dtype)?.to_device(device)?);
        }
        Ok((cfg, params))
    };
    if dtype == DType::F32 && device.is_cpu() && in_place {
        if is_gguf(dir) {
            let (family, cfg, params, stored) = gguf::load_stored(dir, device)?;
            let (cfg, params) = adapt(cfg, params)?;
            let origin = dir.display().to_string();
            return Ok(Loaded {
                family,
                model: Model::from_stored(&cfg, params, stored, &origin)?,
            });
        }
        let (family, cfg) = load_config(dir)?;
        let (origin, params, stored) = load_safetensors_stored(dir, family, &cfg)?;
        let (cfg, params) = adapt(cfg, params)?;
        return Ok(Loaded {
            family: family.map(|f| f.name),
            model: Model::from_stored(&cfg, params, stored, &origin.display().to_string())?,
        });
    }
    let (family, cfg, params) = load_params(dir, dtype, device)?;
    let (cfg, params) = adapt(cfg, params)?;
    // the parameters are checked against the config already
    let origin = dir.join("model.safetensors").display().to_string();
    Ok(Loaded {
        family,
        model: Model::from_owned(&cfg, params, &origin)?,
    })
}

/// For a Hugging Face folder, each canonical projection's module name in the folder's
/// own layout (where it is one tensor there, renamed or with its rows reordered); `None`
/// for a GGUF file or a routelm checkpoint, whose canonical names are the published ones
/// (transformers' Llama layout). PEFT adapters are named this way.
pub fn published_modules(dir: &Path) -> Result<crate::model::lora::ModuleNames> {
    if is_gguf(dir) {
        return Ok(None);
    }
    let (family, cfg) = load_config(dir)?;
    let Some(family) = family else {
        return Ok(None);
    };
    let (origin, file_params) = read_weights(dir, DType::F32, &Device::Cpu)?;
    let mut map = TensorMap::new(origin, file_params);
    (family.tensors)(&cfg, &mut map)?;
    let mut out = BTreeMap::new();
    for p in &map.provenance {
        let rows = match (&p.origin, p.parts.len()) {
            (Origin::Renamed, 1) => None,
            (Origin::Rows(order), 1) => Some(order.clone()),
            _ => continue,
        };
        let (Some(canonical), Some(file)) = (
            p.parts[0].strip_suffix(".weight"),
            p.file.strip_suffix(".weight"),
        ) else {
            continue;
        };
        out.insert(
            canonical.to_string(),
            crate::model::lora::Published {
                module: file.to_string(),
                rows,
            },
        );
    }
    Ok(Some(out))
}

/// Whether the model reads `name` (a canonical name) through a layer that takes stored
/// weights: an attention or feed-forward projection (a dense block's or an expert's), the
/// token embeddings, the head.
pub(crate) fn takes_stored(name: &str) -> bool {
    if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
        return true;
    }
    let Some(rest) = name.strip_prefix("model.layers.") else {
        return false;
    };
    let Some((_, leaf)) = rest.split_once('.') else {
        return false;
    };
    if let Some(e) = leaf.strip_prefix("mlp.experts.") {
        // an expert's projection: `mlp.experts.E.{gate,up,down}_proj.weight`
        return e.split_once('.').is_some_and(|(i, p)| {
            i.parse::<usize>().is_ok()
                && matches!(
                    p,
                    "gate_proj.weight" | "up_proj.weight" | "down_proj.weight"
                )
        });
    }
    matches!(
        leaf,
        "self_attn.q_proj.weight"
            | "self_attn.k_proj.weight"
            | "self_attn.v_proj.weight"
            | "self_attn.o_proj.weight"
            | "mlp.gate_proj.weight"
            | "mlp.up_proj.weight"
            | "mlp.down_proj.weight"
    )
}

/// Stored weights keyed by their names in the file, re-keyed by the family's rules to the
/// canonical names they became (the stand-ins travelled the same way): renamed, or cut
/// into consecutive row blocks (fused q/k/v or gate/up projections), each block a view of
/// the stored rows. A stored weight the rules transposed or reordered is an error (its
/// stand-in holds no values).
fn rekey_stored(
    stored: crate::nn::qmatmul::StoredWeights,
    provenance: &[Provenance],
    canonical: &Params,
    origin: &Path,
) -> Result<crate::nn::qmatmul::StoredWeights> {
    let by_file: std::collections::HashMap<&str, &Provenance> =
        provenance.iter().map(|p| (p.file.as_str(), p)).collect();
    let mut out = crate::nn::qmatmul::StoredWeights::new();
    for (name, q) in stored {
        let reshaped = || Error::WeightMismatch {
            path: origin.to_path_buf(),
            problems: vec![format!(
                "tensor {name}: kept in its stored form, but the family's rules reshape it"
            )],
        };
        let p = by_file.get(name.as_str()).ok_or_else(reshaped)?;
        match p.origin {
            Origin::Renamed if p.parts.len() == 1 => {
                out.insert(p.parts[0].clone(), q);
            }
            Origin::Split { transposed: false } => {
                let mut at = 0;
                for part in &p.parts {
                    let rows = canonical.get(part).ok_or_else(reshaped)?.dim(0)?;
                    if at + rows > q.rows {
                        return Err(reshaped());
                    }
                    out.insert(
                        part.clone(),
                        std::sync::Arc::new(q.rows_range(at, at + rows)),
                    );
                    at += rows;
                }
            }
            _ => return Err(reshaped()),
        }
    }
    Ok(out)
}

/// Every stored weight sits where the model reads stored weights (else the model would
/// read its NaN stand-in).
fn check_stored(
    stored: &crate::nn::qmatmul::StoredWeights,
    params: &Params,
    origin: &Path,
) -> Result<()> {
    match stored
        .keys()
        .find(|n| !params.contains_key(*n) || !takes_stored(n))
    {
        Some(lost) => Err(Error::WeightMismatch {
            path: origin.to_path_buf(),
            problems: vec![format!("tensor {lost}: not where the model reads it")],
        }),
        None => Ok(()),
    }
}

/// Whether a file's tensor of this name may be kept stored: a name [`takes_stored`]
/// takes, a fused q/k/v or gate/up projection (the rules cut it into row blocks), or an
/// expert's projection under the names families give them (the rules rename them to
/// canonical ones; checked after).
pub(crate) fn storable_file_name(name: &str) -> bool {
    takes_stored(name)
        || name.ends_with(".self_attn.qkv_proj.weight")
        || name.ends_with(".mlp.gate_up_proj.weight")
        || (name.contains(".experts.")
            && ["_proj.weight", ".w1.weight", ".w2.weight", ".w3.weight"]
                .iter()
                .any(|s| name.ends_with(s)))
}

/// A safetensors folder for inference on the CPU: the weights [`takes_stored`] names
/// (under the file's names, which are canonical for the families that have them) stay in
/// the memory-mapped file in their own dtype (f32, bf16, f16), every other tensor is read
/// into f32; then the family's rules. A stored weight the rules moved elsewhere is an
/// error (it would be read as its NaN stand-in).
fn load_safetensors_stored(
    dir: &Path,
    family: Option<&'static Family>,
    cfg: &ModelConfig,
) -> Result<(PathBuf, Params, crate::nn::qmatmul::StoredWeights)> {
    use crate::nn::qmatmul::{QBytes, QMatrix, StoredWeights};
    use crate::weights::quant::GgmlType;
    use safetensors::Dtype;
    use std::sync::Arc;
    let (origin, files, map) = weight_files(dir)?;
    let storable = |name: &str, info: &safetensors::tensor::TensorInfo| {
        matches!(info.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16)
            && info.shape.len() == 2
            && storable_file_name(name)
    };
    let mut params = Params::new();
    let mut stored = StoredWeights::new();
    for path in &files {
        let (read, left) =
            weights::load_safetensors_except(path, Some(DType::F32), &Device::Cpu, &storable)?;
        warn_non_finite(&read, path)?;
        params.extend(read);
        if left.is_empty() {
            continue;
        }
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only; a file changed underneath a running model is the hazard every
        // memory-mapped reader accepts
        let mmap = Arc::new(unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?);
        for t in left {
            let ty = match t.dtype {
                Dtype::F32 => GgmlType::F32,
                Dtype::BF16 => GgmlType::BF16,
                _ => GgmlType::F16,
            };
            let (rows, cols) = (t.shape[0], t.shape[1]);
            let bytes = QBytes::Mapped {
                map: mmap.clone(),
                start: t.start,
                len: t.len,
            };
            let q =
                QMatrix::new(ty, rows, cols, bytes).map_err(|problem| Error::WeightMismatch {
                    path: path.clone(),
                    problems: vec![format!("tensor {}: {problem}", t.name)],
                })?;
            params.insert(t.name.clone(), crate::nn::linear::stand_in(rows, cols)?);
            stored.insert(t.name, Arc::new(q));
        }
    }
    if let Some(map) = &map {
        check_listed(&origin, map, &|n| params.contains_key(n))?;
    }
    let (params, stored) = match family {
        Some(family) => {
            let (params, provenance) =
                canonical_params_traced(family, cfg, params, origin.clone())?;
            let stored = rekey_stored(stored, &provenance, &params, &origin)?;
            (params, stored)
        }
        None => (params, stored),
    };
    check_stored(&stored, &params, &origin)?;
    Ok((origin, params, stored))
}

/// `DIR/config.json`, parsed, and its path.
fn read_config_json(dir: &Path) -> Result<(PathBuf, serde_json::Value)> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let value = serde_json::from_str(&text).map_err(|e| Error::parse(&path, e))?;
    Ok((path, value))
}

/// NaN or infinite weights are allowed (some checkpoints carry them in unused rows) but
/// reported on stderr through `tracing`.
fn warn_non_finite(params: &Params, origin: &Path) -> Result<()> {
    for (name, t) in params {
        if has_non_finite(t)? {
            tracing::warn!(
                "{}: tensor {name} contains NaN or infinite values",
                origin.display()
            );
        }
    }
    Ok(())
}

/// Whether a floating-point tensor holds a NaN or an infinity, read in its stored dtype
/// (no converted copy of the weights).
fn has_non_finite(t: &Tensor) -> Result<bool> {
    use candle_core::{CpuStorage, Storage};
    fn any<T: Copy>(v: &[T], l: &candle_core::Layout, bad: impl Fn(T) -> bool) -> bool {
        match l.contiguous_offsets() {
            Some((a, b)) => v[a..b].iter().any(|&x| bad(x)),
            None => v.iter().any(|&x| bad(x)),
        }
    }
    let (storage, layout) = t.storage_and_layout();
    Ok(match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => any(v, layout, |x: f32| !x.is_finite()),
        Storage::Cpu(CpuStorage::BF16(v)) => any(v, layout, |x: half::bf16| !x.is_finite()),
        Storage::Cpu(CpuStorage::F16(v)) => any(v, layout, |x: half::f16| !x.is_finite()),
        Storage::Cpu(CpuStorage::F64(v)) => any(v, layout, |x: f64| !x.is_finite()),
        Storage::Cpu(_) => false,
        // another device: one reduction there
        _ if t.dtype().is_float() => {
            let s = t.abs()?.sum_all()?.to_dtype(DType::F32)?;
            !s.to_scalar::<f32>()?.is_finite()
        }
        _ => false,
    })
}

/// What a model folder says about sampling: transformers' `generation_config.json` (else
/// `config.json` for the end-of-sequence ids). `None`: the folder does not say.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationDefaults {
    /// Every end-of-sequence id (`eos_token_id` may be one id or a list).
    pub eos: Vec<u32>,
    /// 0 when the file asks for greedy decoding (`do_sample` false, its default).
    pub temperature: Option<f64>,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
}

impl GenerationDefaults {
    /// Sampler settings: each given value, else this file's, else 0.8 / all / 1.0 / 1.0.
    pub fn sampler(
        &self,
        temperature: Option<f64>,
        top_k: Option<usize>,
        top_p: Option<f64>,
        repetition_penalty: Option<f64>,
    ) -> crate::generate::SamplerConfig {
        crate::generate::SamplerConfig {
            temperature: temperature.or(self.temperature).unwrap_or(0.8),
            top_k: top_k.or(self.top_k).unwrap_or(0),
            top_p: top_p.or(self.top_p).unwrap_or(1.0),
            repetition_penalty: repetition_penalty
                .or(self.repetition_penalty)
                .unwrap_or(1.0),
        }
    }
}

/// The [`GenerationDefaults`] of a model folder, with transformers' defaults for keys a
/// present `generation_config.json` leaves out (greedy, or when sampling: temperature 1,
/// top-k 50, top-p 1).
pub fn generation_defaults(dir: &Path) -> Result<GenerationDefaults> {
    let ids = |v: Option<&serde_json::Value>| -> Vec<u32> {
        match v {
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_u64())
                .filter_map(|x| u32::try_from(x).ok())
                .collect(),
            Some(x) => x
                .as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .into_iter()
                .collect(),
            None => Vec::new(),
        }
    };
    if is_gguf(dir) {
        return Ok(GenerationDefaults {
            eos: gguf::eos_ids(dir)?,
            ..Default::default()
        });
    }
    let path = dir.join("generation_config.json");
    if !path.exists() {
        let eos = if dir.join("config.json").exists() {
            ids(read_config_json(dir)?.1.get("eos_token_id"))
        } else {
            Vec::new()
        };
        return Ok(GenerationDefaults {
            eos,
            ..Default::default()
        });
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::parse(&path, e))?;
    let f = |k: &str| v.get(k).and_then(|x| x.as_f64());
    let sampling = v
        .get("do_sample")
        .and_then(|x| x.as_bool())
        .unwrap_or(false);
    Ok(GenerationDefaults {
        eos: ids(v.get("eos_token_id")),
        temperature: Some(if sampling {
            f("temperature").unwrap_or(1.0)
        } else {
            0.0
        }),
        top_k: Some(if sampling {
            v.get("top_k")
                .and_then(|x| x.as_u64())
                .map_or(50, |k| k as usize)
        } else {
            0
        }),
        top_p: Some(if sampling {
            f("top_p").unwrap_or(1.0)
        } else {
            1.0
        }),
        repetition_penalty: f("repetition_penalty"),
    })
}

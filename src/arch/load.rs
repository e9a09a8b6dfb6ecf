//! Reading a model folder or GGUF file into the one model: its config through the family
//! adapter, its safetensors (one file or an index's shards, each listed tensor checked),
//! the parameters renamed to the canonical table, and the weights the kernels read in
//! place kept in their stored form, memory-mapped.

use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{detect, gguf, Family, Origin, Provenance, RawConfig, TensorMap};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::weights::{self, Params};

/// A loaded model and the family it came from (`None`: routelm's own format).
pub struct Loaded {
    pub family: Option<&'static str>,
    pub model: Model,
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
pub(super) fn canonical_params_traced(
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
pub(super) fn rekey_stored(
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
pub(super) fn check_stored(
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
pub(super) fn read_config_json(dir: &Path) -> Result<(PathBuf, serde_json::Value)> {
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

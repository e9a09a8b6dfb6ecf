//! GGUF files as a second file adapter beside `config.json` + safetensors: the metadata of
//! the architectures llama.cpp writes becomes the `config.json` the family's adapter reads,
//! and llama.cpp's tensor names become the family's, so the families' translations (and
//! their checks) are the only ones. For inference the projections, the token embeddings and
//! the head stay in their stored form, read in place from the mapped file by the
//! quantized kernels ([`crate::nn::qmatmul`]); everything else (norms, routers, experts)
//! and, for training or verification, every tensor is dequantized at load.
//!
//! Layouts llama.cpp's converter changes: `llama` stores the q and k projections with each
//! head's rows interleaved for its pairwise rotary (undone here; Qwen's rotary already
//! takes halves, so its rows are as published); Gemma (1, 2 and 3) stores its norms as
//! `1 + w` (the model then takes them as they are); GPT-NeoX, BLOOM and GPT-2 get one fused
//! q/k/v of consecutive row blocks (read straight into canonical names, [`DIRECT`]);
//! DeepSeek's `kv_b_proj` is split per head into `attn_k_b` (transposed) and `attn_v_b`
//! (joined back here).

use candle_core::{DType, Device, Tensor};
use std::path::Path;
use std::sync::Arc;

use super::{Family, RawConfig};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::nn::qmatmul::{QMatrix, StoredWeights};
use crate::weights::gguf::{GgufFile, Value};
use crate::weights::Params;

mod meta;
mod names;

use meta::hf_config;
use names::{deepseek2_name, direct_name, gemma_name, hf_name, layer_part, mixtral_name};

/// The GGUF architectures routelm reads, and the Hugging Face model type each becomes.
const ARCHITECTURES: &[(&str, &str, &str)] = &[
    ("llama", "llama", "LlamaForCausalLM"),
    ("gemma", "gemma", "GemmaForCausalLM"),
    ("gemma2", "gemma2", "Gemma2ForCausalLM"),
    ("gemma3", "gemma3_text", "Gemma3ForCausalLM"),
    ("phi3", "phi3", "Phi3ForCausalLM"),
    ("olmoe", "olmoe", "OlmoeForCausalLM"),
    ("qwen2", "qwen2", "Qwen2ForCausalLM"),
    ("qwen3", "qwen3", "Qwen3ForCausalLM"),
    ("qwen2moe", "qwen2_moe", "Qwen2MoeForCausalLM"),
    ("qwen3moe", "qwen3_moe", "Qwen3MoeForCausalLM"),
    ("gptneox", "gpt_neox", "GPTNeoXForCausalLM"),
    ("bloom", "bloom", "BloomForCausalLM"),
    ("gpt2", "gpt2", "GPT2LMHeadModel"),
    ("phi2", "phi", "PhiForCausalLM"),
    ("deepseek2", "deepseek_v3", "DeepseekV3ForCausalLM"),
];

/// The architectures whose tensors llama.cpp's converter writes in routelm's own layout
/// up to their names: LayerNorm models with one fused `attn_qkv` holding q, k and v as
/// consecutive row blocks (the converter already undid GPT-NeoX's and BLOOM's per-head
/// interleaving, and GPT-2's `[in, out]` storage). Their tensors map straight to canonical
/// names ([`direct_name`]), so a quantized fused projection is cut into q, k and v views.
const DIRECT: &[&str] = &["gptneox", "bloom", "gpt2", "phi2"];

/// DeepSeek's `kv_b_proj` (`[h · (nope + v), kv_lora_rank]`, each head's key rows then its
/// value rows) from the converter's split: `attn_k_b` `[h, kv_lora_rank, nope]` (each
/// head's key part transposed) and `attn_v_b` `[h, v, kv_lora_rank]`.
fn join_kv_b(k_b: &Tensor, v_b: &Tensor, cfg: &ModelConfig) -> candle_core::Result<Tensor> {
    let h = cfg.n_heads;
    let (lora, nope, v_dim) = match cfg.mla {
        Some(a) => (a.kv_lora_rank, a.qk_nope_dim, a.v_head_dim),
        None => (0, 0, 0),
    };
    let k = k_b.reshape((h, lora, nope))?.transpose(1, 2)?;
    let v = v_b.reshape((h, v_dim, lora))?;
    Tensor::cat(&[k, v], 1)?.reshape((h * (nope + v_dim), lora))
}

/// Undo llama.cpp's q/k row order for pairwise rotary: within each head, rows `2i` and
/// `2i + 1` go back to `i` and `i + head_dim/2` (rotate-half layout).
fn unpermute(t: &Tensor, heads: usize, path: &Path, name: &str) -> Result<Tensor> {
    let order: Vec<u32> = unpermuted_rows(t.dim(0)?, heads)
        .map_err(|e| Error::WeightMismatch {
            path: path.to_path_buf(),
            problems: vec![format!("tensor {name}: {e}")],
        })?
        .into_iter()
        .map(|i| i as u32)
        .collect();
    let order = Tensor::from_vec(order, t.dim(0)?, t.device())?;
    Ok(t.index_select(&order, 0)?)
}

/// The family (`None` for routelm's own architecture) and resolved config of a GGUF
/// file, from its metadata alone.
pub fn config(path: &Path) -> Result<(Option<&'static Family>, ModelConfig)> {
    let f = GgufFile::open(path)?;
    resolve(&f, path)
}

/// The architecture name of files that hold a routelm model of any shape (Mixture-of-
/// Depths routers, options llama.cpp's architectures lack): the config as `routelm.config`
/// JSON, tensors under routelm's canonical names.
pub const ROUTELM_ARCH: &str = "routelm";

fn resolve(f: &GgufFile, path: &Path) -> Result<(Option<&'static Family>, ModelConfig)> {
    if f.get("general.architecture").and_then(Value::as_str) == Some(ROUTELM_ARCH) {
        let text = f
            .get("routelm.config")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::parse(path, "metadata routelm.config is missing"))?;
        let cfg = crate::config::parse_resolved(text)
            .map_err(|e| Error::parse(path, format!("routelm.config: {e}")))?;
        let problems = cfg.problems();
        if !problems.is_empty() {
            return Err(Error::Config {
                origin: path.display().to_string(),
                problems,
            });
        }
        return Ok((None, cfg));
    }
    let (arch, json) = hf_config(f)?;
    let raw = RawConfig::new(json, path.to_path_buf());
    let family = super::detect(&raw)?;
    let mut cfg = raw.finish((family.config)(&raw))?;
    if arch.starts_with("gemma") {
        // the converter stored the norms as 1 + w
        cfg.norm_offset = 0.0;
    }
    Ok((Some(family), cfg))
}

/// The row order that undoes llama.cpp's interleaving of each head's rows (`unpermute`).
fn unpermuted_rows(rows: usize, heads: usize) -> std::result::Result<Vec<usize>, String> {
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return Err(format!(
            "{rows} rows are not {heads} heads of an even width (the metadata's head count does not fit the tensor)"
        ));
    }
    let hd = rows / heads;
    Ok((0..rows)
        .map(|i| {
            let (h, r) = (i / hd, i % hd);
            let (a, b) = (r / (hd / 2), r % (hd / 2));
            h * hd + 2 * b + a
        })
        .collect())
}

/// Load a GGUF file: config from its metadata through the family's adapter, tensors
/// dequantized to `dtype` and renamed to the family's names, then the family's own tensor
/// rules. Returns the family's name, the resolved config and the canonical parameters.
pub fn load(
    path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(Option<&'static str>, ModelConfig, Params)> {
    let (family, cfg, params, _) = load_with(path, dtype, device, false)?;
    Ok((family, cfg, params))
}

/// [`load`] for inference: the weights [`super::takes_stored`] names stay in their stored form
/// (returned beside the parameters, which hold a stand-in of the right shape for each).
pub fn load_stored(
    path: &Path,
    device: &Device,
) -> Result<(Option<&'static str>, ModelConfig, Params, StoredWeights)> {
    load_with(path, DType::F32, device, true)
}

fn load_with(
    path: &Path,
    dtype: DType,
    device: &Device,
    keep: bool,
) -> Result<(Option<&'static str>, ModelConfig, Params, StoredWeights)> {
    let f = GgufFile::open(path)?;
    let (family, cfg) = resolve(&f, path)?;
    let own = family.is_none();
    let arch = f
        .get("general.architecture")
        .and_then(Value::as_str)
        .unwrap_or_default();
    // Gemma 2 and 3 name their sandwich norms apart (Gemma's `ffn_norm` is Llama's)
    let gemma = arch == "gemma2" || arch == "gemma3";
    let mixtral = arch == "llama" && cfg.moe_layers().next().is_some();
    let direct = DIRECT.contains(&arch);
    let deepseek = arch == "deepseek2";
    let mut params = Params::new();
    let mut stored = StoredWeights::new();
    let mut unknown = Vec::new();
    // DeepSeek's split latent key/value expansions, joined after the loop
    let mut latent: std::collections::BTreeMap<(usize, bool), Tensor> = Default::default();
    for t in &f.tensors {
        if direct {
            let mapped = load_direct(&f, t, &cfg, keep, dtype, device, &mut params, &mut stored)
                .map_err(|problem| Error::WeightMismatch {
                    path: path.to_path_buf(),
                    problems: vec![format!("tensor {}: {problem}", t.name)],
                })?;
            if !mapped {
                unknown.push(t.name.clone());
            }
            continue;
        }
        if deepseek {
            if let Some((l, part @ ("attn_k_b.weight" | "attn_v_b.weight"))) = layer_part(&t.name) {
                let x = Tensor::from_vec(f.dequantize(t), t.shape.as_slice(), &Device::Cpu)?;
                latent.insert((l, part == "attn_v_b.weight"), x);
                continue;
            }
        }
        let name = if own {
            Some(t.name.clone())
        } else if gemma {
            gemma_name(&t.name)
        } else if deepseek {
            deepseek2_name(&t.name)
        } else {
            hf_name(&t.name)
        };
        let Some(name) = name else {
            unknown.push(t.name.clone());
            continue;
        };
        // Phi-3's fused projections: `ffn_up` holds [gate; up]
        let name = if arch == "phi3" {
            name.replace(".mlp.up_proj.weight", ".mlp.gate_up_proj.weight")
        } else {
            name
        };
        // DeepSeek's query projection (without a low-rank query) has its rotary rows
        // reordered by the family's rules, which a stored weight cannot follow
        let reordered = deepseek && name.ends_with(".q_proj.weight");
        if keep && t.shape.len() == 2 && super::storable_file_name(&name) && !reordered {
            let (rows, cols) = (t.shape[0], t.shape[1]);
            let bad = |problem: String| Error::WeightMismatch {
                path: path.to_path_buf(),
                problems: vec![format!("tensor {}: {problem}", t.name)],
            };
            let mut q = QMatrix::new(t.ty, rows, cols, f.stored(t)).map_err(bad)?;
            if arch == "llama" {
                if name.ends_with("q_proj.weight") {
                    q = q.permute_rows(&unpermuted_rows(rows, cfg.n_heads).map_err(bad)?);
                } else if name.ends_with("k_proj.weight") {
                    q = q.permute_rows(&unpermuted_rows(rows, cfg.n_kv_heads).map_err(bad)?);
                }
            }
            params.insert(name.clone(), crate::nn::linear::stand_in(rows, cols)?);
            stored.insert(name, Arc::new(q));
            continue;
        }
        if keep && t.shape.len() == 3 && name.contains(".experts.*.") {
            // each expert's rows are a run of the stacked tensor's bytes
            let (experts, rows, cols) = (t.shape[0], t.shape[1], t.shape[2]);
            let size = t.len / experts.max(1);
            let all = f.stored(t);
            for e in 0..experts {
                let q = QMatrix::new(t.ty, rows, cols, all.slice(e * size, size)).map_err(|p| {
                    Error::WeightMismatch {
                        path: path.to_path_buf(),
                        problems: vec![format!("tensor {} expert {e}: {p}", t.name)],
                    }
                })?;
                let part = name.replace('*', &e.to_string());
                let part = if mixtral { mixtral_name(&part) } else { part };
                params.insert(part.clone(), crate::nn::linear::stand_in(rows, cols)?);
                stored.insert(part, Arc::new(q));
            }
            continue;
        }
        let values = f.dequantize(t);
        let mut x = Tensor::from_vec(values, t.shape.as_slice(), &Device::Cpu)?;
        if arch == "llama" {
            if name.ends_with("q_proj.weight") {
                x = unpermute(&x, cfg.n_heads, path, &t.name)?;
            } else if name.ends_with("k_proj.weight") {
                x = unpermute(&x, cfg.n_kv_heads, path, &t.name)?;
            }
        }
        if name.ends_with("shared_expert_gate.weight") {
            x = x.reshape((1, x.elem_count()))?;
        }
        let pieces = if name.contains(".experts.*.") {
            let e = x.dim(0)?;
            (0..e)
                .map(|i| Ok((name.replace('*', &i.to_string()), x.get(i)?)))
                .collect::<candle_core::Result<Vec<_>>>()?
        } else {
            vec![(name, x)]
        };
        for (name, x) in pieces {
            let name = if mixtral { mixtral_name(&name) } else { name };
            params.insert(name, x.to_dtype(dtype)?.to_device(device)?);
        }
    }
    if deepseek {
        join_latent(latent, &cfg, dtype, device, &mut params, path)?;
    }
    if !unknown.is_empty() {
        return Err(Error::WeightMismatch {
            path: path.to_path_buf(),
            problems: unknown
                .into_iter()
                .map(|n| format!("tensor {n}: not a name routelm maps for {arch}"))
                .collect(),
        });
    }
    let canonical = match family {
        Some(family) if !direct => {
            let (canonical, provenance) =
                super::canonical_params_traced(family, &cfg, params, path.to_path_buf())?;
            stored = super::rekey_stored(stored, &provenance, &canonical, path)?;
            canonical
        }
        _ => {
            let problems = crate::weights::names::check_params(&cfg, &params);
            if !problems.is_empty() {
                return Err(Error::WeightMismatch {
                    path: path.to_path_buf(),
                    problems,
                });
            }
            params
        }
    };
    super::check_stored(&stored, &canonical, path)?;
    Ok((family.map(|f| f.name), cfg, canonical, stored))
}

/// One tensor of a [`DIRECT`] architecture under its canonical name(s): a fused q/k/v cut
/// into its three row blocks (views of the stored rows when kept stored). `Ok(false)` for a
/// name routelm does not map; `Err` for a tensor that does not fit the config.
#[allow(clippy::too_many_arguments)]
fn load_direct(
    f: &GgufFile,
    t: &crate::weights::gguf::TensorInfo,
    cfg: &ModelConfig,
    keep: bool,
    dtype: DType,
    device: &Device,
    params: &mut Params,
    stored: &mut StoredWeights,
) -> std::result::Result<bool, String> {
    let Some(names) = direct_name(&t.name) else {
        return Ok(false);
    };
    let rows = t.shape.first().copied().unwrap_or(0);
    let sizes = if names.len() == 3 {
        let (q, kv) = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim);
        if q + 2 * kv != rows {
            return Err(format!(
                "{rows} rows, but {} query and 2 × {} key/value heads of width {} are {}",
                cfg.n_heads,
                cfg.n_kv_heads,
                cfg.head_dim,
                q + 2 * kv
            ));
        }
        vec![q, kv, kv]
    } else {
        vec![rows]
    };
    if keep && t.shape.len() == 2 && super::takes_stored(&names[0]) {
        let cols = t.shape[1];
        let q = QMatrix::new(t.ty, rows, cols, f.stored(t))?;
        let mut at = 0;
        for (name, n) in names.into_iter().zip(sizes) {
            let stand_in = crate::nn::linear::stand_in(n, cols).map_err(|e| e.to_string())?;
            params.insert(name.clone(), stand_in);
            stored.insert(name, Arc::new(q.rows_range(at, at + n)));
            at += n;
        }
        return Ok(true);
    }
    let x = Tensor::from_vec(f.dequantize(t), t.shape.as_slice(), &Device::Cpu)
        .and_then(|x| x.to_dtype(dtype)?.to_device(device))
        .map_err(|e| e.to_string())?;
    let parts = super::split(&x, 0, &sizes).map_err(|e| e.to_string())?;
    for (name, part) in names.into_iter().zip(parts) {
        params.insert(name, part);
    }
    Ok(true)
}

/// DeepSeek's `kv_b_proj` of every layer from its `attn_k_b` and `attn_v_b`; and, for a
/// file without the selection bias (`exp_probs_b`, DeepSeek-V2), a zero bias (the same
/// choice) for each expert layer.
fn join_latent(
    latent: std::collections::BTreeMap<(usize, bool), Tensor>,
    cfg: &ModelConfig,
    dtype: DType,
    device: &Device,
    params: &mut Params,
    path: &Path,
) -> Result<()> {
    for ((l, is_v), k_b) in &latent {
        if *is_v {
            continue;
        }
        let name = format!("model.layers.{l}.self_attn.kv_b_proj.weight");
        let v_b = latent
            .get(&(*l, true))
            .ok_or_else(|| Error::WeightMismatch {
                path: path.to_path_buf(),
                problems: vec![format!(
                    "blk.{l}.attn_k_b.weight has no blk.{l}.attn_v_b.weight"
                )],
            })?;
        let joined = join_kv_b(k_b, v_b, cfg).map_err(|e| Error::WeightMismatch {
            path: path.to_path_buf(),
            problems: vec![format!(
                "blk.{l}.attn_k_b / attn_v_b: {e} (the metadata's latent widths do not fit)"
            )],
        })?;
        params.insert(name, joined.to_dtype(dtype)?.to_device(device)?);
    }
    for (l, moe) in cfg.moe_layers() {
        let name = format!("model.layers.{l}.mlp.gate.e_score_correction_bias");
        if let std::collections::btree_map::Entry::Vacant(e) = params.entry(name) {
            e.insert(Tensor::zeros(moe.n_experts, dtype, device)?);
        }
    }
    Ok(())
}

/// Texts of the control tokens that end a turn in the vocabularies llama.cpp reads (it
/// stops generation at them too, whatever `eos_token_id` says).
const END_OF_TURN: &[&str] = &[
    "<end_of_turn>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|endoftext|>",
];

/// The ids that end generation: `eos_token_id`, `eot_token_id` and `eom_token_id` when
/// given, and the control tokens that end a turn (Gemma's files name only `<eos>`, while
/// its chat ends each turn with `<end_of_turn>`).
pub fn eos_ids(path: &Path) -> Result<Vec<u32>> {
    let f = GgufFile::open(path)?;
    let mut ids: Vec<u32> = ["eos_token_id", "eot_token_id", "eom_token_id"]
        .iter()
        .filter_map(|k| f.get(&format!("tokenizer.ggml.{k}")))
        .filter_map(Value::as_u64)
        .filter_map(|e| u32::try_from(e).ok())
        .collect();
    if let (Some(Value::Array(tokens)), Some(Value::Array(types))) = (
        f.get("tokenizer.ggml.tokens"),
        f.get("tokenizer.ggml.token_type"),
    ) {
        for (id, (t, ty)) in tokens.iter().zip(types).enumerate() {
            let control = ty.as_u64() == Some(3);
            if control && t.as_str().is_some_and(|t| END_OF_TURN.contains(&t)) {
                ids.extend(u32::try_from(id).ok());
            }
        }
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

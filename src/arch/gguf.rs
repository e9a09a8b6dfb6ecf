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
use crate::weights::gguf::{GgufFile, TensorInfo, Value};
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

/// The row order that undoes llama.cpp's interleaving of each head's rows for pairwise
/// rotary: within each head, rows `2i` and `2i + 1` go back to `i` and `i + head_dim/2`
/// (rotate-half layout).
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

/// [`load`] and [`load_stored`]: `keep` holds the weights the kernels read in place in
/// their stored form.
fn load_with(
    path: &Path,
    dtype: DType,
    device: &Device,
    keep: bool,
) -> Result<(Option<&'static str>, ModelConfig, Params, StoredWeights)> {
    let f = GgufFile::open(path)?;
    let (family, cfg) = resolve(&f, path)?;
    let arch = f
        .get("general.architecture")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let direct = DIRECT.contains(&arch);
    let deepseek = arch == "deepseek2";
    let mut r = Reader {
        f: &f,
        path,
        cfg: &cfg,
        arch,
        keep,
        dtype,
        device,
        params: Params::new(),
        stored: StoredWeights::new(),
    };
    let mut unknown = Vec::new();
    // DeepSeek's split latent key/value expansions, joined after the loop
    let mut latent: std::collections::BTreeMap<(usize, bool), Tensor> = Default::default();
    for t in &f.tensors {
        if direct {
            if !r.direct(t).map_err(|problem| r.bad(&t.name, problem))? {
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
        let Some(name) = r.name_of(&t.name, family.is_none()) else {
            unknown.push(t.name.clone());
            continue;
        };
        // DeepSeek's query projection (without a low-rank query) has its rotary rows
        // reordered by the family's rules, which a stored weight cannot follow
        let reordered = deepseek && name.ends_with(".q_proj.weight");
        if keep && t.shape.len() == 2 && super::storable_file_name(&name) && !reordered {
            r.keep_matrix(t, name)?;
        } else if keep && t.shape.len() == 3 && name.contains(".experts.*.") {
            r.keep_experts(t, &name)?;
        } else {
            r.dequantized(t, name)?;
        }
    }
    let Reader {
        mut params, stored, ..
    } = r;
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
    let (canonical, stored) = canonical(family.filter(|_| !direct), &cfg, params, stored, path)?;
    Ok((family.map(|f| f.name), cfg, canonical, stored))
}

/// The parameters under canonical names: by the family's rules, the stored weights rekeyed
/// after them; or, for a file whose names already are canonical (routelm's own, and the
/// [`DIRECT`] architectures, `family` `None`), as read, checked against the config. The
/// stored weights are then checked against the parameters.
fn canonical(
    family: Option<&'static Family>,
    cfg: &ModelConfig,
    params: Params,
    stored: StoredWeights,
    path: &Path,
) -> Result<(Params, StoredWeights)> {
    let (canonical, stored) = match family {
        Some(family) => {
            let (canonical, provenance) =
                super::canonical_params_traced(family, cfg, params, path.to_path_buf())?;
            let stored = super::rekey_stored(stored, &provenance, &canonical, path)?;
            (canonical, stored)
        }
        None => {
            let problems = crate::weights::names::check_params(cfg, &params);
            if !problems.is_empty() {
                return Err(Error::WeightMismatch {
                    path: path.to_path_buf(),
                    problems,
                });
            }
            (params, stored)
        }
    };
    super::check_stored(&stored, &canonical, path)?;
    Ok((canonical, stored))
}

/// A GGUF file's tensors on their way to parameters: the file, what its names and layouts
/// ask for, and what has been read so far.
struct Reader<'a> {
    f: &'a GgufFile,
    path: &'a Path,
    cfg: &'a ModelConfig,
    /// `general.architecture`.
    arch: &'a str,
    /// Keep the weights the kernels read in place in their stored form.
    keep: bool,
    dtype: DType,
    device: &'a Device,
    params: Params,
    stored: StoredWeights,
}

impl Reader<'_> {
    /// The error for tensor `what` of the file.
    fn bad(&self, what: &str, problem: impl std::fmt::Display) -> Error {
        Error::WeightMismatch {
            path: self.path.to_path_buf(),
            problems: vec![format!("tensor {what}: {problem}")],
        }
    }

    /// Whether the file is a Mixtral (llama with experts), whose expert names differ.
    fn mixtral(&self) -> bool {
        self.arch == "llama" && self.cfg.moe_layers().next().is_some()
    }

    /// The heads whose rows llama.cpp's converter interleaved for its pairwise rotary in
    /// the tensor named `name` (a llama file's q projection: every head; its k projection:
    /// the key-value heads); `None` for any other tensor.
    fn interleaved_heads(&self, name: &str) -> Option<usize> {
        match self.arch {
            "llama" if name.ends_with("q_proj.weight") => Some(self.cfg.n_heads),
            "llama" if name.ends_with("k_proj.weight") => Some(self.cfg.n_kv_heads),
            _ => None,
        }
    }

    /// `x` (tensor `t` of the file) with its `heads` heads' rows put back in the family's
    /// order ([`unpermuted_rows`]).
    fn unpermuted(&self, x: &Tensor, heads: usize, t: &TensorInfo) -> Result<Tensor> {
        let order: Vec<u32> = unpermuted_rows(x.dim(0)?, heads)
            .map_err(|e| self.bad(&t.name, e))?
            .into_iter()
            .map(|i| i as u32)
            .collect();
        let order = Tensor::from_vec(order, x.dim(0)?, x.device())?;
        Ok(x.index_select(&order, 0)?)
    }

    /// The family's (Hugging Face) name of llama.cpp's tensor `gguf`, or the name itself in
    /// routelm's `own` files; `None` for a name routelm does not map.
    fn name_of(&self, gguf: &str, own: bool) -> Option<String> {
        let name = match self.arch {
            _ if own => Some(gguf.to_string()),
            // Gemma 2 and 3 name their sandwich norms apart (Gemma's `ffn_norm` is Llama's)
            "gemma2" | "gemma3" => gemma_name(gguf),
            "deepseek2" => deepseek2_name(gguf),
            _ => hf_name(gguf),
        }?;
        // Phi-3's fused projections: `ffn_up` holds [gate; up]
        Some(match self.arch {
            "phi3" => name.replace(".mlp.up_proj.weight", ".mlp.gate_up_proj.weight"),
            _ => name,
        })
    }

    /// A matrix kept in its stored form under `name` (llama's q and k rows put back in
    /// the family's order), a stand-in of its shape among the parameters.
    fn keep_matrix(&mut self, t: &TensorInfo, name: String) -> Result<()> {
        let (rows, cols) = (t.shape[0], t.shape[1]);
        let bad = |problem: String| self.bad(&t.name, problem);
        let mut q = QMatrix::new(t.ty, rows, cols, self.f.stored(t)).map_err(bad)?;
        if let Some(heads) = self.interleaved_heads(&name) {
            q = q.permute_rows(&unpermuted_rows(rows, heads).map_err(bad)?);
        }
        self.params
            .insert(name.clone(), crate::nn::linear::stand_in(rows, cols)?);
        self.stored.insert(name, Arc::new(q));
        Ok(())
    }

    /// A stack of experts kept in its stored form, one matrix per expert (each expert's
    /// rows are a run of the stack's bytes), under `name` with `*` the expert.
    fn keep_experts(&mut self, t: &TensorInfo, name: &str) -> Result<()> {
        let (experts, rows, cols) = (t.shape[0], t.shape[1], t.shape[2]);
        let size = t.len / experts.max(1);
        let all = self.f.stored(t);
        let mixtral = self.mixtral();
        for e in 0..experts {
            let q = QMatrix::new(t.ty, rows, cols, all.slice(e * size, size))
                .map_err(|p| self.bad(&format!("{} expert {e}", t.name), p))?;
            let part = name.replace('*', &e.to_string());
            let part = if mixtral { mixtral_name(&part) } else { part };
            self.params
                .insert(part.clone(), crate::nn::linear::stand_in(rows, cols)?);
            self.stored.insert(part, Arc::new(q));
        }
        Ok(())
    }

    /// A tensor dequantized to the load's dtype under `name` (llama's q and k rows put back
    /// in the family's order; a stack of experts split into one tensor per expert).
    fn dequantized(&mut self, t: &TensorInfo, name: String) -> Result<()> {
        let mut x = Tensor::from_vec(self.f.dequantize(t), t.shape.as_slice(), &Device::Cpu)?;
        if let Some(heads) = self.interleaved_heads(&name) {
            x = self.unpermuted(&x, heads, t)?;
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
        let mixtral = self.mixtral();
        for (name, x) in pieces {
            let name = if mixtral { mixtral_name(&name) } else { name };
            let x = x.to_dtype(self.dtype)?.to_device(self.device)?;
            self.params.insert(name, x);
        }
        Ok(())
    }

    /// One tensor of a [`DIRECT`] architecture under its canonical name(s): a fused q/k/v
    /// cut into its three row blocks (views of the stored rows when kept stored).
    /// `Ok(false)` for a name routelm does not map; `Err` for a tensor that does not fit
    /// the config.
    fn direct(&mut self, t: &TensorInfo) -> std::result::Result<bool, String> {
        let Some(names) = direct_name(&t.name) else {
            return Ok(false);
        };
        let cfg = self.cfg;
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
        if self.keep && t.shape.len() == 2 && super::takes_stored(&names[0]) {
            let cols = t.shape[1];
            let q = QMatrix::new(t.ty, rows, cols, self.f.stored(t))?;
            let mut at = 0;
            for (name, n) in names.into_iter().zip(sizes) {
                let stand_in = crate::nn::linear::stand_in(n, cols).map_err(|e| e.to_string())?;
                self.params.insert(name.clone(), stand_in);
                self.stored.insert(name, Arc::new(q.rows_range(at, at + n)));
                at += n;
            }
            return Ok(true);
        }
        let x = Tensor::from_vec(self.f.dequantize(t), t.shape.as_slice(), &Device::Cpu)
            .and_then(|x| x.to_dtype(self.dtype)?.to_device(self.device))
            .map_err(|e| e.to_string())?;
        let parts = super::split(&x, 0, &sizes).map_err(|e| e.to_string())?;
        for (name, part) in names.into_iter().zip(parts) {
            self.params.insert(name, part);
        }
        Ok(true)
    }
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

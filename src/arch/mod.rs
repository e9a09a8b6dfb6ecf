//! Published model families. A family is an adapter: it turns a Hugging Face `config.json`
//! into our [`ModelConfig`] and maps its tensor names (and layouts) onto the canonical
//! parameter table. This is the only module that knows Hugging Face keys or tensor names.
//!
//! Adding a family: one file with `config` and `tensors` functions, one line in
//! [`FAMILIES`]. A mechanism the family needs belongs in `nn/` or `model/` as an option.

mod bloom;
mod deepseek;
mod export;
mod gemma;
mod generation;
mod gguf;
pub mod gguf_export;
mod gpt2;
mod gpt_neox;
mod llama;
mod load;
mod moe;
mod phi;
mod phi3;
mod qwen;
mod raw;
mod t5;

pub use export::export_dir;
pub use generation::{generation_defaults, GenerationDefaults};
use load::{canonical_params_traced, check_stored, read_config_json, rekey_stored};
pub use load::{
    is_gguf, load_config, load_dir, load_dir_as, load_dir_with, load_params, published_modules,
    read_weights, stored_names, Loaded,
};
pub(crate) use load::{storable_file_name, takes_stored};
pub use raw::RawConfig;

use candle_core::Tensor;
use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::weights::Params;

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

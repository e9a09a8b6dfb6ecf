//! `routelm quantize`: a model folder (a Hugging Face checkpoint routelm loads, or
//! routelm's own) written as one GGUF file with its matrices in a ggml type.
//!
//! Where the model is one llama.cpp's `llama` architecture describes (Llama, Mistral,
//! SmolLM, Mixtral and routelm's own dense or MoE models of that shape), the file uses
//! llama.cpp's names and layouts (q/k rows interleaved per head for its pairwise rotary,
//! experts stacked per layer), so llama.cpp runs it too. Whether it does is checked, not
//! assumed: the config read back from the written metadata must equal the model's, or the
//! file is rewritten under the `routelm` architecture, which holds any routelm model
//! (Mixture-of-Depths routers included) and which only routelm reads.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::gguf::ROUTELM_ARCH;
use crate::config::{ModelConfig, Position, RopeScaling};
use crate::error::{Error, Result};
use crate::weights::gguf::{TensorOut, Value};
use crate::weights::quant::GgmlType;
use crate::weights::quantize::quantize;
use crate::weights::Params;

/// Which ggml type each matrix gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Every matrix in one type.
    All(GgmlType),
    /// llama.cpp's Q4_K_M recipe: Q4_K, with Q6_K for the head and for the value and
    /// feed-forward output projections of the first and last eighth of the layers and of
    /// every third layer between.
    Q4KM,
}

impl std::str::FromStr for Scheme {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => Scheme::All(GgmlType::F32),
            "f16" => Scheme::All(GgmlType::F16),
            "bf16" => Scheme::All(GgmlType::BF16),
            "q8_0" => Scheme::All(GgmlType::Q8_0),
            "q4_0" => Scheme::All(GgmlType::Q4_0),
            "q4_1" => Scheme::All(GgmlType::Q4_1),
            "q5_0" => Scheme::All(GgmlType::Q5_0),
            "q5_1" => Scheme::All(GgmlType::Q5_1),
            "q4_k" | "q4_k_s" => Scheme::All(GgmlType::Q4K),
            "q6_k" => Scheme::All(GgmlType::Q6K),
            "q4_k_m" => Scheme::Q4KM,
            other => {
                return Err(format!(
                    "unknown type '{other}' (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q6_k, q4_k_m)"
                ))
            }
        })
    }
}

impl Scheme {
    /// llama.cpp's `general.file_type` for the scheme.
    fn file_type(self) -> u32 {
        match self {
            Scheme::All(GgmlType::F32) => 0,
            Scheme::All(GgmlType::F16) => 1,
            Scheme::All(GgmlType::Q4_0) => 2,
            Scheme::All(GgmlType::Q4_1) => 3,
            Scheme::All(GgmlType::Q8_0) => 7,
            Scheme::All(GgmlType::Q5_0) => 8,
            Scheme::All(GgmlType::Q5_1) => 9,
            Scheme::All(GgmlType::Q4K) => 14,
            Scheme::Q4KM => 15,
            Scheme::All(GgmlType::Q6K) => 18,
            Scheme::All(_) => 32,
        }
    }
}

/// What was written.
#[derive(Debug, Clone)]
pub struct Written {
    /// `llama` or `routelm`.
    pub arch: String,
    /// Why the file is not in llama.cpp's layout, when it is not.
    pub not_llama: Option<String>,
    /// Tensors per ggml type name.
    pub types: BTreeMap<&'static str, usize>,
    pub bytes: u64,
}

/// How one tensor of the file is made from the canonical parameters.
enum Source {
    /// A parameter as it is, or with its rows interleaved per head (`Some(heads)`).
    One(String, Option<usize>),
    /// Parameters stacked along a new first dimension (a layer's experts).
    Stack(Vec<String>),
}

struct Planned {
    out: TensorOut,
    source: Source,
}

/// Write `src` (any folder or GGUF file routelm loads) as a GGUF file at `out`, its
/// matrices in `scheme`'s types; `progress(done, total)` after each tensor.
pub fn quantize_model(
    src: &Path,
    out: &Path,
    scheme: Scheme,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Written> {
    let (family, cfg, params) = super::load_params(src, DType::F32, &Device::Cpu)?;
    let tokenizer = tokenizer_metadata(src, cfg.vocab_size)?;
    // llama.cpp's architecture for the family (Llama-shaped models otherwise)
    let arch = match family {
        Some("qwen2") => "qwen2",
        Some("qwen3") => "qwen3",
        Some("qwen2_moe") => "qwen2moe",
        Some("qwen3_moe") => "qwen3moe",
        _ => "llama",
    };
    let name = src
        .file_stem()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let llama: std::result::Result<(), String> = match llama_plan(arch, &cfg, &params) {
        Ok(plan) => {
            let meta = llama_metadata(arch, &cfg, &name, scheme, &tokenizer);
            let written = write(out, &meta, plan, &params, scheme, arch, progress)?;
            // the file describes the model only if its config reads back as the model's
            match super::gguf::config(out) {
                Ok((_, back)) if same_model(&back, &cfg) => return Ok(written),
                Ok((_, back)) => Err(differences(&cfg, &back)),
                Err(e) => Err(e.to_string()),
            }
        }
        Err(why) => Err(why),
    };
    let why = llama.err();
    let plan = routelm_plan(&params);
    let json = serde_json::to_string(&cfg).map_err(|e| Error::parse(src, e))?;
    let mut meta = vec![
        key("general.architecture", Value::String(ROUTELM_ARCH.into())),
        key("general.name", Value::String(name)),
        key("general.file_type", Value::U32(scheme.file_type())),
        key("general.quantization_version", Value::U32(2)),
        key("routelm.config", Value::String(json)),
    ];
    meta.extend(tokenizer);
    let mut written = write(out, &meta, plan, &params, scheme, ROUTELM_ARCH, progress)?;
    written.not_llama = why;
    Ok(written)
}

fn key(k: &str, v: Value) -> (String, Value) {
    (k.to_string(), v)
}

/// The tokenizer of `src` as GGUF metadata: a GGUF file's `tokenizer.*` keys as they are
/// (chat template included), a folder's `tokenizer.json` converted. Without either,
/// `tokenizer.ggml.model = none`: llama.cpp then loads the file as a model without a
/// vocabulary (token ids in, logits out) instead of refusing it, and routelm reads it with
/// the byte tokenizer a folder without tokenizer.json gets.
fn tokenizer_metadata(src: &Path, vocab_rows: usize) -> Result<Vec<(String, Value)>> {
    let none = || {
        vec![(
            "tokenizer.ggml.model".to_string(),
            Value::String("none".into()),
        )]
    };
    if super::is_gguf(src) {
        let f = crate::weights::gguf::GgufFile::open(src)?;
        let keys: Vec<(String, Value)> = f
            .metadata
            .iter()
            .filter(|(k, _)| k.starts_with("tokenizer."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        return Ok(if keys.is_empty() { none() } else { keys });
    }
    let path = src.join("tokenizer.json");
    if !src.is_dir() || !path.exists() {
        return Ok(none());
    }
    let config: serde_json::Value = std::fs::read_to_string(src.join("config.json"))
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default();
    let ids = |k: &str| -> Option<u32> {
        let id = &config[k];
        id.as_u64()
            .or_else(|| id.as_array()?.first()?.as_u64())
            .and_then(|i| u32::try_from(i).ok())
    };
    crate::tokenize::gguf_metadata(&path, vocab_rows, ids("bos_token_id"), ids("eos_token_id"))
}

/// `b` with what GGUF metadata does not carry taken from `a`: the initialisation scale
/// and the training-only loss and balancing settings, and `a`'s value where `b` holds it
/// rounded to f32 (GGUF stores these as f32).
fn normalized(a: &ModelConfig, b: &ModelConfig) -> ModelConfig {
    let mut b = b.clone();
    b.init_std = a.init_std;
    let f32_equal = |x: f64, y: f64| x as f32 == y as f32;
    if f32_equal(a.norm_eps, b.norm_eps) {
        b.norm_eps = a.norm_eps;
    }
    if let (Position::Rope { theta: ta, .. }, Position::Rope { theta: tb, .. }) =
        (&a.position, &mut b.position)
    {
        if f32_equal(*ta, *tb) {
            *tb = *ta;
        }
    }
    for (la, lb) in a.layers.iter().zip(b.layers.iter_mut()) {
        if let (Some(ma), Some(mb)) = (&la.moe, &mut lb.moe) {
            mb.aux_loss_coef = ma.aux_loss_coef;
            mb.z_loss_coef = ma.z_loss_coef;
            mb.bias_update_rate = ma.bias_update_rate;
        }
    }
    b
}

/// Whether two configs describe the same computation.
fn same_model(a: &ModelConfig, b: &ModelConfig) -> bool {
    &normalized(a, b) == a
}

/// The config fields that differ, for the message.
fn differences(want: &ModelConfig, got: &ModelConfig) -> String {
    let (Ok(serde_json::Value::Object(w)), Ok(serde_json::Value::Object(g))) = (
        serde_json::to_value(want),
        serde_json::to_value(normalized(want, got)),
    ) else {
        return "the config does not read back".into();
    };
    let short = |v: &serde_json::Value| {
        let s = v.to_string();
        match s.char_indices().nth(60) {
            Some((i, _)) => format!("{}…", &s[..i]),
            None => s,
        }
    };
    let fields: Vec<String> = w
        .iter()
        .filter(|(k, v)| *k != "init_std" && g.get(*k) != Some(v))
        .map(|(k, v)| {
            let back = g.get(k).map_or("nothing".into(), short);
            format!("{k} ({} read back as {back})", short(v))
        })
        .collect();
    format!(
        "llama.cpp's llama architecture does not express this model's {}",
        fields.join(", ")
    )
}

/// llama.cpp's metadata for a Llama-shaped config, under `arch` (llama, or Qwen's).
fn llama_metadata(
    arch: &str,
    cfg: &ModelConfig,
    name: &str,
    scheme: Scheme,
    tokenizer: &[(String, Value)],
) -> Vec<(String, Value)> {
    let u = |v: usize| Value::U32(v as u32);
    let key = |k: &str, v: Value| (k.replacen("llama.", &format!("{arch}."), 1), v);
    let mut m = vec![
        key("general.architecture", Value::String(arch.into())),
        key("general.name", Value::String(name.into())),
        key("general.file_type", Value::U32(scheme.file_type())),
        key("general.quantization_version", Value::U32(2)),
        key("llama.vocab_size", u(cfg.vocab_size)),
        key("llama.context_length", u(cfg.max_seq_len)),
        key("llama.embedding_length", u(cfg.d_model)),
        key("llama.block_count", u(cfg.n_layers)),
        key("llama.feed_forward_length", u(cfg.d_ff)),
        key("llama.attention.head_count", u(cfg.n_heads)),
        key("llama.attention.head_count_kv", u(cfg.n_kv_heads)),
        key(
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(cfg.norm_eps as f32),
        ),
    ];
    if cfg.head_dim * cfg.n_heads != cfg.d_model {
        m.push(key("llama.attention.key_length", u(cfg.head_dim)));
        m.push(key("llama.attention.value_length", u(cfg.head_dim)));
    }
    if let Position::Rope {
        theta,
        rotary_dim,
        scaling,
    } = &cfg.position
    {
        m.push(key("llama.rope.freq_base", Value::F32(*theta as f32)));
        m.push(key("llama.rope.dimension_count", u(*rotary_dim)));
        if let RopeScaling::Linear { factor } = scaling {
            m.push(key(
                "llama.rope.scaling.type",
                Value::String("linear".into()),
            ));
            m.push(key("llama.rope.scaling.factor", Value::F32(*factor as f32)));
        }
    }
    if let Some((_, moe)) = cfg.moe_layers().next() {
        m.push(key("llama.expert_count", u(moe.n_experts)));
        m.push(key("llama.expert_used_count", u(moe.top_k)));
        if arch != "llama" {
            m.push(key("llama.expert_feed_forward_length", u(moe.d_expert)));
            if moe.d_shared > 0 {
                m.push(key(
                    "llama.expert_shared_feed_forward_length",
                    u(moe.d_shared),
                ));
            }
        }
    }
    m.extend(tokenizer.iter().cloned());
    m
}

/// The file tensors of llama.cpp's layout for `arch` (llama, qwen2, qwen3, qwen2moe,
/// qwen3moe), or why the model's tensors do not fit it.
fn llama_plan(
    arch: &str,
    cfg: &ModelConfig,
    params: &Params,
) -> std::result::Result<Vec<Planned>, String> {
    // llama's rotary takes interleaved pairs: its q/k rows are reordered; Qwen's takes
    // halves, as routelm does
    let pairs = arch == "llama";
    let mut p = Planner {
        params,
        plan: Vec::new(),
        used: std::collections::HashSet::new(),
    };
    p.one("token_embd.weight", "model.embed_tokens.weight", None);
    for l in 0..cfg.n_layers {
        let (at, b) = (format!("model.layers.{l}"), format!("blk.{l}"));
        for (g, c, heads) in layer_tensors(cfg, pairs) {
            p.one(&format!("{b}.{g}"), &format!("{at}.{c}"), heads);
        }
        if !pairs {
            // the shared expert's gate as a vector, as llama.cpp keeps it
            p.vector(
                &format!("{b}.ffn_gate_inp_shexp.weight"),
                &format!("{at}.mlp.shared_expert_gate.weight"),
            );
        }
        if let Some(moe) = cfg.layers.get(l).and_then(|s| s.moe) {
            for (g, c) in [
                ("gate", "gate_proj"),
                ("up", "up_proj"),
                ("down", "down_proj"),
            ] {
                let names: Vec<String> = (0..moe.n_experts)
                    .map(|e| format!("{at}.mlp.experts.{e}.{c}.weight"))
                    .collect();
                p.stack(format!("{b}.ffn_{g}_exps.weight"), names)?;
            }
        }
    }
    p.one("output_norm.weight", "model.norm.weight", None);
    if !cfg.tie_embeddings {
        p.one("output.weight", "lm_head.weight", None);
    }
    match params.keys().find(|k| !p.used.contains(*k)) {
        Some(k) => Err(format!(
            "llama.cpp's llama architecture has no tensor for {k}"
        )),
        None => Ok(p.plan),
    }
}

/// A layer's tensors in llama.cpp's layout, `(file name, canonical name, heads whose q/k
/// rows are interleaved)`, after `blk.{l}.` and `model.layers.{l}.`: those of llama, and
/// for Qwen's (`!pairs`) also the biases, q/k norms and shared expert.
fn layer_tensors(
    cfg: &ModelConfig,
    pairs: bool,
) -> Vec<(&'static str, &'static str, Option<usize>)> {
    let (q_heads, k_heads) = match pairs {
        true => (Some(cfg.n_heads), Some(cfg.n_kv_heads)),
        false => (None, None),
    };
    let mut parts = vec![
        ("attn_norm.weight", "input_layernorm.weight", None),
        ("attn_q.weight", "self_attn.q_proj.weight", q_heads),
        ("attn_k.weight", "self_attn.k_proj.weight", k_heads),
        ("attn_v.weight", "self_attn.v_proj.weight", None),
        ("attn_output.weight", "self_attn.o_proj.weight", None),
        ("ffn_norm.weight", "post_attention_layernorm.weight", None),
        ("ffn_gate.weight", "mlp.gate_proj.weight", None),
        ("ffn_up.weight", "mlp.up_proj.weight", None),
        ("ffn_down.weight", "mlp.down_proj.weight", None),
        ("ffn_gate_inp.weight", "mlp.gate.weight", None),
    ];
    if !pairs {
        parts.extend([
            ("attn_q.bias", "self_attn.q_proj.bias", None),
            ("attn_k.bias", "self_attn.k_proj.bias", None),
            ("attn_v.bias", "self_attn.v_proj.bias", None),
            ("attn_q_norm.weight", "self_attn.q_norm.weight", None),
            ("attn_k_norm.weight", "self_attn.k_norm.weight", None),
            (
                "ffn_gate_shexp.weight",
                "mlp.shared_expert.gate_proj.weight",
                None,
            ),
            (
                "ffn_up_shexp.weight",
                "mlp.shared_expert.up_proj.weight",
                None,
            ),
            (
                "ffn_down_shexp.weight",
                "mlp.shared_expert.down_proj.weight",
                None,
            ),
        ]);
    }
    parts
}

/// The file tensors planned so far and the parameters they use.
struct Planner<'a> {
    params: &'a Params,
    plan: Vec<Planned>,
    used: std::collections::HashSet<String>,
}

impl Planner<'_> {
    /// Parameter `canonical` as file tensor `gguf` (its q/k rows interleaved per head when
    /// `heads`), when the model has it.
    fn one(&mut self, gguf: &str, canonical: &str, heads: Option<usize>) {
        if let Some(t) = self.params.get(canonical) {
            let source = Source::One(canonical.to_string(), heads);
            self.add(gguf.to_string(), t.dims().to_vec(), source);
        }
    }

    /// Parameter `canonical` flattened to a vector, when the model has it.
    fn vector(&mut self, gguf: &str, canonical: &str) {
        if let Some(t) = self.params.get(canonical) {
            let source = Source::One(canonical.to_string(), None);
            self.add(gguf.to_string(), vec![t.elem_count()], source);
        }
    }

    /// File tensor `name` of `shape` from `source`, whose parameters are then used.
    fn add(&mut self, name: String, shape: Vec<usize>, source: Source) {
        match &source {
            Source::One(canonical, _) => {
                self.used.insert(canonical.clone());
            }
            Source::Stack(names) => self.used.extend(names.iter().cloned()),
        }
        self.plan.push(Planned {
            out: TensorOut {
                name,
                shape,
                ty: GgmlType::F32,
            },
            source,
        });
    }

    /// Parameters `names` (a layer's experts) stacked along a new first dimension.
    fn stack(&mut self, gguf: String, names: Vec<String>) -> std::result::Result<(), String> {
        let Some(first) = names.first().and_then(|n| self.params.get(n)) else {
            return Err(format!("no tensor {}", names.first().map_or("", |n| n)));
        };
        let shape: Vec<usize> = [names.len()].iter().chain(first.dims()).copied().collect();
        self.add(gguf, shape, Source::Stack(names));
        Ok(())
    }
}

/// The `routelm` layout: every parameter under its canonical name.
fn routelm_plan(params: &Params) -> Vec<Planned> {
    params
        .iter()
        .map(|(n, t)| Planned {
            out: TensorOut {
                name: n.clone(),
                shape: t.dims().to_vec(),
                ty: GgmlType::F32,
            },
            source: Source::One(n.clone(), None),
        })
        .collect()
}

/// Whether a file tensor is a matrix the scheme quantizes: projections, embeddings, head
/// and experts; never norms, biases or routers (llama.cpp keeps its routers in f32 too).
fn quantized(name: &str, shape: &[usize]) -> bool {
    let router = name.contains("ffn_gate_inp")
        || name.ends_with(".mlp.gate.weight")
        || name.contains("depth_")
        || name.contains("shared_expert_gate");
    shape.len() >= 2 && name.ends_with(".weight") && !router && !name.contains("norm")
}

/// The layer index of a file tensor name (`blk.L.` or `model.layers.L.`).
fn layer_of(name: &str) -> Option<usize> {
    let rest = name
        .strip_prefix("blk.")
        .or_else(|| name.strip_prefix("model.layers."))?;
    rest.split('.').next()?.parse().ok()
}

/// The ggml type of one file tensor under `scheme`. A K-quant needs rows of whole
/// 256-value super-blocks; otherwise llama.cpp's fallback (Q4_K → Q5_0, Q6_K → Q8_0),
/// then Q8_0 (rows of 32), then f16.
fn type_for(scheme: Scheme, name: &str, shape: &[usize], n_layers: usize) -> GgmlType {
    if !quantized(name, shape) {
        return GgmlType::F32;
    }
    let want = match scheme {
        Scheme::All(t) => t,
        Scheme::Q4KM => {
            let head = name == "output.weight" || name == "lm_head.weight";
            let more_bits = |l: usize| {
                let e = n_layers / 8;
                l < e || l >= 7 * n_layers / 8 || (l - e) % 3 == 2
            };
            let v_or_down = name.contains("attn_v.")
                || name.contains("v_proj.")
                || name.contains("ffn_down")
                || name.contains("down_proj.");
            if head || (v_or_down && layer_of(name).is_some_and(more_bits)) {
                GgmlType::Q6K
            } else {
                GgmlType::Q4K
            }
        }
    };
    let cols = shape[shape.len() - 1];
    let fits = |t: GgmlType| cols.is_multiple_of(t.block().0);
    // llama.cpp's fallbacks for rows that are not whole super-blocks
    let fallback = match want {
        GgmlType::Q4K => GgmlType::Q5_0,
        GgmlType::Q5K => GgmlType::Q5_1,
        _ => GgmlType::Q8_0,
    };
    [want, fallback, GgmlType::Q8_0, GgmlType::F16]
        .into_iter()
        .find(|&t| fits(t))
        .unwrap_or(GgmlType::F32)
}

/// Rows of each head reordered from halves (rotate-half) to llama.cpp's interleaved pairs:
/// file row `2i` is row `i` of the head, `2i + 1` is row `i + head_dim/2`.
fn interleave_heads(t: &Tensor, heads: usize) -> Result<Tensor> {
    let rows = t.dim(0)?;
    let hd = rows / heads.max(1);
    let order: Vec<u32> = (0..rows)
        .map(|r| {
            let (h, i) = (r / hd, r % hd);
            (h * hd + if i % 2 == 0 { i / 2 } else { hd / 2 + i / 2 }) as u32
        })
        .collect();
    let idx = Tensor::from_vec(order, rows, t.device())?;
    Ok(t.index_select(&idx, 0)?)
}

fn write(
    out: &Path,
    meta: &[(String, Value)],
    mut plan: Vec<Planned>,
    params: &Params,
    scheme: Scheme,
    arch: &str,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Written> {
    let n_layers = plan
        .iter()
        .filter_map(|p| layer_of(&p.out.name))
        .max()
        .map_or(0, |l| l + 1);
    let mut types = BTreeMap::new();
    for p in &mut plan {
        p.out.ty = type_for(scheme, &p.out.name, &p.out.shape, n_layers);
        *types.entry(p.out.ty.name()).or_insert(0) += 1;
    }
    let tensors: Vec<TensorOut> = plan.iter().map(|p| p.out.clone()).collect();
    let total = plan.len();
    crate::weights::gguf::write(out, meta, &tensors, |i| {
        let p = &plan[i];
        let t = match &p.source {
            Source::One(n, heads) => {
                let t = params[n].clone();
                match heads {
                    Some(h) => interleave_heads(&t, *h)?,
                    None => t,
                }
            }
            Source::Stack(names) => {
                Tensor::stack(&names.iter().map(|n| &params[n]).collect::<Vec<_>>(), 0)?
            }
        };
        let values = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let bytes = quantize(p.out.ty, &values).ok_or_else(|| {
            Error::parse(
                out,
                format!(
                    "tensor {}: cannot be written as {}",
                    p.out.name,
                    p.out.ty.name()
                ),
            )
        })?;
        progress(i + 1, total);
        Ok(bytes)
    })?;
    let bytes = std::fs::metadata(out).map_err(|e| Error::io(out, e))?.len();
    Ok(Written {
        arch: arch.to_string(),
        not_llama: None,
        types,
        bytes,
    })
}

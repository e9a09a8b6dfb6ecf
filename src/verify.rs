//! Comparison with reference outputs: does routelm compute what Hugging Face transformers
//! computes for a checkpoint? Reads `DIR/reference.safetensors` (inputs, logits, hidden
//! states, greedy continuation) and `DIR/meta.json` (tolerances).

use candle_core::{DType, Device, IndexOp, Tensor};
use std::path::Path;

use crate::arch;
use crate::error::{Error, Result};
use crate::model::{ForwardOptions, Model};
use crate::weights;

/// What `verify` measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    pub family: String,
    pub logits_max_abs_diff: f64,
    pub logits_tolerance: f64,
    /// Largest difference over all hidden states, when the reference has them.
    pub hidden_max_abs_diff: Option<f64>,
    pub hidden_tolerance: f64,
    /// Largest router-logit difference over the MoE layers, when the reference has them.
    pub router_max_abs_diff: Option<f64>,
    pub router_tolerance: f64,
    pub greedy_expected: Vec<u32>,
    pub greedy_got: Vec<u32>,
    pub pass: bool,
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    if a.dims() != b.dims() {
        return Err(Error::Generate(format!(
            "shape {:?} vs reference {:?}",
            a.dims(),
            b.dims()
        )));
    }
    let d = (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?
        .abs()?
        .flatten_all()?
        .max(0)?;
    Ok(d.to_scalar::<f64>()?)
}

/// Greedy continuation of `prompt` by `n` tokens through the KV cache.
pub fn greedy(model: &Model, prompt: &[u32], n: usize) -> Result<Vec<u32>> {
    let mut cache = model.new_cache();
    let prompt = Tensor::new(prompt, model.device())?.unsqueeze(0)?;
    // an encoder-decoder reads the prompt as its source and starts the decoder afresh
    let mut ids = match model.config.decoder_start {
        Some(start) if model.config.encoder_layers > 0 => {
            model.encode(&prompt, &mut cache)?;
            vec![start]
        }
        _ => prompt.i(0)?.to_vec1()?,
    };
    let mut input = Tensor::new(ids.as_slice(), model.device())?.unsqueeze(0)?;
    for _ in 0..n {
        let logits = model.forward(&input, Some(&mut cache), true)?.logits;
        let next = logits.flatten_all()?.argmax(0)?.to_scalar::<u32>()?;
        ids.push(next);
        input = Tensor::new(&[next], model.device())?.unsqueeze(0)?;
    }
    Ok(ids)
}

fn ids_u32(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::U32)?)
}

/// `DIR/meta.json`, which states the tolerances; a reference without one cannot be judged.
fn read_meta(dir: &Path) -> Result<serde_json::Value> {
    let path = dir.join("meta.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::parse(&path, e))
}

/// Tolerance for `key` from `meta.json`'s `tolerances`, else its `atol`.
fn tolerance(meta: &serde_json::Value, meta_path: &Path, key: &str) -> Result<f64> {
    meta.get("tolerances")
        .and_then(|t| t.get(key))
        .and_then(|v| v.as_f64())
        .or_else(|| meta.get("atol").and_then(|v| v.as_f64()))
        .ok_or_else(|| {
            Error::parse(
                meta_path,
                format!("no tolerance for {key} (tolerances.{key} or atol)"),
            )
        })
}

/// Largest difference between `got[k]` and `reference[prefix.k]`. The reference must hold
/// one tensor per entry of `got` when it holds any (none: `None`).
fn hidden_diff(
    got: &[Tensor],
    reference: &std::collections::BTreeMap<String, Tensor>,
    prefix: &str,
    ref_path: &Path,
) -> Result<Option<f64>> {
    let held = reference
        .keys()
        .filter(|k| indexed_under(k, prefix))
        .count();
    if held == 0 {
        return Ok(None);
    }
    if held != got.len() {
        return Err(Error::parse(
            ref_path,
            format!("{held} {prefix} tensors, the model gives {}", got.len()),
        ));
    }
    let mut hidden: Option<f64> = None;
    for (k, h) in got.iter().enumerate() {
        let name = format!("{prefix}.{k}");
        let r = reference
            .get(&name)
            .ok_or_else(|| Error::parse(ref_path, format!("no tensor {name}")))?;
        let d = max_abs_diff(h, r).map_err(|e| Error::parse(ref_path, format!("{name}: {e}")))?;
        // a NaN anywhere is the result (f64::max would drop it)
        hidden = Some(match hidden {
            Some(m) if m.is_nan() || d.is_nan() => f64::NAN,
            Some(m) => m.max(d),
            None => d,
        });
    }
    Ok(hidden)
}

/// Whether `key` is `prefix.K` (one of a numbered family of reference tensors).
fn indexed_under(key: &str, prefix: &str) -> bool {
    key.strip_prefix(prefix).is_some_and(|r| r.starts_with('.'))
}

/// Every tensor of the reference must be one that `verify` compares.
fn check_known(
    reference: &std::collections::BTreeMap<String, Tensor>,
    ref_path: &Path,
    known: &[&str],
    prefixes: &[&str],
) -> Result<()> {
    let unknown: Vec<&str> = reference
        .keys()
        .map(String::as_str)
        .filter(|k| !known.contains(k) && !prefixes.iter().any(|p| indexed_under(k, p)))
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(Error::parse(
            ref_path,
            format!(
                "tensors verify does not know how to compare: {}",
                unknown.join(", ")
            ),
        ))
    }
}

/// Load `dir`, run its reference inputs, compare.
pub fn verify_dir(dir: &Path) -> Result<VerifyReport> {
    verify_with(dir, None, dir, false)
}

/// Load the model `dir` (with the PEFT adapter `lora` applied), run the inputs of
/// `reference/reference.safetensors`, compare within `reference/meta.json`'s tolerances.
/// `dequantize`: a GGUF file's weights as f32 tensors (the reference dequantized them)
/// rather than read in place by the quantized kernels.
pub fn verify_with(
    dir: &Path,
    lora: Option<&Path>,
    reference: &Path,
    dequantize: bool,
) -> Result<VerifyReport> {
    let device = Device::Cpu;
    let ref_path = reference.join("reference.safetensors");
    let meta_path = reference.join("meta.json");
    let meta = read_meta(reference)?;
    let loaded = arch::load_dir_as(dir, lora, DType::F32, &device, !dequantize)?;
    let model = &loaded.model;
    if model.config.encoder_layers > 0 {
        let family = loaded.family.unwrap_or("routelm");
        return verify_encoder_decoder(model, family, &ref_path, &meta, &meta_path);
    }
    let reference = weights::load_safetensors(&ref_path, None, &device)?;
    check_known(
        &reference,
        &ref_path,
        // base_logits: an adapter's reference also holds the base model's (not compared)
        &["input_ids", "logits", "greedy_ids", "base_logits"],
        &["hidden_states", "router_logits"],
    )?;
    let tol = |key: &str| tolerance(&meta, &meta_path, key);
    let need = |name: &str| -> Result<&Tensor> {
        reference
            .get(name)
            .ok_or_else(|| Error::parse(&ref_path, format!("no tensor {name}")))
    };
    let input = ids_u32(need("input_ids")?)?;
    let out = model.forward_with(
        &input,
        None,
        ForwardOptions {
            last_only: false,
            hidden_states: true,
            ..Default::default()
        },
    )?;
    let logits_diff = max_abs_diff(&out.logits, need("logits")?)
        .map_err(|e| Error::parse(&ref_path, format!("logits: {e}")))?;
    let hidden = hidden_diff(&out.hidden_states, &reference, "hidden_states", &ref_path)?;
    let mut router = None;
    for s in &out.moe {
        if let Some(r) = reference.get(&format!("router_logits.{}", s.layer)) {
            let d = max_abs_diff(&s.router_logits.reshape(r.dims())?, r)?;
            router = Some(router.map_or(d, |m: f64| m.max(d)));
        }
    }
    let n_router_refs = reference
        .keys()
        .filter(|k| k.starts_with("router_logits."))
        .count();
    // an adapter's reference (logits through the adapter) may leave the routers out
    let optional = lora.is_some() && n_router_refs == 0;
    if n_router_refs != out.moe.len() && !optional {
        return Err(Error::parse(
            &ref_path,
            format!(
                "{n_router_refs} router_logits tensors for {} MoE layers",
                out.moe.len()
            ),
        ));
    }
    let (mut expected, mut got) = (Vec::new(), Vec::new());
    if let Some(g) = reference.get("greedy_ids") {
        expected = ids_u32(g)?.flatten_all()?.to_vec1::<u32>()?;
        let prompt = input.i(0)?.to_vec1::<u32>()?;
        let n = expected.len().saturating_sub(prompt.len());
        got = greedy(model, &prompt, n)?;
    }
    let (lt, ht, rt) = (tol("logits")?, tol("hidden_states")?, tol("router_logits")?);
    let pass = logits_diff <= lt
        && hidden.is_none_or(|h| h <= ht)
        && router.is_none_or(|r| r <= rt)
        && expected == got;
    Ok(VerifyReport {
        family: loaded.family.unwrap_or("routelm").to_string(),
        logits_max_abs_diff: logits_diff,
        logits_tolerance: lt,
        hidden_max_abs_diff: hidden,
        hidden_tolerance: ht,
        router_max_abs_diff: router,
        router_tolerance: rt,
        greedy_expected: expected,
        greedy_got: got,
        pass,
    })
}

/// The encoder-decoder comparison: logits of `(encoder_input_ids, decoder_input_ids)`, both
/// stacks' hidden states, and the greedy decoder continuation of the first encoder input.
fn verify_encoder_decoder(
    model: &Model,
    family: &str,
    ref_path: &Path,
    meta: &serde_json::Value,
    meta_path: &Path,
) -> Result<VerifyReport> {
    let reference = weights::load_safetensors(ref_path, None, model.device())?;
    check_known(
        &reference,
        ref_path,
        &[
            "encoder_input_ids",
            "decoder_input_ids",
            "logits",
            "greedy_ids",
        ],
        &["encoder_hidden_states", "decoder_hidden_states"],
    )?;
    let need = |name: &str| -> Result<&Tensor> {
        reference
            .get(name)
            .ok_or_else(|| Error::parse(ref_path, format!("no tensor {name}")))
    };
    let enc_ids = ids_u32(need("encoder_input_ids")?)?;
    let dec_ids = ids_u32(need("decoder_input_ids")?)?;
    let mut cache = model.new_cache();
    let enc_hidden = model.encode(&enc_ids, &mut cache)?;
    let opts = ForwardOptions {
        hidden_states: true,
        ..Default::default()
    };
    let out = model.forward_with(&dec_ids, Some(&mut cache), opts)?;
    let logits_diff = max_abs_diff(&out.logits, need("logits")?)?;
    let enc = hidden_diff(&enc_hidden, &reference, "encoder_hidden_states", ref_path)?;
    let dec = hidden_diff(
        &out.hidden_states,
        &reference,
        "decoder_hidden_states",
        ref_path,
    )?;
    let hidden = match (enc, dec) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    let (mut expected, mut got) = (Vec::new(), Vec::new());
    if let Some(g) = reference.get("greedy_ids") {
        expected = ids_u32(g)?.flatten_all()?.to_vec1::<u32>()?;
        let prompt = enc_ids.i(0)?.to_vec1::<u32>()?;
        got = greedy(model, &prompt, expected.len().saturating_sub(1))?;
    }
    let tol = |key: &str| tolerance(meta, meta_path, key);
    let (lt, ht) = (tol("logits")?, tol("hidden_states")?);
    let pass = logits_diff <= lt && hidden.is_none_or(|h| h <= ht) && expected == got;
    Ok(VerifyReport {
        family: family.into(),
        logits_max_abs_diff: logits_diff,
        logits_tolerance: lt,
        hidden_max_abs_diff: hidden,
        hidden_tolerance: ht,
        router_max_abs_diff: None,
        router_tolerance: tol("router_logits")?,
        greedy_expected: expected,
        greedy_got: got,
        pass,
    })
}

//! A model folder's sampling defaults (`generation_config.json`, else `config.json`).

use std::path::Path;

use super::{gguf, is_gguf, read_config_json};
use crate::error::{Error, Result};

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

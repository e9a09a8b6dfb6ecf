//! Writing fine-tuned parameters back as a Hugging Face folder in the layout of the one
//! they were loaded from.

use candle_core::{DType, Device, Tensor};
use std::path::Path;

use super::{load_config, read_weights, Origin, TensorMap};
use crate::error::{Error, Result};
use crate::weights::{self, Params};

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

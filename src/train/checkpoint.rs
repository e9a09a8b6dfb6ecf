//! Checkpoints: a folder holding the model (`config.json` + `model.safetensors`), the
//! optimiser moments (`optimizer.safetensors`) and `state.json` (step, RNG state, recipe,
//! metrics so far). A checkpoint is written to `NAME.tmp/` and swapped in by renames, so a
//! crash leaves either the previous checkpoint or the new one, never a mixture.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use super::TrainConfig;
use crate::error::{Error, Result};

/// One logged step; a line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    pub step: usize,
    pub train_loss: f64,
    pub lr: f64,
    pub tokens_per_s: f64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub val_loss: Option<f64>,
    pub grad_norm: f64,
    /// Achieved training GFLOP/s from the FLOP ledger.
    pub gflops: f64,
    /// Wall-clock seconds since the run started (across resumes).
    pub elapsed_s: f64,
}

/// Everything in `state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    pub step: usize,
    pub rng_state: u64,
    pub adam_t: usize,
    pub tokens_seen: u64,
    pub elapsed_s: f64,
    pub train: TrainConfig,
    /// Fingerprint of the token stream (length and hash), checked on resume.
    pub data_fingerprint: String,
    /// The text file trained on (None: the embedded corpus), reused by `--resume`.
    #[serde(default)]
    pub data_source: Option<std::path::PathBuf>,
    pub metrics: Vec<Metric>,
}

/// Where the live checkpoint of a run folder is.
pub fn checkpoint_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoint")
}

/// Swap a fully written `tmp` folder in as `dir`. If a crash interrupts the swap, `dir.old`
/// holds the previous checkpoint and [`find_checkpoint`] falls back to it.
pub fn commit(tmp: &Path, dir: &Path) -> Result<()> {
    let old = dir.with_extension("old");
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::rename(tmp, dir).map_err(|e| Error::io(tmp, e))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    Ok(())
}

/// The checkpoint to resume from in a run folder (or a checkpoint folder itself).
pub fn find_checkpoint(path: &Path) -> Result<PathBuf> {
    if path.join("state.json").exists() {
        return Ok(path.to_path_buf());
    }
    let dir = checkpoint_dir(path);
    if dir.join("state.json").exists() {
        return Ok(dir);
    }
    let old = dir.with_extension("old");
    if old.join("state.json").exists() {
        return Ok(old);
    }
    Err(Error::Checkpoint {
        path: path.into(),
        msg: "no checkpoint here (expected state.json or checkpoint/state.json)".into(),
    })
}

/// A cheap, stable fingerprint of a token stream.
pub fn fingerprint(tokens: &[u32]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &t in tokens {
        h ^= t as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    format!("{}:{h:016x}", tokens.len())
}

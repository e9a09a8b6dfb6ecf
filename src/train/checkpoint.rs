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
    /// Per MoE layer: what its router did in this step.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub router: Vec<RouterMetric>,
}

/// One MoE layer's routing in one step (summed over micro-batches).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouterMetric {
    pub layer: usize,
    /// Token assignments per expert.
    pub load: Vec<usize>,
    /// The busiest expert's load over the mean load.
    pub max_over_mean: f64,
    /// Share of assignments dropped by the capacity limit.
    pub dropped_fraction: f64,
    /// Mean entropy of the per-token expert distribution (nats).
    pub entropy: f64,
    /// Weighted auxiliary (balancing + z) loss.
    pub aux_loss: f64,
}

impl RouterMetric {
    pub fn from_stats(s: &crate::routing::MoeStats) -> crate::Result<Self> {
        let aux_loss = match &s.aux_loss {
            Some(t) => t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?,
            None => 0.0,
        };
        let mut m = Self {
            layer: s.layer,
            load: s.load.clone(),
            max_over_mean: 0.0,
            dropped_fraction: 0.0,
            entropy: s.entropy,
            aux_loss,
        };
        m.dropped_fraction = s.dropped as f64 / s.assignments.max(1) as f64;
        m.finish();
        Ok(m)
    }

    fn finish(&mut self) {
        let total: usize = self.load.iter().sum();
        let mean = total as f64 / self.load.len().max(1) as f64;
        let max = self.load.iter().copied().max().unwrap_or(0) as f64;
        self.max_over_mean = if mean > 0.0 { max / mean } else { 0.0 };
    }

    /// Sum per-micro-batch metrics into one per layer.
    pub fn merge(parts: Vec<RouterMetric>) -> Vec<RouterMetric> {
        let mut out: Vec<RouterMetric> = Vec::new();
        let mut counts: Vec<usize> = Vec::new();
        for p in parts {
            match out.iter().position(|m| m.layer == p.layer) {
                Some(i) => {
                    let m = &mut out[i];
                    m.load.iter_mut().zip(&p.load).for_each(|(a, b)| *a += b);
                    m.dropped_fraction += p.dropped_fraction;
                    m.entropy += p.entropy;
                    m.aux_loss += p.aux_loss;
                    counts[i] += 1;
                }
                None => {
                    out.push(p);
                    counts.push(1);
                }
            }
        }
        for (m, n) in out.iter_mut().zip(counts) {
            let n = n as f64;
            m.dropped_fraction /= n;
            m.entropy /= n;
            m.aux_loss /= n;
            m.finish();
        }
        out
    }
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
    /// The published checkpoint a fine-tune started from; its layout is written back.
    #[serde(default)]
    pub init_source: Option<std::path::PathBuf>,
    pub metrics: Vec<Metric>,
}

/// Where the live checkpoint of a run folder is.
pub fn checkpoint_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoint")
}

/// The points of a checkpoint write where a crash may stop it: after each file of the
/// temporary folder, after the previous checkpoint moved aside, after the new one moved in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteStage {
    Model,
    Optimizer,
    State,
    OldMoved,
    NewMoved,
}

thread_local! {
    static FAULT: std::cell::Cell<Option<WriteStage>> = const { std::cell::Cell::new(None) };
}

/// Make the next checkpoint write on this thread stop right after `stage`, leaving the
/// files as a crash there would (the crash-safety test); `None` clears it.
pub fn inject_fault(stage: Option<WriteStage>) {
    FAULT.set(stage);
}

/// A checkpoint write reached `stage`: an error when a fault was injected there.
pub(crate) fn reached(stage: WriteStage, dir: &Path) -> Result<()> {
    if FAULT.get() == Some(stage) {
        FAULT.set(None);
        return Err(Error::Checkpoint {
            path: dir.into(),
            msg: format!("write stopped after {stage:?} (injected fault)"),
        });
    }
    Ok(())
}

/// Swap a fully written `tmp` folder in as `dir`. If a crash interrupts the swap, `dir.old`
/// holds the previous checkpoint and [`find_checkpoint`] falls back to it.
///
/// Every file of `tmp` and its entries are flushed to the disk before the first rename, and
/// the run folder after the last, so a power loss never leaves a renamed folder of empty
/// files.
pub fn commit(tmp: &Path, dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(tmp).map_err(|e| Error::io(tmp, e))? {
        let path = entry.map_err(|e| Error::io(tmp, e))?.path();
        if path.is_file() {
            crate::weights::sync_file(&path)?;
        }
    }
    crate::weights::sync_dir(tmp)?;
    let old = dir.with_extension("old");
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
    }
    reached(WriteStage::OldMoved, dir)?;
    std::fs::rename(tmp, dir).map_err(|e| Error::io(tmp, e))?;
    crate::weights::sync_dir(dir.parent().unwrap_or(Path::new(".")))?;
    reached(WriteStage::NewMoved, dir)?;
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

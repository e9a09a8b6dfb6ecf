//! Training by gradient descent: the recipe ([`TrainConfig`]), data, optimiser, checkpoints
//! and the loop. The trainer knows nothing about architectures: it sees a
//! [`crate::model::Model`], its parameters and a loss.

pub mod checkpoint;
pub mod corpus;
pub mod data;
pub mod optimizer;
mod run_file;
pub mod trainer;

use serde::{Deserialize, Serialize};

pub use run_file::RunFile;
pub use trainer::{Event, RunOptions, RunSummary, Trainer};

/// Precision of the matrix products in training (parameters, activations, gradients and
/// optimizer state are f32 either way).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 throughout.
    #[default]
    F32,
    /// Mixed: the projections' products, forward and backward, with bf16 operands and f32
    /// sums (as PyTorch's bf16 autocast), on CPUs with AVX512-BF16; f32 elsewhere.
    Bf16,
}

impl Precision {
    /// Its name in presets and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [Self::F32, Self::Bf16]
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| format!("unknown precision {s:?} (expected f32 or bf16)"))
    }
}

/// A resolved training recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimiser steps.
    pub steps: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Micro-batches per optimiser step.
    pub grad_accum: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Learning-rate floor at the end of the cosine.
    pub min_lr: f64,
    pub warmup_steps: usize,
    /// Step at which the cosine reaches `min_lr`.
    pub decay_steps: usize,
    pub weight_decay: f64,
    /// Apply weight decay to embeddings too (off by default).
    pub decay_embeddings: bool,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    pub grad_clip: f64,
    /// Evaluate on the validation split every N steps (and at the end).
    pub eval_every: usize,
    /// Batches per evaluation.
    pub eval_batches: usize,
    /// Write a metrics line every N steps.
    pub log_every: usize,
    /// Save a checkpoint every N steps (0: only at the end).
    pub checkpoint_every: usize,
    /// Fraction of the tokens held out for validation.
    pub val_fraction: f64,
    pub seed: u64,
    /// Matrix-product precision (absent from checkpoints written before it existed: f32).
    #[serde(default)]
    pub precision: Precision,
    /// Train only what was added to a published model: LoRA adapters and
    /// Mixture-of-Depths routers (and their predictors); every other parameter is a
    /// constant (no gradient, no optimizer state).
    #[serde(default)]
    pub freeze_base: bool,
}

/// The file form of [`TrainConfig`] (`[train]` in a preset); every field has a default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfigFile {
    /// Default 1000.
    pub steps: Option<usize>,
    /// Default 8.
    pub batch_size: Option<usize>,
    /// Default: the model's `max_seq_len`.
    pub seq_len: Option<usize>,
    /// Default 1.
    pub grad_accum: Option<usize>,
    /// Default 1e-3.
    pub lr: Option<f64>,
    /// Default lr / 10.
    pub min_lr: Option<f64>,
    /// Default 100 (at most steps / 10).
    pub warmup_steps: Option<usize>,
    /// Default: `steps`.
    pub decay_steps: Option<usize>,
    /// Default 0.1.
    pub weight_decay: Option<f64>,
    pub decay_embeddings: Option<bool>,
    /// Default 0.9.
    pub beta1: Option<f64>,
    /// Default 0.99.
    pub beta2: Option<f64>,
    /// Default 1e-8.
    pub eps: Option<f64>,
    /// Default 1.0.
    pub grad_clip: Option<f64>,
    /// Default 250.
    pub eval_every: Option<usize>,
    /// Default 20.
    pub eval_batches: Option<usize>,
    /// Default 10.
    pub log_every: Option<usize>,
    /// Default 0 (end of run only).
    pub checkpoint_every: Option<usize>,
    /// Default 0.1.
    pub val_fraction: Option<f64>,
    /// Default 1337.
    pub seed: Option<u64>,
    /// `"f32"` (default) or `"bf16"` (mixed precision).
    pub precision: Option<Precision>,
}

impl TrainConfigFile {
    /// Fill defaults and validate against the model's context window.
    pub fn resolve(&self, max_seq_len: usize, origin: &str) -> crate::Result<TrainConfig> {
        let steps = self.steps.unwrap_or(1000);
        let lr = self.lr.unwrap_or(1e-3);
        let c = TrainConfig {
            steps,
            batch_size: self.batch_size.unwrap_or(8),
            seq_len: self.seq_len.unwrap_or(max_seq_len),
            grad_accum: self.grad_accum.unwrap_or(1),
            lr,
            min_lr: self.min_lr.unwrap_or(lr / 10.0),
            warmup_steps: self.warmup_steps.unwrap_or(100.min(steps / 10)),
            decay_steps: self.decay_steps.unwrap_or(steps),
            weight_decay: self.weight_decay.unwrap_or(0.1),
            decay_embeddings: self.decay_embeddings.unwrap_or(false),
            beta1: self.beta1.unwrap_or(0.9),
            beta2: self.beta2.unwrap_or(0.99),
            eps: self.eps.unwrap_or(1e-8),
            grad_clip: self.grad_clip.unwrap_or(1.0),
            eval_every: self.eval_every.unwrap_or(250),
            eval_batches: self.eval_batches.unwrap_or(20),
            log_every: self.log_every.unwrap_or(10),
            checkpoint_every: self.checkpoint_every.unwrap_or(0),
            val_fraction: self.val_fraction.unwrap_or(0.1),
            seed: self.seed.unwrap_or(1337),
            precision: self.precision.unwrap_or_default(),
            freeze_base: false,
        };
        let mut p = Vec::new();
        for (name, v) in [
            ("steps", c.steps),
            ("batch_size", c.batch_size),
            ("seq_len", c.seq_len),
            ("grad_accum", c.grad_accum),
            ("eval_every", c.eval_every),
            ("eval_batches", c.eval_batches),
            ("log_every", c.log_every),
        ] {
            if v == 0 {
                p.push(format!("train.{name} must be positive"));
            }
        }
        if c.seq_len > max_seq_len {
            p.push(format!(
                "train.seq_len ({}) exceeds the model's max_seq_len ({max_seq_len})",
                c.seq_len
            ));
        }
        if c.lr.is_nan() || c.lr <= 0.0 || c.min_lr < 0.0 || c.min_lr > c.lr {
            p.push(format!(
                "train.lr ({}) must be positive and at least min_lr ({})",
                c.lr, c.min_lr
            ));
        }
        if !(0.0..1.0).contains(&c.beta1) || !(0.0..1.0).contains(&c.beta2) {
            p.push("train.beta1 and train.beta2 must be in [0, 1)".into());
        }
        if !(0.0..1.0).contains(&c.val_fraction) || c.val_fraction == 0.0 {
            p.push(format!(
                "train.val_fraction ({}) must be in (0, 1)",
                c.val_fraction
            ));
        }
        if p.is_empty() {
            Ok(c)
        } else {
            Err(crate::Error::Config {
                origin: origin.into(),
                problems: p,
            })
        }
    }
}

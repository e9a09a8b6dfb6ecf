//! The training loop: micro-batches → loss → backward → clipped AdamW step, evaluation on
//! the held-out split, metrics, checkpoints and exact resume. It reports progress through a
//! callback and never prints.

use candle_core::{DType, Device, Tensor, Var};
use rayon::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::checkpoint::{self, Metric, RouterMetric, TrainState};
use super::data::{Dataset, Split};
use super::optimizer::{learning_rate, AdamW, AdamWConfig, Slot};
use super::TrainConfig;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::flops::FlopLedger;
use crate::model::{init::init_params, Model};
use crate::nn::grouped::{with_grad_sink, GradSink};
use crate::rng::Rng;
use crate::weights::{
    self,
    names::{param_specs, param_stacks},
    Params,
};

/// Seed offset for the fixed evaluation batches (same windows at every evaluation).
const EVAL_SEED: u64 = 0xE7A1;

pub struct Trainer {
    pub model: Model,
    pub config: TrainConfig,
    opt: AdamW,
    /// Parameters that do not train (a base model under adapters).
    frozen: Params,
    pub rng: Rng,
    pub step: usize,
    pub tokens_seen: u64,
    pub elapsed_s: f64,
    pub metrics: Vec<Metric>,
    /// The text file trained on (None: the embedded corpus); saved for `--resume`.
    pub data_source: Option<PathBuf>,
    /// The published checkpoint a fine-tune started from (saved for `--resume`).
    pub init_source: Option<PathBuf>,
    /// What the MoE routers did in the last step.
    pub last_router: Vec<RouterMetric>,
    /// Training FLOPs per token from the ledger.
    flops_per_token: f64,
}

/// What the loop reports as it goes.
#[derive(Debug)]
pub enum Event<'a> {
    /// A logged step (also after each evaluation, with `val_loss` set).
    Step(&'a Metric),
    /// Every step, for progress bars: (step, steps, train loss).
    Tick {
        step: usize,
        steps: usize,
        loss: f64,
    },
    Checkpoint(&'a Path),
}

pub struct RunOptions {
    /// Run folder: `metrics.jsonl`, `checkpoint/`, plots.
    pub out: PathBuf,
    /// Stop (with a checkpoint) after this step, as an interrupted run would.
    pub stop_after: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct RunSummary {
    pub steps: usize,
    pub final_val_loss: f64,
    pub first_val_loss: Option<f64>,
    pub wall_s: f64,
    pub mean_step_ms: f64,
}

fn build(
    cfg: &ModelConfig,
    train: &TrainConfig,
    params: Params,
    origin: &str,
) -> Result<(Model, AdamW, Params)> {
    let get = |name: &str| -> Result<Tensor> {
        let t = params.get(name).ok_or_else(|| Error::WeightMismatch {
            path: origin.into(),
            problems: vec![format!("missing tensor {name}")],
        })?;
        Ok(t.to_dtype(DType::F32)?)
    };
    // SwiGLU blocks train with their projections stacked (a dense block's gate and up, an
    // MoE layer's experts): one variable each, read directly by the fused op; the model's
    // per-projection weights are views of it
    let stacks = param_stacks(cfg);
    let stack_of: HashMap<&str, usize> = stacks
        .iter()
        .enumerate()
        .flat_map(|(i, s)| s.parts.iter().map(move |n| (n.as_str(), i)))
        .collect();
    let mut done = vec![false; stacks.len()];
    let mut slots = Vec::new();
    let mut tensors = BTreeMap::new();
    let mut frozen = Params::new();
    for spec in param_specs(cfg) {
        let decay = spec.decay || (train.decay_embeddings && spec.name.contains("embed"));
        if train.freeze_base && !weights::names::is_added(&spec.name) {
            // training what was added (adapters, depth routers): the base weights are
            // constants (no gradient, no optimizer state) and stay unstacked
            let t = get(&spec.name)?;
            tensors.insert(spec.name.clone(), t.clone());
            frozen.insert(spec.name, t);
            continue;
        }
        let Some(&i) = stack_of.get(spec.name.as_str()) else {
            let var = Var::from_tensor(&get(&spec.name)?)?;
            tensors.insert(spec.name.clone(), var.as_tensor().clone());
            slots.push(Slot::new(spec.name, var, decay));
            continue;
        };
        if done[i] {
            continue;
        }
        let s = &stacks[i];
        let pieces = s.parts.iter().map(|n| get(n)).collect::<Result<Vec<_>>>()?;
        let var = Var::from_tensor(&Tensor::cat(&pieces, 0)?)?;
        let parts = s
            .parts
            .iter()
            .zip(&pieces)
            .map(|(n, t)| (n.clone(), t.dims().to_vec()))
            .collect();
        // the model takes the variable under the stack's name; its parts become views
        tensors.insert(s.name.clone(), var.as_tensor().clone());
        done[i] = true;
        slots.push(Slot::stacked(s.name.clone(), var, decay, parts));
    }
    let model = Model::new(cfg, &tensors, origin)?;
    let adam = AdamWConfig {
        beta1: train.beta1,
        beta2: train.beta2,
        eps: train.eps,
        weight_decay: train.weight_decay,
    };
    Ok((model, AdamW::new(adam, slots), frozen))
}

impl Trainer {
    /// A fresh run: parameters drawn from `train.seed`.
    pub fn new(cfg: &ModelConfig, train: &TrainConfig, device: &Device) -> Result<Self> {
        let params = init_params(cfg, train.seed, DType::F32, device)?;
        Self::from_params(cfg, train, params, "init")
    }

    /// Start from given parameters (fine-tuning).
    pub fn from_params(
        cfg: &ModelConfig,
        train: &TrainConfig,
        params: Params,
        origin: &str,
    ) -> Result<Self> {
        if cfg.encoder_layers > 0 {
            return Err(Error::Config {
                origin: origin.into(),
                problems: vec![
                    "training takes decoder-only models (an encoder-decoder would need source/target pairs)".into(),
                ],
            });
        }
        let (mut model, opt, frozen) = build(cfg, train, params, origin)?;
        if train.precision == super::Precision::Bf16 {
            if crate::nn::bf16::available() {
                model.set_bf16_matmul(true);
            } else {
                tracing::warn!("precision bf16: this CPU lacks AVX512-BF16, training in f32");
            }
        }
        let flops_per_token = FlopLedger::new(cfg, train.seq_len).train_per_token();
        Ok(Self {
            model,
            config: train.clone(),
            opt,
            frozen,
            rng: Rng::new(train.seed.wrapping_add(1)),
            step: 0,
            tokens_seen: 0,
            elapsed_s: 0.0,
            metrics: Vec::new(),
            data_source: None,
            init_source: None,
            last_router: Vec::new(),
            flops_per_token,
        })
    }

    /// Continue from a checkpoint folder (or a run folder holding `checkpoint/`).
    pub fn resume(path: &Path, device: &Device) -> Result<Self> {
        let dir = checkpoint::find_checkpoint(path)?;
        let cfg = weights::load_config(&dir)?;
        let state_path = dir.join("state.json");
        let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
        let state: TrainState =
            serde_json::from_str(&text).map_err(|e| Error::parse(&state_path, e))?;
        let params =
            weights::load_safetensors(&dir.join("model.safetensors"), Some(DType::F32), device)?;
        let mut t = Self::from_params(
            &cfg,
            &state.train,
            params,
            &dir.join("model.safetensors").display().to_string(),
        )?;
        let opt_path = dir.join("optimizer.safetensors");
        let moments = weights::load_safetensors(&opt_path, Some(DType::F32), &Device::Cpu)?;
        for slot in &mut t.opt.slots {
            let pieces: Vec<(String, std::ops::Range<usize>)> = slot
                .pieces()
                .into_iter()
                .map(|(n, r, _)| (n.to_string(), r))
                .collect();
            for (name, range) in pieces {
                for (prefix, dst) in [("m.", &mut slot.m), ("v.", &mut slot.v)] {
                    let key = format!("{prefix}{name}");
                    let m = moments.get(&key).ok_or_else(|| Error::Checkpoint {
                        path: opt_path.clone(),
                        msg: format!("missing optimizer moment {key}"),
                    })?;
                    let v = m.flatten_all()?.to_vec1::<f32>()?;
                    if v.len() != range.len() {
                        return Err(Error::Checkpoint {
                            path: opt_path.clone(),
                            msg: format!("{key} has {} values, expected {}", v.len(), range.len()),
                        });
                    }
                    dst[range.clone()].copy_from_slice(&v);
                }
            }
        }
        t.opt.t = state.adam_t;
        t.rng = Rng {
            state: state.rng_state,
        };
        t.step = state.step;
        t.tokens_seen = state.tokens_seen;
        t.elapsed_s = state.elapsed_s;
        t.metrics = state.metrics;
        t.data_source = state.data_source;
        t.init_source = state.init_source;
        Ok(t)
    }

    /// The current parameters by canonical name.
    pub fn params(&self) -> Result<Params> {
        let mut params = self.frozen.clone();
        for s in &self.opt.slots {
            params.extend(s.tensors()?);
        }
        Ok(params)
    }

    /// One optimiser step over `grad_accum` micro-batches. Returns (loss, grad norm, lr).
    pub fn train_step(&mut self, data: &Dataset) -> Result<(f64, f64, f64)> {
        let c = &self.config;
        let device = self.model.device().clone();
        let mut grads: Vec<Option<Tensor>> = vec![None; self.opt.slots.len()];
        let mut loss_sum = 0f64;
        let mut router_stats: Vec<RouterMetric> = Vec::new();
        // each batch is split into shards whose gradients are computed concurrently, one per
        // thread: on two cores most ops of a small model are too short to split well
        let shards = shard_count(c.batch_size);
        let scale = (c.grad_accum * shards) as f64;
        for micro in 0..c.grad_accum {
            let (x, y) = data.batch(
                Split::Train,
                &mut self.rng,
                c.batch_size,
                c.seq_len,
                &device,
            )?;
            let per = c.batch_size / shards;
            let parts: Vec<(Tensor, Tensor)> = (0..shards)
                .map(|i| Ok((x.narrow(0, i * per, per)?, y.narrow(0, i * per, per)?)))
                .collect::<Result<_>>()?;
            let (model, slots) = (&self.model, &self.opt.slots);
            let step = self.step;
            let results: Vec<Result<ShardGrads>> = parts
                .par_iter()
                .enumerate()
                .map(|(shard, (x, y))| {
                    // routing draws from (run seed, step, micro-batch, shard): reproducible,
                    // and the same after a resume
                    let opts = crate::model::ForwardOptions {
                        seed: c.seed ^ ((step as u64) << 24) ^ ((micro as u64) << 8) ^ shard as u64,
                        ..Default::default()
                    };
                    shard_grads(model, slots, x, y, opts, scale)
                })
                .collect();
            // summed in shard order (the same result whichever thread finished first), the
            // parameters in parallel
            for r in results {
                let (ce, stats, g) = r?;
                loss_sum += ce / shards as f64;
                router_stats.extend(stats);
                grads.par_iter_mut().zip(g).try_for_each(
                    |(acc, g)| -> candle_core::Result<()> {
                        *acc = match (acc.take(), g) {
                            (Some(a), Some(g)) => Some((a + g)?),
                            (a, g) => a.or(g),
                        };
                        Ok(())
                    },
                )?;
            }
        }
        let grads: Vec<Tensor> = grads
            .into_iter()
            .zip(&self.opt.slots)
            .map(|(g, s)| g.map_or_else(|| s.var.as_tensor().zeros_like(), Ok))
            .collect::<candle_core::Result<_>>()?;
        let norm = AdamW::grad_norm(&grads)?;
        let loss = loss_sum / c.grad_accum as f64;
        if !loss.is_finite() || !norm.is_finite() {
            // a step on a NaN or infinite gradient would ruin every parameter it touches
            return Err(Error::Diverged(format!(
                "at step {} the loss is {loss} and the gradient norm {norm}; the parameters were not updated, the last checkpoint is as it was (a lower learning rate, or --resume from it)",
                self.step + 1
            )));
        }
        let scale = if c.grad_clip > 0.0 && norm > c.grad_clip {
            c.grad_clip / (norm + 1e-6)
        } else {
            1.0
        };
        let lr = learning_rate(self.step, c.lr, c.min_lr, c.warmup_steps, c.decay_steps);
        self.opt.step(&grads, lr, scale)?;
        self.step += 1;
        self.tokens_seen += (c.grad_accum * c.batch_size * c.seq_len) as u64;
        self.last_router = RouterMetric::merge(router_stats);
        self.balance_selection_bias()?;
        Ok((loss, norm, lr))
    }

    /// Auxiliary-loss-free balancing: move each MoE layer's selection bias toward equal
    /// load, from the loads of the step just taken.
    fn balance_selection_bias(&mut self) -> Result<()> {
        for r in &self.last_router {
            let Some(m) = self.model.config.layer(r.layer).moe else {
                continue;
            };
            if m.bias_update_rate <= 0.0 || !m.selection_bias {
                continue;
            }
            let name = format!("model.layers.{}.mlp.gate.e_score_correction_bias", r.layer);
            if let Some(slot) = self.opt.slots.iter().find(|s| s.name == name) {
                let mut b: Vec<f32> = slot.var.as_tensor().to_dtype(DType::F32)?.to_vec1()?;
                crate::routing::update_selection_bias(&mut b, &r.load, m.bias_update_rate);
                let t = Tensor::from_vec(b, r.load.len(), slot.var.device())?
                    .to_dtype(slot.var.dtype())?;
                slot.var.set(&t)?;
            }
        }
        Ok(())
    }

    /// `(trained, all)` parameter counts.
    pub fn param_counts(&self) -> (usize, usize) {
        let trained: usize = self.opt.slots.iter().map(|s| s.var.elem_count()).sum();
        let frozen: usize = self.frozen.values().map(|t| t.elem_count()).sum();
        (trained, trained + frozen)
    }

    /// Mean loss over the fixed validation batches.
    pub fn evaluate(&self, data: &Dataset) -> Result<f64> {
        evaluate(&self.model, data, &self.config)
    }

    /// Write `DIR/checkpoint` atomically.
    pub fn save_checkpoint(&self, run_dir: &Path, data: &Dataset) -> Result<PathBuf> {
        let dir = checkpoint::checkpoint_dir(run_dir);
        let tmp = dir.with_extension("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        weights::save_model_dir(&tmp, &self.model.config, &self.params()?)?;
        checkpoint::reached(checkpoint::WriteStage::Model, &tmp)?;
        let mut moments = BTreeMap::new();
        let cpu = Device::Cpu;
        for s in &self.opt.slots {
            for (name, range, shape) in s.pieces() {
                moments.insert(
                    format!("m.{name}"),
                    Tensor::from_slice(&s.m[range.clone()], shape, &cpu)?,
                );
                moments.insert(
                    format!("v.{name}"),
                    Tensor::from_slice(&s.v[range], shape, &cpu)?,
                );
            }
        }
        weights::save_safetensors(&tmp.join("optimizer.safetensors"), &moments)?;
        checkpoint::reached(checkpoint::WriteStage::Optimizer, &tmp)?;
        let state = TrainState {
            step: self.step,
            rng_state: self.rng.state,
            adam_t: self.opt.t,
            tokens_seen: self.tokens_seen,
            elapsed_s: self.elapsed_s,
            train: self.config.clone(),
            data_fingerprint: checkpoint::fingerprint(&data.train),
            data_source: self.data_source.clone(),
            init_source: self.init_source.clone(),
            metrics: self.metrics.clone(),
        };
        let json = serde_json::to_string_pretty(&state).map_err(|e| Error::parse(&tmp, e))?;
        weights::write_atomic(&tmp.join("state.json"), json.as_bytes())?;
        checkpoint::reached(checkpoint::WriteStage::State, &tmp)?;
        checkpoint::commit(&tmp, &dir)?;
        Ok(dir)
    }

    /// Check that a resumed run sees the same training tokens as the original.
    pub fn check_data(&self, run_dir: &Path, data: &Dataset) -> Result<()> {
        let dir = checkpoint::find_checkpoint(run_dir)?;
        let text =
            std::fs::read_to_string(dir.join("state.json")).map_err(|e| Error::io(&dir, e))?;
        let state: TrainState = serde_json::from_str(&text).map_err(|e| Error::parse(&dir, e))?;
        let now = checkpoint::fingerprint(&data.train);
        if state.data_fingerprint != now {
            return Err(Error::Checkpoint {
                path: dir,
                msg: format!(
                    "the data differs from the run's (tokens:hash {} vs {now})",
                    state.data_fingerprint
                ),
            });
        }
        Ok(())
    }

    /// Run to `config.steps` (or `stop_after`), evaluating, logging and checkpointing.
    pub fn run(
        &mut self,
        data: &Dataset,
        opts: &RunOptions,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<RunSummary> {
        std::fs::create_dir_all(&opts.out).map_err(|e| Error::io(&opts.out, e))?;
        let metrics_path = opts.out.join("metrics.jsonl");
        // rewrite the log from the metrics the checkpoint knows, dropping lines past it
        let mut log = String::new();
        for m in &self.metrics {
            log.push_str(&serde_json::to_string(m).map_err(|e| Error::parse(&metrics_path, e))?);
            log.push('\n');
        }
        weights::write_atomic(&metrics_path, log.as_bytes())?;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&metrics_path)
            .map_err(|e| Error::io(&metrics_path, e))?;

        let c = self.config.clone();
        let last = opts.stop_after.map_or(c.steps, |s| s.min(c.steps));
        let started = Instant::now();
        let base_elapsed = self.elapsed_s;
        let mut window = (Instant::now(), 0u64);
        let mut step_time = 0f64;
        let mut steps_run = 0usize;
        let mut final_val = f64::NAN;
        while self.step < last {
            let t0 = Instant::now();
            let (loss, norm, lr) = self.train_step(data)?;
            step_time += t0.elapsed().as_secs_f64();
            steps_run += 1;
            window.1 += (c.grad_accum * c.batch_size * c.seq_len) as u64;
            on_event(Event::Tick {
                step: self.step,
                steps: c.steps,
                loss,
            });
            let eval_now = self.step.is_multiple_of(c.eval_every) || self.step == c.steps;
            if self.step.is_multiple_of(c.log_every) || eval_now || self.step == last {
                let dt = window.0.elapsed().as_secs_f64().max(1e-9);
                let tps = window.1 as f64 / dt;
                let val_loss = if eval_now {
                    Some(self.evaluate(data)?)
                } else {
                    None
                };
                if let Some(v) = val_loss {
                    final_val = v;
                }
                self.elapsed_s = base_elapsed + started.elapsed().as_secs_f64();
                let m = Metric {
                    step: self.step,
                    train_loss: loss,
                    lr,
                    tokens_per_s: tps,
                    val_loss,
                    grad_norm: norm,
                    gflops: tps * self.flops_per_token / 1e9,
                    elapsed_s: self.elapsed_s,
                    router: self.last_router.clone(),
                };
                let line = serde_json::to_string(&m).map_err(|e| Error::parse(&metrics_path, e))?;
                writeln!(file, "{line}").map_err(|e| Error::io(&metrics_path, e))?;
                on_event(Event::Step(&m));
                self.metrics.push(m);
                window = (Instant::now(), 0);
            }
            let ckpt_now = c.checkpoint_every > 0 && self.step.is_multiple_of(c.checkpoint_every);
            if ckpt_now || self.step == last {
                self.elapsed_s = base_elapsed + started.elapsed().as_secs_f64();
                let dir = self.save_checkpoint(&opts.out, data)?;
                on_event(Event::Checkpoint(&dir));
            }
        }
        let first_val = self.metrics.iter().find_map(|m| m.val_loss);
        Ok(RunSummary {
            steps: self.step,
            final_val_loss: final_val,
            first_val_loss: first_val,
            wall_s: started.elapsed().as_secs_f64(),
            mean_step_ms: 1e3 * step_time / steps_run.max(1) as f64,
        })
    }
}

/// A routed (Mixture-of-Depths) block's causal decisions against its top-k choices.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DepthMetric {
    pub layer: usize,
    /// Share of tokens whose causal decision (the predictor's or router's logit > 0)
    /// equals top-k membership.
    pub accuracy: f64,
    /// The trivial predictor "always skip": 1 − the share top-k processes.
    pub baseline: f64,
    /// Share of the top-k tokens the causal decision also processes.
    pub recall: f64,
    /// Share of tokens the causal decision processes (no longer fixed at the capacity).
    pub processed: f64,
}

/// What `routelm eval` reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Evaluation {
    /// Validation loss with top-k routing in routed blocks (as trained).
    pub loss: f64,
    /// Validation loss with the causal decisions sampling uses (models with routed blocks).
    pub causal_loss: Option<f64>,
    pub router: Vec<RouterMetric>,
    pub depth: Vec<DepthMetric>,
}

/// Validation loss over the fixed batches, what the MoE routers did, and for routed blocks
/// how well the causal decisions predict top-k.
pub fn evaluate_full(model: &Model, data: &Dataset, train: &TrainConfig) -> Result<Evaluation> {
    let (mut sum, mut causal_sum) = (0f64, 0f64);
    let mut stats = Vec::new();
    // per routed layer: (agree, chosen, chosen and predicted, predicted, tokens)
    let mut counts: Vec<(usize, [usize; 5])> = Vec::new();
    let routed = model.config.depth_layers().next().is_some();
    for batch in eval_batches(model, data, train) {
        let (x, y) = batch?;
        let out = model.loss(&x, &y)?;
        sum += out.ce.to_scalar::<f32>()? as f64;
        for s in &out.moe {
            stats.push(RouterMetric::from_stats(s)?);
        }
        for d in &out.depth {
            let logits: Vec<f32> = d
                .decision_logits
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1()?;
            let i = match counts.iter().position(|c| c.0 == d.layer) {
                Some(i) => i,
                None => {
                    counts.push((d.layer, [0; 5]));
                    counts.len() - 1
                }
            };
            for (&z, &c) in logits.iter().zip(&d.chosen) {
                let (pred, chosen) = (z > 0.0, c == 1);
                let k = &mut counts[i].1;
                k[0] += (pred == chosen) as usize;
                k[1] += chosen as usize;
                k[2] += (pred && chosen) as usize;
                k[3] += pred as usize;
                k[4] += 1;
            }
        }
        if routed {
            let opts = crate::model::ForwardOptions {
                depth: Some(crate::routing::DepthDecision::Threshold),
                ..Default::default()
            };
            let logits = model.forward_with(&x, None, opts)?.logits;
            let v = model.config.vocab_size;
            causal_sum +=
                crate::nn::ops::cross_entropy(&logits.reshape(((), v))?, &y.flatten_all()?)?
                    .to_scalar::<f32>()? as f64;
        }
    }
    let n = train.eval_batches as f64;
    let depth = counts
        .into_iter()
        .map(|(layer, k)| {
            let t = k[4].max(1) as f64;
            DepthMetric {
                layer,
                accuracy: k[0] as f64 / t,
                baseline: 1.0 - k[1] as f64 / t,
                recall: k[2] as f64 / k[1].max(1) as f64,
                processed: k[3] as f64 / t,
            }
        })
        .collect();
    Ok(Evaluation {
        loss: sum / n,
        causal_loss: routed.then_some(causal_sum / n),
        router: RouterMetric::merge(stats),
        depth,
    })
}

/// The fixed validation batches: the same windows at every evaluation.
fn eval_batches<'a>(
    model: &'a Model,
    data: &'a Dataset,
    train: &'a TrainConfig,
) -> impl Iterator<Item = Result<(Tensor, Tensor)>> + 'a {
    let mut rng = Rng::new(train.seed ^ EVAL_SEED);
    (0..train.eval_batches).map(move |_| {
        data.batch(
            Split::Val,
            &mut rng,
            train.batch_size,
            train.seq_len,
            model.device(),
        )
    })
}

/// Mean validation loss of `model` over `train.eval_batches` fixed batches.
pub fn evaluate(model: &Model, data: &Dataset, train: &TrainConfig) -> Result<f64> {
    // the batches on concurrent threads, summed in order
    let batches = eval_batches(model, data, train).collect::<Result<Vec<_>>>()?;
    let losses = batches
        .par_iter()
        .map(|(x, y)| Ok(model.loss(x, y)?.ce.to_scalar::<f32>()? as f64))
        .collect::<Result<Vec<f64>>>()?;
    Ok(losses.iter().sum::<f64>() / train.eval_batches as f64)
}

/// One shard's mean cross-entropy, router statistics and gradients (per optimizer slot).
type ShardGrads = (f64, Vec<RouterMetric>, Vec<Option<Tensor>>);

/// One shard's forward and backward pass: its cross-entropy, its routers' statistics and
/// the gradient of each slot's parameter (`None` where the loss does not reach it), the
/// loss divided by `scale` (the shards and micro-batches of a step) first.
fn shard_grads(
    model: &Model,
    slots: &[Slot],
    x: &Tensor,
    y: &Tensor,
    opts: crate::model::ForwardOptions,
    scale: f64,
) -> Result<ShardGrads> {
    // the fused feed-forward ops hand their weight gradients to this shard's sink instead
    // of candle's accumulation
    let sink = std::sync::Arc::new(GradSink::default());
    let out = with_grad_sink(&sink, || model.loss_with(x, y, opts))?;
    let ce = out.ce.to_scalar::<f32>()? as f64;
    let stats = out
        .moe
        .iter()
        .map(RouterMetric::from_stats)
        .collect::<Result<Vec<_>>>()?;
    let loss = if scale > 1.0 {
        (out.total / scale)?
    } else {
        out.total
    };
    let store = loss.backward()?;
    let g = slots
        .iter()
        .map(|s| {
            let w = s.var.as_tensor();
            Ok(match (store.get(w).cloned(), sink.take(w)) {
                (Some(a), Some(b)) => Some((a + b)?),
                (a, b) => a.or(b),
            })
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok((ce, stats, g))
}

/// Shards per batch: the most, up to one per thread of the pool, that divide the batch
/// evenly (threads left over still help inside the shards' ops).
fn shard_count(batch_size: usize) -> usize {
    shards_for(batch_size, rayon::current_num_threads())
}

fn shards_for(batch_size: usize, threads: usize) -> usize {
    (1..=threads.min(batch_size))
        .rev()
        .find(|&s| batch_size.is_multiple_of(s))
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    #[test]
    fn shards_divide_the_batch() {
        let cases = [
            (12, 2, 2),
            (12, 16, 12),
            (12, 8, 6),
            (7, 2, 1),
            (1, 2, 1),
            (8, 1, 1),
        ];
        for (batch, threads, want) in cases {
            assert_eq!(
                super::shards_for(batch, threads),
                want,
                "{batch} on {threads}"
            );
        }
    }
}

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

use routelm::report::plot::{line_plot, Series};
use routelm::train::{Event, RunOptions, Trainer};
use routelm::Tokenizer;

/// Train from scratch (or resume). Writes OUT/metrics.jsonl (one JSON object per logged
/// step), OUT/checkpoint/ (model.safetensors, config.json, optimizer.safetensors,
/// state.json; written atomically) and OUT/loss.png at the end.
#[derive(clap::Args)]
pub struct Args {
    /// Preset: a TOML/JSON file with [model] and [train], or an embedded preset name
    /// (demo, shakespeare-cpu, train-small).
    #[arg(long, default_value = "demo")]
    config: String,
    /// Text file to train on; default: the embedded synthetic corpus.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Run folder.
    #[arg(long, default_value = "runs/latest")]
    out: PathBuf,
    /// Continue the run saved in this folder exactly where it stopped (on the same data,
    /// which is remembered; --steps can extend it).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Override the preset's number of steps.
    #[arg(long, value_parser = super::positive)]
    steps: Option<usize>,
    /// Override the preset's seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Matrix-product precision: f32, or bf16 (mixed: the projections' products forward and
    /// backward with bf16 operands and f32 sums, on CPUs with AVX512-BF16; parameters,
    /// gradients and optimizer state stay f32). Overrides the preset's `precision`.
    #[arg(long)]
    precision: Option<routelm::train::Precision>,
    /// Stop after this step with a checkpoint, as if interrupted (for testing resume).
    #[arg(long, value_parser = super::positive)]
    stop_after: Option<usize>,
    /// Fine-tune: start from the weights in this folder (a Hugging Face checkpoint of a
    /// supported family, or a routelm checkpoint); the model section of --config is ignored,
    /// its [train] recipe is used. DIR/tokenizer.json is used when present. From a Hugging
    /// Face folder, the result is also written in its layout to OUT/hf.
    #[arg(long, conflicts_with = "resume")]
    init: Option<PathBuf>,
    /// With --init: turn the model's dense feed-forward blocks into Mixture-of-Experts
    /// layers whose experts start as copies of them (sparse upcycling), e.g.
    /// `n_experts=8,top_k=2`; also `every=N` (every N-th layer from the first; default 1)
    /// and `aux=C` (load-balancing loss, default 0.01). The router starts random; the
    /// chosen experts' weights are renormalised, so the model's outputs at step 0 are the
    /// dense model's. The result is a routelm checkpoint.
    #[arg(long, requires = "init")]
    upcycle: Option<routelm::model::upcycle::Upcycle>,
    /// With --init: train low-rank adapters (LoRA) on the chosen projections while the
    /// loaded weights stay frozen (no gradients, no optimizer state for them), e.g.
    /// `r=16,alpha=32,targets=q,k,v,o,gate,up,down` (targets: q k v o gate up down, or
    /// module names; default r=8, alpha=2r, targets q,v). OUT/adapter is written as a PEFT
    /// adapter folder that transformers + peft load; `generate --lora OUT/adapter`
    /// applies it to the same base.
    #[arg(long, requires = "init", conflicts_with = "upcycle")]
    lora: Option<routelm::config::LoraConfig>,
    /// With --init: make the model a Mixture-of-Depths model (a depth retrofit): routers on
    /// chosen blocks pick the tokens each block processes; the others skip it, which
    /// sampling turns into skipped compute. `capacity=0.5` (share of tokens processed),
    /// `every=2` (blocks 1, 3, 5, …) or `layers=3:5:7`, `predictor=H` (a small causal
    /// predictor; default 0: the router's sign decides), `aux=C` (its loss weight, default
    /// 0.1). Processed tokens keep the block's full update, so at capacity 1 the model is
    /// the dense one. Only the routers train unless --lora (routers and adapters) or
    /// --full (everything).
    #[arg(long, requires = "init", conflicts_with = "upcycle")]
    retrofit: Option<routelm::model::retrofit::Retrofit>,
    /// With --retrofit: train every parameter, not only the routers.
    #[arg(long, requires = "retrofit")]
    full: bool,
    /// With --lora (or resuming a LoRA run): also write the adapters folded into the base
    /// weights to OUT/merged, in the base's layout (a Hugging Face folder's family layout;
    /// a routelm checkpoint otherwise).
    #[arg(long)]
    merge: bool,
    /// A tokenizer.json to tokenize the data with (default: bytes, 256 ids). It is copied
    /// into the checkpoint so that generate and eval use it too.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    let device = super::device();
    let tok_path = tokenizer_path(&a)?;
    // a GGUF file carries its tokenizer: it is written into the checkpoint as a
    // tokenizer.json
    let gguf_init = a
        .init
        .as_ref()
        .filter(|d| tok_path.is_none() && routelm::arch::is_gguf(d));
    let tok = match (&tok_path, gguf_init) {
        (Some(p), _) => Tokenizer::from_file(p)?,
        (None, Some(f)) => Tokenizer::from_gguf(f)?,
        (None, None) => Tokenizer::Bytes,
    };
    let mut trainer = match &a.resume {
        Some(dir) => Trainer::resume(dir, &device)?,
        None => fresh_trainer(&a, &tok, &device)?,
    };
    let out = a.resume.clone().unwrap_or(a.out.clone());
    if let (Some(_), Some(s)) = (&a.resume, a.steps) {
        trainer.config.steps = s; // extend a finished run; the schedule keeps its decay_steps
    }
    if a.data.is_some() || a.resume.is_none() {
        trainer.data_source = a.data.clone();
    }
    if let Some(dir) = &a.init {
        // a published checkpoint (not a routelm one) gets its layout written back; adapters
        // are written for their base, whatever its format
        let published =
            !routelm::arch::is_gguf(dir) && routelm::arch::load_config(dir)?.0.is_some();
        let changed = a.upcycle.is_some() || a.retrofit.is_some();
        if (published && !changed) || a.lora.is_some() {
            trainer.init_source = Some(std::fs::canonicalize(dir).unwrap_or(dir.clone()));
        }
    }
    if a.merge && trainer.model.config.lora.is_none() {
        bail!(
            "--merge folds LoRA adapters into the base weights: give --lora (or resume a LoRA run)"
        );
    }
    let tokens = super::load_tokens(trainer.data_source.as_deref(), &tok, trainer.config.seed)?;
    let data = super::dataset(tokens, trainer.config.val_fraction, trainer.config.seq_len)?;
    if a.resume.is_some() {
        trainer.check_data(&out, &data)?;
    }
    let cfg = &trainer.model.config;
    let ledger = routelm::FlopLedger::new(cfg, trainer.config.seq_len);
    eprintln!(
        "model: {} layers, d_model {}, {} heads, {:.2}M parameters; {} train / {} val tokens; {:.1} MFLOP/token (train)",
        cfg.n_layers,
        cfg.d_model,
        cfg.n_heads,
        ledger.total_params as f64 / 1e6,
        data.train.len(),
        data.val.len(),
        ledger.train_per_token() / 1e6
    );
    let (trained, all) = trainer.param_counts();
    if trained < all {
        eprintln!(
            "training {} of {} parameters ({:.3}%): what was added (adapters, depth routers); the base weights are frozen",
            trained,
            all,
            100.0 * trained as f64 / all as f64
        );
    }
    if trainer.model.bf16_matmul() {
        eprintln!("mixed precision: linear products with bf16 operands and f32 sums");
    }
    let summary = run_with_progress(&mut trainer, &data, &out, a.stop_after)?;
    if let Some(p) = &tok_path {
        let dst = routelm::train::checkpoint::checkpoint_dir(&out).join("tokenizer.json");
        if p != &dst {
            std::fs::copy(p, &dst)
                .with_context(|| format!("copying {} into the checkpoint", p.display()))?;
        }
    }
    if gguf_init.is_some() {
        let dst = routelm::train::checkpoint::checkpoint_dir(&out).join("tokenizer.json");
        tok.save(&dst)?;
    }
    write_outputs(&trainer, &out, a.stop_after.is_none(), a.merge)?;
    eprintln!(
        "done: step {}  val loss {:.4}  wall {:.1}s  {:.1} ms/step  -> {}",
        summary.steps,
        summary.final_val_loss,
        summary.wall_s,
        summary.mean_step_ms,
        out.display()
    );
    Ok(())
}

/// The tokenizer to use: `--tokenizer`, else the resumed run's, else the one beside the
/// `--init` weights; `None`: bytes.
fn tokenizer_path(a: &Args) -> Result<Option<PathBuf>> {
    Ok(match (&a.tokenizer, &a.resume) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(dir)) => {
            let p = routelm::train::checkpoint::find_checkpoint(dir)?.join("tokenizer.json");
            p.exists().then_some(p)
        }
        (None, None) => a
            .init
            .as_ref()
            .map(|d| d.join("tokenizer.json"))
            .filter(|p| p.exists()),
    })
}

/// A new run: the preset with the command line's overrides, from random weights or from
/// the `--init` folder's (its context window bounds the sequence length).
fn fresh_trainer(a: &Args, tok: &Tokenizer, device: &candle_core::Device) -> Result<Trainer> {
    let mut preset = super::load_preset(&a.config)?;
    if let Some(s) = a.steps {
        preset.train.steps = Some(s);
    }
    if let Some(s) = a.seed {
        preset.train.seed = Some(s);
    }
    if let Some(p) = a.precision {
        preset.train.precision = Some(p);
    }
    let (model, init) = match &a.init {
        Some(dir) => {
            let (family, cfg, params) =
                routelm::arch::load_params(dir, candle_core::DType::F32, device)?;
            eprintln!(
                "fine-tuning {} ({})",
                dir.display(),
                family.unwrap_or("routelm")
            );
            match &a.upcycle {
                Some(u) => {
                    let seed = preset.train.seed.unwrap_or(0);
                    let (cfg, params) = routelm::model::upcycle::upcycle(&cfg, params, u, seed)?;
                    eprintln!(
                        "upcycled: {} of {} layers now have {} experts (top {}), each a copy of the dense block",
                        cfg.moe_layers().count(),
                        cfg.n_layers,
                        u.n_experts,
                        u.top_k
                    );
                    (cfg, Some(params))
                }
                None => {
                    let seed = preset.train.seed.unwrap_or(0);
                    let (cfg, params) = match &a.retrofit {
                        Some(r) => {
                            let (cfg, params) =
                                routelm::model::retrofit::retrofit(&cfg, params, r, seed)?;
                            eprintln!(
                                "depth retrofit: {} of {} blocks routed at capacity {}",
                                cfg.depth_layers().count(),
                                cfg.n_layers,
                                r.capacity
                            );
                            (cfg, params)
                        }
                        None => (cfg, params),
                    };
                    match &a.lora {
                        Some(l) => {
                            let (cfg, params) =
                                routelm::model::lora::attach(&cfg, params, l, seed)?;
                            (cfg, Some(params))
                        }
                        None => (cfg, Some(params)),
                    }
                }
            }
        }
        None => (preset.model.resolve(&a.config)?, None),
    };
    if a.init.is_some() && preset.train.seq_len.is_none_or(|s| s > model.max_seq_len) {
        preset.train.seq_len = Some(
            model
                .max_seq_len
                .min(preset.train.seq_len.unwrap_or(usize::MAX)),
        );
    }
    let mut train = preset.train.resolve(model.max_seq_len, &a.config)?;
    // adapters and a depth retrofit train what they add; the published weights stay
    train.freeze_base = a.lora.is_some() || (a.retrofit.is_some() && !a.full);
    if model.vocab_size < tok.vocab_size() {
        bail!(
            "{}: vocab_size {} is smaller than the tokenizer's {}",
            a.config,
            model.vocab_size,
            tok.vocab_size()
        );
    }
    if let Err(msg) = routelm::model::init::fits_in_memory(&model, 4) {
        bail!("{}: {msg}", a.config);
    }
    Ok(match init {
        Some(params) => Trainer::from_params(&model, &train, params, "init")?,
        None => Trainer::new(&model, &train, device)?,
    })
}

/// Train with a progress bar (loss, validation loss and speed in its message) and a line
/// per evaluation.
fn run_with_progress(
    trainer: &mut Trainer,
    data: &routelm::train::data::Dataset,
    out: &Path,
    stop_after: Option<usize>,
) -> Result<routelm::train::RunSummary> {
    let pb = super::bar(trainer.config.steps as u64, "train");
    pb.set_position(trainer.step as u64);
    let mut last_val = None;
    let mut last_tps = 0f64;
    let summary = trainer.run(
        data,
        &RunOptions {
            out: out.to_path_buf(),
            stop_after,
        },
        &mut |e| match e {
            Event::Tick { step, loss, .. } => {
                pb.set_position(step as u64);
                if step % 10 == 0 {
                    let val = last_val.map_or(String::new(), |v: f64| format!(" val {v:.4}"));
                    pb.set_message(format!("loss {loss:.4}{val} {last_tps:.0} tok/s"));
                }
            }
            Event::Step(m) => {
                last_tps = m.tokens_per_s;
                if let Some(v) = m.val_loss {
                    last_val = Some(v);
                    super::say(
                        &pb,
                        format!(
                        "step {:>6}  train {:.4}  val {:.4}  lr {:.2e}  {:.0} tok/s  {:.1} GFLOP/s",
                        m.step, m.train_loss, v, m.lr, m.tokens_per_s, m.gflops
                    ),
                    );
                }
            }
            Event::Checkpoint(_) => {}
        },
    )?;
    pb.finish_and_clear();
    Ok(summary)
}

/// The run's plots (loss curve, router load), and for a finished fine-tune of published
/// weights the weights in that family's layout.
fn write_outputs(trainer: &Trainer, out: &Path, finished: bool, merge: bool) -> Result<()> {
    let curve = |f: fn(&routelm::train::checkpoint::Metric) -> Option<f64>| -> Vec<(f64, f64)> {
        trainer
            .metrics
            .iter()
            .filter_map(|m| f(m).map(|v| (m.step as f64, v)))
            .collect()
    };
    let plot = out.join("loss.png");
    line_plot(
        &plot,
        "training loss",
        "step",
        "cross-entropy (nats/token)",
        &[
            Series {
                name: "train".into(),
                points: curve(|m| Some(m.train_loss)),
            },
            Series {
                name: "validation".into(),
                points: curve(|m| m.val_loss),
            },
        ],
    )
    .with_context(|| "writing the loss plot")?;
    if super::router_heatmap(out, &trainer.metrics)?.is_some() {
        super::print_router(&trainer.last_router);
    }
    if trainer.model.config.lora.is_some() {
        return write_adapters(trainer, out, finished && merge);
    }
    if let (Some(src), true) = (&trainer.init_source, finished) {
        let dst = out.join("hf");
        routelm::arch::export_dir(src, &dst, &trainer.params()?).with_context(|| {
            format!(
                "writing the fine-tuned weights in {}'s layout",
                src.display()
            )
        })?;
        eprintln!(
            "fine-tuned weights in {}'s layout (loads in routelm and transformers): {}",
            src.display(),
            dst.display()
        );
    }
    Ok(())
}

/// A LoRA run's outputs: OUT/adapter (PEFT's folder, named after the base's modules), and
/// with `merge` the adapters folded into the base weights in OUT/merged.
fn write_adapters(trainer: &Trainer, out: &Path, merge: bool) -> Result<()> {
    let params = trainer.params()?;
    let cfg = &trainer.model.config;
    let base = trainer.init_source.clone();
    let names = match &base {
        Some(src) => routelm::arch::published_modules(src)?,
        None => None,
    };
    let dst = out.join("adapter");
    let base_name = base
        .as_ref()
        .map_or(String::new(), |p| p.display().to_string());
    routelm::model::lora::save_peft(&dst, cfg, &params, &names, &base_name)
        .with_context(|| format!("writing the PEFT adapter to {}", dst.display()))?;
    eprintln!("LoRA adapter (PEFT format): {}", dst.display());
    if !merge {
        return Ok(());
    }
    let (merged_cfg, merged) = routelm::model::lora::merge(cfg, &params)?;
    let dst = out.join("merged");
    // a routed (retrofit) model has no published layout: a routelm checkpoint
    let published = base
        .as_ref()
        .filter(|_| merged_cfg.depth_layers().next().is_none())
        .filter(|src| !routelm::arch::is_gguf(src))
        .filter(|src| routelm::arch::load_config(src).is_ok_and(|(f, _)| f.is_some()));
    match published {
        Some(src) => routelm::arch::export_dir(src, &dst, &merged)
            .with_context(|| format!("writing the merged weights in {}'s layout", src.display()))?,
        None => {
            routelm::weights::save_model_dir(&dst, &merged_cfg, &merged)?;
            let tok = routelm::train::checkpoint::checkpoint_dir(out).join("tokenizer.json");
            if tok.exists() {
                std::fs::copy(&tok, dst.join("tokenizer.json"))
                    .with_context(|| format!("copying {} into {}", tok.display(), dst.display()))?;
            }
        }
    }
    eprintln!("merged weights: {}", dst.display());
    Ok(())
}

use anyhow::{Context, Result};
use candle_core::DType;
use std::path::{Path, PathBuf};
use std::time::Instant;

use routelm::perplexity::HeldOut;
use routelm::report::plot::{line_plot, Series};
use routelm::train::data::Dataset;
use routelm::train::TrainConfig;
use routelm::train::{RunOptions, Trainer};
use routelm::weights::Params;
use routelm::RunFile;
use routelm::{FlopLedger, ModelConfig, Tokenizer};

/// Train several variants (dense, MoE, MoD, …) at the same total training FLOPs and compare
/// them: OUT/report.md (variant, parameters, FLOPs per forward token, final validation
/// loss, training time, sampling speed) and OUT/loss_vs_flops.png, OUT/loss_vs_time.png.
///
/// With --init MODEL: compare a published dense model with its depth retrofits instead,
/// one per capacity and skip kind (each trained by `routelm train --init MODEL --retrofit
/// …` in a child process, OUT/NAME; a rerun reuses finished settings): held-out
/// perplexity on --eval, greedy decoding speed, trainable parameters, training peak memory,
/// in OUT/report.md, OUT/report.json, OUT/quality_speed.png (measured speed) and
/// OUT/quality_flops.png (the ledger's).
#[derive(clap::Args)]
pub struct Args {
    /// Variants: preset names or files, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "train-small,moe,mod")]
    variants: Vec<String>,
    /// Text file; default: the embedded corpus.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Training FLOPs per variant (from the ledger); default: `--base-steps` steps of the
    /// first variant.
    #[arg(long)]
    budget_flops: Option<f64>,
    #[arg(long, default_value_t = 200)]
    base_steps: usize,
    /// Evaluations per variant.
    #[arg(long, default_value_t = 8)]
    evals: usize,
    #[arg(long, default_value = "runs/compare")]
    out: PathBuf,
    /// Train each variant with this many seeds (the preset's seed, +1, +2, …) and add a
    /// table of each variant's mean and spread.
    #[arg(long, default_value_t = 1, value_parser = super::positive)]
    seeds: usize,
    /// Leave out the first K of those seeds, to split a long sweep across machines or
    /// sessions; every row is still scored on the first seed's validation windows, so the
    /// parts compare.
    #[arg(long, default_value_t = 0)]
    skip_seeds: usize,
    /// Compare depth retrofits of this model (Hugging Face folder, routelm checkpoint or
    /// GGUF file) with the model itself; --data is the training text, --eval the held-out
    /// text.
    #[arg(
        long,
        help_heading = INIT
    )]
    init: Option<PathBuf>,
    /// With --init: the held-out text for perplexity and the decoding prompt.
    #[arg(
        long,
        help_heading = INIT
    )]
    eval: Option<PathBuf>,
    /// With --init: the capacities (share of tokens a routed block processes).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0.125,0.25,0.5,0.75",
        help_heading = INIT
    )]
    capacities: Vec<f64>,
    /// With --init: what a passed-over token skips: block, attention, mlp.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "block,attention,mlp",
        help_heading = INIT
    )]
    skips: Vec<String>,
    /// With --init: the retrofit keys every setting shares (see `train --retrofit`).
    #[arg(
        long,
        default_value = "every=2",
        help_heading = INIT
    )]
    retrofit: String,
    /// With --init: train LoRA adapters beside the routers (see `train --lora`).
    #[arg(
        long,
        help_heading = INIT
    )]
    lora: Option<String>,
    /// With --init: train every weight, not only the routers.
    #[arg(
        long,
        help_heading = INIT
    )]
    full: bool,
    /// With --init: the training recipe (a preset with [train]; default: `retrofit`, or
    /// `fine-tune` with --upcycle).
    #[arg(
        long,
        help_heading = INIT
    )]
    config: Option<String>,
    /// With --init: instead of depth retrofits, compare the model upcycled to experts
    /// (`n_experts=8,top_k=2`, see `train --upcycle`) with the dense model trained on,
    /// both from its weights at equal training FLOPs (--base-steps steps of the dense
    /// model, or --budget-flops): validation curves against FLOPs, and perplexity on --eval
    /// before and after.
    #[arg(
        long,
        help_heading = INIT
    )]
    upcycle: Option<routelm::model::upcycle::Upcycle>,
    /// With --init: tokens per perplexity chunk.
    #[arg(long, default_value_t = 512, value_parser = super::positive, help_heading = INIT)]
    ctx: usize,
    /// With --init: at most this many perplexity chunks (default: all the text holds).
    #[arg(long, value_parser = super::positive, help_heading = INIT)]
    chunks: Option<usize>,
    /// With --init: tokens decoded per speed measurement.
    #[arg(long, default_value_t = 128, value_parser = super::positive, help_heading = INIT)]
    decode_tokens: usize,
    /// With --init: speed rounds over all models (each model's best is reported).
    #[arg(long, default_value_t = 3, value_parser = super::positive, help_heading = INIT)]
    rounds: usize,
}

const INIT: &str = "A published model: retrofits, upcycling (--init)";

/// One variant's results.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct Row {
    pub name: String,
    pub total_params: usize,
    pub active_params: usize,
    pub forward_flops: f64,
    pub steps: usize,
    pub final_val: f64,
    pub wall_s: f64,
    pub sample_tps: f64,
    /// (training FLOPs so far, seconds, validation loss) at each evaluation.
    pub curve: Vec<(f64, f64, f64)>,
    /// Routed blocks: validation loss with the causal decisions sampling uses.
    pub causal_val: Option<f64>,
    /// Routed blocks, averaged: the causal decider's accuracy at predicting top-k, the
    /// always-skip baseline's, and the recall of top-k tokens.
    pub decider: Option<(f64, f64, f64)>,
    /// MoE: the busiest expert's load over the mean, worst layer.
    pub max_load: Option<f64>,
    /// Perplexity on the held-out text, when one was given.
    pub heldout_ppl: Option<f64>,
    /// Seed of the validation windows `final_val`, `causal_val`, `decider` and `max_load`
    /// were measured on: the same for every row of a comparison (the first variant's seed),
    /// so that rows trained with different seeds are scored on the same text.
    #[serde(default)]
    pub scored_seed: Option<u64>,
}

/// The final scores of a trained model on the validation windows drawn with `seed`.
struct Scores {
    final_val: f64,
    causal_val: Option<f64>,
    decider: Option<(f64, f64, f64)>,
    max_load: Option<f64>,
}

fn score(
    model: &routelm::model::Model,
    data: &Dataset,
    train: &TrainConfig,
    seed: u64,
) -> Result<Scores> {
    let windows = TrainConfig {
        seed,
        ..train.clone()
    };
    let eval = routelm::train::trainer::evaluate_full(model, data, &windows)?;
    let n = eval.depth.len() as f64;
    let decider = (n > 0.0).then(|| {
        let mean = |f: fn(&routelm::train::trainer::DepthMetric) -> f64| {
            eval.depth.iter().map(f).sum::<f64>() / n
        };
        (
            mean(|d| d.accuracy),
            mean(|d| d.baseline),
            mean(|d| d.recall),
        )
    });
    Ok(Scores {
        final_val: eval.loss,
        causal_val: eval.causal_loss,
        decider,
        max_load: eval.router.iter().map(|r| r.max_over_mean).reduce(f64::max),
    })
}

impl Row {
    fn set_scores(&mut self, s: Scores, seed: u64) {
        self.final_val = s.final_val;
        self.causal_val = s.causal_val;
        self.decider = s.decider;
        self.max_load = s.max_load;
        self.scored_seed = Some(seed);
    }
}

/// One model to train in a comparison: its configuration, recipe, and starting weights
/// (`None`: random).
#[derive(Clone)]
pub struct Variant {
    pub name: String,
    pub cfg: ModelConfig,
    pub train: TrainConfig,
    pub init: Option<Params>,
}

impl Variant {
    /// A preset's model and recipe, from random weights.
    pub fn from_preset(name: &str, preset: &RunFile) -> Result<Self> {
        let cfg = preset.model.resolve(name)?;
        let train = preset.train.resolve(cfg.max_seq_len, name)?;
        Ok(Variant {
            name: name.to_string(),
            cfg,
            train,
            init: None,
        })
    }
}

/// Train each variant for `budget` training FLOPs on `data`; runs go to `out/NAME`. Every
/// row is scored on the validation windows drawn with `seed`.
pub fn compare(
    variants: Vec<Variant>,
    data: &Dataset,
    budget: f64,
    evals: usize,
    out: &Path,
    heldout: Option<&HeldOut>,
    seed: u64,
) -> Result<Vec<Row>> {
    let sweep = Sweep {
        data,
        budget,
        evals,
        heldout,
        seed,
    };
    let mut rows = Vec::new();
    for v in variants {
        let dir = out.join(v.name.replace(['/', '.'], "_"));
        // a variant this comparison already trained (same model, recipe and budget) is
        // read back, so that a long sweep continues where it stopped
        let key = serde_json::to_string(&(&v.cfg, &v.train, budget, v.init.is_some()))?;
        let record = dir.join("row.json");
        let row = match sweep.reused(&v, &dir, &key)? {
            Some(row) => row,
            None => {
                let row = sweep.train(v, &dir)?;
                std::fs::write(&record, serde_json::to_string(&(&key, &row))?)
                    .with_context(|| format!("writing {}", record.display()))?;
                row
            }
        };
        rows.push(row);
    }
    Ok(rows)
}

/// What every variant of a comparison shares: the data, the budget, how often to evaluate,
/// the held-out text and the validation windows' seed.
struct Sweep<'a> {
    data: &'a Dataset,
    budget: f64,
    evals: usize,
    heldout: Option<&'a HeldOut>,
    seed: u64,
}

impl Sweep<'_> {
    /// The row `dir` holds for this variant (the same `key`: model, recipe and budget),
    /// scored again when it was scored on other windows.
    fn reused(&self, v: &Variant, dir: &Path, key: &str) -> Result<Option<Row>> {
        let record = dir.join("row.json");
        let Some(mut row) = std::fs::read_to_string(&record)
            .ok()
            .and_then(|t| serde_json::from_str::<(String, Row)>(&t).ok())
            .filter(|(k, _)| k == key)
            .map(|(_, r)| r)
        else {
            return Ok(None);
        };
        eprintln!("{}: reusing {}", v.name, dir.display());
        if row.scored_seed != Some(self.seed) {
            // scored on other windows: score the saved model again on this comparison's
            let saved = dir.join("checkpoint");
            let model = routelm::arch::load_dir(&saved, DType::F32, &super::device())
                .with_context(|| format!("scoring {} again", saved.display()))?
                .model;
            row.set_scores(score(&model, self.data, &v.train, self.seed)?, self.seed);
            std::fs::write(&record, serde_json::to_string(&(key, &row))?)
                .with_context(|| format!("writing {}", record.display()))?;
        }
        Ok(Some(row))
    }

    /// Train variant `v` for the budget into `dir` and score it.
    fn train(&self, v: Variant, dir: &Path) -> Result<Row> {
        let Variant {
            name,
            cfg,
            mut train,
            init,
        } = v;
        let ledger = FlopLedger::new(&cfg, train.seq_len);
        let tokens_per_step = (train.batch_size * train.seq_len * train.grad_accum) as f64;
        let flops_per_step = ledger.train_per_token() * tokens_per_step;
        let steps = ((self.budget / flops_per_step).round() as usize).max(1);
        train.steps = steps;
        train.decay_steps = steps;
        train.warmup_steps = train.warmup_steps.min(steps / 10);
        train.eval_every = (steps / self.evals.max(1)).max(1);
        train.log_every = train.eval_every;
        let mut trainer = match init {
            Some(params) => Trainer::from_params(&cfg, &train, params, "init")?,
            None => Trainer::new(&cfg, &train, &super::device())?,
        };
        let pb = super::bar(steps as u64, &format!("{name:>12}"));
        let started = Instant::now();
        let summary = trainer.run(
            self.data,
            &RunOptions {
                out: dir.to_path_buf(),
                stop_after: None,
            },
            &mut |e| {
                if let routelm::train::Event::Tick { step, loss, .. } = e {
                    pb.set_position(step as u64);
                    pb.set_message(format!("loss {loss:.3}"));
                }
            },
        )?;
        pb.finish_and_clear();
        let wall_s = started.elapsed().as_secs_f64();
        let curve = trainer
            .metrics
            .iter()
            .filter_map(|m| {
                m.val_loss
                    .map(|v| (m.step as f64 * flops_per_step, m.elapsed_s, v))
            })
            .collect();
        let sample_tps = super::bench::decode_speed(&trainer.model, 64)?;
        let heldout_ppl = self
            .heldout
            .map(|h| h.score(&trainer.model, &mut |_| {}).map(|r| r.value()))
            .transpose()?;
        let mut row = Row {
            name,
            total_params: ledger.total_params,
            active_params: ledger.active_params,
            forward_flops: ledger.forward_per_token(),
            steps,
            final_val: summary.final_val_loss,
            wall_s,
            sample_tps,
            curve,
            causal_val: None,
            decider: None,
            max_load: None,
            heldout_ppl,
            scored_seed: None,
        };
        row.set_scores(
            score(&trainer.model, self.data, &train, self.seed)?,
            self.seed,
        );
        Ok(row)
    }
}

/// Each variant over its seeds (rows named `NAME@seedS`, grouped by `NAME` in the order
/// they first appear): the final validation loss (and the causal one) as mean ± sample
/// standard deviation, with the lowest and highest.
fn seed_table(rows: &[Row], seeds: usize) -> String {
    let stats = |v: &[f64]| {
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let sd = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0)).sqrt();
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, f64::MIN), |(l, h), &x| (l.min(x), h.max(x)));
        format!("{mean:.4} ± {sd:.4} ({lo:.4}–{hi:.4})")
    };
    let mut s = format!(
        "\nOver {seeds} seeds (mean ± standard deviation, lowest–highest):\n\n| variant | final val loss | val loss, causal decisions |\n|---|---|---|\n"
    );
    let base = |r: &Row| r.name.split('@').next().unwrap_or_default().to_string();
    let mut names: Vec<String> = Vec::new();
    for r in rows {
        if !names.contains(&base(r)) {
            names.push(base(r));
        }
    }
    for name in names {
        let group: Vec<&Row> = rows.iter().filter(|r| base(r) == name).collect();
        let finals: Vec<f64> = group.iter().map(|r| r.final_val).collect();
        let causal: Vec<f64> = group.iter().filter_map(|r| r.causal_val).collect();
        s.push_str(&format!(
            "| {name} | {} | {} |\n",
            stats(&finals),
            if causal.len() == group.len() {
                stats(&causal)
            } else {
                "–".into()
            }
        ));
    }
    s
}

/// Training FLOPs of `steps` steps of `v` (from the ledger).
pub fn budget_of(v: &Variant, steps: usize) -> f64 {
    let t = &v.train;
    FlopLedger::new(&v.cfg, t.seq_len).train_per_token()
        * (t.batch_size * t.seq_len * t.grad_accum * steps) as f64
}

/// The Markdown table of a comparison.
pub fn table(rows: &[Row], budget: f64) -> String {
    let mut s =
        format!("Training budget: {budget:.3e} FLOPs per variant (from the FLOP ledger).\n\n");
    let held = rows.iter().any(|r| r.heldout_ppl.is_some());
    s.push_str("| variant | params (total / active) | FLOPs per forward token | steps | final val loss | val loss, causal decisions | decider accuracy (always-skip) / recall | busiest expert / mean | train time (s) | sampling tok/s |");
    s.push_str(if held {
        " held-out perplexity |\n"
    } else {
        "\n"
    });
    s.push_str("|---|---|---|---|---|---|---|---|---|---|");
    s.push_str(if held { "---|\n" } else { "\n" });
    let dash = || "–".to_string();
    for r in rows {
        s.push_str(&format!(
            "| {} | {:.2}M / {:.2}M | {:.2}M | {} | {:.4} | {} | {} | {} | {:.1} | {:.0} |\n",
            r.name,
            r.total_params as f64 / 1e6,
            r.active_params as f64 / 1e6,
            r.forward_flops / 1e6,
            r.steps,
            r.final_val,
            r.causal_val.map_or_else(dash, |v| format!("{v:.4}")),
            r.decider.map_or_else(dash, |(a, b, rc)| format!(
                "{:.1}% ({:.1}%) / {:.1}%",
                100.0 * a,
                100.0 * b,
                100.0 * rc
            )),
            r.max_load.map_or_else(dash, |m| format!("{m:.2}")),
            r.wall_s,
            r.sample_tps
        ));
        if held {
            s.pop();
            s.push_str(&format!(
                " {} |\n",
                r.heldout_ppl.map_or_else(dash, |p| format!("{p:.3}"))
            ));
        }
    }
    s.push_str("\nFinal val loss: every row on the same validation windows (drawn with the first variant's seed). It routes Mixture-of-Depths blocks by top-k over each sequence, as in training; the causal column decides each token by itself (the predictor, or the router's sign), as sampling does.\n");
    s
}

/// Write report.md and the two plots.
pub fn write_report(rows: &[Row], budget: f64, out: &Path) -> Result<String> {
    std::fs::create_dir_all(out)?;
    let md = table(rows, budget);
    std::fs::write(out.join("report.md"), &md)
        .with_context(|| format!("writing {}", out.join("report.md").display()))?;
    let series = |x: fn(&(f64, f64, f64)) -> f64| -> Vec<Series> {
        rows.iter()
            .map(|r| Series {
                name: r.name.clone(),
                points: r.curve.iter().map(|p| (x(p), p.2)).collect(),
            })
            .collect()
    };
    line_plot(
        &out.join("loss_vs_flops.png"),
        "validation loss at equal training FLOPs",
        "training FLOPs",
        "validation loss",
        &series(|p| p.0),
    )?;
    line_plot(
        &out.join("loss_vs_time.png"),
        "validation loss against wall time",
        "seconds",
        "validation loss",
        &series(|p| p.1),
    )?;
    Ok(md)
}

pub fn run(a: Args) -> Result<()> {
    if let Some(init) = a.init {
        let (Some(data), Some(eval)) = (a.data, a.eval) else {
            anyhow::bail!(
                "compare --init compares depth retrofits: give --data (the training text) and --eval (the held-out text)"
            );
        };
        if let Some(u) = a.upcycle {
            let config = a.config.unwrap_or_else(|| "fine-tune".into());
            let held = Upcycled {
                init,
                upcycle: u,
                config,
                data,
                eval,
                ctx: a.ctx,
                chunks: a.chunks,
                base_steps: a.base_steps,
                budget_flops: a.budget_flops,
                evals: a.evals,
                out: a.out,
            };
            return upcycled(held);
        }
        return super::compare_retrofit::run(super::compare_retrofit::Grid {
            init,
            capacities: a.capacities,
            skips: a.skips,
            retrofit: a.retrofit,
            lora: a.lora,
            full: a.full,
            config: a.config.unwrap_or_else(|| "retrofit".into()),
            data,
            eval,
            ctx: a.ctx,
            chunks: a.chunks,
            decode_tokens: a.decode_tokens,
            rounds: a.rounds,
            out: a.out,
        });
    }
    let presets: Vec<Variant> = a
        .variants
        .iter()
        .map(|v| Variant::from_preset(v, &super::load_preset(v)?))
        .collect::<Result<_>>()?;
    anyhow::ensure!(
        a.skip_seeds < a.seeds,
        "--skip-seeds {} leaves none of --seeds {}",
        a.skip_seeds,
        a.seeds
    );
    // the first preset's own seed draws the validation windows, skipped or not
    let windows = presets.first().context("no variants")?.train.seed;
    let variants: Vec<Variant> = match a.seeds {
        1 => presets,
        // seed by seed, so that a sweep cut short still compares every variant
        n => (a.skip_seeds as u64..n as u64)
            .flat_map(|s| {
                presets.iter().map(move |v| {
                    let mut v = v.clone();
                    v.train.seed += s;
                    v.name = format!("{}@seed{}", v.name, v.train.seed);
                    v
                })
            })
            .collect(),
    };
    let first = variants.first().context("no variants")?;
    let budget = a
        .budget_flops
        .unwrap_or_else(|| budget_of(first, a.base_steps));
    let tok = Tokenizer::Bytes;
    let tokens = super::load_tokens(a.data.as_deref(), &tok, windows)?;
    let seq_len = variants
        .iter()
        .map(|v| v.train.seq_len)
        .max()
        .unwrap_or(256);
    let data = super::dataset(tokens, first.train.val_fraction, seq_len)?;
    let rows = compare(variants, &data, budget, a.evals, &a.out, None, windows)?;
    let mut md = write_report(&rows, budget, &a.out)?;
    if a.seeds - a.skip_seeds > 1 {
        md.push_str(&seed_table(&rows, a.seeds - a.skip_seeds));
        std::fs::write(a.out.join("report.md"), &md)
            .with_context(|| format!("writing {}", a.out.join("report.md").display()))?;
    }
    println!("{md}");
    println!("report: {}", a.out.join("report.md").display());
    Ok(())
}

/// What `compare --init M --upcycle …` was asked for.
struct Upcycled {
    init: PathBuf,
    upcycle: routelm::model::upcycle::Upcycle,
    config: String,
    data: PathBuf,
    eval: PathBuf,
    ctx: usize,
    chunks: Option<usize>,
    base_steps: usize,
    budget_flops: Option<f64>,
    evals: usize,
    out: PathBuf,
}

/// The published model trained on as it is and upcycled to experts, from the same weights
/// at the same training FLOPs, both scored on the held-out text.
fn upcycled(u: Upcycled) -> Result<()> {
    let device = super::device();
    let (family, cfg, params) =
        routelm::arch::load_params(&u.init, candle_core::DType::F32, &device)?;
    let tok = Tokenizer::for_model_dir(&u.init)?;
    let mut preset = super::load_preset(&u.config)?;
    // the model's context window bounds the sequence length
    if preset.train.seq_len.is_none_or(|s| s > cfg.max_seq_len) {
        preset.train.seq_len = Some(
            cfg.max_seq_len
                .min(preset.train.seq_len.unwrap_or(usize::MAX)),
        );
    }
    let train = preset.train.resolve(cfg.max_seq_len, &u.config)?;
    let held = HeldOut::read(&u.eval, &tok, u.ctx, u.chunks)?;
    let start = held
        .score(
            &routelm::model::Model::new(&cfg, &params, "init")?,
            &mut |_| {},
        )?
        .value();
    eprintln!(
        "{} ({}): held-out perplexity {start:.3} before training",
        u.init.display(),
        family.unwrap_or("routelm")
    );
    let (ucfg, uparams) =
        routelm::model::upcycle::upcycle(&cfg, params.clone(), &u.upcycle, train.seed)?;
    let variants = vec![
        Variant {
            name: "dense".into(),
            cfg,
            train: train.clone(),
            init: Some(params),
        },
        Variant {
            name: format!("upcycled-{}x{}", u.upcycle.n_experts, u.upcycle.top_k),
            cfg: ucfg,
            train: train.clone(),
            init: Some(uparams),
        },
    ];
    let budget = u
        .budget_flops
        .unwrap_or_else(|| budget_of(&variants[0], u.base_steps));
    let tokens = super::load_tokens(Some(&u.data), &tok, train.seed)?;
    let data = super::dataset(tokens, train.val_fraction, train.seq_len)?;
    let rows = compare(
        variants,
        &data,
        budget,
        u.evals,
        &u.out,
        Some(&held),
        train.seed,
    )?;
    let mut md = write_report(&rows, budget, &u.out)?;
    md = format!(
        "`{}` trained on `{}` with `--config {}` from its weights, dense and upcycled (`n_experts={},top_k={},every={},aux={}`); held-out perplexity on `{}` ({} chunks of {} tokens) was {start:.3} before training.\n\n{md}",
        u.init.display(),
        u.data.display(),
        u.config,
        u.upcycle.n_experts,
        u.upcycle.top_k,
        u.upcycle.every,
        u.upcycle.aux_loss_coef,
        u.eval.display(),
        u.chunks.map_or("all".to_string(), |c| c.to_string()),
        u.ctx,
    );
    std::fs::write(u.out.join("report.md"), &md)
        .with_context(|| format!("writing {}", u.out.join("report.md").display()))?;
    println!("{md}");
    println!("report: {}", u.out.join("report.md").display());
    Ok(())
}

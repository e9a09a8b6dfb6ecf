use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;

use routelm::report::plot::{line_plot, Series};
use routelm::train::data::Dataset;
use routelm::train::{RunOptions, Trainer};
use routelm::RunFile;
use routelm::{FlopLedger, Tokenizer};

/// Train several variants (dense, MoE, MoD, …) at the same total training FLOPs and compare
/// them: OUT/report.md (variant, parameters, FLOPs per forward token, final validation
/// loss, training time, sampling speed) and OUT/loss_vs_flops.png, OUT/loss_vs_time.png.
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
}

/// One variant's results.
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
}

/// Train each `(name, preset)` for `budget` training FLOPs on `data`; runs go to `out/NAME`.
pub fn compare(
    variants: &[(String, RunFile)],
    data: &Dataset,
    budget: f64,
    evals: usize,
    out: &Path,
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (name, preset) in variants {
        let cfg = preset.model.resolve(name)?;
        let mut train = preset.train.resolve(cfg.max_seq_len, name)?;
        let ledger = FlopLedger::new(&cfg, train.seq_len);
        let tokens_per_step = (train.batch_size * train.seq_len * train.grad_accum) as f64;
        let flops_per_step = ledger.train_per_token() * tokens_per_step;
        let steps = ((budget / flops_per_step).round() as usize).max(1);
        train.steps = steps;
        train.decay_steps = steps;
        train.warmup_steps = train.warmup_steps.min(steps / 10);
        train.eval_every = (steps / evals.max(1)).max(1);
        train.log_every = train.eval_every;
        let mut trainer = Trainer::new(&cfg, &train, &super::device())?;
        let pb = super::bar(steps as u64, &format!("{name:>12}"));
        let dir = out.join(name.replace(['/', '.'], "_"));
        let started = Instant::now();
        let summary = trainer.run(
            data,
            &RunOptions {
                out: dir,
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
        let eval = routelm::train::trainer::evaluate_full(&trainer.model, data, &train)?;
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
        let max_load = eval.router.iter().map(|r| r.max_over_mean).reduce(f64::max);
        rows.push(Row {
            name: name.clone(),
            total_params: ledger.total_params,
            active_params: ledger.active_params,
            forward_flops: ledger.forward_per_token(),
            steps,
            final_val: summary.final_val_loss,
            wall_s,
            sample_tps,
            curve,
            causal_val: eval.causal_loss,
            decider,
            max_load,
        });
    }
    Ok(rows)
}

/// The Markdown table of a comparison.
pub fn table(rows: &[Row], budget: f64) -> String {
    let mut s =
        format!("Training budget: {budget:.3e} FLOPs per variant (from the FLOP ledger).\n\n");
    s.push_str("| variant | params (total / active) | FLOPs per forward token | steps | final val loss | val loss, causal decisions | decider accuracy (always-skip) / recall | busiest expert / mean | train time (s) | sampling tok/s |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
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
    }
    s.push_str("\nFinal val loss routes Mixture-of-Depths blocks by top-k over each sequence, as in training; the causal column decides each token by itself (the predictor, or the router's sign), as sampling does.\n");
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
    let variants: Vec<(String, RunFile)> = a
        .variants
        .iter()
        .map(|v| Ok((v.clone(), super::load_preset(v)?)))
        .collect::<Result<_>>()?;
    let first = variants.first().context("no variants")?;
    let cfg0 = first.1.model.resolve(&first.0)?;
    let train0 = first.1.train.resolve(cfg0.max_seq_len, &first.0)?;
    let seq_len = variants
        .iter()
        .map(|(n, p)| Ok(p.train.resolve(p.model.resolve(n)?.max_seq_len, n)?.seq_len))
        .collect::<Result<Vec<_>>>()?;
    let budget = a.budget_flops.unwrap_or_else(|| {
        FlopLedger::new(&cfg0, train0.seq_len).train_per_token()
            * (train0.batch_size * train0.seq_len * train0.grad_accum * a.base_steps) as f64
    });
    let tok = Tokenizer::Bytes;
    let tokens = super::load_tokens(a.data.as_deref(), &tok, train0.seed)?;
    let data = super::dataset(
        tokens,
        train0.val_fraction,
        seq_len.into_iter().max().unwrap_or(256),
    )?;
    let rows = compare(&variants, &data, budget, a.evals, &a.out)?;
    let md = write_report(&rows, budget, &a.out)?;
    println!("{md}");
    println!("report: {}", a.out.join("report.md").display());
    Ok(())
}

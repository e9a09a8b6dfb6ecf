//! `routelm compare --init MODEL`: a published dense model against its depth retrofits
//! (capacity × what a passed-over token skips), on held-out perplexity, sampling speed,
//! trainable parameters and training memory, with the quality–speed curve.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

use routelm::model::retrofit::Retrofit;
use routelm::report::plot::{line_plot, Series};
use routelm::Tokenizer;

/// What `compare --init` was asked for.
pub struct Grid {
    pub init: PathBuf,
    pub capacities: Vec<f64>,
    pub skips: Vec<String>,
    /// Retrofit keys shared by every setting (`every=2`, `layers=…`, `predictor=…`, …).
    pub retrofit: String,
    pub lora: Option<String>,
    pub full: bool,
    pub config: String,
    pub data: PathBuf,
    pub eval: PathBuf,
    pub ctx: usize,
    pub chunks: Option<usize>,
    pub decode_tokens: usize,
    pub rounds: usize,
    pub out: PathBuf,
}

/// One setting's training, kept in OUT/NAME/train.json so that a rerun reuses it.
#[derive(Serialize, Deserialize)]
struct Trained {
    spec: String,
    wall_s: f64,
    peak_rss_mb: Option<f64>,
}

/// One row of the table.
#[derive(Serialize)]
struct Row {
    name: String,
    skip: Option<String>,
    capacity: Option<f64>,
    trainable: usize,
    params: usize,
    perplexity: f64,
    /// Share of the routed blocks' token visits that ran the block (causal decisions).
    processed: Option<f64>,
    /// Forward FLOPs per token by the ledger, every routed block at the share processed
    /// (at `--ctx` tokens of context): the work a perfect kernel would do.
    ledger_flops: f64,
    decode_tps: f64,
    train_s: Option<f64>,
    peak_rss_mb: Option<f64>,
}

pub fn run(g: Grid) -> Result<()> {
    let settings = settings(&g)?;
    let tok = Tokenizer::for_model_dir(&g.init)?;
    let held = routelm::perplexity::HeldOut::read(&g.eval, &tok, g.ctx, g.chunks)?;
    std::fs::create_dir_all(&g.out).with_context(|| format!("creating {}", g.out.display()))?;
    let mut trained = Vec::new();
    for (i, (name, spec, _)) in settings.iter().enumerate() {
        eprintln!("[{}/{}] retrofit {spec}", i + 1, settings.len());
        trained.push(train(&g, name, spec)?);
    }
    // every model in the same way: held-out perplexity with the causal decisions, then
    // decoding speed in rounds over all models (the best of each), so that a slow moment
    // of the machine does not land on one model alone
    let mut models: Vec<(String, PathBuf)> = vec![("base".into(), g.init.clone())];
    models.extend(
        settings
            .iter()
            .map(|(name, _, _)| (name.clone(), g.out.join(name).join("checkpoint"))),
    );
    let mut rows = Vec::new();
    for (i, (name, dir)) in models.iter().enumerate() {
        let model = load(dir)?;
        let pb = super::bar(held.n_chunks() as u64, &format!("perplexity {name}"));
        let r = held.score(&model, &mut |r| pb.set_position(r.chunks as u64))?;
        pb.finish_and_clear();
        let (trainable, params) = counts(dir, g.full)?;
        let processed = (r.routed.1 > 0).then(|| r.routed.0 as f64 / r.routed.1 as f64);
        let mut cfg = model.config.clone();
        for spec in &mut cfg.layers {
            if let (Some(d), Some(p)) = (&mut spec.depth, processed) {
                d.capacity = p;
            }
        }
        let ledger_flops = routelm::FlopLedger::new(&cfg, g.ctx).forward_per_token();
        let retrofit = i.checked_sub(1).map(|j| &settings[j].2);
        let t = i.checked_sub(1).map(|j| &trained[j]);
        eprintln!("{name}: perplexity {:.4}", r.value());
        rows.push(Row {
            name: name.clone(),
            skip: retrofit.map(|r| skip_name(r).to_string()),
            capacity: retrofit.map(|r| r.capacity),
            trainable,
            params,
            perplexity: r.value(),
            processed,
            ledger_flops,
            decode_tps: 0.0,
            train_s: t.map(|t| t.wall_s),
            peak_rss_mb: t.and_then(|t| t.peak_rss_mb),
        });
    }
    let prompt = &held.tokens[..held.tokens.len().min(32)];
    for round in 0..g.rounds {
        for (row, (name, dir)) in rows.iter_mut().zip(&models) {
            let model = load(dir)?;
            let tps =
                super::bench::decode_passes_after(&model, prompt, g.decode_tokens, 1, || Ok(()))?;
            let best = tps.iter().copied().fold(0f64, f64::max);
            eprintln!("decode round {}: {name} {best:.1} tokens/s", round + 1);
            row.decode_tps = row.decode_tps.max(best);
        }
    }
    let md = table(&g, &rows);
    std::fs::write(g.out.join("report.md"), &md)
        .with_context(|| format!("writing {}", g.out.join("report.md").display()))?;
    std::fs::write(
        g.out.join("report.json"),
        serde_json::to_string_pretty(&rows)?,
    )
    .with_context(|| format!("writing {}", g.out.join("report.json").display()))?;
    plot(&g.out, &rows)?;
    println!("{md}");
    println!(
        "report: {}; plots: quality_speed.png, quality_flops.png beside it",
        g.out.join("report.md").display()
    );
    Ok(())
}

/// Every (capacity, skip) setting as (folder name, retrofit spec, the spec parsed), each
/// checked before anything trains.
fn settings(g: &Grid) -> Result<Vec<(String, String, Retrofit)>> {
    let mut v = Vec::new();
    for skip in &g.skips {
        for &c in &g.capacities {
            let mut spec = format!("capacity={c},skip={skip}");
            if !g.retrofit.is_empty() {
                spec = format!("{spec},{}", g.retrofit);
            }
            let r: Retrofit = spec
                .parse()
                .map_err(|e: String| anyhow::anyhow!("retrofit setting {spec:?}: {e}"))?;
            v.push((format!("{}-c{}", skip_name(&r), c * 100.0), spec, r));
        }
    }
    if v.is_empty() {
        bail!("no settings: give --capacities and --skips");
    }
    Ok(v)
}

fn skip_name(r: &Retrofit) -> &'static str {
    match r.skip {
        routelm::config::DepthSkip::Block => "block",
        routelm::config::DepthSkip::Mlp => "mlp",
        routelm::config::DepthSkip::Attention => "attention",
    }
}

/// Train one setting with `routelm train` in a child process (its own peak memory), or
/// reuse OUT/NAME when it already holds this setting's finished run.
fn train(g: &Grid, name: &str, spec: &str) -> Result<Trained> {
    let dir = g.out.join(name);
    let record = dir.join("train.json");
    if let Ok(text) = std::fs::read_to_string(&record) {
        if let Ok(t) = serde_json::from_str::<Trained>(&text) {
            if t.spec == spec && dir.join("checkpoint").join("config.json").exists() {
                eprintln!("  reusing {}", dir.display());
                return Ok(t);
            }
        }
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let exe = std::env::current_exe().context("finding the routelm executable")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("train")
        .arg("--init")
        .arg(&g.init)
        .args(["--retrofit", spec, "--config", &g.config])
        .arg("--data")
        .arg(&g.data)
        .arg("--out")
        .arg(&dir)
        .env("ROUTELM_NO_PROGRESS", "1");
    if let Some(l) = &g.lora {
        cmd.args(["--lora", l]);
    }
    if g.full {
        cmd.arg("--full");
    }
    let log_path = dir.join("train.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    cmd.stdout(log.try_clone()?).stderr(log);
    let started = Instant::now();
    let child = cmd.spawn().context("starting routelm train")?;
    let (ok, peak_rss_mb) = wait_with_peak(child)?;
    if !ok {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(8).collect();
        bail!(
            "training {name} ({spec}) failed; the end of {}:\n{}",
            log_path.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let t = Trained {
        spec: spec.to_string(),
        wall_s: started.elapsed().as_secs_f64(),
        peak_rss_mb,
    };
    std::fs::write(&record, serde_json::to_string(&t)?)
        .with_context(|| format!("writing {}", record.display()))?;
    eprintln!("  trained in {:.0} s", t.wall_s);
    Ok(t)
}

/// Wait for `child`; whether it succeeded, and its peak resident memory in MB.
#[cfg(unix)]
fn wait_with_peak(child: std::process::Child) -> Result<(bool, Option<f64>)> {
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills; the child is ours and not yet reaped
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if r != pid {
        bail!(
            "waiting for routelm train: {}",
            std::io::Error::last_os_error()
        );
    }
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    // Linux reports kilobytes, macOS bytes
    let scale = if cfg!(target_os = "macos") {
        1e-6
    } else {
        1e-3
    };
    Ok((ok, Some(usage.ru_maxrss as f64 * scale)))
}

#[cfg(not(unix))]
fn wait_with_peak(mut child: std::process::Child) -> Result<(bool, Option<f64>)> {
    Ok((child.wait()?.success(), None))
}

/// The model in `dir` with f32 weights: a GGUF base is dequantized, as `train --init`
/// dequantizes it for the retrofits, so that the base and its retrofits run the same
/// arithmetic.
fn load(dir: &Path) -> Result<routelm::model::Model> {
    let dev = super::device();
    Ok(
        routelm::arch::load_dir_as(dir, None, candle_core::DType::F32, &dev, false)
            .with_context(|| format!("loading {}", dir.display()))?
            .model,
    )
}

/// (trainable, all) parameters of the model in `dir`: what a retrofit added (routers,
/// adapters), or everything when trained in full; the base model trains nothing.
fn counts(dir: &Path, full: bool) -> Result<(usize, usize)> {
    let (_, _, params) =
        routelm::arch::load_params(dir, candle_core::DType::F32, &super::device())?;
    let all: usize = params.values().map(|t| t.elem_count()).sum();
    let added: usize = params
        .iter()
        .filter(|(n, _)| routelm::weights::names::is_added(n))
        .map(|(_, t)| t.elem_count())
        .sum();
    Ok(match (added, full) {
        (0, _) => (0, all),
        (_, true) => (all, all),
        (a, false) => (a, all),
    })
}

fn table(g: &Grid, rows: &[Row]) -> String {
    let base = &rows[0];
    let mut s = format!(
        "Depth retrofits of `{}`: held-out perplexity on `{}` ({} chunks of {} tokens; routed blocks decide each token causally, as sampling does), greedy decoding speed after a 32-token prompt of that text ({} tokens, best of {} rounds over all models), training on `{}` with `--config {}`{}{}.\n\n",
        g.init.display(),
        g.eval.display(),
        g.chunks.map_or("all".to_string(), |c| c.to_string()),
        g.ctx,
        g.decode_tokens,
        g.rounds,
        g.data.display(),
        g.config,
        g.lora.as_ref().map_or(String::new(), |l| format!(", with LoRA `{l}`")),
        if g.full { ", every weight trained" } else { "" },
    );
    s.push_str("| setting | skip | capacity | processed | trainable params | perplexity | vs base | decode tok/s | speed-up | ledger speed-up | train time (s) | training peak RSS (MB) |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    let dash = || "–".to_string();
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.2} | {:+.1}% | {:.1} | {:.2}× | {:.2}× | {} | {} |\n",
            r.name,
            r.skip.clone().unwrap_or_else(dash),
            r.capacity.map_or_else(dash, |c| format!("{}%", c * 100.0)),
            r.processed
                .map_or_else(dash, |p| format!("{:.1}%", 100.0 * p)),
            r.trainable,
            r.perplexity,
            100.0 * (r.perplexity / base.perplexity - 1.0),
            r.decode_tps,
            r.decode_tps / base.decode_tps,
            base.ledger_flops / r.ledger_flops,
            r.train_s.map_or_else(dash, |t| format!("{t:.0}")),
            r.peak_rss_mb.map_or_else(dash, |m| format!("{m:.0}")),
        ));
    }
    s.push_str(&format!("\n`capacity` is the share of tokens a routed block takes in training (top-k over each sequence); `processed` is the share the causal decisions sent through when scoring the held-out text; `ledger speed-up` is the base model's forward FLOPs per token over the retrofit's with every routed block at that share (from the FLOP ledger, at {} tokens of context): the speed-up if time followed FLOPs.\n",
        g.ctx
    ));
    s
}

/// Perplexity against speed-up, measured (OUT/quality_speed.png) and by the ledger
/// (OUT/quality_flops.png): a line per skip kind through its capacities in order, and the
/// base model's point.
fn plot(out: &Path, rows: &[Row]) -> Result<()> {
    let base = &rows[0];
    let mut kinds: Vec<&str> = rows.iter().filter_map(|r| r.skip.as_deref()).collect();
    kinds.dedup();
    let series = |speed: &dyn Fn(&Row) -> f64| -> Vec<Series> {
        let mut v = vec![Series {
            name: "base model".into(),
            points: vec![(1.0, base.perplexity.ln())],
        }];
        for kind in &kinds {
            let mut by_capacity: Vec<&Row> = rows
                .iter()
                .filter(|r| r.skip.as_deref() == Some(*kind))
                .collect();
            by_capacity.sort_by(|a, b| a.capacity.partial_cmp(&b.capacity).unwrap());
            v.push(Series {
                name: format!("skip {kind} (capacity rising)"),
                points: by_capacity
                    .iter()
                    .map(|r| (speed(r), r.perplexity.ln()))
                    .collect(),
            });
        }
        v
    };
    line_plot(
        &out.join("quality_speed.png"),
        "depth retrofit: quality against measured decoding speed",
        "decoding speed-up over the base model (measured)",
        "ln(held-out perplexity)",
        &series(&|r| r.decode_tps / base.decode_tps),
    )?;
    line_plot(
        &out.join("quality_flops.png"),
        "depth retrofit: quality against forward FLOPs (ledger)",
        "base FLOPs per token / retrofit FLOPs per token",
        "ln(held-out perplexity)",
        &series(&|r| base.ledger_flops / r.ledger_flops),
    )?;
    Ok(())
}

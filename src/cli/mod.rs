//! Subcommands, one file each. Shared here: presets, data loading and progress bars.

mod bench;
mod bench_serve;
mod chat;
mod compare;
mod compare_retrofit;
mod demo;
mod eval;
mod flops;
mod generate;
mod inspect;
mod perplexity;
mod quantize;
mod route;
mod serve;
mod tokenize;
mod train;
mod verify;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::Path;

use routelm::train::corpus;
use routelm::train::data::Dataset;
use routelm::RunFile;
use routelm::Tokenizer;

#[derive(Parser)]
#[command(
    name = "routelm",
    version,
    about = "Train and run conditional-computation (MoE, MoD) transformer language models"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model from a preset (TOML/JSON) on a text file or the embedded corpus.
    Train(train::Args),
    /// Generate text from a routelm checkpoint or a Hugging Face folder, streaming to stdout.
    Generate(generate::Args),
    /// Talk to an instruct model in the terminal (its chat template, streamed answers, the
    /// cache kept across turns).
    Chat(chat::Args),
    /// Serve a model with the OpenAI API (continuous batching), metrics and a chat page
    /// that shows the routers at work.
    Serve(serve::Args),
    /// Validation loss of a saved model on a text file.
    Eval(eval::Args),
    /// Perplexity of a text, measured as llama.cpp's llama-perplexity measures it.
    Perplexity(perplexity::Args),
    /// Write a model as a GGUF file, its matrices quantized (q8_0, q4_0, q4_k_m, ...).
    Quantize(quantize::Args),
    /// Print the FLOP ledger (per layer, per token) and parameter counts of a config.
    Flops(flops::Args),
    /// Describe a model folder (routelm or Hugging Face) or preset: family, sizes,
    /// parameters (total and active), MoE layers, memory.
    Inspect(inspect::Args),
    /// The main job on the embedded default: train a small model on the built-in corpus,
    /// show the validation loss falling and print a sample. No download, no files needed.
    Demo(demo::Args),
    /// Measure performance: training throughput against the matmul peak, decoding against
    /// the memory-bandwidth bound, the cost of Mixture-of-Experts.
    Bench(bench::Args),
    /// Compare a checkpoint's outputs with its reference.safetensors (from transformers).
    Verify(verify::Args),
    /// Train variants (dense, MoE, MoD, …) at equal training FLOPs and write a report:
    /// table and loss-vs-FLOPs / loss-vs-time plots.
    Compare(compare::Args),
    /// Show which tokens each Mixture-of-Depths block processes for a text (terminal and PNG).
    Route(route::Args),
    /// Print a text's token ids (and tokens) as the model's tokenizer gives them.
    Tokenize(tokenize::Args),
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(a) => train::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Chat(a) => chat::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Perplexity(a) => perplexity::run(a),
        Command::Quantize(a) => quantize::run(a),
        Command::Flops(a) => flops::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Demo(a) => demo::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Verify(a) => verify::run(a),
        Command::Compare(a) => compare::run(a),
        Command::Route(a) => route::run(a),
        Command::Tokenize(a) => tokenize::run(a),
    }
}

/// Presets shipped in `configs/`, embedded so they work from any folder.
pub const PRESETS: &[(&str, &str)] = &[
    ("demo", include_str!("../../configs/demo.toml")),
    (
        "shakespeare-cpu",
        include_str!("../../configs/shakespeare-cpu.toml"),
    ),
    (
        "train-small",
        include_str!("../../configs/train-small.toml"),
    ),
    ("moe", include_str!("../../configs/moe.toml")),
    ("dense-110m", include_str!("../../configs/dense-110m.toml")),
    ("moe-8x", include_str!("../../configs/moe-8x.toml")),
    ("mod", include_str!("../../configs/mod.toml")),
    ("retrofit", include_str!("../../configs/retrofit.toml")),
    ("fine-tune", include_str!("../../configs/fine-tune.toml")),
];

/// A preset by file path, or by the name of an embedded preset.
pub fn load_preset(spec: &str) -> Result<RunFile> {
    let path = Path::new(spec);
    if path.exists() {
        return Ok(RunFile::from_file(path)?);
    }
    let names: Vec<&str> = PRESETS.iter().map(|p| p.0).collect();
    let text = PRESETS
        .iter()
        .find(|p| p.0 == spec)
        .map(|p| p.1)
        .with_context(|| {
            format!(
                "{spec}: no such file, and not a preset name ({})",
                names.join(", ")
            )
        })?;
    RunFile::parse(text, false).map_err(|e| anyhow::anyhow!("preset {spec}: {e}"))
}

/// Size of the embedded corpus used when no `--data` is given.
pub const CORPUS_BYTES: usize = 1 << 20;

/// Tokens of `data` (or of the embedded corpus).
pub fn load_tokens(data: Option<&Path>, tok: &Tokenizer, corpus_seed: u64) -> Result<Vec<u32>> {
    let text = match data {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
        }
        None => corpus::generate(corpus_seed, CORPUS_BYTES),
    };
    Ok(tok.encode_plain(&text)?)
}

pub fn dataset(tokens: Vec<u32>, val_fraction: f64, seq_len: usize) -> Result<Dataset> {
    Ok(Dataset::split(tokens, val_fraction, seq_len)?)
}

pub fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = if std::env::var_os("ROUTELM_NO_PROGRESS").is_some() {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(len)
    };
    let style = ProgressStyle::with_template(&format!(
        "{what} {{bar:30.cyan/blue}} {{pos}}/{{len}} {{msg}} [{{elapsed_precise}} eta {{eta}}]"
    ))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    pb.set_style(style);
    pb
}

/// A table of what each MoE layer's router did.
pub fn print_router(router: &[routelm::train::checkpoint::RouterMetric]) {
    if router.is_empty() {
        return;
    }
    println!(
        "{:<7} {:>9} {:>9} {:>9} {:>9}  load per expert",
        "layer", "max/mean", "dropped", "entropy", "aux"
    );
    for r in router {
        let load: Vec<String> = r.load.iter().map(|l| l.to_string()).collect();
        println!(
            "{:<7} {:>9.2} {:>8.1}% {:>9.3} {:>9.4}  {}",
            r.layer,
            r.max_over_mean,
            100.0 * r.dropped_fraction,
            r.entropy,
            r.aux_loss,
            load.join(" ")
        );
    }
}

/// Write `OUT/router_load.png`: layers × experts, tokens routed over the logged steps.
pub fn router_heatmap(
    out: &Path,
    metrics: &[routelm::train::checkpoint::Metric],
) -> Result<Option<std::path::PathBuf>> {
    let mut layers: Vec<(usize, Vec<f64>)> = Vec::new();
    for m in metrics {
        for r in &m.router {
            match layers.iter_mut().find(|l| l.0 == r.layer) {
                Some(l) => {
                    l.1.iter_mut()
                        .zip(&r.load)
                        .for_each(|(a, &b)| *a += b as f64)
                }
                None => layers.push((r.layer, r.load.iter().map(|&l| l as f64).collect())),
            }
        }
    }
    if layers.is_empty() {
        return Ok(None);
    }
    let path = out.join("router_load.png");
    let names: Vec<String> = layers.iter().map(|l| format!("layer {}", l.0)).collect();
    let values: Vec<Vec<f64>> = layers.into_iter().map(|l| l.1).collect();
    routelm::report::plot::heatmap(
        &path,
        "tokens routed to each expert",
        "layer",
        "expert",
        &names,
        &values,
    )?;
    Ok(Some(path))
}

/// Print a line above the progress bar (or plainly when the bar is hidden).
pub fn say(pb: &ProgressBar, line: String) {
    if pb.is_hidden() {
        eprintln!("{line}");
    } else {
        pb.println(line);
    }
}

/// `--kv-cache`: the type a decoding cache holds keys and values in.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct KvCacheArg {
    /// Type the KV cache holds keys and values in: compute (the compute dtype, exact) or
    /// f16 (half the memory per cached token and half the bytes each step reads of it, as
    /// llama.cpp's default cache; keys and values are rounded to f16, attention still
    /// computes in f32).
    #[arg(long = "kv-cache", value_enum, default_value_t = KvCacheType::Compute)]
    kv_cache: KvCacheType,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvCacheType {
    Compute,
    F16,
}

impl KvCacheArg {
    /// Set the model's cache type.
    pub fn apply(self, model: &mut routelm::Model) {
        model.set_kv_cache_dtype(match self.kv_cache {
            KvCacheType::Compute => None,
            KvCacheType::F16 => Some(candle_core::DType::F16),
        });
    }
}

/// Sampling options of `generate` and `chat`; a value not given comes from the model's
/// generation_config.json, else the defaults below.
#[derive(clap::Args, Debug, Clone)]
pub struct Sampling {
    /// Sampling temperature; 0 is greedy. Default: generation_config.json's (greedy unless
    /// it sets do_sample), else 0.8.
    #[arg(long, value_parser = non_negative)]
    pub temperature: Option<f64>,
    /// Sample among the k most likely tokens only (0: all). Default: generation_config.json's,
    /// else 0.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling: the smallest set of tokens with this much probability. Default:
    /// generation_config.json's, else 1.0.
    #[arg(long, value_parser = probability)]
    pub top_p: Option<f64>,
    /// Penalty (>1) on tokens already in the text. Default: generation_config.json's, else 1.0.
    #[arg(long, value_parser = positive_f64)]
    pub repetition_penalty: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl Sampling {
    pub fn config(
        &self,
        d: &routelm::arch::GenerationDefaults,
    ) -> routelm::generate::SamplerConfig {
        d.sampler(
            self.temperature,
            self.top_k,
            self.top_p,
            self.repetition_penalty,
        )
    }
}

/// A count that must be at least 1 (steps, tokens, batch sizes…).
pub fn positive(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?} is not a whole number")),
    }
}

/// [`positive`] as u64.
pub fn positive_u64(s: &str) -> std::result::Result<u64, String> {
    positive(s).map(|n| n as u64)
}

pub fn finite(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(format!("{s:?} is not a finite number")),
    }
}

/// A finite number ≥ 0 (a temperature).
pub fn non_negative(s: &str) -> std::result::Result<f64, String> {
    finite(s).and_then(|v| {
        if v >= 0.0 {
            Ok(v)
        } else {
            Err("must be 0 or more".into())
        }
    })
}

/// A finite number > 0 (a penalty).
pub fn positive_f64(s: &str) -> std::result::Result<f64, String> {
    finite(s).and_then(|v| {
        if v > 0.0 {
            Ok(v)
        } else {
            Err("must be above 0".into())
        }
    })
}

/// A probability in (0, 1] (top-p).
pub fn probability(s: &str) -> std::result::Result<f64, String> {
    finite(s).and_then(|v| {
        if v > 0.0 && v <= 1.0 {
            Ok(v)
        } else {
            Err("must be above 0 and at most 1".into())
        }
    })
}

/// A fraction in (0, 1) (a validation share).
pub fn fraction(s: &str) -> std::result::Result<f64, String> {
    finite(s).and_then(|v| {
        if v > 0.0 && v < 1.0 {
            Ok(v)
        } else {
            Err("must be between 0 and 1".into())
        }
    })
}

/// `--dtype` values.
pub fn parse_dtype(s: &str) -> std::result::Result<candle_core::DType, String> {
    match s {
        "f32" => Ok(candle_core::DType::F32),
        "bf16" => Ok(candle_core::DType::BF16),
        "f16" => Ok(candle_core::DType::F16),
        other => Err(format!("unknown dtype '{other}' (f32, bf16, f16)")),
    }
}

/// A model folder as given, or the `checkpoint` folder inside a training run's folder
/// (`routelm eval --model runs/x` as well as `--model runs/x/checkpoint`).
pub(crate) fn model_dir(dir: &std::path::Path) -> std::path::PathBuf {
    let inner = dir.join("checkpoint");
    if !dir.join("config.json").exists() && inner.join("config.json").exists() {
        inner
    } else {
        dir.to_path_buf()
    }
}

/// Run `f`, a load of a model or tokenizer, handing the pages it frees back to the OS
/// at once. `main` keeps freed pages for reuse (compute reallocates the same sizes every
/// step, and handing them back halves a prompt's speed), which would keep what a load
/// builds and drops on its way resident for the whole run: Gemma 3's 262k-token vocabulary
/// takes ~100 MB of intermediate maps (generate's peak 454 -> 351 MB).
pub fn loading<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: sets a process-wide allocator option (an atomic in mimalloc)
    unsafe { libmimalloc_sys::mi_option_set(crate::MI_OPTION_PURGE_DELAY, 0) };
    let out = f();
    // SAFETY: asks the allocator to return its emptied pages (purged at once, as set above)
    unsafe { libmimalloc_sys::mi_collect(true) };
    // SAFETY: as above
    unsafe { libmimalloc_sys::mi_option_set(crate::MI_OPTION_PURGE_DELAY, -1) };
    out
}

/// Say on stderr when a model's chat template is a turn format inferred from its
/// vocabulary (a GGUF file without a template of its own).
pub fn say_inferred_template(cm: &routelm::chat::ChatModel, model: &std::path::Path) {
    if let Some(name) = routelm::chat::template::turn_format(&cm.template.source) {
        eprintln!(
            "{}: no chat template in the file; its vocabulary marks turns as {name}'s: using that format",
            model.display()
        );
    }
}

pub fn device() -> candle_core::Device {
    candle_core::Device::Cpu
}

/// A server (or a client of one) writes to sockets whose peer may hang up at any moment:
/// the write must fail with an error for that connection, not kill the process with
/// SIGPIPE (whose default disposition `main` restores for the commands that print).
fn ignore_broken_pipes() {
    // SAFETY: setting a signal's disposition to "ignore" is async-signal-safe and
    // process-wide; no handler runs
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

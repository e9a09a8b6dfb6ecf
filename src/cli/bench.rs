use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use std::time::Instant;

use routelm::model::{init::init_params, Model};
use routelm::rng::Rng;
use routelm::train::data::Dataset;
use routelm::train::Precision;
use routelm::{FlopLedger, ModelConfig, TrainConfig, Trainer};

/// Performance measurements that print numbers and ratios (`--json` for machines).
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(clap::Subcommand)]
enum What {
    /// Training throughput of the train-small preset (d_model 256, 6 layers, 8 heads,
    /// SwiGLU 704, context 256, batch 8): tokens/s, achieved GFLOP/s from the FLOP ledger,
    /// the machine's f32 matmul peak measured in the same run, and their ratio.
    Train {
        /// Preset to measure instead of train-small.
        #[arg(long, default_value = "train-small")]
        config: String,
        /// Timed steps (after 2 warm-up steps); the median is reported.
        #[arg(long, default_value_t = 8, value_parser = super::positive)]
        steps: usize,
        /// Matrix-product precision: f32, or bf16 (mixed: bf16 operands, f32 sums, on CPUs
        /// with AVX512-BF16). Default: bf16 where the CPU has it, else f32. The peak is the
        /// f32 matmul's either way.
        #[arg(long)]
        precision: Option<routelm::train::Precision>,
        #[arg(long)]
        json: bool,
    },
    /// Decode speed against the memory-bandwidth bound: weight bytes read per token divided
    /// into the copy bandwidth measured in the same run.
    Decode {
        /// Model folder; default: the dense-110m preset with random weights.
        #[arg(long)]
        model: Option<std::path::PathBuf>,
        /// Preset used when no --model is given.
        #[arg(long, default_value = "dense-110m")]
        config: String,
        /// New tokens to decode (after a 32-token prompt).
        #[arg(long, default_value_t = 128, value_parser = super::positive)]
        tokens: usize,
        /// Also decode this many sequences together (each its own prompt and cache, one
        /// batched forward per step, as the server's continuous batching does): their
        /// aggregate tokens/s and its ratio to one sequence's.
        #[arg(long, default_value_t = 1, value_parser = super::positive)]
        batch: usize,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        kv: super::KvCacheArg,
    },
    /// Prefill speed: one forward pass over a prompt of `--tokens` random tokens through an
    /// empty KV cache, logits for the last position only (what sampling does before its
    /// first token). Prints tokens/s, the FLOPs per token from the ledger and the achieved
    /// GFLOP/s; a model other than dense-110m is measured against the dense-110m preset in
    /// the same run (passes interleaved), with the ratio of their achieved GFLOP/s.
    Prefill {
        /// Model folder; default: the --config preset with random weights.
        #[arg(long)]
        model: Option<std::path::PathBuf>,
        /// Preset used when no --model is given (dense-110m, moe-8x, or a TOML file).
        #[arg(long, default_value = "dense-110m")]
        config: String,
        /// Prompt length.
        #[arg(long, default_value_t = 512, value_parser = super::positive)]
        tokens: usize,
        /// Timed passes per model (after one warm-up); medians are reported.
        #[arg(long, default_value_t = 5, value_parser = super::positive)]
        passes: usize,
        #[arg(long)]
        json: bool,
    },
    /// Mixture-of-Depths gain: the `mod` preset (train-small, every other block routed at
    /// 12.5%) against dense train-small, measured in one run: forward FLOPs ratio from the
    /// ledger, training step speedup, and sampling speedup (new tokens through the KV cache
    /// with causal decisions, after both models trained briefly on the embedded corpus so the
    /// routers have learnt their capacity), with the share of new tokens each routed block
    /// processed.
    Mod {
        /// Timed training steps per model, interleaved; the speedup is the median of the
        /// ratios of adjacent steps (this machine's speed drifts; more steps steady it).
        #[arg(long, default_value_t = 12, value_parser = super::positive)]
        steps: usize,
        /// Training steps before sampling: the routers' causal deciders need about 150 to
        /// process close to their capacity (after 40, the deeper ones still skip every
        /// token, which would flatter the sampling speedup).
        #[arg(long, default_value_t = 150)]
        warm_steps: usize,
        #[arg(long, default_value_t = 256, value_parser = super::positive)]
        tokens: usize,
        #[arg(long)]
        json: bool,
    },
    /// Serving throughput: N concurrent streaming clients against `routelm serve` (started
    /// here) or any OpenAI-compatible server (--url, e.g. llama-server): aggregate tokens/s,
    /// p50/p95 time to first token, errors, peak resident memory.
    Serve(super::bench_serve::Args),
    /// Mixture-of-Experts cost: the 8-expert top-2 `moe` preset against the dense
    /// `train-small` with the same active parameters, measured in one run: training step
    /// time ratio and decode tokens/s ratio.
    Moe {
        /// Timed training steps per model, the two models' steps interleaved; the ratio is
        /// the median of the ratios of adjacent steps, the step times their medians
        #[arg(long, default_value_t = 12, value_parser = super::positive)]
        steps: usize,
        /// Tokens per decode pass; 9 rounds of one pass per model in turn, the ratio the
        /// median of the rounds' ratios, the speeds each model's best
        #[arg(long, default_value_t = 128, value_parser = super::positive)]
        tokens: usize,
        /// Training precision of both models: f32, or bf16 (mixed, on CPUs with
        /// AVX512-BF16: the dense projections and the experts' grouped products)
        #[arg(long, default_value = "f32")]
        precision: Precision,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(a: Args) -> Result<()> {
    match a.what {
        What::Train {
            config,
            steps,
            precision,
            json,
        } => {
            let fastest = match routelm::nn::bf16::available() {
                true => Precision::Bf16,
                false => Precision::F32,
            };
            bench_train(&config, steps, precision.unwrap_or(fastest), json)
        }
        What::Decode {
            model,
            config,
            tokens,
            batch,
            json,
            kv,
        } => bench_decode(model, &config, tokens, batch, json, kv),
        What::Prefill {
            model,
            config,
            tokens,
            passes,
            json,
        } => bench_prefill(model, &config, tokens, passes, json),
        What::Moe {
            steps,
            tokens,
            precision,
            json,
        } => bench_moe(steps, tokens, precision, json),
        What::Mod {
            steps,
            warm_steps,
            tokens,
            json,
        } => bench_mod(steps, warm_steps, tokens, json),
        What::Serve(a) => super::bench_serve::run(a),
    }
}

/// Best-of-n GFLOP/s of an n×n f32 matmul.
fn matmul_peak(n: usize, device: &Device) -> Result<f64> {
    let a = Tensor::randn(0f32, 1.0, (n, n), device)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), device)?;
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let c = a.matmul(&b)?;
        let _ = c.sum_all()?.to_scalar::<f32>()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n * n * n) as f64 / best / 1e9)
}

/// Copy bandwidth (bytes read + written per second), best of 5, on all threads.
fn copy_bandwidth() -> f64 {
    let n = 64 << 20; // 256 MiB of f32
    let src = vec![1f32; n];
    let mut dst = vec![0f32; n];
    let chunk = n / rayon::current_num_threads().max(1);
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        dst.par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .for_each(|(d, s)| d.copy_from_slice(s));
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&dst);
    2.0 * (n * 4) as f64 / best
}

/// The median (NaN of nothing: the counts are validated at the command line).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The median of `b[i] / a[i]` over measurements taken in pairs, one right after the
/// other: the machine's drift in speed between pairs cancels out of each ratio.
fn paired_ratio(a: &[f64], b: &[f64]) -> f64 {
    median(a.iter().zip(b).map(|(x, y)| y / x).collect())
}

fn preset(name: &str) -> Result<(ModelConfig, TrainConfig)> {
    let p = super::load_preset(name)?;
    let cfg = p.model.resolve(name)?;
    let mut train = p.train.resolve(cfg.max_seq_len, name)?;
    train.warmup_steps = 0;
    Ok((cfg, train))
}

/// Median training step time (seconds) of a preset on random tokens.
fn step_time(
    name: &str,
    steps: usize,
    precision: Precision,
) -> Result<(f64, ModelConfig, TrainConfig)> {
    let (times, cfg, train) = step_times(&[name], steps, precision)?.remove(0);
    Ok((median(times), cfg, train))
}

/// [`step_time`] of several presets, their steps interleaved (one of each in turn) so
/// that the machine's drift in speed reaches them alike.
fn step_times(
    names: &[&str],
    steps: usize,
    precision: Precision,
) -> Result<Vec<(Vec<f64>, ModelConfig, TrainConfig)>> {
    let device = super::device();
    let mut runs = Vec::new();
    for name in names {
        let (cfg, mut train) = preset(name)?;
        train.precision = precision;
        let mut rng = Rng::new(0);
        let tokens: Vec<u32> = (0..200_000)
            .map(|_| rng.below(cfg.vocab_size) as u32)
            .collect();
        let data = Dataset::split(tokens, 0.1, train.seq_len)?;
        let trainer = Trainer::new(&cfg, &train, &device)?;
        runs.push((trainer, data, cfg, train, Vec::new()));
    }
    let pb = super::bar(
        ((steps + 2) * names.len()) as u64,
        &format!("train {}", names.join(", ")),
    );
    for i in 0..steps + 2 {
        for (trainer, data, _, _, times) in runs.iter_mut() {
            let t = Instant::now();
            trainer.train_step(data)?;
            if i >= 2 {
                times.push(t.elapsed().as_secs_f64());
            }
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    Ok(runs
        .into_iter()
        .map(|(_, _, cfg, train, times)| (times, cfg, train))
        .collect())
}

/// Decode speed (tokens/s) of each model in each of `rounds` rounds of one pass each, the
/// models in turn within a round: `speeds[model][round]`.
fn paired_decode_speeds(models: &[&Model], tokens: usize, rounds: usize) -> Result<Vec<Vec<f64>>> {
    let mut speeds = vec![Vec::new(); models.len()];
    for _ in 0..rounds {
        for (s, m) in speeds.iter_mut().zip(models) {
            s.extend(decode_passes(m, tokens, 1, || Ok(()))?);
        }
    }
    Ok(speeds)
}

fn best(v: &[f64]) -> f64 {
    v.iter().copied().fold(0f64, f64::max)
}

/// Greedy decode speed (tokens/s) after a prompt of up to 32 tokens, best of 2 passes.
pub(crate) fn decode_speed(model: &Model, tokens: usize) -> Result<f64> {
    Ok(best(&decode_passes(model, tokens, 2, || Ok(()))?))
}

/// Greedy decode speed (tokens/s) of each of `passes` passes after a warm-up, running
/// `before` ahead of each; prompt (up to 32 tokens) and decode are shortened to fit the
/// context window.
fn decode_passes(
    model: &Model,
    tokens: usize,
    passes: usize,
    before: impl FnMut() -> Result<()>,
) -> Result<Vec<f64>> {
    let prompt = random_prompt(model, &mut Rng::new(1));
    decode_passes_after(model, &prompt, tokens, passes, before)
}

/// New tokens to decode after a prompt of `n_prompt`: `tokens`, or what the context window
/// leaves (at least one).
fn fitting(model: &Model, n_prompt: usize, tokens: usize) -> usize {
    tokens
        .min(model.config.max_seq_len.saturating_sub(n_prompt + 1))
        .max(1)
}

/// Random token ids for a decode benchmark's prompt: 32, or a quarter of the context
/// window where that is shorter.
fn random_prompt(model: &Model, rng: &mut Rng) -> Vec<u32> {
    let n = 32.min(model.config.max_seq_len / 4).max(1);
    (0..n)
        .map(|_| rng.below(model.config.vocab_size) as u32)
        .collect()
}

/// [`decode_passes`] after the given prompt (a real text's tokens: a routed model's
/// decisions, and so its speed, depend on the text).
pub(crate) fn decode_passes_after(
    model: &Model,
    prompt: &[u32],
    tokens: usize,
    passes: usize,
    mut before: impl FnMut() -> Result<()>,
) -> Result<Vec<f64>> {
    let ctx = model.config.max_seq_len;
    let prompt = &prompt[..prompt.len().min(ctx / 4).max(1)];
    let tokens = fitting(model, prompt.len(), tokens);
    routelm::verify::greedy(model, prompt, 4)?;
    let mut speeds = Vec::new();
    for _ in 0..passes {
        before()?;
        let mut cache = model.new_cache();
        // sized once, as the server sizes a request's cache
        cache.reserve(prompt.len() + tokens)?;
        let input = Tensor::new(prompt, model.device())?.unsqueeze(0)?;
        // as generate and the server decode
        let _warm = routelm::generate::warm::KeepWarm::start();
        let mut logits = model.forward(&input, Some(&mut cache), true)?.logits;
        let t = Instant::now();
        for _ in 0..tokens {
            let next = logits.flatten_all()?.argmax(0)?.to_scalar::<u32>()?;
            let input = Tensor::new(&[next], model.device())?.unsqueeze(0)?;
            logits = model.forward(&input, Some(&mut cache), true)?.logits;
        }
        speeds.push(tokens as f64 / t.elapsed().as_secs_f64());
    }
    Ok(speeds)
}

fn random_model(cfg: &ModelConfig) -> Result<Model> {
    let params = init_params(cfg, 0, DType::F32, &super::device())?;
    Ok(Model::new(cfg, &params, "random init")?)
}

fn bench_train(name: &str, steps: usize, precision: Precision, json: bool) -> Result<()> {
    let (step_s, cfg, train) = step_time(name, steps, precision)?;
    let tokens_per_s = (train.batch_size * train.seq_len * train.grad_accum) as f64 / step_s;
    let ledger = FlopLedger::new(&cfg, train.seq_len);
    let achieved = tokens_per_s * ledger.train_per_token() / 1e9;
    let peak = matmul_peak(2048, &super::device())?;
    let ratio = achieved / peak;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "preset": name, "step_ms": step_s * 1e3, "tokens_per_s": tokens_per_s,
                "achieved_gflops": achieved, "peak_gflops": peak, "ratio": ratio,
                "threads": rayon::current_num_threads(),
                "precision": precision.name(),
            })
        );
    } else {
        println!(
            "bench train ({name}, {:.2}M params, batch {} x {} tokens, {} products)",
            ledger.total_params as f64 / 1e6,
            train.batch_size,
            train.seq_len,
            precision
        );
        println!("  step time (median of {steps}): {:.1} ms", step_s * 1e3);
        println!("  tokens/s:                     {tokens_per_s:.0}");
        println!("  achieved (ledger, 3x fwd):    {achieved:.1} GFLOP/s");
        println!("  f32 matmul peak (n=2048):     {peak:.1} GFLOP/s");
        println!("  achieved / peak:              {ratio:.3}");
        println!("  reference (train-small): transformers Llama, 2 threads, on the reference machine: f32 410 ms/step, ~5,000 tokens/s (ratio {:.2}); bf16 autocast 286 ms/step, ~7,200 tokens/s", tokens_per_s / 5000.0);
    }
    Ok(())
}

fn bench_decode(
    model_dir: Option<std::path::PathBuf>,
    name: &str,
    tokens: usize,
    batch: usize,
    json: bool,
    kv: super::KvCacheArg,
) -> Result<()> {
    let mut model = match &model_dir {
        Some(d) => {
            super::loading(|| {
                routelm::arch::load_dir(&super::model_dir(d), DType::F32, &super::device())
            })?
            .model
        }
        None => random_model(&preset(name)?.0)?,
    };
    kv.apply(&mut model);
    let cfg = &model.config;
    let ledger = FlopLedger::new(cfg, 64);
    // weights read per token: every active parameter, but only one row of an untied
    // embedding table
    let embed_unread = if cfg.tie_embeddings {
        0
    } else {
        (cfg.vocab_size - 1) * cfg.d_model
    };
    // weights held in their stored form (a GGUF file's blocks) count their own bytes
    let (stored_values, stored_bytes) = model.stored_read();
    let f32_values = ledger.active_params
        - embed_unread
        - stored_values.min(ledger.active_params - embed_unread);
    let bytes = (f32_values * 4 + stored_bytes) as f64;
    // the machine's speed drifts (other tenants), so the bandwidth is measured right before
    // each decode pass and the ratio is the median of the paired ratios
    let mut bandwidths = Vec::new();
    let speeds = decode_passes(&model, tokens, 3, || {
        bandwidths.push(copy_bandwidth());
        Ok(())
    })?;
    let ratios: Vec<f64> = speeds
        .iter()
        .zip(&bandwidths)
        .map(|(s, b)| s / (b / bytes))
        .collect();
    let (tps, bandwidth, ratio) = (median(speeds), median(bandwidths), median(ratios));
    let bound = bandwidth / bytes;
    let batched = if batch > 1 {
        let passes = (0..3)
            .map(|_| batched_decode_speed(&model, batch, tokens))
            .collect::<Result<Vec<_>>>()?;
        Some(median(passes))
    } else {
        None
    };
    let what = model_dir.map_or(name.to_string(), |d| d.display().to_string());
    let kv_cache = format!("{:?}", model.kv_cache_dtype().unwrap_or(DType::F32)).to_lowercase();
    if json {
        let mut j = serde_json::json!({ "model": what, "tokens_per_s": tps, "bound_tokens_per_s": bound, "ratio": ratio, "copy_gb_per_s": bandwidth / 1e9, "weight_mb_per_token": bytes / 1e6, "kv_cache": kv_cache });
        if let Some(b) = batched {
            j["batch"] = batch.into();
            j["batch_tokens_per_s"] = b.into();
            j["batch_over_one"] = (b / tps).into();
        }
        println!("{j}");
    } else {
        let form = match stored_bytes {
            0 => "f32",
            _ => "stored weights read in place",
        };
        println!(
            "bench decode ({what}, {:.1}M params, {form}, {kv_cache} KV cache)",
            ledger.total_params as f64 / 1e6
        );
        println!("  decode:                 {tps:.1} tokens/s ({tokens} new tokens after 32; median of 3 passes)");
        println!(
            "  copy bandwidth:         {:.1} GB/s (best of 5 copies before each pass; median)",
            bandwidth / 1e9
        );
        println!("  weights read per token: {:.1} MB", bytes / 1e6);
        println!("  bandwidth bound:        {bound:.1} tokens/s");
        println!("  decode / bound:         {ratio:.3} (median of the 3 paired ratios)");
        if let Some(b) = batched {
            println!(
                "  {batch} sequences together: {b:.1} tokens/s in all, {:.2}× one sequence's (median of 3 passes)",
                b / tps
            );
        }
    }
    Ok(())
}

/// Aggregate decode speed (tokens/s) of `b` sequences stepped together by
/// [`Model::decode_batch`], each after its own prompt of up to 32 random tokens, greedy;
/// prompt and decode are shortened to fit the context window.
fn batched_decode_speed(model: &Model, b: usize, tokens: usize) -> Result<f64> {
    let mut rng = Rng::new(1);
    let prompts: Vec<Vec<u32>> = (0..b).map(|_| random_prompt(model, &mut rng)).collect();
    let tokens = fitting(model, prompts[0].len(), tokens);
    let mut caches = Vec::with_capacity(b);
    let mut next = Vec::with_capacity(b);
    for prompt in &prompts {
        let mut cache = model.new_cache();
        cache.reserve(prompt.len() + tokens)?;
        let input = Tensor::new(prompt.as_slice(), model.device())?.unsqueeze(0)?;
        let logits = model.forward(&input, Some(&mut cache), true)?.logits;
        next.push(logits.flatten_all()?.argmax(0)?.to_scalar::<u32>()?);
        caches.push(cache);
    }
    let t = Instant::now();
    for _ in 0..tokens {
        let mut refs: Vec<&mut routelm::model::Cache> = caches.iter_mut().collect();
        let (logits, _) = model.decode_batch(&next, &mut refs)?;
        next = logits.argmax(1)?.to_vec1::<u32>()?;
    }
    Ok((b * tokens) as f64 / t.elapsed().as_secs_f64())
}

/// Seconds of one prefill pass of `prompt` through a fresh cache (last logits only).
fn prefill_seconds(model: &Model, prompt: &Tensor) -> Result<f64> {
    let mut cache = model.new_cache();
    // as generate prefills
    let _warm = routelm::generate::warm::KeepWarm::start();
    let t = Instant::now();
    let logits = model.forward(prompt, Some(&mut cache), true)?.logits;
    logits.flatten_all()?.argmax(0)?.to_scalar::<u32>()?;
    Ok(t.elapsed().as_secs_f64())
}

/// Forward FLOPs per token of a `tokens`-token prefill: every layer for every token, the
/// head for the last position only.
fn prefill_flops_per_token(cfg: &ModelConfig, tokens: usize) -> f64 {
    let ledger = FlopLedger::new(cfg, tokens);
    let head: f64 = ledger
        .entries
        .iter()
        .filter(|e| e.component == "head")
        .map(|e| e.flops)
        .sum();
    ledger.forward_per_token() - head + head / tokens as f64
}

/// What one model's prefill passes gave.
struct Prefill {
    what: String,
    params: usize,
    flops_per_token: f64,
    seconds: Vec<f64>,
}

impl Prefill {
    fn tokens_per_s(&self, tokens: usize) -> f64 {
        tokens as f64 / median(self.seconds.clone())
    }

    fn gflops(&self, tokens: usize) -> f64 {
        self.tokens_per_s(tokens) * self.flops_per_token / 1e9
    }

    fn json(&self, tokens: usize) -> serde_json::Value {
        serde_json::json!({
            "model": self.what, "tokens_per_s": self.tokens_per_s(tokens),
            "achieved_gflops": self.gflops(tokens), "flops_per_token": self.flops_per_token,
        })
    }
}

fn bench_prefill(
    model_dir: Option<std::path::PathBuf>,
    name: &str,
    tokens: usize,
    passes: usize,
    json: bool,
) -> Result<()> {
    let (model, what) = match &model_dir {
        Some(d) => {
            let dir = super::model_dir(d);
            let m = super::loading(|| routelm::arch::load_dir(&dir, DType::F32, &super::device()))?
                .model;
            (m, d.display().to_string())
        }
        None => (random_model(&preset(name)?.0)?, name.to_string()),
    };
    // the dense baseline, unless that is what is measured
    let baseline = match (&model_dir, name) {
        (None, "dense-110m") => None,
        _ => Some(random_model(&preset("dense-110m")?.0)?),
    };
    let models: Vec<(&Model, String)> = std::iter::once((&model, what))
        .chain(baseline.iter().map(|m| (m, "dense-110m".to_string())))
        .collect();
    let mut runs = Vec::new();
    for (m, what) in &models {
        let n = tokens.min(m.config.max_seq_len);
        anyhow::ensure!(
            n == tokens,
            "{what}: --tokens {tokens} exceeds its context window of {}",
            m.config.max_seq_len
        );
        runs.push(Prefill {
            what: what.clone(),
            params: FlopLedger::new(&m.config, tokens).total_params,
            flops_per_token: prefill_flops_per_token(&m.config, tokens),
            seconds: Vec::new(),
        });
    }
    let mut rng = Rng::new(7);
    let prompt: Vec<u32> = (0..tokens)
        .map(|_| rng.below(model.config.vocab_size.min(32000)) as u32)
        .collect();
    let prompt = Tensor::new(prompt.as_slice(), model.device())?.unsqueeze(0)?;
    // one warm-up each, then the models' passes in turn so drift hits both alike
    for (m, _) in &models {
        prefill_seconds(m, &prompt)?;
    }
    for _ in 0..passes.max(1) {
        for ((m, _), run) in models.iter().zip(runs.iter_mut()) {
            run.seconds.push(prefill_seconds(m, &prompt)?);
        }
    }
    let ratio = runs
        .get(1)
        .map(|dense| runs[0].gflops(tokens) / dense.gflops(tokens));
    if json {
        let mut v = runs[0].json(tokens);
        if let (Some(dense), Some(r)) = (runs.get(1), ratio) {
            v["dense_110m"] = dense.json(tokens);
            v["gflops_vs_dense_110m"] = r.into();
        }
        v["tokens"] = tokens.into();
        v["threads"] = rayon::current_num_threads().into();
        println!("{v}");
        return Ok(());
    }
    println!(
        "bench prefill ({tokens} tokens, last logits only, f32, {} threads; medians of {passes} passes)",
        rayon::current_num_threads()
    );
    for r in &runs {
        println!(
            "  {:<12} {:>7.1}M params  {:>7.0} tokens/s  {:>6.2} GFLOP/token  {:>6.1} GFLOP/s",
            r.what,
            r.params as f64 / 1e6,
            r.tokens_per_s(tokens),
            r.flops_per_token / 1e9,
            r.gflops(tokens)
        );
    }
    if let Some(r) = ratio {
        println!("  achieved GFLOP/s vs dense-110m: {r:.3}");
    }
    Ok(())
}

const MOE_DECODE_ROUNDS: usize = 9;

fn bench_moe(steps: usize, tokens: usize, precision: Precision, json: bool) -> Result<()> {
    let times = step_times(&["train-small", "moe"], steps, precision)?;
    let ((dense_t, dense_cfg, _), (moe_t, moe_cfg, _)) = (&times[0], &times[1]);
    let (dense_s, moe_s) = (median(dense_t.clone()), median(moe_t.clone()));
    let (dense, moe) = (random_model(dense_cfg)?, random_model(moe_cfg)?);
    // a pass is short (a fraction of a second): 9 rounds keep one slow moment of a shared
    // machine from moving the median
    let tps = paired_decode_speeds(&[&dense, &moe], tokens, MOE_DECODE_ROUNDS)?;
    let (dense_tps, moe_tps) = (best(&tps[0]), best(&tps[1]));
    let train_ratio = paired_ratio(dense_t, moe_t);
    let decode_ratio = paired_ratio(&tps[0], &tps[1]);
    if json {
        println!(
            "{}",
            serde_json::json!({ "train_step_ratio": train_ratio, "decode_ratio": decode_ratio, "dense_step_ms": dense_s * 1e3, "moe_step_ms": moe_s * 1e3, "dense_decode_tokens_per_s": dense_tps, "moe_decode_tokens_per_s": moe_tps })
        );
    } else {
        println!(
            "bench moe (8 experts top-2 vs dense with the same active parameters; training in {precision})"
        );
        println!(
            "  train step: dense {:.1} ms, MoE {:.1} ms (medians), ratio {train_ratio:.3} (median of adjacent pairs; target <= 1.15)",
            dense_s * 1e3,
            moe_s * 1e3
        );
        println!("  decode:     dense {dense_tps:.1} tok/s, MoE {moe_tps:.1} tok/s, ratio {decode_ratio:.3} (median of {MOE_DECODE_ROUNDS} paired rounds; target >= 0.8)");
    }
    Ok(())
}

/// Train a preset for `steps` on the embedded corpus and return its model.
fn briefly_trained(name: &str, steps: usize) -> Result<Model> {
    let (cfg, mut train) = preset(name)?;
    train.steps = steps;
    train.warmup_steps = steps / 10;
    let tok = routelm::Tokenizer::Bytes;
    let data = Dataset::split(super::load_tokens(None, &tok, 7)?, 0.1, train.seq_len)?;
    let mut trainer = Trainer::new(&cfg, &train, &super::device())?;
    let pb = super::bar(steps as u64, &format!("warm {name}"));
    for _ in 0..steps {
        trainer.train_step(&data)?;
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(trainer.model)
}

/// Share of decoded tokens each routed block processed (causal decisions, KV cache).
fn processed_shares(model: &Model, tokens: usize) -> Result<Vec<(usize, f64)>> {
    let tok = routelm::Tokenizer::Bytes;
    let prompt = tok.encode("Once upon a time there was a person named")?;
    let mut cache = model.new_cache();
    let input = Tensor::new(prompt.as_slice(), model.device())?.unsqueeze(0)?;
    let mut logits = model.forward(&input, Some(&mut cache), true)?.logits;
    let before: Vec<usize> = cache.layers.iter().map(|l| l.len()).collect();
    let tokens = tokens.min(model.config.max_seq_len - prompt.len()).max(1);
    for _ in 0..tokens {
        let next = logits.flatten_all()?.argmax(0)?.to_scalar::<u32>()?;
        let input = Tensor::new(&[next], model.device())?.unsqueeze(0)?;
        logits = model.forward(&input, Some(&mut cache), true)?.logits;
    }
    Ok((0..model.config.n_layers)
        .filter(|&l| model.config.layer(l).depth.is_some())
        .map(|l| {
            (
                l,
                (cache.layers[l].len() - before[l]) as f64 / tokens as f64,
            )
        })
        .collect())
}

fn bench_mod(steps: usize, warm_steps: usize, tokens: usize, json: bool) -> Result<()> {
    let (dense_cfg, _) = preset("train-small")?;
    let (mod_cfg, train) = preset("mod")?;
    let ledger = |c: &ModelConfig| FlopLedger::new(c, train.seq_len).forward_per_token();
    let flops_ratio = ledger(&mod_cfg) / ledger(&dense_cfg);
    let times = step_times(&["train-small", "mod"], steps, Precision::F32)?;
    let (dense_s, mod_s) = (median(times[0].0.clone()), median(times[1].0.clone()));
    let dense = briefly_trained("train-small", warm_steps)?;
    let routed = briefly_trained("mod", warm_steps)?;
    let tps = paired_decode_speeds(&[&dense, &routed], tokens, 5)?;
    let (dense_tps, mod_tps) = (best(&tps[0]), best(&tps[1]));
    let shares = processed_shares(&routed, tokens)?;
    let train_speedup = paired_ratio(&times[1].0, &times[0].0);
    let sample_speedup = paired_ratio(&tps[0], &tps[1]);
    if json {
        let per_block: serde_json::Map<String, serde_json::Value> = shares
            .iter()
            .map(|(l, s)| (l.to_string(), (*s).into()))
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "flops_ratio": flops_ratio, "train_speedup": train_speedup, "sample_speedup": sample_speedup,
                "dense_step_ms": dense_s * 1e3, "mod_step_ms": mod_s * 1e3,
                "dense_sample_tokens_per_s": dense_tps, "mod_sample_tokens_per_s": mod_tps,
                "processed_share": per_block,
            })
        );
    } else {
        println!("bench mod (every other block routed at 12.5% vs dense train-small)");
        println!("  forward FLOPs ratio (ledger): {flops_ratio:.3}");
        println!("  train step: dense {:.1} ms, MoD {:.1} ms, speedup {train_speedup:.2}x (target >= 1.5)", dense_s * 1e3, mod_s * 1e3);
        println!("  sampling:   dense {dense_tps:.1} tok/s, MoD {mod_tps:.1} tok/s, speedup {sample_speedup:.2}x (target >= 1.4)");
        let s: Vec<String> = shares
            .iter()
            .map(|(l, s)| format!("block {l}: {:.1}%", 100.0 * s))
            .collect();
        println!(
            "  new tokens processed by routed blocks (after {warm_steps} training steps): {}",
            s.join(", ")
        );
    }
    Ok(())
}

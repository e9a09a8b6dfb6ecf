use anyhow::Result;
use candle_core::{Device, Tensor};
use std::time::Instant;

use routelm::train::data::Dataset;
use routelm::train::rng::Rng;
use routelm::{FlopLedger, Trainer};

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
        #[arg(long, default_value_t = 8)]
        steps: usize,
        #[arg(long)]
        json: bool,
    },
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(a: Args) -> Result<()> {
    match a.what {
        What::Train {
            config,
            steps,
            json,
        } => bench_train(&config, steps, json),
    }
}

fn bench_train(preset: &str, steps: usize, json: bool) -> Result<()> {
    let device = super::device();
    let preset_v = super::load_preset(preset)?;
    let cfg = preset_v.model.resolve(preset)?;
    let mut train = preset_v.train.resolve(cfg.max_seq_len, preset)?;
    train.warmup_steps = 0;
    let mut rng = Rng::new(0);
    let tokens: Vec<u32> = (0..200_000)
        .map(|_| rng.below(cfg.vocab_size) as u32)
        .collect();
    let data = Dataset::split(tokens, 0.1, train.seq_len)?;
    let mut trainer = Trainer::new(&cfg, &train, &device)?;
    let pb = super::bar((steps + 2) as u64, "bench train");
    let mut times = Vec::new();
    for i in 0..steps + 2 {
        let t = Instant::now();
        trainer.train_step(&data)?;
        if i >= 2 {
            times.push(t.elapsed().as_secs_f64());
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    let step_s = median(times);
    let tokens_per_step = (train.batch_size * train.seq_len * train.grad_accum) as f64;
    let tokens_per_s = tokens_per_step / step_s;
    let ledger = FlopLedger::new(&cfg, train.seq_len);
    let achieved = tokens_per_s * ledger.train_per_token() / 1e9;
    let peak = matmul_peak(2048, &device)?;
    let ratio = achieved / peak;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "preset": preset, "step_ms": step_s * 1e3, "tokens_per_s": tokens_per_s,
                "achieved_gflops": achieved, "peak_gflops": peak, "ratio": ratio,
                "threads": rayon::current_num_threads(),
            })
        );
    } else {
        println!(
            "bench train ({preset}, {:.2}M params, batch {} x {} tokens)",
            ledger.total_params as f64 / 1e6,
            train.batch_size,
            train.seq_len
        );
        println!("  step time (median of {steps}): {:.1} ms", step_s * 1e3);
        println!("  tokens/s:                     {tokens_per_s:.0}");
        println!("  achieved (ledger, 3x fwd):    {achieved:.1} GFLOP/s");
        println!("  f32 matmul peak (n=2048):     {peak:.1} GFLOP/s");
        println!("  achieved / peak:              {ratio:.3}");
        println!("  reference: transformers Llama f32, 2 threads: 410 ms/step, ~5,000 tokens/s (ratio {:.2})", tokens_per_s / 5000.0);
    }
    Ok(())
}

use anyhow::Result;
use std::path::PathBuf;

use routelm::train::trainer::evaluate_with_router;
use routelm::{Tokenizer, TrainConfigFile};

/// Validation loss of a saved model: the last `--val-fraction` of the text, in fixed
/// random windows (the same ones `train` evaluates on).
#[derive(clap::Args)]
pub struct Args {
    /// Model folder.
    #[arg(long)]
    model: PathBuf,
    /// Text file; default: the embedded corpus.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Tokens per window (default: the model's context).
    #[arg(long)]
    seq_len: Option<usize>,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value_t = 20)]
    batches: usize,
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// Seed of the evaluation windows.
    #[arg(long, default_value_t = 1337)]
    seed: u64,
}

pub fn run(a: Args) -> Result<()> {
    let device = super::device();
    let model = routelm::arch::load_dir(&a.model, candle_core::DType::F32, &device)?.model;
    let tok = Tokenizer::for_model_dir(&a.model)?;
    let train = TrainConfigFile {
        seq_len: a.seq_len,
        batch_size: Some(a.batch_size),
        eval_batches: Some(a.batches),
        val_fraction: Some(a.val_fraction),
        seed: Some(a.seed),
        ..Default::default()
    }
    .resolve(model.config.max_seq_len, "eval options")?;
    let tokens = super::load_tokens(a.data.as_deref(), &tok, a.seed)?;
    let data = super::dataset(tokens, train.val_fraction, train.seq_len)?;
    let (loss, router) = evaluate_with_router(&model, &data, &train)?;
    println!(
        "val_loss {loss:.4}  ({} windows of {} tokens)",
        train.batch_size * train.eval_batches,
        train.seq_len
    );
    super::print_router(&router);
    Ok(())
}

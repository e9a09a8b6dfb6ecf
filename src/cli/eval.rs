use anyhow::Result;
use std::path::PathBuf;

use routelm::train::trainer::evaluate_full;
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
    #[arg(long, value_parser = super::positive)]
    seq_len: Option<usize>,
    #[arg(long, default_value_t = 8, value_parser = super::positive)]
    batch_size: usize,
    #[arg(long, default_value_t = 20, value_parser = super::positive)]
    batches: usize,
    #[arg(long, default_value_t = 0.1, value_parser = super::fraction)]
    val_fraction: f64,
    /// Seed of the evaluation windows.
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// Routed (Mixture-of-Depths) blocks choose their tokens this way instead of as
    /// trained: `random` draws them uniformly whatever the router says (do the router's
    /// choices matter to this model?), `learned` by the router's top-k.
    #[arg(long, value_parser = ["learned", "random"])]
    depth_selection: Option<String>,
    /// Routed blocks process this share of each sequence instead of their trained
    /// capacity (a tiny share such as 0.001 keeps one token per sequence: what are the
    /// routed blocks worth?).
    #[arg(long, value_parser = capacity)]
    depth_capacity: Option<f64>,
    /// Mixture-of-Experts layers send each token to experts chosen this way instead of as
    /// trained: `random` draws top_k of them uniformly (weights equal), whatever the
    /// router says (does this model depend on which experts a token meets?).
    #[arg(long, value_parser = ["learned", "random"])]
    moe_selection: Option<String>,
}

fn selection(s: &str) -> routelm::config::Selection {
    match s {
        "random" => routelm::config::Selection::Random,
        _ => routelm::config::Selection::Learned,
    }
}

fn capacity(s: &str) -> std::result::Result<f64, String> {
    super::finite(s).and_then(|v| match v > 0.0 && v <= 1.0 {
        true => Ok(v),
        false => Err("must be more than 0 and at most 1".into()),
    })
}

pub fn run(a: Args) -> Result<()> {
    let device = super::device();
    let model_dir = super::model_dir(&a.model);
    let depth = a.depth_selection.is_some() || a.depth_capacity.is_some();
    let model = match (depth, &a.moe_selection) {
        (false, None) => {
            routelm::arch::load_dir(&model_dir, candle_core::DType::F32, &device)?.model
        }
        (_, moe) => {
            let (_, mut cfg, params) =
                routelm::arch::load_params(&model_dir, candle_core::DType::F32, &device)?;
            let (mut routed, mut experts) = (0, 0);
            for layer in &mut cfg.layers {
                if let (true, Some(d)) = (depth, layer.depth.as_mut()) {
                    routed += 1;
                    if let Some(s) = &a.depth_selection {
                        d.selection = selection(s);
                    }
                    if let Some(c) = a.depth_capacity {
                        d.capacity = c;
                    }
                }
                if let (Some(s), Some(m)) = (moe, layer.moe.as_mut()) {
                    experts += 1;
                    m.selection = selection(s);
                }
            }
            if depth && routed == 0 {
                anyhow::bail!(
                    "{}: the model has no routed (Mixture-of-Depths) blocks for --depth-selection or --depth-capacity",
                    model_dir.display()
                );
            }
            if moe.is_some() && experts == 0 {
                anyhow::bail!(
                    "{}: the model has no Mixture-of-Experts layers for --moe-selection",
                    model_dir.display()
                );
            }
            let problems = cfg.problems();
            if !problems.is_empty() {
                anyhow::bail!(
                    "{}: the routing asked for does not fit this model: {}",
                    model_dir.display(),
                    problems.join("; ")
                );
            }
            routelm::model::Model::new(&cfg, &params, &model_dir.display().to_string())?
        }
    };
    let tok = Tokenizer::for_model_dir(&model_dir)?;
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
    let e = evaluate_full(&model, &data, &train)?;
    println!(
        "val_loss {:.4}  ({} windows of {} tokens)",
        e.loss,
        train.batch_size * train.eval_batches,
        train.seq_len
    );
    if let Some(c) = e.causal_loss {
        println!("val_loss with causal routing decisions (as sampling decides) {c:.4}");
    }
    super::print_router(&e.router);
    if !e.depth.is_empty() {
        println!(
            "{:<7} {:>9} {:>9} {:>8} {:>10}   routed blocks: causal decision vs top-k",
            "layer", "accuracy", "baseline", "recall", "processed"
        );
        for d in &e.depth {
            println!(
                "{:<7} {:>8.2}% {:>8.2}% {:>7.2}% {:>9.2}%",
                d.layer,
                100.0 * d.accuracy,
                100.0 * d.baseline,
                100.0 * d.recall,
                100.0 * d.processed
            );
        }
    }
    Ok(())
}

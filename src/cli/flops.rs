use anyhow::Result;

use routelm::FlopLedger;

/// The FLOP ledger of a config: forward FLOPs per token for each component of each layer
/// (attention scores at the given context length), parameter counts, training ≈ 3× forward.
#[derive(clap::Args)]
pub struct Args {
    /// Preset file or name, or a model folder's config.json.
    #[arg(long)]
    config: String,
    /// Context length for the attention term (default: the model's max_seq_len).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let cfg = super::inspect::load_config(&a.config)?;
    let ledger = FlopLedger::new(&cfg, a.seq_len.unwrap_or(cfg.max_seq_len));
    if a.json {
        println!("{}", serde_json::to_string_pretty(&ledger)?);
        return Ok(());
    }
    let fwd = ledger.forward_per_token();
    println!(
        "FLOP ledger at context {} (forward, per token)",
        ledger.seq_len
    );
    println!(
        "{:<32} {:>14} {:>7} {:>12}",
        "component", "FLOPs", "share", "params"
    );
    for e in &ledger.entries {
        println!(
            "{:<32} {:>14.0} {:>6.1}% {:>12}",
            e.component,
            e.flops,
            100.0 * e.flops / fwd,
            e.params
        );
    }
    println!("{:<32} {:>14.0}", "forward total", fwd);
    let dense = ledger.dense_forward_per_token();
    if (dense - fwd).abs() > 0.5 {
        println!(
            "{:<32} {:>14.0}  (ratio {:.3})",
            "dense-equivalent",
            dense,
            fwd / dense
        );
    }
    println!(
        "{:<32} {:>14.0}",
        "training (3x forward)",
        ledger.train_per_token()
    );
    println!(
        "parameters: {} total, {} active per token",
        ledger.total_params, ledger.active_params
    );
    Ok(())
}

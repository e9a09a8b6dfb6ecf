use anyhow::Result;
use std::path::{Path, PathBuf};

use routelm::{FlopLedger, ModelConfig};

/// Describe a model folder or a preset: sizes, parameter counts, memory for f32 weights.
#[derive(clap::Args)]
pub struct Args {
    /// Model folder, preset file or preset name.
    target: PathBuf,
}

/// A model config from a folder (config.json), a preset file or an embedded preset name.
pub fn load_config(spec: &str) -> Result<ModelConfig> {
    let p = Path::new(spec);
    if p.is_dir() {
        return Ok(routelm::weights::load_config(p)?);
    }
    if p.extension().is_some_and(|e| e == "json") && p.exists() {
        let text = std::fs::read_to_string(p)?;
        if let Ok(cfg) = serde_json::from_str::<ModelConfig>(&text) {
            return Ok(cfg);
        }
    }
    let preset = super::load_preset(spec)?;
    Ok(preset.model.resolve(spec)?)
}

pub fn run(a: Args) -> Result<()> {
    let cfg = load_config(&a.target.to_string_lossy())?;
    let ledger = FlopLedger::new(&cfg, cfg.max_seq_len);
    println!("{}", a.target.display());
    println!(
        "  layers {}  d_model {}  heads {} (kv {})  head_dim {}  d_ff {} ({:?})",
        cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.ffn
    );
    println!(
        "  vocab {}  context {}  norm {:?}  position {:?}  tied head {}",
        cfg.vocab_size, cfg.max_seq_len, cfg.norm, cfg.position, cfg.tie_embeddings
    );
    println!(
        "  parameters {} total, {} active per token",
        ledger.total_params, ledger.active_params
    );
    println!(
        "  weights in f32: {:.1} MiB",
        ledger.total_params as f64 * 4.0 / (1 << 20) as f64
    );
    println!(
        "  forward {:.2} MFLOP/token at context {}",
        ledger.forward_per_token() / 1e6,
        cfg.max_seq_len
    );
    Ok(())
}

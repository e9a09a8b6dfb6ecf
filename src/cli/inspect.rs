use anyhow::Result;
use std::path::{Path, PathBuf};

use routelm::{FlopLedger, ModelConfig};

/// Describe a model folder or a preset (sizes, parameter counts, memory for f32 weights),
/// or a GGUF file (its metadata and its tensors' element types).
#[derive(clap::Args)]
pub struct Args {
    /// Model folder, preset file or preset name, or a .gguf file.
    target: PathBuf,
}

/// A model config from a folder (config.json), a preset file or an embedded preset name.
pub fn load_config(spec: &str) -> Result<ModelConfig> {
    let p = Path::new(spec);
    if p.is_dir() || routelm::arch::is_gguf(p) {
        return Ok(routelm::arch::load_config(p)?.1);
    }
    if p.extension().is_some_and(|e| e == "json") && p.exists() {
        let text = std::fs::read_to_string(p)?;
        if let Ok(cfg) = routelm::config::parse_resolved(&text) {
            return Ok(cfg);
        }
    }
    let preset = super::load_preset(spec)?;
    Ok(preset.model.resolve(spec)?)
}

pub fn run(a: Args) -> Result<()> {
    if a.target.extension().is_some_and(|e| e == "gguf") {
        return inspect_gguf(&a.target);
    }
    let cfg = load_config(&a.target.to_string_lossy())?;
    let ledger = FlopLedger::new(&cfg, cfg.max_seq_len);
    let family = if a.target.is_dir() {
        routelm::arch::load_config(&a.target)?.0.map(|f| f.name)
    } else {
        None
    };
    println!("{} ({})", a.target.display(), family.unwrap_or("routelm"));
    println!(
        "  layers {}  d_model {}  heads {} (kv {})  head_dim {}  d_ff {} ({:?})",
        cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.ffn
    );
    if cfg.encoder_layers > 0 {
        println!(
            "  encoder-decoder: {} encoder layers (bidirectional), {} decoder layers with cross-attention, decoder start id {}",
            cfg.encoder_layers,
            cfg.n_layers,
            cfg.decoder_start.map_or("none".into(), |s| s.to_string())
        );
    }
    println!(
        "  vocab {}  context {}  norm {:?}  position {:?}  tied head {}",
        cfg.vocab_size, cfg.max_seq_len, cfg.norm, cfg.position, cfg.tie_embeddings
    );
    println!(
        "  parameters {} total, {} active per token",
        ledger.total_params, ledger.active_params
    );
    // one line per distinct setting, with the layers that use it
    for (m, layers) in groups(cfg.moe_layers()) {
        println!(
            "  MoE layers [{layers}]: {} experts (width {}), top-{}, {:?} scoring{}{}",
            m.n_experts,
            m.d_expert,
            m.top_k,
            m.scoring,
            if m.norm_topk { ", renormalised" } else { "" },
            if m.d_shared > 0 {
                format!(", shared expert width {}", m.d_shared)
            } else {
                String::new()
            }
        );
        if m.noop_experts > 0 {
            println!(
                "    plus {} no-op experts (integrated MoDE)",
                m.noop_experts
            );
        }
        if m.expert_choice {
            println!(
                "    expert-choice routing (not causal: trains and evaluates, does not sample)"
            );
        }
    }
    for (dc, layers) in groups(cfg.depth_layers()) {
        println!(
            "  Mixture-of-Depths blocks [{layers}]: capacity {:.1}%, {:?} selection, sampling decided by {}",
            100.0 * dc.capacity,
            dc.selection,
            if dc.predictor > 0 {
                format!("an MLP predictor (width {})", dc.predictor)
            } else {
                "the router's own score".to_string()
            }
        );
    }
    let windows: Vec<String> = (0..cfg.n_layers)
        .filter_map(|l| cfg.layer(l).window.map(|w| format!("{l}:{w}")))
        .collect();
    if !windows.is_empty() {
        println!("  sliding windows (layer:window) {}", windows.join(" "));
    }
    let mib = |bytes: f64| bytes * ledger.total_params as f64 / (1 << 20) as f64;
    println!(
        "  weights: {:.1} MiB in f32, {:.1} MiB in bf16/f16",
        mib(4.0),
        mib(2.0)
    );
    println!(
        "  forward {:.2} MFLOP/token at context {}",
        ledger.forward_per_token() / 1e6,
        cfg.max_seq_len
    );
    Ok(())
}

/// Layers grouped by equal settings, in order of first use: each setting with its layers
/// as "0, 2, 3".
fn groups<T: PartialEq>(layers: impl Iterator<Item = (usize, T)>) -> Vec<(T, String)> {
    let mut out: Vec<(T, Vec<String>)> = Vec::new();
    for (l, c) in layers {
        match out.iter_mut().find(|(seen, _)| *seen == c) {
            Some((_, ls)) => ls.push(l.to_string()),
            None => out.push((c, vec![l.to_string()])),
        }
    }
    out.into_iter().map(|(c, ls)| (c, ls.join(", "))).collect()
}

/// A GGUF file's header: version, architecture and the metadata keys that shape the
/// model, and its tensors counted by element type.
fn inspect_gguf(path: &Path) -> Result<()> {
    use routelm::weights::gguf::{GgufFile, Value};
    let f = GgufFile::open(path)?;
    let arch = f
        .get("general.architecture")
        .and_then(Value::as_str)
        .unwrap_or("unknown");
    let name = f.get("general.name").and_then(Value::as_str).unwrap_or("");
    println!(
        "{} (GGUF v{}, architecture {arch}) {name}",
        path.display(),
        f.version
    );
    for (k, v) in &f.metadata {
        let shown = match v {
            Value::Array(items) => format!("[{} values]", items.len()),
            Value::String(s) if s.len() > 60 => {
                format!("{:?}… ({} bytes)", &s[..s.floor_char_boundary(60)], s.len())
            }
            v => format!("{v:?}"),
        };
        if k.starts_with(arch) || k.starts_with("general.") || k.starts_with("tokenizer.ggml.model")
        {
            println!("  {k} = {shown}");
        }
    }
    let mut by_type: std::collections::BTreeMap<&str, (usize, usize, usize)> = Default::default();
    for t in &f.tensors {
        let e = by_type.entry(t.ty.name()).or_default();
        *e = (e.0 + 1, e.1 + t.elements(), e.2 + t.len);
    }
    println!("  {} tensors:", f.tensors.len());
    for (ty, (n, elements, bytes)) in by_type {
        println!(
            "    {ty:<5} {n:>5} tensors  {:>8.2}M values  {:>8.1} MiB",
            elements as f64 / 1e6,
            bytes as f64 / (1 << 20) as f64
        );
    }
    let (family, cfg) = routelm::arch::load_config(path)?;
    println!(
        "  loads as {} ({} layers, d_model {}, {} heads, {} KV heads, vocab {}); projections, \
         experts, embeddings and head read in place, norms and routers dequantized",
        family.map_or("routelm", |f| f.name),
        cfg.n_layers,
        cfg.d_model,
        cfg.n_heads,
        cfg.n_kv_heads,
        cfg.vocab_size
    );
    Ok(())
}

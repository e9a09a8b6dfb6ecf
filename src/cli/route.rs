use anyhow::{bail, Result};
use candle_core::Tensor;
use std::path::PathBuf;

use routelm::model::ForwardOptions;
use routelm::routing::DepthDecision;
use routelm::Tokenizer;

/// Show which tokens each routed (Mixture-of-Depths) block processes for a text: a terminal
/// rendering (the text, then a marker line per routed block: █ processed, · skipped) and a
/// PNG map (a row of cells per routed block, each token's text under its column).
#[derive(clap::Args)]
pub struct Args {
    /// Model folder with routed blocks.
    #[arg(long)]
    model: PathBuf,
    /// Text to route (default: a story from the embedded corpus).
    #[arg(long)]
    text: Option<String>,
    /// `causal` (each token by its router's sign, as sampling decides) or `topk` (the
    /// training-time choice over the whole text).
    #[arg(long, default_value = "causal")]
    decision: String,
    /// Where to write the routing map (PNG).
    #[arg(long, default_value = "routing.png")]
    png: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let model_dir = super::model_dir(&a.model);
    let model =
        routelm::arch::load_dir(&model_dir, candle_core::DType::F32, &super::device())?.model;
    if model.config.depth_layers().next().is_none() {
        bail!(
            "{}: the model has no routed (Mixture-of-Depths) blocks",
            a.model.display()
        );
    }
    let tok = Tokenizer::for_model_dir(&model_dir)?;
    let text = match a.text {
        Some(t) => t,
        None => {
            let story = routelm::train::corpus::generate(99, 1);
            story.lines().next().unwrap_or_default().to_string()
        }
    };
    let mut ids = tok.encode(&text)?;
    ids.truncate(model.config.max_seq_len);
    let decision = match a.decision.as_str() {
        "causal" => DepthDecision::Threshold,
        "topk" => DepthDecision::TopK,
        other => bail!("--decision {other}: expected causal or topk"),
    };
    let input = Tensor::new(ids.as_slice(), model.device())?.unsqueeze(0)?;
    let out = model.forward_with(
        &input,
        None,
        ForwardOptions {
            depth: Some(decision),
            ..Default::default()
        },
    )?;
    let pieces: Vec<String> = ids
        .iter()
        .map(|&i| tok.decode(&[i]).map(|s| s.replace('\n', "⏎")))
        .collect::<routelm::Result<_>>()?;
    let widths: Vec<usize> = pieces.iter().map(|p| p.chars().count().max(1)).collect();
    // wrap at 100 columns, the text then one marker line per routed block
    let mut start = 0;
    while start < pieces.len() {
        let mut end = start;
        let mut cols = 0;
        while end < pieces.len() && cols + widths[end] <= 100 {
            cols += widths[end];
            end += 1;
        }
        end = end.max(start + 1);
        let seg: String = pieces[start..end]
            .iter()
            .zip(&widths[start..end])
            .map(|(p, &w)| format!("{p:<w$}"))
            .collect();
        println!("{:>9}  {seg}", "");
        for d in &out.depth {
            let marks: String = (start..end)
                .map(|i| (if d.chosen[i] == 1 { "█" } else { "·" }).repeat(widths[i]))
                .collect();
            println!("block {:>3}  {marks}", d.layer);
        }
        println!();
        start = end;
    }
    for d in &out.depth {
        println!(
            "block {}: {} of {} tokens processed",
            d.layer, d.selected, d.tokens
        );
    }
    let rows: Vec<String> = out
        .depth
        .iter()
        .map(|d| format!("block {}", d.layer))
        .collect();
    let values: Vec<Vec<f64>> = out
        .depth
        .iter()
        .map(|d| d.chosen.iter().map(|&c| c as f64).collect())
        .collect();
    let raw: Vec<String> = ids
        .iter()
        .map(|&i| tok.decode(&[i]))
        .collect::<routelm::Result<_>>()?;
    routelm::report::plot::routing_map(
        &a.png,
        &format!(
            "tokens each routed block processed ({} decisions; dark: processed)",
            a.decision
        ),
        &rows,
        &values,
        &raw,
    )?;
    println!("routing map: {}", a.png.display());
    Ok(())
}

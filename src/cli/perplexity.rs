use anyhow::Result;
use std::path::PathBuf;

use routelm::perplexity::HeldOut;
use routelm::Tokenizer;

/// Perplexity of a text as llama.cpp's `llama-perplexity` measures it (chunks of `--ctx`
/// tokens, each starting with BOS when the tokenizer adds one, the second half of each
/// scored), so the two compare number for number.
#[derive(clap::Args)]
pub struct Args {
    /// Model folder or GGUF file.
    #[arg(long)]
    model: PathBuf,
    /// A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors, e.g.
    /// OUT/adapter of `train --lora`) applied to the model.
    #[arg(long)]
    lora: Option<PathBuf>,
    /// Text file.
    #[arg(long)]
    data: PathBuf,
    /// Tokens per chunk.
    #[arg(long, default_value_t = 512, value_parser = super::positive)]
    ctx: usize,
    /// Evaluate at most this many chunks (default: all the text holds).
    #[arg(long, value_parser = super::positive)]
    chunks: Option<usize>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let device = super::device();
    let model_dir = super::model_dir(&a.model);
    let (model, tok) = super::loading(|| -> Result<_> {
        let model = routelm::arch::load_dir_with(
            &model_dir,
            a.lora.as_deref(),
            candle_core::DType::F32,
            &device,
        )?
        .model;
        Ok((model, Tokenizer::for_model_dir(&model_dir)?))
    })?;
    let text = HeldOut::read(&a.data, &tok, a.ctx, a.chunks)?;
    let pb = super::bar(text.n_chunks() as u64, "perplexity");
    let r = text.score(&model, &mut |r| {
        pb.set_position(r.chunks as u64);
        pb.set_message(format!("PPL {:.4}", r.value()));
    })?;
    pb.finish_and_clear();
    if a.json {
        println!(
            "{}",
            serde_json::json!({"perplexity": r.value(), "chunks": r.chunks, "ctx": a.ctx,
                "scored_tokens": r.scored, "text_tokens": text.tokens.len(), "bos": text.bos,
                "routed_processed": r.routed.0, "routed_visits": r.routed.1})
        );
    } else {
        println!(
            "perplexity {:.4} ({} chunks of {} tokens, {} tokens scored; the text is {} tokens)",
            r.value(),
            r.chunks,
            a.ctx,
            r.scored,
            text.tokens.len()
        );
        if r.routed.1 > 0 {
            println!(
                "routed blocks processed {:.1}% of the tokens (decided causally, as when sampling)",
                100.0 * r.routed.0 as f64 / r.routed.1 as f64
            );
        }
    }
    Ok(())
}

use anyhow::Result;
use std::path::PathBuf;

use routelm::arch::gguf_export::{quantize_model, Scheme};

/// Write a model as one GGUF file with its matrices quantized (or in f32/f16/bf16).
/// Llama-shaped models (Llama, Mistral, SmolLM, Mixtral, and routelm's own dense or MoE
/// models of that shape) are written in llama.cpp's `llama` layout, Qwen 2 and 3 (dense and
/// MoE) in its Qwen layouts, which llama.cpp runs too; any other model (Mixture-of-Depths
/// routers, other families) under the `routelm` architecture, which only routelm reads. Norms, biases and routers stay f32; a matrix
/// whose rows are not whole blocks of the type falls back as llama.cpp's quantizer does
/// (Q4_K to Q5_0, Q6_K to Q8_0), then to f16.
#[derive(clap::Args)]
pub struct Args {
    /// Model folder (Hugging Face checkpoint or routelm's own) or GGUF file.
    input: PathBuf,
    /// The GGUF file to write (written beside as OUT.tmp, renamed when complete).
    output: PathBuf,
    /// f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q6_k, or q4_k_m (Q4_K with Q6_K for the
    /// head and some value and down projections, as llama.cpp's Q4_K_M).
    #[arg(long = "type", default_value = "q8_0")]
    scheme: Scheme,
}

pub fn run(a: Args) -> Result<()> {
    let pb = super::bar(0, "quantize");
    let w = quantize_model(
        &super::model_dir(&a.input),
        &a.output,
        a.scheme,
        &mut |done, total| {
            pb.set_length(total as u64);
            pb.set_position(done as u64);
        },
    )?;
    pb.finish_and_clear();
    let types: Vec<String> = w.types.iter().map(|(t, n)| format!("{n} {t}")).collect();
    println!(
        "wrote {} ({:.1} MB, architecture {}): tensors {}",
        a.output.display(),
        w.bytes as f64 / 1e6,
        w.arch,
        types.join(", ")
    );
    if let Some(why) = &w.not_llama {
        println!("llama.cpp cannot run this file: {why}; routelm reads it");
    }
    Ok(())
}

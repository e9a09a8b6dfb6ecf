use anyhow::{bail, Result};
use std::path::PathBuf;

/// Does routelm compute what Hugging Face transformers computes for this checkpoint?
/// Loads DIR (config.json + weights) and DIR/reference.safetensors, runs the reference
/// inputs and prints the largest logit and hidden-state differences and the greedy tokens.
/// Exits 0 within the tolerances of DIR/meta.json (default 1e-4), 1 otherwise.
#[derive(clap::Args)]
pub struct Args {
    /// Checkpoint folder with reference.safetensors.
    dir: PathBuf,
    /// Apply this PEFT LoRA adapter folder to the model; the reference is then read from
    /// the adapter folder (its reference.safetensors and meta.json) unless --reference says.
    #[arg(long)]
    lora: Option<PathBuf>,
    /// Folder holding reference.safetensors and meta.json (default: DIR, or the --lora folder).
    #[arg(long)]
    reference: Option<PathBuf>,
    /// Dequantize a GGUF file's weights to f32 (as transformers does when it loads one)
    /// instead of running the quantized kernels, whose 8-bit activations differ from an
    /// f32 reference by more than its tolerance.
    #[arg(long)]
    dequantize: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let reference = a
        .reference
        .clone()
        .or_else(|| a.lora.clone())
        .unwrap_or_else(|| a.dir.clone());
    let r = routelm::verify::verify_with(&a.dir, a.lora.as_deref(), &reference, a.dequantize)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!("{} ({})", a.dir.display(), r.family);
        println!(
            "  logits        max |diff| {:.3e}  (tolerance {:.0e})",
            r.logits_max_abs_diff, r.logits_tolerance
        );
        if let Some(h) = r.hidden_max_abs_diff {
            println!(
                "  hidden states max |diff| {h:.3e}  (tolerance {:.0e})",
                r.hidden_tolerance
            );
        }
        if let Some(d) = r.router_max_abs_diff {
            println!(
                "  router logits max |diff| {d:.3e}  (tolerance {:.0e})",
                r.router_tolerance
            );
        }
        if !r.greedy_expected.is_empty() {
            let same = if r.greedy_expected == r.greedy_got {
                "identical"
            } else {
                "DIFFERENT"
            };
            println!("  greedy ids    {same}: {:?}", r.greedy_got);
            if r.greedy_expected != r.greedy_got {
                println!("  expected      {:?}", r.greedy_expected);
            }
        }
        println!("  {}", if r.pass { "PASS" } else { "FAIL" });
    }
    if !r.pass {
        bail!(
            "{}: outputs differ from the reference beyond tolerance",
            a.dir.display()
        );
    }
    Ok(())
}

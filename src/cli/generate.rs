use anyhow::{bail, Result};
use std::io::Write;
use std::path::PathBuf;

use routelm::generate::{generate, GenerateConfig};
use routelm::Tokenizer;

/// Generate from a model folder (config.json + model.safetensors, e.g. OUT/checkpoint of
/// a training run, or a Hugging Face checkpoint). Text streams to stdout; speed goes to
/// stderr. A prompt longer than the context window is an error; generation stops when the
/// window is full. With an encoder-decoder (T5) the prompt is the encoder input and the
/// output is the decoder's, from its start token up to EOS.
#[derive(clap::Args)]
pub struct Args {
    /// Model folder.
    #[arg(long)]
    model: PathBuf,
    /// A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors, e.g.
    /// OUT/adapter of `train --lora`) applied to the model.
    #[arg(long)]
    lora: Option<PathBuf>,
    /// Text prompt (tokenized with DIR/tokenizer.json, or bytes).
    #[arg(long, conflicts_with = "prompt_ids")]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids, e.g. 1,2,3.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// New tokens at most.
    #[arg(long, default_value_t = 200, value_parser = super::positive)]
    max_tokens: usize,
    /// Compute dtype: f32 (default), bf16 or f16 (weights are converted at load).
    #[arg(long, default_value = "f32", value_parser = super::parse_dtype)]
    dtype: candle_core::DType,
    #[command(flatten)]
    sampling: super::Sampling,
    #[command(flatten)]
    kv: super::KvCacheArg,
    /// Stop when this string appears (repeatable); it is not printed.
    #[arg(long)]
    stop: Vec<String>,
    /// Print the generated token ids to stdout instead of text.
    #[arg(long)]
    ids: bool,
    /// After generating, print each step's N highest logits to stderr (the raw logits,
    /// before temperature and penalties): what the model weighed at each token, and how
    /// close a greedy choice was.
    #[arg(long, default_value_t = 0)]
    top_logits: usize,
}

pub fn run(a: Args) -> Result<()> {
    let device = super::device();
    let model_dir = super::model_dir(&a.model);
    let (mut model, tok, prompt, defaults) = super::loading(|| -> Result<_> {
        // the tokenizer and the prompt first, so that what only encoding reads is released
        // before the weights arrive. Ids in and ids out need no tokenizer.
        let mut tok = match (
            a.prompt_ids.is_some() && a.prompt.is_none() && a.ids,
            routelm::arch::is_gguf(&model_dir),
        ) {
            (true, true) => Tokenizer::Bytes,
            _ => Tokenizer::for_model_dir(&model_dir)?,
        };
        let prompt = match (&a.prompt, &a.prompt_ids) {
            (Some(p), _) => tok.encode(p)?,
            (None, Some(ids)) => ids.clone(),
            (None, None) => bail!("give --prompt TEXT or --prompt-ids 1,2,3"),
        };
        // the prompt is all this run encodes
        tok.release_encoder();
        let model =
            routelm::arch::load_dir_with(&model_dir, a.lora.as_deref(), a.dtype, &device)?.model;
        // the command line, else the folder's generation_config.json, else our defaults
        let defaults = routelm::arch::generation_defaults(&model_dir)?;
        Ok((model, tok, prompt, defaults))
    })?;
    a.kv.apply(&mut model);
    // the products' layouts made now, in parallel, rather than one by one by the prompt's
    // first pass; their huge pages' unused tails handed back
    model.prepare_products();
    let cfg = GenerateConfig {
        sampler: a.sampling.config(&defaults),
        max_tokens: a.max_tokens,
        stop: a.stop.clone(),
        eos: defaults.eos,
        seed: a.sampling.seed,
        top_logits: a.top_logits,
        cancel: None,
    };
    let mut out = std::io::stdout();
    let show_text = !a.ids;
    if show_text && a.prompt.is_some() {
        print!("{}", a.prompt.as_deref().unwrap_or_default());
    }
    let mut stream = |piece: &str| {
        if show_text {
            print!("{piece}");
            let _ = out.flush();
        }
    };
    // an encoder-decoder answers the prompt rather than continuing it
    if show_text && a.prompt.is_some() && model.config.encoder_layers > 0 {
        println!();
    }
    let stats = generate(&model, &tok, &prompt, &cfg, &mut stream)?;
    if a.ids {
        let ids: Vec<String> = stats.ids.iter().map(|i| i.to_string()).collect();
        println!("{}", ids.join(","));
    } else {
        println!();
    }
    for (step, top) in stats.top_logits.iter().enumerate() {
        let chosen = stats.ids[stats.ids.len() - stats.new_tokens + step];
        let shown: Vec<String> = top
            .iter()
            .map(|&(id, l)| format!("{:?} [{id}] {l:.3}", tok.decode(&[id]).unwrap_or_default()))
            .collect();
        let margin = match top.as_slice() {
            [a, b, ..] => format!("; margin {:.3}", a.1 - b.1),
            _ => String::new(),
        };
        eprintln!(
            "step {step}: chose [{chosen}]; {}{margin}",
            shown.join(", ")
        );
    }
    let ctx = model.config.max_seq_len;
    if stats.new_tokens < a.max_tokens && stats.ids.len() >= ctx {
        eprintln!(
            "generation stopped at the model's context length ({ctx} tokens), before --max-tokens {}",
            a.max_tokens
        );
    }
    eprintln!(
        "{} prompt + {} new tokens; prefill {:.1} ms; decode {:.1} tokens/s",
        stats.prompt_tokens,
        stats.new_tokens,
        stats.prefill_s * 1e3,
        stats.tokens_per_s()
    );
    Ok(())
}

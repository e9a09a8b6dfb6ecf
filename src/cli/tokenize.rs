use anyhow::{bail, Context, Result};
use std::path::PathBuf;

use routelm::Tokenizer;

/// Print the token ids of a text as the model's tokenizer gives them (its tokenizer.json,
/// or bytes for a folder without one), with the special tokens the tokenizer adds (a BOS
/// for Llama and Gemma) unless --no-special. One `id<TAB>token` line each, or with --json
/// one object `{"ids": [...], "tokens": [...]}`.
#[derive(clap::Args)]
pub struct Args {
    /// Model folder (its tokenizer.json is used), or a GGUF file (the tokenizer its metadata describes).
    #[arg(long)]
    model: PathBuf,
    /// The text to tokenize.
    #[arg(long, conflicts_with = "file", required_unless_present = "file")]
    text: Option<String>,
    /// A file whose whole content is tokenized.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Do not add the tokenizer's special tokens.
    #[arg(long)]
    no_special: bool,
    /// Print one JSON object instead of a line per token.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let dir = super::model_dir(&a.model);
    let tok = Tokenizer::for_model_dir(&dir)?;
    let text = match (&a.text, &a.file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
        }
        (None, None) => bail!("give --text TEXT or --file FILE"),
    };
    let ids = if a.no_special {
        tok.encode_plain(&text)?
    } else {
        tok.encode(&text)?
    };
    let tokens = tok.tokens(&ids);
    if a.json {
        let v = serde_json::json!({ "ids": ids, "tokens": tokens });
        println!("{v}");
    } else {
        for (id, t) in ids.iter().zip(&tokens) {
            println!("{id}\t{}", t.as_deref().unwrap_or(""));
        }
    }
    Ok(())
}

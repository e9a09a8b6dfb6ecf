use anyhow::Result;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use routelm::chat::ChatModel;
use routelm::generate::{GenerateConfig, Session};

/// Talk to a model in the terminal, turn after turn. The conversation goes through the
/// model's own chat template (chat_template.jinja, tokenizer_config.json or the GGUF file's);
/// a model without one gets plain `role: text` lines. Each turn prefills only what it adds:
/// the cache keeps the earlier turns. Answers stream as they come; Ctrl-C stops the current
/// answer (at the prompt it quits). Commands: /reset (new conversation), /stats (last turn's
/// numbers), /quit.
#[derive(clap::Args)]
pub struct Args {
    /// Model folder or GGUF file.
    #[arg(long)]
    model: PathBuf,
    /// A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors, e.g.
    /// OUT/adapter of `train --lora`) applied to the model.
    #[arg(long)]
    lora: Option<PathBuf>,
    /// System prompt (the conversation's first message).
    #[arg(long)]
    system: Option<String>,
    /// New tokens at most per answer.
    #[arg(long, default_value_t = 512, value_parser = super::positive)]
    max_tokens: usize,
    #[command(flatten)]
    sampling: super::Sampling,
    #[command(flatten)]
    kv: super::KvCacheArg,
    /// Compute dtype: f32 (default), bf16 or f16.
    #[arg(long, default_value = "f32", value_parser = super::parse_dtype)]
    dtype: candle_core::DType,
}

pub fn run(a: Args) -> Result<()> {
    let path = super::model_dir(&a.model);
    let mut cm =
        super::loading(|| ChatModel::load(&path, a.lora.as_deref(), a.dtype, &super::device()))?;
    a.kv.apply(&mut cm.model);
    if !cm.own_template {
        eprintln!(
            "{}: no chat template; talking with plain `role: text` lines",
            a.model.display()
        );
    }
    super::say_inferred_template(&cm, &a.model);
    let cancel = Arc::new(AtomicBool::new(false));
    let answering = Arc::new(AtomicBool::new(false));
    {
        let (cancel, answering) = (cancel.clone(), answering.clone());
        ctrlc::set_handler(move || {
            if answering.load(Ordering::SeqCst) {
                cancel.store(true, Ordering::SeqCst);
            } else {
                eprintln!();
                std::process::exit(130);
            }
        })?;
    }
    let system = a
        .system
        .as_deref()
        .map(|s| serde_json::json!({"role": "system", "content": s}));
    let fresh = || -> Vec<serde_json::Value> { system.iter().cloned().collect() };
    let mut messages = fresh();
    let mut session = Session::new(&cm.model);
    let mut seed = a.sampling.seed;
    let mut last: Option<(routelm::generate::GenerateStats, usize)> = None;
    let ctx = cm.model.config.max_seq_len;
    eprintln!(
        "chatting with {} (/reset, /stats, /quit; Ctrl-C stops an answer)",
        a.model.display()
    );
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let text = line.trim_end_matches(['\n', '\r']);
        match text.trim() {
            "" => continue,
            "/quit" | "/exit" => break,
            "/reset" => {
                messages = fresh();
                session.reset(&cm.model);
                eprintln!("(new conversation)");
                continue;
            }
            "/stats" => {
                match &last {
                    Some((s, reused)) => eprintln!(
                        "last turn: {} prompt tokens ({} from the cache, {} prefilled in {:.1} ms), {} new tokens at {:.1} tokens/s; context {}/{}",
                        s.prompt_tokens,
                        reused,
                        s.prompt_tokens - reused,
                        s.prefill_s * 1e3,
                        s.new_tokens,
                        s.tokens_per_s(),
                        session.cache.pos(),
                        ctx
                    ),
                    None => eprintln!("no turn yet"),
                }
                continue;
            }
            cmd if cmd.starts_with('/') => {
                eprintln!("unknown command {cmd}: /reset, /stats or /quit");
                continue;
            }
            _ => {}
        }
        messages.push(serde_json::json!({"role": "user", "content": text}));
        let prompt = match cm.prompt_ids(
            &serde_json::Value::Array(messages.clone()),
            &Default::default(),
        ) {
            Ok(p) if p.len() < ctx => p,
            Ok(p) => {
                eprintln!(
                    "the conversation has {} tokens, the model's context is {ctx}: /reset to start over",
                    p.len()
                );
                messages.pop();
                continue;
            }
            Err(e) => {
                eprintln!("{e}");
                messages.pop();
                continue;
            }
        };
        let cfg = GenerateConfig {
            sampler: a.sampling.config(&cm.defaults),
            max_tokens: a.max_tokens,
            stop: cm.stop_strings.clone(),
            eos: cm.stop_ids.clone(),
            seed,
            top_logits: 0,
            cancel: Some(cancel.clone()),
        };
        seed = seed.wrapping_add(1);
        cancel.store(false, Ordering::SeqCst);
        answering.store(true, Ordering::SeqCst);
        let result = session.generate(&cm.model, &cm.tok, &prompt, &cfg, &mut |piece| {
            print!("{piece}");
            let _ = out.flush();
        });
        answering.store(false, Ordering::SeqCst);
        println!();
        if cancel.load(Ordering::SeqCst) {
            eprintln!("(stopped)");
        }
        match result {
            Ok((stats, reused)) => {
                messages
                    .push(serde_json::json!({"role": "assistant", "content": stats.text.trim()}));
                last = Some((stats, reused));
            }
            Err(e) => {
                eprintln!("error: {e}");
                messages.pop();
            }
        }
    }
    Ok(())
}

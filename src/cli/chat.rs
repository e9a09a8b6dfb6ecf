use anyhow::Result;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use routelm::chat::ChatModel;
use routelm::generate::{GenerateConfig, GenerateStats, Session};

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
    let mut chat = Chat::new(&cm, &a)?;
    eprintln!(
        "chatting with {} (/reset, /stats, /quit; Ctrl-C stops an answer)",
        a.model.display()
    );
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let text = line.trim_end_matches(['\n', '\r']);
        match text.trim() {
            "" => {}
            "/quit" | "/exit" => break,
            cmd if cmd.starts_with('/') => chat.command(cmd),
            _ => chat.turn(text)?,
        }
    }
    Ok(())
}

/// A conversation in the terminal: its messages, the cache of what the model has read,
/// the last turn's numbers.
struct Chat<'a> {
    cm: &'a ChatModel,
    a: &'a Args,
    messages: Vec<serde_json::Value>,
    session: Session,
    seed: u64,
    /// The last turn's statistics and the prompt tokens it took from the cache.
    last: Option<(GenerateStats, usize)>,
    /// Set by Ctrl-C while an answer streams: the answer stops there.
    cancel: Arc<AtomicBool>,
    answering: Arc<AtomicBool>,
}

impl<'a> Chat<'a> {
    /// A new conversation; Ctrl-C stops an answer, or quits at the prompt.
    fn new(cm: &'a ChatModel, a: &'a Args) -> Result<Self> {
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
        let mut chat = Self {
            cm,
            a,
            messages: Vec::new(),
            session: Session::new(&cm.model),
            seed: a.sampling.seed,
            last: None,
            cancel,
            answering,
        };
        chat.messages = chat.fresh();
        Ok(chat)
    }

    /// The messages a conversation starts with: the system prompt, when given.
    fn fresh(&self) -> Vec<serde_json::Value> {
        let system = self.a.system.as_deref();
        system
            .map(|s| serde_json::json!({"role": "system", "content": s}))
            .into_iter()
            .collect()
    }

    /// A command line other than /quit.
    fn command(&mut self, cmd: &str) {
        match cmd {
            "/reset" => {
                self.messages = self.fresh();
                self.session.reset(&self.cm.model);
                eprintln!("(new conversation)");
            }
            "/stats" => match &self.last {
                Some((s, reused)) => eprintln!(
                    "last turn: {} prompt tokens ({} from the cache, {} prefilled in {:.1} ms), {} new tokens at {:.1} tokens/s; context {}/{}",
                    s.prompt_tokens,
                    reused,
                    s.prompt_tokens - reused,
                    s.prefill_s * 1e3,
                    s.new_tokens,
                    s.tokens_per_s(),
                    self.session.cache.pos(),
                    self.cm.model.config.max_seq_len
                ),
                None => eprintln!("no turn yet"),
            },
            _ => eprintln!("unknown command {cmd}: /reset, /stats or /quit"),
        }
    }

    /// The user's `text`, then the model's answer streamed to stdout. A turn that fails
    /// (too long for the context, a template error, a generation error) is said and
    /// leaves the conversation as it was.
    fn turn(&mut self, text: &str) -> Result<()> {
        self.messages
            .push(serde_json::json!({"role": "user", "content": text}));
        let Some(prompt) = self.prompt() else {
            self.messages.pop();
            return Ok(());
        };
        let (a, cm) = (self.a, self.cm);
        let cfg = GenerateConfig {
            sampler: a.sampling.config(&cm.defaults),
            max_tokens: a.max_tokens,
            stop: cm.stop_strings.clone(),
            eos: cm.stop_ids.clone(),
            seed: self.seed,
            top_logits: 0,
            cancel: Some(self.cancel.clone()),
        };
        self.seed = self.seed.wrapping_add(1);
        self.cancel.store(false, Ordering::SeqCst);
        self.answering.store(true, Ordering::SeqCst);
        let mut out = std::io::stdout();
        let result = self
            .session
            .generate(&cm.model, &cm.tok, &prompt, &cfg, &mut |piece| {
                print!("{piece}");
                let _ = out.flush();
            });
        self.answering.store(false, Ordering::SeqCst);
        println!();
        if self.cancel.load(Ordering::SeqCst) {
            eprintln!("(stopped)");
        }
        match result {
            Ok((stats, reused)) => {
                self.messages
                    .push(serde_json::json!({"role": "assistant", "content": stats.text.trim()}));
                self.last = Some((stats, reused));
            }
            Err(e) => {
                eprintln!("error: {e}");
                self.messages.pop();
            }
        }
        Ok(())
    }

    /// The conversation's prompt tokens, or `None` (said) when it does not fit the
    /// context or the template fails.
    fn prompt(&self) -> Option<Vec<u32>> {
        let ctx = self.cm.model.config.max_seq_len;
        let messages = serde_json::Value::Array(self.messages.clone());
        match self.cm.prompt_ids(&messages, &Default::default()) {
            Ok(p) if p.len() < ctx => Some(p),
            Ok(p) => {
                eprintln!(
                    "the conversation has {} tokens, the model's context is {ctx}: /reset to start over",
                    p.len()
                );
                None
            }
            Err(e) => {
                eprintln!("{e}");
                None
            }
        }
    }
}

use anyhow::Result;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use routelm::chat::ChatModel;
use routelm::serve::{AppState, Engine, Limits, Metrics};

/// Serve a model over HTTP with the OpenAI API (`/v1/chat/completions`, `/v1/completions`,
/// `/v1/models`), `/health`, Prometheus `/metrics`, and a chat page at `/` that shows which
/// experts and blocks each token went through. Concurrent requests are decoded together
/// (continuous batching): each step runs one token of every running request in one
/// batched forward; new requests join between steps.
///
/// Try: curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json'
///   -d '{"messages": [{"role": "user", "content": "Hello!"}]}'
#[derive(clap::Args)]
pub struct Args {
    /// Model folder or GGUF file.
    #[arg(long)]
    model: PathBuf,
    /// A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors, e.g.
    /// OUT/adapter of `train --lora`) applied to the model.
    #[arg(long)]
    lora: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Requests decoded together at most (the batch).
    #[arg(long, default_value_t = 8, value_parser = super::positive)]
    parallel: usize,
    /// Requests waiting for a slot at most; more get 503 with Retry-After.
    #[arg(long, default_value_t = 64, value_parser = super::positive)]
    queue: usize,
    /// KV-cache memory of the running requests at most, MiB. A request reserves its prompt
    /// plus max_tokens; one that does not fit waits, one larger than the whole budget gets 400.
    #[arg(long, default_value_t = 2048, value_parser = super::positive)]
    kv_cache_mb: usize,
    /// max_tokens when a request gives none (never past the context).
    #[arg(long, default_value_t = 512, value_parser = super::positive)]
    default_max_tokens: usize,
    /// Largest request body, KiB (larger: 413).
    #[arg(long, default_value_t = 1024, value_parser = super::positive)]
    max_body_kb: usize,
    /// A client must send a request's headers within this many seconds (an idle
    /// keep-alive connection is closed after it too).
    #[arg(long, default_value_t = 10, value_parser = super::positive_u64)]
    header_timeout_s: u64,
    /// A client must send a request's body within this many seconds after its headers
    /// (408 past it).
    #[arg(long, default_value_t = 30, value_parser = super::positive_u64)]
    body_timeout_s: u64,
    /// A request that takes longer than this gets 408, seconds.
    #[arg(long, default_value_t = 600, value_parser = super::positive_u64)]
    timeout_s: u64,
    /// The model's name in the API (default: the file or folder name).
    #[arg(long)]
    name: Option<String>,
    /// Compute dtype: f32 (default), bf16 or f16.
    #[arg(long, default_value = "f32", value_parser = super::parse_dtype)]
    dtype: candle_core::DType,
    #[command(flatten)]
    kv: super::KvCacheArg,
}

pub fn run(a: Args) -> Result<()> {
    super::ignore_broken_pipes();
    let path = super::model_dir(&a.model);
    let mut cm =
        super::loading(|| ChatModel::load(&path, a.lora.as_deref(), a.dtype, &super::device()))?;
    a.kv.apply(&mut cm.model);
    let cm = Arc::new(cm);
    if !cm.own_template {
        eprintln!(
            "{}: no chat template; chats use plain `role: text` lines",
            a.model.display()
        );
    }
    super::say_inferred_template(&cm, &a.model);
    // a run's OUT/checkpoint is named after OUT
    let named = match a.model.file_name() {
        Some(n) if n == "checkpoint" => a.model.parent().unwrap_or(&a.model),
        _ => &a.model,
    };
    let name = a.name.clone().unwrap_or_else(|| {
        named
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    });
    let limits = Limits {
        parallel: a.parallel,
        queue: a.queue,
        cache_bytes: a.kv_cache_mb << 20,
    };
    let metrics = Arc::new(Metrics::default());
    let engine = Engine::start(cm.clone(), limits, metrics)?;
    let state = AppState {
        engine,
        cm,
        name: name.clone(),
        default_max_tokens: a.default_max_tokens,
    };
    let addr = format!("{}:{}", a.host, a.port);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let parallel = a.parallel;
    rt.block_on(routelm::serve::serve(
        state,
        &addr,
        a.max_body_kb << 10,
        routelm::serve::Timeouts {
            headers: Duration::from_secs(a.header_timeout_s),
            body: Duration::from_secs(a.body_timeout_s),
            request: Duration::from_secs(a.timeout_s),
        },
        |bound| {
            eprintln!(
                "routelm serve: {name} on http://{bound} ({parallel} slots); the page is at http://{bound}/"
            )
        },
    ))
    .map_err(|e| anyhow::anyhow!("{addr}: {e}"))?;
    Ok(())
}

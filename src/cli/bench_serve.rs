//! `routelm bench serve`: N concurrent streaming clients against an OpenAI-compatible server
//! on loopback (routelm's own, started in this process, or any other by --url, e.g.
//! llama-server, so that both are measured by the same client), with aggregate tokens/s,
//! time to first token and peak memory.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use routelm::chat::ChatModel;
use routelm::serve::{AppState, Engine, Limits, Metrics};

#[derive(clap::Args)]
pub struct Args {
    /// Model folder or GGUF file to serve in this process (or give --url).
    #[arg(long, required_unless_present = "url")]
    model: Option<std::path::PathBuf>,
    /// An OpenAI-compatible server already running (e.g. http://127.0.0.1:8081): measured
    /// with the same clients instead of routelm's.
    #[arg(long, conflicts_with = "model")]
    url: Option<String>,
    /// With --url: the server's process id, for its peak resident memory.
    #[arg(long)]
    pid: Option<u32>,
    /// Concurrent streaming clients.
    #[arg(long, default_value_t = 8, value_parser = super::positive)]
    clients: usize,
    /// New tokens per client (end-of-sequence ignored: every client gets exactly this many).
    #[arg(long, default_value_t = 64, value_parser = super::positive)]
    tokens: usize,
    /// Requests decoded together by routelm's server (default: --clients).
    #[arg(long, value_parser = super::positive)]
    parallel: Option<usize>,
    /// Words of each client's prompt.
    #[arg(long, default_value_t = 32, value_parser = super::positive)]
    prompt_words: usize,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    kv: super::KvCacheArg,
}

/// One client's measurements.
#[derive(Debug, Default, Clone)]
struct Client {
    ttft_s: f64,
    total_s: f64,
    tokens: usize,
    /// When each token's chunk arrived, seconds from the start.
    arrivals: Vec<f64>,
    error: Option<String>,
}

fn peak_rss_mb(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".into(),
    };
    let s = std::fs::read_to_string(path).ok()?;
    let kb: f64 = s
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

pub fn run(a: Args) -> Result<()> {
    super::ignore_broken_pipes();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (addr, server) = match (&a.url, &a.model) {
            (Some(url), _) => {
                let addr = url
                    .trim_start_matches("http://")
                    .trim_end_matches('/')
                    .to_string();
                (addr, "external".to_string())
            }
            (None, Some(model)) => {
                let path = super::model_dir(model);
                let mut cm =
                    ChatModel::load(&path, None, candle_core::DType::F32, &super::device())?;
                a.kv.apply(&mut cm.model);
                let cm = Arc::new(cm);
                let limits = Limits {
                    parallel: a.parallel.unwrap_or(a.clients),
                    queue: a.clients.max(1),
                    cache_bytes: 16 << 30,
                };
                let engine = Engine::start(cm.clone(), limits, Arc::new(Metrics::default()))?;
                let state = AppState {
                    engine,
                    cm,
                    name: "bench".into(),
                    default_max_tokens: a.tokens,
                };
                let (tx, rx) = tokio::sync::oneshot::channel();
                tokio::spawn(async move {
                    let _ = routelm::serve::serve(
                        state,
                        "127.0.0.1:0",
                        1 << 20,
                        routelm::serve::Timeouts {
                            headers: Duration::from_secs(60),
                            body: Duration::from_secs(60),
                            request: Duration::from_secs(3600),
                        },
                        |b| {
                            let _ = tx.send(b);
                        },
                    )
                    .await;
                });
                (
                    rx.await?.to_string(),
                    format!("routelm ({} slots)", limits.parallel),
                )
            }
            (None, None) => bail!("give --model or --url"),
        };
        let words = [
            "the", "king", "sea", "ship", "night", "river", "stone", "light", "wind", "gold",
        ];
        let t0 = Instant::now();
        let tasks: Vec<_> = (0..a.clients)
            .map(|i| {
                let prompt: Vec<&str> = (0..a.prompt_words)
                    .map(|w| words[(i * 7 + w * 3 + w * w) % words.len()])
                    .collect();
                let body = json!({
                    "prompt": prompt.join(" "), "max_tokens": a.tokens, "temperature": 0,
                    "stream": true, "ignore_eos": true, "stream_options": {"include_usage": true},
                    "seed": i,
                });
                let addr = addr.clone();
                tokio::spawn(async move { one_client(&addr, body).await })
            })
            .collect();
        let mut clients = Vec::new();
        for t in tasks {
            clients.push(t.await.unwrap_or_else(|e| Client {
                error: Some(e.to_string()),
                ..Default::default()
            }));
        }
        let wall = t0.elapsed().as_secs_f64();
        report(
            &a,
            &server,
            &clients,
            wall,
            peak_rss_mb(a.pid.or(if a.url.is_some() {
                None
            } else {
                Some(std::process::id())
            })),
        )
    })
}

/// Percentile `p` (0..1) of `v` (sorted here).
fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn report(a: &Args, server: &str, clients: &[Client], wall: f64, rss: Option<f64>) -> Result<()> {
    let ok: Vec<&Client> = clients.iter().filter(|c| c.error.is_none()).collect();
    let errors: Vec<&str> = clients.iter().filter_map(|c| c.error.as_deref()).collect();
    let tokens: usize = ok.iter().map(|c| c.tokens).sum();
    let mut ttft: Vec<f64> = ok.iter().map(|c| c.ttft_s).collect();
    let (p50, p95) = (percentile(&mut ttft, 0.5), percentile(&mut ttft, 0.95));
    let agg = tokens as f64 / wall;
    // decoding with every client in the batch: from the last client's first token to the
    // first client's last, the tokens that arrived per second
    let start = ok.iter().map(|c| c.ttft_s).fold(0.0, f64::max);
    let end = ok
        .iter()
        .filter_map(|c| c.arrivals.last().copied())
        .fold(f64::INFINITY, f64::min);
    let steady = (end > start).then(|| {
        let n: usize = ok
            .iter()
            .map(|c| {
                c.arrivals
                    .iter()
                    .filter(|&&t| t > start && t <= end)
                    .count()
            })
            .sum();
        n as f64 / (end - start)
    });
    if a.json {
        println!(
            "{}",
            json!({"server": server, "clients": a.clients, "tokens_per_client": a.tokens,
                   "completed": ok.len(), "errors": errors.len(), "tokens": tokens, "wall_s": wall,
                   "aggregate_tokens_per_s": agg, "decode_tokens_per_s": steady,
                   "ttft_p50_s": p50, "ttft_p95_s": p95, "peak_rss_mb": rss})
        );
    } else {
        println!(
            "server: {server}; {} streaming clients × {} tokens",
            a.clients, a.tokens
        );
        println!(
            "completed {} of {}, errors {}",
            ok.len(),
            clients.len(),
            errors.len()
        );
        println!(
            "aggregate: {tokens} tokens in {wall:.2} s = {agg:.1} tokens/s (prefills included)"
        );
        match steady {
            Some(r) => println!(
                "decode with all {} clients running: {r:.1} tokens/s",
                ok.len()
            ),
            None => {
                println!("decode with all clients running: no such moment (they did not overlap)")
            }
        }
        println!(
            "time to first token: p50 {:.1} ms, p95 {:.1} ms",
            p50 * 1e3,
            p95 * 1e3
        );
        match rss {
            Some(r) => println!("peak resident memory: {r:.0} MB"),
            None => println!("peak resident memory: unknown (give --pid for an external server)"),
        }
        for e in errors.iter().take(5) {
            println!("error: {e}");
        }
    }
    if !errors.is_empty() {
        bail!("{} of {} clients failed", errors.len(), clients.len());
    }
    Ok(())
}

/// Stream one completion; the tokens are the usage's count when the server gives one, else
/// the content chunks.
async fn one_client(addr: &str, body: Value) -> Client {
    let t0 = Instant::now();
    match stream(addr, &body, t0).await {
        Ok(c) => c,
        Err(e) => Client {
            error: Some(format!("{e:#}")),
            total_s: t0.elapsed().as_secs_f64(),
            ..Default::default()
        },
    }
}

async fn stream(addr: &str, body: &Value, t0: Instant) -> Result<Client> {
    let body = body.to_string();
    let mut s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).await?;
    let status: u16 = line
        .split(' ')
        .nth(1)
        .and_then(|x| x.parse().ok())
        .ok_or_else(|| anyhow!("bad status line {line:?}"))?;
    let mut chunked = false;
    loop {
        line.clear();
        r.read_line(&mut line).await?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        let l = line.to_ascii_lowercase();
        chunked |= l.starts_with("transfer-encoding:") && l.contains("chunked");
    }
    // the body, de-chunked, read as it arrives
    let mut c = Client::default();
    let mut pending = String::new();
    let mut chunks = 0usize;
    let mut usage = None;
    let mut first = None;
    loop {
        let data = if chunked {
            line.clear();
            if r.read_line(&mut line).await? == 0 {
                break;
            }
            let n =
                usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            let mut buf = vec![0u8; n + 2];
            r.read_exact(&mut buf).await?;
            buf.truncate(n);
            buf
        } else {
            let mut buf = vec![0u8; 8192];
            let n = r.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            buf
        };
        pending.push_str(&String::from_utf8_lossy(&data));
        while let Some(cut) = pending.find('\n') {
            let l: String = pending.drain(..=cut).collect();
            let Some(d) = l.trim().strip_prefix("data:") else {
                continue;
            };
            let d = d.trim();
            if d == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(d).with_context(|| format!("bad event {d:?}"))?;
            if status != 200 || v.get("error").is_some() {
                bail!("HTTP {status}: {d}");
            }
            // a token's chunk, even with no text yet (a partial character held back)
            if v["choices"][0]["text"].is_string() {
                chunks += 1;
                let now = t0.elapsed().as_secs_f64();
                first.get_or_insert(now);
                c.arrivals.push(now);
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                usage = Some(n as usize);
            }
        }
    }
    if status != 200 {
        bail!("HTTP {status}: {pending}");
    }
    c.tokens = usage.unwrap_or(chunks);
    c.ttft_s = first.ok_or_else(|| anyhow!("no tokens came back"))?;
    c.total_s = t0.elapsed().as_secs_f64();
    Ok(c)
}

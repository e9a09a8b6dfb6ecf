//! `routelm serve` end to end on loopback: the OpenAI API's shapes, greedy answers equal to
//! `generate`'s, concurrent requests decoded together equal to each alone, errors as
//! OpenAI-style objects, a client that goes away freeing its slot, a full queue refused.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use routelm::chat::ChatModel;
use routelm::generate::{GenerateConfig, Session};
use routelm::serve::{AppState, Engine, Limits, Metrics};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MODEL: &str = "tests/fixtures/hf/mixtral";

/// How long the test servers wait for a request's headers.
const HEADER_TIMEOUT_MS: u64 = 500;

fn load() -> Arc<ChatModel> {
    Arc::new(ChatModel::load(MODEL.as_ref(), None, DType::F32, &Device::Cpu).unwrap())
}

async fn start(limits: Limits) -> (String, Arc<ChatModel>, Arc<Metrics>) {
    let cm = load();
    let metrics = Arc::new(Metrics::default());
    let engine = Engine::start(cm.clone(), limits, metrics.clone()).unwrap();
    let state = AppState {
        engine,
        cm: cm.clone(),
        name: "tiny".into(),
        default_max_tokens: 16,
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        routelm::serve::serve(
            state,
            "127.0.0.1:0",
            64 << 10,
            routelm::serve::Timeouts {
                headers: Duration::from_millis(HEADER_TIMEOUT_MS),
                body: Duration::from_millis(HEADER_TIMEOUT_MS),
                request: Duration::from_secs(60),
            },
            |a| {
                let _ = tx.send(a);
            },
        )
        .await
        .unwrap();
    });
    (rx.await.unwrap().to_string(), cm, metrics)
}

const LIMITS: Limits = Limits {
    parallel: 4,
    queue: 16,
    cache_bytes: 64 << 20,
};

/// One HTTP/1.1 request; the status, the headers and the body.
async fn request(addr: &str, method: &str, path: &str, body: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    // a streamed body is chunked: keep the data lines only
    (status, head.to_string(), body.to_string())
}

async fn post(addr: &str, path: &str, body: Value) -> (u16, String, String) {
    request(addr, "POST", path, &body.to_string()).await
}

/// The `data:` payloads of a server-sent-events body.
fn events(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(String::from)
        .collect()
}

/// The greedy answer `generate` gives for a conversation, through a session.
fn greedy(cm: &ChatModel, user: &str, max_tokens: usize) -> String {
    let prompt = cm
        .prompt_ids(
            &json!([{"role": "user", "content": user}]),
            &Default::default(),
        )
        .unwrap();
    let cfg = GenerateConfig {
        sampler: cm.defaults.sampler(Some(0.0), None, None, None),
        max_tokens,
        stop: cm.stop_strings.clone(),
        eos: cm.stop_ids.clone(),
        seed: 0,
        top_logits: 0,
        cancel: None,
    };
    let mut s = Session::new(&cm.model);
    s.generate(&cm.model, &cm.tok, &prompt, &cfg, &mut |_| {})
        .unwrap()
        .0
        .text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completion_equals_generate_and_has_the_openai_shape() {
    let (addr, cm, _) = start(LIMITS).await;
    let (status, _, body) = post(
        &addr,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "Once upon"}], "max_tokens": 12, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "tiny");
    let c = &v["choices"][0];
    assert_eq!(c["message"]["role"], "assistant");
    let text = c["message"]["content"].as_str().unwrap();
    assert_eq!(text, greedy(&cm, "Once upon", 12));
    let u = &v["usage"];
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );
    let n = u["completion_tokens"].as_u64().unwrap();
    assert!((1..=12).contains(&n));
    assert_eq!(c["finish_reason"], if n == 12 { "length" } else { "stop" });
    let (status, _, body) = request(&addr, "GET", "/v1/models", "").await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["data"][0]["id"],
        "tiny"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_decode_together_and_equal_each_alone() {
    let (addr, cm, metrics) = start(LIMITS).await;
    let prompts = [
        "The king",
        "A ship",
        "Once upon a time",
        "Hello there",
        "Why",
        "Seven",
    ];
    let calls = prompts.iter().map(|p| {
        let addr = addr.clone();
        let body = json!({"messages": [{"role": "user", "content": p}], "max_tokens": 20,
                          "temperature": 0, "stream": true, "logprobs": true, "top_logprobs": 2,
                          "stream_options": {"include_usage": true}, "routelm": {"routes": true}});
        tokio::spawn(async move { post(&addr, "/v1/chat/completions", body).await })
    });
    let results = futures_join(calls.collect()).await;
    for (p, (status, head, body)) in prompts.iter().zip(results) {
        assert_eq!(status, 200, "{body}");
        assert!(head.to_lowercase().contains("text/event-stream"));
        let ev = events(&body);
        assert_eq!(ev.last().map(String::as_str), Some("[DONE]"));
        let chunks: Vec<Value> = ev[..ev.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let mut text = String::new();
        let mut routed = 0;
        for c in &chunks {
            if let Some(t) = c["choices"][0]["delta"]["content"].as_str() {
                text.push_str(t);
            }
            if let Some(r) = c.get("routelm") {
                // every MoE layer of the fixture routes each token to top-k experts
                let experts = r["route"]["experts"].as_array().unwrap();
                assert_eq!(experts.len(), cm.model.config.moe_layers().count());
                routed += 1;
                let lp = &c["choices"][0]["logprobs"]["content"][0];
                assert!(lp["logprob"].as_f64().unwrap() <= 0.0);
                assert_eq!(lp["top_logprobs"].as_array().unwrap().len(), 2);
            }
        }
        assert_eq!(
            text,
            greedy(&cm, p, 20),
            "prompt {p:?}: the batched answer differs"
        );
        let usage = &chunks.last().unwrap()["usage"];
        assert_eq!(usage["completion_tokens"].as_u64().unwrap(), routed);
    }
    // the requests overlapped: fewer decoding steps than tokens
    let steps = metrics.steps.load(std::sync::atomic::Ordering::Relaxed);
    let tokens = metrics
        .completion_tokens
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        steps < tokens,
        "{steps} steps for {tokens} tokens: nothing was batched"
    );
    let prefills = metrics.prefills.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("{} prompts in {prefills} prefill passes", prompts.len());
}

async fn futures_join<T: Send + 'static>(hs: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for h in hs {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors() {
    let (addr, _, _) = start(LIMITS).await;
    let check = |status: u16, body: &str, want: u16, param: Option<&str>| {
        assert_eq!(status, want, "{body}");
        let v: Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error", "{body}");
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
        if let Some(p) = param {
            assert_eq!(v["error"]["param"], p, "{body}");
        }
    };
    let (s, _, b) = request(&addr, "POST", "/v1/chat/completions", "{not json").await;
    check(s, &b, 400, None);
    let (s, _, b) = post(&addr, "/v1/chat/completions", json!({"messages": "hi"})).await;
    check(s, &b, 400, Some("messages"));
    let msg = json!([{"role": "user", "content": "hi"}]);
    let (s, _, b) = post(
        &addr,
        "/v1/chat/completions",
        json!({"messages": msg, "temperature": -1}),
    )
    .await;
    check(s, &b, 400, Some("temperature"));
    let (s, _, b) = post(
        &addr,
        "/v1/chat/completions",
        json!({"messages": msg, "max_tokens": "many"}),
    )
    .await;
    check(s, &b, 400, Some("max_tokens"));
    let long = "x".repeat(300);
    let (s, _, b) = post(&addr, "/v1/completions", json!({"prompt": long})).await;
    check(s, &b, 400, None);
    assert!(b.contains("context_length_exceeded"), "{b}");
    let (s, _, b) = post(&addr, "/v1/completions", json!({"prompt": [1, 2, 999999]})).await;
    check(s, &b, 400, Some("prompt"));
    let big = format!("{{\"prompt\": \"{}\"}}", "a".repeat(100 << 10));
    let (s, _, _) = request(&addr, "POST", "/v1/completions", &big).await;
    assert_eq!(s, 413);
    // a completion with a stop string: the text ends before it
    let (s, _, b) = post(
        &addr,
        "/v1/completions",
        json!({"prompt": "ab", "max_tokens": 30, "temperature": 0}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let full: Value = serde_json::from_str(&b).unwrap();
    let text = full["choices"][0]["text"].as_str().unwrap().to_string();
    let stop: String = text.chars().nth(4).expect("a longer answer").into();
    let (_, _, b) = post(
        &addr,
        "/v1/completions",
        json!({"prompt": "ab", "max_tokens": 30, "temperature": 0, "stop": [stop]}),
    )
    .await;
    let v: Value = serde_json::from_str(&b).unwrap();
    let cut = v["choices"][0]["text"].as_str().unwrap();
    assert_eq!(cut, &text[..text.find(&stop).unwrap()]);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_frees_its_slot() {
    let (addr, _, metrics) = start(Limits {
        parallel: 1,
        ..LIMITS
    })
    .await;
    let body =
        json!({"prompt": "a", "max_tokens": 120, "temperature": 1, "stream": true, "seed": 1,
                      "stop": []})
        .to_string();
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    drop(s);
    let t0 = Instant::now();
    use std::sync::atomic::Ordering::Relaxed;
    while metrics.running.load(Relaxed) > 0 || metrics.cancelled.load(Relaxed) == 0 {
        // a stream that ended on its own (EOS) before the drop also frees the slot
        if metrics.running.load(Relaxed) == 0 && t0.elapsed() > Duration::from_secs(2) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the slot was not freed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // the single slot serves the next request
    let (status, _, b) = post(
        &addr,
        "/v1/completions",
        json!({"prompt": "b", "max_tokens": 3}),
    )
    .await;
    assert_eq!(status, 200, "{b}");
}

#[test]
fn a_full_queue_refuses_with_busy() {
    use routelm::serve::engine::{Job, Refused};
    let cm = load();
    let metrics = Arc::new(Metrics::default());
    let limits = Limits {
        parallel: 1,
        queue: 1,
        cache_bytes: 64 << 20,
    };
    let engine = Engine::start(cm.clone(), limits, metrics).unwrap();
    let mut keep = Vec::new();
    let mut busy = 0;
    for _ in 0..3 {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        keep.push(rx);
        let job = Job {
            prompt: vec![5, 6, 7],
            cfg: GenerateConfig {
                sampler: cm.defaults.sampler(Some(1.0), None, None, None),
                max_tokens: 120,
                stop: Vec::new(),
                eos: Vec::new(),
                seed: 0,
                top_logits: 0,
                cancel: None,
            },
            logprobs: None,
            routes: false,
            events: tx,
            enqueued: Instant::now(),
        };
        if let Err(Refused::Busy) = engine.submit(job) {
            busy += 1;
        }
    }
    assert!(
        busy >= 1,
        "three jobs for one slot and a queue of one: none refused"
    );
}

/// A client that sends half its headers and stalls (slow loris), connects and says
/// nothing, or trickles its body, is disconnected after the header or body timeout (the
/// last with a 408); others are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_disconnected() {
    let (addr, _, _) = start(LIMITS).await;
    let mut stalled = TcpStream::connect(&addr).await.unwrap();
    stalled
        .write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-")
        .await
        .unwrap();
    let mut silent = TcpStream::connect(&addr).await.unwrap();
    // whole headers, then 10 of the 100 body bytes they announce
    let mut trickle = TcpStream::connect(&addr).await.unwrap();
    trickle
        .write_all(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"prompt\":",
        )
        .await
        .unwrap();
    // served while the two others hold their connections
    let (status, _, _) = request(&addr, "GET", "/health", "").await;
    assert_eq!(status, 200);
    let t0 = Instant::now();
    for (s, answer) in [
        (&mut stalled, None),
        (&mut silent, None),
        (&mut trickle, Some("408")),
    ] {
        let mut buf = Vec::new();
        // the server closes the connection (a 408 or nothing, then EOF)
        let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "a stalled connection was kept open past 10 s");
        if let Some(status) = answer {
            let head = String::from_utf8_lossy(&buf);
            assert!(head.starts_with(&format!("HTTP/1.1 {status}")), "{head}");
        }
    }
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(HEADER_TIMEOUT_MS / 2) && waited < Duration::from_secs(5),
        "closed after {waited:?}, header timeout {HEADER_TIMEOUT_MS} ms"
    );
}

/// Randomly damaged request bodies (flipped bytes, JSON punctuation, truncations, numbers
/// swapped for extremes) sent to both completion endpoints get an answer or a 4xx error
/// object, never a 500 (a panic caught) or a hang: 300 seeded (ROUTELM_DAMAGED_COPIES=N
/// for a longer hunt).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_requests_get_answers_or_client_errors() {
    use axum::body::Body;
    use routelm::rng::Rng;
    use tower::ServiceExt;
    let cm = load();
    let metrics = Arc::new(Metrics::default());
    let engine = Engine::start(cm.clone(), LIMITS, metrics).unwrap();
    let app = routelm::serve::router(
        AppState {
            engine,
            cm,
            name: "tiny".into(),
            default_max_tokens: 4,
        },
        64 << 10,
    );
    let bodies = [
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": "yo"}]}],
                   "max_tokens": 3, "temperature": 0.5, "top_p": 0.9, "top_k": 5, "stop": ["x"], "seed": 1,
                   "logprobs": true, "top_logprobs": 2, "stream": false, "routelm": {"routes": true}})
            .to_string(),
        ),
        (
            "/v1/completions",
            json!({"prompt": "abc", "max_tokens": 3, "temperature": 1.0, "logprobs": 1, "stream": true,
                   "stream_options": {"include_usage": true}, "ignore_eos": true})
            .to_string(),
        ),
    ];
    let mut rng = Rng::new(99);
    let (mut answered, mut refused) = (0, 0);
    // more for a longer hunt: ROUTELM_DAMAGED_COPIES=N
    let copies = common::damaged_copies(300);
    for i in 0..copies {
        let (path, good) = &bodies[i % 2];
        let mut b = good.clone().into_bytes();
        for _ in 0..1 + rng.next_u64() % 3 {
            let at = (rng.next_u64() as usize) % b.len();
            match rng.next_u64() % 4 {
                0 => b[at] ^= 1 << (rng.next_u64() % 7),
                1 => b[at] = b"0123456789\"{}[],:-e.tn"[(rng.next_u64() % 22) as usize],
                2 => {
                    let n = [
                        "1e308",
                        "-1",
                        "99999999999999999999",
                        "null",
                        "[]",
                        "{}",
                        "\"\"",
                    ][(rng.next_u64() % 7) as usize];
                    b.splice(at..at, n.bytes());
                }
                _ => b.truncate(at.max(1)),
            }
        }
        let req = axum::http::Request::post(*path)
            .header("content-type", "application/json")
            .body(Body::from(b.clone()))
            .unwrap();
        let res = tokio::time::timeout(Duration::from_secs(20), app.clone().oneshot(req))
            .await
            .unwrap_or_else(|_| panic!("request {i} hung: {}", String::from_utf8_lossy(&b)))
            .unwrap();
        let status = res.status().as_u16();
        let body = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&body);
        assert!(
            status == 200 || (400..500).contains(&status),
            "request {i}: {status} {text}\nbody: {}",
            String::from_utf8_lossy(&b)
        );
        if status == 200 {
            answered += 1;
        } else {
            let v: Value =
                serde_json::from_str(&text).unwrap_or_else(|_| panic!("request {i}: {text}"));
            assert!(v["error"]["message"].is_string(), "request {i}: {text}");
            refused += 1;
        }
    }
    println!("damaged requests: {answered} answered, {refused} refused with an error object");
    assert!(
        answered > 10 && refused > 100,
        "{answered} answered, {refused} refused"
    );
}

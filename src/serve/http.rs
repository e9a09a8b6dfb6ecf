//! The OpenAI-compatible HTTP API on top of the [`Engine`]: `/v1/chat/completions`,
//! `/v1/completions` (streamed as server-sent events or whole), `/v1/models`, `/health`,
//! `/metrics`, and the page at `/`. Errors are OpenAI-style error objects.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event as Sse, Sse as SseBody};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::engine::{Engine, Event, Job, Refused, TokenLogprob};

mod request;
use crate::chat::ChatModel;
pub use request::{parse_chat, parse_completion, Params};

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub engine: Engine,
    pub cm: Arc<ChatModel>,
    /// The model's name in responses and `/v1/models`.
    pub name: String,
    /// `max_tokens` when a request gives none (bounded by the context).
    pub default_max_tokens: usize,
}

/// An OpenAI-style error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    code: Option<&'static str>,
    param: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            code: None,
            param: None,
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn param(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param),
            ..Self::bad(message)
        }
    }

    /// The HTTP status it is answered with.
    pub fn status(&self) -> u16 {
        self.status.as_u16()
    }

    /// What the client is told.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.status.as_u16() {
            400..=499 => "invalid_request_error",
            _ => "server_error",
        };
        let body = json!({"error": {
            "message": self.message,
            "type": kind,
            "param": self.param,
            "code": self.code,
        }});
        let mut r = (self.status, Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// The router with every route, a body limit of `max_body` bytes.
pub fn router(state: AppState, max_body: usize) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/routelm/model", get(model_info))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
        }))
        .with_state(state)
}

async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.engine.metrics.render(),
    )
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn models(State(s): State<AppState>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{
        "id": s.name, "object": "model", "created": now_s(), "owned_by": "routelm",
        "max_model_len": s.cm.model.config.max_seq_len,
    }]}))
}

/// What the page needs to draw routes: the MoE layers and their experts, the routed blocks.
async fn model_info(State(s): State<AppState>) -> Json<Value> {
    let c = &s.cm.model.config;
    let moe: Vec<Value> = c
        .moe_layers()
        .map(|(l, m)| json!({"layer": l, "n_experts": m.n_experts, "noop_experts": m.noop_experts, "top_k": m.top_k}))
        .collect();
    let depth: Vec<Value> = c
        .depth_layers()
        .map(|(l, d)| json!({"layer": l, "capacity": d.capacity}))
        .collect();
    Json(json!({
        "name": s.name, "n_layers": c.n_layers, "context": c.max_seq_len,
        "moe_layers": moe, "depth_layers": depth, "own_chat_template": s.cm.own_template,
        "parallel": s.engine.limits.parallel,
    }))
}

/// Count the request, parse it with `parse`, answer it (or its error).
async fn handle(
    s: AppState,
    kind: Kind,
    parse: impl FnOnce(&AppState) -> ApiResult<(Vec<u32>, Params)>,
) -> Response {
    s.engine
        .metrics
        .requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    match parse(&s) {
        Ok((prompt, p)) => respond(s, prompt, p, kind).await,
        Err(e) => e.into_response(),
    }
}

async fn chat(State(s): State<AppState>, body: Bytes) -> Response {
    handle(s, Kind::Chat, |s| {
        parse_chat(&s.cm, s.default_max_tokens, &body)
    })
    .await
}

async fn completions(State(s): State<AppState>, body: Bytes) -> Response {
    handle(s, Kind::Completion, |s| {
        parse_completion(&s.cm, s.default_max_tokens, &body)
    })
    .await
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

fn refused(r: Refused) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        match r {
            Refused::Busy => "the server is busy (its queue is full): retry shortly",
            Refused::Stopped => "the engine has stopped",
        },
    )
}

fn engine_error(status: u16, message: String) -> ApiError {
    ApiError::new(
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        message,
    )
}

/// How one response is being assembled: ids, names and the logprob rendering.
struct Reply {
    s: AppState,
    kind: Kind,
    id: String,
    created: u64,
}

impl Reply {
    fn token_text(&self, id: u32) -> String {
        self.s.cm.tok.decode(&[id]).unwrap_or_default()
    }

    /// A chat logprob entry for one token.
    fn chat_logprob(&self, id: u32, lp: &TokenLogprob) -> Value {
        let entry = |id: u32, l: f32| {
            let t = self.token_text(id);
            json!({"token": t, "logprob": l, "bytes": t.as_bytes()})
        };
        let mut e = entry(id, lp.logprob);
        e["top_logprobs"] = lp.top.iter().map(|&(i, l)| entry(i, l)).collect();
        e
    }

    fn chunk(&self, delta: Value, finish: Option<&str>, extra: Option<(&str, Value)>) -> Value {
        let mut c = match self.kind {
            Kind::Chat => json!({
                "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.s.name,
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
            }),
            Kind::Completion => json!({
                "id": self.id, "object": "text_completion", "created": self.created,
                "model": self.s.name,
                "choices": [{"index": 0, "text": delta.get("content").cloned().unwrap_or(json!("")),
                             "logprobs": null, "finish_reason": finish}],
            }),
        };
        if let Some((k, v)) = extra {
            c[k] = v;
        }
        c
    }

    fn usage(prompt: usize, completion: usize) -> Value {
        json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
    }
}

async fn respond(s: AppState, prompt: Vec<u32>, p: Params, kind: Kind) -> Response {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let job = Job {
        prompt,
        cfg: p.cfg,
        logprobs: p.logprobs,
        routes: p.routes,
        events: tx,
        enqueued: Instant::now(),
    };
    if let Err(r) = s.engine.submit(job) {
        return refused(r).into_response();
    }
    // the first event decides the status: an error before any token is an HTTP error
    let first = match rx.recv().await {
        Some(Event::Error { status, message }) => {
            return engine_error(status, message).into_response()
        }
        Some(e) => e,
        None => return engine_error(500, "the engine dropped the request".into()).into_response(),
    };
    let r = Reply {
        id: format!(
            "{}-{:x}",
            if kind == Kind::Chat {
                "chatcmpl"
            } else {
                "cmpl"
            },
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ),
        created: now_s(),
        kind,
        s,
    };
    if p.stream {
        stream(r, first, rx, p.include_usage).into_response()
    } else {
        whole(r, first, rx).await
    }
}

/// Server-sent events: a chunk per token (the role first, for chat), the finish reason,
/// usage when asked, then `[DONE]`. A client that goes away drops the stream, which drops
/// the engine's receiver: the engine stops its request at the next step.
fn stream(
    r: Reply,
    first: Event,
    mut rx: mpsc::UnboundedReceiver<Event>,
    include_usage: bool,
) -> impl IntoResponse {
    let (out, out_rx) = mpsc::channel::<Result<Sse, Infallible>>(64);
    tokio::spawn(async move {
        let send = |v: Value| Sse::default().data(v.to_string());
        if r.kind == Kind::Chat
            && out
                .send(Ok(send(r.chunk(
                    json!({"role": "assistant", "content": ""}),
                    None,
                    None,
                ))))
                .await
                .is_err()
        {
            return;
        }
        let mut next = Some(first);
        while let Some(ev) = next.take() {
            let msg = match ev {
                Event::Token {
                    id,
                    text,
                    logprob,
                    route,
                } => {
                    if text.is_empty() && logprob.is_none() && route.is_none() {
                        next = rx.recv().await;
                        continue;
                    }
                    let mut c = r.chunk(json!({"content": text}), None, None);
                    if let Some(lp) = &logprob {
                        c["choices"][0]["logprobs"] = match r.kind {
                            Kind::Chat => json!({"content": [r.chat_logprob(id, lp)]}),
                            Kind::Completion => completion_logprobs(&r, &[(id, lp.clone())], 0),
                        };
                    }
                    if let Some(route) = route {
                        c["routelm"] =
                            json!({"token_id": id, "token": r.token_text(id), "route": route});
                    }
                    send(c)
                }
                Event::Done {
                    finish,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    let mut chunks = vec![r.chunk(json!({}), Some(finish.reason()), None)];
                    if include_usage {
                        let mut u = r.chunk(
                            json!({}),
                            None,
                            Some(("usage", Reply::usage(prompt_tokens, completion_tokens))),
                        );
                        u["choices"] = json!([]);
                        chunks.push(u);
                    }
                    for c in chunks {
                        if out.send(Ok(send(c))).await.is_err() {
                            return;
                        }
                    }
                    let _ = out.send(Ok(Sse::default().data("[DONE]"))).await;
                    return;
                }
                Event::Error { status, message } => {
                    let e = json!({"error": {"message": message, "type": "server_error", "code": status}});
                    let _ = out.send(Ok(send(e))).await;
                    let _ = out.send(Ok(Sse::default().data("[DONE]"))).await;
                    return;
                }
            };
            if out.send(Ok(msg)).await.is_err() {
                return;
            }
            next = rx.recv().await;
        }
    });
    SseBody::new(ReceiverStream::new(out_rx))
}

/// The legacy completions `logprobs` object for tokens starting at text offset `offset`.
fn completion_logprobs(r: &Reply, tokens: &[(u32, TokenLogprob)], offset: usize) -> Value {
    let mut text_offset = Vec::new();
    let mut at = offset;
    let texts: Vec<String> = tokens.iter().map(|(id, _)| r.token_text(*id)).collect();
    for t in &texts {
        text_offset.push(at);
        at += t.len();
    }
    json!({
        "tokens": texts,
        "token_logprobs": tokens.iter().map(|(_, lp)| lp.logprob).collect::<Vec<_>>(),
        "top_logprobs": tokens.iter().map(|(_, lp)| {
            lp.top.iter().map(|&(i, l)| (r.token_text(i), json!(l))).collect::<Map<String, Value>>()
        }).collect::<Vec<_>>(),
        "text_offset": text_offset,
    })
}

/// The whole answer in one response.
async fn whole(r: Reply, first: Event, mut rx: mpsc::UnboundedReceiver<Event>) -> Response {
    let mut text = String::new();
    let mut lps: Vec<(u32, TokenLogprob)> = Vec::new();
    let mut routes = Vec::new();
    let mut next = Some(first);
    while let Some(ev) = next.take() {
        match ev {
            Event::Token {
                id,
                text: t,
                logprob,
                route,
            } => {
                text.push_str(&t);
                if let Some(lp) = logprob {
                    lps.push((id, lp));
                }
                if let Some(route) = route {
                    routes.push(json!({"token_id": id, "token": r.token_text(id), "route": route}));
                }
            }
            Event::Done {
                finish,
                prompt_tokens,
                completion_tokens,
            } => {
                let logprobs = match (r.kind, lps.is_empty()) {
                    (_, true) => Value::Null,
                    (Kind::Chat, false) => {
                        json!({"content": lps.iter().map(|(id, lp)| r.chat_logprob(*id, lp)).collect::<Vec<_>>()})
                    }
                    (Kind::Completion, false) => completion_logprobs(&r, &lps, 0),
                };
                let choice = match r.kind {
                    Kind::Chat => {
                        json!({"index": 0, "message": {"role": "assistant", "content": text},
                                         "logprobs": logprobs, "finish_reason": finish.reason()})
                    }
                    Kind::Completion => json!({"index": 0, "text": text, "logprobs": logprobs,
                                               "finish_reason": finish.reason()}),
                };
                let mut body = json!({
                    "id": r.id,
                    "object": if r.kind == Kind::Chat { "chat.completion" } else { "text_completion" },
                    "created": r.created, "model": r.s.name, "choices": [choice],
                    "usage": Reply::usage(prompt_tokens, completion_tokens),
                });
                if !routes.is_empty() {
                    body["routelm"] = json!({"routes": routes});
                }
                return Json(body).into_response();
            }
            Event::Error { status, message } => {
                return engine_error(status, message).into_response()
            }
        }
        next = rx.recv().await;
    }
    engine_error(500, "the engine dropped the request".into()).into_response()
}

/// Connection limits: how long a client may take to send a request's headers (an idle
/// keep-alive connection included: a slow-loris client cannot hold a connection), then
/// its body (408 past it: a client that trickles its body cannot either), and how long it
/// may take to get its whole answer (408 past it).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub headers: Duration,
    pub body: Duration,
    pub request: Duration,
}

/// Read the whole request body, at most `limit` bytes within `within`, before the
/// handler sees the request: a larger body gets 413, a slower one 408.
async fn read_body(
    req: axum::extract::Request,
    next: axum::middleware::Next,
    limit: usize,
    within: Duration,
) -> Response {
    let (parts, body) = req.into_parts();
    match tokio::time::timeout(within, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => {
            let req = axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes));
            next.run(req).await
        }
        // over the limit (or a connection gone, when no one reads the answer)
        Ok(Err(_)) => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than {} KiB", limit >> 10),
        )
        .into_response(),
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {} s",
                within.as_secs_f64()
            ),
        )
        .into_response(),
    }
}

/// Serve on `addr` until Ctrl-C; `on_ready` is told the bound address.
pub async fn serve(
    state: AppState,
    addr: &str,
    max_body: usize,
    timeouts: Timeouts,
    on_ready: impl FnOnce(std::net::SocketAddr),
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let listener = tokio::net::TcpListener::bind(addr).await?;
    on_ready(listener.local_addr()?);
    let app = router(state, max_body)
        .layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                read_body(req, next, max_body, timeouts.body)
            },
        ))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeouts.request,
        ));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Some(timeouts.headers));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let shutdown = tokio::signal::ctrl_c();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            conn = listener.accept() => {
                let Ok((stream, _)) = conn else { continue };
                let svc = hyper_util::service::TowerToHyperService::new(app.clone());
                let conn = http.serve_connection(TokioIo::new(stream), svc);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            _ = &mut shutdown => break,
        }
    }
    // the answers under way get a few seconds to finish
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
    Ok(())
}

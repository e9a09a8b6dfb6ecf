//! A request body of `/v1/chat/completions` or `/v1/completions` to its prompt tokens and
//! generation parameters, each field checked (type, range, the prompt against the
//! context), or the OpenAI-style 400 error that names the field.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

use super::{ApiError, ApiResult};
use crate::chat::ChatModel;
use crate::generate::{GenerateConfig, SamplerConfig};

/// The request fields both endpoints share.
pub struct Params {
    pub(super) cfg: GenerateConfig,
    pub(super) stream: bool,
    pub(super) include_usage: bool,
    pub(super) logprobs: Option<usize>,
    pub(super) routes: bool,
}

fn get_f64(v: &Value, key: &'static str, lo: f64, hi: f64) -> ApiResult<Option<f64>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => match x.as_f64() {
            Some(f) if f.is_finite() && (lo..=hi).contains(&f) => Ok(Some(f)),
            _ => Err(ApiError::param(
                key,
                format!("{key} must be a number from {lo} to {hi}"),
            )),
        },
    }
}

fn get_uint(v: &Value, key: &'static str) -> ApiResult<Option<u64>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .map(Some)
            .ok_or_else(|| ApiError::param(key, format!("{key} must be a non-negative integer"))),
    }
}

fn get_bool(v: &Value, key: &'static str) -> ApiResult<bool> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        _ => Err(ApiError::param(key, format!("{key} must be true or false"))),
    }
}

fn params(
    cm: &ChatModel,
    default_max_tokens: usize,
    v: &Value,
    prompt_len: usize,
    chat: bool,
) -> ApiResult<Params> {
    let ctx = cm.model.config.max_seq_len;
    check_prompt(prompt_len, ctx)?;
    refuse_unsupported(v)?;
    let max_tokens = max_tokens_of(v, default_max_tokens, ctx - prompt_len)?;
    let stop = stop_of(v)?;
    let sampler: SamplerConfig = cm.defaults.sampler(
        get_f64(v, "temperature", 0.0, 2.0)?,
        get_uint(v, "top_k")?.map(|k| k as usize),
        get_f64(v, "top_p", 0.0, 1.0)?,
        get_f64(v, "repetition_penalty", 0.01, 10.0)?,
    );
    if sampler.top_p <= 0.0 {
        return Err(ApiError::param("top_p", "top_p must be above 0"));
    }
    let seed = match get_uint(v, "seed")? {
        Some(s) => s,
        None => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    };
    let logprobs = logprobs_of(v, chat)?;
    let stream = get_bool(v, "stream")?;
    let include_usage = v
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(|b| b.as_bool())
        .unwrap_or(false);
    let routes = v
        .get("routelm")
        .and_then(|o| o.get("routes"))
        .and_then(|b| b.as_bool())
        .unwrap_or(false);
    // `ignore_eos` (as vLLM and llama-server take it): exactly max_tokens, for benchmarks
    let ignore_eos = get_bool(v, "ignore_eos")?;
    let mut all_stop = stop;
    if !ignore_eos {
        all_stop.extend(cm.stop_strings.iter().cloned());
    }
    Ok(Params {
        cfg: GenerateConfig {
            sampler,
            max_tokens,
            stop: all_stop,
            eos: if ignore_eos {
                Vec::new()
            } else {
                cm.stop_ids.clone()
            },
            seed,
            top_logits: 0,
            cancel: None,
        },
        stream,
        include_usage,
        logprobs,
        routes,
    })
}

/// A prompt of `prompt_len` tokens fits a context of `ctx` with room for an answer.
fn check_prompt(prompt_len: usize, ctx: usize) -> ApiResult<()> {
    if prompt_len == 0 {
        return Err(ApiError::param("prompt", "the prompt is empty"));
    }
    if prompt_len >= ctx {
        return Err(ApiError {
            code: Some("context_length_exceeded"),
            ..ApiError::bad(format!(
                "the prompt has {prompt_len} tokens; the model's context is {ctx} tokens, which leaves no room for an answer"
            ))
        });
    }
    Ok(())
}

/// The fields a request may not set to anything but their default: `n` (one answer) and
/// the presence and frequency penalties.
fn refuse_unsupported(v: &Value) -> ApiResult<()> {
    if let Some(n) = get_uint(v, "n")? {
        if n != 1 {
            return Err(ApiError::param("n", "only n = 1 is supported"));
        }
    }
    for key in ["presence_penalty", "frequency_penalty"] {
        if get_f64(v, key, -2.0, 2.0)?.is_some_and(|p| p != 0.0) {
            return Err(ApiError::bad(format!(
                "{key} is not supported (use repetition_penalty)"
            )));
        }
    }
    Ok(())
}

/// `max_completion_tokens` (or the older `max_tokens`), at least 1, `default` when absent,
/// at most the `room` the context leaves.
fn max_tokens_of(v: &Value, default: usize, room: usize) -> ApiResult<usize> {
    let key = if v.get("max_completion_tokens").is_some() {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    match get_uint(v, key)? {
        Some(0) => Err(ApiError::param(key, format!("{key} must be at least 1"))),
        Some(n) => Ok((n as usize).min(room)),
        None => Ok(default.min(room)),
    }
}

/// `stop`: a string or up to 4, none empty.
fn stop_of(v: &Value) -> ApiResult<Vec<String>> {
    let stop: Vec<String> = match v.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(t)) => vec![t.clone()],
        Some(Value::Array(a)) if a.len() <= 4 && a.iter().all(|x| x.is_string()) => a
            .iter()
            .filter_map(|x| x.as_str().map(String::from))
            .collect(),
        _ => {
            return Err(ApiError::param(
                "stop",
                "stop must be a string or a list of at most 4 strings",
            ))
        }
    };
    if stop.iter().any(|t| t.is_empty()) {
        return Err(ApiError::param("stop", "a stop string must not be empty"));
    }
    Ok(stop)
}

/// How many alternatives to report with each token's log-probability (`None`: no
/// log-probabilities): a chat request's `logprobs` (bool) and `top_logprobs` (up to 20),
/// a completion's `logprobs` (0 to 20).
fn logprobs_of(v: &Value, chat: bool) -> ApiResult<Option<usize>> {
    if !chat {
        return match v.get("logprobs") {
            None | Some(Value::Null) => Ok(None),
            Some(x) => match x.as_u64() {
                Some(n) if n <= 20 => Ok(Some(n as usize)),
                _ => Err(ApiError::param(
                    "logprobs",
                    "logprobs must be an integer from 0 to 20",
                )),
            },
        };
    }
    let top = get_uint(v, "top_logprobs")?;
    if top.is_some_and(|t| t > 20) {
        return Err(ApiError::param(
            "top_logprobs",
            "top_logprobs is at most 20",
        ));
    }
    match (get_bool(v, "logprobs")?, top) {
        (true, t) => Ok(Some(t.unwrap_or(0) as usize)),
        (false, Some(t)) if t > 0 => Err(ApiError::param(
            "top_logprobs",
            "top_logprobs needs logprobs: true",
        )),
        _ => Ok(None),
    }
}

fn parse_body(body: &[u8]) -> ApiResult<Value> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad(format!("the body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad("the body must be a JSON object"));
    }
    Ok(v)
}

/// Messages with their content as text (a list of parts is joined: text parts only).
fn messages_of(v: &Value) -> ApiResult<Value> {
    let Some(list) = v.get("messages").and_then(|m| m.as_array()) else {
        return Err(ApiError::param(
            "messages",
            "messages must be a list of {role, content}",
        ));
    };
    if list.is_empty() {
        return Err(ApiError::param("messages", "messages must not be empty"));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let Some(obj) = m.as_object() else {
            return Err(ApiError::param(
                "messages",
                format!("messages[{i}] must be an object"),
            ));
        };
        if !obj.get("role").is_some_and(|r| r.is_string()) {
            return Err(ApiError::param(
                "messages",
                format!("messages[{i}].role must be a string"),
            ));
        }
        let mut obj = obj.clone();
        match obj.get("content") {
            None | Some(Value::Null) | Some(Value::String(_)) => {}
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (
                        p.get("type").and_then(|t| t.as_str()),
                        p.get("text").and_then(|t| t.as_str()),
                    ) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        _ => {
                            return Err(ApiError::param(
                                "messages",
                                format!("messages[{i}].content: only text parts are supported"),
                            ))
                        }
                    }
                }
                obj.insert("content".into(), Value::String(text));
            }
            Some(_) => {
                return Err(ApiError::param(
                    "messages",
                    format!("messages[{i}].content must be a string or a list of text parts"),
                ))
            }
        }
        out.push(Value::Object(obj));
    }
    Ok(Value::Array(out))
}

/// A `/v1/chat/completions` body to its prompt (the model's chat template applied) and
/// generation parameters, or the 400 error it deserves. `default_max_tokens` applies when
/// the body gives none.
pub fn parse_chat(
    cm: &ChatModel,
    default_max_tokens: usize,
    body: &[u8],
) -> ApiResult<(Vec<u32>, Params)> {
    let v = parse_body(body)?;
    let messages = messages_of(&v)?;
    let mut extra = Map::new();
    if let Some(t) = v.get("tools").filter(|t| !t.is_null()) {
        extra.insert("tools".into(), t.clone());
    }
    if let Some(Value::Object(k)) = v.get("chat_template_kwargs") {
        extra.extend(k.clone());
    }
    let prompt = cm
        .prompt_ids(&messages, &extra)
        .map_err(|e| ApiError::param("messages", e.to_string()))?;
    let p = params(cm, default_max_tokens, &v, prompt.len(), true)?;
    Ok((prompt, p))
}

/// A `/v1/completions` body to its prompt tokens and generation parameters, or the 400
/// error it deserves.
pub fn parse_completion(
    cm: &ChatModel,
    default_max_tokens: usize,
    body: &[u8],
) -> ApiResult<(Vec<u32>, Params)> {
    let v = parse_body(body)?;
    let encode = |t: &str| {
        cm.tok
            .encode(t)
            .map_err(|e| ApiError::param("prompt", e.to_string()))
    };
    let prompt = match v.get("prompt") {
        Some(Value::String(t)) => encode(t)?,
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            encode(a[0].as_str().unwrap_or_default())?
        }
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(|x| x.is_u64()) => {
            let vocab = cm.model.config.vocab_size as u64;
            let ids: Vec<u32> = a
                .iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect();
            if let Some(bad) = a.iter().filter_map(|x| x.as_u64()).find(|&x| x >= vocab) {
                return Err(ApiError::param(
                    "prompt",
                    format!("token id {bad} is out of range for a vocabulary of {vocab}"),
                ));
            }
            ids
        }
        _ => {
            return Err(ApiError::param(
                "prompt",
                "prompt must be a string (or a list of one string, or of token ids)",
            ))
        }
    };
    if get_bool(&v, "echo")? {
        return Err(ApiError::param("echo", "echo is not supported"));
    }
    let p = params(cm, default_max_tokens, &v, prompt.len(), false)?;
    Ok((prompt, p))
}

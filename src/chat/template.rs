//! Chat templates: the Jinja template a model publishes (`chat_template.jinja`,
//! `tokenizer_config.json`'s `chat_template`, or a GGUF file's `tokenizer.chat_template`),
//! rendered with transformers' semantics by `minijinja`: blocks trimmed and left-stripped,
//! loop controls, Python string methods, `raise_exception`, `strftime_now`, and a `tojson`
//! that writes what Python's `json.dumps(…, ensure_ascii=False)` writes.

use std::collections::BTreeMap;
use std::path::Path;

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template and the special-token strings it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// The template's text.
    pub source: String,
    /// `bos_token`, `eos_token` and the other special tokens the tokenizer names, passed to
    /// the template as variables (as transformers passes them).
    pub tokens: BTreeMap<String, String>,
}

/// What `strftime_now` reads: the local clock, or a fixed time (tests, reproducible runs).
pub type Clock = Option<chrono::NaiveDateTime>;

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("tokens", &self.tokens)
            .finish_non_exhaustive()
    }
}

fn template_error(e: minijinja::Error) -> Error {
    // the message and the line it points at; `raise_exception`'s text as the template gave it
    let mut msg = match (e.kind(), e.detail()) {
        (ErrorKind::InvalidOperation, Some(d)) => d.to_string(),
        _ => e.to_string(),
    };
    if let Some(line) = e.line() {
        msg.push_str(&format!(" (template line {line})"));
    }
    Error::Template(msg)
}

/// Turn formats known by the control tokens that mark them, for a GGUF file that has no
/// template of its own (Gemma 3 270M's published file has none): its name, those tokens,
/// and a template writing it as the family's own template does.
pub const TURN_FORMATS: &[(&str, [&str; 2], &str)] = &[
    (
        "Gemma",
        ["<start_of_turn>", "<end_of_turn>"],
        // a system message opens the first user turn; the assistant's turns are `model`
        "{{ bos_token }}{% set ns = namespace(system='') %}{% for m in messages %}\
         {% if m.role == 'system' %}{% set ns.system = m.content ~ '\n\n' %}{% else %}\
         <start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n\
         {{ ns.system ~ m.content | trim }}<end_of_turn>\n{% set ns.system = '' %}\
         {% endif %}{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
    ),
    (
        "ChatML",
        ["<|im_start|>", "<|im_end|>"],
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n\
         {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    ),
];

/// The name of the turn format `source` is, when it is one of [`TURN_FORMATS`].
pub fn turn_format(source: &str) -> Option<&'static str> {
    TURN_FORMATS
        .iter()
        .find(|(_, _, s)| *s == source)
        .map(|(name, ..)| *name)
}

/// The instructions one rendering may run before it is stopped with an error.
const TEMPLATE_FUEL: u64 = 2_000_000;

impl ChatTemplate {
    /// Compile `source` with the special tokens it will see (`bos_token`, `eos_token`, …).
    pub fn new(source: &str, tokens: BTreeMap<String, String>) -> Result<Self> {
        Self::with_clock(source, tokens, None)
    }

    /// [`ChatTemplate::new`] with `strftime_now` reading `clock`.
    pub fn with_clock(
        source: &str,
        tokens: BTreeMap<String, String>,
        clock: Clock,
    ) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // a template from a downloaded file must end: a bound on the instructions one
        // rendering runs (a long tool-calling conversation takes a few thousand)
        env.set_fuel(Some(TEMPLATE_FUEL));
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function(
            "strftime_now",
            move |fmt: String| -> std::result::Result<String, minijinja::Error> {
                use std::fmt::Write;
                let now = clock.unwrap_or_else(|| chrono::Local::now().naive_local());
                // a format with an unknown directive fails to write (to_string would panic)
                let mut out = String::new();
                write!(out, "{}", now.format(&fmt)).map_err(|_| {
                    minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        format!("strftime_now: {fmt:?} is not a date format"),
                    )
                })?;
                Ok(out)
            },
        );
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source.to_string())
            .map_err(template_error)?;
        Ok(Self {
            env,
            source: source.to_string(),
            tokens,
        })
    }

    /// The template a model folder or GGUF file publishes, `None` when it has none:
    /// `chat_template.jinja`, else `tokenizer_config.json`'s `chat_template` (a string, or
    /// a list of named templates of which `default` is taken); a GGUF file's
    /// `tokenizer.chat_template`. Special tokens come from `tokenizer_config.json` or the
    /// GGUF vocabulary.
    pub fn for_model(path: &Path) -> Result<Option<Self>> {
        if crate::arch::is_gguf(path) {
            return Self::from_gguf(path);
        }
        let config_path = path.join("tokenizer_config.json");
        let config: serde_json::Value = match std::fs::read_to_string(&config_path) {
            Ok(t) => serde_json::from_str(&t).map_err(|e| Error::parse(&config_path, e))?,
            Err(_) => serde_json::Value::Null,
        };
        let mut tokens = BTreeMap::new();
        for key in [
            "bos_token",
            "eos_token",
            "unk_token",
            "pad_token",
            "sep_token",
            "cls_token",
            "mask_token",
        ] {
            let text = match config.get(key) {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(v) => v.get("content").and_then(|c| c.as_str()).map(String::from),
                None => None,
            };
            if let Some(t) = text {
                tokens.insert(key.to_string(), t);
            }
        }
        let file = path.join("chat_template.jinja");
        let source = if file.exists() {
            Some(std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?)
        } else {
            match config.get("chat_template") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template")?.as_str())
                    .map(String::from),
                _ => None,
            }
        };
        let origin = if file.exists() { file } else { config_path };
        source
            .map(|s| Self::new(&s, tokens).map_err(|e| Error::parse(&origin, e)))
            .transpose()
    }

    fn from_gguf(path: &Path) -> Result<Option<Self>> {
        use crate::weights::gguf::{GgufFile, Value as G};
        let f = GgufFile::open(path)?;
        let vocab = match f.get("tokenizer.ggml.tokens") {
            Some(G::Array(a)) => a.as_slice(),
            _ => &[],
        };
        // a file without a template whose vocabulary marks turns as a known format
        // has (some published GGUF files carry none), that format
        let has = |t: &str| vocab.iter().any(|v| v.as_str() == Some(t));
        let source = match f.get("tokenizer.chat_template").and_then(|v| v.as_str()) {
            Some(s) => s,
            None => match TURN_FORMATS
                .iter()
                .find(|(_, marks, _)| marks.iter().all(|m| has(m)))
            {
                Some((_, _, source)) => source,
                None => return Ok(None),
            },
        };
        let mut tokens = BTreeMap::new();
        for (key, name) in [
            ("tokenizer.ggml.bos_token_id", "bos_token"),
            ("tokenizer.ggml.eos_token_id", "eos_token"),
            ("tokenizer.ggml.unknown_token_id", "unk_token"),
            ("tokenizer.ggml.padding_token_id", "pad_token"),
        ] {
            let text = f
                .get(key)
                .and_then(|v| v.as_u64())
                .and_then(|id| vocab.get(id as usize))
                .and_then(|v| v.as_str());
            if let Some(t) = text {
                tokens.insert(name.to_string(), t.to_string());
            }
        }
        Self::new(source, tokens)
            .map(Some)
            .map_err(|e| Error::parse(path, e))
    }

    /// The prompt text of `messages`; with `add_generation_prompt`, followed by what opens
    /// the assistant's turn. A conversation the template refuses (through
    /// `raise_exception`) is an error carrying the template's message.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let messages =
            serde_json::to_value(messages).map_err(|e| Error::Template(e.to_string()))?;
        self.render_json(&messages, add_generation_prompt, &serde_json::Map::new())
    }

    /// [`ChatTemplate::render`] on messages as JSON (any fields: tool calls, names…; keys
    /// whose value is null are dropped, as transformers drops them), with `extra` variables
    /// (`tools`, `documents`, `enable_thinking`, …). `tools` and `documents` are defined
    /// (none) unless given.
    pub fn render_json(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        let tmpl = self.env.get_template("chat").map_err(template_error)?;
        let mut ctx: BTreeMap<String, Value> = self
            .tokens
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        let messages: Vec<serde_json::Value> = match messages {
            serde_json::Value::Array(list) => list
                .iter()
                .map(|m| match m {
                    serde_json::Value::Object(o) => serde_json::Value::Object(
                        o.iter()
                            .filter(|(_, v)| !v.is_null())
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect(),
                    ),
                    other => other.clone(),
                })
                .collect(),
            _ => return Err(Error::Template("messages must be a list".into())),
        };
        ctx.insert("messages".into(), Value::from_serialize(&messages));
        ctx.insert("tools".into(), Value::from(()));
        ctx.insert("documents".into(), Value::from(()));
        for (k, v) in extra {
            ctx.insert(k.clone(), Value::from_serialize(v));
        }
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        tmpl.render(ctx).map_err(template_error)
    }
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent, sort_keys=sort_keys)`:
/// `", "` and `": "` between items without an indent, `","` and a newline with one.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    write_json(&json, indent, sort_keys.unwrap_or(false), 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn write_json(
    v: &serde_json::Value,
    indent: Option<usize>,
    sort: bool,
    depth: usize,
    out: &mut String,
) {
    use serde_json::Value as J;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * depth));
        }
    };
    let sep = if indent.is_some() { "," } else { ", " };
    match v {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, depth + 1);
                write_json(item, indent, sort, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(map) if !map.is_empty() => {
            out.push('{');
            let mut entries: Vec<(&String, &J)> = map.iter().collect();
            if sort {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            for (i, (k, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, depth + 1);
                out.push_str(&serde_json::Value::String(k.clone()).to_string());
                out.push_str(": ");
                write_json(item, indent, sort, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        J::Number(n) if n.is_f64() => {
            // Python writes a float that is whole as `1.0`
            let f = n.as_f64().unwrap_or(0.0);
            if f.fract() == 0.0 && f.abs() < 1e16 {
                out.push_str(&format!("{f:.1}"));
            } else {
                out.push_str(&n.to_string());
            }
        }
        other => out.push_str(&other.to_string()),
    }
}

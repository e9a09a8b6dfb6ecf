//! Chat templates rendered by routelm against transformers' `apply_chat_template`, string
//! for string: the published templates of the families routelm loads (SmolLM2, Gemma 2 and
//! 3, Llama 3.1/3.2, Qwen 2.5/3, Phi-3.5, Mistral, DeepSeek-V3.1), plain and multi-turn
//! conversations, Unicode, tools, extra variables and the conversations a template refuses.
//! The expected strings come from scripts/make_chat_fixtures.py.

use std::collections::BTreeMap;

use routelm::chat::{ChatTemplate, Message};
use serde_json::Value;

#[test]
fn templates_render_as_transformers_renders_them() {
    let text = std::fs::read_to_string("tests/fixtures/chat/templates.json").unwrap();
    let templates: Vec<Value> = serde_json::from_str(&text).unwrap();
    let (mut checked, mut refused, mut failures) = (0, 0, Vec::new());
    for t in &templates {
        let name = t["name"].as_str().unwrap();
        let mut tokens = BTreeMap::new();
        for key in ["bos_token", "eos_token"] {
            if let Some(s) = t[key].as_str() {
                tokens.insert(key.to_string(), s.to_string());
            }
        }
        for (k, v) in t["extra"].as_object().into_iter().flatten() {
            tokens.insert(k.clone(), v.as_str().unwrap().to_string());
        }
        let clock = chrono::NaiveDateTime::parse_from_str(
            t["strftime_now_date"].as_str().unwrap(),
            "%Y-%m-%dT%H:%M:%S",
        )
        .unwrap();
        let tmpl = ChatTemplate::with_clock(t["template"].as_str().unwrap(), tokens, Some(clock))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        for case in t["cases"].as_array().unwrap() {
            let id = case["id"].as_str().unwrap();
            let mut extra = serde_json::Map::new();
            if let Some(tools) = case.get("tools") {
                extra.insert("tools".into(), tools.clone());
            }
            for (k, v) in case["kwargs"].as_object().into_iter().flatten() {
                extra.insert(k.clone(), v.clone());
            }
            let gen = case["add_generation_prompt"].as_bool().unwrap();
            let got = tmpl.render_json(&case["messages"], gen, &extra);
            match (case.get("expected"), case.get("error"), got) {
                (Some(want), _, Ok(got)) if want.as_str() == Some(got.as_str()) => checked += 1,
                (_, Some(want), Err(e)) => {
                    let msg = e.to_string();
                    if msg.contains(want.as_str().unwrap()) {
                        refused += 1;
                    } else {
                        failures.push(format!("{name}/{id}: error {msg:?}, want {want}"));
                    }
                }
                (want, err, got) => failures.push(format!(
                    "{name}/{id}:\n  got  {got:?}\n  want {:?}",
                    want.or(err)
                )),
            }
        }
    }
    println!("{checked} renderings equal transformers', {refused} refusals with its message");
    assert!(
        failures.is_empty(),
        "{} cases differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        checked >= 100 && refused >= 10,
        "too few cases ran: {checked} + {refused}"
    );
}

/// A template that asks `strftime_now` for a format with an unknown directive gets a
/// template error, not a panic (found by the chat_template fuzz target; its input is in
/// fuzz/regressions/chat_template/).
#[test]
fn a_bad_date_format_is_a_template_error() {
    let t = ChatTemplate::new(
        "{{ strftime_now(\"%d %] %Y\") }}{{ messages[0].content }}",
        Default::default(),
    )
    .unwrap();
    let err = t
        .render(&[Message::new("user", "hi")], true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("is not a date format"), "{err}");
    let ok = ChatTemplate::new("{{ strftime_now(\"%d %b %Y\") }}", Default::default()).unwrap();
    assert!(ok.render(&[Message::new("user", "hi")], true).is_ok());
}

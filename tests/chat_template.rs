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

/// A GGUF file without a template whose vocabulary has Gemma's turn tokens (as the
/// published Gemma 3 270M file) chats in Gemma's format: the fixture's Gemma vocabulary
/// picks it, and it renders the conversations Gemma 3's own template accepts as
/// transformers renders them with that template (the ones it refuses, two users in a row
/// or an assistant first, are not checked: this format does not enforce the alternation).
#[test]
fn a_gguf_without_a_template_takes_the_turn_format_its_vocabulary_marks() {
    use routelm::chat::template::{turn_format, TURN_FORMATS};
    let gguf = std::path::Path::new("tests/fixtures/gguf/tokenizer-gemma.gguf");
    let picked = ChatTemplate::for_model(gguf).unwrap().expect("a template");
    assert_eq!(turn_format(&picked.source), Some("Gemma"));
    let text = std::fs::read_to_string("tests/fixtures/chat/templates.json").unwrap();
    let templates: Vec<Value> = serde_json::from_str(&text).unwrap();
    let gemma3 = templates.iter().find(|t| t["name"] == "gemma3").unwrap();
    let mut tokens = BTreeMap::new();
    tokens.insert(
        "bos_token".to_string(),
        gemma3["bos_token"].as_str().unwrap().to_string(),
    );
    let source = TURN_FORMATS.iter().find(|f| f.0 == "Gemma").unwrap().2;
    let tmpl = ChatTemplate::new(source, tokens).unwrap();
    let mut checked = 0;
    for case in gemma3["cases"].as_array().unwrap() {
        let Some(want) = case["expected"].as_str() else {
            continue;
        };
        let gen = case["add_generation_prompt"].as_bool().unwrap();
        let got = tmpl
            .render_json(&case["messages"], gen, &serde_json::Map::new())
            .unwrap();
        assert_eq!(got, want, "{}", case["id"]);
        checked += 1;
    }
    assert_eq!(checked, 8);
    // ChatML's markers pick ChatML; a vocabulary without turn tokens has no template
    let chatml = std::path::Path::new("tests/fixtures/gguf/tokenizer-default.gguf");
    let t = ChatTemplate::for_model(chatml)
        .unwrap()
        .expect("a template");
    assert_eq!(turn_format(&t.source), Some("ChatML"));
    let msgs = [
        Message::new("system", "Be brief."),
        Message::new("user", "Hi"),
    ];
    assert_eq!(
        t.render(&msgs, true).unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    let plain = std::path::Path::new("tests/fixtures/gguf/tokenizer-llama-spm.gguf");
    assert!(ChatTemplate::for_model(plain).unwrap().is_none());
}

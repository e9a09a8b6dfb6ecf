//! A chat template (the input's first part) rendered over messages and extra variables
//! (its second and third parts, JSON), as `chat` and `serve` render them.
#![no_main]
use libfuzzer_sys::fuzz_target;
use routelm::chat::ChatTemplate;
use routelm_fuzz::parts;

fuzz_target!(|data: &[u8]| {
    let p = parts(data, 3);
    let Ok(source) = std::str::from_utf8(p[0]) else {
        return;
    };
    let tokens = [("bos_token", "<s>"), ("eos_token", "</s>")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let Ok(t) = ChatTemplate::new(source, tokens) else {
        return;
    };
    let messages = serde_json::from_slice(p[1])
        .unwrap_or_else(|_| serde_json::json!([{"role": "user", "content": "Hi"}]));
    let extra = match serde_json::from_slice(p[2]) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => Default::default(),
    };
    let _ = t.render_json(&messages, true, &extra);
});

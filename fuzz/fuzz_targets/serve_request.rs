//! A request body for `/v1/chat/completions` or `/v1/completions` (the first byte picks),
//! parsed as the server parses it, against a small model: every refusal is a 4xx.
#![no_main]
use candle_core::{DType, Device};
use libfuzzer_sys::fuzz_target;
use routelm::chat::ChatModel;
use routelm::serve::http::{parse_chat, parse_completion};
use std::sync::OnceLock;

fn model() -> &'static ChatModel {
    static MODEL: OnceLock<ChatModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/hf/mixtral");
        ChatModel::load(dir.as_ref(), None, DType::F32, &Device::Cpu).expect("the fixture loads")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let parsed = if which % 2 == 0 {
        parse_chat(model(), 16, body)
    } else {
        parse_completion(model(), 16, body)
    };
    if let Err(e) = parsed {
        assert!(
            (400..500).contains(&e.status()),
            "a {} for a request: {}",
            e.status(),
            e.message()
        );
    }
});

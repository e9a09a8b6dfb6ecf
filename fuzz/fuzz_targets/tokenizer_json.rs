//! `tokenizer.json`: loaded, then used to encode and decode a text.
#![no_main]
use libfuzzer_sys::fuzz_target;
use routelm_fuzz::{folder, write};

fuzz_target!(|data: &[u8]| {
    let path = write(&folder("tokenizer_json"), "tokenizer.json", data);
    if let Ok(tok) = routelm::Tokenizer::from_file(&path) {
        if let Ok(ids) = tok.encode("Hello, world! <s> 123 ünïcödé\n\tend") {
            let _ = tok.decode(&ids);
            let _ = tok.tokens(&ids);
        }
        let _ = tok.decode(&[0, 1, 2, u32::MAX]);
    }
});

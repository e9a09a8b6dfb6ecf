//! A run file (TOML, and the same text as JSON): parsed, then the model and training
//! recipe resolved and checked.
#![no_main]
use libfuzzer_sys::fuzz_target;
use routelm::RunFile;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for is_json in [false, true] {
        if let Ok(run) = RunFile::parse(text, is_json) {
            if let Ok(cfg) = run.model.resolve("fuzz") {
                let _ = run.train.resolve(cfg.max_seq_len, "fuzz");
            }
        }
    }
});

//! `config.json` alone, through family detection and every family's adapter to a checked
//! model configuration.
#![no_main]
use libfuzzer_sys::fuzz_target;
use routelm_fuzz::{folder, write};

fuzz_target!(|data: &[u8]| {
    let dir = folder("config_json");
    write(&dir, "config.json", data);
    let _ = routelm::arch::load_config(&dir);
    let _ = routelm::arch::generation_defaults(&dir);
});

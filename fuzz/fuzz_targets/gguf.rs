//! A GGUF file: header, metadata, tensor table; the config read from the metadata, the
//! tokenizer and chat template it carries, and the model built from it running two tokens.
#![no_main]
use candle_core::{DType, Device, Tensor};
use libfuzzer_sys::fuzz_target;
use routelm::chat::{ChatTemplate, Message};
use routelm_fuzz::{folder, write};

fuzz_target!(|data: &[u8]| {
    let path = write(&folder("gguf"), "model.gguf", data);
    if routelm::weights::gguf::GgufFile::open(&path).is_err() {
        return;
    }
    let _ = routelm::arch::load_config(&path);
    if let Ok(tok) = routelm::Tokenizer::from_gguf(&path) {
        if let Ok(ids) = tok.encode("Hello, world! ünïcödé") {
            let _ = tok.decode(&ids);
        }
    }
    if let Ok(Some(t)) = ChatTemplate::for_model(&path) {
        let _ = t.render(&[Message::new("user", "Hi")], true);
    }
    if let Ok(loaded) = routelm::arch::load_dir(&path, DType::F32, &Device::Cpu) {
        let vocab = loaded.model.config.vocab_size as u32;
        let ids = Tensor::new(&[[0u32, vocab.saturating_sub(1)]], &Device::Cpu).unwrap();
        let _ = loaded.model.forward(&ids, None, false);
    }
});

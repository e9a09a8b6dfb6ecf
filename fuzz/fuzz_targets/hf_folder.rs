//! A model folder, `config.json` and `model.safetensors` (the input's two parts): the
//! family adapters, the tensor table checked against the config, and the model built from
//! it, which then runs two tokens.
#![no_main]
use candle_core::{DType, Device, Tensor};
use libfuzzer_sys::fuzz_target;
use routelm_fuzz::{folder, parts, write};

fuzz_target!(|data: &[u8]| {
    let p = parts(data, 2);
    let dir = folder("hf_folder");
    write(&dir, "config.json", p[0]);
    write(&dir, "model.safetensors", p[1]);
    if let Ok(loaded) = routelm::arch::load_dir(&dir, DType::F32, &Device::Cpu) {
        let model = loaded.model;
        let vocab = model.config.vocab_size as u32;
        let ids = Tensor::new(&[[0u32, vocab.saturating_sub(1)]], &Device::Cpu).unwrap();
        let _ = model.forward(&ids, None, false);
    }
});

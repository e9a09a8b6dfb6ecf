//! A safetensors file: the length prefix, the JSON header, the tensor table and the data,
//! read the ways routelm reads weights (f32 and converted to bf16).
#![no_main]
use candle_core::{DType, Device};
use libfuzzer_sys::fuzz_target;
use routelm_fuzz::{folder, write};

fuzz_target!(|data: &[u8]| {
    let path = write(&folder("safetensors"), "model.safetensors", data);
    if routelm::weights::read_header(&path).is_ok() {
        let _ = routelm::weights::load_safetensors(&path, None, &Device::Cpu);
        let _ = routelm::weights::load_safetensors(&path, Some(DType::BF16), &Device::Cpu);
    }
});

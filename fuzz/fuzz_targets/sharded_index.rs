//! `model.safetensors.index.json` of a sharded folder (the input), over a fixed config and
//! two fixed shards: the index's names and files checked against the shards.
#![no_main]
use candle_core::{DType, Device};
use libfuzzer_sys::fuzz_target;
use routelm_fuzz::{folder, write};

const SEED: &[u8] = include_bytes!("../seeds/sharded_index/folder.bin");

fuzz_target!(|data: &[u8]| {
    // the seed folder: config | shard 1 | shard 2 | index (the last is what is fuzzed)
    let fixed = routelm_fuzz::parts(SEED, 4);
    let dir = folder("sharded_index");
    write(&dir, "config.json", fixed[0]);
    write(&dir, "model-00001-of-00002.safetensors", fixed[1]);
    write(&dir, "model-00002-of-00002.safetensors", fixed[2]);
    write(&dir, "model.safetensors.index.json", data);
    let _ = routelm::arch::read_weights(&dir, DType::F32, &Device::Cpu);
    let _ = routelm::arch::load_dir(&dir, DType::F32, &Device::Cpu);
});

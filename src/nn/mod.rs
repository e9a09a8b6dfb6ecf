//! Layers the transformer is built from, each small and configured by plain values.
//! Nothing here knows about files or model families; every layer takes its weights
//! as tensors and branches only on config options.

pub mod attention;
pub mod bf16;
pub mod causal_attention;
pub mod cpu;
pub mod decode_attention;
pub mod grouped;
pub mod kv_cache;
pub mod linear;
pub mod matvec;
pub mod mlp;
pub mod norm;
pub mod ops;
pub mod qmatmul;
pub mod relative;
pub mod rope;

pub use attention::{Attention, Positions};
pub use kv_cache::KvCache;
pub use linear::Linear;
pub use mlp::Mlp;
pub use norm::Norm;
pub use rope::RopeTables;

//! Model configuration in two stages (STYLE 3): [`ModelConfigFile`] (`file`) is what a
//! person writes, with optional fields and unknown keys rejected; it resolves to a
//! [`ModelConfig`] (`model`), validated by [`ModelConfig::problems`] (`validate`).

mod file;
mod lora;
mod model;
pub mod options;
mod validate;

pub use file::{parse_resolved, DepthFile, ModelConfigFile, MoeFile};
pub use lora::{LoraConfig, SHORT_TARGETS};
pub use model::*;
pub use validate::MAX_LAYERS;

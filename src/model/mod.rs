//! The transformer: embedding → blocks → final norm → head, built from a
//! [`crate::config::ModelConfig`] and a name → tensor map. The model knows nothing about
//! files; `weights/` produces the map, `train/` owns the variables behind it.

pub mod block;
pub mod cache;
pub mod init;
pub mod lora;
pub mod retrofit;
pub mod transformer;
pub mod upcycle;

pub use cache::{Cache, KvCache};
pub use transformer::{ForwardOptions, Loss, Model, ModelOutput, TokenRoute};

//! routelm: train and run conditional-computation transformer language models
//! (Mixture-of-Experts, Mixture-of-Depths) on candle, and load published open weights.
//!
//! Data flows one way: config → [`ModelConfig`] → [`Model`]; text → [`Tokenizer`] → ids →
//! [`Model::forward`] → logits; training adds loss → backward → AdamW → checkpoint.
//! See ARCHITECTURE.md for the module map and its invariants.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod arch;
pub mod chat;
pub mod config;
pub mod error;
pub mod flops;
pub mod generate;
pub mod model;
pub mod nn;
pub mod perplexity;
pub mod report;
pub mod rng;
pub mod routing;
pub mod serve;
pub mod tokenize;
pub mod train;
pub mod verify;
pub mod weights;

pub use config::{ModelConfig, ModelConfigFile};
pub use error::{Error, Result};
pub use flops::FlopLedger;
pub use model::{Model, ModelOutput};
pub use tokenize::{Build as TokenizerBuild, Tokenizer};
pub use train::{RunFile, TrainConfig, TrainConfigFile, Trainer};

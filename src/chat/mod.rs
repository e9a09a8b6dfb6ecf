//! Talking to instruct models: chat templates ([`ChatTemplate`]) and the pieces `routelm
//! chat` and `routelm serve` share.

pub mod template;

pub use template::{ChatTemplate, Message};

//! `routelm serve`: an OpenAI-compatible HTTP server with continuous batching
//! ([`engine`]), its API ([`http`]), Prometheus metrics ([`metrics`]) and a page that
//! shows the routers at work.

pub mod engine;
pub mod http;
pub mod metrics;

pub use engine::{Engine, Limits};
pub use http::{router, serve, AppState, Timeouts};
pub use metrics::Metrics;

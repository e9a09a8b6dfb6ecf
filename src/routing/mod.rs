//! Routing: a router turns token rows into a choice (which rows go where, with which
//! weight), and dispatch gathers the chosen rows, runs the computation on them only and
//! adds the weighted results back. Mixture-of-Experts uses it to choose experts.

pub mod depth;
pub mod dispatch;
pub mod moe;
pub mod router;

pub use depth::{update_scale, DepthChoice, DepthDecision, DepthRouter, DepthStats, DepthStep};
pub use dispatch::{dispatch, Routing};
pub use moe::{update_selection_bias, MoeLayer, MoeStats, StackedExperts};
pub use router::{choose_experts, top_k, RouterChoice};

//! Plots (PNG, with plotters) and Markdown tables of what runs produced.

pub mod plot;

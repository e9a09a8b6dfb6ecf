//! The server's counters, gauges and latency histograms, written in Prometheus' text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// A latency histogram with fixed buckets (seconds).
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    /// Sum in microseconds.
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, seconds: f64) {
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            if seconds <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_us
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let n = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {n}");
    }
}

const TTFT: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
const PER_TOKEN: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

/// Everything `/metrics` reports.
pub struct Metrics {
    pub requests: AtomicU64,
    /// Refused: queue full, or a request larger than the cache budget.
    pub rejected: AtomicU64,
    /// Failed inside the engine.
    pub failed: AtomicU64,
    /// Clients that went away before their answer ended.
    pub cancelled: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    /// Batched decoding steps.
    pub steps: AtomicU64,
    /// Prefill passes (one per group of prompts prefilled together).
    pub prefills: AtomicU64,
    pub queued: AtomicU64,
    pub running: AtomicU64,
    pub cache_bytes: AtomicU64,
    pub cache_limit_bytes: AtomicU64,
    /// Time to first token, from the request's arrival.
    pub ttft: Histogram,
    /// Time between a request's tokens.
    pub token_latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            steps: AtomicU64::new(0),
            prefills: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            running: AtomicU64::new(0),
            cache_bytes: AtomicU64::new(0),
            cache_limit_bytes: AtomicU64::new(0),
            ttft: Histogram::new(TTFT),
            token_latency: Histogram::new(PER_TOKEN),
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let series: [(&str, &str, &AtomicU64, &str); 12] = [
            (
                "routelm_requests_total",
                "counter",
                &self.requests,
                "Completion requests received.",
            ),
            (
                "routelm_requests_rejected_total",
                "counter",
                &self.rejected,
                "Requests refused (queue full or over the cache budget).",
            ),
            (
                "routelm_requests_failed_total",
                "counter",
                &self.failed,
                "Requests that failed in the engine.",
            ),
            (
                "routelm_requests_cancelled_total",
                "counter",
                &self.cancelled,
                "Requests whose client went away before the end.",
            ),
            (
                "routelm_prompt_tokens_total",
                "counter",
                &self.prompt_tokens,
                "Prompt tokens prefilled.",
            ),
            (
                "routelm_completion_tokens_total",
                "counter",
                &self.completion_tokens,
                "Tokens generated.",
            ),
            (
                "routelm_decode_steps_total",
                "counter",
                &self.steps,
                "Batched decoding steps.",
            ),
            (
                "routelm_prefills_total",
                "counter",
                &self.prefills,
                "Prefill passes; prompts that arrive together are prefilled in one.",
            ),
            (
                "routelm_queue_depth",
                "gauge",
                &self.queued,
                "Requests waiting for a slot.",
            ),
            (
                "routelm_running_requests",
                "gauge",
                &self.running,
                "Requests being decoded.",
            ),
            (
                "routelm_kv_cache_bytes",
                "gauge",
                &self.cache_bytes,
                "KV-cache bytes held by running requests.",
            ),
            (
                "routelm_kv_cache_limit_bytes",
                "gauge",
                &self.cache_limit_bytes,
                "KV-cache budget.",
            ),
        ];
        for (name, kind, v, help) in series {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        self.ttft.write(
            &mut out,
            "routelm_time_to_first_token_seconds",
            "From a request's arrival to its first token.",
        );
        self.token_latency.write(
            &mut out,
            "routelm_time_per_output_token_seconds",
            "Between consecutive tokens of a request.",
        );
        out
    }
}

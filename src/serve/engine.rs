//! Continuous batching. One thread owns the model; requests wait in a bounded queue and
//! join the running batch between steps (the prompts that arrived meanwhile prefilled
//! together, [`crate::Model::prefill_batch`], in groups of similar length), every step
//! decodes one token of every running request in one batched forward
//! ([`crate::Model::decode_batch`]), and a request leaves as soon as it finishes or its
//! client goes away (its receiver dropped). The caches of the running requests together stay under a
//! memory budget: a request is admitted when its prompt plus its token limit fits.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;
use tokio::sync::mpsc::UnboundedSender;

use super::metrics::Metrics;
use crate::chat::ChatModel;
use crate::error::Result;
use crate::generate::warm::KeepWarm;
use crate::generate::{top_n, Finish, GenerateConfig, Sequence};
use crate::model::{Cache, TokenRoute};

/// One request for the engine.
pub struct Job {
    pub prompt: Vec<u32>,
    pub cfg: GenerateConfig,
    /// Log-probabilities of the chosen token and of this many alternatives (`None`: off).
    pub logprobs: Option<usize>,
    /// Report each token's route (experts, routed blocks).
    pub routes: bool,
    pub events: UnboundedSender<Event>,
    pub enqueued: Instant,
}

impl Job {
    /// Positions the request's cache may hold: its prompt plus `max_tokens`, within the
    /// context window of `ctx`.
    fn positions(&self, ctx: usize) -> usize {
        (self.prompt.len() + self.cfg.max_tokens).min(ctx)
    }
}

/// A token's log-probability under the model (raw logits, before sampling settings) and the
/// most likely alternatives.
#[derive(Debug, Clone)]
pub struct TokenLogprob {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// What the engine tells a request.
#[derive(Debug, Clone)]
pub enum Event {
    Token {
        id: u32,
        text: String,
        logprob: Option<TokenLogprob>,
        /// The path of the step that predicted this token (for the first, the prompt's
        /// last token's).
        route: Option<TokenRoute>,
    },
    Done {
        finish: Finish,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// The request failed: an HTTP status and a message.
    Error { status: u16, message: String },
}

/// Engine settings.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Requests decoded together at most.
    pub parallel: usize,
    /// Requests waiting for a slot at most (more are refused).
    pub queue: usize,
    /// Bytes of KV cache of the running requests at most.
    pub cache_bytes: usize,
}

/// The handle the HTTP side holds.
#[derive(Clone)]
pub struct Engine {
    tx: SyncSender<Job>,
    pub metrics: Arc<Metrics>,
    /// Cache bytes one token takes (all layers).
    pub bytes_per_token: usize,
    pub limits: Limits,
}

/// Why a job was not queued.
pub enum Refused {
    /// The queue is full (503, retry later).
    Busy,
    /// The engine stopped.
    Stopped,
}

impl Engine {
    /// Start the engine thread on `cm`.
    pub fn start(cm: Arc<ChatModel>, limits: Limits, metrics: Arc<Metrics>) -> Result<Self> {
        let bytes_per_token = cache_bytes_per_token(&cm)?;
        // every weight's product layout before the first request, not during it
        cm.model.prepare_products();
        metrics
            .cache_limit_bytes
            .store(limits.cache_bytes as u64, Ordering::Relaxed);
        let (tx, rx) = sync_channel(limits.queue);
        let m = metrics.clone();
        // The engine loop runs as a worker of a thread pool of its own, as the model's
        // parallel loops want: started from outside a pool, each loop hands its whole job
        // to a worker and sleeps until it is done (a decoded token makes a few hundred of
        // them: SmolLM2 decoded at 47 instead of 124 tokens/s), and the process's global
        // pool may have workers blocked serving HTTP.
        let threads = rayon::current_num_threads();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("routelm-engine-{i}"))
            .build()
            .map_err(|e| crate::error::Error::Generate(format!("engine threads: {e}")))?;
        std::thread::Builder::new()
            .name("routelm-engine".into())
            .spawn(move || pool.install(|| run(&cm, rx, limits, bytes_per_token, &m)))
            .map_err(|e| crate::error::Error::Generate(format!("engine thread: {e}")))?;
        Ok(Self {
            tx,
            metrics,
            bytes_per_token,
            limits,
        })
    }

    /// Queue a job, or say why not.
    pub fn submit(&self, job: Job) -> std::result::Result<(), Refused> {
        self.metrics.queued.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
                self.metrics.rejected.fetch_add(1, Ordering::Relaxed);
                Err(match e {
                    TrySendError::Full(_) => Refused::Busy,
                    TrySendError::Disconnected(_) => Refused::Stopped,
                })
            }
        }
    }
}

/// KV-cache bytes per token of every layer: one token fed through a fresh cache.
fn cache_bytes_per_token(cm: &ChatModel) -> Result<usize> {
    let mut cache = cm.model.new_cache();
    let ids = Tensor::new(&[[0u32]], cm.model.device())?;
    cm.model.forward(&ids, Some(&mut cache), true)?;
    Ok(cache.layers.iter().map(|l| l.bytes_per_token()).sum())
}

/// A request being decoded.
struct Running {
    seq: Sequence,
    cache: Cache,
    /// The token to feed next.
    last: u32,
    logprobs: Option<usize>,
    routes: bool,
    events: UnboundedSender<Event>,
    prompt_tokens: usize,
    /// Cache bytes reserved for it.
    reserved: usize,
    last_token_at: Instant,
    done: bool,
}

impl Running {
    /// Sample from `row`, tell the client; false when the client is gone.
    fn emit(
        &mut self,
        row: &[f32],
        route: Option<TokenRoute>,
        cm: &ChatModel,
        metrics: &Metrics,
    ) -> Result<()> {
        let s = self.seq.push(row, &cm.tok)?;
        let logprob = self.logprobs.map(|n| logprob_of(row, s.id, n));
        let now = Instant::now();
        metrics
            .token_latency
            .observe(now.duration_since(self.last_token_at).as_secs_f64());
        self.last_token_at = now;
        metrics.completion_tokens.fetch_add(1, Ordering::Relaxed);
        let sent = self.events.send(Event::Token {
            id: s.id,
            text: s.text,
            logprob,
            route: if self.routes { route } else { None },
        });
        self.last = s.id;
        if sent.is_err() {
            self.done = true;
            metrics.cancelled.fetch_add(1, Ordering::Relaxed);
        } else if let Some(finish) = s.finish {
            self.finish(finish);
        }
        Ok(())
    }

    fn finish(&mut self, finish: Finish) {
        let _ = self.events.send(Event::Done {
            finish,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.seq.new_tokens(),
        });
        self.done = true;
    }
}

/// `log p(id)` under `softmax(row)` and the `n` most likely tokens' log-probabilities.
fn logprob_of(row: &[f32], id: u32, n: usize) -> TokenLogprob {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max
        + row
            .iter()
            .map(|&v| ((v - max) as f64).exp())
            .sum::<f64>()
            .ln() as f32;
    TokenLogprob {
        logprob: row.get(id as usize).map_or(f32::NEG_INFINITY, |&v| v - lse),
        top: top_n(row, n)
            .into_iter()
            .map(|(i, l)| (i, l - lse))
            .collect(),
    }
}

fn run(cm: &ChatModel, rx: Receiver<Job>, limits: Limits, bytes_per_token: usize, m: &Metrics) {
    let mut running: Vec<Running> = Vec::new();
    // a job that did not fit in the cache budget yet: it goes first when room frees up
    let mut waiting: Option<Job> = None;
    // the pool's other workers polling for work while sequences decode, asleep while idle
    let mut warm: Option<KeepWarm> = None;
    loop {
        // admit: between steps, while slots and cache budget allow
        let mut admitted: Vec<(Job, usize)> = Vec::new();
        while running.len() + admitted.len() < limits.parallel {
            let job = match waiting.take() {
                Some(j) => j,
                None if running.is_empty() && admitted.is_empty() => match rx.recv() {
                    Ok(j) => j,
                    Err(_) => return,
                },
                None => match rx.try_recv() {
                    Ok(j) => j,
                    Err(_) => break,
                },
            };
            if job.events.is_closed() {
                m.queued.fetch_sub(1, Ordering::Relaxed);
                m.cancelled.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let need = job.positions(cm.model.config.max_seq_len) * bytes_per_token;
            let reserved: usize = running.iter().map(|r| r.reserved).sum::<usize>()
                + admitted.iter().map(|(_, need)| need).sum::<usize>();
            if need > limits.cache_bytes {
                m.queued.fetch_sub(1, Ordering::Relaxed);
                m.rejected.fetch_add(1, Ordering::Relaxed);
                let _ = job.events.send(Event::Error {
                    status: 400,
                    message: format!(
                        "the request needs {} MiB of KV cache (prompt plus max_tokens), more than the server's limit of {} MiB: ask for fewer tokens",
                        need >> 20,
                        limits.cache_bytes >> 20
                    ),
                });
                continue;
            }
            if reserved + need > limits.cache_bytes {
                waiting = Some(job);
                break;
            }
            m.queued.fetch_sub(1, Ordering::Relaxed);
            admitted.push((job, need));
        }
        for group in by_length(admitted, prefills_together(&cm.model)) {
            running.extend(admit(cm, group, m));
        }
        running.retain(|r| !r.done && !r.events.is_closed());
        m.running.store(running.len() as u64, Ordering::Relaxed);
        m.cache_bytes.store(
            running
                .iter()
                .map(|r| (r.cache.pos() * bytes_per_token) as u64)
                .sum(),
            Ordering::Relaxed,
        );
        if running.is_empty() {
            warm = None;
            continue;
        }
        warm.get_or_insert_with(KeepWarm::start);
        let step = catch_unwind(AssertUnwindSafe(|| step(cm, &mut running, m)));
        let failure = match step {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("internal error (a panic in the decoding step)".to_string()),
        };
        if let Some(message) = failure {
            // the batch's state is unknown: every running request fails, the engine goes on
            for r in running.drain(..) {
                m.failed.fetch_add(1, Ordering::Relaxed);
                let _ = r.events.send(Event::Error {
                    status: 500,
                    message: message.clone(),
                });
            }
        }
    }
}

/// Rows (prompt tokens with padding) of one prefill pass at most. The products' speed per
/// row levels off at a few hundred rows (`routelm bench prefill --tokens`: 40 → 320 rows
/// is 2.9× the tokens/s for moe-8x in f32, 1.25× for SmolLM2 in Q4_1), while every prompt
/// of a pass waits for the whole pass: long prompts gain nothing from company.
const PREFILL_ROWS: usize = 256;

/// Whether prompts that arrive together are prefilled in one pass: where a prompt alone
/// gives the products few rows, experts (each sees its share of a prompt's rows) and
/// f32/bf16 weights (SmolLM2 from its f32 folder). Quantized kernels run near their
/// speed on one short prompt already (SmolLM2 Q4_1, 8 clients of 8-word prompts:
/// aggregate unchanged, median time to first token 200–300 ms alone, 420–550 ms
/// together), and a shared pass makes the first prompt wait for the last.
fn prefills_together(model: &crate::model::Model) -> bool {
    let (values, bytes) = model.stored_read();
    model.config.moe_layers().next().is_some() || bytes >= 2 * values
}

/// Jobs in groups to prefill together (each alone unless `together`): by prompt length,
/// each group padded to its longest prompt with at most half as many padding tokens as
/// prompt tokens, and at most [`PREFILL_ROWS`] rows.
fn by_length(mut jobs: Vec<(Job, usize)>, together: bool) -> Vec<Vec<(Job, usize)>> {
    if !together {
        return jobs.into_iter().map(|j| vec![j]).collect();
    }
    jobs.sort_by_key(|(j, _)| j.prompt.len());
    let mut groups: Vec<Vec<(Job, usize)>> = Vec::new();
    let mut tokens = 0;
    for job in jobs {
        let len = job.0.prompt.len();
        match groups.last_mut() {
            // sorted: the new job is the group's longest
            Some(g)
                if 2 * len * (g.len() + 1) <= 3 * (tokens + len)
                    && len * (g.len() + 1) <= PREFILL_ROWS =>
            {
                tokens += len;
                g.push(job);
            }
            _ => {
                tokens = len;
                groups.push(vec![job]);
            }
        }
    }
    groups
}

/// Prefill the jobs' prompts together and emit each one's first token: the jobs that
/// started and did not end at once. When the group's prefill fails (a prompt the model
/// refuses), each job is prefilled alone, so that only the bad one gets the error.
fn admit(cm: &ChatModel, jobs: Vec<(Job, usize)>, m: &Metrics) -> Vec<Running> {
    type Prefilled = (Vec<Cache>, Vec<Vec<f32>>, Vec<TokenRoute>);
    let prefill = |prompts: &[&[u32]]| -> Result<Prefilled> {
        catch_unwind(AssertUnwindSafe(|| -> Result<Prefilled> {
            let (caches, logits, routes) = cm.model.prefill_batch(prompts)?;
            let rows = logits.to_dtype(candle_core::DType::F32)?.to_vec2()?;
            Ok((caches, rows, routes))
        }))
        .unwrap_or_else(|_| {
            Err(crate::error::Error::Generate(
                "internal error (a panic in the prefill)".into(),
            ))
        })
    };
    let prompts: Vec<&[u32]> = jobs.iter().map(|(j, _)| j.prompt.as_slice()).collect();
    let together = match prompts.len() {
        1 => None,
        _ => prefill(&prompts).ok(),
    };
    // one pass for the group (failed or not), then one per prompt when it failed
    let passes = match (prompts.len(), &together) {
        (_, Some(_)) => 1,
        (1, None) => 1,
        (n, None) => n + 1,
    };
    m.prefills.fetch_add(passes as u64, Ordering::Relaxed);
    let outcomes: Vec<Result<(Cache, Vec<f32>, TokenRoute)>> = match together {
        Some((caches, rows, routes)) => caches
            .into_iter()
            .zip(rows)
            .zip(routes)
            .map(|((c, r), t)| Ok((c, r, t)))
            .collect(),
        None => prompts
            .iter()
            .map(|p| {
                let (c, r, t) = prefill(std::slice::from_ref(p))?;
                match (
                    c.into_iter().next(),
                    r.into_iter().next(),
                    t.into_iter().next(),
                ) {
                    (Some(c), Some(r), Some(t)) => Ok((c, r, t)),
                    _ => Err(crate::error::Error::Generate("empty prefill".into())),
                }
            })
            .collect(),
    };
    let mut started = Vec::new();
    let ctx = cm.model.config.max_seq_len;
    for ((job, reserved), outcome) in jobs.into_iter().zip(outcomes) {
        // the cache takes the request's whole length now, once, instead of doubling
        // (and copying itself) as it grows
        let outcome = outcome.and_then(|(mut c, r, t)| {
            c.reserve(job.positions(ctx))?;
            Ok((c, r, t))
        });
        let (cache, row, route) = match outcome {
            Ok(x) => x,
            Err(e) => {
                m.failed.fetch_add(1, Ordering::Relaxed);
                let _ = job.events.send(Event::Error {
                    status: 400,
                    message: e.to_string(),
                });
                continue;
            }
        };
        match catch_unwind(AssertUnwindSafe(|| {
            begin(cm, job, reserved, cache, &row, route, m)
        })) {
            Ok(Some(r)) => started.push(r),
            Ok(None) => {}
            Err(_) => {
                m.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    started
}

/// Start a prefilled job: its first token from `row`, the logits after its prompt; `None`
/// when it already ended.
fn begin(
    cm: &ChatModel,
    job: Job,
    reserved: usize,
    cache: Cache,
    row: &[f32],
    route: TokenRoute,
    m: &Metrics,
) -> Option<Running> {
    let model = &cm.model;
    m.prompt_tokens
        .fetch_add(job.prompt.len() as u64, Ordering::Relaxed);
    m.ttft.observe(job.enqueued.elapsed().as_secs_f64());
    let limit = job
        .cfg
        .max_tokens
        .min(model.config.max_seq_len - job.prompt.len());
    let mut r = Running {
        prompt_tokens: job.prompt.len(),
        seq: Sequence::new(job.prompt, limit, &job.cfg),
        cache,
        last: 0,
        logprobs: job.logprobs,
        routes: job.routes,
        events: job.events,
        reserved,
        last_token_at: Instant::now(),
        done: false,
    };
    if limit == 0 {
        r.finish(Finish::Length);
        return None;
    }
    if let Err(e) = r.emit(row, Some(route), cm, m) {
        let _ = r.events.send(Event::Error {
            status: 500,
            message: e.to_string(),
        });
        return None;
    }
    (!r.done).then_some(r)
}

/// One batched decoding step of every running request.
fn step(cm: &ChatModel, running: &mut [Running], m: &Metrics) -> Result<()> {
    let tokens: Vec<u32> = running.iter().map(|r| r.last).collect();
    let mut caches: Vec<&mut Cache> = running.iter_mut().map(|r| &mut r.cache).collect();
    let (logits, routes) = cm.model.decode_batch(&tokens, &mut caches)?;
    let rows: Vec<Vec<f32>> = logits.to_dtype(candle_core::DType::F32)?.to_vec2()?;
    m.steps.fetch_add(1, Ordering::Relaxed);
    for ((r, row), route) in running.iter_mut().zip(rows).zip(routes) {
        r.emit(&row, Some(route), cm, m)?;
    }
    Ok(())
}

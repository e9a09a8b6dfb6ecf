//! The Mixture-of-Experts feed-forward layer: router → top-k choice → per-expert gather,
//! one FFN call on exactly the rows routed to each expert, gate-weighted indexed add back
//! (Shazeer et al., 2017; Switch, arXiv:2101.03961; Mixtral, arXiv:2401.04088). No
//! [tokens × experts × d] tensor exists and no expert runs on a token it was not chosen for.

use candle_core::{DType, Result, Tensor, D};

use super::dispatch::{dispatch, Routing};
use super::router::{choose_experts, top_k};
use crate::config::{MoeConfig, Scoring, Selection};
use crate::nn::grouped::{grouped_swiglu, weighted_scatter};
use crate::nn::ops::{sigmoid, softmax_in_place};
use crate::nn::{Linear, Mlp};

/// What one MoE layer's router did in a forward pass.
#[derive(Debug, Clone)]
pub struct MoeStats {
    pub layer: usize,
    /// `(tokens, n_experts)` router logits (before softmax or sigmoid).
    pub router_logits: Tensor,
    /// Assignments per expert (after capacity dropping), the no-op experts last.
    pub load: Vec<usize>,
    /// Assignments dropped by the capacity limit, of `assignments` in all.
    pub dropped: usize,
    pub assignments: usize,
    /// Mean entropy (nats) of the per-token expert distribution.
    pub entropy: f64,
    /// Weighted balancing and z losses, when their coefficients are set.
    pub aux_loss: Option<Tensor>,
    /// For each token (row), the experts it went to, ascending (no-op experts, numbered
    /// after the real ones, included; a dropped assignment is not).
    pub token_experts: Vec<Vec<u32>>,
}

impl MoeStats {
    /// One layer's statistics over two sets of rows (a routed block that ran its tokens in
    /// groups): loads and counts add, the entropy and auxiliary loss are row-weighted means.
    pub fn merge(self, other: MoeStats) -> Result<MoeStats> {
        let (n1, n2) = (self.router_logits.dim(0)?, other.router_logits.dim(0)?);
        let (w1, w2) = (
            n1 as f64 / (n1 + n2).max(1) as f64,
            n2 as f64 / (n1 + n2).max(1) as f64,
        );
        let aux_loss = match (self.aux_loss, other.aux_loss) {
            (Some(a), Some(b)) => Some(((a * w1)? + (b * w2)?)?),
            (a, b) => a.or(b),
        };
        Ok(MoeStats {
            layer: self.layer,
            router_logits: Tensor::cat(&[self.router_logits, other.router_logits], 0)?,
            load: self
                .load
                .iter()
                .zip(&other.load)
                .map(|(a, b)| a + b)
                .collect(),
            dropped: self.dropped + other.dropped,
            assignments: self.assignments + other.assignments,
            entropy: self.entropy * w1 + other.entropy * w2,
            aux_loss,
            token_experts: [self.token_experts, other.token_experts].concat(),
        })
    }
}

/// Random routing: `k` distinct experts of `n_experts` for each of `n` tokens, uniformly,
/// drawn from a hash of the layer and the token's router scores (`host`, `(n, slots)`):
/// a pure function of the pass's inputs, so a run reproduces from its seed and resumes
/// exactly, and unrelated to which experts the scores favour (a hash of their bits, not
/// their order).
fn random_experts(
    host: &[f32],
    n: usize,
    n_experts: usize,
    k: usize,
    layer: usize,
) -> super::router::RouterChoice {
    let slots = host.len() / n.max(1);
    let mut pool: Vec<u32> = (0..n_experts as u32).collect();
    let mut experts = Vec::with_capacity(n * k);
    for row in host.chunks(slots.max(1)).take(n) {
        let seed = row.iter().fold(0x5EED ^ ((layer as u64) << 40), |h, v| {
            crate::rng::Rng::new(h ^ v.to_bits() as u64).next_u64()
        });
        let mut rng = crate::rng::Rng::new(seed);
        for j in 0..k {
            let r = j + rng.below(n_experts - j);
            pool.swap(j, r);
        }
        let mut chosen = pool[..k].to_vec();
        chosen.sort_unstable();
        experts.extend(chosen);
    }
    super::router::RouterChoice {
        n_tokens: n,
        k,
        experts,
    }
}

/// Where the tokens go (one group per expert, the no-op experts last), and what that
/// cost in dropped assignments.
struct Routed {
    routing: Routing,
    dropped: usize,
    assignments: usize,
    /// Token choice's per-token experts.
    choice: Option<super::router::RouterChoice>,
}

#[derive(Debug, Clone)]
pub struct MoeLayer {
    pub layer: usize,
    pub config: MoeConfig,
    /// `(n_experts + noop_experts, d_model)`.
    pub router: Tensor,
    /// Selection-only bias `(n_experts + noop_experts)`.
    pub selection_bias: Option<Tensor>,
    pub experts: Vec<Mlp>,
    pub shared: Option<Mlp>,
    pub shared_gate: Option<Linear>,
    /// The experts' weights held stacked (SwiGLU experts without biases): the experts' own
    /// projections are views of these, and the grouped op reads them without a copy.
    pub stacked: StackedExperts,
}

/// An MoE layer's SwiGLU expert weights, each kind in one tensor: `gate_up`
/// `(E·2·d_expert, d)` holds `[gate_e; up_e]` for each expert in turn, `down`
/// `(E·d, d_expert)` holds `down_e` for each expert in turn.
#[derive(Debug, Clone, Default)]
pub struct StackedExperts {
    pub gate_up: Option<Tensor>,
    pub down: Option<Tensor>,
}

impl MoeLayer {
    /// The experts' projections (the router stays a plain f32 product).
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v: Vec<&mut Linear> = Vec::new();
        for m in self.experts.iter_mut().chain(self.shared.iter_mut()) {
            v.extend(m.linears_mut());
        }
        v.extend(self.shared_gate.iter_mut());
        v
    }

    /// `x: (b, t, d)` → `(b, t, d)` and the router's statistics.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, MoeStats)> {
        self.forward_with(x, true)
    }

    /// [`MoeLayer::forward`], with the auxiliary losses only when `aux` (decoding skips
    /// them: nothing trains there).
    pub fn forward_with(&self, x: &Tensor, aux: bool) -> Result<(Tensor, MoeStats)> {
        let c = &self.config;
        let (b, t, d) = x.dims3()?;
        let n = b * t;
        // router outputs (n, E): the experts, then the no-op experts (integrated MoDE)
        let e_count = c.slots();
        let xs = x.reshape((n, d))?;
        let logits = crate::nn::matvec::matmul_t(&xs, &self.router)?;
        // decoding (a few rows, nothing to train): scores, choice and gate weights on the
        // host, from one copy of the logits
        let on_host = n <= crate::nn::matvec::MAX_ROWS
            && !aux
            && !c.expert_choice
            && logits.dtype() == DType::F32
            && !logits.track_op()
            && !matches!(c.scoring, Scoring::SparseMixer { .. });
        // the score tensor, when the gate weights are taken from it (not on the host)
        let scores = match c.scoring {
            _ if on_host => None,
            Scoring::Softmax => Some(candle_nn::ops::softmax(&logits, D::Minus1)?),
            Scoring::Sigmoid => Some(candle_nn::ops::sigmoid(&logits)?),
            // choices by logit; weights below
            Scoring::SparseMixer { .. } => Some(logits.clone()),
        };
        let host: Vec<f32> = match &scores {
            None => host_scores(logits.flatten_all()?.to_vec1()?, e_count, c.scoring),
            Some(s) => s.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
        };
        let routed = match (&scores, c.expert_choice) {
            (Some(s), true) => self.expert_choice(s, &host, b, t)?,
            (None, true) => candle_core::bail!("expert choice needs the score tensor"),
            (s, false) => self.token_choice(&logits, s.as_ref(), &host, n, x.device())?,
        };
        let Routed {
            routing,
            dropped,
            assignments,
            choice,
        } = routed;
        let out = if let (1, 0, Some(choice)) = (n, dropped, &choice) {
            self.one_token(&xs, &routing.weights, &choice.experts)?
        } else {
            let mut out = self.run_experts(&xs, &routing)?;
            if let Some(shared) = &self.shared {
                out = (out + self.gate_shared(&xs, shared.forward(&xs)?)?)?;
            }
            out
        };
        let load: Vec<usize> = routing.rows.iter().map(|r| r.len()).collect();
        let mut token_experts = vec![Vec::new(); n];
        for (e, rows) in routing.rows.iter().enumerate() {
            for &r in rows {
                token_experts[r as usize].push(e as u32);
            }
        }
        let entropy = match c.scoring {
            Scoring::SparseMixer { .. } => {
                let p = candle_nn::ops::softmax(&logits, D::Minus1)?;
                let p: Vec<f32> = p.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                mean_entropy(&p, e_count, Scoring::Softmax)
            }
            s => mean_entropy(&host, e_count, s),
        };
        let aux_loss = match (aux, &scores) {
            // nothing to balance or keep small: the router is not used
            _ if c.selection == Selection::Random => None,
            (true, Some(s)) => self.aux_loss(&logits, s, &load, n)?,
            _ => None,
        };
        let stats = MoeStats {
            layer: self.layer,
            router_logits: logits,
            load,
            dropped,
            assignments,
            entropy,
            aux_loss,
            token_experts,
        };
        Ok((out.reshape((b, t, d))?, stats))
    }

    /// One token (decoding): its chosen experts (weights `w`, in `experts` order) and the
    /// shared expert run directly, their products in two parallel regions; no gather or
    /// scatter. No-op experts add nothing.
    fn one_token(&self, xs: &Tensor, w: &Tensor, experts: &[u32]) -> Result<Tensor> {
        let mut mlps = Vec::new();
        let mut slots = Vec::new();
        for (j, &e) in experts.iter().enumerate() {
            if let Some(expert) = self.experts.get(e as usize) {
                mlps.push(expert);
                slots.push(j);
            }
        }
        mlps.extend(&self.shared);
        let mut ys = Mlp::forward_many(&mlps, xs)?;
        let shared = if self.shared.is_some() {
            ys.pop()
        } else {
            None
        };
        let mut out = combine(&ys, w, &slots)?.map_or_else(|| xs.zeros_like(), Ok)?;
        if let Some(s) = shared {
            out = (out + self.gate_shared(xs, s)?)?;
        }
        Ok(out)
    }

    /// The shared expert's output `s`, times its sigmoid gate when it has one.
    fn gate_shared(&self, xs: &Tensor, s: Tensor) -> Result<Tensor> {
        match &self.shared_gate {
            Some(g) => s.broadcast_mul(&candle_nn::ops::sigmoid(&g.forward(xs)?)?),
            None => Ok(s),
        }
    }

    /// Token choice: each token's top-k experts (selection bias and groups applied), the
    /// weights from the unbiased scores, and per-expert rows past the capacity dropped.
    /// `scores`: the score tensor the gate weights are gathered from (so the router
    /// learns); `None` when decoding, where they are computed from the host copy `host`.
    fn token_choice(
        &self,
        logits: &Tensor,
        scores: Option<&Tensor>,
        host: &[f32],
        n: usize,
        device: &candle_core::Device,
    ) -> Result<Routed> {
        let c = &self.config;
        let e_count = c.slots();
        let bias: Option<Vec<f32>> = match &self.selection_bias {
            Some(bt) => Some(bt.to_dtype(DType::F32)?.to_vec1()?),
            None => None,
        };
        let random = c.selection == Selection::Random;
        let choice = match random {
            true => random_experts(host, n, c.n_experts, c.top_k, self.layer),
            false => choose_experts(
                host,
                e_count,
                c.top_k,
                bias.as_deref(),
                c.n_groups,
                c.topk_groups,
            ),
        };

        let w = self.gate_weights(logits, scores, host, &choice, n, device)?;
        let (rows, slots, dropped) = self.assign(&choice.experts, n);
        Ok(Routed {
            routing: Routing {
                rows,
                slots,
                weights: w,
            },
            dropped,
            assignments: n * c.top_k,
            choice: Some(choice),
        })
    }

    /// The chosen experts' gate weights `(n · top_k)`, from the unbiased scores: gathered
    /// from the score tensor so the router learns, or computed on the host copy `host` when
    /// decoding (`scores` `None`); equal for every chosen expert under random selection.
    fn gate_weights(
        &self,
        logits: &Tensor,
        scores: Option<&Tensor>,
        host: &[f32],
        choice: &super::router::RouterChoice,
        n: usize,
        device: &candle_core::Device,
    ) -> Result<Tensor> {
        let c = &self.config;
        let e_count = c.slots();
        let random = c.selection == Selection::Random;
        let flat: Vec<u32> = (0..n * c.top_k)
            .map(|s| ((s / c.top_k) * e_count) as u32 + choice.experts[s])
            .collect();
        // the epsilon keeps renormalised weights finite when every chosen score underflows
        const NORM_EPS: f64 = 1e-20;
        Ok(if random {
            // the router has no say: every chosen expert weighs the same
            let each = (c.routed_scale / c.top_k as f64) as f32;
            Tensor::from_vec(vec![each; n * c.top_k], n * c.top_k, device)?
                .to_dtype(logits.dtype())?
        } else if let Some(scores) = scores {
            let flat = Tensor::from_vec(flat, n * c.top_k, device)?;
            let mut w = match c.scoring {
                Scoring::SparseMixer { eps } => sparse_mixer_weights(logits, host, choice, eps)?,
                _ => scores
                    .flatten_all()?
                    .index_select(&flat, 0)?
                    .reshape((n, c.top_k))?,
            };
            if c.norm_topk {
                w = w.broadcast_div(&(w.sum_keepdim(1)? + NORM_EPS)?)?;
            }
            if c.routed_scale != 1.0 {
                w = (w * c.routed_scale)?;
            }
            w.flatten_all()?
        } else {
            // decoding: the same arithmetic on the host values, without a dozen tiny ops
            let mut w: Vec<f32> = flat.iter().map(|&i| host[i as usize]).collect();
            for row in w.chunks_mut(c.top_k) {
                let sum = row.iter().sum::<f32>() + NORM_EPS as f32;
                for v in row {
                    if c.norm_topk {
                        *v /= sum;
                    }
                    *v *= c.routed_scale as f32;
                }
            }
            Tensor::from_vec(w, n * c.top_k, device)?
        })
    }

    /// Each expert's rows and weight slots for the choice `experts` (`top_k` a token, `n`
    /// tokens), and how many assignments the capacity dropped (the latest tokens past it).
    fn assign(&self, experts: &[u32], n: usize) -> (Vec<Vec<u32>>, Vec<Vec<u32>>, usize) {
        let c = &self.config;
        let e_count = c.slots();
        let capacity = c
            .capacity_factor
            .map(|cf| ((cf * (n * c.top_k) as f64) / e_count as f64).ceil() as usize);
        let mut rows: Vec<Vec<u32>> = vec![Vec::new(); e_count];
        let mut slots: Vec<Vec<u32>> = vec![Vec::new(); e_count];
        let mut dropped = 0;
        for (s, &e) in experts.iter().enumerate() {
            let e = e as usize;
            if e < c.n_experts && capacity.is_some_and(|cap| rows[e].len() >= cap) {
                dropped += 1;
                continue;
            }
            rows[e].push((s / c.top_k) as u32);
            slots[e].push(s as u32);
        }
        (rows, slots, dropped)
    }

    /// Expert choice (Zhou et al., 2022, arXiv:2202.09368), per sequence: each expert takes
    /// the `⌈capacity_factor · t · top_k / n_experts⌉` tokens that score it highest, weighted
    /// by their scores; a token may get several experts or none. The choice looks at the
    /// whole sequence, so it is not causal.
    fn expert_choice(&self, scores: &Tensor, host: &[f32], b: usize, t: usize) -> Result<Routed> {
        let c = &self.config;
        let e_count = c.n_experts;
        let per = ((c.capacity_factor.unwrap_or(1.0) * (t * c.top_k) as f64) / e_count as f64)
            .ceil()
            .clamp(1.0, t as f64) as usize;
        let mut rows: Vec<Vec<u32>> = vec![Vec::new(); e_count];
        let mut slots: Vec<Vec<u32>> = vec![Vec::new(); e_count];
        let mut pairs: Vec<u32> = Vec::with_capacity(b * e_count * per);
        for bi in 0..b {
            for e in 0..e_count {
                for i in top_k(0..t, per, |i| host[(bi * t + i) * e_count + e]) {
                    let token = bi * t + i;
                    rows[e].push(token as u32);
                    slots[e].push(pairs.len() as u32);
                    pairs.push((token * e_count + e) as u32);
                }
            }
        }
        let assignments = pairs.len();
        let pairs = Tensor::from_vec(pairs, assignments, scores.device())?;
        let mut w = scores.flatten_all()?.index_select(&pairs, 0)?;
        if c.routed_scale != 1.0 {
            w = (w * c.routed_scale)?;
        }
        Ok(Routed {
            routing: Routing {
                rows,
                slots,
                weights: w,
            },
            dropped: 0,
            assignments,
            choice: None,
        })
    }

    /// The routed experts on exactly their rows ([`dispatch`]): SwiGLU experts held stacked
    /// as one grouped op over the stacks, other kinds one product chain per expert.
    fn run_experts(&self, xs: &Tensor, routing: &Routing) -> Result<Tensor> {
        let out = dispatch(xs, routing, self.experts.len(), |xg, offsets| {
            let adapted = self.experts.iter().any(|m| {
                m.gate
                    .iter()
                    .chain([&m.up, &m.down])
                    .any(|l| l.lora.is_some())
            });
            if let (Some(gate_up), Some(down), false) =
                (&self.stacked.gate_up, &self.stacked.down, adapted)
            {
                // each expert's [gate_e; up_e] as one block: one product of the gathered rows
                // gives [g | u] per row (x is packed once, its gradient is one product)
                let bf16 = self.experts.iter().all(|m| m.up.bf16);
                return grouped_swiglu(xg, gate_up, down, offsets, bf16);
            }
            let mut mlps = Vec::with_capacity(self.experts.len());
            let mut inputs = Vec::with_capacity(self.experts.len());
            for (e, expert) in self.experts.iter().enumerate() {
                let rows = offsets[e + 1] - offsets[e];
                if rows > 0 {
                    mlps.push(expert);
                    inputs.push(xg.narrow(0, offsets[e], rows)?);
                }
            }
            // decoding: all the experts' products in two parallel regions
            let outs = if xs.dim(0)? <= crate::nn::matvec::MAX_ROWS && !xs.track_op() {
                Mlp::forward_each(&mlps, &inputs.iter().collect::<Vec<_>>())?
            } else {
                mlps.iter()
                    .zip(&inputs)
                    .map(|(m, x)| m.forward(x))
                    .collect::<Result<Vec<_>>>()?
            };
            Tensor::cat(&outs, 0)
        })?;
        out.map_or_else(|| xs.zeros_like(), Ok)
    }

    /// `coef_aux · E · Σ_e f_e P_e + coef_z · mean(logsumexp(logits)²)`, where `f_e` is the
    /// fraction of tokens sent to expert e and `P_e` its mean router probability.
    fn aux_loss(
        &self,
        logits: &Tensor,
        scores: &Tensor,
        load: &[usize],
        n: usize,
    ) -> Result<Option<Tensor>> {
        let c = &self.config;
        let mut total: Option<Tensor> = None;
        if c.aux_loss_coef > 0.0 {
            let probs = match c.scoring {
                Scoring::Softmax => scores.clone(),
                Scoring::SparseMixer { .. } => candle_nn::ops::softmax(logits, D::Minus1)?,
                Scoring::Sigmoid => scores.broadcast_div(&(scores.sum_keepdim(1)? + 1e-20)?)?,
            };
            let p = probs.mean(0)?; // (E)
            let f: Vec<f32> = load.iter().map(|&l| l as f32 / n as f32).collect();
            let f = Tensor::from_vec(f, load.len(), logits.device())?.to_dtype(p.dtype())?;
            let l = ((p * f)?.sum_all()? * (c.aux_loss_coef * load.len() as f64))?;
            total = Some(l);
        }
        if c.z_loss_coef > 0.0 {
            let max = logits.max_keepdim(1)?;
            let lse = (logits.broadcast_sub(&max)?.exp()?.sum_keepdim(1)?.log()? + &max)?;
            let z = (lse.sqr()?.mean_all()? * c.z_loss_coef)?;
            total = Some(match total {
                Some(t) => (t + z)?,
                None => z,
            });
        }
        Ok(total)
    }
}

/// One step of auxiliary-loss-free balancing: each expert's selection bias moves by
/// `rate` toward the mean load (up when under-loaded, down when over-loaded).
pub fn update_selection_bias(bias: &mut [f32], load: &[usize], rate: f64) {
    let mean = load.iter().sum::<usize>() as f64 / load.len().max(1) as f64;
    for (b, &l) in bias.iter_mut().zip(load) {
        let l = l as f64;
        if l < mean {
            *b += rate as f32;
        } else if l > mean {
            *b -= rate as f32;
        }
    }
}

/// SparseMixer's weights `(n, k)`: for choice `j` of token `t`, the softmax of the token's
/// logits over the experts [`Scoring::SparseMixer`] keeps, taken at the chosen expert.
/// The masks are host-side constants; the softmax runs on the logits tensor.
fn sparse_mixer_weights(
    logits: &Tensor,
    host: &[f32],
    choice: &super::router::RouterChoice,
    eps: f64,
) -> Result<Tensor> {
    let (n, e) = logits.dims2()?;
    let k = choice.k;
    let mut mask = vec![0f32; n * k * e];
    let mut at = Vec::with_capacity(n * k);
    for t in 0..n {
        let s = &host[t * e..(t + 1) * e];
        let chosen = &choice.experts[t * k..(t + 1) * k];
        for j in 0..k {
            let best = chosen[j] as usize;
            let m = s[best];
            let row = &mut mask[(t * k + j) * e..(t * k + j + 1) * e];
            for (i, slot) in row.iter_mut().enumerate() {
                let taken = chosen[..j].contains(&(i as u32));
                let far = (m - s[i]) / s[i].abs().max(m) > (2.0 * eps) as f32;
                if taken || far {
                    *slot = f32::NEG_INFINITY;
                }
            }
            at.push(((t * k + j) * e + best) as u32);
        }
    }
    let mask = Tensor::from_vec(mask, (n, k, e), logits.device())?.to_dtype(logits.dtype())?;
    let p = candle_nn::ops::softmax(&logits.unsqueeze(1)?.broadcast_add(&mask)?, D::Minus1)?;
    let at = Tensor::from_vec(at, n * k, logits.device())?;
    p.flatten_all()?.index_select(&at, 0)?.reshape((n, k))
}

/// Softmax (per row of `e`) or sigmoid of router logits, on the host (the values candle's
/// ops give, to float rounding); SparseMixer chooses by the logits themselves.
fn host_scores(mut logits: Vec<f32>, e: usize, scoring: Scoring) -> Vec<f32> {
    match scoring {
        Scoring::Softmax => logits
            .chunks_mut(e.max(1))
            .for_each(|row| softmax_in_place(row, 1.0)),
        Scoring::Sigmoid => logits.iter_mut().for_each(|v| *v = sigmoid(*v)),
        Scoring::SparseMixer { .. } => {}
    }
    logits
}

fn mean_entropy(scores: &[f32], e: usize, scoring: Scoring) -> f64 {
    let n = scores.len() / e.max(1);
    let mut sum = 0f64;
    for row in scores.chunks(e) {
        let total: f64 = match scoring {
            Scoring::Softmax | Scoring::SparseMixer { .. } => 1.0,
            Scoring::Sigmoid => row.iter().map(|&v| v as f64).sum::<f64>().max(1e-20),
        };
        sum -= row
            .iter()
            .map(|&v| v as f64 / total)
            .filter(|&p| p > 0.0)
            .map(|p| p * p.ln())
            .sum::<f64>();
    }
    sum / n.max(1) as f64
}

/// `Σ_i w[slots[i]] · ys[i]` for one token's expert outputs `ys[i]: (1, d)` and its gate
/// weights `w: (k)`; `None` without experts. When nothing records gradients the sum is
/// taken on the host: as tensor ops it is 2k small ops, and as a `(1 × k)·(k × d)` matmul it
/// took 74 µs a layer of GEMM set-up, as much as the experts' products (bench decode, moe
/// preset).
fn combine(ys: &[Tensor], w: &Tensor, slots: &[usize]) -> Result<Option<Tensor>> {
    let Some(y0) = ys.first() else {
        return Ok(None);
    };
    let host = y0.dtype() == DType::F32
        && w.dtype() == DType::F32
        && !ys.iter().chain([w]).any(|t| t.track_op())
        && ys.iter().all(|y| y.dims() == y0.dims());
    if host {
        let wv = w.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; y0.elem_count()];
        for (y, &j) in ys.iter().zip(slots) {
            let wj = *wv
                .get(j)
                .ok_or_else(|| candle_core::Error::Msg(format!("no gate weight {j}")))?;
            for (o, v) in out.iter_mut().zip(y.flatten_all()?.to_vec1::<f32>()?) {
                *o += wj * v;
            }
        }
        return Ok(Some(Tensor::from_vec(out, y0.shape(), y0.device())?));
    }
    let at: Vec<u32> = slots.iter().map(|&j| j as u32).collect();
    let wk = w.index_select(&Tensor::new(at.as_slice(), w.device())?, 0)?;
    let flat = ys
        .iter()
        .map(|y| y.flatten_all())
        .collect::<Result<Vec<_>>>()?;
    let out = weighted_scatter(&Tensor::stack(&flat, 0)?, &wk, &vec![0; ys.len()], 1)?;
    Ok(Some(out.reshape(y0.shape())?))
}

//! Mixture-of-Depths (Raposo et al., 2024, arXiv:2404.02258): a per-block router scores
//! every token; the block runs on the chosen tokens only (gathered, with their original
//! positions for the rotary embedding and the causal order) and its update is added back
//! scaled by the router weight, `x + σ(r)·f(x)`; the other tokens pass unchanged.
//!
//! Training chooses the top-k of each sequence (k = ⌈capacity·T⌉), which looks at the
//! future; an auxiliary binary cross-entropy teaches a causal decider to predict that
//! choice, and sampling decides by its sign. The decider is the router's own logit (the
//! paper's first method) or, when configured, a small MLP predictor that reads the block
//! input with the gradient stopped, so it cannot change what the trunk learns (the second).
//! When every token is chosen (capacity 1) there is nothing to route and the block runs
//! unscaled, exactly as a plain block.

use candle_core::{DType, Result, Tensor};

use crate::config::{DepthConfig, DepthScale, DepthSkip, Selection};
use crate::nn::matvec::matmul_t;
use crate::routing::router::top_k;

/// How a routed block decides which tokens it processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DepthDecision {
    /// The top-k of each sequence by router logit (training; not causal).
    #[default]
    TopK,
    /// Each token by itself: processed when its router logit is positive (causal).
    Threshold,
}

/// What one routed block did in a forward pass.
#[derive(Debug, Clone)]
pub struct DepthStats {
    pub layer: usize,
    /// `(b, t)` router logits.
    pub router_logits: Tensor,
    /// `(b, t)` logits of the causal decider (the predictor's, else the router's): a
    /// token is processed at sampling time when its logit is positive.
    pub decision_logits: Tensor,
    /// Tokens processed, of `tokens`.
    pub selected: usize,
    pub tokens: usize,
    /// Top-k membership of each token (1 processed), row-major `(b, t)`.
    pub chosen: Vec<u8>,
    /// Weighted auxiliary BCE, in top-k mode.
    pub aux_loss: Option<Tensor>,
}

#[derive(Debug, Clone)]
pub struct DepthRouter {
    pub layer: usize,
    /// `(1, d_model)`.
    pub weight: Tensor,
    /// The MLP predictor's `(h, d_model)` and `(1, h)` weights.
    pub predictor: Option<(Tensor, Tensor)>,
    pub config: DepthConfig,
}

/// A uniform number in [0, 1) from a 64-bit hash of `x` (SplitMix64's finaliser).
fn unit(x: u64) -> f64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) as f64 / (u64::MAX as f64 + 1.0)
}

/// Random selection's draw for a token: a pure function of the pass's seed, the layer, the
/// sequence in the batch and the token's position, so a run reproduces from its seed and
/// a resumed run draws what the uninterrupted one would have.
fn draw(seed: u64, layer: usize, seq: usize, pos: usize) -> f64 {
    let mut z = seed;
    for part in [layer, seq, pos] {
        z = (unit(z ^ part as u64) * (u64::MAX as f64)) as u64;
    }
    unit(z)
}

/// Where a routed block's tokens sit and how they are chosen.
#[derive(Debug, Clone, Copy)]
pub struct DepthStep {
    /// Position of the first token (a cache's length).
    pub start: usize,
    pub decision: DepthDecision,
    /// Seed of random selection's draws ([`Selection::Random`]).
    pub seed: u64,
}

/// What a routed block's router chose in one forward pass.
#[derive(Debug, Clone)]
pub struct DepthChoice {
    /// Per sequence, the chosen positions in ascending order.
    pub rows: Vec<Vec<u32>>,
    /// `(b, t)` router logits: a chosen token's update is scaled by `σ(logit)`.
    pub logits: Tensor,
    /// Top-k took every token: nothing to route, the block runs as a plain block.
    pub all: bool,
    /// What the processed tokens' updates are multiplied by.
    pub scale: DepthScale,
    /// What the other tokens skip.
    pub skip: DepthSkip,
    pub stats: DepthStats,
}

impl DepthRouter {
    /// Choose the tokens of `x: (b, t, d)` (positions `step.start..`) the block processes.
    pub fn choose(&self, x: &Tensor, step: DepthStep) -> Result<DepthChoice> {
        let decision = step.decision;
        let (b, t, d) = x.dims3()?;
        let xs = x.reshape((b * t, d))?;
        let xs = match self.config.norm_input {
            true => {
                let ones = Tensor::ones(d, xs.dtype(), xs.device())?;
                crate::nn::ops::rms_norm(&xs, &ones, 1e-6)?
            }
            false => xs,
        };
        let logits = matmul_t(&xs, &self.weight)?.reshape((b, t))?;
        let k = ((self.config.capacity * t as f64).ceil() as usize).clamp(1, t);
        let random = self.config.selection == Selection::Random;
        let trains_decider =
            decision == DepthDecision::TopK && self.config.aux_loss_coef > 0.0 && k < t && !random;
        let decider = self.decider(&xs, &logits, trains_decider)?;
        let mut host = self.selection_scores(&logits, &decider, step)?;
        if self.config.keep_first && step.start == 0 && t > 0 {
            // the sequence's first token goes through whatever its score
            for row in &mut host {
                row[0] = f32::INFINITY;
            }
        }
        let every = self.config.capacity >= 1.0;
        let mut chosen = vec![0u8; b * t];
        let rows: Vec<Vec<u32>> = host
            .iter()
            .map(|row| match decision {
                DepthDecision::TopK => {
                    let mut sel: Vec<u32> = top_k(0..t, k, |i| row[i])
                        .iter()
                        .map(|&i| i as u32)
                        .collect();
                    sel.sort_unstable();
                    sel
                }
                // at capacity 1 every token goes through, however it is decided
                DepthDecision::Threshold if every => (0..t as u32).collect(),
                DepthDecision::Threshold => {
                    (0..t).filter(|&i| row[i] > 0.0).map(|i| i as u32).collect()
                }
            })
            .collect();
        for (bi, sel) in rows.iter().enumerate() {
            for &i in sel {
                chosen[bi * t + i as usize] = 1;
            }
        }
        let selected: usize = rows.iter().map(|r| r.len()).sum();
        let aux_loss = if trains_decider {
            Some(self.bce(&decider, &chosen)?)
        } else {
            None
        };
        let stats = DepthStats {
            layer: self.layer,
            router_logits: logits.clone(),
            decision_logits: decider,
            selected,
            tokens: b * t,
            chosen,
            aux_loss,
        };
        Ok(DepthChoice {
            rows,
            logits,
            all: (decision == DepthDecision::TopK && k == t) || every,
            scale: self.config.scale,
            skip: self.config.skip,
            stats,
        })
    }

    /// The causal decider's `(b, t)` logits: the predictor's, else the router's own. It
    /// reads the block input `xs: (b·t, d)` with the gradient stopped, so its auxiliary
    /// loss trains the decider alone and never pushes the residual stream.
    fn decider(&self, xs: &Tensor, logits: &Tensor, trains: bool) -> Result<Tensor> {
        let (b, t) = logits.dims2()?;
        let d = xs.dim(1)?;
        let xd = xs.detach();
        match &self.predictor {
            // on the RMS-normalised input: the residual stream's scale grows with depth
            Some((fc1, fc2)) => {
                let ones = Tensor::ones(d, xd.dtype(), xd.device())?;
                let xn = crate::nn::ops::rms_norm(&xd, &ones, 1e-6)?;
                matmul_t(&matmul_t(&xn, fc1)?.silu()?, fc2)?.reshape((b, t))
            }
            // the router's own score: the same values as `logits`, recomputed with the
            // gradient to its weight only when its loss trains it
            None if trains => matmul_t(&xd, &self.weight)?.reshape((b, t)),
            None => Ok(logits.clone()),
        }
    }

    /// Per sequence, the scores selection reads: the router's logits (top-k), the
    /// decider's (threshold 0), or uniform draws (random: top-k of them, or below the
    /// capacity).
    fn selection_scores(
        &self,
        logits: &Tensor,
        decider: &Tensor,
        step: DepthStep,
    ) -> Result<Vec<Vec<f32>>> {
        let (b, t) = logits.dims2()?;
        if self.config.selection != Selection::Random {
            return match step.decision {
                DepthDecision::TopK => logits,
                DepthDecision::Threshold => decider,
            }
            .to_dtype(DType::F32)?
            .to_vec2();
        }
        let c = self.config.capacity as f32;
        Ok((0..b)
            .map(|bi| {
                (0..t)
                    .map(|i| {
                        let u = draw(step.seed, self.layer, bi, step.start + i) as f32;
                        match step.decision {
                            DepthDecision::TopK => u,
                            DepthDecision::Threshold => c - u,
                        }
                    })
                    .collect()
            })
            .collect())
    }

    /// `coef · mean BCE(σ(logit), chosen)`: the decider's logit learns to predict top-k
    /// membership (targets per sequence), so its sign can decide causally at sampling time.
    fn bce(&self, logits: &Tensor, chosen: &[u8]) -> Result<Tensor> {
        let target: Vec<f32> = chosen.iter().map(|&c| c as f32).collect();
        let target =
            Tensor::from_vec(target, logits.shape(), logits.device())?.to_dtype(logits.dtype())?;
        // log(1 + e^z) - y·z, computed stably as relu(z) + log(1 + e^-|z|) - y·z
        let z = logits;
        let softplus = (z.relu()? + (z.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
        let bce = (softplus - (z * target)?)?.mean_all()?;
        bce * self.config.aux_loss_coef
    }
}

/// The factors on the processed tokens' updates from their router logits: `σ(r)`, or
/// with [`DepthScale::Unit`] `1 + σ(r) − sg(σ(r))` (exactly 1 in value, the gradient of
/// `σ(r)`; a ratio `σ(r) / sg(σ(r))` would be 0/0 where `σ(r)` underflows).
pub fn update_scale(logits: &Tensor, scale: DepthScale) -> Result<Tensor> {
    let s = candle_nn::ops::sigmoid(logits)?;
    match scale {
        DepthScale::Router => Ok(s),
        DepthScale::Unit => (&s - s.detach())? + 1.0,
    }
}

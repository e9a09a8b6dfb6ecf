//! Batched decoding: one new token for each of several sequences, each with its own cache
//! and position, in one pass through the layers. Every projection and feed-forward runs
//! once on all the rows (its weights read once per step, not once per sequence); attention
//! runs per sequence over its own keys. This is what a server's continuous batching steps.
//!
//! On a CPU the sequences are first shared out among the threads, each thread passing its
//! own group through the layers (see [`Model::decode_batch`]).

use candle_core::{Result as CResult, Tensor};
use serde::Serialize;

use super::{Cache, Model};
use crate::error::{Error, Result};
use crate::nn::attention::Projections;
use crate::nn::{KvCache, RopeTables};
use crate::routing::{DepthDecision, DepthRouter, DepthStats, DepthStep, MoeStats};

/// Where one decoded token went: the experts of each Mixture-of-Experts layer and, for each
/// routed (Mixture-of-Depths) block, whether the block processed it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TokenRoute {
    /// `(layer, experts)` for each MoE layer that saw the token (a skipped routed block's
    /// experts do not run).
    pub experts: Vec<(usize, Vec<u32>)>,
    /// `(layer, processed)` for each routed block.
    pub blocks: Vec<(usize, bool)>,
}

impl TokenRoute {
    /// The route of the last token of a forward pass of one sequence, from its router
    /// statistics. A routed block's experts ran on the tokens it chose only, so the last
    /// token, when chosen, is the last of their rows.
    pub fn of_last(moe: &[MoeStats], depth: &[DepthStats]) -> Self {
        let processed = |d: &DepthStats| d.chosen.last().is_some_and(|&c| c == 1);
        Self {
            experts: moe
                .iter()
                .filter(|m| {
                    depth
                        .iter()
                        .find(|d| d.layer == m.layer)
                        .is_none_or(processed)
                })
                .filter_map(|m| Some((m.layer, m.token_experts.last()?.clone())))
                .collect(),
            blocks: depth.iter().map(|d| (d.layer, processed(d))).collect(),
        }
    }
}

/// Groups [`Model::decode_batch`] makes at most: each reads all the weights once per step,
/// so many threads share out the regions of a few groups rather than each taking its own.
/// Measured on two virtual CPUs only (where two groups win for every model tried, from the
/// 20 MB MoE to dense-110m in f32); the bound keeps a many-core machine's weight reads to
/// four passes a step.
const MAX_DECODE_GROUPS: usize = 4;

impl Model {
    /// Feed `tokens[i]` to the sequence of `caches[i]`, every sequence one step at its own
    /// position, and return the next-token logits `(b, vocab)` and where each token went.
    /// The result equals feeding each sequence alone through [`Model::forward`] (the same
    /// arithmetic, rows batched). Models whose layers need a sequence to themselves
    /// (an encoder-decoder, latent attention, relative positions, LongRoPE's cache restart)
    /// run the sequences one by one.
    pub fn decode_batch(
        &self,
        tokens: &[u32],
        caches: &mut [&mut Cache],
    ) -> Result<(Tensor, Vec<TokenRoute>)> {
        if rayon::current_thread_index().is_none() {
            // on a worker of the thread pool, as Model::forward_with runs
            return rayon::scope(|_| self.decode_batch(tokens, caches));
        }
        let b = tokens.len();
        if b == 0 || caches.len() != b {
            return Err(Error::Generate(format!(
                "batched decoding takes one token per cache (got {b} tokens for {} caches)",
                caches.len()
            )));
        }
        let vocab = self.config.vocab_size;
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::Generate(format!(
                "token id {bad} is out of range for a vocabulary of {vocab}"
            )));
        }
        let ctx = self.config.max_seq_len;
        if let Some(c) = caches.iter().find(|c| c.pos() + 1 > ctx) {
            return Err(Error::Generate(format!(
                "sequence of {} tokens exceeds the context window of {ctx}",
                c.pos() + 1
            )));
        }
        let groups = match self.device().is_cpu() {
            true => rayon::current_num_threads().min(b).min(MAX_DECODE_GROUPS),
            false => 1,
        };
        if groups > 1 {
            return self.decode_groups(tokens, caches, groups);
        }
        self.decode_group(tokens, caches)
    }

    /// [`Model::decode_batch`] with the sequences in `groups` groups of (nearly) equal size,
    /// the groups in parallel, each through the layers on its own. A batched step is many
    /// short parallel regions (a few per layer), and between them the worker with nothing
    /// left to do falls asleep; waking it (a futex wake, an interrupt to a halted virtual
    /// CPU) costs about as much as the region gains. Each thread keeps busy with its own
    /// group instead, at the price of reading the weights once per group. On two virtual
    /// CPUs, 8 sequences a step: the 20 MB MoE (Q8_0) 2.2 → 1.8 ms, SmolLM2 Q4_1 11.1–14.8
    /// → 9.4–10.2 ms, dense-110m in f32 39–42 → 34–37 ms. The result is the same: each
    /// sequence's arithmetic does not depend on its company.
    fn decode_groups(
        &self,
        tokens: &[u32],
        caches: &mut [&mut Cache],
        groups: usize,
    ) -> Result<(Tensor, Vec<TokenRoute>)> {
        use rayon::prelude::*;
        let size = tokens.len().div_ceil(groups);
        let outs: Vec<Result<(Tensor, Vec<TokenRoute>)>> = tokens
            .par_chunks(size)
            .zip(caches.par_chunks_mut(size))
            .map(|(t, c)| self.decode_group(t, c))
            .collect();
        let mut logits = Vec::with_capacity(groups);
        let mut routes = Vec::with_capacity(tokens.len());
        for out in outs {
            let (l, r) = out?;
            logits.push(l);
            routes.extend(r);
        }
        Ok((Tensor::cat(&logits, 0)?, routes))
    }

    /// One group of [`Model::decode_batch`]'s sequences (checked there) in one pass.
    fn decode_group(
        &self,
        tokens: &[u32],
        caches: &mut [&mut Cache],
    ) -> Result<(Tensor, Vec<TokenRoute>)> {
        if tokens.len() == 1 || !self.batches_sequences() {
            let seqs: Vec<&[u32]> = tokens.iter().map(std::slice::from_ref).collect();
            return self.feed_each(&seqs, caches);
        }
        let starts: Vec<usize> = caches.iter().map(|c| c.pos()).collect();
        let out = self.decode_rows(tokens, &starts, caches)?;
        for c in caches.iter_mut() {
            c.advance(1);
        }
        Ok(out)
    }

    /// Feed `seqs[i]` to the sequence of `caches[i]`, one sequence at a time: the next-token
    /// logits `(n, vocab)` after each and where each one's last token went.
    fn feed_each(
        &self,
        seqs: &[&[u32]],
        caches: &mut [&mut Cache],
    ) -> Result<(Tensor, Vec<TokenRoute>)> {
        let mut logits = Vec::with_capacity(seqs.len());
        let mut routes = Vec::with_capacity(seqs.len());
        for (seq, cache) in seqs.iter().zip(caches.iter_mut()) {
            let ids = Tensor::new(*seq, self.device())?.unsqueeze(0)?;
            let out = self.forward(&ids, Some(&mut **cache), true)?;
            routes.push(TokenRoute::of_last(&out.moe, &out.depth));
            logits.push(out.logits.reshape((1, self.config.vocab_size))?);
        }
        Ok((Tensor::cat(&logits, 0)?, routes))
    }

    /// Whether several sequences' rows can run through the layers together: not for an
    /// encoder-decoder, latent attention, relative positions, LongRoPE's cache restart or
    /// expert-choice routing.
    fn batches_sequences(&self) -> bool {
        self.encoder.is_none()
            && self.relative.is_none()
            && self.restart_length().is_none()
            && self
                .blocks
                .iter()
                .all(|bl| matches!(bl.attn.proj, Projections::Standard { .. }))
            && !self.config.moe_layers().any(|(_, m)| m.expert_choice)
    }

    /// Prefill each prompt into a fresh cache of its own: the caches, the next-token logits
    /// `(n, vocab)` after each prompt and where each prompt's last token went, as
    /// [`Model::forward`] on each prompt alone gives them.
    ///
    /// The prompts run in one pass, right-padded to the longest (a token sees only the
    /// tokens before it, so padding changes nothing before it; each cache then forgets its
    /// padding), so every projection and expert reads its weights once for all the rows.
    /// Models that cannot run sequences together ([`Model::decode_batch`]'s), or whose
    /// padding would change the prompts' tokens (routed blocks, whose top-k or caches see
    /// it; experts with a capacity, where it takes slots), prefill one prompt at a time.
    pub fn prefill_batch(
        &self,
        prompts: &[&[u32]],
    ) -> Result<(Vec<Cache>, Tensor, Vec<TokenRoute>)> {
        let n = prompts.len();
        let ctx = self.config.max_seq_len;
        if let Some(p) = prompts.iter().find(|p| p.is_empty() || p.len() > ctx) {
            return Err(Error::Generate(format!(
                "a prompt of {} tokens: prompts take 1 to {ctx} tokens (the context window)",
                p.len()
            )));
        }
        let padded = n > 1
            && self.batches_sequences()
            && self.config.depth_layers().next().is_none()
            && !self
                .config
                .moe_layers()
                .any(|(_, m)| m.capacity_factor.is_some());
        if !padded {
            let mut caches: Vec<Cache> = prompts.iter().map(|_| self.new_cache()).collect();
            let (logits, routes) =
                self.feed_each(prompts, &mut caches.iter_mut().collect::<Vec<_>>())?;
            return Ok((caches, logits, routes));
        }
        let t = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let mut flat = Vec::with_capacity(n * t);
        for p in prompts {
            flat.extend_from_slice(p);
            // any id of the vocabulary pads; the prompt's own last one is such an id
            flat.extend(std::iter::repeat_n(p[p.len() - 1], t - p.len()));
        }
        let ids = Tensor::from_vec(flat, (n, t), self.device())?;
        self.check_ids(&ids)?;
        let lens: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
        let last: Vec<usize> = lens.iter().map(|l| l - 1).collect();
        let mut cache = self.new_cache();
        let out = self.forward_inner(
            &ids,
            0,
            &mut Some(&mut cache),
            super::ForwardOptions::default(),
            Some(&last),
        )?;
        cache.advance(t);
        let routes = (0..n)
            .map(|i| TokenRoute {
                experts: out
                    .moe
                    .iter()
                    .filter_map(|m| Some((m.layer, m.token_experts.get(i * t + last[i])?.clone())))
                    .collect(),
                blocks: Vec::new(),
            })
            .collect();
        let logits = out.logits.reshape((n, self.config.vocab_size))?;
        Ok((cache.split(&lens)?, logits, routes))
    }

    fn decode_rows(
        &self,
        tokens: &[u32],
        starts: &[usize],
        caches: &mut [&mut Cache],
    ) -> CResult<(Tensor, Vec<TokenRoute>)> {
        let b = tokens.len();
        let dev = self.device();
        // each row's embedding at its own position (learned positions differ per row)
        let rows = tokens
            .iter()
            .zip(starts)
            .map(|(&t, &s)| self.embed_tokens(&Tensor::new(&[[t]], dev)?, 1, 1, s))
            .collect::<CResult<Vec<_>>>()?;
        let mut x = Tensor::cat(&rows, 0)?;
        let rope = StepRope::new(self, starts)?;
        let all: Vec<usize> = (0..b).collect();
        let mut routes = vec![TokenRoute::default(); b];
        for l in 0..self.blocks.len() {
            let layer = LayerStep {
                model: self,
                l,
                rope: &rope,
            };
            x = match &self.routers[l] {
                None => layer.run(&x, &all, caches, &mut routes, None)?,
                Some(router) => layer.routed(&x, router, starts, caches, &mut routes)?,
            };
        }
        let x = self.norm.forward(&x)?;
        let logits = self.logits(x)?;
        Ok((logits.reshape((b, self.config.vocab_size))?, routes))
    }
}

/// Which rows of `x` (one token of each sequence, at positions `starts`) a routed block
/// processes, each row deciding by itself as it would alone, and the router logit of each
/// chosen row.
fn depth_choices(
    router: &DepthRouter,
    x: &Tensor,
    starts: &[usize],
) -> CResult<(Vec<usize>, Vec<Tensor>)> {
    let mut chosen = Vec::new();
    let mut gates = Vec::new();
    for (i, &start) in starts.iter().enumerate() {
        let step = DepthStep {
            start,
            decision: DepthDecision::Threshold,
            seed: 0,
        };
        let choice = router.choose(&x.narrow(0, i, 1)?, step)?;
        if !choice.rows[0].is_empty() {
            chosen.push(i);
            gates.push(choice.logits.reshape(1)?);
        }
    }
    Ok((chosen, gates))
}

/// One layer of a batched decoding step ([`Model::decode_batch`]).
struct LayerStep<'a> {
    model: &'a Model,
    l: usize,
    rope: &'a StepRope,
}

impl LayerStep<'_> {
    /// The block on `x`'s rows, which are the sequences `rows` (all of them, or the chosen
    /// ones). With `sel`, a routed block's sub-block runs on the selected rows alone
    /// (scaled), and the list beside it names the sequences the feed-forward saw; the
    /// experts each of them saw go to `routes`.
    fn run(
        &self,
        x: &Tensor,
        rows: &[usize],
        caches: &mut [&mut Cache],
        routes: &mut [TokenRoute],
        sel: Option<(Selected<'_>, &[usize])>,
    ) -> CResult<Tensor> {
        let (l, block) = (self.l, &self.model.blocks[self.l]);
        let rope = self.rope.of_rows(self.model.is_local(l), rows)?;
        let mut layer: Vec<&mut KvCache> = caches
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| rows.contains(i))
            .map(|(_, c)| &mut c.layers[l])
            .collect();
        let (attn_rows, ffn_rows, ffn) = match sel {
            None => (None, None, rows),
            Some((Selected::Attention(s), ffn)) => (Some(s), None, ffn),
            Some((Selected::FeedForward(s), ffn)) => (None, Some(s), ffn),
        };
        let (y, moe) = block
            .forward_decode(
                x,
                rope.as_ref().map(|(c, s)| (c, s)),
                &mut layer,
                attn_rows,
                ffn_rows,
            )
            .map_err(|e| e.context(format!("layer {l}")))?;
        if let Some(m) = moe {
            for (j, &i) in ffn.iter().enumerate() {
                if let Some(e) = m.token_experts.get(j) {
                    routes[i].experts.push((l, e.clone()));
                }
            }
        }
        Ok(y)
    }

    /// A routed block: each row decides by itself (as it would alone), the chosen rows run
    /// the block (or the sub-block the router skips) and add σ(r)·(block(x) − x).
    fn routed(
        &self,
        x: &Tensor,
        router: &DepthRouter,
        starts: &[usize],
        caches: &mut [&mut Cache],
        routes: &mut [TokenRoute],
    ) -> CResult<Tensor> {
        let (l, dev) = (self.l, x.device());
        let all: Vec<usize> = (0..starts.len()).collect();
        let (chosen, gates) = depth_choices(router, x, starts)?;
        for (i, route) in routes.iter_mut().enumerate() {
            route.blocks.push((l, chosen.contains(&i)));
        }
        // the chosen rows and their update scales σ(r)
        let idx: Vec<u32> = chosen.iter().map(|&i| i as u32).collect();
        let idx = Tensor::new(idx.as_slice(), dev)?;
        let scale = match gates.is_empty() {
            true => Tensor::zeros(0, x.dtype(), dev)?,
            false => crate::routing::update_scale(&Tensor::cat(&gates, 0)?, router.config.scale)?,
        };
        let skip = router.config.skip;
        if skip != crate::config::DepthSkip::Block {
            let sel = crate::model::block::FfnRows { rows: idx, scale };
            // skip=mlp: every row through the attention (and into its cache), the chosen
            // rows through the feed-forward too; skip=attention: the chosen rows through
            // the attention (and into their caches), every row through the feed-forward
            return match skip {
                crate::config::DepthSkip::Mlp => self.run(
                    x,
                    &all,
                    caches,
                    routes,
                    Some((Selected::FeedForward(&sel), &chosen)),
                ),
                _ => self.run(
                    x,
                    &chosen,
                    caches,
                    routes,
                    Some((Selected::Attention(&sel), &all)),
                ),
            };
        }
        if chosen.is_empty() {
            return Ok(x.clone());
        }
        let xs = x.index_select(&idx, 0)?;
        let y = self.run(&xs, &chosen, caches, routes, None)?;
        let gate = scale.to_dtype(x.dtype())?.reshape((chosen.len(), 1, 1))?;
        let delta = (y - &xs)?.broadcast_mul(&gate)?;
        x.index_add(&idx, &delta, 0)
    }
}

/// The rows of a routed block's sub-block: the attention's or the feed-forward's.
enum Selected<'a> {
    Attention(&'a crate::model::block::FfnRows),
    FeedForward(&'a crate::model::block::FfnRows),
}

/// A decoding step's rotary tables: each row's cos and sin at its own position, made once
/// per step for each set of tables the model has (global; local for sliding-window
/// layers), `(b, 1, r/2)`.
struct StepRope {
    global: Option<(Tensor, Tensor)>,
    local: Option<(Tensor, Tensor)>,
}

impl StepRope {
    fn new(model: &Model, starts: &[usize]) -> CResult<Self> {
        let b = starts.len();
        let of = |r: &RopeTables| -> CResult<(Tensor, Tensor)> {
            let (mut cos, mut sin) = (Vec::with_capacity(b), Vec::with_capacity(b));
            for &s in starts {
                let (c, sn) = r.range(s, 1)?;
                cos.push(c);
                sin.push(sn);
            }
            let half = cos[0].dim(1)?;
            Ok((
                Tensor::cat(&cos, 0)?.reshape((b, 1, half))?,
                Tensor::cat(&sin, 0)?.reshape((b, 1, half))?,
            ))
        };
        Ok(Self {
            global: model.rope.as_ref().map(of).transpose()?,
            local: model.local_rope.as_ref().map(of).transpose()?,
        })
    }

    /// The tables of `rows` (all of them, or a subset) for a `local` or global layer;
    /// `None` for a model without rotary positions.
    fn of_rows(&self, local: bool, rows: &[usize]) -> CResult<Option<(Tensor, Tensor)>> {
        let t = if local { &self.local } else { &self.global };
        let Some((cos, sin)) = t else { return Ok(None) };
        if rows.len() == cos.dim(0)? {
            return Ok(Some((cos.clone(), sin.clone())));
        }
        let idx: Vec<u32> = rows.iter().map(|&i| i as u32).collect();
        let idx = Tensor::new(idx.as_slice(), cos.device())?;
        Ok(Some((
            cos.index_select(&idx, 0)?,
            sin.index_select(&idx, 0)?,
        )))
    }
}

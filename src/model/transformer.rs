//! The decoder-only transformer (GPT-2 / Llama shape and their descendants), one
//! implementation for every configuration: the options in [`ModelConfig`] select norms,
//! positions, block wiring and attention variants; nothing here knows model families.

use candle_core::{DType, Device, Result as CResult, Tensor};

use super::block::Block;
use super::cache::Cache;
use crate::config::{ModelConfig, Position, RopeScaling};
use crate::error::{Error, Result};
use crate::nn::qmatmul::QMatrix;
use crate::nn::relative::relative_bias;
use crate::nn::{Linear, Norm, Positions, RopeTables};
use crate::routing::{DepthDecision, DepthRouter, DepthStats, DepthStep, MoeStats};
use std::sync::Arc;

mod build;
mod decode;
pub use decode::TokenRoute;

/// What one forward pass produces.
#[derive(Debug)]
pub struct ModelOutput {
    /// `(b, t, vocab)`, or `(b, 1, vocab)` when only the last position was asked for.
    pub logits: Tensor,
    /// With [`ForwardOptions::hidden_states`]: the input of the first block, the output of
    /// every block but the last, and the last block's output after the final norm
    /// (`n_layers + 1` tensors of `(b, t, d_model)`, transformers' convention).
    pub hidden_states: Vec<Tensor>,
    /// What each Mixture-of-Experts layer's router did, in layer order.
    pub moe: Vec<MoeStats>,
    /// What each Mixture-of-Depths router did, in layer order.
    pub depth: Vec<DepthStats>,
}

impl ModelOutput {
    /// The sum of the routers' weighted auxiliary losses, if any layer has one.
    pub fn aux_loss(&self) -> CResult<Option<Tensor>> {
        let mut total: Option<Tensor> = None;
        let depth = self.depth.iter().filter_map(|s| s.aux_loss.as_ref());
        for l in self
            .moe
            .iter()
            .filter_map(|s| s.aux_loss.as_ref())
            .chain(depth)
        {
            total = Some(match total {
                Some(t) => (t + l)?,
                None => l.clone(),
            });
        }
        Ok(total)
    }
}

/// A training loss and what produced it.
#[derive(Debug)]
pub struct Loss {
    /// Mean next-token cross-entropy (nats).
    pub ce: Tensor,
    /// `ce` plus the routers' weighted auxiliary losses.
    pub total: Tensor,
    pub moe: Vec<MoeStats>,
    /// What each Mixture-of-Depths router did, in layer order.
    pub depth: Vec<DepthStats>,
}

/// What to compute in a forward pass.
#[derive(Debug, Clone, Copy, Default)]
pub struct ForwardOptions {
    /// Logits for the last position only (sampling).
    pub last_only: bool,
    /// Keep the hidden states between blocks.
    pub hidden_states: bool,
    /// How routed (Mixture-of-Depths) blocks choose tokens; default: top-k without a cache,
    /// causal thresholds with one.
    pub depth: Option<DepthDecision>,
    /// Seed of the routers' random draws (random Mixture-of-Depths selection, an
    /// ablation): the draws are a pure function of it, the layer and the token's position.
    /// The trainer passes one per run, step and shard.
    pub seed: u64,
}

#[derive(Debug, Clone)]
pub struct Model {
    pub config: ModelConfig,
    embed: Tensor,
    /// The token embeddings in their stored form (`embed` is then a stand-in): rows are
    /// dequantized as tokens look them up.
    embed_stored: Option<Arc<QMatrix>>,
    /// `(values, bytes)` of the stored weights a decoded token reads (every stored
    /// matrix but an untied embedding table, of which it reads one row).
    stored_read: (usize, usize),
    /// The stored weights that products read (not embeddings only looked up).
    products: Vec<std::sync::Arc<QMatrix>>,
    /// The type decoding caches hold keys and values in; `None`: the compute type.
    kv_dtype: Option<DType>,
    positions: Option<Tensor>,
    blocks: Vec<Block>,
    norm: Norm,
    head: Linear,
    rope: Option<RopeTables>,
    /// Rotary tables of the sliding-window layers when their base differs.
    local_rope: Option<RopeTables>,
    /// Norm on the token embeddings.
    embed_norm: Option<Norm>,
    /// Mixture-of-Depths routers of routed blocks.
    routers: Vec<Option<DepthRouter>>,
    /// `(buckets, n_heads)` relative-position table of the (decoder) self-attention.
    relative: Option<Tensor>,
    /// The encoder of an encoder-decoder.
    encoder: Option<Encoder>,
}

/// The encoder of an encoder-decoder: bidirectional blocks, a final norm, and the
/// relative-position table of its self-attention.
#[derive(Debug, Clone)]
struct Encoder {
    blocks: Vec<Block>,
    norm: Norm,
    relative: Option<Tensor>,
}

impl Model {
    /// Mixed precision for every projection and the head: products of more than a few rows
    /// (forward and backward) with bf16 operands and f32 sums, on CPUs with AVX512-BF16
    /// (elsewhere they stay f32). Parameters, activations and the optimizer stay f32.
    pub fn set_bf16_matmul(&mut self, on: bool) {
        for b in &mut self.blocks {
            for l in b.linears_mut() {
                l.bf16 = on;
            }
        }
        self.head.bf16 = on;
    }

    /// `(values, bytes)` of the weights held in their stored form that decoding a token
    /// reads; `(0, 0)` for a model whose weights are all tensors.
    pub fn stored_read(&self) -> (usize, usize) {
        self.stored_read
    }

    /// Make now, in parallel, the layouts the products read (stored rows interleaved where
    /// the CPU and type take them, else copied off the file), which the first product of
    /// each weight would otherwise make: a server calls it before it takes requests, so
    /// that its first request does not wait for all of them (0.8 s on a 434 MB
    /// Mixture-of-Experts file).
    /// Every weight is then resident, an expert no token has chosen yet too, and the
    /// unwritten rest of the huge page each run of them ends in is handed back.
    pub fn prepare_products(&self) {
        use rayon::prelude::*;
        self.products.par_iter().for_each(|q| q.prepare());
        crate::nn::qmatmul::trim_pages();
    }

    /// Whether the projections compute in mixed precision ([`Model::set_bf16_matmul`] on a
    /// CPU with AVX512-BF16).
    pub fn bf16_matmul(&self) -> bool {
        self.head.bf16 && crate::nn::bf16::available()
    }

    /// Whether layer `l` uses the local rotary tables (a sliding-window layer of a model
    /// that has them).
    fn is_local(&self, l: usize) -> bool {
        self.local_rope.is_some() && self.config.layer(l).window.is_some()
    }

    /// The rotary tables layer `l` uses.
    fn rope_of(&self, l: usize) -> Option<&RopeTables> {
        if self.is_local(l) {
            self.local_rope.as_ref()
        } else {
            self.rope.as_ref()
        }
    }

    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    /// Forward `ids: (b, t)` (u32). With a cache, the tokens continue the cached sequence;
    /// `last_only` computes the head for the last position only (sampling).
    pub fn forward(
        &self,
        ids: &Tensor,
        cache: Option<&mut Cache>,
        last_only: bool,
    ) -> Result<ModelOutput> {
        self.forward_with(
            ids,
            cache,
            ForwardOptions {
                last_only,
                ..Default::default()
            },
        )
    }

    /// Forward with explicit [`ForwardOptions`].
    pub fn forward_with(
        &self,
        ids: &Tensor,
        mut cache: Option<&mut Cache>,
        opts: ForwardOptions,
    ) -> Result<ModelOutput> {
        if rayon::current_thread_index().is_none() && !crate::nn::grouped::has_grad_sink() {
            // called from outside the thread pool: the pass runs on one of its workers, or
            // each of its parallel products would hand itself to a worker and wait (two
            // thread wake-ups per product; a decoding step makes dozens). A training shard
            // with its gradient sink (kept per thread) stays where it is.
            return rayon::scope(|_| self.forward_with(ids, cache, opts));
        }
        let t = ids.dim(1)?;
        if cache.is_some() && self.config.moe_layers().any(|(_, m)| m.expert_choice) {
            return Err(Error::Generate(
                "this model routes by expert choice, which picks tokens by looking at the whole \
                 sequence: it cannot decode token by token (train it with token-choice routing \
                 to sample)"
                    .into(),
            ));
        }
        let start = cache.as_ref().map_or(0, |c| c.pos());
        if let (Some(c), Some(switch)) = (cache.as_deref_mut(), self.restart_length()) {
            if start > 0 && start <= switch && start + t > switch {
                return self.forward_restarted(ids, c, opts);
            }
            // past the switch the cache is never rebuilt again
            if start + t <= switch {
                c.feed(ids);
            }
        }
        if start + t > self.config.max_seq_len {
            return Err(Error::Generate(format!(
                "sequence of {} tokens exceeds the context window of {}",
                start + t,
                self.config.max_seq_len
            )));
        }
        self.check_ids(ids)?;
        if self.encoder.is_some() && !cache.as_ref().is_some_and(|c| c.has_source()) {
            return Err(Error::Generate(
                "an encoder-decoder decodes through a cache that holds its source: run \
                 Model::encode on the source first"
                    .into(),
            ));
        }
        let out = self.forward_inner(ids, start, &mut cache, opts, None)?;
        if let Some(c) = cache {
            c.advance(t);
        }
        Ok(out)
    }

    /// The length at which a cached sequence is recomputed from its start: LongRoPE's
    /// original length, where its frequencies switch from the short to the long factors.
    /// transformers drops the cache there for the families that publish LongRoPE (Phi-3,
    /// PhiMoE: `prepare_inputs_for_generation`), so every key is rotated with the long
    /// factors from then on.
    fn restart_length(&self) -> Option<usize> {
        match &self.config.position {
            Position::Rope {
                scaling: s @ RopeScaling::LongRope { .. },
                ..
            } => s.switch_length(),
            _ => None,
        }
    }

    /// Rebuild `cache` from every token it was fed plus `ids`, and return the outputs of
    /// the positions of `ids`.
    fn forward_restarted(
        &self,
        ids: &Tensor,
        cache: &mut Cache,
        opts: ForwardOptions,
    ) -> Result<ModelOutput> {
        let t = ids.dim(1)?;
        let all = Tensor::cat(&[cache.fed()?, ids.clone()], 1)?;
        *cache = self.new_cache();
        let mut out = self.forward_with(&all, Some(cache), opts)?;
        let total = all.dim(1)?;
        let tail = |x: &Tensor| x.narrow(1, total - t, t);
        if !opts.last_only {
            out.logits = tail(&out.logits)?;
        }
        out.hidden_states = out.hidden_states.iter().map(tail).collect::<CResult<_>>()?;
        Ok(out)
    }

    fn forward_inner(
        &self,
        ids: &Tensor,
        start: usize,
        cache: &mut Option<&mut Cache>,
        opts: ForwardOptions,
        // the head only at these positions, one per sequence (a batch of right-padded
        // prompts): logits `(b, 1, vocab)`
        heads_at: Option<&[usize]>,
    ) -> CResult<ModelOutput> {
        let (b, t) = ids.dims2()?;
        let mut x = self.embed_tokens(ids, b, t, start)?;
        let mut out = ModelOutput {
            logits: x.clone(),
            hidden_states: Vec::new(),
            moe: Vec::new(),
            depth: Vec::new(),
        };
        // routed blocks: top-k when training on whole sequences, causal thresholds when
        // decoding through a cache, unless the caller says otherwise
        let decision = opts.depth.unwrap_or(if cache.is_some() {
            DepthDecision::Threshold
        } else {
            DepthDecision::TopK
        });
        let step = DepthStep {
            start,
            decision,
            seed: opts.seed,
        };
        let tables = |r: Option<&RopeTables>| r.map(|r| r.range(start, t)).transpose();
        let (rope, local_rope) = (
            tables(self.rope.as_ref())?,
            tables(self.local_rope.as_ref())?,
        );
        let bias = self.relative_bias(self.relative.as_ref(), start, t, start + t, false)?;
        for (l, block) in self.blocks.iter().enumerate() {
            if opts.hidden_states {
                out.hidden_states.push(x.clone());
            }
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[l]);
            let run = || -> CResult<_> {
                if let Some(r) = &self.routers[l] {
                    let choice = r.choose(&x, step)?;
                    let rope = self.rope_of(l);
                    let (y, moe) = block.forward_routed(&x, &choice, rope, start, layer_cache)?;
                    return Ok((y, moe, Some(choice.stats)));
                }
                let rope = if self.is_local(l) { &local_rope } else { &rope };
                let pos = Positions {
                    rope: rope.as_ref().map(|(c, s)| (c, s)),
                    bias: bias.as_ref(),
                };
                let (y, moe) = block.forward(&x, pos, layer_cache)?;
                Ok((y, moe, None))
            };
            let (y, moe, depth) = run().map_err(|e| e.context(format!("layer {l}")))?;
            x = y;
            out.moe.extend(moe);
            out.depth.extend(depth);
        }
        let x = match heads_at {
            Some(at) => {
                let rows = at
                    .iter()
                    .enumerate()
                    .map(|(i, &p)| x.narrow(0, i, 1)?.narrow(1, p, 1))
                    .collect::<CResult<Vec<_>>>()?;
                Tensor::cat(&rows, 0)?
            }
            None if opts.last_only => x.narrow(1, t - 1, 1)?,
            None => x,
        };
        let x = self.norm.forward(&x)?;
        if opts.hidden_states {
            out.hidden_states.push(x.clone());
        }
        out.logits = self.logits(x)?;
        Ok(out)
    }

    /// The token embeddings of `ids: (b, t)` at positions `start..start + t`, scaled,
    /// with learned positions added and the embedding norm applied where configured.
    fn embed_tokens(&self, ids: &Tensor, b: usize, t: usize, start: usize) -> CResult<Tensor> {
        let d = self.config.d_model;
        let mut x = match &self.embed_stored {
            Some(q) => {
                let ids = ids.flatten_all()?.to_vec1::<u32>()?;
                let mut v = vec![0f32; ids.len() * d];
                for (row, &id) in v.chunks_exact_mut(d).zip(&ids) {
                    let id = id as usize;
                    q.dequantize_rows(id, id + 1, row);
                }
                Tensor::from_vec(v, (b, t, d), self.embed.device())?
            }
            None => self
                .embed
                .index_select(&ids.flatten_all()?, 0)?
                .reshape((b, t, d))?,
        };
        if let Some(s) = self.config.embed_scale {
            x = (x * s)?;
        }
        if let Some(pos) = &self.positions {
            x = x.broadcast_add(&pos.narrow(0, start, t)?)?;
        }
        if let Some(n) = &self.embed_norm {
            x = n.forward(&x)?;
        }
        Ok(x)
    }

    /// The head on the final hidden states: output scale, product, soft-cap.
    fn logits(&self, mut x: Tensor) -> CResult<Tensor> {
        if let Some(s) = self.config.output_scale {
            x = (x * s)?;
        }
        let mut logits = self.head.forward(&x)?;
        if let Some(cap) = self.config.final_softcap {
            logits = ((logits / cap)?.tanh()? * cap)?;
        }
        Ok(logits)
    }

    /// The `(n_heads, t, t_k)` relative-position biases of `table` for queries at
    /// `q0..q0 + t` over keys `0..t_k`, when the model has relative positions.
    fn relative_bias(
        &self,
        table: Option<&Tensor>,
        q0: usize,
        t: usize,
        t_k: usize,
        bidirectional: bool,
    ) -> CResult<Option<Tensor>> {
        match (table, &self.config.position) {
            (Some(table), Position::Relative { max_distance, .. }) => Ok(Some(relative_bias(
                table,
                q0,
                t,
                t_k,
                bidirectional,
                *max_distance,
            )?)),
            _ => Ok(None),
        }
    }

    /// Run the encoder of an encoder-decoder on the source `ids: (b, s)` and give every
    /// decoder layer of `cache` its cross-attention keys and values of the result; the
    /// decoder then continues through `cache`. Returns the encoder's hidden states
    /// (embeddings, each block's output but the last, the last after the final norm).
    pub fn encode(&self, ids: &Tensor, cache: &mut Cache) -> Result<Vec<Tensor>> {
        let Some(enc) = &self.encoder else {
            return Err(Error::Generate(
                "this model has no encoder (it is decoder-only)".into(),
            ));
        };
        self.check_ids(ids)?;
        let (b, s) = ids.dims2()?;
        let mut x = self.embed.index_select(&ids.flatten_all()?, 0)?.reshape((
            b,
            s,
            self.config.d_model,
        ))?;
        let bias = self.relative_bias(enc.relative.as_ref(), 0, s, s, true)?;
        let pos = Positions {
            rope: None,
            bias: bias.as_ref(),
        };
        let mut hidden = Vec::with_capacity(enc.blocks.len() + 1);
        for (l, block) in enc.blocks.iter().enumerate() {
            hidden.push(x.clone());
            x = block
                .forward(&x, pos, None)
                .map_err(|e| e.context(format!("encoder layer {l}")))?
                .0;
        }
        let x = enc.norm.forward(&x)?;
        hidden.push(x.clone());
        for (block, layer) in self.blocks.iter().zip(&mut cache.layers) {
            if let Some((_, attn)) = &block.cross {
                let (k, v) = attn.keys_values(&x)?;
                layer.set_cross(k, v);
            }
        }
        Ok(hidden)
    }

    /// Token ids must index the vocabulary.
    fn check_ids(&self, ids: &Tensor) -> Result<()> {
        let max_id = ids.flatten_all()?.max(0)?.to_scalar::<u32>()? as usize;
        if max_id >= self.config.vocab_size {
            return Err(Error::Generate(format!(
                "token id {max_id} is out of range for a vocabulary of {}",
                self.config.vocab_size
            )));
        }
        Ok(())
    }

    /// Mean next-token cross-entropy of `ids: (b, t)` predicting `targets: (b, t)`.
    /// The cross-entropy plus the routers' auxiliary losses (`total`, what training
    /// minimises), with the routers' statistics.
    pub fn loss(&self, ids: &Tensor, targets: &Tensor) -> Result<Loss> {
        self.loss_with(ids, targets, ForwardOptions::default())
    }

    /// [`Model::loss`] with explicit [`ForwardOptions`] (the trainer's routing seed).
    pub fn loss_with(&self, ids: &Tensor, targets: &Tensor, opts: ForwardOptions) -> Result<Loss> {
        if self.encoder.is_some() {
            return Err(Error::Data(
                "the next-token loss takes a decoder-only model; this one is an \
                 encoder-decoder (it needs source/target pairs)"
                    .into(),
            ));
        }
        let out = self.forward_with(ids, None, opts)?;
        let v = self.config.vocab_size;
        let logits = out.logits.reshape(((), v))?;
        let ce = crate::nn::ops::cross_entropy(&logits, &targets.flatten_all()?)?;
        let total = match out.aux_loss()? {
            Some(aux) => (&ce + aux)?,
            None => ce.clone(),
        };
        Ok(Loss {
            ce,
            total,
            moe: out.moe,
            depth: out.depth,
        })
    }

    /// A fresh cache for this model.
    /// Run layer `l` alone on hidden states `x: (b, t, d)` (inspection and tests): a routed
    /// layer routes by top-k at positions `0..t`; a plain one runs at `positions` (one per
    /// token, shared by the batch; default `0..t`).
    pub fn run_layer(&self, l: usize, x: &Tensor, positions: Option<&[u32]>) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let block = self
            .blocks
            .get(l)
            .ok_or_else(|| Error::Generate(format!("no layer {l}")))?;
        if let Some(r) = &self.routers[l] {
            let step = DepthStep {
                start: 0,
                decision: DepthDecision::TopK,
                seed: 0,
            };
            let choice = r.choose(x, step)?;
            return Ok(block
                .forward_routed(x, &choice, self.rope_of(l), 0, None)?
                .0);
        }
        let pos: Vec<u32> = positions.map_or_else(|| (0..t as u32).collect(), |p| p.to_vec());
        let tables = match self.rope_of(l) {
            Some(r) => {
                let idx = Tensor::new(pos.as_slice(), x.device())?;
                let (cos, sin) = r.gather(&idx)?;
                let half = cos.dim(1)?;
                let cos = cos.unsqueeze(0)?.broadcast_as((b, t, half))?.contiguous()?;
                let sin = sin.unsqueeze(0)?.broadcast_as((b, t, half))?.contiguous()?;
                Some((cos, sin))
            }
            None => None,
        };
        let pos = Positions {
            rope: tables.as_ref().map(|(c, s)| (c, s)),
            bias: None,
        };
        Ok(block.forward(x, pos, None)?.0)
    }

    pub fn new_cache(&self) -> Cache {
        Cache::new(self.blocks.len(), self.kv_dtype)
    }

    /// Hold the keys and values of the caches made from now on in `dtype` (`None`: the
    /// compute type). f16 halves a cached token's memory and what each step reads of it;
    /// attention still computes in f32. A model starts with caches of its compute type.
    pub fn set_kv_cache_dtype(&mut self, dtype: Option<DType>) {
        self.kv_dtype = dtype;
    }

    /// The type caches hold keys and values in (`None`: the compute type).
    pub fn kv_cache_dtype(&self) -> Option<DType> {
        self.kv_dtype
    }
}

//! Validation of a resolved [`ModelConfig`]: every problem listed at once, in words that
//! name the field and the values.

use super::{BlockKind, ModelConfig, MoeConfig, Position, QkNorm, RopeScaling, Scoring};

/// Upper bounds that catch absurd files before anything is allocated.
pub(super) const MAX_DIM: usize = 1 << 20;
const MAX_VOCAB: usize = 1 << 24;
/// The most layers a model may have (adapters read layer counts against it before they
/// build anything per layer).
pub const MAX_LAYERS: usize = 1024;

impl ModelConfig {
    /// Every problem with this configuration, empty when it is valid.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        self.size_problems(&mut p);
        self.routing_problems(&mut p);
        self.attention_problems(&mut p);
        self.position_problems(&mut p);
        self.other_problems(&mut p);
        p
    }

    /// Sizes: positive, bounded, heads dividing, one spec per layer.
    fn size_problems(&self, p: &mut Vec<String>) {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("d_ff", self.d_ff),
            ("max_seq_len", self.max_seq_len),
        ];
        for (name, v) in positive {
            if v == 0 {
                p.push(format!("{name} must be positive"));
            }
        }
        for (name, v) in [
            ("d_model", self.d_model),
            ("d_ff", self.d_ff),
            ("head_dim", self.head_dim),
        ] {
            if v > MAX_DIM {
                p.push(format!("{name} ({v}) is larger than {MAX_DIM}"));
            }
        }
        if self.vocab_size > MAX_VOCAB {
            p.push(format!(
                "vocab_size ({}) is larger than {MAX_VOCAB}",
                self.vocab_size
            ));
        }
        if self.n_layers > MAX_LAYERS || self.n_heads > 4096 || self.max_seq_len > 1 << 22 {
            p.push("n_layers, n_heads or max_seq_len is absurdly large".into());
        }
        if self.n_kv_heads > 0 && !self.n_heads.is_multiple_of(self.n_kv_heads) {
            p.push(format!(
                "n_kv_heads ({}) must divide n_heads ({})",
                self.n_kv_heads, self.n_heads
            ));
        }
        if !self.layers.is_empty() && self.layers.len() != self.n_layers {
            p.push(format!(
                "layers has {} entries for {} layers",
                self.layers.len(),
                self.n_layers
            ));
        }
    }

    /// Mixture-of-Depths and Mixture-of-Experts settings (each distinct one once).
    fn routing_problems(&self, p: &mut Vec<String>) {
        let mut depth_problems = std::collections::BTreeSet::new();
        for (l, dc) in self.depth_layers() {
            if !(dc.capacity > 0.0 && dc.capacity <= 1.0) {
                depth_problems.insert(format!(
                    "depth.capacity ({}) must be in (0, 1]",
                    dc.capacity
                ));
            }
            if self.layer(l).window.is_some() {
                depth_problems.insert(
                    "a routed (Mixture-of-Depths) layer cannot also use a sliding window".into(),
                );
            }
        }
        p.extend(depth_problems);
        // each distinct MoE config once
        let mut seen: Vec<MoeConfig> = Vec::new();
        for (_, m) in self.moe_layers() {
            if seen.contains(&m) {
                continue;
            }
            seen.push(m);
            let m = &m;
            if m.n_experts == 0 || m.top_k == 0 || m.top_k > m.slots() || m.d_expert == 0 {
                p.push(format!(
                    "moe: need 0 < top_k ({}) <= n_experts ({}) and d_expert ({}) > 0",
                    m.top_k, m.n_experts, m.d_expert
                ));
            }
            if m.n_experts > 1 << 16 || m.d_expert > MAX_DIM {
                p.push("moe: n_experts or d_expert is absurdly large".into());
            }
            if m.expert_choice
                && (m.noop_experts > 0
                    || m.n_groups > 1
                    || m.selection_bias
                    || matches!(m.scoring, Scoring::SparseMixer { .. }))
            {
                p.push("moe: expert choice takes softmax or sigmoid scores, without no-op experts, groups or a selection bias".into());
            }
            if m.selection == crate::config::Selection::Random
                && (m.expert_choice || m.noop_experts > 0 || m.n_groups > 1 || m.selection_bias)
            {
                p.push("moe: random selection draws each token's experts among the routed ones: no expert choice, no-op experts, groups or selection bias".into());
            }
            if m.noop_experts > 0 && m.n_groups > 1 {
                p.push("moe: no-op experts do not combine with group-limited routing".into());
            }
            if m.n_groups == 0
                || m.n_experts % m.n_groups.max(1) != 0
                || m.topk_groups == 0
                || m.topk_groups > m.n_groups
            {
                p.push(format!(
                    "moe: n_groups ({}) must divide n_experts ({}) and 0 < topk_groups ({}) <= n_groups",
                    m.n_groups, m.n_experts, m.topk_groups
                ));
            }
        }
    }

    /// Latent attention, windows, caps and scales.
    fn attention_problems(&self, p: &mut Vec<String>) {
        if let Some(a) = &self.mla {
            if a.qk_nope_dim + a.qk_rope_dim != self.head_dim || self.n_kv_heads != self.n_heads {
                p.push(format!(
                    "mla: head_dim ({}) must be qk_nope_dim + qk_rope_dim ({} + {}) and n_kv_heads = n_heads",
                    self.head_dim, a.qk_nope_dim, a.qk_rope_dim
                ));
            }
            if !matches!(self.position, Position::Rope { rotary_dim, .. } if rotary_dim == a.qk_rope_dim)
            {
                p.push("mla: the rotary part must be rope with rotary_dim = qk_rope_dim".into());
            }
            if self.qkv_bias
                || self.qk_norm != QkNorm::None
                || a.kv_lora_rank == 0
                || a.v_head_dim == 0
            {
                p.push(
                    "mla: no q/k/v biases or q/k norms; kv_lora_rank and v_head_dim positive"
                        .into(),
                );
            }
        }
        if self.layers.iter().any(|l| l.window == Some(0)) {
            p.push("a sliding window must be positive".into());
        }
        for (name, v) in [
            ("attn_softcap", self.attn_softcap),
            ("final_softcap", self.final_softcap),
            ("attn_scale", self.attn_scale),
            ("clip_qkv", self.clip_qkv),
        ] {
            if v.is_some_and(|v| !(v > 0.0 && v.is_finite())) {
                p.push(format!("{name} must be positive"));
            }
        }
    }

    /// Rotary, relative and ALiBi positions.
    fn position_problems(&self, p: &mut Vec<String>) {
        if let Position::Rope {
            theta,
            rotary_dim,
            ref scaling,
        } = self.position
        {
            scaling.problems(rotary_dim, p);
            self.local_rope_scaling.problems(rotary_dim, p);
            if self.depth_layers().next().is_some()
                && (scaling.switch_length().is_some()
                    || self.local_rope_scaling.switch_length().is_some())
            {
                p.push("length-dependent rope scaling (dynamic, longrope) in routed (Mixture-of-Depths) blocks is not supported".into());
            }
            if rotary_dim % 2 != 0 || rotary_dim > self.head_dim || rotary_dim == 0 {
                p.push(format!(
                    "rotary_dim ({rotary_dim}) must be even, positive and at most head_dim ({})",
                    self.head_dim
                ));
            }
            if !(theta > 0.0 && theta.is_finite()) {
                p.push(format!("rope_theta ({theta}) must be positive"));
            }
        }
        if self
            .local_rope_theta
            .is_some_and(|t| !(t > 0.0 && t.is_finite()))
        {
            p.push("local_rope_theta must be positive".into());
        }
        if let Position::Relative {
            buckets,
            max_distance,
        } = self.position
        {
            if buckets < 4 || max_distance < buckets || buckets > MAX_DIM {
                p.push(format!(
                    "relative positions need 4 <= buckets <= max_distance (got {buckets} and {max_distance})"
                ));
            }
            if self.depth_layers().next().is_some() {
                p.push(
                    "relative positions in routed (Mixture-of-Depths) blocks are not supported"
                        .into(),
                );
            }
        }
    }

    /// The encoder, the output scale, norms and the initialiser.
    fn other_problems(&self, p: &mut Vec<String>) {
        if self.encoder_layers > 1024 {
            p.push(format!(
                "encoder_layers ({}) is absurdly large",
                self.encoder_layers
            ));
        }
        if self.encoder_layers > 0 {
            match self.decoder_start {
                Some(s) if (s as usize) < self.vocab_size => {}
                _ => p.push(
                    "an encoder-decoder needs a decoder_start id inside the vocabulary".into(),
                ),
            }
            if self.block != BlockKind::Sequential
                || self.mla.is_some()
                || self.depth_layers().next().is_some()
            {
                p.push("an encoder-decoder takes sequential blocks without latent attention or Mixture-of-Depths".into());
            }
        }
        if self
            .output_scale
            .is_some_and(|s| !(s > 0.0 && s.is_finite()))
        {
            p.push("output_scale must be positive".into());
        }
        if self.position == Position::Alibi && self.depth_layers().next().is_some() {
            p.push("ALiBi positions in routed (Mixture-of-Depths) blocks are not supported".into());
        }
        if !(self.norm_eps > 0.0 && self.norm_eps < 1.0) {
            p.push(format!("norm_eps ({}) must be in (0, 1)", self.norm_eps));
        }
        if !(self.init_std > 0.0 && self.init_std.is_finite()) {
            p.push(format!("init_std ({}) must be positive", self.init_std));
        }
    }
}

impl RopeScaling {
    /// Problems with the values, for a head whose rotary part has `rotary_dim` dims.
    fn problems(&self, rotary_dim: usize, p: &mut Vec<String>) {
        let positive = |name: &str, v: f64, p: &mut Vec<String>| {
            if !(v > 0.0 && v.is_finite()) {
                p.push(format!("rope scaling: {name} ({v}) must be positive"));
            }
        };
        match self {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => positive("factor", *factor, p),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                positive("factor", *factor, p);
                positive("low_freq_factor", *low_freq_factor, p);
                positive(
                    "original_max_position_embeddings",
                    *original_max_position_embeddings,
                    p,
                );
                if high_freq_factor <= low_freq_factor {
                    p.push(format!("rope scaling: high_freq_factor ({high_freq_factor}) must exceed low_freq_factor ({low_freq_factor})"));
                }
            }
            RopeScaling::Dynamic {
                factor,
                max_position_embeddings,
            } => {
                positive("factor", *factor, p);
                positive("max_position_embeddings", *max_position_embeddings, p);
                if rotary_dim <= 2 {
                    p.push("dynamic rope scaling needs a rotary part of more than 2 dims".into());
                }
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                attention_factor,
                ..
            } => {
                positive("factor", *factor, p);
                positive(
                    "original_max_position_embeddings",
                    *original_max_position_embeddings,
                    p,
                );
                positive("beta_fast", *beta_fast, p);
                positive("beta_slow", *beta_slow, p);
                positive("attention_factor", *attention_factor, p);
            }
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor,
            } => {
                positive(
                    "original_max_position_embeddings",
                    *original_max_position_embeddings,
                    p,
                );
                positive("attention_factor", *attention_factor, p);
                for (name, f) in [("short_factor", short_factor), ("long_factor", long_factor)] {
                    if f.len() != rotary_dim / 2 {
                        p.push(format!(
                            "rope scaling: {name} has {} values, the rotary part needs {} (rotary dims / 2)",
                            f.len(),
                            rotary_dim / 2
                        ));
                    }
                    if f.iter().any(|v| !(*v > 0.0 && v.is_finite())) {
                        p.push(format!("rope scaling: every {name} value must be positive"));
                    }
                }
            }
        }
    }
}

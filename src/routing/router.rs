//! Expert choice for token-choice routing: top-k over scores, optionally after a
//! selection-only bias and group-limited masking (DeepSeek-V3, arXiv:2412.19437 §2.1).
//!
//! The choice is a pure function of host-side scores so it is exact and testable; the
//! weights that multiply expert outputs are gathered from the score *tensor* afterwards, so
//! gradients reach the router.

/// Which experts each token uses: `experts[t * k + j]` is token `t`'s `j`-th choice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterChoice {
    pub n_tokens: usize,
    pub k: usize,
    pub experts: Vec<u32>,
}

/// The `k` best of `candidates` by `score`, best first; ties go to the lower index. The
/// one top-k of routing: experts per token, groups per token, tokens per expert (expert
/// choice) and tokens per routed block (Mixture-of-Depths).
pub fn top_k(
    candidates: impl IntoIterator<Item = usize>,
    k: usize,
    score: impl Fn(usize) -> f32,
) -> Vec<usize> {
    let mut v: Vec<usize> = candidates.into_iter().collect();
    // a total order (score descending, then index), so the partial selection is exact
    let order = |a: &usize, b: &usize| score(*b).total_cmp(&score(*a)).then(a.cmp(b));
    if k < v.len() {
        if k > 0 {
            v.select_nth_unstable_by(k - 1, order);
        }
        v.truncate(k);
    }
    v.sort_by(order);
    v
}

/// Choose `k` experts per token from `scores` (`n_tokens × n_experts`, row-major).
///
/// `bias` is added for choosing only. With `n_groups > 1`, experts form equal groups; a
/// group scores the sum of its (up to) two best biased scores, only the best `topk_groups`
/// groups stay eligible, and the others are excluded outright — never picked, even when
/// every eligible score is negative. Ties go to the lower expert index.
pub fn choose_experts(
    scores: &[f32],
    n_experts: usize,
    k: usize,
    bias: Option<&[f32]>,
    n_groups: usize,
    topk_groups: usize,
) -> RouterChoice {
    let n_tokens = scores.len() / n_experts.max(1);
    let group_size = n_experts / n_groups.max(1);
    let mut experts = Vec::with_capacity(n_tokens * k);
    let mut s = vec![0f32; n_experts];
    for t in 0..n_tokens {
        for e in 0..n_experts {
            s[e] = scores[t * n_experts + e] + bias.map_or(0.0, |b| b[e]);
        }
        let chosen = if n_groups > 1 && topk_groups < n_groups {
            let group_score = |g: usize| -> f32 {
                let members = g * group_size..(g + 1) * group_size;
                top_k(members, 2, |e| s[e]).iter().map(|&e| s[e]).sum()
            };
            let kept = top_k(0..n_groups, topk_groups, group_score);
            let eligible = (0..n_experts).filter(|e| kept.contains(&(e / group_size)));
            top_k(eligible, k, |e| s[e])
        } else {
            top_k(0..n_experts, k, |e| s[e])
        };
        experts.extend(chosen.iter().map(|&e| e as u32));
    }
    RouterChoice {
        n_tokens,
        k,
        experts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The partial selection gives the full sort's first k, ties to the lower index.
    #[test]
    fn top_k_is_the_sorted_prefix() {
        let scores = [0.3f32, 0.9, 0.3, -1.0, 0.9, 0.5, 0.3, 0.0];
        for k in 0..=scores.len() + 1 {
            let mut all: Vec<usize> = (0..scores.len()).collect();
            all.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
            all.truncate(k);
            assert_eq!(top_k(0..scores.len(), k, |i| scores[i]), all, "k = {k}");
        }
        assert_eq!(top_k([7, 2, 5], 2, |i| scores[i]), vec![5, 2]);
    }

    #[test]
    fn top_k_with_ties_to_lower_index() {
        let c = choose_experts(&[0.1, 0.5, 0.5, 0.2, 0.9, 0.0, 0.3, 0.3], 4, 2, None, 1, 1);
        assert_eq!(c.experts, vec![1, 2, 0, 2]);
    }

    #[test]
    fn bias_changes_the_choice_only() {
        let c = choose_experts(
            &[0.4, 0.3, 0.2, 0.1],
            4,
            1,
            Some(&[0.0, 0.0, 0.5, 0.0]),
            1,
            1,
        );
        assert_eq!(c.experts, vec![2]);
    }

    /// A dropped group's experts are never chosen, even when every kept score is negative
    /// (masking dropped experts to 0 instead of excluding them would pick them here).
    #[test]
    fn dropped_groups_are_excluded_even_with_negative_kept_scores() {
        // 2 groups of 2; group 0 = {-0.1, -0.2} sums -0.3, group 1 = {-5, -6}: keep group 0
        let scores = [0.0f32, 0.0, 0.0, 0.0];
        let bias = [-0.1f32, -0.2, -5.0, -6.0];
        let c = choose_experts(&scores, 4, 2, Some(&bias), 2, 1);
        assert_eq!(c.experts, vec![0, 1]);
    }
}

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
    let mut order: Vec<usize> = Vec::with_capacity(n_experts);
    for t in 0..n_tokens {
        for e in 0..n_experts {
            s[e] = scores[t * n_experts + e] + bias.map_or(0.0, |b| b[e]);
        }
        let mut eligible = vec![true; n_experts];
        if n_groups > 1 && topk_groups < n_groups {
            let mut group_scores: Vec<(usize, f32)> = (0..n_groups)
                .map(|g| {
                    let mut v: Vec<f32> = s[g * group_size..(g + 1) * group_size].to_vec();
                    v.sort_by(|a, b| b.total_cmp(a));
                    (g, v.iter().take(2).sum())
                })
                .collect();
            group_scores.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let kept: Vec<usize> = group_scores.iter().take(topk_groups).map(|g| g.0).collect();
            for (e, ok) in eligible.iter_mut().enumerate() {
                *ok = kept.contains(&(e / group_size));
            }
        }
        order.clear();
        order.extend((0..n_experts).filter(|&e| eligible[e]));
        order.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
        experts.extend(order.iter().take(k).map(|&e| e as u32));
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

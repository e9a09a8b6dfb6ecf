//! The one dispatch of routed computation: a router's choice is a [`Routing`] (per group —
//! an expert, or a routed block — the rows it runs on and the weight of each); dispatch
//! gathers those rows sorted by group, runs the computation on them alone, and adds the
//! weighted results back in one scatter. Mixture-of-Experts runs its experts as the groups,
//! Mixture-of-Depths its block as one group; MoDE both.

use candle_core::{Result, Tensor};

use crate::nn::grouped::weighted_scatter;

/// Where routed rows go.
#[derive(Debug, Clone)]
pub struct Routing {
    /// Per group, the rows (of the flattened `(n, d)` input) it runs on.
    pub rows: Vec<Vec<u32>>,
    /// Per group, for each of its rows the index of that row's weight in `weights`.
    pub slots: Vec<Vec<u32>>,
    /// The weights the outputs are multiplied by, `(n_slots)`.
    pub weights: Tensor,
}

impl Routing {
    /// Rows routed to group `g` (0 for a group past the end).
    pub fn load(&self, g: usize) -> usize {
        self.rows.get(g).map_or(0, Vec::len)
    }
}

/// `Σ_g scatter(w · f(x[rows of g]))` into `n` zero rows, for the first `groups` groups of
/// `routing` (later ones, such as no-op experts, run nothing). `f` gets every routed row of
/// `xs: (n, d)` at once, sorted by group, and the group offsets (`groups + 1` entries); it
/// returns one output row per input row. `None` when no row is routed.
pub fn dispatch(
    xs: &Tensor,
    routing: &Routing,
    groups: usize,
    f: impl FnOnce(&Tensor, &[usize]) -> Result<Tensor>,
) -> Result<Option<Tensor>> {
    let groups = groups.min(routing.rows.len());
    let mut offsets = Vec::with_capacity(groups + 1);
    offsets.push(0);
    for g in 0..groups {
        offsets.push(offsets[g] + routing.load(g));
    }
    if offsets[groups] == 0 {
        return Ok(None);
    }
    let order: Vec<u32> = routing.rows[..groups].concat();
    let slots: Vec<u32> = routing.slots[..groups].concat();
    let device = xs.device();
    let gathered = xs.index_select(&Tensor::new(order.as_slice(), device)?, 0)?;
    let y = f(&gathered, &offsets)?;
    let w = routing
        .weights
        .index_select(&Tensor::new(slots.as_slice(), device)?, 0)?;
    Ok(Some(weighted_scatter(&y, &w, &order, xs.dim(0)?)?))
}

//! AdamW (Loshchilov & Hutter, 2019) with decoupled weight decay, the learning-rate
//! schedule (linear warm-up, cosine decay to a floor), and global-norm gradient clipping.
//!
//! The update is one fused in-place pass per parameter (a candle in-place op over the
//! parameter's storage); the moments live here as plain `f32` buffers so checkpoints can
//! save them exactly.

use candle_core::{backend::BackendStorage, CpuStorage, InplaceOp2, Layout, Tensor, Var};
use rayon::prelude::*;
use std::cell::RefCell;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// Linear warm-up over `warmup` steps to `lr`, then cosine decay to `min_lr` at `decay_steps`
/// (nanoGPT's schedule).
pub fn learning_rate(step: usize, lr: f64, min_lr: f64, warmup: usize, decay_steps: usize) -> f64 {
    if step < warmup {
        return lr * (step + 1) as f64 / (warmup + 1) as f64;
    }
    if step >= decay_steps {
        return min_lr;
    }
    let ratio = (step - warmup) as f64 / (decay_steps - warmup).max(1) as f64;
    let coeff = 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos());
    min_lr + coeff * (lr - min_lr)
}

/// One variable's optimiser state. A variable holds one named parameter, or several
/// stacked along the first dimension (an MoE layer's expert projections, which train as
/// one tensor): `parts` names them in order with their shapes.
#[derive(Debug, Clone)]
pub struct Slot {
    pub name: String,
    pub var: Var,
    pub decay: bool,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub parts: Vec<(String, Vec<usize>)>,
}

impl Slot {
    /// A variable holding the one parameter `name`.
    pub fn new(name: String, var: Var, decay: bool) -> Self {
        let parts = vec![(name.clone(), var.dims().to_vec())];
        Self::stacked(name, var, decay, parts)
    }

    /// A variable holding `parts` stacked in order along the first dimension.
    pub fn stacked(name: String, var: Var, decay: bool, parts: Vec<(String, Vec<usize>)>) -> Self {
        let n = var.elem_count();
        Slot {
            name,
            var,
            decay,
            m: vec![0.0; n],
            v: vec![0.0; n],
            parts,
        }
    }

    /// Each named parameter: its name, its range in the flattened variable (and moments),
    /// and its shape.
    pub fn pieces(&self) -> Vec<(&str, std::ops::Range<usize>, &[usize])> {
        let mut start = 0;
        self.parts
            .iter()
            .map(|(name, shape)| {
                let len = shape.iter().product::<usize>();
                start += len;
                (name.as_str(), start - len..start, shape.as_slice())
            })
            .collect()
    }

    /// Each named parameter as a view of the variable.
    pub fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let flat = self.var.as_tensor().flatten_all()?;
        self.pieces()
            .into_iter()
            .map(|(name, range, shape)| {
                Ok((
                    name.to_string(),
                    flat.narrow(0, range.start, range.len())?.reshape(shape)?,
                ))
            })
            .collect()
    }
}

#[derive(Debug)]
pub struct AdamW {
    pub config: AdamWConfig,
    pub slots: Vec<Slot>,
    /// Number of updates applied so far (for bias correction).
    pub t: usize,
}

struct Update<'a> {
    m: RefCell<&'a mut [f32]>,
    v: RefCell<&'a mut [f32]>,
    lr: f32,
    b1: f32,
    b2: f32,
    eps: f32,
    decay: f32,
    grad_scale: f32,
    bc1: f32,
    bc2: f32,
}

impl InplaceOp2 for Update<'_> {
    fn name(&self) -> &'static str {
        "routelm-adamw"
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (Some((a1, b1)), Some((a2, b2))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("adamw: parameter and gradient must be contiguous")
        };
        let g = &s2.as_slice::<f32>()?[a2..b2];
        let p = match s1 {
            CpuStorage::F32(p) => &mut p[a1..b1],
            other => candle_core::bail!("adamw: parameters must be f32, got {:?}", other.dtype()),
        };
        let mut m = self.m.borrow_mut();
        let mut v = self.v.borrow_mut();
        // in parallel chunks of zipped slices (no bounds checks: the loop vectorises)
        const CHUNK: usize = 1 << 14;
        let (b1, b2, bc1, bc2) = (self.b1, self.b2, self.bc1, self.bc2);
        let (lr, eps, decay, grad_scale) = (self.lr, self.eps, self.decay, self.grad_scale);
        p.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
            .for_each(|((p, g), (m, v))| {
                for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m).zip(v) {
                    let gi = g * grad_scale;
                    *m = b1 * *m + (1.0 - b1) * gi;
                    *v = b2 * *v + (1.0 - b2) * gi * gi;
                    let mhat = *m / bc1;
                    let vhat = *v / bc2;
                    *p -= lr * (mhat / (vhat.sqrt() + eps) + decay * *p);
                }
            });
        Ok(())
    }
}

impl AdamW {
    pub fn new(config: AdamWConfig, slots: Vec<Slot>) -> Self {
        Self {
            config,
            slots,
            t: 0,
        }
    }

    /// Global L2 norm of the gradients: each tensor's sum of squares read in place (in
    /// parallel over tensors, accumulated in f64), added in slot order.
    pub fn grad_norm(grads: &[Tensor]) -> Result<f64> {
        let sums = grads
            .par_iter()
            .map(|g| -> Result<f64> {
                let (storage, layout) = g.storage_and_layout();
                if let (candle_core::Storage::Cpu(c), true) =
                    (&*storage, g.dtype() == candle_core::DType::F32)
                {
                    if let Ok(v) = crate::nn::ops::f32_slice(c, layout, "grad norm") {
                        return Ok(v.iter().map(|&x| (x as f64) * (x as f64)).sum());
                    }
                }
                drop(storage);
                Ok(g.to_dtype(candle_core::DType::F64)?
                    .sqr()?
                    .sum_all()?
                    .to_scalar::<f64>()?)
            })
            .collect::<Result<Vec<f64>>>()?;
        Ok(sums.iter().sum::<f64>().sqrt())
    }

    /// Apply one update with gradients `grads[i]` for `slots[i]`, scaled by `grad_scale`
    /// (gradient clipping multiplies here, without another pass over the gradients).
    pub fn step(&mut self, grads: &[Tensor], lr: f64, grad_scale: f64) -> Result<()> {
        if grads.len() != self.slots.len() {
            return Err(Error::Data(format!(
                "{} gradients for {} parameters",
                grads.len(),
                self.slots.len()
            )));
        }
        self.t += 1;
        let c = self.config;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for (slot, g) in self.slots.iter_mut().zip(grads) {
            let g = g.contiguous()?;
            let op = Update {
                m: RefCell::new(&mut slot.m),
                v: RefCell::new(&mut slot.v),
                lr: lr as f32,
                b1: c.beta1 as f32,
                b2: c.beta2 as f32,
                eps: c.eps as f32,
                decay: if slot.decay {
                    c.weight_decay as f32
                } else {
                    0.0
                },
                grad_scale: grad_scale as f32,
                bc1: bc1 as f32,
                bc2: bc2 as f32,
            };
            slot.var.as_tensor().inplace_op2(&g, &op)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_warms_up_then_decays_to_floor() {
        let lr = |s| learning_rate(s, 1e-3, 1e-4, 100, 2000);
        assert!(lr(0) < lr(50) && lr(50) < lr(99));
        assert!((lr(100) - 1e-3).abs() < 1e-9);
        assert!(lr(1000) < 1e-3 && lr(1000) > 1e-4);
        assert!((lr(2000) - 1e-4).abs() < 1e-12);
    }

    /// The fused update equals AdamW written out by hand for two steps.
    #[test]
    fn update_matches_hand_written_adamw() {
        let dev = Device::Cpu;
        let p0 = [0.5f32, -1.0, 2.0];
        let var = Var::from_tensor(&Tensor::new(&p0, &dev).unwrap()).unwrap();
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = AdamW::new(cfg, vec![Slot::new("w".into(), var.clone(), true)]);
        let grads = [[0.1f32, -0.2, 0.3], [0.05, 0.1, -0.4]];
        let (mut p, mut m, mut v) = (p0.map(f64::from), [0f64; 3], [0f64; 3]);
        for (t, g) in grads.iter().enumerate() {
            opt.step(&[Tensor::new(g, &dev).unwrap()], 0.01, 1.0)
                .unwrap();
            for i in 0..3 {
                let gi = g[i] as f64;
                m[i] = 0.9 * m[i] + 0.1 * gi;
                v[i] = 0.99 * v[i] + 0.01 * gi * gi;
                let mh = m[i] / (1.0 - 0.9f64.powi(t as i32 + 1));
                let vh = v[i] / (1.0 - 0.99f64.powi(t as i32 + 1));
                p[i] -= 0.01 * (mh / (vh.sqrt() + 1e-8) + 0.1 * p[i]);
            }
        }
        let got = var.as_tensor().to_vec1::<f32>().unwrap();
        for i in 0..3 {
            assert!((got[i] as f64 - p[i]).abs() < 1e-6, "{got:?} vs {p:?}");
        }
    }
}

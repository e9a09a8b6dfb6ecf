//! Token streams for training: a train/validation split of one token sequence and random
//! contiguous windows drawn from it.

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
}

#[derive(Debug, Clone)]
pub struct Dataset {
    pub train: Vec<u32>,
    pub val: Vec<u32>,
}

impl Dataset {
    /// The last `val_fraction` of `tokens` is the validation split.
    pub fn split(tokens: Vec<u32>, val_fraction: f64, seq_len: usize) -> Result<Self> {
        let n_val = ((tokens.len() as f64) * val_fraction).round() as usize;
        let n_train = tokens.len() - n_val.min(tokens.len());
        let (train, val) = (tokens[..n_train].to_vec(), tokens[n_train..].to_vec());
        for (name, part) in [("training", &train), ("validation", &val)] {
            if part.len() < seq_len + 2 {
                return Err(Error::Data(format!(
                    "the {name} split has {} tokens, fewer than one window of {} + 1",
                    part.len(),
                    seq_len
                )));
            }
        }
        Ok(Self { train, val })
    }

    fn tokens(&self, split: Split) -> &[u32] {
        match split {
            Split::Train => &self.train,
            Split::Val => &self.val,
        }
    }

    /// `batch` random windows: inputs `(batch, seq_len)` and the next-token targets.
    pub fn batch(
        &self,
        split: Split,
        rng: &mut Rng,
        batch: usize,
        seq_len: usize,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let toks = self.tokens(split);
        let mut x = Vec::with_capacity(batch * seq_len);
        let mut y = Vec::with_capacity(batch * seq_len);
        for _ in 0..batch {
            let s = rng.below(toks.len() - seq_len - 1);
            x.extend_from_slice(&toks[s..s + seq_len]);
            y.extend_from_slice(&toks[s + 1..s + seq_len + 1]);
        }
        Ok((
            Tensor::from_vec(x, (batch, seq_len), device)?,
            Tensor::from_vec(y, (batch, seq_len), device)?,
        ))
    }
}

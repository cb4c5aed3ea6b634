//! `Decoder`: one sequence being run on some device, the seam that generation, perplexity and
//! logits are written against. The CPU decoder is the model with its growing KV cache; the
//! CUDA backend (crate qlora-cuda) implements the same trait over its paged cache.

use crate::{KvCache, Logits, Model, Result};

pub trait Decoder {
    fn vocab_size(&self) -> usize;
    /// Runs `ids` at the sequence's next positions, appending to its cache.
    /// # Shapes
    /// ids [t] → logits [t, v] (All) or [1, v] (Last)
    fn step(&mut self, ids: &[u32], which: Logits) -> Result<Vec<f32>>;
    /// Forgets the sequence: the next step starts at position 0.
    fn reset(&mut self);
    /// Σ −log p(ids[i] | ids[..i]) over i ≥ 1 from a fresh sequence, and the number of
    /// predictions (transformers' `labels=ids` loss).
    fn nll(&mut self, ids: &[u32]) -> Result<(f64, usize)> {
        self.reset();
        let logits = self.step(ids, Logits::All)?;
        self.reset();
        Ok(nll_of(&logits, ids, self.vocab_size()))
    }
    /// `nll` the way generation sees the text: one token a step through the cache, so the
    /// one-token (decode) kernels score every prediction.
    fn nll_stepwise(&mut self, ids: &[u32]) -> Result<(f64, usize)> {
        self.reset();
        let mut nll = 0f64;
        for pair in ids.windows(2) {
            let logits = self.step(&pair[..1], Logits::Last)?;
            nll += nll_of(&logits, pair, self.vocab_size()).0;
        }
        self.reset();
        Ok((nll, ids.len().saturating_sub(1)))
    }
}

/// The negative log-likelihood of each next token under `logits` [t, v].
pub(crate) fn nll_of(logits: &[f32], ids: &[u32], v: usize) -> (f64, usize) {
    let mut nll = 0f64;
    for (i, &next) in ids.iter().enumerate().skip(1) {
        let row = &logits[(i - 1) * v..i * v];
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = row
            .iter()
            .map(|&x| (x as f64 - max).exp())
            .sum::<f64>()
            .ln()
            + max;
        nll += lse - row[next as usize] as f64;
    }
    (nll, ids.len().saturating_sub(1))
}

/// The CPU path: the model and one KV cache.
pub struct CpuDecoder<'a> {
    model: &'a Model,
    cache: KvCache,
}

impl<'a> CpuDecoder<'a> {
    pub fn new(model: &'a Model) -> Self {
        CpuDecoder {
            model,
            cache: KvCache::new(model),
        }
    }
}

impl Decoder for CpuDecoder<'_> {
    fn vocab_size(&self) -> usize {
        self.model.vocab_size()
    }
    fn step(&mut self, ids: &[u32], which: Logits) -> Result<Vec<f32>> {
        self.model.forward(ids, &mut self.cache, which)
    }
    fn reset(&mut self) {
        self.cache = KvCache::new(self.model);
    }
}

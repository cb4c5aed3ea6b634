//! Where a micro-batch's loss and adapter gradients are computed. The training loop (`run`)
//! only sees this trait: the CPU (`CpuBackend`, `grad::packed_loss`) or a GPU (qlora-cuda's
//! `CudaTrainer`), with the same contract, so checkpoints, resume, metrics and the optimizer are
//! one code path whatever the device.

use crate::grad::{packed_loss, Adapters, Grads, Noise};
use qlora_model::Model;

pub trait LossBackend {
    /// `packed_loss`'s contract: the sum of the token losses of `seqs` packed into one pass and
    /// the number of predicted tokens; with `grads`, the gradients of Σ loss / `norm` are added
    /// into them. `noise` turns the adapters' dropout on.
    fn packed_loss(
        &mut self,
        ad: &Adapters,
        noise: Option<Noise>,
        seqs: &[(&[u32], &[Option<u32>])],
        norm: f32,
        grads: Option<&mut Grads>,
    ) -> Result<(f64, usize), String>;
}

/// The CPU trainer (`grad::packed_loss`).
pub struct CpuBackend<'a> {
    pub model: &'a Model,
    /// Budget for keeping activations from forward to backward.
    pub keep_activations_bytes: usize,
}

impl LossBackend for CpuBackend<'_> {
    fn packed_loss(
        &mut self,
        ad: &Adapters,
        noise: Option<Noise>,
        seqs: &[(&[u32], &[Option<u32>])],
        norm: f32,
        grads: Option<&mut Grads>,
    ) -> Result<(f64, usize), String> {
        Ok(packed_loss(
            self.model,
            ad,
            noise,
            seqs,
            norm,
            grads,
            self.keep_activations_bytes,
        ))
    }
}

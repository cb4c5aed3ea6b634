//! Where a micro-batch's loss and adapter gradients are computed. The training loop (`run`)
//! only sees this trait: the CPU (`CpuBackend`, `grad::packed_loss`) or a GPU (qlora-cuda's
//! `CudaTrainer`), with the same contract, so checkpoints, resume, metrics and the optimizer are
//! one code path whatever the device.

use crate::grad::{packed_loss, Adapters, Grads, Noise};
use crate::optim::AdamW;
use crate::Result;
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
    ) -> Result<(f64, usize)>;

    /// Whether the backend keeps the adapters, their gradients and the optimizer state on its
    /// device between steps (then the loop drives it through the `resident_*` methods, and the
    /// host copies are brought up to date only by `resident_store`).
    fn resident(&self) -> bool {
        false
    }
    /// Takes the adapters and the optimizer state (at the start, and on resume).
    fn resident_load(&mut self, _ad: &Adapters, _opt: &AdamW) -> Result<()> {
        Err(crate::Error::Backend(
            "this backend does not keep the adapters on its device".into(),
        ))
    }
    /// Zeroes the gradient accumulators.
    fn resident_zero_grads(&mut self) -> Result<()> {
        Err(crate::Error::Backend(
            "this backend does not keep the adapters on its device".into(),
        ))
    }
    /// `packed_loss` with the resident adapters; with `accumulate`, the gradients of
    /// Σ loss / `norm` are added into the resident accumulators.
    fn resident_loss(
        &mut self,
        _noise: Option<Noise>,
        _seqs: &[(&[u32], &[Option<u32>])],
        _norm: f32,
        _accumulate: bool,
    ) -> Result<(f64, usize)> {
        Err(crate::Error::Backend(
            "this backend does not keep the adapters on its device".into(),
        ))
    }
    /// One optimizer step on the accumulated gradients: `clip_grad_norm` to `max_norm`, then
    /// `AdamW::update` with `lr` (`opt` gives the hyperparameters; its step count advances,
    /// its moments live on the device). Returns the gradient norm before clipping; when it is
    /// not finite, nothing is updated (and the step count stays).
    fn resident_update(
        &mut self,
        _opt: &mut AdamW,
        _lr: f32,
        _max_norm: Option<f32>,
    ) -> Result<f32> {
        Err(crate::Error::Backend(
            "this backend does not keep the adapters on its device".into(),
        ))
    }
    /// Sums the accumulated gradients over the data-parallel ranks on the device, when the
    /// backend has a device communicator; false: it has none (the loop sums through the host
    /// with `resident_grads` / `resident_set_grads`).
    fn resident_all_reduce(&mut self) -> Result<bool> {
        Ok(false)
    }
    /// The accumulated gradients as one vector (every A in the adapters' order, then every B),
    /// for a data-parallel sum across ranks.
    fn resident_grads(&mut self, _out: &mut Vec<f32>) -> Result<()> {
        Err(crate::Error::Backend(
            "this backend does not keep the adapters on its device".into(),
        ))
    }
    /// Replaces the accumulated gradients by `v` (the layout of `resident_grads`).
    fn resident_set_grads(&mut self, _v: &[f32]) -> Result<()> {
        Err(crate::Error::Backend(
            "this backend does not keep the adapters on its device".into(),
        ))
    }
    /// Copies the adapters and the optimizer's moments back to the host (checkpoints, the end).
    fn resident_store(&mut self, _ad: &mut Adapters, _opt: &mut AdamW) -> Result<()> {
        Err(crate::Error::Backend(
            "this backend does not keep the adapters on its device".into(),
        ))
    }
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
    ) -> Result<(f64, usize)> {
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

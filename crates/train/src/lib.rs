//! qlora-train: LoRA/DoRA fine-tuning on a frozen base, dense or 4-bit. `grad`: loss and
//! adapter gradients with per-layer recomputation and packed sequences; `backend`: the device
//! seam the loop computes them through (CPU here, CUDA in qlora-cuda); `optim`: AdamW as
//! PyTorch's, schedules, clipping; `data`: JSONL training formats; `run`: the loop, checkpoints,
//! metrics and the loss plot; `dist`: data-parallel ranks (a TCP group summing gradients in
//! rank order).

pub mod backend;
pub mod data;
pub mod dist;
mod error;
pub mod grad;
pub mod optim;
pub mod run;

pub use backend::{CpuBackend, LossBackend};
pub use error::{Error, Result};
pub use grad::{
    module_seed, packed_loss, sequence_loss, Adapters, Grads, LoraParam, Noise,
    KEEP_ACTIVATIONS_BYTES,
};
pub use optim::{AdamW, Schedule};

/// Trainable adapters from a PEFT adapter planned against a model (`--init-adapter`, resume):
/// every linear delta (LoRA or DoRA) becomes a `LoraParam`. Embedding adapters are not trainable yet.
pub fn adapters_from_plan(plan: &qlora_lora::Plan, dropout: f32) -> Result<Adapters> {
    if !plan.embedding.is_empty() {
        return Err(Error::Invalid(
            "training embedding adapters is not supported yet".into(),
        ));
    }
    let mut params = Vec::new();
    for d in &plan.linear {
        if d.b_bias.is_some() {
            return Err(Error::Invalid(format!(
                "\"{}\" has lora_bias; training it is not supported yet",
                d.module
            )));
        }
        let d_in = d.a.len() / d.rank;
        let d_out = d.b.len() / d.rank;
        params.push(LoraParam {
            module: d.module.clone(),
            rank: d.rank,
            d_in,
            d_out,
            scaling: d.scaling,
            a: d.a.clone(),
            b: d.b.clone(),
            magnitude: d.magnitude.clone(),
        });
    }
    Ok(Adapters::new(params, dropout))
}

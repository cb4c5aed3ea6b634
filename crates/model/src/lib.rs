//! qlora-model: the one Llama/Mistral definition. Loading HF-named tensors into `Model`
//! (every name, shape and type checked against the config), the forward pass with a KV cache,
//! sampling and generation. Model code never knows how a weight is stored.

mod adapters;
mod decoder;
mod error;
mod forward;
mod generate;
mod load;
mod model;
pub mod plan;
pub mod quantize;
mod rope;
mod sampling;
pub mod synthetic;

pub use decoder::{CpuDecoder, Decoder};
pub use error::{Error, Result};
pub use forward::{BatchSeq, KvCache, Logits};
pub use generate::{
    generate_with, render_chat, render_messages, GenerateParams, Generation, TextStream,
};
pub use load::LoadOptions;
pub use model::{EmbeddingLora, Layer, Lora, Model, Projection};
pub use qlora_lora::merge::{delta_weight, dora_row_norms};
pub use quantize::QuantizeSpec;
pub use rope::inv_freq;
pub use sampling::{argmax as sampling_argmax, Sampler, SamplingParams};

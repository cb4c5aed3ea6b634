//! qlora-lora: PEFT adapters. Reading `adapter_config.json` (every LoRA field PEFT has written)
//! and the weights (`adapter_model.safetensors`, or `adapter_model.bin` through a restricted
//! unpickler that executes nothing), multi-adapter directories, matching every tensor to a
//! model's modules with shape checks and precise misfit messages, per-module scaling (LoRA,
//! rsLoRA, rank/alpha patterns), the provenance sidecar, and merging adapters into dense
//! weights (`merge`).

pub mod adapter;
pub mod config;
pub mod merge;
pub mod pickle;
pub mod provenance;

pub use adapter::{
    format_problems, open_adapters, Adapter, EmbeddingDelta, LinearDelta, LoraError, ModelShapes,
    Plan,
};
pub use config::{AdapterConfig, ConfigError, Targets};
pub use provenance::{BaseQuantization, Fingerprint, Provenance, ProvenanceError};

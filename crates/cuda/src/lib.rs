//! qlora-cuda: the CUDA backend. One GPU (`Gpu`: context, stream, cuBLAS, the kernels of
//! `kernels.cu` compiled by NVRTC for the device's architecture at run time), the model's
//! weights uploaded once in their packed format (`CudaModel`), a paged KV cache of fixed-size
//! blocks shared by the sequences of a batch, and one forward over a batch of sequences, each
//! with its own positions. Decode steps replay a captured CUDA graph.
//!
//! The build needs no CUDA toolkit (`cudarc` loads libcuda, libcublas and libnvrtc at run
//! time); without them every entry point returns `Error::Missing` with what to install.

pub mod bench;
mod gpu;
mod model;
mod nccl;

pub use gpu::{
    attention_part_bytes, attention_splits, compile, compile_source, device_count, gemv4_fits,
    gemv4_kernel, gemv4m_fits, gemvq_fits, lora_split, nvrtc_present, Arg, AttRope, Attention,
    DevBuf, Dt, Gemv4, GemvFuse, Gemvq, Gpu, Graph, ATT_MAX_SPLITS, GEMVQ_MAX_T, GEMV_MAX_T,
    KERNELS, KERNEL_NAMES,
};
pub use model::train::{CudaTrainer, Recompute};
pub use model::{CudaDecoder, CudaModel, CudaOptions, Seq, KV_BLOCK};
pub use nccl::{nccl_present, unique_id as nccl_unique_id, NcclComm};

/// The numeric mode of the GPU path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// f32 everywhere (no TF32): reproduces the CPU within rounding, for checking.
    F32,
    /// bf16 matrix-product inputs, weights and KV cache, f32 accumulation and residual stream.
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(format!("unknown precision \"{s}\": use f32 or bf16")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A library or device is missing; the message says what to install or use.
    #[error("{0}")]
    Missing(String),
    #[error("CUDA: {0}")]
    Cuda(String),
    #[error("NVRTC could not compile the kernels: {0}")]
    Compile(String),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, Error>;

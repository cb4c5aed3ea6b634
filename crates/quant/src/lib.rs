//! qlora-quant: number formats, each with a scalar reference (the documentation and the test
//! oracle) and, where it pays, a fast path tested against it. Depends on nothing of qlora's.

pub mod bnb;
mod bnb_dot;
mod bnb_q8;
mod bnb_tensor;
mod dot;
mod ggml;
mod ggml_quantize;

pub use bnb::Quant4;
pub use bnb_dot::{
    bf16_dot_row, bf16_dot_rows, bnb4_dot_row, bnb4_dot_row_scalar, bnb4_dot_rows, Bnb4Activation,
};
pub use bnb_q8::{bnb4_dot_rows_q8, Q8Activation, Q8Code};
pub use bnb_tensor::{quantize_tensor, QuantizeSpec, Quantized4};
pub use dot::{block_sums, dot_row, dot_row_scalar, dot_rows, has_fused_dot};

pub use ggml::{dequantize_ggml, GgmlType};
pub use ggml_quantize::{quantize_ggml, GgmlQuantizeError, QUANTIZABLE};

/// Whether the AVX-512 kernels run: the CPU has AVX-512F and `QLORA_NO_AVX512` is not set (it
/// lets an AVX-512 host measure the AVX2 kernels most machines run).
pub fn use_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| {
            std::is_x86_feature_detected!("avx512f")
                && std::env::var_os("QLORA_NO_AVX512").is_none_or(|v| v.is_empty() || v == "0")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

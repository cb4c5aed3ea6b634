//! qlora-quant: number formats, each with a scalar reference (the documentation and the test
//! oracle) and, where it pays, a fast path tested against it. Depends on nothing of qlora's.

pub mod bnb;
mod bnb_dot;
mod dot;
mod ggml;

pub use bnb::Quant4;
pub use bnb_dot::{bf16_dot_row, bnb4_dot_row, bnb4_dot_row_scalar, Bnb4Activation};
pub use dot::{block_sums, dot_row, dot_row_scalar, has_fused_dot};

pub use ggml::{dequantize_ggml, GgmlType};

//! qlora-quant: number formats, each with a scalar reference (the documentation and the test
//! oracle) and, where it pays, a fast path tested against it. Depends on nothing of qlora's.

mod ggml;

pub use ggml::{dequantize_ggml, GgmlType};

//! qlora-engine: the compute. Weights in their stored format (`Weight`), widened to f32 one
//! tile at a time inside the matrix products, and the CPU ops the model is written in. Every
//! op has a plain scalar twin in `reference`, kept forever as its test oracle.
//!
//! Shape letters used throughout: t tokens, d hidden, h heads, kv kv-heads, hd head dim,
//! v vocab, f intermediate (MLP) size, r rank.

pub mod backward;
mod device;
mod matmul;
pub mod ops;
pub mod reference;
mod simd;
mod weight;

pub use device::{Device, DeviceRequest};
pub use weight::{Groups, LayoutError, Scales, SharedBytes, Weight, WeightFormat};

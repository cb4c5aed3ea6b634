//! qlora-io: every file format qlora reads and writes, and nothing else.
//! Tensors leave this crate as `RawTensor`s addressed by their Hugging Face name; foreign names
//! (GGUF's `blk.3.ffn_down`) are translated here, once.

#[cfg(target_endian = "big")]
compile_error!(
    "qlora casts little-endian file bytes to native numbers; big-endian targets are not supported"
);

mod atomic_file;
mod bnb;
mod bytes;
mod config;
mod error;
mod gguf;
mod gguf_write;
mod gptq;
mod model_dir;
mod partial_dir;
mod peft;
mod safetensors_file;
mod tokenizer;

pub use bnb::{
    bnb4_specs, bnb4_tensors, python_float_repr, quant_state_key, state_json_width, BnbConfig,
    NestedJson, QuantConfigError, QuantStateError, QuantStateJson,
};
pub use bytes::Bytes;
pub use config::{short_name, LinearSpec, ModelConfig, RopeScaling, LAYER_LINEARS};
pub use error::{Error, Result};
pub use gguf::{GgmlType, GgufFile, GgufValue};
pub use gguf_write::{
    gguf_name, permute_rows, GgufTensorSpec, GgufWriter, MixedArray, PermuteError,
};
pub use gptq::{GroupedConfig, GroupedError, GroupedMethod, GroupedParts, GroupedShapes};
pub use model_dir::{ModelSource, TensorStore};
pub use partial_dir::PartialDir;
pub use peft::{write_peft_adapter, PeftLoraConfig};
pub use safetensors_file::{
    write_safetensors, SafetensorsFile, StreamingWriter, TensorSpec, WriteTensor,
};
pub use tokenizer::{
    gguf_tokenizer_metadata, load_tokenizer_json, tokenizer_from_gguf, TokenizerInfo,
};

/// How one tensor's elements are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElementType {
    F32,
    F16,
    BF16,
    U8,
    I8,
    I32,
    I64,
    /// A block-quantized GGUF type (the block layout lives in qlora-quant).
    Ggml(GgmlType),
}

impl ElementType {
    pub fn name(&self) -> String {
        match self {
            ElementType::F32 => "f32".into(),
            ElementType::F16 => "f16".into(),
            ElementType::BF16 => "bf16".into(),
            ElementType::U8 => "u8".into(),
            ElementType::I8 => "i8".into(),
            ElementType::I32 => "i32".into(),
            ElementType::I64 => "i64".into(),
            ElementType::Ggml(t) => t.name().into(),
        }
    }
}

/// One tensor as stored in a file: its HF name, element type, shape (row-major, HF order) and bytes.
#[derive(Debug, Clone)]
pub struct RawTensor {
    pub name: String,
    pub dtype: ElementType,
    pub shape: Vec<usize>,
    pub data: Bytes,
}

/// A JSON object's entries in the file's order, deserialized by serde (serde_json's `Map`
/// sorts its keys): GPTQModel's `dynamic` rules and PEFT's `rank_pattern`/`alpha_pattern`,
/// whose first matching key wins, are order-sensitive.
#[derive(Debug, Clone, PartialEq)]
pub struct OrderedMap<V>(pub Vec<(String, V)>);

impl<'de, V: serde::Deserialize<'de>> serde::Deserialize<'de> for OrderedMap<V> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Entries<V>(std::marker::PhantomData<V>);
        impl<'de, V: serde::Deserialize<'de>> serde::de::Visitor<'de> for Entries<V> {
            type Value = OrderedMap<V>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut v = Vec::new();
                while let Some(e) = m.next_entry()? {
                    v.push(e);
                }
                Ok(OrderedMap(v))
            }
        }
        d.deserialize_map(Entries(std::marker::PhantomData))
    }
}

/// A tensor whose element type an operation does not take.
#[derive(Debug, thiserror::Error)]
#[error("tensor \"{tensor}\" is {dtype}; expected {expected}")]
pub struct DtypeError {
    pub tensor: String,
    pub dtype: String,
    pub expected: &'static str,
}

impl RawTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The values of an f32/f16/bf16 tensor as f32 (exact); an error naming the tensor for any
    /// other type.
    pub fn to_f32(&self) -> std::result::Result<Vec<f32>, DtypeError> {
        let b = self.data.as_slice();
        Ok(match self.dtype {
            ElementType::F32 => bytemuck::pod_collect_to_vec(b),
            ElementType::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            ElementType::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(DtypeError {
                    tensor: self.name.clone(),
                    dtype: other.name(),
                    expected: "f32, f16 or bf16",
                })
            }
        })
    }
}

//! GGUF v2/v3 reader: metadata, tensor directory, and the translation of llama.cpp's tensor
//! names and layouts to Hugging Face's (names, dims order, Q/K row permutation).

use crate::bytes::{map_file, Bytes};
use crate::{ElementType, Error, ModelConfig, RawTensor, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use qlora_quant::GgmlType;

fn element_type(t: GgmlType) -> ElementType {
    match t {
        GgmlType::F32 => ElementType::F32,
        GgmlType::F16 => ElementType::F16,
        GgmlType::BF16 => ElementType::BF16,
        t => ElementType::Ggml(t),
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
}

impl GgufValue {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v as u64),
            Self::U16(v) => Some(v as u64),
            Self::U32(v) => Some(v as u64),
            Self::U64(v) => Some(v),
            Self::I8(v) if v >= 0 => Some(v as u64),
            Self::I16(v) if v >= 0 => Some(v as u64),
            Self::I32(v) if v >= 0 => Some(v as u64),
            Self::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            // The shortest decimal that round-trips the f32 (1e-5, not 9.999999747378752e-6).
            Self::F32(v) => v.to_string().parse().ok(),
            Self::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(b) => Some(b),
            _ => None,
        }
    }
}

/// A tensor's directory entry, in GGUF terms.
#[derive(Debug, Clone)]
pub struct GgufTensorInfo {
    pub name: String,
    /// Dims fastest-first, as GGUF lists them.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    pub range: std::ops::Range<usize>,
}

pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: Vec<GgufTensorInfo>,
    map: Arc<memmap2::Mmap>,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
    /// Metadata values decoded so far (each takes 32 bytes in memory, however few in the file).
    values: usize,
}

/// Metadata values a file may hold: a real model's largest arrays (vocabulary, scores, token
/// types, merges) are a few hundred thousand each; this bounds the decoded metadata at
/// about 512 MB, whatever a file declares.
const MAX_METADATA_VALUES: usize = 1 << 24;

impl<'a> Reader<'a> {
    fn err(&self, what: &str) -> Error {
        Error::Gguf {
            path: self.path.into(),
            reason: format!(
                "{what} at byte {} (file is {} bytes; truncated or corrupt)",
                self.pos,
                self.buf.len()
            ),
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(e) => {
                let s = &self.buf[self.pos..e];
                self.pos = e;
                Ok(s)
            }
            None => Err(self.err(&format!("unexpected end of file reading {n} bytes"))),
        }
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N]> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn len(&mut self, what: &str) -> Result<usize> {
        let n = self.u64()?;
        // Every element takes at least one byte, so a count beyond the file size is a lie.
        if n > (self.buf.len() - self.pos) as u64 {
            return Err(self.err(&format!("{what} count {n} exceeds the file size")));
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> Result<String> {
        let n = self.len("string length")?;
        let s = self.take(n)?;
        Ok(String::from_utf8_lossy(s).into_owned())
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<GgufValue> {
        self.values += 1;
        if self.values > MAX_METADATA_VALUES {
            return Err(self.err(&format!(
                "the metadata holds more than {MAX_METADATA_VALUES} values (a model's vocabulary needs well under a million); the file is damaged or not a model"
            )));
        }
        Ok(match ty {
            0 => GgufValue::U8(self.arr::<1>()?[0]),
            1 => GgufValue::I8(self.arr::<1>()?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.arr()?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.arr()?)),
            4 => GgufValue::U32(self.u32()?),
            5 => GgufValue::I32(i32::from_le_bytes(self.arr()?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.arr()?)),
            7 => GgufValue::Bool(self.arr::<1>()?[0] != 0),
            8 => GgufValue::String(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(self.err("arrays nested too deeply"));
                }
                let inner = self.u32()?;
                let n = self.len("array")?;
                let mut v = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    v.push(self.value(inner, depth + 1)?);
                }
                GgufValue::Array(v)
            }
            10 => GgufValue::U64(self.u64()?),
            11 => GgufValue::I64(i64::from_le_bytes(self.arr()?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.arr()?)),
            t => return Err(self.err(&format!("unknown metadata value type {t}"))),
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let map = map_file(path)?;
        let mut r = Reader {
            buf: &map[..],
            pos: 0,
            path,
            values: 0,
        };
        let magic = r.take(4).map_err(|_| Error::Gguf {
            path: path.into(),
            reason: "file is too short to be GGUF".into(),
        })?;
        if magic != b"GGUF" {
            return Err(Error::Gguf {
                path: path.into(),
                reason: "bad magic: not a GGUF file".into(),
            });
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(Error::Gguf {
                path: path.into(),
                reason: format!("GGUF version {version} is not supported (qlora reads v2 and v3); re-convert the model with a current llama.cpp"),
            });
        }
        let n_tensors = r.len("tensor")?;
        let n_kv = r.len("metadata")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let v = r.value(ty, 0)?;
            metadata.insert(key, v);
        }
        let mut infos = Vec::with_capacity(n_tensors);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..n_tensors {
            let name = r.string()?;
            let nd = r.u32()? as usize;
            if nd == 0 || nd > 4 {
                return Err(Error::Tensor {
                    path: path.into(),
                    tensor: name,
                    reason: format!("{nd} dimensions; GGUF tensors have 1 to 4"),
                });
            }
            let mut dims = Vec::with_capacity(nd);
            for _ in 0..nd {
                dims.push(r.u64()?);
            }
            let ty = r.u32()?;
            let offset = r.u64()?;
            if !seen.insert(name.clone()) {
                return Err(Error::Tensor {
                    path: path.into(),
                    tensor: name,
                    reason: "appears twice in the tensor table; the file is corrupt".into(),
                });
            }
            infos.push((name, dims, ty, offset));
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(|v| v.as_u64())
            .unwrap_or(32)
            .max(1) as usize;
        let data_start = r.pos.div_ceil(alignment) * alignment;
        let mut tensors = Vec::with_capacity(infos.len());
        for (name, dims, ty, offset) in infos {
            let terr = |reason: String| Error::Tensor {
                path: path.into(),
                tensor: name.clone(),
                reason,
            };
            let Some(ggml_type) = GgmlType::from_id(ty) else {
                return Err(terr(format!(
                    "unsupported ggml tensor type id {ty}; qlora reads F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K"
                )));
            };
            let numel = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(|| terr("dims overflow".into()))?;
            let (bs, bb) = ggml_type.block();
            if dims[0] % bs as u64 != 0 {
                return Err(terr(format!(
                    "row length {} is not a multiple of the {} block size {bs}",
                    dims[0],
                    ggml_type.name()
                )));
            }
            let nbytes = (numel / bs as u64).checked_mul(bb as u64);
            let start = (data_start as u64).checked_add(offset);
            let end = start.and_then(|s| nbytes.and_then(|n| s.checked_add(n)));
            let nbytes = nbytes.unwrap_or(u64::MAX);
            match (start, end) {
                (Some(s), Some(e)) if e <= map.len() as u64 => tensors.push(GgufTensorInfo {
                    name,
                    dims,
                    ggml_type,
                    range: s as usize..e as usize,
                }),
                _ => {
                    return Err(terr(format!(
                        "data (offset {offset}, {nbytes} bytes) lies past the end of the file ({} bytes); the file is truncated",
                        map.len()
                    )))
                }
            }
        }
        Ok(GgufFile {
            path: path.into(),
            version,
            metadata,
            tensors,
            map,
        })
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    pub fn architecture(&self) -> &str {
        self.get("general.architecture")
            .and_then(|v| v.as_str())
            .unwrap_or("")
    }

    fn arch_u64(&self, key: &str) -> Option<u64> {
        self.get(&format!("{}.{key}", self.architecture()))
            .and_then(|v| v.as_u64())
    }
    fn arch_f64(&self, key: &str) -> Option<f64> {
        self.get(&format!("{}.{key}", self.architecture()))
            .and_then(|v| v.as_f64())
    }

    /// The HF config this file's metadata describes.
    pub fn config(&self) -> Result<ModelConfig> {
        let arch = self.architecture();
        if arch != "llama" {
            return Err(Error::Config {
                path: self.path.clone(),
                reason: format!("unsupported GGUF architecture \"{arch}\"; qlora runs \"llama\" (Llama and Mistral models)"),
            });
        }
        let need = |key: &str| {
            self.arch_u64(key)
                .map(|v| v as usize)
                .ok_or_else(|| Error::Config {
                    path: self.path.clone(),
                    reason: format!("metadata key llama.{key} is missing"),
                })
        };
        let heads = need("attention.head_count")?;
        let hidden = need("embedding_length")?;
        let vocab = match self.arch_u64("vocab_size") {
            Some(v) => v as usize,
            None => self
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.as_array())
                .map(|a| a.len())
                .or_else(|| {
                    self.find("token_embd.weight")
                        .map(|t| t.dims.get(1).copied().unwrap_or(0) as usize)
                })
                .unwrap_or(0),
        };
        let head_dim = self.arch_u64("attention.key_length").map(|v| v as usize);
        let tied = self.find("output.weight").is_none();
        let rope_scaling = match self.get("llama.rope.scaling.type").and_then(|v| v.as_str()) {
            Some("linear") => Some(crate::RopeScaling {
                rope_type: Some("linear".into()),
                factor: self.arch_f64("rope.scaling.factor"),
                low_freq_factor: None,
                high_freq_factor: None,
                original_max_position_embeddings: None,
                rope_theta: None,
            }),
            Some("none") | None => None,
            Some(t) => {
                return Err(Error::Config {
                    path: self.path.clone(),
                    reason: format!("unsupported rope scaling type \"{t}\" in GGUF metadata"),
                })
            }
        };
        if self.find("rope_freqs.weight").is_some() {
            return Err(Error::Config {
                path: self.path.clone(),
                reason: "GGUF llama3-style rope_freqs tensors are not supported yet; convert the Hugging Face model directory instead".into(),
            });
        }
        let tok_id = |k: &str| self.get(k).and_then(|v| v.as_u64()).map(|v| v as u32);
        let cfg = ModelConfig {
            architectures: vec!["LlamaForCausalLM".into()],
            model_type: "llama".into(),
            hidden_size: hidden,
            intermediate_size: need("feed_forward_length")?,
            num_hidden_layers: need("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: Some(
                self.arch_u64("attention.head_count_kv")
                    .map(|v| v as usize)
                    .unwrap_or(heads),
            ),
            head_dim: head_dim.filter(|&d| heads == 0 || d != hidden / heads),
            vocab_size: vocab,
            rms_norm_eps: self
                .arch_f64("attention.layer_norm_rms_epsilon")
                .unwrap_or(1e-5),
            rope_theta: Some(self.arch_f64("rope.freq_base").unwrap_or(10000.0)),
            rope_scaling,
            rope_parameters: None,
            max_position_embeddings: self
                .arch_u64("context_length")
                .map(|v| v as usize)
                .unwrap_or(2048),
            tie_word_embeddings: tied,
            sliding_window: None,
            attention_bias: self.find("blk.0.attn_q.bias").is_some(),
            mlp_bias: false,
            hidden_act: Some("silu".into()),
            bos_token_id: tok_id("tokenizer.ggml.bos_token_id"),
            eos_token_id: tok_id("tokenizer.ggml.eos_token_id").map(|v| serde_json::json!(v)),
            quantization_config: None,
        };
        let text = serde_json::to_string(&cfg).unwrap_or_default();
        ModelConfig::parse(&text, &self.path)
    }

    fn find(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Every tensor under its HF name, dims reversed to HF order, Q/K rows un-permuted from
    /// llama.cpp's interleaved RoPE layout back to HF's rotate-half layout.
    pub fn hf_tensors(&self, cfg: &ModelConfig) -> Result<Vec<RawTensor>> {
        let mut out = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            let Some(hf) = hf_name(&t.name) else {
                return Err(Error::Tensor {
                    path: self.path.clone(),
                    tensor: t.name.clone(),
                    reason: "unknown GGUF tensor name for the llama architecture".into(),
                });
            };
            let shape: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
            let mut data = Bytes::Mapped {
                map: self.map.clone(),
                range: t.range.clone(),
            };
            let n_head = if hf.ends_with("q_proj.weight") || hf.ends_with("q_proj.bias") {
                Some(cfg.num_attention_heads)
            } else if hf.ends_with("k_proj.weight") || hf.ends_with("k_proj.bias") {
                Some(cfg.num_kv_heads())
            } else {
                None
            };
            if let Some(n_head) = n_head {
                data = unpermute_rows(data.as_slice(), shape[0], n_head).map_err(|e| {
                    Error::Tensor {
                        path: self.path.clone(),
                        tensor: t.name.clone(),
                        reason: e.to_string(),
                    }
                })?;
            }
            out.push(RawTensor {
                name: hf,
                dtype: element_type(t.ggml_type),
                shape,
                data,
            });
        }
        Ok(out)
    }
}

/// Undo `convert_hf_to_gguf`'s permutation: row (h, i, j) of the (n_head, rows/n_head/2, 2)
/// view moves to (h, j, i) of the (n_head, 2, rows/n_head/2) view. Rows are independent
/// blocks of bytes in every GGUF type, so this works on quantized data too.
fn unpermute_rows(
    bytes: &[u8],
    rows: usize,
    n_head: usize,
) -> std::result::Result<Bytes, crate::gguf_write::PermuteError> {
    crate::gguf_write::check_permute(bytes.len(), rows, n_head)?;
    let row_bytes = bytes.len() / rows;
    let half = rows / n_head / 2;
    let mut out = vec![0u8; bytes.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let src = h * 2 * half + i * 2 + j;
                let dst = h * 2 * half + j * half + i;
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&bytes[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    Ok(Bytes::owned(out))
}

/// GGUF llama tensor name → HF name.
pub fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let hf_module = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf_module}.{suffix}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metadata_array_beyond_the_value_budget_is_refused() {
        // One u8 array of MAX_METADATA_VALUES + 1 elements: 16 MB of file, 512 MB decoded.
        let n = MAX_METADATA_VALUES as u64 + 1;
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes()); // tensors
        b.extend(1u64.to_le_bytes()); // metadata entries
        let key = b"tokenizer.ggml.token_type";
        b.extend((key.len() as u64).to_le_bytes());
        b.extend(key);
        b.extend(9u32.to_le_bytes()); // array
        b.extend(0u32.to_le_bytes()); // of u8
        b.extend(n.to_le_bytes());
        b.resize(b.len() + n as usize, 1);
        let path = std::env::temp_dir().join(format!("qlora-meta-{}.gguf", std::process::id()));
        std::fs::write(&path, &b).unwrap();
        let e = match GgufFile::open(&path) {
            Ok(_) => panic!("opened"),
            Err(e) => e.to_string(),
        };
        std::fs::remove_file(&path).unwrap();
        assert!(e.contains("more than") && e.contains("values"), "{e}");
    }
}

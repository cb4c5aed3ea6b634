//! GGUF v3 writer: metadata and a tensor directory up front, then each tensor's bytes in the
//! declared order (a producer holds one tensor at a time), and the translation of Hugging Face
//! names and layouts to llama.cpp's — the inverse of the reader's. Written to `.NAME.tmp` and
//! renamed into place by `finish`; dropped unfinished, the partial file is removed.

#[cfg(test)]
use crate::atomic_file::tmp_path;
use crate::atomic_file::AtomicFile;
use crate::{Error, GgmlType, GgufValue, Result};
use std::path::{Path, PathBuf};

/// Data alignment (GGUF's default, `general.alignment` unset).
const ALIGN: usize = 32;

/// One tensor to be written: its GGUF name, dims fastest-first (GGUF's order: `[cols, rows]`
/// for a matrix) and type.
#[derive(Debug, Clone)]
pub struct GgufTensorSpec {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
}

impl GgufTensorSpec {
    /// Bytes of its data.
    pub fn nbytes(&self) -> usize {
        let (bs, bb) = self.ggml_type.block();
        self.dims.iter().product::<u64>() as usize / bs * bb
    }
}

fn type_id(v: &GgufValue) -> u32 {
    match v {
        GgufValue::U8(_) => 0,
        GgufValue::I8(_) => 1,
        GgufValue::U16(_) => 2,
        GgufValue::I16(_) => 3,
        GgufValue::U32(_) => 4,
        GgufValue::I32(_) => 5,
        GgufValue::F32(_) => 6,
        GgufValue::Bool(_) => 7,
        GgufValue::String(_) => 8,
        GgufValue::Array(_) => 9,
        GgufValue::U64(_) => 10,
        GgufValue::I64(_) => 11,
        GgufValue::F64(_) => 12,
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// A metadata array of more than one value type (GGUF arrays hold one).
#[derive(Debug, thiserror::Error)]
#[error("an array mixes value types")]
pub struct MixedArray;

/// Rows that cannot be split into heads of rotary pairs (the Q/K permutation's shape).
#[derive(Debug, thiserror::Error)]
#[error("{rows} rows cannot be split into {heads} heads of rotary pairs")]
pub struct PermuteError {
    pub rows: usize,
    pub heads: usize,
}

/// Whether `len` values (or bytes) in `rows` rows split into `heads` heads of rotary pairs.
pub(crate) fn check_permute(
    len: usize,
    rows: usize,
    heads: usize,
) -> std::result::Result<(), PermuteError> {
    if rows == 0 || heads == 0 || !rows.is_multiple_of(2 * heads) || !len.is_multiple_of(rows) {
        return Err(PermuteError { rows, heads });
    }
    Ok(())
}

/// A value's bytes (without its type id). Arrays must be of one type.
fn put_value(out: &mut Vec<u8>, v: &GgufValue) -> std::result::Result<(), MixedArray> {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.push(*x as u8),
        GgufValue::U16(x) => out.extend(x.to_le_bytes()),
        GgufValue::I16(x) => out.extend(x.to_le_bytes()),
        GgufValue::U32(x) => out.extend(x.to_le_bytes()),
        GgufValue::I32(x) => out.extend(x.to_le_bytes()),
        GgufValue::F32(x) => out.extend(x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(*x as u8),
        GgufValue::String(s) => put_str(out, s),
        GgufValue::U64(x) => out.extend(x.to_le_bytes()),
        GgufValue::I64(x) => out.extend(x.to_le_bytes()),
        GgufValue::F64(x) => out.extend(x.to_le_bytes()),
        GgufValue::Array(a) => {
            let inner = a.first().map_or(4, type_id);
            if a.iter().any(|e| type_id(e) != inner) {
                return Err(MixedArray);
            }
            out.extend(inner.to_le_bytes());
            out.extend((a.len() as u64).to_le_bytes());
            for e in a {
                put_value(out, e)?;
            }
        }
    }
    Ok(())
}

pub struct GgufWriter {
    path: PathBuf,
    out: AtomicFile,
    specs: Vec<GgufTensorSpec>,
    next: usize,
}

impl GgufWriter {
    /// Writes the header (metadata in the given order, then the tensor directory).
    pub fn create(
        path: &Path,
        metadata: &[(String, GgufValue)],
        specs: &[GgufTensorSpec],
    ) -> Result<Self> {
        let bad = |reason: String| Error::Gguf {
            path: path.into(),
            reason,
        };
        let mut h = b"GGUF".to_vec();
        h.extend(3u32.to_le_bytes());
        h.extend((specs.len() as u64).to_le_bytes());
        h.extend((metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            put_str(&mut h, k);
            h.extend(type_id(v).to_le_bytes());
            put_value(&mut h, v).map_err(|e| bad(format!("metadata {k}: {e}")))?;
        }
        let mut offset = 0usize;
        let mut seen = std::collections::HashSet::new();
        for s in specs {
            if !seen.insert(&s.name) {
                return Err(bad(format!("tensor {} declared twice", s.name)));
            }
            let (bs, _) = s.ggml_type.block();
            if s.dims.is_empty() || s.dims.len() > 4 || s.dims[0] % bs as u64 != 0 {
                return Err(Error::Tensor {
                    path: path.into(),
                    tensor: s.name.clone(),
                    reason: format!(
                        "dims {:?} do not fit {} (rows of whole {bs}-element blocks, 1 to 4 dims)",
                        s.dims,
                        s.ggml_type.name()
                    ),
                });
            }
            put_str(&mut h, &s.name);
            h.extend((s.dims.len() as u32).to_le_bytes());
            for d in &s.dims {
                h.extend(d.to_le_bytes());
            }
            h.extend(s.ggml_type.id().to_le_bytes());
            h.extend((offset as u64).to_le_bytes());
            offset += s.nbytes().div_ceil(ALIGN) * ALIGN;
        }
        h.resize(h.len().div_ceil(ALIGN) * ALIGN, 0);
        let mut out = AtomicFile::create(path)?;
        out.write_all(&h)?;
        Ok(GgufWriter {
            path: path.into(),
            out,
            specs: specs.to_vec(),
            next: 0,
        })
    }

    /// The next declared tensor's bytes.
    pub fn write(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let err = |reason: String| Error::Tensor {
            path: self.path.clone(),
            tensor: name.into(),
            reason,
        };
        let Some(spec) = self.specs.get(self.next) else {
            return Err(err("more tensors written than declared".into()));
        };
        if spec.name != name {
            return Err(err(format!(
                "written out of order (expected \"{}\")",
                spec.name
            )));
        }
        if data.len() != spec.nbytes() {
            return Err(err(format!(
                "{} bytes for {} dims {:?}, expected {}",
                data.len(),
                spec.ggml_type.name(),
                spec.dims,
                spec.nbytes()
            )));
        }
        let pad = data.len().div_ceil(ALIGN) * ALIGN - data.len();
        self.out.write_all(data)?;
        self.out.write_all(&[0u8; ALIGN][..pad])?;
        self.next += 1;
        Ok(())
    }

    /// Renames the file into place once every declared tensor is written (dropped unfinished,
    /// the partial file is removed).
    pub fn finish(self) -> Result<()> {
        if let Some(s) = self.specs.get(self.next) {
            return Err(Error::Tensor {
                path: self.path.clone(),
                tensor: s.name.clone(),
                reason: "not written".into(),
            });
        }
        self.out.finish()
    }
}

/// HF llama tensor name → GGUF name (the inverse of `hf_name`).
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{suffix}"))
}

/// `convert_hf_to_gguf`'s Q/K permutation of `rows` rows of `row_len` values each (HF's
/// rotate-half order → llama.cpp's interleaved pairs): row (h, j, i) of the
/// (n_head, 2, rows/n_head/2) view moves to (h, i, j) of the (n_head, rows/n_head/2, 2) view.
pub fn permute_rows<T: Copy>(
    values: &[T],
    rows: usize,
    n_head: usize,
) -> std::result::Result<Vec<T>, PermuteError> {
    check_permute(values.len(), rows, n_head)?;
    let w = values.len() / rows;
    let half = rows / n_head / 2;
    let mut out = values.to_vec();
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let dst = h * 2 * half + i * 2 + j;
                let src = h * 2 * half + j * half + i;
                out[dst * w..(dst + 1) * w].copy_from_slice(&values[src * w..(src + 1) * w]);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GgufFile;

    /// What the writer writes, the reader reads back: metadata of every type, tensors of
    /// several types, names and dims, and the HF view with Q/K rows un-permuted.
    #[test]
    fn written_files_read_back() {
        let dir = std::env::temp_dir().join(format!("qlora-gguf-write-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.gguf");
        let meta = vec![
            (
                "general.architecture".to_string(),
                GgufValue::String("llama".into()),
            ),
            ("a.u8".into(), GgufValue::U8(7)),
            ("a.i32".into(), GgufValue::I32(-3)),
            ("a.f32".into(), GgufValue::F32(1e-5)),
            ("a.bool".into(), GgufValue::Bool(true)),
            ("a.u64".into(), GgufValue::U64(1 << 40)),
            ("a.f64".into(), GgufValue::F64(0.25)),
            (
                "a.strs".into(),
                GgufValue::Array(vec![
                    GgufValue::String("x y".into()),
                    GgufValue::String("é".into()),
                ]),
            ),
        ];
        let q: Vec<f32> = (0..8 * 32).map(|i| i as f32).collect();
        let specs = vec![
            GgufTensorSpec {
                name: "blk.0.attn_q.weight".into(),
                dims: vec![32, 8],
                ggml_type: GgmlType::F32,
            },
            GgufTensorSpec {
                name: "blk.0.attn_norm.weight".into(),
                dims: vec![32],
                ggml_type: GgmlType::F16,
            },
        ];
        let mut w = GgufWriter::create(&path, &meta, &specs).unwrap();
        let permuted = permute_rows(&q, 8, 2).unwrap();
        let bytes: Vec<u8> = permuted.iter().flat_map(|v| v.to_le_bytes()).collect();
        w.write("blk.0.attn_q.weight", &bytes).unwrap();
        assert!(w.write("blk.0.attn_norm.weight", &[0u8; 3]).is_err());
        w.write("blk.0.attn_norm.weight", &[0u8; 64]).unwrap();
        w.finish().unwrap();
        let g = GgufFile::open(&path).unwrap();
        for (k, v) in &meta {
            assert_eq!(g.get(k), Some(v), "{k}");
        }
        assert_eq!(g.tensors[0].dims, vec![32, 8]);
        assert_eq!(g.tensors[1].ggml_type, GgmlType::F16);
        // The reader's un-permutation gives back HF's row order.
        let cfg = crate::ModelConfig::parse(
            r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","hidden_size":32,"intermediate_size":64,"num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":2,"vocab_size":10,"max_position_embeddings":16}"#,
            &path,
        )
        .unwrap();
        let hf = g.hf_tensors(&cfg).unwrap();
        let t = hf
            .iter()
            .find(|t| t.name.ends_with("q_proj.weight"))
            .unwrap();
        assert_eq!(t.to_f32().unwrap(), q);
        assert_eq!(
            gguf_name("model.layers.0.self_attn.q_proj.weight").unwrap(),
            "blk.0.attn_q.weight"
        );
        assert_eq!(
            crate::gguf::hf_name("blk.3.ffn_down.weight").unwrap(),
            "model.layers.3.mlp.down_proj.weight"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// An unfinished writer leaves nothing behind.
    #[test]
    fn dropped_writers_remove_the_partial_file() {
        let dir = std::env::temp_dir().join(format!("qlora-gguf-drop-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.gguf");
        let specs = vec![GgufTensorSpec {
            name: "x".into(),
            dims: vec![4],
            ggml_type: GgmlType::F32,
        }];
        let w = GgufWriter::create(&path, &[], &specs).unwrap();
        assert!(tmp_path(&path).exists());
        drop(w);
        assert!(!tmp_path(&path).exists() && !path.exists());
        let e = GgufWriter::create(&path, &[], &specs)
            .unwrap()
            .finish()
            .err()
            .unwrap();
        assert!(e.to_string().contains("not written"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! Safetensors files: validated, memory-mapped reading; writing to a temporary name then renaming.

use crate::bytes::{map_file, Bytes};
use crate::{ElementType, Error, RawTensor, Result};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// One opened safetensors file: its tensors in file order.
pub struct SafetensorsFile {
    pub path: PathBuf,
    pub tensors: Vec<RawTensor>,
    pub metadata: BTreeMap<String, String>,
}

fn element_type(d: safetensors::Dtype) -> Option<ElementType> {
    use safetensors::Dtype as D;
    Some(match d {
        D::F32 => ElementType::F32,
        D::F16 => ElementType::F16,
        D::BF16 => ElementType::BF16,
        D::U8 => ElementType::U8,
        D::I8 => ElementType::I8,
        D::I32 => ElementType::I32,
        D::I64 => ElementType::I64,
        _ => return None,
    })
}

fn st_dtype(d: ElementType) -> Option<safetensors::Dtype> {
    use safetensors::Dtype as D;
    Some(match d {
        ElementType::F32 => D::F32,
        ElementType::F16 => D::F16,
        ElementType::BF16 => D::BF16,
        ElementType::U8 => D::U8,
        ElementType::I8 => D::I8,
        ElementType::I32 => D::I32,
        ElementType::I64 => D::I64,
        ElementType::Ggml(_) => return None,
    })
}

impl SafetensorsFile {
    /// Opens and validates a file: the header parses, every tensor's offsets lie inside the file,
    /// do not overlap, cover the data exactly and agree with dtype × shape.
    pub fn open(path: &Path) -> Result<Self> {
        let map = map_file(path)?;
        let (header_len, meta) =
            safetensors::SafeTensors::read_metadata(&map[..]).map_err(|e| Error::Safetensors {
                path: path.into(),
                reason: describe(&e, map.len()),
            })?;
        let data_start = 8 + header_len;
        let mut tensors = Vec::new();
        // `offset_keys` lists names sorted by data offset: file order.
        for name in meta.offset_keys() {
            let Some(info) = meta.info(&name) else {
                continue;
            };
            let Some(dtype) = element_type(info.dtype) else {
                return Err(Error::Tensor {
                    path: path.into(),
                    tensor: name,
                    reason: format!(
                        "unsupported tensor type {:?}; qlora reads F32, F16, BF16, U8, I8, I32 and I64",
                        info.dtype
                    ),
                });
            };
            let (a, b) = info.data_offsets;
            tensors.push(RawTensor {
                name,
                dtype,
                shape: info.shape.clone(),
                data: Bytes::Mapped {
                    map: map.clone(),
                    range: data_start + a..data_start + b,
                },
            });
        }
        let metadata = meta
            .metadata()
            .as_ref()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        Ok(SafetensorsFile {
            path: path.into(),
            tensors,
            metadata,
        })
    }
}

fn describe(e: &safetensors::SafeTensorError, file_len: usize) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => format!("file is only {file_len} bytes, too short for a header"),
        E::InvalidHeaderLength => {
            format!("the header length field points past the end of the file ({file_len} bytes)")
        }
        E::MetadataIncompleteBuffer => {
            "the tensor offsets in the header do not match the file size (truncated file or lying header)".into()
        }
        E::InvalidOffset(t) => format!("tensor \"{t}\" has offsets that overlap, leave gaps or lie outside the data"),
        E::TensorInvalidInfo => "a tensor's byte size does not match its dtype and shape".into(),
        other => format!("{other}"),
    }
}

/// A tensor to write: its name, type, shape and little-endian bytes.
pub struct WriteTensor<'a> {
    pub name: String,
    pub dtype: ElementType,
    pub shape: Vec<usize>,
    pub data: std::borrow::Cow<'a, [u8]>,
}

/// Writes a safetensors file (tensors sorted by name, 8-byte aligned header, the given metadata)
/// to `path.tmp` and renames it into place when complete.
pub fn write_safetensors(
    path: &Path,
    tensors: &[WriteTensor<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut sorted: Vec<&WriteTensor> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).unwrap_or_default(),
        );
    }
    let mut offset = 0usize;
    for t in &sorted {
        let Some(dt) = st_dtype(t.dtype) else {
            return Err(Error::Tensor {
                path: path.into(),
                tensor: t.name.clone(),
                reason: format!("cannot write {} tensors to safetensors", t.dtype.name()),
            });
        };
        let expect = t.shape.iter().product::<usize>() * dt.bitsize() / 8;
        if expect != t.data.len() {
            return Err(Error::Tensor {
                path: path.into(),
                tensor: t.name.clone(),
                reason: format!(
                    "{} bytes for shape {:?}, expected {expect}",
                    t.data.len(),
                    t.shape
                ),
            });
        }
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": dt, "shape": t.shape, "data_offsets": [offset, offset + expect]}),
        );
        offset += expect;
    }
    let mut hbytes = serde_json::to_vec(&header).map_err(|e| Error::Json {
        path: path.into(),
        reason: e.to_string(),
    })?;
    while hbytes.len() % 8 != 0 {
        hbytes.push(b' ');
    }
    let tmp = tmp_path(path);
    let write = || -> std::io::Result<()> {
        let f = std::fs::File::create(&tmp)?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        w.write_all(&(hbytes.len() as u64).to_le_bytes())?;
        w.write_all(&hbytes)?;
        for t in &sorted {
            w.write_all(&t.data)?;
        }
        w.flush()?;
        w.get_ref().sync_all()?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// `dir/name` → `dir/.name.tmp`: where a file is written before it is renamed into place.
pub(crate) fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

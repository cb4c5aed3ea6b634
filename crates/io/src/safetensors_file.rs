//! Safetensors files: validated, memory-mapped reading; writing to a temporary name then renaming.

use crate::atomic_file::AtomicFile;
use crate::bytes::{map_file, Bytes};
use crate::{ElementType, Error, RawTensor, Result};
use std::collections::BTreeMap;
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

/// The name, type and shape of a tensor about to be written.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: ElementType,
    pub shape: Vec<usize>,
}

/// The header (8-byte aligned JSON) and each tensor's byte size, tensors in the given order.
fn header_bytes(
    path: &Path,
    specs: &[TensorSpec],
    metadata: &BTreeMap<String, String>,
) -> Result<(Vec<u8>, Vec<usize>)> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).unwrap_or_default(),
        );
    }
    let mut offset = 0usize;
    let mut sizes = Vec::with_capacity(specs.len());
    for t in specs {
        let Some(dt) = st_dtype(t.dtype) else {
            return Err(Error::Tensor {
                path: path.into(),
                tensor: t.name.clone(),
                reason: format!("cannot write {} tensors to safetensors", t.dtype.name()),
            });
        };
        let size = t.shape.iter().product::<usize>() * dt.bitsize() / 8;
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": dt, "shape": t.shape, "data_offsets": [offset, offset + size]}),
        );
        offset += size;
        sizes.push(size);
    }
    let mut hbytes = serde_json::to_vec(&header).map_err(|e| Error::Json {
        path: path.into(),
        reason: e.to_string(),
    })?;
    while hbytes.len() % 8 != 0 {
        hbytes.push(b' ');
    }
    Ok((hbytes, sizes))
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
    let specs: Vec<TensorSpec> = sorted
        .iter()
        .map(|t| TensorSpec {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
        })
        .collect();
    let mut w = StreamingWriter::create(path, &specs, metadata)?;
    for t in &sorted {
        w.write(&t.name, &t.data)?;
    }
    w.finish()
}

/// A safetensors file written one tensor at a time, in the order declared up front, so that a
/// producer (a merge) holds only the tensor it is computing. Written to `path.tmp`; `finish`
/// renames it into place, and dropping the writer unfinished removes the partial file.
pub struct StreamingWriter {
    path: PathBuf,
    out: AtomicFile,
    specs: Vec<TensorSpec>,
    sizes: Vec<usize>,
    next: usize,
}

impl StreamingWriter {
    pub fn create(
        path: &Path,
        specs: &[TensorSpec],
        metadata: &BTreeMap<String, String>,
    ) -> Result<Self> {
        let (hbytes, sizes) = header_bytes(path, specs, metadata)?;
        let mut out = AtomicFile::create(path)?;
        out.write_all(&(hbytes.len() as u64).to_le_bytes())?;
        out.write_all(&hbytes)?;
        Ok(StreamingWriter {
            path: path.into(),
            out,
            specs: specs.to_vec(),
            sizes,
            next: 0,
        })
    }

    /// The next tensor's bytes; `name` must be the next declared tensor.
    pub fn write(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let i = self.next;
        let err = |reason: String| Error::Tensor {
            path: self.path.clone(),
            tensor: name.into(),
            reason,
        };
        let Some(spec) = self.specs.get(i) else {
            return Err(err("more tensors written than declared".into()));
        };
        if spec.name != name {
            return Err(err(format!(
                "written out of order (expected \"{}\")",
                spec.name
            )));
        }
        if data.len() != self.sizes[i] {
            return Err(err(format!(
                "{} bytes for shape {:?}, expected {}",
                data.len(),
                spec.shape,
                self.sizes[i]
            )));
        }
        self.out.write_all(data)?;
        self.next += 1;
        Ok(())
    }

    /// Renames the file into place once every declared tensor is written (dropped unfinished,
    /// the partial file is removed).
    pub fn finish(self) -> Result<()> {
        if self.next != self.specs.len() {
            return Err(Error::Tensor {
                path: self.path.clone(),
                tensor: self.specs[self.next].name.clone(),
                reason: "not written".into(),
            });
        }
        self.out.finish()
    }
}

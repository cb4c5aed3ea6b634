//! Reading the tensors of a PyTorch `torch.save` file (`adapter_model.bin`) without executing
//! anything: a zip reader for the stored (uncompressed) archive PyTorch writes, and a pickle
//! interpreter that knows only the opcodes `torch.save` emits and only the globals a state dict
//! needs (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2` /
//! `_rebuild_parameter`, `torch.*Storage`). Any other global is refused by name.

use qlora_io::{Bytes, ElementType, RawTensor};
use std::collections::HashMap;
use std::path::Path;

/// Why a `torch.save` file was refused (the file's path is added by the caller).
#[derive(Debug, thiserror::Error)]
pub enum PickleError {
    #[error("{0}")]
    Read(#[from] std::io::Error),
    #[error("not a zip archive (PyTorch ≥ 1.6 saves zip files); the file is truncated, corrupt or from a legacy torch")]
    NotZip,
    #[error("corrupt zip archive ({0}); the file is truncated or damaged")]
    CorruptZip(#[from] zip::result::ZipError),
    #[error("zip entry {name} is compressed ({method}); torch.save writes stored entries")]
    Compressed { name: String, method: String },
    #[error("zip entry {0} is too large")]
    EntryTooLarge(String),
    #[error("zip entry {0} has no readable data offset")]
    NoDataOffset(String),
    #[error("zip entry {0} runs past the end of the file; the file is truncated")]
    EntryPastEnd(String),
    #[error("the archive has no entry {0}")]
    NoEntry(String),
    #[error("not a PyTorch zip archive (no data.pkl); files from torch < 1.6 (legacy format) are not read, re-save with a recent torch")]
    NoDataPkl,
    #[error("the pickle is not a dict of tensors")]
    NotADict,
    #[error("a state-dict key is not a string")]
    KeyNotString,
    #[error("entry \"{0}\" is not a tensor")]
    NotATensor(String),
    #[error("tensor \"{name}\" is not contiguous (strides {strides:?})")]
    NotContiguous { name: String, strides: Vec<usize> },
    #[error(
        "tensor \"{name}\": shape {shape:?} at offset {offset} overflows; the file is corrupt"
    )]
    Overflow {
        name: String,
        shape: Vec<usize>,
        offset: usize,
    },
    #[error("tensor \"{name}\" needs bytes {start}..{end} of storage {storage} which has {len}; the file is truncated or corrupt")]
    PastStorage {
        name: String,
        start: usize,
        end: usize,
        storage: String,
        len: usize,
    },
    #[error("the pickle builds more than {budget} values from {bytes} bytes (a state dict needs far fewer); refusing it")]
    TooManyValues { budget: usize, bytes: usize },
    #[error("the pickle nests values deeper than {MAX_DEPTH}; refusing it")]
    TooDeep,
    /// A structural fault; the text says which.
    #[error("{0}")]
    Malformed(&'static str),
    #[error("the pickle references the global {0}, which a tensor file never needs; refusing to load it (only tensors are read, nothing is executed)")]
    ForbiddenGlobal(String),
    #[error("pickle opcode 0x{op:02x} at byte {at} is not one torch.save writes for a state dict; refusing to interpret it")]
    Opcode { op: u8, at: usize },
    #[error("storage type {0} is not a float type qlora reads")]
    StorageType(String),
    #[error("tensor storage offset {0} is negative; the file is corrupt")]
    NegativeOffset(i64),
    #[error("cannot call {0}")]
    CannotCall(String),
}

/// The tensors of a `torch.save`d state dict.
pub fn read_torch_file(path: &Path) -> Result<Vec<RawTensor>, PickleError> {
    let data = std::fs::read(path)?;
    let zip = Zip::parse(&data)?;
    let pkl_name = zip
        .names()
        .find(|n| n.ends_with("/data.pkl") || *n == "data.pkl")
        .ok_or(PickleError::NoDataPkl)?
        .to_string();
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    let pkl = zip.get(&pkl_name)?;
    let root = Unpickler::new(pkl).run()?;
    let Value::Dict(items) = root else {
        return Err(PickleError::NotADict);
    };
    let mut out = Vec::new();
    for (k, v) in items {
        let Value::Str(name) = k else {
            return Err(PickleError::KeyNotString);
        };
        let Value::Tensor(t) = v else {
            return Err(PickleError::NotATensor(name));
        };
        let storage = zip.get(&format!("{prefix}data/{}", t.storage))?;
        let (dtype, size) = t.dtype;
        // Row-major contiguous only (what save_pretrained writes).
        let mut expect = 1usize;
        for (dim, stride) in t.shape.iter().zip(&t.stride).rev() {
            if *dim > 1 && *stride != expect {
                return Err(PickleError::NotContiguous {
                    name,
                    strides: t.stride.clone(),
                });
            }
            expect *= dim;
        }
        let span = t
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|n| n.checked_mul(size))
            .and_then(|bytes| t.offset.checked_mul(size).map(|start| (start, bytes)))
            .and_then(|(start, bytes)| start.checked_add(bytes).map(|end| (start, end)));
        let Some((start, end)) = span else {
            return Err(PickleError::Overflow {
                name,
                shape: t.shape.clone(),
                offset: t.offset,
            });
        };
        if end > storage.len() {
            return Err(PickleError::PastStorage {
                name,
                start,
                end,
                storage: t.storage.clone(),
                len: storage.len(),
            });
        }
        out.push(RawTensor {
            name,
            dtype,
            shape: t.shape.clone(),
            data: Bytes::owned(storage[start..end].to_vec()),
        });
    }
    Ok(out)
}

struct Zip<'a> {
    data: &'a [u8],
    entries: Vec<(String, usize, usize)>, // name, data offset, size
}

impl<'a> Zip<'a> {
    /// The archive's entries as slices of `data` (torch.save stores them uncompressed), read
    /// with the `zip` crate (zip64 included).
    fn parse(data: &'a [u8]) -> Result<Zip<'a>, PickleError> {
        if data.len() < 22 || &data[..4] != b"PK\x03\x04" {
            return Err(PickleError::NotZip);
        }
        let mut z = zip::ZipArchive::new(std::io::Cursor::new(data))?;
        let mut entries = Vec::with_capacity(z.len());
        for i in 0..z.len() {
            let f = z.by_index_raw(i)?;
            let name = f.name()?.into_owned();
            if f.compression() != zip::CompressionMethod::Stored {
                return Err(PickleError::Compressed {
                    method: f.compression().to_string(),
                    name,
                });
            }
            let size =
                usize::try_from(f.size()).map_err(|_| PickleError::EntryTooLarge(name.clone()))?;
            let start = f
                .data_start()
                .and_then(|s| usize::try_from(s).ok())
                .ok_or_else(|| PickleError::NoDataOffset(name.clone()))?;
            if start.checked_add(size).is_none_or(|e| e > data.len()) {
                return Err(PickleError::EntryPastEnd(name));
            }
            entries.push((name, start, size));
        }
        Ok(Zip { data, entries })
    }

    fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.0.as_str())
    }

    fn get(&self, name: &str) -> Result<&'a [u8], PickleError> {
        self.entries
            .iter()
            .find(|e| e.0 == name)
            .map(|&(_, s, n)| &self.data[s..s + n])
            .ok_or_else(|| PickleError::NoEntry(name.to_string()))
    }
}

#[derive(Debug, Clone)]
struct TensorRef {
    storage: String,
    dtype: (ElementType, usize),
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

#[derive(Debug, Clone)]
enum Value {
    None,
    // Values kept for fidelity of the stack (requires_grad flags, metadata); never read.
    #[allow(dead_code)]
    Bool(bool),
    Int(i64),
    #[allow(dead_code)]
    Float(f64),
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(String),
    Storage(String, (ElementType, usize)),
    Tensor(TensorRef),
    Mark,
}

const ALLOWED: &[&str] = &[
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "torch.FloatStorage",
    "torch.HalfStorage",
    "torch.BFloat16Storage",
];

fn storage_dtype(g: &str) -> Option<(ElementType, usize)> {
    match g {
        "torch.FloatStorage" => Some((ElementType::F32, 4)),
        "torch.HalfStorage" => Some((ElementType::F16, 2)),
        "torch.BFloat16Storage" => Some((ElementType::BF16, 2)),
        _ => None,
    }
}

struct Unpickler<'a> {
    b: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<usize, Value>,
    /// Values walked so far (memo copies, items put into containers), against `budget`.
    work: usize,
    /// 64 values per byte of pickle plus a constant: a state dict needs a few per byte; a
    /// pickle that memoizes and re-copies values to grow exponentially runs out of it.
    budget: usize,
}

/// Deeper nesting than any state dict has (torch.save's is under 10); it also keeps the
/// recursive drop of a value from overflowing the stack.
const MAX_DEPTH: usize = 100;

impl<'a> Unpickler<'a> {
    fn new(b: &'a [u8]) -> Self {
        Unpickler {
            b,
            pos: 0,
            stack: Vec::new(),
            memo: HashMap::new(),
            work: 0,
            budget: 64 * b.len() + 1_000_000,
        }
    }

    /// Walks `v` (without recursion), charging its values to the budget; returns its depth.
    fn charge(&mut self, v: &Value) -> Result<usize, PickleError> {
        let mut todo: Vec<(&Value, usize)> = vec![(v, 1)];
        let mut depth = 0;
        while let Some((v, d)) = todo.pop() {
            self.work += 1;
            depth = depth.max(d);
            if self.work > self.budget {
                return Err(PickleError::TooManyValues {
                    budget: self.budget,
                    bytes: self.b.len(),
                });
            }
            if d > MAX_DEPTH {
                return Err(PickleError::TooDeep);
            }
            match v {
                Value::Tuple(x) | Value::List(x) => todo.extend(x.iter().map(|c| (c, d + 1))),
                Value::Dict(x) => todo.extend(x.iter().flat_map(|(k, c)| [(k, d + 1), (c, d + 1)])),
                _ => {}
            }
        }
        Ok(depth)
    }

    /// Charges values about to go one level into a container.
    fn charge_all<'v>(
        &mut self,
        items: impl IntoIterator<Item = &'v Value>,
    ) -> Result<(), PickleError> {
        for v in items {
            if self.charge(v)? + 1 > MAX_DEPTH {
                return Err(PickleError::TooDeep);
            }
        }
        Ok(())
    }

    /// A copy of the stack top for the memo, charged.
    fn top_for_memo(&mut self) -> Result<Value, PickleError> {
        let v = self
            .stack
            .last()
            .cloned()
            .ok_or(PickleError::Malformed("malformed pickle"))?;
        self.charge(&v)?;
        Ok(v)
    }

    /// A copy of memo entry `i`, charged.
    fn memo_copy(&mut self, i: usize) -> Result<Value, PickleError> {
        let v = self
            .memo
            .get(&i)
            .cloned()
            .ok_or(PickleError::Malformed("malformed pickle (memo)"))?;
        self.charge(&v)?;
        Ok(v)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let s = self
            .b
            .get(self.pos..self.pos + n)
            .ok_or(PickleError::Malformed("truncated pickle"))?;
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<usize, PickleError> {
        Ok(self.take(1)?[0] as usize)
    }
    fn u32(&mut self) -> Result<usize, PickleError> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as usize)
    }
    fn line(&mut self) -> Result<String, PickleError> {
        let rest = &self.b[self.pos..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or(PickleError::Malformed("truncated pickle"))?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }
    fn pop(&mut self) -> Result<Value, PickleError> {
        self.stack
            .pop()
            .ok_or(PickleError::Malformed("malformed pickle (stack underflow)"))
    }
    fn pop_mark(&mut self) -> Result<Vec<Value>, PickleError> {
        let i = self
            .stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or(PickleError::Malformed("malformed pickle (no mark)"))?;
        let items = self.stack.split_off(i + 1);
        self.stack.pop();
        Ok(items)
    }

    fn run(mut self) -> Result<Value, PickleError> {
        loop {
            let op = self.u8()? as u8;
            match op {
                0x80 => {
                    self.u8()?; // PROTO
                }
                0x95 => {
                    self.take(8)?; // FRAME
                }
                b'}' => self.stack.push(Value::Dict(Vec::new())),
                b']' => self.stack.push(Value::List(Vec::new())),
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                b'(' => self.stack.push(Value::Mark),
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'K' => {
                    let v = self.u8()? as i64;
                    self.stack.push(Value::Int(v))
                }
                b'M' => {
                    let s = self.take(2)?;
                    self.stack
                        .push(Value::Int(u16::from_le_bytes([s[0], s[1]]) as i64))
                }
                b'J' => {
                    let s = self.take(4)?;
                    self.stack.push(Value::Int(
                        i32::from_le_bytes([s[0], s[1], s[2], s[3]]) as i64
                    ))
                }
                0x8a => {
                    let n = self.u8()?;
                    let s = self.take(n)?;
                    if n > 8 {
                        return Err(PickleError::Malformed("integer too large in pickle"));
                    }
                    let mut v: i64 = 0;
                    for (i, &byte) in s.iter().enumerate() {
                        v |= (byte as i64) << (8 * i);
                    }
                    if n > 0 && n < 8 && s[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.stack.push(Value::Int(v))
                }
                b'G' => {
                    let s = self.take(8)?;
                    self.stack.push(Value::Float(f64::from_be_bytes(
                        s.try_into().expect("take(8) gives 8 bytes"),
                    )))
                }
                b'X' => {
                    let n = self.u32()?;
                    let s = self.take(n)?;
                    self.stack
                        .push(Value::Str(String::from_utf8_lossy(s).into_owned()))
                }
                0x8c => {
                    let n = self.u8()?;
                    let s = self.take(n)?;
                    self.stack
                        .push(Value::Str(String::from_utf8_lossy(s).into_owned()))
                }
                b'U' => {
                    let n = self.u8()?;
                    let s = self.take(n)?;
                    self.stack
                        .push(Value::Str(String::from_utf8_lossy(s).into_owned()))
                }
                b'T' => {
                    let n = self.u32()?;
                    let s = self.take(n)?;
                    self.stack
                        .push(Value::Str(String::from_utf8_lossy(s).into_owned()))
                }
                b'q' => {
                    let i = self.u8()?;
                    let v = self.top_for_memo()?;
                    self.memo.insert(i, v);
                }
                b'r' => {
                    let i = self.u32()?;
                    let v = self.top_for_memo()?;
                    self.memo.insert(i, v);
                }
                0x94 => {
                    let v = self.top_for_memo()?;
                    let i = self.memo.len();
                    self.memo.insert(i, v);
                }
                b'h' => {
                    let i = self.u8()?;
                    let v = self.memo_copy(i)?;
                    self.stack.push(v)
                }
                b'j' => {
                    let i = self.u32()?;
                    let v = self.memo_copy(i)?;
                    self.stack.push(v)
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = format!("{module}.{name}");
                    if !ALLOWED.contains(&g.as_str()) {
                        return Err(PickleError::ForbiddenGlobal(g));
                    }
                    self.stack.push(Value::Global(g))
                }
                0x93 => {
                    // STACK_GLOBAL (protocol 4)
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(m), Value::Str(n)) = (module, name) else {
                        return Err(PickleError::Malformed("malformed pickle (STACK_GLOBAL)"));
                    };
                    let g = format!("{m}.{n}");
                    if !ALLOWED.contains(&g.as_str()) {
                        return Err(PickleError::ForbiddenGlobal(g));
                    }
                    self.stack.push(Value::Global(g))
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.charge_all(&items)?;
                    self.stack.push(Value::Tuple(items))
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err(PickleError::Malformed("malformed pickle (stack underflow)"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.charge_all(&items)?;
                    self.stack.push(Value::Tuple(items))
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.stack.push(Self::persistent(pid)?)
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    self.stack.push(Self::reduce(f, args)?)
                }
                b'b' => {
                    // BUILD: state for an object we made; state dicts only carry empty/metadata
                    // state, which does not change tensors.
                    self.pop()?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.charge_all([&k, &v])?;
                    match self.stack.last_mut() {
                        Some(Value::Dict(d)) => d.push((k, v)),
                        _ => return Err(PickleError::Malformed("malformed pickle (SETITEM)")),
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.charge_all(&items)?;
                    let Some(Value::Dict(d)) = self.stack.last_mut() else {
                        return Err(PickleError::Malformed("malformed pickle (SETITEMS)"));
                    };
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        d.push((k, v));
                    }
                }
                b'a' => {
                    let v = self.pop()?;
                    self.charge_all([&v])?;
                    match self.stack.last_mut() {
                        Some(Value::List(l)) => l.push(v),
                        _ => return Err(PickleError::Malformed("malformed pickle (APPEND)")),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.charge_all(&items)?;
                    match self.stack.last_mut() {
                        Some(Value::List(l)) => l.extend(items),
                        _ => return Err(PickleError::Malformed("malformed pickle (APPENDS)")),
                    }
                }
                b'.' => return self.pop(),
                other => {
                    return Err(PickleError::Opcode {
                        op: other,
                        at: self.pos - 1,
                    })
                }
            }
        }
    }

    fn persistent(pid: Value) -> Result<Value, PickleError> {
        let Value::Tuple(t) = pid else {
            return Err(PickleError::Malformed("unexpected persistent id"));
        };
        match t.as_slice() {
            [Value::Str(kind), Value::Global(g), Value::Str(key), _, _] if kind == "storage" => {
                let dt = storage_dtype(g).ok_or_else(|| PickleError::StorageType(g.clone()))?;
                Ok(Value::Storage(key.clone(), dt))
            }
            _ => Err(PickleError::Malformed(
                "unexpected persistent id (not a torch storage)",
            )),
        }
    }

    fn reduce(f: Value, args: Value) -> Result<Value, PickleError> {
        let Value::Global(g) = f else {
            return Err(PickleError::Malformed(
                "malformed pickle (REDUCE of a non-global)",
            ));
        };
        let Value::Tuple(a) = args else {
            return Err(PickleError::Malformed(
                "malformed pickle (REDUCE arguments)",
            ));
        };
        let ints = |v: &Value| -> Result<Vec<usize>, PickleError> {
            match v {
                Value::Tuple(x) | Value::List(x) => x
                    .iter()
                    .map(|i| match i {
                        Value::Int(n) if *n >= 0 => Ok(*n as usize),
                        _ => Err(PickleError::Malformed("bad tensor size")),
                    })
                    .collect(),
                _ => Err(PickleError::Malformed("bad tensor size")),
            }
        };
        match g.as_str() {
            "collections.OrderedDict" => Ok(Value::Dict(Vec::new())),
            "torch._utils._rebuild_parameter" => a
                .into_iter()
                .next()
                .ok_or(PickleError::Malformed("malformed parameter")),
            "torch._utils._rebuild_tensor_v2" => {
                let (
                    Some(Value::Storage(key, dt)),
                    Some(Value::Int(off)),
                    Some(size),
                    Some(stride),
                ) = (a.first(), a.get(1), a.get(2), a.get(3))
                else {
                    return Err(PickleError::Malformed("malformed tensor in pickle"));
                };
                let offset =
                    usize::try_from(*off).map_err(|_| PickleError::NegativeOffset(*off))?;
                Ok(Value::Tensor(TensorRef {
                    storage: key.clone(),
                    dtype: *dt,
                    offset,
                    shape: ints(size)?,
                    stride: ints(stride)?,
                }))
            }
            other => Err(PickleError::CannotCall(other.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_memo_copies_and_deep_nesting_are_refused_quickly() {
        // ] q0, then 40 × (h0 h0 TUPLE2 q0): each round doubles the value (2^40 in Python's
        // shared form, a memory bomb when copied).
        let mut p = vec![0x80, 2, b']', b'q', 0];
        for _ in 0..40 {
            p.extend([b'h', 0, b'h', 0, 0x86, b'q', 0]);
        }
        p.push(b'.');
        let t = std::time::Instant::now();
        let e = Unpickler::new(&p).run().unwrap_err().to_string();
        assert!(e.contains("more than") && e.contains("values"), "{e}");
        assert!(t.elapsed().as_secs() < 5);
        // ) then 1,000,000 × TUPLE1: nesting a million deep (a stack overflow when dropped).
        let mut p = vec![0x80, 2, b')'];
        p.extend(std::iter::repeat_n(0x85, 1_000_000));
        p.push(b'.');
        let e = Unpickler::new(&p).run().unwrap_err();
        assert!(matches!(e, PickleError::TooDeep), "{e}");
        // A tensor at a negative storage offset is refused, not wrapped around.
        let t = Unpickler::reduce(
            Value::Global("torch._utils._rebuild_tensor_v2".into()),
            Value::Tuple(vec![
                Value::Storage("0".into(), (ElementType::F32, 4)),
                Value::Int(-1),
                Value::Tuple(vec![Value::Int(2)]),
                Value::Tuple(vec![Value::Int(1)]),
            ]),
        );
        assert!(matches!(t, Err(PickleError::NegativeOffset(-1))));
        // A small legitimate structure still reads.
        let ok = [
            0x80, 2, b'}', b'q', 0, b'X', 1, 0, 0, 0, b'k', b'K', 7, b's', b'.',
        ];
        assert!(matches!(Unpickler::new(&ok).run().unwrap(), Value::Dict(d) if d.len() == 1));
    }
}

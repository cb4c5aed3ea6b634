//! `Weight`: a frozen `[rows, cols]` matrix kept in its stored format; rows are widened to f32
//! on demand, per tile, by the matrix products.

use qlora_quant::{dequantize_ggml, GgmlType};
use std::sync::Arc;

/// How a weight's bytes encode its elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// f32/f16/bf16 or a GGUF block format; blocks never cross rows.
    Ggml(GgmlType),
}

impl WeightFormat {
    pub fn name(&self) -> &'static str {
        match self {
            WeightFormat::Ggml(t) => t.name(),
        }
    }
}

/// Bytes owned by someone else (a memory map, a buffer).
pub type SharedBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

#[derive(Clone)]
pub struct Weight {
    pub format: WeightFormat,
    pub rows: usize,
    pub cols: usize,
    bytes: SharedBytes,
    row_bytes: usize,
}

impl std::fmt::Debug for Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Weight({} [{}, {}])",
            self.format.name(),
            self.rows,
            self.cols
        )
    }
}

impl Weight {
    /// Wraps stored bytes. Returns a description of the problem when the byte count or the
    /// row length does not fit the format (the caller adds the file and tensor name).
    pub fn new(
        format: WeightFormat,
        rows: usize,
        cols: usize,
        bytes: SharedBytes,
    ) -> Result<Self, String> {
        let WeightFormat::Ggml(t) = format;
        let (bs, bb) = t.block();
        if !cols.is_multiple_of(bs) {
            return Err(format!(
                "row length {cols} is not a multiple of the {} block size {bs}",
                t.name()
            ));
        }
        let row_bytes = cols / bs * bb;
        let have = (*bytes).as_ref().len();
        if have != rows * row_bytes {
            return Err(format!(
                "{have} bytes of {} data for shape [{rows}, {cols}], expected {}",
                t.name(),
                rows * row_bytes
            ));
        }
        Ok(Weight {
            format,
            rows,
            cols,
            bytes,
            row_bytes,
        })
    }

    /// An f32 weight from values (tests, converted tensors).
    pub fn from_f32(rows: usize, cols: usize, values: &[f32]) -> Self {
        debug_assert_eq!(values.len(), rows * cols);
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Weight {
            format: WeightFormat::Ggml(GgmlType::F32),
            rows,
            cols,
            bytes: Arc::new(bytes),
            row_bytes: cols * 4,
        }
    }

    pub fn bytes(&self) -> &[u8] {
        (*self.bytes).as_ref()
    }

    /// Bytes read per full pass over the matrix (what a decode step streams).
    pub fn stored_bytes(&self) -> usize {
        self.rows * self.row_bytes
    }

    /// Widens rows `r0 .. r0 + out.len() / cols` into `out` (row-major f32).
    pub fn dequantize_rows(&self, r0: usize, out: &mut [f32]) {
        let n = out.len() / self.cols;
        debug_assert!(r0 + n <= self.rows);
        let src = &self.bytes()[r0 * self.row_bytes..(r0 + n) * self.row_bytes];
        match self.format {
            WeightFormat::Ggml(t) => dequantize_ggml(t, src, out),
        }
    }

    /// The whole matrix as f32 (tests, export).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.dequantize_rows(0, &mut out);
        out
    }
}

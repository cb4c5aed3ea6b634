//! `Weight`: a frozen `[rows, cols]` matrix kept in its stored format; rows are widened to f32
//! on demand, per tile, by the matrix products.

use qlora_quant::bnb::{dequantize_4bit, dequantize_int8_row};
use qlora_quant::{dequantize_ggml, GgmlType, Quant4};
use std::sync::Arc;

/// How a weight's bytes encode its elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// f32/f16/bf16 or a GGUF block format; blocks never cross rows.
    Ggml(GgmlType),
    /// bitsandbytes 4-bit: packed codes of the row-major flattened matrix, two per byte (high
    /// nibble first), one absmax per block of the flat index (blocks may cross rows).
    Bnb4(Quant4),
    /// LLM.int8: int8 rows with one f32 scale (SCB) per row.
    Int8,
}

impl WeightFormat {
    pub fn name(&self) -> &'static str {
        match self {
            WeightFormat::Ggml(t) => t.name(),
            WeightFormat::Bnb4(q) => q.name(),
            WeightFormat::Int8 => "int8",
        }
    }
}

/// The side data of the bitsandbytes formats.
#[derive(Debug)]
pub struct Scales {
    /// Bnb4: the code book (the stored `quant_map`); unused for Int8.
    pub code: [f32; 16],
    /// Bnb4: elements per absmax; Int8: `cols`.
    pub blocksize: usize,
    /// Bnb4: f32 absmax per block (double quantization already undone); Int8: SCB per row.
    pub values: Vec<f32>,
}

/// Bytes owned by someone else (a memory map, a buffer).
pub type SharedBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

#[derive(Clone)]
pub struct Weight {
    pub format: WeightFormat,
    pub rows: usize,
    pub cols: usize,
    bytes: SharedBytes,
    /// Bytes per row for the formats whose rows are byte-aligned (0 for Bnb4).
    row_bytes: usize,
    scales: Option<Arc<Scales>>,
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
        let WeightFormat::Ggml(t) = format else {
            return Err(format!(
                "{} weights are built with their own constructor",
                format.name()
            ));
        };
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
            scales: None,
        })
    }

    /// A bitsandbytes 4-bit weight: `packed` holds `ceil(rows·cols / 2)` bytes, `absmax` one
    /// value per `blocksize` elements of the flattened matrix.
    pub fn bnb4(
        quant: Quant4,
        code: [f32; 16],
        blocksize: usize,
        rows: usize,
        cols: usize,
        packed: SharedBytes,
        absmax: Vec<f32>,
    ) -> Result<Self, String> {
        let n = rows * cols;
        let have = (*packed).as_ref().len();
        if have != n.div_ceil(2) {
            return Err(format!(
                "{have} bytes of packed 4-bit codes for shape [{rows}, {cols}], expected {}",
                n.div_ceil(2)
            ));
        }
        if absmax.len() != n.div_ceil(blocksize) {
            return Err(format!(
                "absmax has {} values, expected {} (one per {blocksize} elements of [{rows}, {cols}])",
                absmax.len(),
                n.div_ceil(blocksize)
            ));
        }
        Ok(Weight {
            format: WeightFormat::Bnb4(quant),
            rows,
            cols,
            bytes: packed,
            row_bytes: 0,
            scales: Some(Arc::new(Scales {
                code,
                blocksize,
                values: absmax,
            })),
        })
    }

    /// An LLM.int8 weight: `[rows, cols]` int8 and one scale per row.
    pub fn int8(rows: usize, cols: usize, cb: SharedBytes, scb: Vec<f32>) -> Result<Self, String> {
        let have = (*cb).as_ref().len();
        if have != rows * cols {
            return Err(format!("{have} int8 values for shape [{rows}, {cols}]"));
        }
        if scb.len() != rows {
            return Err(format!(
                "SCB has {} values, expected one per row ({rows})",
                scb.len()
            ));
        }
        Ok(Weight {
            format: WeightFormat::Int8,
            rows,
            cols,
            bytes: cb,
            row_bytes: cols,
            scales: Some(Arc::new(Scales {
                code: [0.0; 16],
                blocksize: cols,
                values: scb,
            })),
        })
    }

    /// The bitsandbytes side data (absmax or SCB), if this is such a weight.
    pub fn scales(&self) -> Option<&Scales> {
        self.scales.as_deref()
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
            scales: None,
        }
    }

    pub fn bytes(&self) -> &[u8] {
        (*self.bytes).as_ref()
    }

    /// Whether both are views of the same stored bytes (a cloned model's base).
    pub fn shares_bytes(&self, other: &Weight) -> bool {
        std::ptr::addr_eq(Arc::as_ptr(&self.bytes), Arc::as_ptr(&other.bytes))
    }

    /// Bytes read per full pass over the matrix (what a decode step streams).
    pub fn stored_bytes(&self) -> usize {
        self.bytes().len() + self.scales.as_ref().map_or(0, |s| s.values.len() * 4)
    }

    /// Bytes of one row, for the formats whose rows are byte-aligned (not Bnb4).
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    /// Widens rows `r0 .. r0 + out.len() / cols` into `out` (row-major f32).
    pub fn dequantize_rows(&self, r0: usize, out: &mut [f32]) {
        let n = out.len() / self.cols;
        debug_assert!(r0 + n <= self.rows);
        match self.format {
            WeightFormat::Ggml(t) => {
                let src = &self.bytes()[r0 * self.row_bytes..(r0 + n) * self.row_bytes];
                dequantize_ggml(t, src, out)
            }
            WeightFormat::Bnb4(_) => {
                let s = self.scales.as_ref().expect("bnb4 weight has scales");
                dequantize_4bit(
                    self.bytes(),
                    &s.values,
                    &s.code,
                    s.blocksize,
                    r0 * self.cols,
                    out,
                )
            }
            WeightFormat::Int8 => {
                let s = self.scales.as_ref().expect("int8 weight has scales");
                for (i, o) in out.chunks_mut(self.cols).enumerate() {
                    let r = r0 + i;
                    let row = &self.bytes()[r * self.cols..(r + 1) * self.cols];
                    dequantize_int8_row(row, s.values[r], o);
                }
            }
        }
    }

    /// The whole matrix as f32 (tests, export).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.dequantize_rows(0, &mut out);
        out
    }
}

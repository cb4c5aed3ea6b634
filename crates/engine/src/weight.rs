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
    /// GPTQ/AWQ: `[rows, cols]` integer codes of `bits` bits (4: two a byte, element `2k` in
    /// the high nibble, as `Bnb4`, so its decode kernel serves both; 8: one a byte), with a scale and a zero point per (row, group) and the
    /// group of each column (`Groups`).
    Grouped { bits: u8 },
}

impl WeightFormat {
    pub fn name(&self) -> &'static str {
        match self {
            WeightFormat::Ggml(t) => t.name(),
            WeightFormat::Bnb4(q) => q.name(),
            WeightFormat::Int8 => "int8",
            WeightFormat::Grouped { bits: 4 } => "int4 (grouped)",
            WeightFormat::Grouped { .. } => "int8 (grouped)",
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

/// The side data of a grouped-integer (GPTQ/AWQ) weight: `w[r, c] = scales[r, g] · (q[r, c] −
/// zeros[r, g])` with `g = g_idx[c]`, computed in f32 (exact: a 16-bit scale times a small integer).
#[derive(Debug)]
pub struct Groups {
    /// The group of each column, `< groups`.
    pub g_idx: Vec<u32>,
    pub groups: usize,
    /// `[rows, groups]`.
    pub scales: Vec<f32>,
    /// `[rows, groups]`, integers.
    pub zeros: Vec<f32>,
    /// `Some(size)` when stored column `c` is in group `c / size`.
    pub contiguous: Option<usize>,
    /// Act-order checkpoints: the columns are stored sorted by group, stored column `c` being
    /// input column `perm[c]` (`g_idx` and the codes are in stored order), so that decode
    /// runs over contiguous groups of a permuted input. `None`: stored order is input order.
    pub perm: Option<Vec<u32>>,
}

impl Groups {
    /// `g_idx` one group per column, `scales` and `zeros` `[rows, groups]`.
    pub fn new(g_idx: Vec<u32>, groups: usize, scales: Vec<f32>, zeros: Vec<f32>) -> Groups {
        // The first group's length; contiguous if every column is in group c / size.
        let size = g_idx.iter().take_while(|&&g| g == 0).count().max(1);
        let contiguous = (g_idx.len().div_ceil(size) == groups
            && g_idx
                .iter()
                .enumerate()
                .all(|(c, &g)| g as usize == c / size))
        .then_some(size);
        Groups {
            g_idx,
            groups,
            scales,
            zeros,
            contiguous,
            perm: None,
        }
    }
}

/// An act-order weight with its columns sorted by group (stably), when that makes every
/// group contiguous; else as it was (decode then widens rows through `g_idx`).
fn sort_by_group(
    bits: u8,
    rows: usize,
    cols: usize,
    codes: SharedBytes,
    g: Groups,
) -> (SharedBytes, Groups) {
    let mut perm: Vec<u32> = (0..cols as u32).collect();
    perm.sort_by_key(|&c| g.g_idx[c as usize]);
    let sorted: Vec<u32> = perm.iter().map(|&c| g.g_idx[c as usize]).collect();
    let probe = Groups::new(sorted, g.groups, Vec::new(), Vec::new());
    if probe.contiguous.is_none() {
        return (codes, g);
    }
    let src = (*codes).as_ref();
    let code = |e: usize| -> u8 {
        if bits == 8 {
            src[e]
        } else {
            (src[e / 2] >> (4 * (1 - e % 2))) & 0xF
        }
    };
    let mut out = vec![0u8; src.len()];
    for r in 0..rows {
        for (c, &from) in perm.iter().enumerate() {
            let (e, v) = (r * cols + c, code(r * cols + from as usize));
            if bits == 8 {
                out[e] = v;
            } else {
                out[e / 2] |= v << (4 * (1 - e % 2));
            }
        }
    }
    let g = Groups {
        g_idx: probe.g_idx,
        contiguous: probe.contiguous,
        perm: Some(perm),
        ..g
    };
    (Arc::new(out), g)
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
    groups: Option<Arc<Groups>>,
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

/// Why stored data does not make a weight of the shape and format asked for (the caller adds
/// the file and tensor name).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LayoutError {
    #[error("{format} weights are built with their own constructor")]
    OwnConstructor { format: &'static str },
    #[error("row length {cols} is not a multiple of the {ty} block size {block}")]
    RowLength {
        cols: usize,
        ty: &'static str,
        block: usize,
    },
    #[error("{have} bytes of {what} for shape [{rows}, {cols}], expected {want}")]
    Bytes {
        what: String,
        have: usize,
        want: usize,
        rows: usize,
        cols: usize,
    },
    #[error("{have} int8 values for shape [{rows}, {cols}]")]
    Int8Values {
        have: usize,
        rows: usize,
        cols: usize,
    },
    #[error("absmax has {have} values, expected {want} (one per {blocksize} elements of [{rows}, {cols}])")]
    Absmax {
        have: usize,
        want: usize,
        blocksize: usize,
        rows: usize,
        cols: usize,
    },
    #[error("SCB has {have} values, expected one per row ({rows})")]
    Scb { have: usize, rows: usize },
    #[error("{bits}-bit grouped weights are not supported")]
    Bits { bits: u8 },
    #[error("the group index must give each of the {cols} columns a group below {groups}")]
    GroupIndex { cols: usize, groups: usize },
    #[error("{scales} scales and {zeros} zeros for {rows} rows of {groups} groups")]
    GroupScales {
        scales: usize,
        zeros: usize,
        rows: usize,
        groups: usize,
    },
}

impl Weight {
    /// Wraps stored bytes; an error when the byte count or the row length does not fit the
    /// format.
    pub fn new(
        format: WeightFormat,
        rows: usize,
        cols: usize,
        bytes: SharedBytes,
    ) -> Result<Self, LayoutError> {
        let WeightFormat::Ggml(t) = format else {
            return Err(LayoutError::OwnConstructor {
                format: format.name(),
            });
        };
        let (bs, bb) = t.block();
        if !cols.is_multiple_of(bs) {
            return Err(LayoutError::RowLength {
                cols,
                ty: t.name(),
                block: bs,
            });
        }
        let row_bytes = cols / bs * bb;
        let have = (*bytes).as_ref().len();
        if have != rows * row_bytes {
            return Err(LayoutError::Bytes {
                what: format!("{} data", t.name()),
                have,
                want: rows * row_bytes,
                rows,
                cols,
            });
        }
        Ok(Weight {
            format,
            rows,
            cols,
            bytes,
            row_bytes,
            scales: None,
            groups: None,
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
    ) -> Result<Self, LayoutError> {
        let n = rows * cols;
        let have = (*packed).as_ref().len();
        if have != n.div_ceil(2) {
            return Err(LayoutError::Bytes {
                what: "packed 4-bit codes".into(),
                have,
                want: n.div_ceil(2),
                rows,
                cols,
            });
        }
        if absmax.len() != n.div_ceil(blocksize) {
            return Err(LayoutError::Absmax {
                have: absmax.len(),
                want: n.div_ceil(blocksize),
                blocksize,
                rows,
                cols,
            });
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
            groups: None,
        })
    }

    /// An LLM.int8 weight: `[rows, cols]` int8 and one scale per row.
    pub fn int8(
        rows: usize,
        cols: usize,
        cb: SharedBytes,
        scb: Vec<f32>,
    ) -> Result<Self, LayoutError> {
        let have = (*cb).as_ref().len();
        if have != rows * cols {
            return Err(LayoutError::Int8Values { have, rows, cols });
        }
        if scb.len() != rows {
            return Err(LayoutError::Scb {
                have: scb.len(),
                rows,
            });
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
            groups: None,
        })
    }

    /// A grouped-integer (GPTQ/AWQ) weight: `codes` as `WeightFormat::Grouped` describes.
    pub fn grouped(
        bits: u8,
        rows: usize,
        cols: usize,
        codes: SharedBytes,
        g: Groups,
    ) -> Result<Self, LayoutError> {
        let groups = g.groups;
        let want = match bits {
            4 => (rows * cols).div_ceil(2),
            8 => rows * cols,
            bits => return Err(LayoutError::Bits { bits }),
        };
        let have = (*codes).as_ref().len();
        if have != want {
            return Err(LayoutError::Bytes {
                what: format!("{bits}-bit codes"),
                have,
                want,
                rows,
                cols,
            });
        }
        if g.g_idx.len() != cols || g.g_idx.iter().any(|&i| i as usize >= groups) {
            return Err(LayoutError::GroupIndex { cols, groups });
        }
        if g.scales.len() != rows * groups || g.zeros.len() != rows * groups {
            return Err(LayoutError::GroupScales {
                scales: g.scales.len(),
                zeros: g.zeros.len(),
                rows,
                groups,
            });
        }
        let (codes, g) = match g.contiguous {
            Some(_) => (codes, g),
            None => sort_by_group(bits, rows, cols, codes, g),
        };
        Ok(Weight {
            format: WeightFormat::Grouped { bits },
            rows,
            cols,
            bytes: codes,
            row_bytes: if bits == 8 { cols } else { 0 },
            scales: None,
            groups: Some(Arc::new(g)),
        })
    }

    /// The GPTQ/AWQ side data, if this is such a weight (`Groups::perm`: codes in stored
    /// order).
    pub fn groups(&self) -> Option<&Groups> {
        self.groups.as_deref()
    }

    /// The bitsandbytes side data (absmax or SCB), if this is such a weight.
    pub fn scales(&self) -> Option<&Scales> {
        self.scales.as_deref()
    }

    /// An f32 weight from values (tests, converted tensors).
    pub fn from_f32(rows: usize, cols: usize, values: &[f32]) -> Self {
        debug_assert_eq!(values.len(), rows * cols);
        let bytes: Vec<u8> = bytemuck::cast_slice(values).to_vec();
        Weight {
            format: WeightFormat::Ggml(GgmlType::F32),
            rows,
            cols,
            bytes: Arc::new(bytes),
            row_bytes: cols * 4,
            scales: None,
            groups: None,
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
        self.bytes().len()
            + self.scales.as_ref().map_or(0, |s| s.values.len() * 4)
            + self
                .groups
                .as_ref()
                .map_or(0, |g| (g.scales.len() + g.zeros.len() + g.g_idx.len()) * 4)
    }

    /// Bytes of one row, for the formats whose rows are byte-aligned (not Bnb4 or 4-bit
    /// grouped).
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
            WeightFormat::Grouped { bits } => {
                let g = self.groups.as_ref().expect("grouped weight has groups");
                let codes = self.bytes();
                let mut tmp = Vec::new();
                for (k, o) in out.chunks_mut(self.cols).enumerate() {
                    let r = r0 + k;
                    let (s, z) = (
                        &g.scales[r * g.groups..(r + 1) * g.groups],
                        &g.zeros[r * g.groups..(r + 1) * g.groups],
                    );
                    let base = r * self.cols;
                    let code = |e: usize| -> f32 {
                        if bits == 8 {
                            codes[e] as f32
                        } else {
                            ((codes[e / 2] >> (4 * (1 - e % 2))) & 0xF) as f32
                        }
                    };
                    match g.contiguous {
                        // Contiguous groups in stored order: one scale and zero a run, no
                        // gathers (the prefill and training products widen this way); act-order
                        // rows then go back to input order through the permutation.
                        Some(size)
                            if bits == 4 && size.is_multiple_of(2) && base.is_multiple_of(2) =>
                        {
                            let row = &codes[base / 2..(base + self.cols).div_ceil(2)];
                            let dst: &mut [f32] = match &g.perm {
                                None => o,
                                Some(_) => {
                                    tmp.resize(self.cols, 0.0);
                                    &mut tmp[..]
                                }
                            };
                            for (gi, (og, bg)) in
                                dst.chunks_mut(size).zip(row.chunks(size / 2)).enumerate()
                            {
                                let (sc, zc) = (s[gi], z[gi]);
                                for (pair, &b) in og.chunks_mut(2).zip(bg) {
                                    pair[0] = sc * ((b >> 4) as f32 - zc);
                                    if let Some(v) = pair.get_mut(1) {
                                        *v = sc * ((b & 0xF) as f32 - zc);
                                    }
                                }
                            }
                            if let Some(p) = &g.perm {
                                for (&v, &c) in tmp.iter().zip(p) {
                                    o[c as usize] = v;
                                }
                            }
                        }
                        _ => {
                            for (c, &gi) in g.g_idx.iter().enumerate() {
                                let gi = gi as usize;
                                let dst = g.perm.as_ref().map_or(c, |p| p[c] as usize);
                                o[dst] = s[gi] * (code(base + c) - z[gi]);
                            }
                        }
                    }
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

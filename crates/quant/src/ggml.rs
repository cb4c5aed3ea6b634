//! GGUF/ggml block formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (32-element blocks) and the k-quants
//! Q4_K, Q5_K, Q6_K (256-element super-blocks). Layouts and formulas follow ggml's
//! `ggml-quants.c` `dequantize_row_*` functions. Blocks never cross a row.

use half::{bf16, f16};

/// ggml tensor types qlora reads (the numbers are ggml's type ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl GgmlType {
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            30 => Self::BF16,
            _ => return None,
        })
    }

    pub fn id(&self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q4K => 12,
            Self::Q5K => 13,
            Self::Q6K => 14,
            Self::BF16 => 30,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q8_0 => "Q8_0",
            Self::Q4K => "Q4_K",
            Self::Q5K => "Q5_K",
            Self::Q6K => "Q6_K",
        }
    }

    /// (elements per block, bytes per block).
    pub fn block(&self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q8_0 => (32, 34),
            Self::Q4K => (256, 144),
            Self::Q5K => (256, 176),
            Self::Q6K => (256, 210),
        }
    }
}

#[inline(always)]
fn h(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Dequantizes whole blocks: `bytes.len()` must be a multiple of the block bytes and
/// `out.len()` the matching element count (callers validate at the file boundary).
pub fn dequantize_ggml(t: GgmlType, bytes: &[u8], out: &mut [f32]) {
    let (bs, bb) = t.block();
    debug_assert_eq!(bytes.len() / bb * bs, out.len());
    match t {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        _ => {
            for (y, b) in out.chunks_exact_mut(bs).zip(bytes.chunks_exact(bb)) {
                dequantize_block(t, b, y);
            }
        }
    }
}

fn dequantize_block(t: GgmlType, b: &[u8], y: &mut [f32]) {
    match t {
        GgmlType::Q4_0 => {
            let d = h(b, 0);
            let qs = &b[2..18];
            for j in 0..16 {
                y[j] = ((qs[j] & 0xF) as i32 - 8) as f32 * d;
                y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
            }
        }
        GgmlType::Q4_1 => {
            let (d, m) = (h(b, 0), h(b, 2));
            let qs = &b[4..20];
            for j in 0..16 {
                y[j] = (qs[j] & 0xF) as f32 * d + m;
                y[j + 16] = (qs[j] >> 4) as f32 * d + m;
            }
        }
        GgmlType::Q5_0 => {
            let d = h(b, 0);
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            let qs = &b[6..22];
            for j in 0..16 {
                let xh0 = (((qh >> j) << 4) & 0x10) as u8;
                let xh1 = ((qh >> (j + 12)) & 0x10) as u8;
                y[j] = (((qs[j] & 0xF) | xh0) as i32 - 16) as f32 * d;
                y[j + 16] = (((qs[j] >> 4) | xh1) as i32 - 16) as f32 * d;
            }
        }
        GgmlType::Q5_1 => {
            let (d, m) = (h(b, 0), h(b, 2));
            let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            let qs = &b[8..24];
            for j in 0..16 {
                let xh0 = (((qh >> j) << 4) & 0x10) as u8;
                let xh1 = ((qh >> (j + 12)) & 0x10) as u8;
                y[j] = ((qs[j] & 0xF) | xh0) as f32 * d + m;
                y[j + 16] = ((qs[j] >> 4) | xh1) as f32 * d + m;
            }
        }
        GgmlType::Q8_0 => {
            let d = h(b, 0);
            for j in 0..32 {
                y[j] = b[2 + j] as i8 as f32 * d;
            }
        }
        GgmlType::Q4K => {
            let (d, dmin) = (h(b, 0), h(b, 2));
            let scales = &b[4..16];
            let qs = &b[16..144];
            for (k, chunk) in y.chunks_exact_mut(64).enumerate() {
                let (sc1, m1) = scale_min_k4(2 * k, scales);
                let (sc2, m2) = scale_min_k4(2 * k + 1, scales);
                let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
                let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
                let q = &qs[32 * k..32 * k + 32];
                for l in 0..32 {
                    chunk[l] = d1 * (q[l] & 0xF) as f32 - m1;
                    chunk[32 + l] = d2 * (q[l] >> 4) as f32 - m2;
                }
            }
        }
        GgmlType::Q5K => {
            let (d, dmin) = (h(b, 0), h(b, 2));
            let scales = &b[4..16];
            let qh = &b[16..48];
            let qs = &b[48..176];
            for (k, chunk) in y.chunks_exact_mut(64).enumerate() {
                let (sc1, m1) = scale_min_k4(2 * k, scales);
                let (sc2, m2) = scale_min_k4(2 * k + 1, scales);
                let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
                let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
                let (u1, u2) = (1u8 << (2 * k), 2u8 << (2 * k));
                let ql = &qs[32 * k..32 * k + 32];
                for l in 0..32 {
                    let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                    let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                    chunk[l] = d1 * ((ql[l] & 0xF) + h1) as f32 - m1;
                    chunk[32 + l] = d2 * ((ql[l] >> 4) + h2) as f32 - m2;
                }
            }
        }
        GgmlType::Q6K => {
            let ql = &b[0..128];
            let qh = &b[128..192];
            let sc = &b[192..208];
            let d = h(b, 208);
            for (n, chunk) in y.chunks_exact_mut(128).enumerate() {
                let ql = &ql[64 * n..];
                let qh = &qh[32 * n..];
                let sc = &sc[8 * n..];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    chunk[l] = d * (sc[is] as i8 as f32) * q1 as f32;
                    chunk[l + 32] = d * (sc[is + 2] as i8 as f32) * q2 as f32;
                    chunk[l + 64] = d * (sc[is + 4] as i8 as f32) * q3 as f32;
                    chunk[l + 96] = d * (sc[is + 6] as i8 as f32) * q4 as f32;
                }
            }
        }
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
            unreachable!("element types are handled by the caller")
        }
    }
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K super-block (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16b(v: f32) -> [u8; 2] {
        f16::from_f32(v).to_le_bytes()
    }

    #[test]
    fn q4_0_block_matches_formula() {
        let mut b = vec![0u8; 18];
        b[0..2].copy_from_slice(&f16b(0.5));
        for j in 0..16 {
            b[2 + j] = (j as u8) | ((15 - j as u8) << 4);
        }
        let mut y = vec![0f32; 32];
        dequantize_ggml(GgmlType::Q4_0, &b, &mut y);
        for j in 0..16 {
            assert_eq!(y[j], (j as f32 - 8.0) * 0.5);
            assert_eq!(y[j + 16], ((15 - j) as f32 - 8.0) * 0.5);
        }
    }

    #[test]
    fn q8_0_and_q4_1_blocks_match_formula() {
        let mut b = vec![0u8; 34];
        b[0..2].copy_from_slice(&f16b(0.25));
        for j in 0..32 {
            b[2 + j] = (j as i8 - 16) as u8;
        }
        let mut y = vec![0f32; 32];
        dequantize_ggml(GgmlType::Q8_0, &b, &mut y);
        assert!(y
            .iter()
            .enumerate()
            .all(|(j, &v)| v == (j as f32 - 16.0) * 0.25));
        let mut b = vec![0u8; 20];
        b[0..2].copy_from_slice(&f16b(2.0));
        b[2..4].copy_from_slice(&f16b(-1.0));
        b[4] = 0x53;
        dequantize_ggml(GgmlType::Q4_1, &b, &mut y);
        assert_eq!(y[0], 3.0 * 2.0 - 1.0);
        assert_eq!(y[16], 5.0 * 2.0 - 1.0);
        assert_eq!(y[1], -1.0);
    }

    #[test]
    fn q6_k_constant_block() {
        // All quants 32 (→ 0 after the offset) except element 0 with 33 and scale 3.
        let mut b = vec![0u8; 210];
        for v in b[0..128].iter_mut() {
            *v = 0x00;
        }
        for v in b[128..192].iter_mut() {
            *v = 0b1010_1010; // high bits 2 for all four lanes → q = 32
        }
        b[0] = 1; // element 0 → 33
        for v in b[192..208].iter_mut() {
            *v = 3;
        }
        b[208..210].copy_from_slice(&f16b(0.5));
        let mut y = vec![0f32; 256];
        dequantize_ggml(GgmlType::Q6K, &b, &mut y);
        assert_eq!(y[0], 1.5);
        assert!(y[1..].iter().all(|&v| v == 0.0));
    }
}

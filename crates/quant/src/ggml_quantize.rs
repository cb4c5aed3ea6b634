//! Encoding f32 rows into the GGUF block formats, as ggml's reference quantizers
//! (`quantize_row_*_ref` in `ggml-quants.c`, what `llama-quantize` runs without an importance
//! matrix) compute them, to the bit: the same max search, the same f32 reciprocal, the same
//! truncating casts and round-half-away-from-zero.

use crate::GgmlType;
use half::{bf16, f16};

/// The types `quantize_ggml` writes.
pub const QUANTIZABLE: [GgmlType; 8] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
];

fn f16_bytes(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_le_bytes()
}

/// (min, max) of a block, as ggml's loop finds them.
fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

/// The value of largest magnitude (the first one, with its sign), as ggml's loop finds it.
fn signed_absmax(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// C's `(int8_t)(v)` for the in-range values these formulas produce (truncation toward 0).
fn trunc_i8(v: f32) -> i32 {
    v as i8 as i32
}

/// Encodes `x` (a whole number of rows; its length a multiple of the block size) as `t`,
/// appending to `out`. Types outside `QUANTIZABLE` are refused.
pub fn quantize_ggml(t: GgmlType, x: &[f32], out: &mut Vec<u8>) -> Result<(), String> {
    let (bs, bb) = t.block();
    if !x.len().is_multiple_of(bs) {
        return Err(format!(
            "{} values cannot be split into {} blocks of {bs}",
            x.len(),
            t.name()
        ));
    }
    out.reserve(x.len() / bs * bb);
    match t {
        GgmlType::F32 => x.iter().for_each(|v| out.extend(v.to_le_bytes())),
        GgmlType::F16 => x.iter().for_each(|v| out.extend(f16_bytes(*v))),
        GgmlType::BF16 => x
            .iter()
            .for_each(|v| out.extend(bf16::from_f32(*v).to_le_bytes())),
        GgmlType::Q8_0 => {
            for b in x.chunks_exact(32) {
                let amax = b.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16_bytes(d));
                out.extend(b.iter().map(|v| (v * id).round() as i8 as u8));
            }
        }
        GgmlType::Q4_0 | GgmlType::Q5_0 => {
            let five = t == GgmlType::Q5_0;
            let (levels, top) = if five { (-16.0, 31) } else { (-8.0, 15) };
            for b in x.chunks_exact(32) {
                let d = signed_absmax(b) / levels;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16_bytes(d));
                let q = |v: f32| trunc_i8(v * id - levels + 0.5).min(top) as u8;
                quants(b, q, five, out);
            }
        }
        GgmlType::Q4_1 | GgmlType::Q5_1 => {
            let five = t == GgmlType::Q5_1;
            for b in x.chunks_exact(32) {
                let (min, max) = min_max(b);
                let d = (max - min) / if five { 31.0 } else { 15.0 };
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16_bytes(d));
                out.extend(f16_bytes(min));
                if five {
                    // ggml's Q5_1 casts straight to uint8_t (no clamp).
                    quants(b, |v| ((v - min) * id + 0.5) as u8, true, out);
                } else {
                    quants(
                        b,
                        |v| trunc_i8((v - min) * id + 0.5).min(15) as u8,
                        false,
                        out,
                    );
                }
            }
        }
        other => {
            return Err(format!(
                "writing {} is not supported; qlora writes {}",
                other.name(),
                QUANTIZABLE.map(|t| t.name()).join(", ")
            ))
        }
    }
    Ok(())
}

/// Packs one 32-element block's codes: byte j holds element j (low nibble) and j + 16 (high);
/// for the 5-bit formats the fifth bits go first, as a little-endian u32 (bit j: element j).
fn quants(b: &[f32], q: impl Fn(f32) -> u8, five: bool, out: &mut Vec<u8>) {
    let codes: Vec<u8> = b.iter().map(|&v| q(v)).collect();
    if five {
        let qh = codes
            .iter()
            .enumerate()
            .fold(0u32, |h, (j, c)| h | (((*c as u32 >> 4) & 1) << j));
        out.extend(qh.to_le_bytes());
    }
    out.extend((0..16).map(|j| (codes[j] & 0x0F) | ((codes[j + 16] & 0x0F) << 4)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dequantize_ggml;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// Round trips stay within half a quantization step of each block (one at Q4_0/Q5_0's clamped
    /// end); zeros stay zero.
    #[test]
    fn round_trips_are_within_half_a_step() {
        let mut x = values(32 * 8, 9);
        x[32..64].iter_mut().for_each(|v| *v = 0.0); // an all-zero block
        x[70] = 3.0; // an outlier
        for t in QUANTIZABLE {
            let mut bytes = Vec::new();
            quantize_ggml(t, &x, &mut bytes).unwrap();
            assert_eq!(bytes.len(), x.len() / t.block().0 * t.block().1, "{t:?}");
            let mut back = vec![0f32; x.len()];
            dequantize_ggml(t, &bytes, &mut back);
            for (b, (xs, ys)) in x.chunks(32).zip(back.chunks(32)).enumerate() {
                let (min, max) = min_max(xs);
                let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
                let step = match t {
                    GgmlType::F32 => 0.0,
                    GgmlType::F16 => amax / 1024.0,
                    GgmlType::BF16 => amax / 128.0,
                    GgmlType::Q8_0 => amax / 127.0,
                    GgmlType::Q4_0 => amax / 8.0,
                    GgmlType::Q5_0 => amax / 16.0,
                    GgmlType::Q4_1 => (max - min) / 15.0,
                    _ => (max - min) / 31.0,
                };
                // Q4_0/Q5_0 put the largest magnitude on code 0; the other end clamps one code
                // short of it (ggml's MIN(15, …)), a whole step there.
                let steps = if matches!(t, GgmlType::Q4_0 | GgmlType::Q5_0) {
                    1.0
                } else {
                    0.5
                };
                for (a, c) in xs.iter().zip(ys) {
                    // That, plus the f16 rounding of the scale (and min).
                    let tol = steps * step * 1.01 + amax * 2e-3;
                    assert!((a - c).abs() <= tol, "{t:?} block {b}: {a} -> {c}");
                }
                if b == 1 {
                    assert!(ys.iter().all(|v| *v == 0.0), "{t:?}: zeros");
                }
            }
        }
    }

    /// Hand-worked blocks: the codes ggml's formulas give.
    #[test]
    fn codes_follow_ggml_formulas() {
        // Q4_0: max by magnitude -2 (negative) → d = 0.25, id = 4; v·id + 8.5 truncated.
        let mut x = vec![0f32; 32];
        x[0] = -2.0;
        x[1] = 1.0; // 4 + 8.5 = 12.5 → 12
        x[16] = 2.0; // 8 + 8.5 = 16.5 → 16 → clamped 15
        x[2] = -0.125; // -0.5 + 8.5 = 8 → 8
        let mut b = Vec::new();
        quantize_ggml(GgmlType::Q4_0, &x, &mut b).unwrap();
        assert_eq!(f16::from_le_bytes([b[0], b[1]]).to_f32(), 0.25);
        assert_eq!(b[2], 15 << 4); // element 0 → 0 (low nibble), element 16 → 15 (high)
        assert_eq!(b[3] & 0xF, 12);
        assert_eq!(b[4] & 0xF, 8);
        // Q8_0: amax 127 → d = 1; 0.5 rounds away from zero.
        let mut x = vec![0f32; 32];
        x[0] = 127.0;
        x[1] = -0.5;
        x[2] = 2.5;
        let mut b = Vec::new();
        quantize_ggml(GgmlType::Q8_0, &x, &mut b).unwrap();
        assert_eq!(&b[2..5], &[127u8, (-1i8) as u8, 3]);
        // Q5_1: min 0, max 31 → d = 1; the fifth bits of 16..31 set bits 16..31 of qh.
        let x: Vec<f32> = (0..32).map(|i| i as f32).collect();
        let mut b = Vec::new();
        quantize_ggml(GgmlType::Q5_1, &x, &mut b).unwrap();
        assert_eq!(u32::from_le_bytes([b[4], b[5], b[6], b[7]]), 0xFFFF_0000);
        assert_eq!(b[8], 0); // element 0 → 0, element 16 → 16 & 0xF = 0
        assert_eq!(b[9], 1 | (1 << 4));
    }

    #[test]
    fn k_quants_and_bad_lengths_are_refused() {
        let mut b = Vec::new();
        let e = quantize_ggml(GgmlType::Q4K, &[0.0; 256], &mut b).unwrap_err();
        assert!(e.contains("Q4_K") && e.contains("Q8_0"), "{e}");
        let e = quantize_ggml(GgmlType::Q4_0, &[0.0; 33], &mut b).unwrap_err();
        assert!(e.contains("33"), "{e}");
    }
}

//! Encoding f32 rows into the GGUF block formats, as ggml's reference quantizers
//! (`quantize_row_*_ref` in `ggml-quants.c`, what `llama-quantize` runs without an importance
//! matrix) compute them, to the bit: the same max search, the same f32 reciprocal, the same
//! truncating casts and round-half-away-from-zero.

use crate::GgmlType;
use half::{bf16, f16};

/// The types `quantize_ggml` writes.
pub const QUANTIZABLE: [GgmlType; 10] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q4K,
    GgmlType::Q6K,
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

/// Why `quantize_ggml` refused its input.
#[derive(Debug, thiserror::Error)]
pub enum GgmlQuantizeError {
    #[error("{values} values cannot be split into {ty} blocks of {block}")]
    Blocks {
        values: usize,
        ty: &'static str,
        block: usize,
    },
    #[error("writing {ty} is not supported; qlora writes {supported}")]
    Unsupported { ty: &'static str, supported: String },
}

/// Encodes `x` (a whole number of rows; its length a multiple of the block size) as `t`,
/// appending to `out`. Types outside `QUANTIZABLE` are refused.
pub fn quantize_ggml(t: GgmlType, x: &[f32], out: &mut Vec<u8>) -> Result<(), GgmlQuantizeError> {
    let (bs, bb) = t.block();
    if !x.len().is_multiple_of(bs) {
        return Err(GgmlQuantizeError::Blocks {
            values: x.len(),
            ty: t.name(),
            block: bs,
        });
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
        GgmlType::Q4K => x.chunks_exact(256).for_each(|b| q4_k_block(b, out)),
        GgmlType::Q6K => x.chunks_exact(256).for_each(|b| q6_k_block(b, out)),
        other => {
            return Err(GgmlQuantizeError::Unsupported {
                ty: other.name(),
                supported: QUANTIZABLE.map(|t| t.name()).join(", "),
            })
        }
    }
    Ok(())
}

/// ggml's `nearest_int`: round to nearest, ties to even, by the 1.5·2²³ trick.
fn nearest_int(f: f32) -> i32 {
    let val = f + 12_582_912.0;
    (val.to_bits() as i32 & 0x007f_ffff) - 0x0040_0000
}

/// ggml's `make_qkx2_quants` (n values, levels 0..=nmax, weighted squared error; `use_mad`
/// false as Q4_K calls it): the codes in `l`, and (scale, −min).
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    x: &[f32],
    weights: &[f32],
    nmax: i32,
    l: &mut [u8],
    laux: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.iter_mut().for_each(|v| *v = 0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * l[i] as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = q as u8;
            let (w, lf) = (weights[i], q as f32);
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// ggml's `make_qx_quants` with `rmse_type` 1 and no importance weights (as Q6_K calls it):
/// codes l + nmax in `out`, and the scale.
fn make_qx_quants(x: &[f32], nmax: i32, out: &mut [i8]) -> f32 {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < 1e-15 {
        out.iter_mut().for_each(|v| *v = 0);
        return 0.0;
    }
    let code = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0f32, 0f32);
        for &v in x {
            let lf = code(iscale, v) as f32;
            let w = v * v;
            sumlx += w * v * lf;
            suml2 += w * lf * lf;
        }
        (sumlx, suml2)
    };
    let mut iscale = -(nmax as f32) / max;
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (code(iscale, v) + nmax) as i8;
    }
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = (code(iscale, v) + nmax) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// One 256-element Q4_K super-block (`quantize_row_q4_K_ref`): eight 32-element sub-blocks,
/// each with a 6-bit scale and min of the super-block's f16 d and dmin.
fn q4_k_block(x: &[f32], out: &mut Vec<u8>) {
    let mut l = [0u8; 256];
    let mut laux = [0u8; 32];
    let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * (j + 1)];
        let mut sum_x2 = 0f32;
        for v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        let mut weights = [0f32; 32];
        for (w, v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (sc, mn) = make_qkx2_quants(
            xs,
            &weights,
            15,
            &mut l[32 * j..32 * (j + 1)],
            &mut laux,
            -1.0,
            0.1,
            20,
        );
        scales[j] = sc;
        mins[j] = mn;
        if sc > max_scale {
            max_scale = sc;
        }
        if mn > max_min {
            max_min = mn;
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut sc12 = [0u8; 12];
    for j in 0..8 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            sc12[j] = ls;
            sc12[j + 4] = lm;
        } else {
            sc12[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            sc12[j - 4] |= (ls >> 4) << 6;
            sc12[j] |= (lm >> 4) << 6;
        }
    }
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    for j in 0..8 {
        let (sc, m) = if j < 4 {
            (sc12[j] & 63, sc12[j + 4] & 63)
        } else {
            (
                (sc12[j + 4] & 0xF) | ((sc12[j - 4] >> 6) << 4),
                (sc12[j + 4] >> 4) | ((sc12[j] >> 6) << 4),
            )
        };
        let dd = d.to_f32() * sc as f32;
        if dd == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * m as f32;
        for ii in 0..32 {
            l[32 * j + ii] = nearest_int((x[32 * j + ii] + dm) / dd).clamp(0, 15) as u8;
        }
    }
    out.extend(d.to_le_bytes());
    out.extend(dmin.to_le_bytes());
    out.extend(sc12);
    for j in (0..256).step_by(64) {
        out.extend((0..32).map(|i| l[j + i] | (l[j + i + 32] << 4)));
    }
}

/// One 256-element Q6_K super-block (`quantize_row_q6_K_ref`): sixteen 16-element sub-blocks
/// with int8 scales of the f16 d; codes split into low nibbles (ql) and high 2 bits (qh).
fn q6_k_block(x: &[f32], out: &mut Vec<u8>) {
    let mut l = [0i8; 256];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for ib in 0..16 {
        let sc = make_qx_quants(
            &x[16 * ib..16 * (ib + 1)],
            32,
            &mut l[16 * ib..16 * (ib + 1)],
        );
        scales[ib] = sc;
        if sc.abs() > max_abs_scale {
            max_abs_scale = sc.abs();
            max_scale = sc;
        }
    }
    if max_abs_scale < 1e-15 {
        out.extend([0u8; 210]);
        return;
    }
    let iscale = -128.0 / max_scale;
    let d = f16::from_f32(1.0 / iscale);
    let mut sc16 = [0i8; 16];
    for (o, s) in sc16.iter_mut().zip(&scales) {
        *o = nearest_int(iscale * s).min(127) as i8;
    }
    for j in 0..16 {
        let dd = d.to_f32() * sc16[j] as f32;
        if dd == 0.0 {
            continue;
        }
        for ii in 0..16 {
            l[16 * j + ii] = (nearest_int(x[16 * j + ii] / dd).clamp(-32, 31) + 32) as i8;
        }
    }
    let l: Vec<u8> = l.iter().map(|v| *v as u8).collect();
    let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
    for (c, j) in (0..256).step_by(128).enumerate() {
        for i in 0..32 {
            let (q1, q2, q3, q4) = (l[j + i], l[j + i + 32], l[j + i + 64], l[j + i + 96]);
            ql[64 * c + i] = (q1 & 0xF) | ((q3 & 0xF) << 4);
            ql[64 * c + i + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4);
            qh[32 * c + i] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
        }
    }
    out.extend(ql);
    out.extend(qh);
    out.extend(sc16.map(|v| v as u8));
    out.extend(d.to_le_bytes());
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
        let mut x = values(256 * 2, 9);
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
                    // Their scales are searched and stored in 6/8 bits of a super-block scale:
                    // bounded by the block's range per level.
                    GgmlType::Q4K => 2.0 * (max - min.min(0.0)) / 15.0,
                    GgmlType::Q6K => 2.0 * amax / 32.0,
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
    fn unwritten_types_and_bad_lengths_are_refused() {
        let mut b = Vec::new();
        let e = quantize_ggml(GgmlType::Q5K, &[0.0; 256], &mut b)
            .unwrap_err()
            .to_string();
        assert!(e.contains("Q5_K") && e.contains("Q8_0"), "{e}");
        let e = quantize_ggml(GgmlType::Q4_0, &[0.0; 33], &mut b).unwrap_err();
        assert!(
            matches!(e, GgmlQuantizeError::Blocks { values: 33, .. }),
            "{e}"
        );
    }
}

//! Fused dequantize-and-dot for the 32-element GGUF blocks (Q4_0, Q4_1, Q8_0): one row of W
//! against one activation vector without widening the row to memory first. This is the decode
//! (GEMV) hot path. The scalar twin is `dequantize_ggml` followed by a plain dot product.

use crate::GgmlType;
use half::f16;

/// Whether `dot_row` has a fused kernel for this type.
pub fn has_fused_dot(t: GgmlType) -> bool {
    matches!(
        t,
        GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q8_0
            | GgmlType::F32
            | GgmlType::F16
            | GgmlType::BF16
    )
}

/// Σ row[j]·x[j] for j ≥ `from` of a dense row, element by element (no allocation).
#[inline]
fn dense_tail(t: GgmlType, row: &[u8], x: &[f32], from: usize) -> f32 {
    (from..x.len())
        .map(|j| {
            let w = match t {
                GgmlType::F32 => {
                    f32::from_le_bytes([row[4 * j], row[4 * j + 1], row[4 * j + 2], row[4 * j + 3]])
                }
                GgmlType::F16 => f16::from_le_bytes([row[2 * j], row[2 * j + 1]]).to_f32(),
                _ => half::bf16::from_le_bytes([row[2 * j], row[2 * j + 1]]).to_f32(),
            };
            w * x[j]
        })
        .sum()
}

fn is_dense(t: GgmlType) -> bool {
    matches!(t, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
}

/// Per-32-element block sums of x, needed by the offset terms of Q4_0/Q4_1.
pub fn block_sums(x: &[f32]) -> Vec<f32> {
    x.chunks(32).map(|c| c.iter().sum()).collect()
}

/// Σ W[row]·x for one row stored as `row` bytes of type `t` (one of `has_fused_dot`).
/// `xsum` = `block_sums(x)`.
pub fn dot_row(t: GgmlType, row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    let mut out = [0f32];
    dot_rows(t, row, x, xsum, &mut out);
    out[0]
}

/// `dot_row` for `out.len()` consecutive rows of `rows` (each of `x.len()` elements), with the
/// kernel chosen once for all of them.
pub fn dot_rows(t: GgmlType, rows: &[u8], x: &[f32], xsum: &[f32], out: &mut [f32]) {
    let (bs, bb) = t.block();
    let rb = x.len() / bs * bb;
    assert!(rows.len() >= out.len() * rb);
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            // SAFETY: the features were detected just above; lengths as asserted.
            unsafe {
                if crate::use_avx512() {
                    avx512::rows(t, rows, rb, x, xsum, out)
                } else {
                    avx2::rows(t, rows, rb, x, xsum, out)
                }
            }
            return;
        }
    }
    for (r, o) in out.iter_mut().enumerate() {
        *o = dot_row_scalar(t, &rows[r * rb..(r + 1) * rb], x, xsum);
    }
}

#[inline(always)]
fn h(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Scalar version with the same algebra as the AVX2 kernel: Σ_blocks d·(q·x) + m·Σx.
pub fn dot_row_scalar(t: GgmlType, row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    if is_dense(t) {
        let mut w = vec![0f32; x.len()];
        crate::dequantize_ggml(t, row, &mut w);
        return w.iter().zip(x).map(|(a, b)| a * b).sum();
    }
    let (_, bb) = t.block();
    let mut acc = 0f32;
    for (i, b) in row.chunks_exact(bb).enumerate() {
        let xb = &x[32 * i..32 * i + 32];
        match t {
            GgmlType::Q8_0 => {
                let d = h(b, 0);
                let s: f32 = (0..32).map(|j| b[2 + j] as i8 as f32 * xb[j]).sum();
                acc += d * s;
            }
            GgmlType::Q4_0 | GgmlType::Q4_1 => {
                let (d, m, qs) = if t == GgmlType::Q4_0 {
                    let d = h(b, 0);
                    (d, -8.0 * d, &b[2..18])
                } else {
                    (h(b, 0), h(b, 2), &b[4..20])
                };
                let s: f32 = (0..16)
                    .map(|j| (qs[j] & 0xF) as f32 * xb[j] + (qs[j] >> 4) as f32 * xb[j + 16])
                    .sum();
                acc += d * s + m * xsum[i];
            }
            _ => unreachable!("dot_row is only called for types with a fused kernel"),
        }
    }
    acc
}

/// `rows` for one instruction set's module: each of `out.len()` rows of `rb` bytes dotted with
/// x by that module's `dot_dense`/`dot_row`, chosen once.
#[cfg(target_arch = "x86_64")]
macro_rules! rows_kernel {
    ($features:literal) => {
        #[target_feature(enable = $features)]
        pub unsafe fn rows(
            t: GgmlType,
            rows: &[u8],
            rb: usize,
            x: &[f32],
            xsum: &[f32],
            out: &mut [f32],
        ) {
            let dense = super::is_dense(t);
            for (r, o) in out.iter_mut().enumerate() {
                let row = rows.get_unchecked(r * rb..(r + 1) * rb);
                *o = if dense {
                    dot_dense(t, row, x)
                } else {
                    dot_row(t, row, x, xsum)
                };
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use crate::GgmlType;
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn load16(t: GgmlType, p: *const u8, i: usize) -> __m512 {
        match t {
            GgmlType::F32 => _mm512_loadu_ps((p as *const f32).add(i)),
            GgmlType::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p.add(2 * i) as *const __m256i)),
            _ => _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.add(2 * i) as *const __m256i)),
                16,
            )),
        }
    }

    rows_kernel!("avx512f,f16c");

    /// f32/f16/bf16 row · x, 32 elements per step.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_dense(t: GgmlType, row: &[u8], x: &[f32]) -> f32 {
        let n = x.len();
        let (p, xp) = (row.as_ptr(), x.as_ptr());
        let mut a0 = _mm512_setzero_ps();
        let mut a1 = _mm512_setzero_ps();
        let mut i = 0;
        while i + 32 <= n {
            a0 = _mm512_fmadd_ps(load16(t, p, i), _mm512_loadu_ps(xp.add(i)), a0);
            a1 = _mm512_fmadd_ps(load16(t, p, i + 16), _mm512_loadu_ps(xp.add(i + 16)), a1);
            i += 32;
        }
        if i + 16 <= n {
            a0 = _mm512_fmadd_ps(load16(t, p, i), _mm512_loadu_ps(xp.add(i)), a0);
            i += 16;
        }
        let acc = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
        acc + super::dense_tail(t, row, x, i)
    }

    /// f16 → f32 of the two bytes at `at` (F16C).
    #[inline(always)]
    unsafe fn h(p: *const u8, at: usize) -> f32 {
        let v = u16::from_le_bytes([*p.add(at), *p.add(at + 1)]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(v as i32)))
    }

    /// One block's Σ q·x (before its scale d) and its offset term m·Σx (0 for Q8_0).
    #[inline(always)]
    unsafe fn block<const T: u8>(b: *const u8, xb: *const f32, xsum: f32) -> (__m512, f32) {
        if T == 2 {
            let q0 = _mm512_cvtepi8_epi32(_mm_loadu_si128(b.add(2) as *const __m128i));
            let q1 = _mm512_cvtepi8_epi32(_mm_loadu_si128(b.add(18) as *const __m128i));
            let p = _mm512_mul_ps(_mm512_cvtepi32_ps(q0), _mm512_loadu_ps(xb));
            let p = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q1), _mm512_loadu_ps(xb.add(16)), p);
            return (p, 0.0);
        }
        let (m, qs) = if T == 0 {
            (-8.0 * h(b, 0), b.add(2))
        } else {
            (h(b, 2), b.add(4))
        };
        // Byte j holds element j (low nibble) and j + 16 (high nibble).
        let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(qs as *const __m128i));
        let lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0x0F)));
        let hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
        let p = _mm512_mul_ps(lo, _mm512_loadu_ps(xb));
        (
            _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb.add(16)), p),
            m * xsum,
        )
    }

    /// Q4_0 (T = 0), Q4_1 (1), Q8_0 (2): two blocks per step into two register accumulators.
    #[inline(always)]
    unsafe fn dot_blocks<const T: u8>(row: &[u8], bb: usize, x: &[f32], xsum: &[f32]) -> f32 {
        let nb = row.len() / bb;
        debug_assert!(x.len() >= 32 * nb && (T == 2 || xsum.len() >= nb));
        let (rp, xp) = (row.as_ptr(), x.as_ptr());
        let xs = |i: usize| if T == 2 { 0.0 } else { *xsum.get_unchecked(i) };
        let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let (mut o0, mut o1) = (0f32, 0f32);
        let mut i = 0;
        while i + 2 <= nb {
            let (b0, b1) = (rp.add(i * bb), rp.add((i + 1) * bb));
            let (p0, m0) = block::<T>(b0, xp.add(32 * i), xs(i));
            let (p1, m1) = block::<T>(b1, xp.add(32 * i + 32), xs(i + 1));
            a0 = _mm512_fmadd_ps(_mm512_set1_ps(h(b0, 0)), p0, a0);
            a1 = _mm512_fmadd_ps(_mm512_set1_ps(h(b1, 0)), p1, a1);
            o0 += m0;
            o1 += m1;
            i += 2;
        }
        if i < nb {
            let b0 = rp.add(i * bb);
            let (p0, m0) = block::<T>(b0, xp.add(32 * i), xs(i));
            a0 = _mm512_fmadd_ps(_mm512_set1_ps(h(b0, 0)), p0, a0);
            o0 += m0;
        }
        _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) + (o0 + o1)
    }

    /// Q4_0/Q4_1/Q8_0 row · x: each 32-element block is two 16-lane halves widened from bytes
    /// in one shuffle each (no per-element lookups), dotted in f32 and scaled by the block's d.
    #[inline]
    #[target_feature(enable = "avx512f,f16c")]
    pub unsafe fn dot_row(t: GgmlType, row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
        let (_, bb) = t.block();
        match t {
            GgmlType::Q4_0 => dot_blocks::<0>(row, bb, x, xsum),
            GgmlType::Q4_1 => dot_blocks::<1>(row, bb, x, xsum),
            GgmlType::Q8_0 => dot_blocks::<2>(row, bb, x, xsum),
            _ => unreachable!("dot_row is only called for types with a fused kernel"),
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use crate::GgmlType;
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn fma8(q: __m128i, x: *const f32, acc: __m256) -> __m256 {
        // 8 bytes of q (u8 or i8 already widened by the caller) → 8 f32.
        _mm256_fmadd_ps(
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q)),
            _mm256_loadu_ps(x),
            acc,
        )
    }

    #[inline(always)]
    unsafe fn fma8_i8(q: __m128i, x: *const f32, acc: __m256) -> __m256 {
        _mm256_fmadd_ps(
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)),
            _mm256_loadu_ps(x),
            acc,
        )
    }

    /// f16 → f32 with the F16C instruction (every AVX2 CPU has it).
    #[inline(always)]
    unsafe fn h(b: &[u8], at: usize) -> f32 {
        let v = u16::from_le_bytes([*b.get_unchecked(at), *b.get_unchecked(at + 1)]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(v as i32)))
    }

    /// Eight row elements of a dense type at element `i`, widened to f32.
    #[inline(always)]
    unsafe fn load8(t: GgmlType, p: *const u8, i: usize) -> __m256 {
        match t {
            GgmlType::F32 => _mm256_loadu_ps((p as *const f32).add(i)),
            GgmlType::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p.add(2 * i) as *const __m128i)),
            // bf16 is the high half of an f32.
            _ => _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128(p.add(2 * i) as *const __m128i)),
                16,
            )),
        }
    }

    rows_kernel!("avx2,fma,f16c");

    /// f32/f16/bf16 row · x.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_dense(t: GgmlType, row: &[u8], x: &[f32]) -> f32 {
        let n = x.len();
        let p = row.as_ptr();
        let xp = x.as_ptr();
        let mut a0 = _mm256_setzero_ps();
        let mut a1 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            a0 = _mm256_fmadd_ps(load8(t, p, i), _mm256_loadu_ps(xp.add(i)), a0);
            a1 = _mm256_fmadd_ps(load8(t, p, i + 8), _mm256_loadu_ps(xp.add(i + 8)), a1);
            i += 16;
        }
        if i + 8 <= n {
            a0 = _mm256_fmadd_ps(load8(t, p, i), _mm256_loadu_ps(xp.add(i)), a0);
            i += 8;
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(a0, a1));
        let acc: f32 = lanes.iter().sum();
        acc + super::dense_tail(t, row, x, i)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_row(t: GgmlType, row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
        let (_, bb) = t.block();
        let nb = row.len() / bb;
        // Two accumulators (even/odd blocks) halve the FMA dependency chain.
        // Named, not an array indexed by i & 1: an indexed array lives on the stack, and each
        // block's update then waits on a store-to-load forward.
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut offset = 0f32;
        let mask = _mm_set1_epi8(0x0F);
        for i in 0..nb {
            let b = &row[i * bb..(i + 1) * bb];
            let xp = x.as_ptr().add(32 * i);
            let z = _mm256_setzero_ps();
            match t {
                GgmlType::Q8_0 => {
                    let q0 = _mm_loadu_si128(b.as_ptr().add(2) as *const __m128i);
                    let q1 = _mm_loadu_si128(b.as_ptr().add(18) as *const __m128i);
                    let mut p = fma8_i8(q0, xp, z);
                    p = fma8_i8(_mm_srli_si128(q0, 8), xp.add(8), p);
                    p = fma8_i8(q1, xp.add(16), p);
                    p = fma8_i8(_mm_srli_si128(q1, 8), xp.add(24), p);
                    let d = _mm256_set1_ps(h(b, 0));
                    if i & 1 == 0 {
                        a0 = _mm256_fmadd_ps(d, p, a0);
                    } else {
                        a1 = _mm256_fmadd_ps(d, p, a1);
                    }
                }
                _ => {
                    let (d, m, qs) = if t == GgmlType::Q4_0 {
                        let d = h(b, 0);
                        (d, -8.0 * d, b.as_ptr().add(2))
                    } else {
                        (h(b, 0), h(b, 2), b.as_ptr().add(4))
                    };
                    let q = _mm_loadu_si128(qs as *const __m128i);
                    let lo = _mm_and_si128(q, mask);
                    let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
                    let mut p = fma8(lo, xp, z);
                    p = fma8(_mm_srli_si128(lo, 8), xp.add(8), p);
                    p = fma8(hi, xp.add(16), p);
                    p = fma8(_mm_srli_si128(hi, 8), xp.add(24), p);
                    if i & 1 == 0 {
                        a0 = _mm256_fmadd_ps(_mm256_set1_ps(d), p, a0);
                    } else {
                        a1 = _mm256_fmadd_ps(_mm256_set1_ps(d), p, a1);
                    }
                    offset += m * xsum[i];
                }
            }
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(a0, a1));
        lanes.iter().sum::<f32>() + offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dequantize_ggml;

    fn row(t: GgmlType, blocks: usize, seed: u32) -> Vec<u8> {
        let (_, bb) = t.block();
        let mut s = seed;
        let mut v: Vec<u8> = (0..blocks * bb)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                (s >> 24) as u8
            })
            .collect();
        // Sane f16 scales (random bytes can be inf/NaN).
        for b in v.chunks_exact_mut(bb) {
            let (s5, s7) = (b[5] as f32, b[7] as f32);
            b[0..2].copy_from_slice(&f16::from_f32(0.01 * (s5 + 1.0)).to_le_bytes());
            if t == GgmlType::Q4_1 {
                b[2..4].copy_from_slice(&f16::from_f32(-0.003 * s7).to_le_bytes());
            }
        }
        v
    }

    #[test]
    fn fused_dot_matches_dequantize_then_dot() {
        for t in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q8_0,
            GgmlType::F32,
            GgmlType::F16,
            GgmlType::BF16,
        ] {
            for blocks in [1, 3, 18] {
                let r = if is_dense(t) {
                    // Values in [-1, 1], 32 per "block".
                    let v: Vec<f32> = (0..32 * blocks)
                        .map(|i| ((i * 13 % 29) as f32 - 14.0) / 14.0)
                        .collect();
                    match t {
                        GgmlType::F32 => v.iter().flat_map(|a| a.to_le_bytes()).collect(),
                        GgmlType::F16 => v
                            .iter()
                            .flat_map(|a| f16::from_f32(*a).to_le_bytes())
                            .collect(),
                        _ => v
                            .iter()
                            .flat_map(|a| half::bf16::from_f32(*a).to_le_bytes())
                            .collect::<Vec<u8>>(),
                    }
                } else {
                    row(t, blocks, blocks as u32 * 7 + 1)
                };
                let x: Vec<f32> = (0..32 * blocks)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                    .collect();
                let mut w = vec![0f32; 32 * blocks];
                dequantize_ggml(t, &r, &mut w);
                let want: f64 = w.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
                let xs = block_sums(&x);
                let mut got = vec![dot_row(t, &r, &x, &xs), dot_row_scalar(t, &r, &x, &xs)];
                #[cfg(target_arch = "x86_64")]
                if std::is_x86_feature_detected!("avx2") {
                    // SAFETY: AVX2 detected (F16C/FMA come with it on every x86 CPU qlora runs on).
                    got.push(unsafe {
                        if is_dense(t) {
                            avx2::dot_dense(t, &r, &x)
                        } else {
                            avx2::dot_row(t, &r, &x, &xs)
                        }
                    });
                }
                for got in got {
                    assert!(
                        (got as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "{t:?} {blocks}: {got} vs {want}"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod rows_tests {
    use super::*;

    /// The several-rows entry gives each row's scalar dot product, whatever the format (the rows'
    /// offsets as well as the kernels).
    #[test]
    fn dot_rows_equal_the_scalar_row_by_row() {
        for t in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q8_0,
            GgmlType::F16,
            GgmlType::BF16,
        ] {
            let (cols, n) = (96, 5);
            let (bs, bb) = t.block();
            let rb = cols / bs * bb;
            let mut s = 7u32;
            let mut bytes: Vec<u8> = (0..n * rb)
                .map(|_| {
                    s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                    (s >> 24) as u8
                })
                .collect();
            if !is_dense(t) {
                for b in bytes.chunks_exact_mut(bb) {
                    b[0..2].copy_from_slice(&f16::from_f32(0.02).to_le_bytes());
                    if t == GgmlType::Q4_1 {
                        b[2..4].copy_from_slice(&f16::from_f32(-0.1).to_le_bytes());
                    }
                }
            } else {
                // Finite values: clear each element's top exponent bit.
                for e in bytes.chunks_exact_mut(2) {
                    e[1] &= 0x3F;
                }
            }
            let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
            let xs = block_sums(&x);
            let mut out = vec![0f32; n];
            dot_rows(t, &bytes, &x, &xs, &mut out);
            for (r, got) in out.iter().enumerate() {
                let want = dot_row_scalar(t, &bytes[r * rb..(r + 1) * rb], &x, &xs);
                assert!(
                    (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "{t:?} row {r}: {got} vs {want}"
                );
            }
        }
    }
}

#[cfg(test)]
mod dense_tests {
    use super::*;

    #[test]
    fn dense_rows_of_any_length() {
        for t in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
            for n in [1usize, 7, 8, 15, 16, 17, 31, 33, 48, 50] {
                let v: Vec<f32> = (0..n).map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0).collect();
                let x: Vec<f32> = (0..n).map(|i| ((i * 5 % 11) as f32 - 5.0) / 4.0).collect();
                let row: Vec<u8> = match t {
                    GgmlType::F32 => v.iter().flat_map(|a| a.to_le_bytes()).collect(),
                    GgmlType::F16 => v
                        .iter()
                        .flat_map(|a| f16::from_f32(*a).to_le_bytes())
                        .collect(),
                    _ => v
                        .iter()
                        .flat_map(|a| half::bf16::from_f32(*a).to_le_bytes())
                        .collect(),
                };
                let want: f32 = v.iter().zip(&x).map(|(a, b)| a * b).sum();
                let got = dot_row(t, &row, &x, &[]);
                assert!((got - want).abs() < 1e-4, "{t:?} n={n}: {got} vs {want}");
            }
        }
    }
}

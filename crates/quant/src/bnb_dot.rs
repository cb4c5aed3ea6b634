//! Fused dequantize-and-dot for bitsandbytes 4-bit rows: one row of W (whole blocks, packed
//! high nibble first) against one activation vector, without widening the row to memory. The
//! decode (GEMV) hot path for NF4/FP4 weights. The scalar twin defines the algebra:
//! Σ_blocks absmax_b · Σ_j code[c_j]·x_j.

/// The activation vector in the order the SIMD kernels consume it: each run of 32 elements
/// as its 16 even-index elements then its 16 odd-index ones (the high and low nibbles of 16
/// packed 4-bit bytes; the low and high halves of 16 bf16 pairs). Computed once per token and
/// shared by every row. Requires `x.len()` to be a multiple of 32.
pub struct Bnb4Activation {
    x: Vec<f32>,
    split: Vec<f32>,
    /// Which kernels read `split`: AVX-512 (4-bit and bf16 rows) or AVX2 (4-bit rows).
    simd: Simd,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Simd {
    None,
    Avx2,
    Avx512,
}

impl Bnb4Activation {
    pub fn new(x: &[f32]) -> Self {
        debug_assert!(x.len().is_multiple_of(32));
        let simd = if use_avx512() {
            Simd::Avx512
        } else if has_avx2_fma() {
            Simd::Avx2
        } else {
            Simd::None
        };
        let split = if simd != Simd::None {
            split_order(x)
        } else {
            Vec::new()
        };
        Bnb4Activation {
            x: x.to_vec(),
            split,
            simd,
        }
    }
}

use crate::use_avx512;

/// `x` in `Bnb4Activation`'s split order: each run of 32 as its 16 even-index elements, then
/// its 16 odd-index ones.
fn split_order(x: &[f32]) -> Vec<f32> {
    x.chunks_exact(32)
        .flat_map(|c| {
            (0..16)
                .map(move |j| c[2 * j])
                .chain((0..16).map(move |j| c[2 * j + 1]))
        })
        .collect()
}

fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Σ W[row]·x for a row of `x.len()` elements stored as `packed` (x.len() / 2 bytes) with one
/// absmax per `blocksize` elements. Requires `blocksize` to be a multiple of 32 and to divide
/// `x.len()`.
pub fn bnb4_dot_row(
    packed: &[u8],
    absmax: &[f32],
    code: &[f32; 16],
    blocksize: usize,
    x: &Bnb4Activation,
) -> f32 {
    debug_assert!(blocksize.is_multiple_of(32) && x.x.len().is_multiple_of(blocksize));
    debug_assert_eq!(packed.len() * 2, x.x.len());
    debug_assert_eq!(absmax.len() * blocksize, x.x.len());
    let mut out = [0f32];
    bnb4_dot_rows(packed, absmax, code, blocksize, x, &mut out);
    out[0]
}

/// `bnb4_dot_row` for `out.len()` consecutive rows (row-major `packed`, `absmax`), with the
/// kernel chosen once: at decode a row is only a few blocks, so a call per row costs about as
/// much as the row.
pub fn bnb4_dot_rows(
    packed: &[u8],
    absmax: &[f32],
    code: &[f32; 16],
    blocksize: usize,
    x: &Bnb4Activation,
    out: &mut [f32],
) {
    let cols = x.x.len();
    let (pb, pa) = (cols / 2, cols / blocksize);
    assert!(packed.len() >= out.len() * pb && absmax.len() >= out.len() * pa);
    #[cfg(target_arch = "x86_64")]
    match x.simd {
        // SAFETY: `simd` names the features `Bnb4Activation::new` detected; lengths as asserted.
        Simd::Avx512 => {
            return unsafe { avx512::dot_rows(packed, absmax, code, blocksize, &x.split, out) }
        }
        Simd::Avx2 => {
            return unsafe { avx2::dot_rows(packed, absmax, code, blocksize, &x.split, out) }
        }
        Simd::None => {}
    }
    for (r, o) in out.iter_mut().enumerate() {
        *o = bnb4_dot_row_scalar(
            &packed[r * pb..(r + 1) * pb],
            &absmax[r * pa..(r + 1) * pa],
            code,
            blocksize,
            &x.x,
        );
    }
}

/// `bf16_dot_row` for `out.len()` consecutive rows of `rows`.
pub fn bf16_dot_rows(rows: &[u8], x: &Bnb4Activation, out: &mut [f32]) {
    let rb = 2 * x.x.len();
    assert!(rows.len() >= out.len() * rb);
    #[cfg(target_arch = "x86_64")]
    if x.simd == Simd::Avx512 {
        // SAFETY: AVX-512F was detected (`Bnb4Activation::new`); lengths as asserted.
        return unsafe { avx512::dot_bf16_rows(rows, &x.split, out) };
    }
    crate::dot_rows(crate::GgmlType::BF16, rows, &x.x, &[], out)
}

/// Σ W[row]·x for a bf16 row (`2 · x.len()` bytes): with AVX-512, each 32-bit lane of a load
/// holds an even element (low half) and an odd one (high half), widened by a shift and a mask,
/// with no shuffles; otherwise the plain kernel.
pub fn bf16_dot_row(row: &[u8], x: &Bnb4Activation) -> f32 {
    debug_assert_eq!(row.len(), 2 * x.x.len());
    let mut out = [0f32];
    bf16_dot_rows(row, x, &mut out);
    out[0]
}

pub fn bnb4_dot_row_scalar(
    packed: &[u8],
    absmax: &[f32],
    code: &[f32; 16],
    blocksize: usize,
    x: &[f32],
) -> f32 {
    let mut acc = 0f32;
    for (b, &s) in absmax.iter().enumerate() {
        let bytes = &packed[b * blocksize / 2..(b + 1) * blocksize / 2];
        let xb = &x[b * blocksize..(b + 1) * blocksize];
        let mut sb = 0f32;
        for (j, &byte) in bytes.iter().enumerate() {
            sb += code[(byte >> 4) as usize] * xb[2 * j]
                + code[(byte & 0xF) as usize] * xb[2 * j + 1];
        }
        acc += s * sb;
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// `xs` is the activation in `Bnb4Activation`'s split order: 16 bytes of codes widen to 16
    /// lanes; the high nibbles (shifted down) and the low nibbles (the permute reads only the low
    /// four bits) each index the 16-entry code book in one permute.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_rows(
        packed: &[u8],
        absmax: &[f32],
        code: &[f32; 16],
        blocksize: usize,
        xs: &[f32],
        out: &mut [f32],
    ) {
        let (pb, pa) = (xs.len() / 2, xs.len() / blocksize);
        for (r, o) in out.iter_mut().enumerate() {
            *o = dot(
                packed.get_unchecked(r * pb..(r + 1) * pb),
                absmax.get_unchecked(r * pa..(r + 1) * pa),
                code,
                blocksize,
                xs,
            );
        }
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_bf16_rows(rows: &[u8], xs: &[f32], out: &mut [f32]) {
        let rb = 2 * xs.len();
        for (r, o) in out.iter_mut().enumerate() {
            *o = dot_bf16(rows.get_unchecked(r * rb..(r + 1) * rb), xs);
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot(
        packed: &[u8],
        absmax: &[f32],
        code: &[f32; 16],
        blocksize: usize,
        xs: &[f32],
    ) -> f32 {
        let table = _mm512_loadu_ps(code.as_ptr());
        let mut total = _mm512_setzero_ps();
        let mut p = packed.as_ptr();
        let mut xp = xs.as_ptr();
        for &s in absmax {
            let mut acc0 = _mm512_setzero_ps();
            let mut acc1 = _mm512_setzero_ps();
            for _ in 0..blocksize / 32 {
                let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i));
                let hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
                let lo = _mm512_permutexvar_ps(v, table);
                acc0 = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xp), acc0);
                acc1 = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xp.add(16)), acc1);
                p = p.add(16);
                xp = xp.add(32);
            }
            total = _mm512_fmadd_ps(_mm512_add_ps(acc0, acc1), _mm512_set1_ps(s), total);
        }
        _mm512_reduce_add_ps(total)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_bf16(row: &[u8], xs: &[f32]) -> f32 {
        let hi_mask = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
        let mut a0 = _mm512_setzero_ps();
        let mut a1 = _mm512_setzero_ps();
        let (p, xp) = (row.as_ptr(), xs.as_ptr());
        for c in 0..xs.len() / 32 {
            let v = _mm512_loadu_si512(p.add(64 * c) as *const _);
            let even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
            let odd = _mm512_castsi512_ps(_mm512_and_si512(v, hi_mask));
            a0 = _mm512_fmadd_ps(even, _mm512_loadu_ps(xp.add(32 * c)), a0);
            a1 = _mm512_fmadd_ps(odd, _mm512_loadu_ps(xp.add(32 * c + 16)), a1);
        }
        _mm512_reduce_add_ps(_mm512_add_ps(a0, a1))
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// The code-book values of eight codes, one per 32-bit lane of `idx` (the low three bits
    /// pick within each half of the table, `sel`'s sign bit picks the half).
    #[inline(always)]
    unsafe fn lookup(idx: __m256i, sel: __m256i, lo: __m256, hi: __m256) -> __m256 {
        let a = _mm256_permutevar8x32_ps(lo, idx);
        let b = _mm256_permutevar8x32_ps(hi, idx);
        _mm256_blendv_ps(a, b, _mm256_castsi256_ps(sel))
    }

    /// `xs` in `Bnb4Activation`'s split order (as the AVX-512 kernel's): eight bytes widen to
    /// eight lanes, whose high nibbles (shifted down) and low nibbles (the permute reads the low
    /// three bits in place) index the table with no unpacking; they meet the 8 even and the 8
    /// odd elements of those bytes.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_rows(
        packed: &[u8],
        absmax: &[f32],
        code: &[f32; 16],
        blocksize: usize,
        xs: &[f32],
        out: &mut [f32],
    ) {
        let (pb, pa) = (xs.len() / 2, xs.len() / blocksize);
        for (r, o) in out.iter_mut().enumerate() {
            *o = dot(
                packed.get_unchecked(r * pb..(r + 1) * pb),
                absmax.get_unchecked(r * pa..(r + 1) * pa),
                code,
                blocksize,
                xs,
            );
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(
        packed: &[u8],
        absmax: &[f32],
        code: &[f32; 16],
        blocksize: usize,
        xs: &[f32],
    ) -> f32 {
        let lo = _mm256_loadu_ps(code.as_ptr());
        let hi = _mm256_loadu_ps(code.as_ptr().add(8));
        let mut total = _mm256_setzero_ps();
        let mut p = packed.as_ptr();
        let mut xp = xs.as_ptr();
        for &s in absmax {
            let mut acc0 = _mm256_setzero_ps();
            let mut acc1 = _mm256_setzero_ps();
            let mut acc2 = _mm256_setzero_ps();
            let mut acc3 = _mm256_setzero_ps();
            for _ in 0..blocksize / 32 {
                // Bytes 0-7 and 8-15 of the run: high nibbles are elements 2j (split[j]), low
                // nibbles 2j + 1 (split[16 + j]).
                let v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i));
                let v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(8) as *const __m128i));
                let h0 = lookup(_mm256_srli_epi32(v0, 4), _mm256_slli_epi32(v0, 24), lo, hi);
                let l0 = lookup(v0, _mm256_slli_epi32(v0, 28), lo, hi);
                let h1 = lookup(_mm256_srli_epi32(v1, 4), _mm256_slli_epi32(v1, 24), lo, hi);
                let l1 = lookup(v1, _mm256_slli_epi32(v1, 28), lo, hi);
                acc0 = _mm256_fmadd_ps(h0, _mm256_loadu_ps(xp), acc0);
                acc1 = _mm256_fmadd_ps(h1, _mm256_loadu_ps(xp.add(8)), acc1);
                acc2 = _mm256_fmadd_ps(l0, _mm256_loadu_ps(xp.add(16)), acc2);
                acc3 = _mm256_fmadd_ps(l1, _mm256_loadu_ps(xp.add(24)), acc3);
                p = p.add(16);
                xp = xp.add(32);
            }
            let acc = _mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3));
            total = _mm256_fmadd_ps(acc, _mm256_set1_ps(s), total);
        }
        let q = _mm_add_ps(
            _mm256_castps256_ps128(total),
            _mm256_extractf128_ps(total, 1),
        );
        let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
        let q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
        _mm_cvtss_f32(q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bnb::{dequantize_4bit, quantize_4bit, Quant4};

    #[test]
    fn fused_dot_matches_dequantize_then_dot() {
        let mut seed = 0x1234_5678u64;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        for (quant, bs, n) in [
            (Quant4::Nf4, 64, 256),
            (Quant4::Fp4, 32, 96),
            (Quant4::Nf4, 128, 384),
        ] {
            let w: Vec<f32> = (0..n).map(|_| rnd()).collect();
            let x: Vec<f32> = (0..n).map(|_| rnd()).collect();
            let (packed, absmax) = quantize_4bit(&w, bs, quant);
            let mut deq = vec![0f32; n];
            dequantize_4bit(&packed, &absmax, &quant.code(), bs, 0, &mut deq);
            let want: f64 = deq
                .iter()
                .zip(&x)
                .map(|(a, b)| (*a as f64) * (*b as f64))
                .sum();
            for got in [
                bnb4_dot_row(
                    &packed,
                    &absmax,
                    &quant.code(),
                    bs,
                    &Bnb4Activation::new(&x),
                ),
                bnb4_dot_row_scalar(&packed, &absmax, &quant.code(), bs, &x),
            ] {
                assert!(
                    (got as f64 - want).abs() < 1e-4,
                    "{quant:?}: {got} vs {want}"
                );
            }
        }
    }

    /// The AVX2 kernel (which an AVX-512 host does not dispatch to) against the scalar twin,
    /// on the split activation it reads, for NF4 and FP4 at several block sizes.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_kernel_matches_the_scalar_one() {
        if !has_avx2_fma() {
            return;
        }
        for (quant, bs, cols, rows) in [
            (Quant4::Nf4, 64, 256, 5),
            (Quant4::Fp4, 32, 96, 3),
            (Quant4::Nf4, 128, 384, 2),
            (Quant4::Nf4, 32, 32, 1),
        ] {
            let w: Vec<f32> = (0..cols * rows)
                .map(|i| ((i * 7919) % 101) as f32 / 101.0 - 0.5)
                .collect();
            let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
            let (packed, absmax) = quantize_4bit(&w, bs, quant);
            let code = quant.code();
            let mut out = vec![0f32; rows];
            // SAFETY: AVX2 and FMA were detected above; the lengths are whole rows.
            unsafe { avx2::dot_rows(&packed, &absmax, &code, bs, &split_order(&x), &mut out) };
            let want = scalar_rows(&packed, &absmax, &code, bs, &x, rows);
            for (r, (got, want)) in out.iter().zip(&want).enumerate() {
                assert!(
                    (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "{quant:?} bs {bs} row {r}: {got} vs {want}"
                );
            }
        }
    }

    /// Each of `rows` consecutive rows' dot product by the scalar kernel.
    fn scalar_rows(
        packed: &[u8],
        absmax: &[f32],
        code: &[f32; 16],
        bs: usize,
        x: &[f32],
        rows: usize,
    ) -> Vec<f32> {
        let (pb, pa) = (x.len() / 2, x.len() / bs);
        (0..rows)
            .map(|r| {
                bnb4_dot_row_scalar(
                    &packed[r * pb..(r + 1) * pb],
                    &absmax[r * pa..(r + 1) * pa],
                    code,
                    bs,
                    x,
                )
            })
            .collect()
    }

    /// The several-rows entries give each row's dot product (NF4 rows against the scalar kernel,
    /// bf16 rows against f64), so the rows' offsets are right.
    #[test]
    fn rows_entries_equal_the_row_kernels() {
        let (cols, n, bs) = (128, 6, 64);
        let w: Vec<f32> = (0..cols * n)
            .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
            .collect();
        let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.21).cos()).collect();
        let act = Bnb4Activation::new(&x);
        let (packed, absmax) = quantize_4bit(&w, bs, Quant4::Nf4);
        let code = Quant4::Nf4.code();
        let mut out = vec![0f32; n];
        bnb4_dot_rows(&packed, &absmax, &code, bs, &act, &mut out);
        let want = scalar_rows(&packed, &absmax, &code, bs, &x, n);
        for (r, (got, want)) in out.iter().zip(&want).enumerate() {
            assert!((got - want).abs() < 1e-4, "nf4 row {r}: {got} vs {want}");
        }
        let bf: Vec<u8> = w
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        bf16_dot_rows(&bf, &act, &mut out);
        for (r, got) in out.iter().enumerate() {
            let want: f64 = (0..cols)
                .map(|c| half::bf16::from_f32(w[r * cols + c]).to_f64() * x[c] as f64)
                .sum();
            assert!(
                (*got as f64 - want).abs() < 1e-4,
                "bf16 row {r}: {got} vs {want}"
            );
        }
    }
}

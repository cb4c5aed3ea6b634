//! bitsandbytes 4-bit rows against an 8-bit activation, with integer dot products: the code
//! book rounded to 8 bits (looked up 32 codes an instruction by a byte shuffle, as llama.cpp's
//! IQ4_NL) and the activation rounded to 8 bits per run of 32 with one f32 scale (llama.cpp's
//! Q8_0). Not exact: an approximation for decode, opt-in (`QLORA_CPU_Q8=1` in the engine). The
//! scalar twin defines the algebra:
//! Σ_blocks absmax_b · Σ_{runs r ∈ b} d_r · Σ_j table[c_j]·q_j, times the table's scale.

/// A code book rounded to 8 bits: `table[i] = round(code[i] / scale)`, `scale = max |code| /
/// 127`, so every entry is in −127 ..= 127.
#[derive(Clone, Copy, Debug)]
pub struct Q8Code {
    table: [i8; 16],
    scale: f32,
}

impl Q8Code {
    /// The code book in 8 bits, at the step (searched over max |code| / 127 ..= max |code| /
    /// 64) with the least mean squared error over the 16 entries, the right weighting for NF4,
    /// whose codes are equally likely by construction: 1/112.03 for NF4 (RMS error 0.0017 of
    /// the absmax). The step matters: stepwise perplexity of SmolLM2-135M on hamlet.txt was
    /// 127.0 at 1/112.03, 127.1 at 1/127, 136.7 at 1/120 (exact: 124.05). `None` when some
    /// nonzero entry ends more than 5 % off (FP4's 0.0052 beside its 1.0), or the book is all
    /// zero or not finite.
    pub fn new(code: &[f32; 16]) -> Option<Self> {
        let m = code.iter().fold(0f32, |m, c| m.max(c.abs()));
        if !(m > 0.0 && code.iter().all(|c| c.is_finite())) {
            return None;
        }
        let sq = |inv: f32| -> f64 {
            code.iter()
                .map(|&c| (((c * inv / m).round() * m / inv - c) as f64).powi(2))
                .sum()
        };
        let (mut inv, mut best) = (127f32, sq(127.0));
        for k in 1..=6300 {
            let v = 127.0 - k as f32 * 0.01;
            let e = sq(v);
            if e < best {
                (inv, best) = (v, e);
            }
        }
        let scale = m / inv;
        let mut table = [0i8; 16];
        for (t, &c) in table.iter_mut().zip(code) {
            let q = (c / scale).round().clamp(-127.0, 127.0);
            if c != 0.0 && ((q * scale - c) / c).abs() > 0.05 {
                return None;
            }
            *t = q as i8;
        }
        Some(Q8Code { table, scale })
    }

    /// `new`, remembered per code book (the search costs about 0.1 ms; decode asks once per
    /// weight and token).
    pub fn cached(code: &[f32; 16]) -> Option<Self> {
        type Memo = Vec<([u32; 16], Option<Q8Code>)>;
        static MEMO: std::sync::Mutex<Memo> = std::sync::Mutex::new(Vec::new());
        let key = code.map(f32::to_bits);
        let mut memo = MEMO.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, q)) = memo.iter().find(|(k, _)| *k == key) {
            return *q;
        }
        let q = Q8Code::new(code);
        memo.push((key, q));
        q
    }
}

/// One token's activation rounded to 8 bits: each run of 32 elements as `d · q`, `d = max |x| /
/// 127`, `q` in −127 ..= 127 stored in the 4-bit kernels' split order (the run's 16 even-index
/// elements, then its 16 odd-index ones: the high and low nibbles of its 16 packed bytes).
/// Requires `x.len()` to be a multiple of 32.
pub struct Q8Activation {
    q: Vec<i8>,
    d: Vec<f32>,
    /// Per run, 8 lanes of i32: −128 · Σ q in the first, 0 in the rest (the AVX-512 kernel
    /// offsets the table by 128 to make it unsigned and takes this back in its accumulator).
    bias: Vec<i32>,
    /// Per run, its `d` in 8 lanes (the AVX-512 kernel's scale vector, loaded whole).
    dv: Vec<f32>,
    simd: Simd,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Simd {
    None,
    Avx2,
    Avx512Vnni,
}

impl Q8Activation {
    pub fn new(x: &[f32]) -> Self {
        debug_assert!(x.len().is_multiple_of(32));
        let runs = x.len() / 32;
        let (mut q, mut d, mut bias) = (
            Vec::with_capacity(x.len()),
            Vec::with_capacity(runs),
            Vec::with_capacity(8 * runs),
        );
        for c in x.chunks_exact(32) {
            // A NaN anywhere makes the run's scale NaN, so it reaches the output as in the
            // exact path (f32::max would skip it); an infinity makes it infinite, then NaN.
            let m = c.iter().fold(0f32, |m, v| {
                if v.is_nan() || m.is_nan() {
                    f32::NAN
                } else {
                    m.max(v.abs())
                }
            });
            let dr = m / 127.0;
            let inv = if dr > 0.0 { 1.0 / dr } else { 0.0 };
            let qi = |v: f32| (v * inv).round().clamp(-127.0, 127.0) as i8;
            let start = q.len();
            q.extend((0..16).map(|j| qi(c[2 * j])));
            q.extend((0..16).map(|j| qi(c[2 * j + 1])));
            let sum: i32 = q[start..].iter().map(|&v| v as i32).sum();
            bias.push(-128 * sum);
            bias.extend([0; 7]);
            d.push(dr);
        }
        let dv = d.iter().flat_map(|&v| [v; 8]).collect();
        Q8Activation {
            q,
            d,
            bias,
            dv,
            simd: detect(),
        }
    }

    /// The activation these 8-bit values stand for, in natural order (for tests).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut x = vec![0f32; self.q.len()];
        for (r, (c, &dr)) in self.q.chunks_exact(32).zip(&self.d).enumerate() {
            for j in 0..16 {
                x[32 * r + 2 * j] = dr * c[j] as f32;
                x[32 * r + 2 * j + 1] = dr * c[16 + j] as f32;
            }
        }
        x
    }
}

fn detect() -> Simd {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::use_avx512()
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx512dq")
            && std::is_x86_feature_detected!("avx512vnni")
        {
            return Simd::Avx512Vnni;
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return Simd::Avx2;
        }
    }
    Simd::None
}

/// Σ W[r]·x for `out.len()` consecutive rows stored as `packed` (x's length / 2 bytes a row,
/// high nibble first) with one absmax per `blocksize` elements, `x` and the code book in 8 bits.
/// Requires `blocksize` to be a multiple of 32 that divides the row.
pub fn bnb4_dot_rows_q8(
    packed: &[u8],
    absmax: &[f32],
    code: &Q8Code,
    blocksize: usize,
    x: &Q8Activation,
    out: &mut [f32],
) {
    let cols = x.q.len();
    assert!(blocksize.is_multiple_of(32) && cols.is_multiple_of(blocksize));
    let (pb, pa) = (cols / 2, cols / blocksize);
    assert!(packed.len() >= out.len() * pb && absmax.len() >= out.len() * pa);
    for (r, o) in out.iter_mut().enumerate() {
        let (p, a) = (&packed[r * pb..(r + 1) * pb], &absmax[r * pa..(r + 1) * pa]);
        let s = match x.simd {
            // SAFETY: `simd` names the features `Q8Activation::new` detected; `p` holds the
            // row's cols / 2 bytes, `a` its cols / blocksize scales.
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512Vnni => unsafe { avx512::dot(p, a, &code.table, blocksize, x) },
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => unsafe { avx2::dot(p, a, &code.table, blocksize, x) },
            _ => dot_scalar(p, a, &code.table, blocksize, x),
        };
        *o = s * code.scale;
    }
}

/// One row, without the table's scale.
fn dot_scalar(packed: &[u8], absmax: &[f32], table: &[i8; 16], bs: usize, x: &Q8Activation) -> f32 {
    let runs = bs / 32;
    let mut total = 0f32;
    for (b, &a) in absmax.iter().enumerate() {
        for r in b * runs..(b + 1) * runs {
            let (bytes, q) = (&packed[16 * r..16 * r + 16], &x.q[32 * r..32 * r + 32]);
            let mut s = 0i32;
            for (j, &byte) in bytes.iter().enumerate() {
                s += table[(byte >> 4) as usize] as i32 * q[j] as i32
                    + table[(byte & 15) as usize] as i32 * q[16 + j] as i32;
            }
            total += s as f32 * (x.d[r] * a);
        }
    }
    total
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::Q8Activation;
    use std::arch::x86_64::*;

    /// Per run: the 16 bytes' high nibbles (low lane) and low nibbles (high lane) pick their
    /// 8-bit values by one shuffle; `maddubs` wants an unsigned operand, so it takes |w| and x
    /// with w's sign, then `madd` sums pairs into 8 i32 lanes, scaled by d_r · absmax_b.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(
        packed: &[u8],
        absmax: &[f32],
        table: &[i8; 16],
        bs: usize,
        x: &Q8Activation,
    ) -> f32 {
        let t = _mm_loadu_si128(table.as_ptr() as *const __m128i);
        let tbl = _mm256_set_m128i(t, t);
        let m0f = _mm_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let runs = bs / 32;
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let (mut p, mut q) = (packed.as_ptr(), x.q.as_ptr());
        let mut d = x.d.as_ptr();
        for &a in absmax {
            for k in 0..runs {
                let b = _mm_loadu_si128(p as *const __m128i);
                let idx = _mm256_set_m128i(
                    _mm_and_si128(b, m0f),
                    _mm_and_si128(_mm_srli_epi16(b, 4), m0f),
                );
                let w = _mm256_shuffle_epi8(tbl, idx);
                let xq = _mm256_loadu_si256(q as *const __m256i);
                let p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xq, w));
                let p32 = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
                let s = _mm256_set1_ps(*d * a);
                if k % 2 == 0 {
                    acc0 = _mm256_fmadd_ps(p32, s, acc0);
                } else {
                    acc1 = _mm256_fmadd_ps(p32, s, acc1);
                }
                p = p.add(16);
                q = q.add(32);
                d = d.add(1);
            }
        }
        let v = _mm256_add_ps(acc0, acc1);
        let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)))
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::Q8Activation;
    use std::arch::x86_64::*;

    /// Two runs (32 packed bytes) an iteration: the nibbles, put in the activation's order by
    /// one lane permute, pick their values plus 128 (unsigned) by one shuffle; `vpdpbusd`
    /// multiplies them by the signed activation into 16 i32 lanes starting from the runs' bias
    /// (−128 · Σ q), so each run's 8 lanes sum to Σ w·q. A lone run (blocksize 32) takes the
    /// 256-bit half of the same steps.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vl,avx512dq,avx2,fma")]
    pub unsafe fn dot(
        packed: &[u8],
        absmax: &[f32],
        table: &[i8; 16],
        bs: usize,
        x: &Q8Activation,
    ) -> f32 {
        let t = _mm_add_epi8(
            _mm_loadu_si128(table.as_ptr() as *const __m128i),
            _mm_set1_epi8(-128),
        );
        let tbl = _mm512_broadcast_i32x4(t);
        let m0f = _mm512_set1_epi8(0x0F);
        let runs = bs / 32;
        let mut total = _mm512_setzero_ps();
        let (mut p, mut q) = (packed.as_ptr(), x.q.as_ptr());
        let (mut dv, mut bias) = (x.dv.as_ptr(), x.bias.as_ptr());
        for &a in absmax {
            let mut blk = _mm512_setzero_ps();
            let mut k = 0;
            while k + 2 <= runs {
                let b = _mm256_loadu_si256(p as *const __m256i);
                // [hi_r, hi_r+1, lo_r, lo_r+1] → [hi_r, lo_r, hi_r+1, lo_r+1], then the nibbles.
                let idx = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_srli_epi16(b, 4)), b, 1);
                let idx = _mm512_and_si512(_mm512_shuffle_i64x2(idx, idx, 0b11_01_10_00), m0f);
                let w = _mm512_shuffle_epi8(tbl, idx);
                let xq = _mm512_loadu_si512(q as *const _);
                let init = _mm512_loadu_si512(bias as *const _);
                let p32 = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(init, w, xq));
                blk = _mm512_fmadd_ps(p32, _mm512_loadu_ps(dv), blk);
                p = p.add(32);
                q = q.add(64);
                dv = dv.add(16);
                bias = bias.add(16);
                k += 2;
            }
            if k < runs {
                let b = _mm_loadu_si128(p as *const __m128i);
                let m = _mm_set1_epi8(0x0F);
                let idx =
                    _mm256_set_m128i(_mm_and_si128(b, m), _mm_and_si128(_mm_srli_epi16(b, 4), m));
                let w = _mm256_shuffle_epi8(_mm512_castsi512_si256(tbl), idx);
                let xq = _mm256_loadu_si256(q as *const __m256i);
                let init = _mm256_loadu_si256(bias as *const __m256i);
                let p32 = _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(init, w, xq));
                let part = _mm256_mul_ps(p32, _mm256_loadu_ps(dv));
                blk = _mm512_add_ps(blk, _mm512_zextps256_ps512(part));
                p = p.add(16);
                q = q.add(32);
                dv = dv.add(8);
                bias = bias.add(8);
            }
            total = _mm512_fmadd_ps(blk, _mm512_set1_ps(a), total);
        }
        _mm512_reduce_add_ps(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bnb::{dequantize_4bit, quantize_4bit, Quant4};

    fn rows_data(cols: usize, rows: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
        let mut s = seed;
        let mut rnd = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let w: Vec<f32> = (0..cols * rows).map(|_| rnd()).collect();
        // Runs of very different size, one all zero: each run's scale matters.
        let x: Vec<f32> = (0..cols)
            .map(|i| rnd() * [1.0, 30.0, 0.0, 1e-3][(i / 32) % 4])
            .collect();
        (w, x)
    }

    /// The exact integer algebra: every kernel equals Σ over the dequantized 8-bit operands
    /// (the 8-bit table and activation widened back) to f32 rounding, at block sizes that take
    /// the two-run loop, the lone-run tail, and both.
    #[test]
    fn kernels_equal_the_dot_of_the_8_bit_operands() {
        let code = Q8Code::new(&Quant4::Nf4.code()).expect("NF4 fits 8 bits");
        for (bs, cols, rows) in [
            (64, 256, 5),
            (32, 96, 3),
            (96, 288, 2),
            (128, 384, 4),
            (32, 32, 1),
        ] {
            let (w, x) = rows_data(cols, rows, 0x9E37_79B9 ^ bs as u64);
            let (packed, absmax) = quantize_4bit(&w, bs, Quant4::Nf4);
            let act = Q8Activation::new(&x);
            let xd = act.dequantize();
            let mut out = vec![0f32; rows];
            bnb4_dot_rows_q8(&packed, &absmax, &code, bs, &act, &mut out);
            let mut scalar = vec![0f32; rows];
            let plain = Q8Activation {
                simd: Simd::None,
                q: act.q.clone(),
                d: act.d.clone(),
                bias: act.bias.clone(),
                dv: act.dv.clone(),
            };
            bnb4_dot_rows_q8(&packed, &absmax, &code, bs, &plain, &mut scalar);
            for r in 0..rows {
                let mut want = 0f64;
                for (c, &xc) in xd.iter().enumerate() {
                    let i = r * cols + c;
                    let nib = if c % 2 == 0 {
                        packed[i / 2] >> 4
                    } else {
                        packed[i / 2] & 15
                    };
                    let wq = code.table[nib as usize] as f64 * code.scale as f64;
                    want += wq * absmax[i / bs] as f64 * xc as f64;
                }
                for got in [out[r], scalar[r]] {
                    assert!(
                        (got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "bs {bs} row {r}: {got} vs {want}"
                    );
                }
            }
            // And within the 8-bit rounding of the exact product.
            let mut deq = vec![0f32; cols * rows];
            dequantize_4bit(&packed, &absmax, &Quant4::Nf4.code(), bs, 0, &mut deq);
            for r in 0..rows {
                let exact: f64 = (0..cols)
                    .map(|c| deq[r * cols + c] as f64 * x[c] as f64)
                    .sum();
                let mag: f64 = (0..cols)
                    .map(|c| (deq[r * cols + c] as f64 * x[c] as f64).abs())
                    .sum();
                assert!(
                    (out[r] as f64 - exact).abs() <= 0.02 * mag,
                    "bs {bs} row {r}"
                );
            }
        }
    }

    /// The AVX2 kernel, which an AVX-512 VNNI host does not dispatch to, against the scalar one.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_kernel_equals_the_scalar_one() {
        if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
            return;
        }
        let code = Q8Code::new(&Quant4::Nf4.code()).unwrap();
        for (bs, cols) in [(64, 192), (32, 96), (128, 256)] {
            let (w, x) = rows_data(cols, 1, 7 + bs as u64);
            let (packed, absmax) = quantize_4bit(&w, bs, Quant4::Nf4);
            let act = Q8Activation::new(&x);
            // SAFETY: AVX2 and FMA detected; one whole row.
            let got = unsafe { avx2::dot(&packed, &absmax, &code.table, bs, &act) };
            let want = dot_scalar(&packed, &absmax, &code.table, bs, &act);
            assert!(
                (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "bs {bs}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn code_books_that_8_bits_cannot_hold_are_refused() {
        let nf4 = Quant4::Nf4.code();
        let q = Q8Code::new(&nf4).expect("NF4 fits 8 bits");
        for (&t, &c) in q.table.iter().zip(&nf4) {
            let back = t as f32 * q.scale;
            assert!((back - c).abs() <= 0.05 * c.abs(), "{c} → {t} ({back})");
        }
        assert!(
            (1.0 / q.scale - 112.03).abs() < 0.02,
            "NF4's step 1/{}",
            1.0 / q.scale
        );
        assert!(Q8Code::new(&Quant4::Fp4.code()).is_none());
        assert!(Q8Code::cached(&Quant4::Fp4.code()).is_none());
        assert_eq!(Q8Code::cached(&nf4).map(|c| c.table), Some(q.table));
        assert!(Q8Code::new(&[0.0; 16]).is_none());
        let nan = {
            let mut c = Quant4::Nf4.code();
            c[3] = f32::NAN;
            c
        };
        assert!(Q8Code::new(&nan).is_none());
    }

    /// A non-finite activation is not rounded away: every kernel's output is NaN.
    #[test]
    fn non_finite_activations_reach_the_output() {
        let code = Q8Code::new(&Quant4::Nf4.code()).unwrap();
        let (w, mut x) = rows_data(128, 2, 11);
        let (packed, absmax) = quantize_4bit(&w, 64, Quant4::Nf4);
        for bad in [f32::NAN, f32::INFINITY] {
            x[70] = bad;
            let act = Q8Activation::new(&x);
            let mut out = [0f32; 2];
            bnb4_dot_rows_q8(&packed, &absmax, &code, 64, &act, &mut out);
            assert!(out.iter().all(|v| v.is_nan()), "{bad}: {out:?}");
        }
    }

    #[test]
    fn activation_rounding_is_within_half_a_step_of_each_run() {
        let (_, x) = rows_data(128, 1, 3);
        let act = Q8Activation::new(&x);
        for (r, c) in x.chunks(32).enumerate() {
            let m = c.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (j, v) in c.iter().enumerate() {
                let back = act.dequantize()[32 * r + j];
                assert!(
                    (back - v).abs() <= m / 254.0 * 1.0001 + 1e-30,
                    "run {r} el {j}"
                );
            }
        }
    }
}

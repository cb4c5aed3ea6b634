//! bitsandbytes formats, bit for bit as bitsandbytes' CPU path makes them:
//! 4-bit NF4/FP4 blockwise quantization (`quantize_4bit`), the double quantization of its
//! absmax (`compress_statistics`), the 8-bit dynamic blockwise quantizer that uses, and the
//! LLM.int8 row-wise format. `docs/formats.md` §4 of the design has the layouts; the rules that
//! decide exact bits are repeated at each function.
//!
//! Everything here is the scalar reference. The fast fused paths live in `bnb_dot`.

/// The two 4-bit code books.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Quant4 {
    Nf4,
    Fp4,
}

impl Quant4 {
    /// The name bitsandbytes uses (`quant_type`, the `bitsandbytes__nf4` key suffix).
    pub fn name(self) -> &'static str {
        match self {
            Quant4::Nf4 => "nf4",
            Quant4::Fp4 => "fp4",
        }
    }

    pub fn parse(s: &str) -> Option<Quant4> {
        match s {
            "nf4" => Some(Quant4::Nf4),
            "fp4" => Some(Quant4::Fp4),
            _ => None,
        }
    }

    /// The code book: value of each 4-bit code (`get_4bit_type`, what `quant_map` stores).
    pub fn code(self) -> [f32; 16] {
        let bits = match self {
            Quant4::Nf4 => &NF4_CODE,
            Quant4::Fp4 => &FP4_CODE,
        };
        bits.map(f32::from_bits)
    }
}

const NF4_CODE: [u32; 16] = [
    0xbf800000, 0xbf3239b1, 0xbf066b30, 0xbeca32a0, 0xbe91a24d, 0xbe3d353f, 0xbdba7871, 0x00000000,
    0x3da2faff, 0x3e24cae3, 0x3e7c04dd, 0x3ead033a, 0x3ee1a4b8, 0x3f1007ab, 0x3f3913b3, 0x3f800000,
];

/// FP4's code 8 is +0.0 in bitsandbytes' table (the Python literal `-0` is an integer).
const FP4_CODE: [u32; 16] = [
    0x00000000, 0x3baaaaab, 0x3f2aaaab, 0x3f800000, 0x3eaaaaab, 0x3f000000, 0x3e2aaaab, 0x3e800000,
    0x00000000, 0xbbaaaaab, 0xbf2aaaab, 0xbf800000, 0xbeaaaaab, 0xbf000000, 0xbe2aaaab, 0xbe800000,
];

/// Midpoints of the sorted code book, computed in float32 as bitsandbytes' CPU quantizer does
/// (`(code[order[:-1]] + code[order[1:]]) / 2`), and the code of each sorted position.
const NF4_BOUNDS: [u32; 15] = [
    0xbf591cd8, 0xbf1c5270, 0xbeeb8480, 0xbeadea76, 0xbe703cec, 0xbe0d38bc, 0xbd3a7871, 0x3d22faff,
    0x3df64862, 0x3e5067e0, 0x3e9582d4, 0x3ec753f9, 0x3f006d04, 0x3f248daf, 0x3f5c89da,
];
const FP4_BOUNDS: [u32; 15] = [
    0xbf555556, 0xbf155556, 0xbed55556, 0xbe955556, 0xbe555556, 0xbdb00000, 0xbb2aaaab, 0x00000000,
    0x3b2aaaab, 0x3db00000, 0x3e555556, 0x3e955556, 0x3ed55556, 0x3f155556, 0x3f555556,
];
const FP4_ORDER: [u8; 16] = [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3];

/// bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map(signed=True)`), the code book
/// of the double-quantized absmax (`nested_quant_map`).
pub const DYNAMIC_MAP_BITS: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
    0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
    0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
    0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
    0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
    0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
    0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
    0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
    0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
    0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
    0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
    0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
    0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];

pub fn dynamic_map() -> [f32; 256] {
    DYNAMIC_MAP_BITS.map(f32::from_bits)
}

/// The blocksize of the double quantization (`nested_blocksize`); bitsandbytes always uses 256.
pub const NESTED_BLOCKSIZE: usize = 256;

/// The blocksizes bitsandbytes accepts for 4-bit quantization.
pub fn valid_blocksize(bs: usize) -> bool {
    bs.is_power_of_two() && (32..=4096).contains(&bs)
}

/// Packed bytes for `n` 4-bit codes: two per byte, the last one padded.
pub fn packed_len(n: usize) -> usize {
    n.div_ceil(2)
}

/// 4-bit blockwise quantization of a flat tensor, as bitsandbytes' CPU `quantize_4bit`.
/// `x` is the tensor row-major flattened and widened to f32 (exact for f16/bf16).
/// Returns the packed codes (`(n + 1) / 2` bytes, the lower index in the high nibble) and the
/// f32 absmax of each `blocksize` block (the last block may be short).
///
/// Exact rules: `absmax = max|x|` per block; full blocks scale by `x * (1 / max(absmax, 1e-38))`,
/// the short last block by `x / max(absmax, 1e-38)`; clamp to [-1, 1]; the code is the number of
/// sorted-code midpoints strictly below the scaled value (NaN counts above every midpoint),
/// mapped through the code order for FP4; an odd count pads with the code of 0.
pub fn quantize_4bit(x: &[f32], blocksize: usize, quant: Quant4) -> (Vec<u8>, Vec<f32>) {
    assert!(blocksize > 0);
    let n = x.len();
    let full = n - n % blocksize;
    let mut codes = Vec::with_capacity(n + 1);
    let mut absmax = Vec::with_capacity(n.div_ceil(blocksize));
    for (b, block) in x.chunks(blocksize).enumerate() {
        let am = block.iter().fold(0f32, |m, v| {
            let a = v.abs();
            // torch's max propagates NaN.
            if a.is_nan() || m.is_nan() {
                f32::NAN
            } else {
                m.max(a)
            }
        });
        absmax.push(am);
        let den = if am < 1e-38 { 1e-38f32 } else { am };
        let short = b * blocksize >= full;
        let inv = 1.0f32 / den;
        for &v in block {
            let s = if short { v / den } else { v * inv };
            codes.push(code_of(s.clamp(-1.0, 1.0), quant));
        }
    }
    if !n.is_multiple_of(2) {
        codes.push(code_of(0.0, quant));
    }
    let packed = codes.chunks_exact(2).map(|c| (c[0] << 4) | c[1]).collect();
    (packed, absmax)
}

/// The 4-bit code of a value already scaled into [-1, 1] (`torch.bucketize`, right=False).
#[inline]
pub fn code_of(s: f32, quant: Quant4) -> u8 {
    let bounds = match quant {
        Quant4::Nf4 => &NF4_BOUNDS,
        Quant4::Fp4 => &FP4_BOUNDS,
    };
    let pos = if s.is_nan() {
        15
    } else {
        bounds.iter().filter(|&&b| s > f32::from_bits(b)).count()
    };
    match quant {
        Quant4::Nf4 => pos as u8,
        Quant4::Fp4 => FP4_ORDER[pos],
    }
}

/// The 4-bit code of element `i` of a packed tensor (high nibble first).
#[inline(always)]
pub fn nibble(packed: &[u8], i: usize) -> u8 {
    let b = packed[i / 2];
    if i.is_multiple_of(2) {
        b >> 4
    } else {
        b & 0xF
    }
}

/// Dequantizes elements `start .. start + out.len()` of a 4-bit tensor: `code[c] · absmax[i /
/// blocksize]`, one f32 multiply (bitsandbytes then rounds to the output dtype).
pub fn dequantize_4bit(
    packed: &[u8],
    absmax: &[f32],
    code: &[f32; 16],
    blocksize: usize,
    start: usize,
    out: &mut [f32],
) {
    let mut i = start;
    let end = start + out.len();
    let mut o = 0;
    // Odd start: one low nibble to reach a byte boundary.
    if !i.is_multiple_of(2) && i < end {
        out[o] = code[nibble(packed, i) as usize] * absmax[i / blocksize];
        i += 1;
        o += 1;
    }
    while i < end {
        let b = i / blocksize;
        let seg_end = ((b + 1) * blocksize).min(end);
        let s = absmax[b];
        // Pairs from whole bytes, then a possible trailing high nibble.
        let pairs = (seg_end - i) / 2;
        let bytes = &packed[i / 2..i / 2 + pairs];
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if crate::use_avx512() && pairs >= 16 {
            // SAFETY: AVX-512F detected (`use_avx512`); the kernel reads `bytes` and writes
            // 2 · its whole 16-byte runs of `out[o..]`, within the segment.
            done = unsafe { avx512::widen_pairs(bytes, code, s, &mut out[o..o + 2 * pairs]) };
        } else if pairs >= 8 && has_avx2() {
            // SAFETY: AVX2 detected; as above with 8-byte runs.
            done = unsafe { avx2::widen_pairs(bytes, code, s, &mut out[o..o + 2 * pairs]) };
        }
        for (j, &byte) in bytes.iter().enumerate().skip(done) {
            out[o + 2 * j] = code[(byte >> 4) as usize] * s;
            out[o + 2 * j + 1] = code[(byte & 0xF) as usize] * s;
        }
        i += 2 * pairs;
        o += 2 * pairs;
        if i < seg_end {
            out[o] = code[nibble(packed, i) as usize] * s;
            i += 1;
            o += 1;
        }
    }
}

/// Whether the CPU has AVX2 (detected once).
#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::is_x86_feature_detected!("avx2"))
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// The code-book value of each lane's nibble: `idx`'s low three bits within a half of the
    /// table, `sel`'s sign bit (the nibble's bit 3) the half. Inlined into AVX2 code only.
    #[inline(always)]
    unsafe fn look(idx: __m256i, sel: __m256i, lo: __m256, hi: __m256) -> __m256 {
        _mm256_blendv_ps(
            _mm256_permutevar8x32_ps(lo, idx),
            _mm256_permutevar8x32_ps(hi, idx),
            _mm256_castsi256_ps(sel),
        )
    }

    /// `avx512::widen_pairs` with 8-byte runs for AVX2 hosts: a nibble's value is looked up in
    /// each half of the code book (`vpermps` reads its low three bits) and the half chosen by
    /// its bit 3 (moved to the sign bit for the blend); the same f32 product, the same bits.
    #[target_feature(enable = "avx2")]
    pub unsafe fn widen_pairs(bytes: &[u8], code: &[f32; 16], s: f32, out: &mut [f32]) -> usize {
        let runs = bytes.len() / 8;
        debug_assert!(out.len() >= 16 * runs);
        let (lo_t, hi_t) = (
            _mm256_loadu_ps(code.as_ptr()),
            _mm256_loadu_ps(code.as_ptr().add(8)),
        );
        let sv = _mm256_set1_ps(s);
        let (p, o) = (bytes.as_ptr(), out.as_mut_ptr());
        for r in 0..runs {
            let v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(8 * r) as *const __m128i));
            let h = look(
                _mm256_srli_epi32(v, 4),
                _mm256_slli_epi32(v, 24),
                lo_t,
                hi_t,
            );
            let l = look(v, _mm256_slli_epi32(v, 28), lo_t, hi_t);
            let (h, l) = (_mm256_mul_ps(h, sv), _mm256_mul_ps(l, sv));
            // h0 l0 h1 l1 | h4 l4 h5 l5 and h2 l2 h3 l3 | h6 l6 h7 l7, then the halves in order.
            let (a, b) = (_mm256_unpacklo_ps(h, l), _mm256_unpackhi_ps(h, l));
            _mm256_storeu_ps(o.add(16 * r), _mm256_permute2f128_ps(a, b, 0x20));
            _mm256_storeu_ps(o.add(16 * r + 8), _mm256_permute2f128_ps(a, b, 0x31));
        }
        8 * runs
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// `out[2j] = code[bytes[j] >> 4] · s`, `out[2j + 1] = code[bytes[j] & 15] · s` for the
    /// whole 16-byte runs of `bytes`; returns how many bytes it took. The same f32 product per
    /// element as the scalar loop (one multiply, no FMA), so the same bits: 16 bytes widen to
    /// 16 lanes, each nibble indexes the code book in one permute, and two two-source permutes
    /// interleave the high (even) and low (odd) elements.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn widen_pairs(bytes: &[u8], code: &[f32; 16], s: f32, out: &mut [f32]) -> usize {
        let runs = bytes.len() / 16;
        debug_assert!(out.len() >= 32 * runs);
        let table = _mm512_loadu_ps(code.as_ptr());
        let sv = _mm512_set1_ps(s);
        let first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        let second =
            _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        let (p, o) = (bytes.as_ptr(), out.as_mut_ptr());
        for r in 0..runs {
            let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(p.add(16 * r) as *const __m128i));
            let hi = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table), sv);
            let lo = _mm512_mul_ps(_mm512_permutexvar_ps(v, table), sv);
            _mm512_storeu_ps(o.add(32 * r), _mm512_permutex2var_ps(hi, first, lo));
            _mm512_storeu_ps(o.add(32 * r + 16), _mm512_permutex2var_ps(hi, second, lo));
        }
        16 * runs
    }
}

/// A double-quantized absmax (`compress_statistics=True`).
#[derive(Debug, Clone, PartialEq)]
pub struct DoubleQuant {
    /// One dynamic-map index per 4-bit block (stored as `absmax`, uint8).
    pub codes: Vec<u8>,
    /// f32 absmax of each 256 block of `absmax - offset` (`nested_absmax`).
    pub nested_absmax: Vec<f32>,
    /// The mean of the absmax (`nested_offset`).
    pub offset: f32,
}

/// Double quantization as bitsandbytes: `offset = mean(absmax)` (torch's float32 sum, see
/// `torch_sum_f32`, divided by n), then 8-bit blockwise quantization of `absmax - offset` with
/// the dynamic map in blocks of 256. `torch_threads` only matters past 32768 blocks, where
/// torch splits the sum over its threads.
pub fn double_quantize(absmax: &[f32], torch_threads: usize) -> DoubleQuant {
    let offset = torch_sum_f32(absmax, torch_threads) / absmax.len() as f32;
    let centered: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
    let (codes, nested_absmax) = quantize_blockwise_8bit(&centered, NESTED_BLOCKSIZE);
    DoubleQuant {
        codes,
        nested_absmax,
        offset,
    }
}

/// Recovers the f32 absmax from a double-quantized one: `code[q] · nested_absmax[i / 256]`,
/// then `+ offset` as a separate f32 add (bitsandbytes' `dequantize_blockwise`, then `+=`).
pub fn dequantize_absmax(
    codes: &[u8],
    nested_absmax: &[f32],
    nested_code: &[f32; 256],
    nested_blocksize: usize,
    offset: f32,
) -> Vec<f32> {
    codes
        .iter()
        .enumerate()
        .map(|(i, &q)| nested_code[q as usize] * nested_absmax[i / nested_blocksize] + offset)
        .collect()
}

/// bitsandbytes' CPU 8-bit blockwise quantization with the dynamic map (`quantize_blockwise`,
/// the second stage of double quantization): `absmax = max|x|` per block (NaN ignored, as C
/// `fmax`), `s = x / absmax` (an IEEE division), then the kernel's lookup (below).
///
/// bitsandbytes 0.50.2's compiled CPU kernel does not round to the nearest code: it behaves as
/// a 65536-entry table over a uniform grid, `k = floor((s + 1) · 32767.5 + 0.5)` (the product in
/// f32) and `code = LUT[k]`, where `LUT[j]` is the code nearest to `j / 32767.5 - 1` (ties to the
/// lower index). Near zero this skips the map's finest codes. The rule was found by probing the
/// kernel and is checked on a million probes by `tools/reference/probe_bnb_cpu_8bit.py`, and
/// again through double quantization by `tests/fixtures/bnb`. (The CUDA kernel searches for the
/// nearest code instead, formats.md §4.4.)
pub fn quantize_blockwise_8bit(x: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let lut = cpu_8bit_lut();
    let mut out = Vec::with_capacity(x.len());
    let mut absmax = Vec::with_capacity(x.len().div_ceil(blocksize));
    for block in x.chunks(blocksize) {
        let am = block.iter().fold(-f32::MAX, |m, v| m.max(v.abs()));
        absmax.push(am);
        for &v in block {
            let g = (v / am + 1.0) * 32767.5f32;
            let k = (g as f64 + 0.5).floor().clamp(0.0, 65535.0) as usize;
            out.push(lut[k]);
        }
    }
    (out, absmax)
}

/// The kernel's grid table: for each of 65536 grid points the nearest dynamic-map code.
fn cpu_8bit_lut() -> &'static [u8; 65536] {
    static LUT: std::sync::OnceLock<Box<[u8; 65536]>> = std::sync::OnceLock::new();
    LUT.get_or_init(|| {
        let code: Vec<f64> = DYNAMIC_MAP_BITS
            .iter()
            .map(|b| f32::from_bits(*b) as f64)
            .collect();
        let mut lut = Box::new([0u8; 65536]);
        for (j, slot) in lut.iter_mut().enumerate() {
            let g = j as f64 / 32767.5 - 1.0;
            let i = code.partition_point(|&c| c <= g).saturating_sub(1).min(254);
            let closer_right = (g - code[i + 1]).abs() < (g - code[i]).abs();
            *slot = (i + closer_right as usize) as u8;
        }
        lut
    })
}

/// torch's float32 CPU `sum` of a contiguous vector, bit for bit (ATen `cascade_sum`, 8-lane
/// vectors as on AVX2/AVX-512 builds): 8-wide lane accumulators, four of them interleaved, in a
/// four-level cascade; the scalar tail summed in order, then each lane added. Past 32768
/// elements torch splits the range over `threads` tasks and adds their sums in order.
pub fn torch_sum_f32(x: &[f32], threads: usize) -> f32 {
    const GRAIN: usize = 32768;
    let n = x.len();
    if n <= GRAIN || threads <= 1 {
        return cascade_sum(x);
    }
    let tasks = threads.min(n.div_ceil(GRAIN));
    let chunk = n.div_ceil(tasks);
    x.chunks(chunk).fold(0f32, |acc, c| acc + cascade_sum(c))
}

const LANES: usize = 8;
type Lanes = [f32; LANES];

fn cascade_sum(x: &[f32]) -> f32 {
    if x.len() < LANES {
        // scalar_inner_sum: row_sum over scalars.
        let r = row_sum::<1>(x.len(), |i| [x[i]]);
        return r[0];
    }
    let vecs = x.len() / LANES;
    let load = |i: usize| -> Lanes { x[i * LANES..(i + 1) * LANES].try_into().unwrap() };
    let acc = row_sum::<LANES>(vecs, load);
    let mut fin = 0f32;
    for &v in &x[vecs * LANES..] {
        fin += v;
    }
    for l in acc {
        fin += l;
    }
    fin
}

fn add<const L: usize>(a: &mut [f32; L], b: &[f32; L]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += *y;
    }
}

/// ATen `row_sum`: four interleaved accumulators over `multi_row_sum`, then the leftover
/// items into the first, then the four added in order.
fn row_sum<const L: usize>(size: usize, load: impl Fn(usize) -> [f32; L]) -> [f32; L] {
    const ILP: usize = 4;
    let size_ilp = size / ILP;
    let mut partial = multi_row_sum::<L>(size_ilp, |i, k| load(i * ILP + k));
    for i in size_ilp * ILP..size {
        add(&mut partial[0], &load(i));
    }
    let mut r = partial[0];
    for p in &partial[1..] {
        add(&mut r, p);
    }
    r
}

/// ATen `multi_row_sum` with 4 rows: a cascade of 4 levels whose step grows with the size.
fn multi_row_sum<const L: usize>(
    size: usize,
    load: impl Fn(usize, usize) -> [f32; L],
) -> [[f32; L]; 4] {
    const LEVELS: usize = 4;
    let ceil_log2 = if size <= 2 {
        1
    } else {
        (usize::BITS - (size - 1).leading_zeros()) as usize
    };
    let level_power = (ceil_log2 / LEVELS).max(4);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[[0f32; L]; 4]; LEVELS];
    let mut i = 0;
    while i + level_step <= size {
        for _ in 0..level_step {
            for (k, a) in acc[0].iter_mut().enumerate() {
                add(a, &load(i, k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            let lower = std::mem::replace(&mut acc[j - 1], [[0f32; L]; 4]);
            for (a, l) in acc[j].iter_mut().zip(&lower) {
                add(a, l);
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    while i < size {
        for (k, a) in acc[0].iter_mut().enumerate() {
            add(a, &load(i, k));
        }
        i += 1;
    }
    for j in 1..LEVELS {
        let upper = acc[j];
        for (a, u) in acc[0].iter_mut().zip(&upper) {
            add(a, u);
        }
    }
    acc[0]
}

/// LLM.int8 row-wise dequantization (`int8_vectorwise_dequant`): `CB · SCB · (1/127)`, in f32.
pub fn dequantize_int8_row(cb: &[u8], scb: f32, out: &mut [f32]) {
    const INV127: f32 = 7.874_016e-3;
    for (o, &q) in out.iter_mut().zip(cb) {
        *o = q as i8 as f32 * scb * INV127;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each SIMD widening the CPU has, called directly (an AVX-512 host never dispatches to the
    /// AVX2 one), against the per-element product, bit for bit, over every byte value.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_widenings_equal_the_per_element_product() {
        let bytes: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).chain(0..9).collect();
        for quant in [Quant4::Nf4, Quant4::Fp4] {
            let code = quant.code();
            for s in [0.37f32, -2.5, f32::NAN, f32::INFINITY, 1e-39] {
                let want: Vec<f32> = bytes
                    .iter()
                    .flat_map(|&b| [code[(b >> 4) as usize] * s, code[(b & 15) as usize] * s])
                    .collect();
                let mut kernels: Vec<(&str, usize, Vec<f32>)> = Vec::new();
                if std::is_x86_feature_detected!("avx2") {
                    let mut out = vec![0f32; 2 * bytes.len()];
                    // SAFETY: AVX2 detected; `out` holds two elements a byte.
                    let n = unsafe { avx2::widen_pairs(&bytes, &code, s, &mut out) };
                    kernels.push(("avx2", n, out));
                }
                if std::is_x86_feature_detected!("avx512f") {
                    let mut out = vec![0f32; 2 * bytes.len()];
                    // SAFETY: AVX-512F detected; as above.
                    let n = unsafe { avx512::widen_pairs(&bytes, &code, s, &mut out) };
                    kernels.push(("avx512", n, out));
                }
                for (name, n, out) in kernels {
                    assert!(
                        n >= bytes.len() - 15,
                        "{name}: took {n} of {} bytes",
                        bytes.len()
                    );
                    for (i, (g, w)) in out[..2 * n].iter().zip(&want).enumerate() {
                        assert_eq!(
                            g.to_bits(),
                            w.to_bits(),
                            "{name} {quant:?} s {s}: element {i}"
                        );
                    }
                }
            }
        }
    }

    /// `dequantize_4bit` (which takes the AVX-512 widening where the CPU has it) equals the
    /// plain per-element product bit for bit: odd starts and lengths, runs shorter and longer
    /// than one vector, several block sizes, and absmax of inf, −inf, NaN, subnormal and huge.
    #[test]
    fn dequantize_4bit_equals_the_per_element_product() {
        let n: usize = 4096 + 77;
        let packed: Vec<u8> = (0..n.div_ceil(2))
            .map(|i| ((i * 2_654_435_761usize) >> 7) as u8)
            .collect();
        for quant in [Quant4::Nf4, Quant4::Fp4] {
            let code = quant.code();
            for bs in [32usize, 64, 128, 256] {
                let mut absmax: Vec<f32> = (0..n.div_ceil(bs))
                    .map(|b| 0.01 + (b % 13) as f32 * 0.37)
                    .collect();
                for (k, v) in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 1e-39, 3.4e38]
                    .into_iter()
                    .enumerate()
                {
                    if k < absmax.len() {
                        absmax[k] = v;
                    }
                }
                for (start, len) in [(0usize, n), (1, n - 1), (33, 31), (64, 64), (7, 1000)] {
                    let mut got = vec![0f32; len];
                    dequantize_4bit(&packed, &absmax, &code, bs, start, &mut got);
                    for (k, g) in got.iter().enumerate() {
                        let i = start + k;
                        let want = code[nibble(&packed, i) as usize] * absmax[i / bs];
                        assert_eq!(
                            g.to_bits(),
                            want.to_bits(),
                            "{quant:?} bs {bs} start {start}: element {i}"
                        );
                    }
                }
            }
        }
    }
}

//! CPU ops over whole batches (no per-element callbacks), each with a `# Shapes` line. The
//! scalar twins in `reference` are the oracles these are tested against.

use crate::simd::dot;
use crate::{Weight, WeightFormat};
use qlora_quant::{
    bf16_dot_rows, block_sums, bnb4_dot_rows, bnb4_dot_rows_q8, dot_rows, has_fused_dot,
    Bnb4Activation, GgmlType, Q8Activation, Q8Code,
};
use rayon::prelude::*;

/// Rows of W widened per tile in the batched product; a [64, d] f32 tile stays in L2.
const TILE_ROWS: usize = 64;
/// Products with fewer multiply-adds than this run on the calling thread.
const SERIAL_MACS: usize = 1 << 16;
/// Up to this many tokens the product runs as dot products over widened rows (decode).
const GEMV_MAX_TOKENS: usize = 4;

struct SendPtr(*mut f32);
// SAFETY: every task writes a disjoint set of output elements.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// A method, so closures capture the whole wrapper rather than its raw-pointer field.
    fn get(&self) -> *mut f32 {
        self.0
    }
}

/// Whether the batched products (more than GEMV_MAX_TOKENS tokens: prefill, perplexity, the
/// trainer's forward) round both operands to bf16 and take `matmul::nt_bf16`, twice the f32
/// path's multiply-adds an instruction: QLORA_CPU_BF16=1, on a CPU with AVX512-BF16. Not exact
/// (off by default): the weights and activations each lose 16 bits of mantissa, as in a
/// bf16-compute-dtype PyTorch model.
fn bf16_products() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var_os("QLORA_CPU_BF16").is_some_and(|v| v == "1")
            && crate::matmul::bf16_available()
    })
}

/// Whether decode (at most GEMV_MAX_TOKENS tokens) dots bitsandbytes 4-bit rows whose code
/// book fits 8 bits (NF4) with integer products against the activation rounded to 8 bits per
/// run of 32 (`qlora_quant::bnb4_dot_rows_q8`, llama.cpp's Q8_0 × IQ4_NL way): QLORA_CPU_Q8=1.
/// Not exact (off by default): each NF4 code value moves by 0.0017 of its block's absmax
/// (RMS, `Q8Code::new`), each activation by up to half of its run's 8-bit step.
fn q8_products() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("QLORA_CPU_Q8").is_some_and(|v| v == "1"))
}

/// Whether this CPU can take `linear_with`'s bf16 products (AVX-512 on, and AVX512-BF16).
pub fn bf16_available() -> bool {
    crate::matmul::bf16_available()
}

/// y = x · Wᵀ.
/// # Shapes
/// x [t, d_in], w [d_out, d_in] → y [t, d_out]
pub fn linear(x: &[f32], t: usize, w: &Weight, y: &mut [f32]) {
    linear_with(x, t, w, y, bf16_products())
}

/// `linear`, its batched products in bf16 (`bf16_products`) when `bf16` and the CPU has
/// AVX512-BF16.
pub fn linear_with(x: &[f32], t: usize, w: &Weight, y: &mut [f32], bf16: bool) {
    let (d_out, d_in) = (w.rows, w.cols);
    debug_assert_eq!(x.len(), t * d_in);
    debug_assert_eq!(y.len(), t * d_out);
    let yp = SendPtr(y.as_mut_ptr());
    if t <= GEMV_MAX_TOKENS {
        gemv(x, t, w, y);
        return;
    }
    // The activations rounded to bf16 once, for the bf16 products.
    let xb = (bf16 && crate::matmul::bf16_available()).then(|| {
        let mut xb = vec![0u16; t * d_in];
        // SAFETY: AVX512-BF16 checked; xb is as long as x.
        unsafe { crate::matmul::to_bf16(x, &mut xb) };
        xb
    });
    let tb_len = if xb.is_some() { TILE_ROWS * d_in } else { 0 };
    (0..d_out.div_ceil(TILE_ROWS))
        .into_par_iter()
        .for_each_init(
            || (vec![0f32; TILE_ROWS * d_in], vec![0u16; tb_len]),
            |(buf, bb), c| {
                let r0 = c * TILE_ROWS;
                let n = TILE_ROWS.min(d_out - r0);
                let tile = &mut buf[..n * d_in];
                w.dequantize_rows(r0, tile);
                if let Some(xb) = &xb {
                    let tb = &mut bb[..n * d_in];
                    // SAFETY: AVX512-BF16 checked; the task writes columns r0..r0+n of y [t,
                    // d_out], disjoint from other tasks.
                    unsafe {
                        crate::matmul::to_bf16(tile, tb);
                        crate::matmul::nt_bf16(xb, t, tb, n, d_in, yp.get().add(r0), d_out)
                    };
                    return;
                }
                if crate::matmul::available() {
                    // SAFETY: AVX-512 checked; the task writes columns r0..r0+n of y [t, d_out],
                    // disjoint from other tasks.
                    unsafe { crate::matmul::nt(x, t, tile, n, d_in, yp.get().add(r0), d_out) };
                    return;
                }
                // SAFETY: the task writes columns r0..r0+n of y, disjoint from other tasks; strides
                // describe x [t, d_in] row-major, tileᵀ [d_in, n] and y[:, r0..r0+n].
                unsafe {
                    gemm::gemm(
                        t,
                        n,
                        d_in,
                        yp.get().add(r0),
                        1,
                        d_out as isize,
                        false,
                        x.as_ptr(),
                        1,
                        d_in as isize,
                        tile.as_ptr(),
                        d_in as isize,
                        1,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            },
        );
}

/// How one weight's rows are dotted with the activations during decode.
enum Prepared<'a> {
    /// bf16 rows with the activations in the split order (no shuffles to widen).
    Bf16(Vec<Bnb4Activation>),
    /// A fused GGUF/dense kernel, with the per-block activation sums it needs.
    Ggml(qlora_quant::GgmlType, Vec<Vec<f32>>),
    /// The fused bitsandbytes 4-bit kernel, with the activations in its order.
    Bnb4(&'a crate::weight::Scales, Vec<Bnb4Activation>),
    /// The same with 8-bit integer products (`q8_products`): the code book and each token's
    /// activation in 8 bits.
    Bnb4Q8(&'a crate::weight::Scales, Q8Code, Vec<Q8Activation>),
    /// GPTQ/AWQ with contiguous groups of `size` columns: each token's input in stored
    /// column order (`Groups::perm`) and its group sums.
    Grouped(
        &'a crate::weight::Groups,
        usize,
        Vec<Vec<f32>>,
        Vec<Vec<f32>>,
    ),
    /// GPTQ/AWQ int4 whose groups suit the bitsandbytes kernel (size % 32 == 0, dividing the
    /// row): that kernel with the identity code book and the scales as absmax, then the zero
    /// points' term. Holds the activations in its order and each token's group sums.
    GroupedBnb(
        &'a crate::weight::Groups,
        Vec<Bnb4Activation>,
        Vec<Vec<f32>>,
    ),
    /// No fused kernel: widen each row, then dot.
    Widen,
}

impl<'a> Prepared<'a> {
    fn new(w: &'a Weight, x: &[f32]) -> Self {
        match w.format {
            WeightFormat::Ggml(GgmlType::BF16) if w.cols.is_multiple_of(32) => {
                Prepared::Bf16(x.chunks(w.cols).map(Bnb4Activation::new).collect())
            }
            WeightFormat::Ggml(fmt) if has_fused_dot(fmt) => {
                Prepared::Ggml(fmt, x.chunks(w.cols).map(block_sums).collect())
            }
            WeightFormat::Bnb4(_) => {
                let s = w.scales().expect("bnb4 weight has scales");
                let fits = s.blocksize.is_multiple_of(32) && w.cols.is_multiple_of(s.blocksize);
                let q8 = if fits && q8_products() {
                    Q8Code::cached(&s.code)
                } else {
                    None
                };
                if let Some(code) = q8 {
                    Prepared::Bnb4Q8(s, code, x.chunks(w.cols).map(Q8Activation::new).collect())
                } else if fits {
                    Prepared::Bnb4(s, x.chunks(w.cols).map(Bnb4Activation::new).collect())
                } else {
                    Prepared::Widen
                }
            }
            WeightFormat::Grouped { .. } => {
                let g = w.groups().expect("grouped weight has groups");
                // Each token's input in stored column order.
                let xs: Vec<Vec<f32>> = x
                    .chunks(w.cols)
                    .map(|xt| match &g.perm {
                        None => xt.to_vec(),
                        Some(p) => p.iter().map(|&c| xt[c as usize]).collect(),
                    })
                    .collect();
                let sums = |size: usize| -> Vec<Vec<f32>> {
                    xs.iter()
                        .map(|xt| xt.chunks(size).map(|c| c.iter().sum()).collect())
                        .collect()
                };
                match g.contiguous {
                    Some(size)
                        if w.format == (WeightFormat::Grouped { bits: 4 })
                            && size.is_multiple_of(32)
                            && w.cols.is_multiple_of(size) =>
                    {
                        Prepared::GroupedBnb(
                            g,
                            xs.iter().map(|xt| Bnb4Activation::new(xt)).collect(),
                            sums(size),
                        )
                    }
                    Some(size) if size.is_multiple_of(2) && w.cols.is_multiple_of(2) => {
                        let sums = sums(size);
                        Prepared::Grouped(g, size, xs, sums)
                    }
                    _ => Prepared::Widen,
                }
            }
            _ => Prepared::Widen,
        }
    }
}

/// The integer codes 0 … 15 as a code book (GPTQ/AWQ through the bitsandbytes kernel).
const IDENTITY_CODE: [f32; 16] = [
    0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
];

/// GPTQ/AWQ decode over rows `r0 .. r0 + out.len()` with contiguous groups of `size` (even)
/// columns, `x` in stored column order: y_r = Σ_g s[r, g] · (Σ_{c ∈ g} q[r, c] · x_c − z[r, g] · X_g), X_g the token's
/// group sums (`xsum`), so a row is one pass over its codes with no per-element scale.
fn grouped_dot_rows(
    w: &Weight,
    g: &crate::weight::Groups,
    size: usize,
    r0: usize,
    x: &[f32],
    xsum: &[f32],
    out: &mut [f32],
) {
    let cols = w.cols;
    let eight = w.format == WeightFormat::Grouped { bits: 8 };
    let codes = w.bytes();
    let mut buf = vec![0f32; size];
    for (k, o) in out.iter_mut().enumerate() {
        let r = r0 + k;
        let (s, z) = (
            &g.scales[r * g.groups..(r + 1) * g.groups],
            &g.zeros[r * g.groups..(r + 1) * g.groups],
        );
        let mut acc = 0f32;
        for gi in 0..g.groups {
            let c0 = gi * size;
            let len = size.min(cols - c0);
            let q = &mut buf[..len];
            if eight {
                let row = &codes[r * cols + c0..r * cols + c0 + len];
                for (v, &b) in q.iter_mut().zip(row) {
                    *v = b as f32;
                }
            } else {
                let row = &codes[(r * cols + c0) / 2..(r * cols + c0 + len) / 2];
                for (pair, &b) in q.chunks_exact_mut(2).zip(row) {
                    pair[0] = (b >> 4) as f32;
                    pair[1] = (b & 15) as f32;
                }
            }
            let d = dot(q, &x[c0..c0 + len]);
            acc += s[gi] * (d - z[gi] * xsum[gi]);
        }
        *o = acc;
    }
}

/// Decode: stream each row of W once and dot it with every token, fused with dequantization
/// where qlora-quant has a kernel for the format, else through a widened row.
/// # Shapes
/// x [t, d_in], w [d_out, d_in] → y [t, d_out]
fn gemv(x: &[f32], t: usize, w: &Weight, y: &mut [f32]) {
    linear_many(x, t, &[w], &mut [y]);
}

/// Several products of the same input, y_i = x · W_iᵀ (q/k/v, gate/up), as one parallel pass
/// over all their rows during decode (one fork-join instead of one per weight); one `linear`
/// each during prefill.
/// # Shapes
/// x [t, d_in], ws[i] [d_out_i, d_in] → ys[i] [t, d_out_i]
pub fn linear_many(x: &[f32], t: usize, ws: &[&Weight], ys: &mut [&mut [f32]]) {
    debug_assert_eq!(ws.len(), ys.len());
    if t > GEMV_MAX_TOKENS {
        for (w, y) in ws.iter().zip(ys.iter_mut()) {
            linear(x, t, w, y);
        }
        return;
    }
    let preps: Vec<Prepared> = ws.iter().map(|w| Prepared::new(w, x)).collect();
    let yps: Vec<SendPtr> = ys.iter_mut().map(|y| SendPtr(y.as_mut_ptr())).collect();
    let total: usize = ws.iter().map(|w| w.rows).sum();
    let chunk = (total / (rayon::current_num_threads() * 4)).clamp(16, 512);
    let tasks: Vec<(usize, usize)> = ws
        .iter()
        .enumerate()
        .flat_map(|(i, w)| (0..w.rows).step_by(chunk).map(move |r0| (i, r0)))
        .collect();
    // Small products (LoRA's A and B during decode) cost less than waking the pool.
    let macs: usize = ws.iter().map(|w| w.rows * w.cols).sum::<usize>() * t;
    let run = |(i, r0): (usize, usize)| {
        let (w, yp) = (ws[i], &yps[i]);
        let (d_out, d_in) = (w.rows, w.cols);
        let n = chunk.min(d_out - r0);
        // SAFETY: rows r0..r0+n of token `tok`'s output of this weight are written by this
        // task only; they are contiguous in y [t, d_out].
        let out = |tok: usize| unsafe {
            std::slice::from_raw_parts_mut(yp.get().add(tok * d_out + r0), n)
        };
        match &preps[i] {
            Prepared::Bf16(acts) => {
                let rows = &w.bytes()[r0 * 2 * d_in..(r0 + n) * 2 * d_in];
                for (tok, xr) in acts.iter().enumerate() {
                    bf16_dot_rows(rows, xr, out(tok));
                }
            }
            Prepared::Ggml(fmt, xsums) => {
                let rb = w.row_bytes();
                let rows = &w.bytes()[r0 * rb..(r0 + n) * rb];
                for (tok, xs) in xsums.iter().enumerate() {
                    dot_rows(*fmt, rows, &x[tok * d_in..(tok + 1) * d_in], xs, out(tok));
                }
            }
            Prepared::Bnb4(s, acts) => {
                let rows = &w.bytes()[r0 * d_in / 2..(r0 + n) * d_in / 2];
                let per_row = d_in / s.blocksize;
                let absmax = &s.values[r0 * per_row..(r0 + n) * per_row];
                for (tok, xr) in acts.iter().enumerate() {
                    bnb4_dot_rows(rows, absmax, &s.code, s.blocksize, xr, out(tok));
                }
            }
            Prepared::Bnb4Q8(s, code, acts) => {
                let rows = &w.bytes()[r0 * d_in / 2..(r0 + n) * d_in / 2];
                let per_row = d_in / s.blocksize;
                let absmax = &s.values[r0 * per_row..(r0 + n) * per_row];
                for (tok, xr) in acts.iter().enumerate() {
                    bnb4_dot_rows_q8(rows, absmax, code, s.blocksize, xr, out(tok));
                }
            }
            Prepared::GroupedBnb(g, acts, sums) => {
                let rows = &w.bytes()[r0 * d_in / 2..(r0 + n) * d_in / 2];
                let scales = &g.scales[r0 * g.groups..(r0 + n) * g.groups];
                let size = d_in / g.groups;
                for (tok, (xr, xs)) in acts.iter().zip(sums).enumerate() {
                    let o = out(tok);
                    bnb4_dot_rows(rows, scales, &IDENTITY_CODE, size, xr, o);
                    for (k, v) in o.iter_mut().enumerate() {
                        let i = (r0 + k) * g.groups;
                        let (s, z) = (&g.scales[i..i + g.groups], &g.zeros[i..i + g.groups]);
                        let zx: f32 = s.iter().zip(z).zip(xs).map(|((s, z), x)| s * z * x).sum();
                        *v -= zx;
                    }
                }
            }
            Prepared::Grouped(g, size, xs, sums) => {
                for (tok, (xt, xsum)) in xs.iter().zip(sums).enumerate() {
                    grouped_dot_rows(w, g, *size, r0, xt, xsum, out(tok));
                }
            }
            Prepared::Widen => {
                let mut buf = vec![0f32; d_in];
                for r in r0..r0 + n {
                    w.dequantize_rows(r, &mut buf);
                    for tok in 0..t {
                        out(tok)[r - r0] = dot(&x[tok * d_in..(tok + 1) * d_in], &buf);
                    }
                }
            }
        }
    };
    if macs < SERIAL_MACS {
        tasks.into_iter().for_each(run);
    } else {
        tasks.into_par_iter().for_each(run);
    }
}

/// RMSNorm as transformers' LlamaRMSNorm: x / sqrt(mean(x²) + eps) · weight, in f32.
/// # Shapes
/// x [t, d], weight [d] → y [t, d]
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, y: &mut [f32]) {
    let d = weight.len();
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each(|(yr, xr)| {
            let ms = dot(xr, xr) / d as f32;
            let inv = 1.0 / (ms + eps).sqrt();
            for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(weight) {
                *o = g * (v * inv);
            }
        });
}

/// Rotary embedding in HF's rotate-half layout, in place: for each head, pairs (i, i + hd/2).
/// # Shapes
/// x [t, h, hd], cos/sin [t, hd/2] (per token, from `RopeTable`)
pub fn rope(x: &mut [f32], heads: usize, hd: usize, cos: &[f32], sin: &[f32]) {
    let half = hd / 2;
    x.par_chunks_mut(heads * hd)
        .enumerate()
        .for_each(|(tok, xt)| {
            let (c, s) = (
                &cos[tok * half..(tok + 1) * half],
                &sin[tok * half..(tok + 1) * half],
            );
            for head in xt.chunks_exact_mut(hd) {
                let (a, b) = head.split_at_mut(half);
                for i in 0..half {
                    let (x1, x2) = (a[i], b[i]);
                    a[i] = x1 * c[i] - x2 * s[i];
                    b[i] = x2 * c[i] + x1 * s[i];
                }
            }
        });
}

/// Causal grouped-query attention of `t` new queries at absolute positions `pos0 ..` over a
/// cache holding keys/values for positions `0 .. pos0 + t`. `window`: Mistral's sliding
/// window (a query at p sees keys p-window+1 ..= p).
/// # Shapes
/// q [t, h, hd], k/v cache [n_ctx, kv, hd] → out [t, h, hd]
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    t: usize,
    pos0: usize,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    window: Option<usize>,
    out: &mut [f32],
) {
    if crate::matmul::available() && t >= ATTN_TILED_MIN_T {
        attention_tiled(q, k, v, t, pos0, heads, kv_heads, hd, window, out);
        return;
    }
    attention_rows(q, k, v, t, pos0, heads, kv_heads, hd, window, out);
}

/// At least this many queries take the tiled attention (when AVX-512 runs).
const ATTN_TILED_MIN_T: usize = 32;
/// Queries per block of the tiled attention.
const ATTN_QB: usize = 64;

/// `attention` one query at a time (decode, short prompts, CPUs without AVX-512; the tiled
/// path's oracle in the tests).
/// # Shapes
/// q [t, h, hd], k/v [pos0 + t, kv, hd] → out [t, h, hd]
#[allow(clippy::too_many_arguments)]
pub fn attention_rows(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    t: usize,
    pos0: usize,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    window: Option<usize>,
    out: &mut [f32],
) {
    let group = heads / kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    out.par_chunks_mut(hd).enumerate().for_each_init(
        || Vec::with_capacity(pos0 + t),
        |scores: &mut Vec<f32>, (idx, o)| {
            let (tok, head) = (idx / heads, idx % heads);
            let p = pos0 + tok;
            let kvh = head / group;
            let lo = window.map_or(0, |w| (p + 1).saturating_sub(w));
            let qv = &q[idx * hd..(idx + 1) * hd];
            scores.clear();
            scores.resize(p + 1 - lo, 0.0);
            let first = (lo * kv_heads + kvh) * hd;
            crate::simd::scaled_dots(qv, k, first, kv_heads * hd, scale, scores);
            let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            o.fill(0.0);
            crate::simd::weighted_rows(
                o,
                scores,
                sum,
                v,
                (lo * kv_heads + kvh) * hd,
                kv_heads * hd,
            );
        },
    );
}

/// Rows of head `h` of x [t, nh, hd], contiguous: [t, hd].
pub(crate) fn head_rows(x: &[f32], t: usize, nh: usize, h: usize, hd: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(t * hd);
    for p in 0..t {
        out.extend_from_slice(&x[(p * nh + h) * hd..(p * nh + h + 1) * hd]);
    }
    out
}

/// A row of raw scores → probabilities: softmax of `scale · row[a..b]` (the keys a query sees),
/// zero outside it. The per-query attention's arithmetic, in the same order.
pub(crate) fn softmax_span(row: &mut [f32], a: usize, b: usize, scale: f32) {
    let mut max = f32::NEG_INFINITY;
    for x in &mut row[a..b] {
        *x *= scale;
        max = max.max(*x);
    }
    let mut sum = 0f32;
    for x in &mut row[a..b] {
        *x = (*x - max).exp();
        sum += *x;
    }
    for x in &mut row[a..b] {
        *x /= sum;
    }
    row[..a].fill(0.0);
    row[b..].fill(0.0);
}

/// `attention` as matrix products over blocks of ATTN_QB queries (`matmul`'s AVX-512 tile
/// kernels): per query head and block, S = Q·Kᵀ over the keys the block sees, each row's
/// softmax masked past its position and window, then O = P·V. Heads run in parallel; each
/// output element is one head's, so the bits do not depend on scheduling.
#[allow(clippy::too_many_arguments)]
fn attention_tiled(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    t: usize,
    pos0: usize,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    window: Option<usize>,
    out: &mut [f32],
) {
    use crate::matmul::{nn_acc, nt};
    let group = heads / kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let n = pos0 + t;
    let ks: Vec<Vec<f32>> = (0..kv_heads)
        .map(|g| head_rows(k, n, kv_heads, g, hd))
        .collect();
    // Each head's output [t, hd], then scattered into out [t, h, hd].
    let per_head: Vec<Vec<f32>> = (0..heads)
        .into_par_iter()
        .map(|h| {
            let g = h / group;
            let qh = head_rows(q, t, heads, h, hd);
            let kh = &ks[g];
            let mut o = vec![0f32; t * hd];
            let mut sp = vec![0f32; ATTN_QB * n];
            for i0 in (0..t).step_by(ATTN_QB) {
                let i1 = (i0 + ATTN_QB).min(t);
                let rows = i1 - i0;
                let (p0, p1) = (pos0 + i0, pos0 + i1);
                let lo = window.map_or(0, |w| (p0 + 1).saturating_sub(w));
                let nk = p1 - lo;
                let sp = &mut sp[..rows * nk];
                // SAFETY: available() was checked by the caller; sp is this task's [rows, nk]
                // buffer and the operands hold the indexed elements.
                unsafe {
                    nt(
                        &qh[i0 * hd..i1 * hd],
                        rows,
                        &kh[lo * hd..p1 * hd],
                        nk,
                        hd,
                        sp.as_mut_ptr(),
                        nk,
                    );
                }
                for r in 0..rows {
                    let p = p0 + r;
                    let a = window.map_or(0, |w| (p + 1).saturating_sub(w)) - lo;
                    let b = p + 1 - lo;
                    softmax_span(&mut sp[r * nk..(r + 1) * nk], a, b, scale);
                }
                // SAFETY: as above; C is this task's o, V rows at stride kv_heads · hd.
                unsafe {
                    nn_acc(
                        sp.as_ptr(),
                        nk,
                        v[(lo * kv_heads + g) * hd..].as_ptr(),
                        kv_heads * hd,
                        rows,
                        nk,
                        hd,
                        o[i0 * hd..].as_mut_ptr(),
                        hd,
                    );
                }
            }
            o
        })
        .collect();
    for (h, o) in per_head.iter().enumerate() {
        for i in 0..t {
            out[(i * heads + h) * hd..(i * heads + h + 1) * hd]
                .copy_from_slice(&o[i * hd..(i + 1) * hd]);
        }
    }
}

/// SwiGLU: silu(gate) · up, in place into `gate`.
/// # Shapes
/// gate, up [t, f]
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    gate.par_chunks_mut(4096)
        .zip(up.par_chunks(4096))
        .for_each(|(g, u)| {
            for (a, &b) in g.iter_mut().zip(u) {
                *a = *a / (1.0 + (-*a).exp()) * b;
            }
        });
}

/// Embedding lookup: rows of the table, widened.
/// # Shapes
/// ids [t], table [v, d] → y [t, d]
pub fn embedding(ids: &[u32], table: &Weight, y: &mut [f32]) {
    let d = table.cols;
    y.par_chunks_mut(d)
        .zip(ids.par_iter())
        .for_each(|(row, &id)| {
            table.dequantize_rows(id as usize, row);
        });
}

/// Adds b into a.
pub fn add_in_place(a: &mut [f32], b: &[f32]) {
    for (x, &y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

/// Rotary tables for a set of positions.
pub struct RopeTable {
    /// [hd/2]
    pub inv_freq: Vec<f32>,
}

impl RopeTable {
    /// cos/sin [t, hd/2] for the given positions; angles are pos·inv_freq in f32 as in transformers.
    pub fn cos_sin(&self, positions: impl Iterator<Item = usize>) -> (Vec<f32>, Vec<f32>) {
        let mut cos = Vec::new();
        let mut sin = Vec::new();
        for p in positions {
            for &f in &self.inv_freq {
                let a = (p as f32 * f) as f64;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        (cos, sin)
    }
}

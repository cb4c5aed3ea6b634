//! Backward passes of the ops in `ops`, for training adapters on a frozen base: each takes the
//! forward's inputs (recomputed, not stored) and the gradient of its output, and returns the
//! gradients of its inputs. Checked against central finite differences in
//! `tests/gradients.rs`.

use crate::ops;
use crate::Weight;
use rayon::prelude::*;

/// RMSNorm with a frozen weight: y = w ⊙ x · r, r = (mean(x²) + eps)^-½.
/// dx = r·(w ⊙ dy) − x · r³ · ⟨x, w ⊙ dy⟩ / d.
/// # Shapes
/// x, dy [t, d], weight [d] → dx [t, d]
pub fn rms_norm_backward(x: &[f32], weight: &[f32], eps: f32, dy: &[f32]) -> Vec<f32> {
    let d = weight.len();
    let mut dx = vec![0f32; x.len()];
    dx.par_chunks_mut(d)
        .zip(x.par_chunks(d).zip(dy.par_chunks(d)))
        .for_each(|(dxr, (xr, dyr))| {
            let ms: f64 = xr.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>() / d as f64;
            let r = 1.0 / (ms + eps as f64).sqrt();
            let dot: f64 = (0..d)
                .map(|i| xr[i] as f64 * weight[i] as f64 * dyr[i] as f64)
                .sum();
            let c = r * r * r * dot / d as f64;
            for i in 0..d {
                dxr[i] = (r * weight[i] as f64 * dyr[i] as f64 - xr[i] as f64 * c) as f32;
            }
        });
    dx
}

/// RoPE is a rotation per pair; its backward is the inverse rotation (sin negated).
/// # Shapes
/// dy [t, h, hd] in place → dx
pub fn rope_backward(dy: &mut [f32], heads: usize, hd: usize, cos: &[f32], sin: &[f32]) {
    let neg: Vec<f32> = sin.iter().map(|s| -s).collect();
    ops::rope(dy, heads, hd, cos, &neg);
}

/// SwiGLU a = silu(g)·u: dg = dy·u·silu'(g), du = dy·silu(g), silu'(g) = σ(g)(1 + g(1 − σ(g))).
/// # Shapes
/// gate, up, dy [t, f] → (dgate, dup)
pub fn swiglu_backward(gate: &[f32], up: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut dg = vec![0f32; gate.len()];
    let mut du = vec![0f32; gate.len()];
    dg.par_chunks_mut(4096)
        .zip(du.par_chunks_mut(4096))
        .enumerate()
        .for_each(|(c, (dgc, duc))| {
            let o = c * 4096;
            for i in 0..dgc.len() {
                let (g, u, d) = (gate[o + i], up[o + i], dy[o + i]);
                let s = 1.0 / (1.0 + (-g).exp());
                dgc[i] = d * u * s * (1.0 + g * (1.0 - s));
                duc[i] = d * g * s;
            }
        });
    (dg, du)
}

/// Gradient of the input of a frozen linear map y = x·Wᵀ: dx = dy·W. W is widened 64 rows at a
/// time (never whole), in a fixed number of row ranges whose partial sums are added in order,
/// so the result does not depend on scheduling.
/// # Shapes
/// dy [t, d_out], w [d_out, d_in] → dx [t, d_in]
pub fn linear_backward_input(dy: &[f32], t: usize, w: &Weight) -> Vec<f32> {
    const TILE: usize = 64;
    let (d_out, d_in) = (w.rows, w.cols);
    let tiles = d_out.div_ceil(TILE);
    let parts = rayon::current_num_threads().clamp(1, tiles.max(1));
    let partials: Vec<Vec<f32>> = (0..parts)
        .into_par_iter()
        .map(|p| {
            let mut dx = vec![0f32; t * d_in];
            let mut tile = vec![0f32; TILE * d_in];
            for c in (p * tiles / parts)..((p + 1) * tiles / parts) {
                let r0 = c * TILE;
                let n = TILE.min(d_out - r0);
                w.dequantize_rows(r0, &mut tile[..n * d_in]);
                // dx [t, d_in] += dy[:, r0..r0+n] [t, n] · tile [n, d_in]
                if crate::matmul::available() {
                    // SAFETY: AVX-512 checked; the strides describe the buffers above.
                    unsafe {
                        crate::matmul::nn_acc(
                            dy.as_ptr().add(r0),
                            d_out,
                            tile.as_ptr(),
                            d_in,
                            t,
                            n,
                            d_in,
                            dx.as_mut_ptr(),
                            d_in,
                        )
                    };
                    continue;
                }
                // SAFETY: strides describe the row-major buffers with the sizes above.
                unsafe {
                    gemm::gemm(
                        t,
                        d_in,
                        n,
                        dx.as_mut_ptr(),
                        1,
                        d_in as isize,
                        true,
                        dy.as_ptr().add(r0),
                        1,
                        d_out as isize,
                        tile.as_ptr(),
                        1,
                        d_in as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            }
            dx
        })
        .collect();
    let mut it = partials.into_iter();
    let mut dx = it.next().unwrap_or_else(|| vec![0f32; t * d_in]);
    for p in it {
        dx.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
    }
    dx
}

/// C [m, n] = Aᵀ B for A [k, m], B [k, n] (row-major): weight gradients of small adapters.
pub fn matmul_at_b(a: &[f32], b: &[f32], k: usize, m: usize, n: usize) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    // SAFETY: Aᵀ is A with swapped strides; sizes as stated.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            m as isize,
            1,
            b.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    c
}

/// Backward of causal GQA attention over the sequence itself (training: positions 0..t, no
/// cache): recomputes each query's probabilities and returns (dq, dk, dv).
/// # Shapes
/// q [t, h, hd], k/v [t, kv, hd], dout [t, h, hd]
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
    t: usize,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    window: Option<usize>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    if crate::matmul::available() && t >= TILED_MIN_T {
        return attention_backward_tiled(q, k, v, dout, t, heads, kv_heads, hd, window);
    }
    attention_backward_rows(q, k, v, dout, t, heads, kv_heads, hd, window)
}

/// `attention_backward` one query at a time (CPUs without AVX-512, short sequences; the tiled
/// path's oracle in the tests).
/// # Shapes
/// q [t, h, hd], k/v [t, kv, hd], dout [t, h, hd]
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_rows(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
    t: usize,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    window: Option<usize>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let group = heads / kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    // Per kv head, in parallel: every query head of the group and every position.
    // (kv head, dk, dv, [(query index, dq)])
    type KvGrads = (usize, Vec<f32>, Vec<f32>, Vec<(usize, Vec<f32>)>);
    let per_kv: Vec<KvGrads> = (0..kv_heads)
        .into_par_iter()
        .map(|kvh| {
            let mut dk = vec![0f32; t * hd];
            let mut dv = vec![0f32; t * hd];
            let mut dqs = Vec::new();
            for head in kvh * group..(kvh + 1) * group {
                for p in 0..t {
                    let idx = p * heads + head;
                    let qv = &q[idx * hd..(idx + 1) * hd];
                    let dov = &dout[idx * hd..(idx + 1) * hd];
                    let lo = window.map_or(0, |w| (p + 1).saturating_sub(w));
                    let kr =
                        |j: usize| &k[(j * kv_heads + kvh) * hd..(j * kv_heads + kvh + 1) * hd];
                    let vr =
                        |j: usize| &v[(j * kv_heads + kvh) * hd..(j * kv_heads + kvh + 1) * hd];
                    let scores: Vec<f32> = (lo..=p)
                        .map(|j| crate::simd::dot(qv, kr(j)) * scale)
                        .collect();
                    let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let e: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                    let sum: f32 = e.iter().sum();
                    let pr: Vec<f32> = e.iter().map(|x| x / sum).collect();
                    // dP_j = ⟨dout, v_j⟩; dS_j = P_j (dP_j − Σ P dP).
                    let dp: Vec<f32> = (lo..=p).map(|j| crate::simd::dot(dov, vr(j))).collect();
                    let s_dot: f32 = pr.iter().zip(&dp).map(|(a, b)| a * b).sum();
                    let mut dq = vec![0f32; hd];
                    let ds: Vec<f32> = pr
                        .iter()
                        .zip(&dp)
                        .map(|(p, d)| p * (d - s_dot) * scale)
                        .collect();
                    crate::simd::attention_backward_keys(
                        &mut dq,
                        &mut dk[lo * hd..(p + 1) * hd],
                        &mut dv[lo * hd..(p + 1) * hd],
                        &ds,
                        &pr,
                        qv,
                        dov,
                        k,
                        (lo * kv_heads + kvh) * hd,
                        kv_heads * hd,
                    );
                    dqs.push((idx, dq));
                }
            }
            (kvh, dk, dv, dqs)
        })
        .collect();
    let mut dq = vec![0f32; q.len()];
    let mut dk = vec![0f32; k.len()];
    let mut dv = vec![0f32; v.len()];
    for (kvh, dkh, dvh, dqs) in per_kv {
        for j in 0..t {
            let at = (j * kv_heads + kvh) * hd;
            dk[at..at + hd].copy_from_slice(&dkh[j * hd..(j + 1) * hd]);
            dv[at..at + hd].copy_from_slice(&dvh[j * hd..(j + 1) * hd]);
        }
        for (idx, d) in dqs {
            dq[idx * hd..(idx + 1) * hd].copy_from_slice(&d);
        }
    }
    (dq, dk, dv)
}

/// Sequences at least this long take the tiled attention backward (when AVX-512 runs).
const TILED_MIN_T: usize = 32;
/// Queries per block of the tiled attention backward.
const QB: usize = 64;

/// `attention_backward` as matrix products over blocks of QB queries (`matmul`'s AVX-512 tile
/// kernels): per query head and block, S = Q·Kᵀ and dP = dO·Vᵀ over the keys the block sees,
/// the softmax and dS = P ∘ (dP − Σ P·dP) row by row (masked past each query's position and
/// window), then dQ += dS·K, dK += dSᵀ·Q, dV += Pᵀ·dO. Query heads run in parallel, each with
/// its own dK/dV, summed per kv head in head order: the same bits on every run.
#[allow(clippy::too_many_arguments)]
fn attention_backward_tiled(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
    t: usize,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    window: Option<usize>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    use crate::matmul::{nn_acc, nt};
    let group = heads / kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let ks: Vec<Vec<f32>> = (0..kv_heads)
        .map(|g| ops::head_rows(k, t, kv_heads, g, hd))
        .collect();
    let vs: Vec<Vec<f32>> = (0..kv_heads)
        .map(|g| ops::head_rows(v, t, kv_heads, g, hd))
        .collect();
    // (dq, dk, dv) of each query head, each [t, hd].
    type HeadGrads = (Vec<f32>, Vec<f32>, Vec<f32>);
    let per_head: Vec<HeadGrads> = (0..heads)
        .into_par_iter()
        .map(|h| {
            let (kh, vh) = (&ks[h / group], &vs[h / group]);
            let qh = ops::head_rows(q, t, heads, h, hd);
            let doh = ops::head_rows(dout, t, heads, h, hd);
            let (mut dq, mut dk, mut dv) =
                (vec![0f32; t * hd], vec![0f32; t * hd], vec![0f32; t * hd]);
            let mut sp = vec![0f32; QB * t];
            let mut ds = vec![0f32; QB * t];
            let mut tr = vec![0f32; t * QB];
            for i0 in (0..t).step_by(QB) {
                let i1 = (i0 + QB).min(t);
                let rows = i1 - i0;
                // The keys any query of the block sees.
                let lo = window.map_or(0, |w| (i0 + 1).saturating_sub(w));
                let nk = i1 - lo;
                let (sp, ds) = (&mut sp[..rows * nk], &mut ds[..rows * nk]);
                // SAFETY: available() was checked by the caller; the outputs are this task's
                // own [rows, nk] buffers and every operand holds the indexed elements.
                unsafe {
                    nt(
                        &qh[i0 * hd..i1 * hd],
                        rows,
                        &kh[lo * hd..i1 * hd],
                        nk,
                        hd,
                        sp.as_mut_ptr(),
                        nk,
                    );
                    nt(
                        &doh[i0 * hd..i1 * hd],
                        rows,
                        &vh[lo * hd..i1 * hd],
                        nk,
                        hd,
                        ds.as_mut_ptr(),
                        nk,
                    );
                }
                for r in 0..rows {
                    let p = i0 + r;
                    let a = window.map_or(0, |w| (p + 1).saturating_sub(w)) - lo;
                    let b = p + 1 - lo;
                    let (srow, drow) =
                        (&mut sp[r * nk..(r + 1) * nk], &mut ds[r * nk..(r + 1) * nk]);
                    ops::softmax_span(srow, a, b, scale);
                    let s_dot: f32 = srow[a..b].iter().zip(&drow[a..b]).map(|(x, d)| x * d).sum();
                    for (d, x) in drow[a..b].iter_mut().zip(&srow[a..b]) {
                        *d = x * (*d - s_dot) * scale;
                    }
                    drow[..a].fill(0.0);
                    drow[b..].fill(0.0);
                }
                let transpose = |m: &[f32], out: &mut [f32]| {
                    for r in 0..rows {
                        for c in 0..nk {
                            out[c * rows + r] = m[r * nk + c];
                        }
                    }
                };
                // SAFETY: as above; C is this task's dq/dk/dv, A and B hold the indexed elements.
                unsafe {
                    nn_acc(
                        ds.as_ptr(),
                        nk,
                        kh[lo * hd..].as_ptr(),
                        hd,
                        rows,
                        nk,
                        hd,
                        dq[i0 * hd..].as_mut_ptr(),
                        hd,
                    );
                    let tr = &mut tr[..nk * rows];
                    transpose(ds, tr);
                    nn_acc(
                        tr.as_ptr(),
                        rows,
                        qh[i0 * hd..].as_ptr(),
                        hd,
                        nk,
                        rows,
                        hd,
                        dk[lo * hd..].as_mut_ptr(),
                        hd,
                    );
                    transpose(sp, tr);
                    nn_acc(
                        tr.as_ptr(),
                        rows,
                        doh[i0 * hd..].as_ptr(),
                        hd,
                        nk,
                        rows,
                        hd,
                        dv[lo * hd..].as_mut_ptr(),
                        hd,
                    );
                }
            }
            (dq, dk, dv)
        })
        .collect();
    let mut dq = vec![0f32; q.len()];
    let mut dk = vec![0f32; k.len()];
    let mut dv = vec![0f32; v.len()];
    for (h, (dqh, dkh, dvh)) in per_head.iter().enumerate() {
        let g = h / group;
        for p in 0..t {
            let (qa, ka) = ((p * heads + h) * hd, (p * kv_heads + g) * hd);
            dq[qa..qa + hd].copy_from_slice(&dqh[p * hd..(p + 1) * hd]);
            for (x, y) in dk[ka..ka + hd].iter_mut().zip(&dkh[p * hd..(p + 1) * hd]) {
                *x += y;
            }
            for (x, y) in dv[ka..ka + hd].iter_mut().zip(&dvh[p * hd..(p + 1) * hd]) {
                *x += y;
            }
        }
    }
    (dq, dk, dv)
}

/// Mean cross-entropy over the positions whose label is not ignored, and its gradient
/// (softmax − onehot) / n. Labels are the next token ids; `None` is ignored (-100 in HF).
/// Returns (Σ loss, count, dlogits) so callers can normalise over a whole batch.
/// # Shapes
/// logits [t, v], labels [t] → dlogits [t, v] (unnormalised: softmax − onehot)
pub fn cross_entropy(logits: &[f32], v: usize, labels: &[Option<u32>]) -> (f64, usize, Vec<f32>) {
    let mut d = vec![0f32; logits.len()];
    let parts: Vec<f64> = d
        .par_chunks_mut(v)
        .zip(logits.par_chunks(v))
        .zip(labels.par_iter())
        .map(|((dr, lr), lab)| {
            let Some(y) = lab else {
                return 0.0;
            };
            let max = lr.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            // exp in f32 (as PyTorch's log_softmax), summed in f64.
            for (o, x) in dr.iter_mut().zip(lr) {
                *o = (x - max).exp();
            }
            let sum: f64 = dr.iter().map(|e| *e as f64).sum();
            let lse = max as f64 + sum.ln();
            let inv = (1.0 / sum) as f32;
            dr.iter_mut().for_each(|e| *e *= inv);
            dr[*y as usize] -= 1.0;
            lse - lr[*y as usize] as f64
        })
        .collect();
    let n = labels.iter().filter(|l| l.is_some()).count();
    (parts.iter().sum(), n, d)
}

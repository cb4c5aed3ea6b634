//! Scalar references of the ops in `ops`: plain loops in f64 accumulation, no threads, no
//! tiles. They are the documentation and the oracles of the fast versions; never delete them.

use crate::Weight;

/// y = x · Wᵀ. x [t, d_in], w [d_out, d_in] → y [t, d_out]
pub fn linear(x: &[f32], t: usize, w: &Weight) -> Vec<f32> {
    let wf = w.to_f32();
    let (n, k) = (w.rows, w.cols);
    let mut y = vec![0f32; t * n];
    for i in 0..t {
        for o in 0..n {
            let mut s = 0f64;
            for c in 0..k {
                s += x[i * k + c] as f64 * wf[o * k + c] as f64;
            }
            y[i * n + o] = s as f32;
        }
    }
    y
}

/// x [t, d], weight [d] → [t, d]
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let d = weight.len();
    let mut y = vec![0f32; x.len()];
    for (yr, xr) in y.chunks_mut(d).zip(x.chunks(d)) {
        let ms: f64 = xr.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / d as f64;
        let inv = 1.0 / (ms + eps as f64).sqrt();
        for i in 0..d {
            yr[i] = (weight[i] as f64 * (xr[i] as f64 * inv)) as f32;
        }
    }
    y
}

/// Full causal attention with an optional window, by definition.
/// q [t, h, hd] at positions pos0.., k/v [n_ctx, kv, hd] → [t, h, hd]
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
) -> Vec<f32> {
    let mut out = vec![0f32; t * heads * hd];
    for tok in 0..t {
        let p = pos0 + tok;
        for head in 0..heads {
            let kvh = head / (heads / kv_heads);
            let visible: Vec<usize> = (0..=p)
                .filter(|&j| window.is_none_or(|w| p - j < w))
                .collect();
            let scores: Vec<f64> = visible
                .iter()
                .map(|&j| {
                    (0..hd)
                        .map(|c| {
                            q[(tok * heads + head) * hd + c] as f64
                                * k[(j * kv_heads + kvh) * hd + c] as f64
                        })
                        .sum::<f64>()
                        / (hd as f64).sqrt()
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = scores.iter().map(|s| (s - max).exp()).sum();
            for c in 0..hd {
                let mut acc = 0f64;
                for (s, &j) in scores.iter().zip(&visible) {
                    acc += (s - max).exp() / z * v[(j * kv_heads + kvh) * hd + c] as f64;
                }
                out[(tok * heads + head) * hd + c] = acc as f32;
            }
        }
    }
    out
}

/// HF rotate-half RoPE, by definition. x [t, h, hd]; angle of pair i at position p: p·inv_freq[i].
pub fn rope(x: &[f32], heads: usize, hd: usize, positions: &[usize], inv_freq: &[f32]) -> Vec<f32> {
    let half = hd / 2;
    let mut y = x.to_vec();
    for (tok, &p) in positions.iter().enumerate() {
        for head in 0..heads {
            let base = (tok * heads + head) * hd;
            for i in 0..half {
                let a = (p as f32 * inv_freq[i]) as f64;
                let (x1, x2) = (x[base + i] as f64, x[base + half + i] as f64);
                y[base + i] = (x1 * a.cos() - x2 * a.sin()) as f32;
                y[base + half + i] = (x2 * a.cos() + x1 * a.sin()) as f32;
            }
        }
    }
    y
}

/// silu(g)·u
pub fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter()
        .zip(up)
        .map(|(&g, &u)| ((g as f64) / (1.0 + (-(g as f64)).exp()) * u as f64) as f32)
        .collect()
}

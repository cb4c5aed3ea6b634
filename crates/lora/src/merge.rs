//! Merging adapters into dense weights, as PEFT's `merge_and_unload` computes them: LoRA's
//! W + s·B A, DoRA's m/‖W + ΔW‖ · (W + ΔW), `lora_B.bias`, embedding deltas. Used by `merge`,
//! `export` and DoRA's row norms at load.

use crate::{EmbeddingDelta, LinearDelta};
use qlora_engine::Weight;

/// What a merge refuses.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("adapter has lora_B.bias for \"{module}\", which has no bias to merge it into (PEFT cannot merge it either); apply it unmerged with --adapter")]
    BiasWithoutBias { module: String },
}

/// ΔW = s · B A as [out, in] f32: an f32 matrix product (as PEFT's fp32 `B @ A`), then
/// scaled.
pub fn delta_weight(a: &[f32], b: &[f32], r: usize, out: usize, inp: usize, s: f32) -> Vec<f32> {
    // B A = B · (Aᵀ)ᵀ: `linear` with x = B [out, r] and W = Aᵀ [in, r].
    let mut a_t = vec![0f32; inp * r];
    for k in 0..r {
        for i in 0..inp {
            a_t[i * r + k] = a[k * inp + i];
        }
    }
    let mut dw = vec![0f32; out * inp];
    qlora_engine::ops::linear(b, out, &Weight::from_f32(inp, r, &a_t), &mut dw);
    for v in dw.iter_mut() {
        *v *= s;
    }
    dw
}

/// DoRA's row norms ‖W + s·B A‖₂ (W dequantized), one per output row.
/// # Shapes
/// base [out, in], a [r, in], b [out, r] → [out]
pub fn dora_row_norms(base: &Weight, a: &[f32], b: &[f32], r: usize, s: f32) -> Vec<f32> {
    let (out, inp) = (base.rows, base.cols);
    let w = base.to_f32();
    let dw = delta_weight(a, b, r, out, inp, s);
    w.chunks(inp)
        .zip(dw.chunks(inp))
        .map(|(wr, dr)| {
            let sq: f64 = wr
                .iter()
                .zip(dr)
                .map(|(x, y)| ((x + y) as f64).powi(2))
                .sum();
            sq.sqrt() as f32
        })
        .collect()
}

/// Merges a linear weight: W ← W + s·B A (LoRA) or W ← m/‖W + ΔW‖ · (W + ΔW) (DoRA), in the
/// adapters' order; `lora_B.bias` adds s·b to the bias.
pub fn merge_linear(
    w: &mut [f32],
    bias: &mut Option<Vec<f32>>,
    out: usize,
    inp: usize,
    deltas: &[&LinearDelta],
    module: &str,
) -> Result<(), MergeError> {
    for d in deltas {
        let dw = delta_weight(&d.a, &d.b, d.rank, out, inp, d.scaling);
        match &d.magnitude {
            None => w.iter_mut().zip(&dw).for_each(|(x, y)| *x += y),
            Some(m) => {
                for o in 0..out {
                    let row = &mut w[o * inp..(o + 1) * inp];
                    row.iter_mut()
                        .zip(&dw[o * inp..(o + 1) * inp])
                        .for_each(|(x, y)| *x += y);
                    let norm: f64 = row.iter().map(|v| (*v as f64) * (*v as f64)).sum();
                    let f = m[o] / norm.sqrt() as f32;
                    row.iter_mut().for_each(|x| *x *= f);
                }
            }
        }
        if let Some(bb) = &d.b_bias {
            let Some(b) = bias else {
                return Err(MergeError::BiasWithoutBias {
                    module: module.into(),
                });
            };
            b.iter_mut().zip(bb).for_each(|(x, y)| *x += d.scaling * y);
        }
    }
    Ok(())
}

/// Merges embedding deltas: E ← E + s·(B A)ᵀ, or DoRA's column-rescaled form.
pub fn merge_embedding(e: &mut [f32], vocab: usize, dim: usize, deltas: &[&EmbeddingDelta]) {
    for d in deltas {
        let r = d.rank;
        for v in 0..vocab {
            for j in 0..dim {
                let delta: f32 = (0..r)
                    .map(|k| d.b[j * r + k] * d.a[k * vocab + v])
                    .sum::<f32>();
                e[v * dim + j] += delta * d.scaling;
            }
        }
        if let Some(m) = &d.magnitude {
            for j in 0..dim {
                let norm: f64 = (0..vocab).map(|v| (e[v * dim + j] as f64).powi(2)).sum();
                let f = m[j] / norm.sqrt() as f32;
                (0..vocab).for_each(|v| e[v * dim + j] *= f);
            }
        }
    }
}

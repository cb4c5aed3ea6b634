//! Putting PEFT adapters on a loaded model: each planned delta becomes a `Lora` on its
//! `Projection` or an `EmbeddingLora`, with DoRA's scales computed once from the (dequantized)
//! base weights, as PEFT does at load.

use crate::model::{EmbeddingLora, Lora, Model, Projection};
use crate::{Error, Result};
use qlora_engine::Weight;
use qlora_lora::{EmbeddingDelta, LinearDelta, Plan};

impl Model {
    fn projection_mut(&mut self, module: &str) -> Option<&mut Projection> {
        if module == "lm_head" {
            return Some(&mut self.lm_head);
        }
        self.layers.iter_mut().find_map(|l| {
            [
                &mut l.q_proj,
                &mut l.k_proj,
                &mut l.v_proj,
                &mut l.o_proj,
                &mut l.gate_proj,
                &mut l.up_proj,
                &mut l.down_proj,
            ]
            .into_iter()
            .find(|p| p.name == module)
        })
    }

    /// Applies an adapter's deltas (its replacements must have been applied to the tensors
    /// before loading). Deltas of several adapters add up.
    pub fn apply_adapter(&mut self, plan: &Plan) -> Result<()> {
        for d in &plan.linear {
            let p = self
                .projection_mut(&d.module)
                .ok_or_else(|| Error::Invalid(format!("no linear module \"{}\"", d.module)))?;
            let lora = linear_lora(p, d);
            p.lora.push(lora);
        }
        for d in &plan.embedding {
            if d.module != "model.embed_tokens" {
                return Err(Error::Invalid(format!(
                    "no embedding module \"{}\"",
                    d.module
                )));
            }
            let e = embedding_lora(&self.embed_tokens, d);
            self.embed_lora.push(e);
        }
        Ok(())
    }

    /// Adds the embedding adapters' contributions for the given token ids.
    /// # Shapes
    /// ids [t], x [t, dim]
    pub(crate) fn add_embedding_adapters(&self, ids: &[u32], x: &mut [f32]) {
        let dim = self.embed_tokens.cols;
        for e in &self.embed_lora {
            for (row, &id) in x.chunks_mut(dim).zip(ids) {
                let a = &e.a_t[id as usize * e.rank..(id as usize + 1) * e.rank];
                let mut d = vec![0f32; dim];
                qlora_engine::ops::linear(a, 1, &e.b, &mut d);
                match &e.dora_scale {
                    None => row
                        .iter_mut()
                        .zip(&d)
                        .for_each(|(y, v)| *y += e.scaling * v),
                    Some(f) => {
                        for j in 0..dim {
                            row[j] = row[j] * f[j] + f[j] * (d[j] * e.scaling);
                        }
                    }
                }
            }
        }
    }
}

/// DoRA's per-row scale: magnitude / ‖W + s·B A‖₂ over each output row.
fn dora_row_scale(base: &Weight, d: &LinearDelta, magnitude: &[f32]) -> Vec<f32> {
    let n = qlora_lora::merge::dora_row_norms(base, &d.a, &d.b, d.rank, d.scaling);
    magnitude.iter().zip(&n).map(|(m, n)| m / n).collect()
}

fn linear_lora(p: &Projection, d: &LinearDelta) -> Lora {
    let (out, inp) = (p.d_out(), p.d_in());
    Lora {
        a: Weight::from_f32(d.rank, inp, &d.a),
        b: Weight::from_f32(out, d.rank, &d.b),
        scaling: d.scaling,
        b_bias: d.b_bias.clone(),
        dora_scale: d.magnitude.as_ref().map(|m| dora_row_scale(&p.base, d, m)),
    }
}

fn embedding_lora(e: &Weight, d: &EmbeddingDelta) -> EmbeddingLora {
    let (vocab, dim, r) = (e.rows, e.cols, d.rank);
    let mut a_t = vec![0f32; vocab * r];
    for k in 0..r {
        for v in 0..vocab {
            a_t[v * r + k] = d.a[k * vocab + v];
        }
    }
    let dora_scale = d.magnitude.as_ref().map(|m| {
        // ΔE = (B A)ᵀ · s, [vocab, dim]; norms over the vocabulary for each column.
        let w = e.to_f32();
        let mut sq = vec![0f64; dim];
        for v in 0..vocab {
            for j in 0..dim {
                let delta: f32 = (0..r)
                    .map(|k| d.b[j * r + k] * d.a[k * vocab + v])
                    .sum::<f32>()
                    * d.scaling;
                let x = (w[v * dim + j] + delta) as f64;
                sq[j] += x * x;
            }
        }
        m.iter()
            .zip(&sq)
            .map(|(m, s)| m / s.sqrt() as f32)
            .collect()
    });
    EmbeddingLora {
        a_t,
        rank: r,
        b: Weight::from_f32(dim, r, &d.b),
        scaling: d.scaling,
        dora_scale,
    }
}

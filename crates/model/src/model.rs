//! The model's parameters, named by role, with HF names kept for messages and export.

use qlora_engine::{ops, Weight};
use qlora_io::ModelConfig;

/// One linear layer: a frozen base (any stored format), an optional bias, and the LoRA/DoRA
/// adapters applied on the activation path. All base-plus-adapter math lives here.
#[derive(Debug, Clone)]
pub struct Projection {
    /// HF module name, e.g. `model.layers.3.mlp.down_proj`.
    pub name: String,
    pub base: Weight,
    /// [d_out]
    pub bias: Option<Vec<f32>>,
    /// Adapters, applied in order (their deltas add up).
    pub lora: Vec<Lora>,
}

/// One adapter on one linear layer: y += s · B (A x) (+ s · b_B), or DoRA's rescaled form.
#[derive(Debug, Clone)]
pub struct Lora {
    /// [r, d_in]
    pub a: Weight,
    /// [d_out, r]
    pub b: Weight,
    pub scaling: f32,
    /// `lora_B.bias` (lora_bias), [d_out].
    pub b_bias: Option<Vec<f32>>,
    /// DoRA: magnitude / ‖W + s·B A‖ per output row, [d_out] (fixed at load, as PEFT detaches it).
    pub dora_scale: Option<Vec<f32>>,
}

impl Projection {
    pub fn d_out(&self) -> usize {
        self.base.rows
    }
    pub fn d_in(&self) -> usize {
        self.base.cols
    }

    /// y = x·Wᵀ (+ b).
    /// # Shapes
    /// x [t, d_in] → [t, d_out]
    pub fn forward(&self, x: &[f32], t: usize) -> Vec<f32> {
        let mut y = vec![0f32; t * self.d_out()];
        ops::linear(x, t, &self.base, &mut y);
        self.add_bias(&mut y);
        self.add_adapters(x, t, &mut y);
        y
    }

    /// Adds every adapter's contribution to `y` = x·Wᵀ + b, as PEFT's `lora.Linear.forward`
    /// does in eval mode: plain LoRA adds s·(B(Ax) + b_B); DoRA adds (f − 1)·(y − b) + f·s·B(Ax)
    /// with y the running result, f = magnitude / ‖W + s·BA‖ per output row.
    /// # Shapes
    /// x [t, d_in], y [t, d_out]
    pub fn add_adapters(&self, x: &[f32], t: usize, y: &mut [f32]) {
        let d_out = self.d_out();
        for l in &self.lora {
            let r = l.a.rows;
            let mut h = vec![0f32; t * r];
            ops::linear(x, t, &l.a, &mut h);
            let mut d = vec![0f32; t * d_out];
            ops::linear(&h, t, &l.b, &mut d);
            for (row_y, row_d) in y.chunks_mut(d_out).zip(d.chunks(d_out)) {
                for j in 0..d_out {
                    let delta = row_d[j] + l.b_bias.as_ref().map_or(0.0, |b| b[j]);
                    match &l.dora_scale {
                        None => row_y[j] += l.scaling * delta,
                        Some(f) => {
                            let base = row_y[j] - self.bias.as_ref().map_or(0.0, |b| b[j]);
                            row_y[j] += (f[j] - 1.0) * base + f[j] * (l.scaling * delta);
                        }
                    }
                }
            }
        }
    }

    pub(crate) fn add_bias(&self, y: &mut [f32]) {
        if let Some(b) = &self.bias {
            for row in y.chunks_mut(b.len()) {
                ops::add_in_place(row, b);
            }
        }
    }

    /// `forward` of several projections of the same input (q/k/v, gate/up) in one pass.
    pub fn forward_many<const N: usize>(
        ps: [&Projection; N],
        x: &[f32],
        t: usize,
    ) -> [Vec<f32>; N] {
        let mut ys: [Vec<f32>; N] = ps.map(|p| vec![0f32; t * p.d_out()]);
        {
            let ws: Vec<&qlora_engine::Weight> = ps.iter().map(|p| &p.base).collect();
            let mut outs: Vec<&mut [f32]> = ys.iter_mut().map(|y| y.as_mut_slice()).collect();
            ops::linear_many(x, t, &ws, &mut outs);
        }
        for (p, y) in ps.iter().zip(ys.iter_mut()) {
            p.add_bias(y);
            p.add_adapters(x, t, y);
        }
        ys
    }
}

/// One adapter on the token embedding: x += s · (A[:, id]ᵀ Bᵀ), or DoRA's rescaled form.
#[derive(Debug, Clone)]
pub struct EmbeddingLora {
    /// `lora_embedding_A` transposed: [vocab, r], so a token's row is contiguous.
    pub a_t: Vec<f32>,
    pub rank: usize,
    /// `lora_embedding_B`, [dim, r].
    pub b: Weight,
    pub scaling: f32,
    /// DoRA: magnitude / ‖E + s·ΔE‖ per embedding column, [dim].
    pub dora_scale: Option<Vec<f32>>,
}

#[derive(Debug, Clone)]
pub struct Layer {
    /// [d]
    pub input_layernorm: Vec<f32>,
    pub q_proj: Projection,
    pub k_proj: Projection,
    pub v_proj: Projection,
    pub o_proj: Projection,
    /// [d]
    pub post_attention_layernorm: Vec<f32>,
    pub gate_proj: Projection,
    pub up_proj: Projection,
    pub down_proj: Projection,
}

impl Layer {
    pub fn projections(&self) -> [&Projection; 7] {
        [
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.o_proj,
            &self.gate_proj,
            &self.up_proj,
            &self.down_proj,
        ]
    }
    pub fn projections_mut(&mut self) -> [&mut Projection; 7] {
        [
            &mut self.q_proj,
            &mut self.k_proj,
            &mut self.v_proj,
            &mut self.o_proj,
            &mut self.gate_proj,
            &mut self.up_proj,
            &mut self.down_proj,
        ]
    }
}

#[derive(Debug, Clone)]
pub struct Model {
    pub config: ModelConfig,
    /// [v, d]
    pub embed_tokens: Weight,
    pub layers: Vec<Layer>,
    /// [d]
    pub norm: Vec<f32>,
    /// [v, d]; shares the embedding's bytes when `tie_word_embeddings`.
    pub lm_head: Projection,
    /// LoRA/DoRA adapters on the token embedding.
    pub embed_lora: Vec<EmbeddingLora>,
    /// Fingerprint of the checkpoint the base was loaded from (provenance checks).
    pub fingerprint: String,
    /// The quantization applied at load or stored in the checkpoint (provenance checks).
    pub quantization: Option<qlora_lora::BaseQuantization>,
    /// [hd/2], after any rope scaling.
    pub inv_freq: Vec<f32>,
}

impl Model {
    pub fn vocab_size(&self) -> usize {
        self.embed_tokens.rows
    }

    /// Bytes of weights one decode step reads (every projection, the head, one embedding row).
    pub fn bytes_per_token(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .flat_map(|l| l.projections())
            .map(|p| p.base.stored_bytes())
            .sum();
        layers + self.lm_head.base.stored_bytes()
    }

    pub fn parameter_count(&self) -> usize {
        let d = self.config.hidden_size;
        let per_layer: usize = self.layers.first().map_or(0, |l| {
            l.projections()
                .iter()
                .map(|p| p.d_in() * p.d_out())
                .sum::<usize>()
                + 2 * d
        });
        let head = if self.config.tie_word_embeddings {
            0
        } else {
            self.lm_head.d_in() * self.lm_head.d_out()
        };
        self.embed_tokens.rows * d + per_layer * self.layers.len() + d + head
    }
}

//! The model's parameters, named by role, with HF names kept for messages and export.

use qlora_engine::{ops, Weight};
use qlora_io::ModelConfig;

/// One linear layer: a frozen base (any stored format) and an optional bias. All
/// base-plus-adapter math will live here (adapters arrive with LoRA support).
#[derive(Debug, Clone)]
pub struct Projection {
    /// HF module name, e.g. `model.layers.3.mlp.down_proj`.
    pub name: String,
    pub base: Weight,
    /// [d_out]
    pub bias: Option<Vec<f32>>,
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
        y
    }

    fn add_bias(&self, y: &mut [f32]) {
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
        }
        ys
    }
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

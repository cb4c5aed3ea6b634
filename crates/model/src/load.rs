//! Building a `Model` from HF-named tensors: every expected tensor present, with the shape the
//! config implies and a type qlora computes with; nothing unexplained left over.

use crate::model::{Layer, Model, Projection};
use crate::{inv_freq, Error, Result};
use qlora_engine::{Weight, WeightFormat};
use qlora_io::{ElementType, ModelSource, RawTensor};
use qlora_quant::GgmlType;
use std::path::Path;
use std::sync::Arc;

struct Loader<'a> {
    src: &'a mut ModelSource,
}

impl Loader<'_> {
    fn path(&self, name: &str) -> &Path {
        self.src.tensors.file_of(name).unwrap_or(&self.src.path)
    }

    fn err(&self, name: &str, reason: String) -> Error {
        Error::Tensor {
            path: self.path(name).into(),
            tensor: name.into(),
            reason,
        }
    }

    fn take(&mut self, name: &str, shape: &[usize]) -> Result<RawTensor> {
        let Some(t) = self.src.tensors.get(name).cloned() else {
            return Err(Error::Missing {
                path: self.src.path.clone(),
                tensor: name.into(),
            });
        };
        if t.shape != shape {
            return Err(self.err(
                name,
                format!(
                    "shape {:?} does not match the config, which implies {:?}; config.json and the weights disagree",
                    t.shape, shape
                ),
            ));
        }
        self.src.tensors.remove(name);
        Ok(t)
    }

    fn weight(&mut self, name: &str, rows: usize, cols: usize) -> Result<Weight> {
        let t = self.take(name, &[rows, cols])?;
        self.widenable(name, t, rows, cols)
    }

    fn vector(&mut self, name: &str, n: usize) -> Result<Vec<f32>> {
        let t = self.take(name, &[n])?;
        Ok(self.widenable(name, t, 1, n)?.to_f32())
    }

    /// Wraps a tensor's bytes as a [rows, cols] weight in its stored format.
    fn widenable(&self, name: &str, t: RawTensor, rows: usize, cols: usize) -> Result<Weight> {
        let format = match t.dtype {
            ElementType::F32 => GgmlType::F32,
            ElementType::F16 => GgmlType::F16,
            ElementType::BF16 => GgmlType::BF16,
            ElementType::Ggml(g) => g,
            other => {
                return Err(self.err(
                    name,
                    format!("type {} is not a weight type qlora computes with (f32, f16, bf16, GGUF blocks)", other.name()),
                ))
            }
        };
        Weight::new(WeightFormat::Ggml(format), rows, cols, Arc::new(t.data))
            .map_err(|r| self.err(name, r))
    }

    fn projection(
        &mut self,
        name: &str,
        d_out: usize,
        d_in: usize,
        bias: bool,
    ) -> Result<Projection> {
        let base = self.weight(&format!("{name}.weight"), d_out, d_in)?;
        let bias_name = format!("{name}.bias");
        let bias = if bias || self.src.tensors.get(&bias_name).is_some() {
            Some(self.vector(&bias_name, d_out)?)
        } else {
            None
        };
        Ok(Projection {
            name: name.into(),
            base,
            bias,
        })
    }
}

impl Model {
    /// Loads the model a `ModelSource` describes, consuming its tensors.
    pub fn load(src: &mut ModelSource) -> Result<Model> {
        let cfg = src.config.clone();
        let (d, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (h, kv, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let mut ld = Loader { src };
        let embed_tokens = ld.weight("model.embed_tokens.weight", v, d)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let ab = cfg.attention_bias;
            layers.push(Layer {
                input_layernorm: ld.vector(&format!("{p}.input_layernorm.weight"), d)?,
                q_proj: ld.projection(&format!("{p}.self_attn.q_proj"), h * hd, d, ab)?,
                k_proj: ld.projection(&format!("{p}.self_attn.k_proj"), kv * hd, d, ab)?,
                v_proj: ld.projection(&format!("{p}.self_attn.v_proj"), kv * hd, d, ab)?,
                o_proj: ld.projection(&format!("{p}.self_attn.o_proj"), d, h * hd, ab)?,
                post_attention_layernorm: ld
                    .vector(&format!("{p}.post_attention_layernorm.weight"), d)?,
                gate_proj: ld.projection(&format!("{p}.mlp.gate_proj"), f, d, cfg.mlp_bias)?,
                up_proj: ld.projection(&format!("{p}.mlp.up_proj"), f, d, cfg.mlp_bias)?,
                down_proj: ld.projection(&format!("{p}.mlp.down_proj"), d, f, cfg.mlp_bias)?,
            });
        }
        let norm = ld.vector("model.norm.weight", d)?;
        let lm_head = if cfg.tie_word_embeddings {
            // Some tied checkpoints also store the (identical) head; transformers ignores it.
            ld.src.tensors.remove("lm_head.weight");
            Projection {
                name: "lm_head".into(),
                base: embed_tokens.clone(),
                bias: None,
            }
        } else {
            ld.projection("lm_head", v, d, false)?
        };
        // Old checkpoints carry rotary buffers; they are recomputed from the config.
        let leftovers: Vec<String> = ld
            .src
            .tensors
            .names()
            .filter(|n| !n.ends_with("rotary_emb.inv_freq"))
            .map(String::from)
            .collect();
        if let Some(first) = leftovers.first() {
            return Err(ld.err(
                first,
                format!(
                    "unexpected tensor ({} unexpected in all) for a {}-layer {} model; config.json and the weights disagree",
                    leftovers.len(),
                    cfg.num_hidden_layers,
                    cfg.model_type
                ),
            ));
        }
        Ok(Model {
            inv_freq: inv_freq(&cfg),
            config: cfg,
            embed_tokens,
            layers,
            norm,
            lm_head,
        })
    }
}

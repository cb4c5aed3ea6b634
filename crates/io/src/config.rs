//! `config.json` of Llama/Mistral-family models, with transformers' own field names and defaults.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// RoPE frequency scaling (`rope_scaling`, or `rope_parameters` in transformers ≥ 5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    #[serde(alias = "type", default)]
    pub rope_type: Option<String>,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
}

/// The fields of a Llama/Mistral `config.json` that define the computation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default)]
    pub rope_parameters: Option<RopeScaling>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub quantization_config: Option<serde_json::Value>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}

/// Architectures whose graph is the one Llama/Mistral definition.
const SUPPORTED: &[&str] = &["LlamaForCausalLM", "MistralForCausalLM"];

/// The linears of a Llama/Mistral decoder layer, as HF names them under `model.layers.N.`, in
/// graph order (q, k, v, o, gate, up, down): the one place the module schema is written out.
pub const LAYER_LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// One decoder linear with a config's shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearSpec {
    /// As in `LAYER_LINEARS`, e.g. `mlp.gate_proj`.
    pub name: &'static str,
    pub d_out: usize,
    pub d_in: usize,
    /// Whether the config gives it a bias (`attention_bias`, `mlp_bias`).
    pub bias: bool,
}

impl LinearSpec {
    /// The module's own name, e.g. `gate_proj` (what PEFT's `target_modules` lists).
    pub fn short(&self) -> &'static str {
        short_name(self.name)
    }
}

/// `mlp.gate_proj` → `gate_proj`.
pub fn short_name(linear: &'static str) -> &'static str {
    linear.rsplit('.').next().unwrap_or(linear)
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let cfg: ModelConfig = serde_json::from_str(text).map_err(|e| Error::Json {
            path: path.into(),
            reason: format!("{e}; expected a transformers config.json"),
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        /// Deeper than any released model (Llama 3.1 405B: 126) by far.
        const MAX_LAYERS: usize = 4096;
        /// 2^40 elements (4 TiB of f32) in one matrix: beyond any model this tool can hold.
        const MAX_TENSOR_ELEMENTS: usize = 1 << 40;
        let bad = |reason: String| {
            Err(Error::Config {
                path: path.into(),
                reason,
            })
        };
        let arch_ok = self
            .architectures
            .iter()
            .any(|a| SUPPORTED.contains(&a.as_str()))
            || (self.architectures.is_empty()
                && matches!(self.model_type.as_str(), "llama" | "mistral"));
        if !arch_ok {
            return bad(format!(
                "unsupported architecture {:?} (model_type \"{}\"); qlora runs {} models",
                self.architectures,
                self.model_type,
                SUPPORTED.join(" and ")
            ));
        }
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return bad(format!(
                    "unsupported hidden_act \"{act}\"; Llama/Mistral use \"silu\""
                ));
            }
        }
        if self.hidden_size == 0
            || self.num_attention_heads == 0
            || self.num_hidden_layers == 0
            || self.vocab_size == 0
        {
            return bad("hidden_size, num_attention_heads, num_hidden_layers and vocab_size must be positive".into());
        }
        // Sizes that would overflow, or ask for absurd allocations before any weight is read.
        if self.num_hidden_layers > MAX_LAYERS {
            return bad(format!(
                "num_hidden_layers {} is implausible (more than {MAX_LAYERS}); the config is corrupt",
                self.num_hidden_layers
            ));
        }
        let hd = self.head_dim();
        let products = [
            (
                "num_attention_heads × head_dim",
                self.num_attention_heads.checked_mul(hd),
            ),
            (
                "num_key_value_heads × head_dim",
                self.num_kv_heads().checked_mul(hd),
            ),
            (
                "vocab_size × hidden_size",
                self.vocab_size.checked_mul(self.hidden_size),
            ),
            (
                "intermediate_size × hidden_size",
                self.intermediate_size.checked_mul(self.hidden_size),
            ),
            (
                "num_attention_heads × head_dim × hidden_size",
                self.num_attention_heads
                    .checked_mul(hd)
                    .and_then(|q| q.checked_mul(self.hidden_size)),
            ),
        ];
        for (what, v) in products {
            match v {
                Some(n) if n <= MAX_TENSOR_ELEMENTS => {}
                _ => {
                    return bad(format!(
                        "{what} is beyond {MAX_TENSOR_ELEMENTS} elements (or overflows); the config is corrupt"
                    ))
                }
            }
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return bad(format!(
                "rms_norm_eps {} must be a positive finite number",
                self.rms_norm_eps
            ));
        }
        let theta = self.rope_theta();
        if !(theta.is_finite() && theta > 0.0) {
            return bad(format!(
                "rope_theta {theta} must be a positive finite number"
            ));
        }
        if let Some(f) = self.rope().and_then(|r| r.factor) {
            if !(f.is_finite() && f > 0.0) {
                return bad(format!(
                    "rope_scaling factor {f} must be a positive finite number"
                ));
            }
        }
        let kv = self.num_kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {kv}",
                self.num_attention_heads
            ));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {} and no head_dim is given",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.sliding_window == Some(0) {
            return bad(
                "sliding_window is 0; use null for no window or a positive number of tokens".into(),
            );
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even for rotary embeddings",
                self.head_dim()
            ));
        }
        if let Some(s) = self.rope() {
            match s.rope_type.as_deref() {
                None | Some("default") => {}
                Some("linear") if s.factor.is_some() => {}
                Some("llama3")
                    if s.factor.is_some()
                        && s.low_freq_factor.is_some()
                        && s.high_freq_factor.is_some()
                        && s.original_max_position_embeddings.is_some() => {}
                Some(t) => {
                    return bad(format!(
                        "unsupported or incomplete rope_scaling type \"{t}\"; qlora supports default, linear (factor) and llama3 (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)"
                    ))
                }
            }
        }
        Ok(())
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The seven linears of every decoder layer with this config's shapes, in `LAYER_LINEARS`
    /// order.
    pub fn layer_linears(&self) -> [LinearSpec; 7] {
        let (d, f) = (self.hidden_size, self.intermediate_size);
        let (qd, kvd) = (
            self.num_attention_heads * self.head_dim(),
            self.num_kv_heads() * self.head_dim(),
        );
        let (ab, mb) = (self.attention_bias, self.mlp_bias);
        let dims = [
            (qd, d, ab),
            (kvd, d, ab),
            (kvd, d, ab),
            (d, qd, ab),
            (f, d, mb),
            (f, d, mb),
            (d, f, mb),
        ];
        std::array::from_fn(|i| LinearSpec {
            name: LAYER_LINEARS[i],
            d_out: dims[i].0,
            d_in: dims[i].1,
            bias: dims[i].2,
        })
    }

    /// The scaling section, wherever this config's transformers version put it.
    pub fn rope(&self) -> Option<&RopeScaling> {
        self.rope_scaling.as_ref().or(self.rope_parameters.as_ref())
    }

    pub fn rope_theta(&self) -> f64 {
        self.rope_theta
            .or_else(|| self.rope_parameters.as_ref().and_then(|r| r.rope_theta))
            .unwrap_or(10000.0)
    }

    /// The attention window: Mistral's `sliding_window`; Llama has none.
    pub fn attention_window(&self) -> Option<usize> {
        if self.model_type == "llama" || self.architectures.iter().any(|a| a == "LlamaForCausalLM")
        {
            None
        } else {
            self.sliding_window
        }
    }

    /// End-of-sequence ids (`eos_token_id` may be a number or a list).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        match &self.eos_token_id {
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().map(|v| vec![v as u32]).unwrap_or_default()
            }
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as u32)
                .collect(),
            _ => Vec::new(),
        }
    }
}

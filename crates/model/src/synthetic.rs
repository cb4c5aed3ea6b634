//! Random models of real architectures, built in memory: benchmarks at Mistral-7B's shapes
//! without a 15 GB download, and device-vs-CPU checks at real dimensions. Weights are valid
//! values of their format (random NF4/FP4 codes with random absmax, random bf16), so every
//! kernel does its real work.

use crate::model::{Layer, Lora, Model, Projection};
use crate::Result;
use qlora_engine::{SharedBytes, Weight, WeightFormat};
use qlora_io::ModelConfig;
use qlora_quant::{GgmlType, Quant4};
use rayon::prelude::*;
use std::sync::Arc;

/// The architectures `--synthetic` knows (config.json values of the released models).
pub fn synthetic_config(name: &str) -> Option<ModelConfig> {
    let json = match name {
        "mistral-7b" => {
            r#"{"architectures":["MistralForCausalLM"],"model_type":"mistral","hidden_size":4096,
            "intermediate_size":14336,"num_hidden_layers":32,"num_attention_heads":32,
            "num_key_value_heads":8,"head_dim":128,"vocab_size":32768,"rms_norm_eps":1e-5,
            "rope_theta":1000000.0,"max_position_embeddings":32768,"tie_word_embeddings":false}"#
        }
        "llama-3-8b" => {
            r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","hidden_size":4096,
            "intermediate_size":14336,"num_hidden_layers":32,"num_attention_heads":32,
            "num_key_value_heads":8,"vocab_size":128256,"rms_norm_eps":1e-5,
            "rope_theta":500000.0,"max_position_embeddings":8192,"tie_word_embeddings":false}"#
        }
        "smollm2-135m" => {
            r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","hidden_size":576,
            "intermediate_size":1536,"num_hidden_layers":30,"num_attention_heads":9,
            "num_key_value_heads":3,"vocab_size":49152,"rms_norm_eps":1e-5,
            "rope_theta":100000.0,"max_position_embeddings":8192,"tie_word_embeddings":true}"#
        }
        _ => return None,
    };
    Some(serde_json::from_str(json).expect("built-in config parses"))
}

pub const SYNTHETIC_NAMES: &[&str] = &["mistral-7b", "llama-3-8b", "smollm2-135m"];

/// The base format of a synthetic model's decoder projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyntheticBase {
    Bf16,
    /// bitsandbytes 4-bit, blocksize 64: random codes and absmax (fast: benchmarks).
    Bnb4(Quant4),
    /// bitsandbytes 4-bit, blocksize 64, quantized (bit-exact with bitsandbytes) from
    /// bell-shaped random values, so codes and absmax are distributed as a trained model's
    /// (slower to build: device-vs-CPU checks).
    Bnb4Quantized(Quant4),
}

/// SplitMix64: a fast, seedable generator; each tensor gets its own stream.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    v.par_chunks_mut(1 << 16).enumerate().for_each(|(c, ch)| {
        for (i, w) in ch.chunks_mut(8).enumerate() {
            let r = mix(seed ^ mix(((c as u64) << 20) + i as u64)).to_le_bytes();
            w.copy_from_slice(&r[..w.len()]);
        }
    });
    v
}

/// Uniform values in [-scale, scale).
fn uniform(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .into_par_iter()
        .map(|i| {
            let r = mix(seed ^ mix(i as u64));
            ((r >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn bf16_weight(seed: u64, rows: usize, cols: usize) -> Weight {
    let scale = 1.0 / (cols as f32).sqrt();
    let bytes: Vec<u8> = uniform(seed, rows * cols, scale)
        .par_iter()
        .flat_map_iter(|&v| half::bf16::from_f32(v).to_le_bytes())
        .collect();
    let shared: SharedBytes = Arc::new(bytes);
    Weight::new(WeightFormat::Ggml(GgmlType::BF16), rows, cols, shared).expect("bf16 sizes agree")
}

fn base_weight(seed: u64, rows: usize, cols: usize, base: SyntheticBase) -> Weight {
    match base {
        SyntheticBase::Bf16 => bf16_weight(seed, rows, cols),
        SyntheticBase::Bnb4(q) => {
            let n = rows * cols;
            let packed: SharedBytes = Arc::new(random_bytes(seed, n.div_ceil(2)));
            // absmax of a row-normalised weight's 64-blocks: about 2.5 / sqrt(cols).
            let s = 2.5 / (cols as f32).sqrt();
            let absmax: Vec<f32> = uniform(seed ^ 1, n.div_ceil(64), 0.25 * s)
                .into_iter()
                .map(|u| s + u)
                .collect();
            Weight::bnb4(q, q.code(), 64, rows, cols, packed, absmax).expect("bnb4 sizes agree")
        }
        SyntheticBase::Bnb4Quantized(q) => {
            // Irwin–Hall(4): a bell shape with std ≈ 0.58 · scale, like trained weights.
            let scale = 1.0 / (cols as f32).sqrt();
            let u: Vec<Vec<f32>> = (0..4)
                .map(|k| uniform(seed ^ (k + 11), rows * cols, scale))
                .collect();
            let v: Vec<f32> = (0..rows * cols)
                .into_par_iter()
                .map(|i| u.iter().map(|x| x[i]).sum::<f32>() * 0.5)
                .collect();
            let (packed, absmax) = qlora_quant::bnb::quantize_4bit(&v, 64, q);
            Weight::bnb4(q, q.code(), 64, rows, cols, Arc::new(packed), absmax)
                .expect("bnb4 sizes agree")
        }
    }
}

/// A LoRA adapter of rank r with nonzero A and B (so its product is real work).
fn lora(seed: u64, d_out: usize, d_in: usize, r: usize) -> Lora {
    Lora {
        a: Weight::from_f32(
            r,
            d_in,
            &uniform(seed, r * d_in, 1.0 / (d_in as f32).sqrt()),
        ),
        b: Weight::from_f32(d_out, r, &uniform(seed ^ 2, d_out * r, 0.01)),
        scaling: 2.0,
        b_bias: None,
        dora_scale: None,
    }
}

/// `base` (sharing its weights) with a random LoRA adapter of rank `r` on all seven
/// projections of every layer, replacing any it had: one of many adapters served at once.
pub fn with_synthetic_lora(base: &Model, r: usize, seed: u64) -> Model {
    let mut m = base.clone();
    for (i, l) in m.layers.iter_mut().enumerate() {
        let sd = seed.wrapping_add(1000 * (i as u64 + 1)).wrapping_mul(31);
        for (k, p) in l.projections_mut().into_iter().enumerate() {
            let (rows, cols) = (p.d_out(), p.d_in());
            p.lora = vec![lora(sd + k as u64, rows, cols, r)];
        }
    }
    m
}

/// A random model of `cfg`'s architecture (`cfg.num_hidden_layers` layers) with the given
/// base format, and when `lora_rank` is set a LoRA adapter on all seven projections.
pub fn synthetic_model(
    cfg: ModelConfig,
    base: SyntheticBase,
    lora_rank: Option<usize>,
    seed: u64,
) -> Result<Model> {
    let (d, v) = (cfg.hidden_size, cfg.vocab_size);
    let mut layers = Vec::new();
    for i in 0..cfg.num_hidden_layers {
        let sd = seed.wrapping_add(1000 * (i as u64 + 1));
        let proj = |k: u64, name: &str, rows: usize, cols: usize| Projection {
            name: format!("model.layers.{i}.{name}"),
            base: base_weight(sd + k, rows, cols, base),
            bias: None,
            lora: lora_rank
                .map(|r| vec![lora(sd + 100 + k, rows, cols, r)])
                .unwrap_or_default(),
        };
        let norm = |k: u64| uniform(sd + k, d, 0.1).iter().map(|u| 1.0 + u).collect();
        let [q, k, v, o, g, u, dn] = cfg.layer_linears().map(|l| (l.name, l.d_out, l.d_in));
        layers.push(Layer {
            input_layernorm: norm(20),
            q_proj: proj(1, q.0, q.1, q.2),
            k_proj: proj(2, k.0, k.1, k.2),
            v_proj: proj(3, v.0, v.1, v.2),
            o_proj: proj(4, o.0, o.1, o.2),
            post_attention_layernorm: norm(21),
            gate_proj: proj(5, g.0, g.1, g.2),
            up_proj: proj(6, u.0, u.1, u.2),
            down_proj: proj(7, dn.0, dn.1, dn.2),
        });
    }
    let embed_tokens = bf16_weight(seed ^ 7, v, d);
    let lm_head = Projection {
        name: "lm_head".into(),
        base: if cfg.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            bf16_weight(seed ^ 8, v, d)
        },
        bias: None,
        lora: Vec::new(),
    };
    let inv_freq = crate::rope::inv_freq(&cfg);
    Ok(Model {
        embed_tokens,
        layers,
        norm: vec![1.0; d],
        lm_head,
        embed_lora: Vec::new(),
        fingerprint: format!("synthetic-{seed}"),
        quantization: match base {
            SyntheticBase::Bf16 => None,
            SyntheticBase::Bnb4(q) | SyntheticBase::Bnb4Quantized(q) => {
                Some(qlora_lora::BaseQuantization {
                    quant_type: q.name().into(),
                    blocksize: 64,
                    double_quant: false,
                })
            }
        },
        inv_freq,
        config: cfg,
    })
}

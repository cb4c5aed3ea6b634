//! `qlora convert`: a GGUF file → a Hugging Face model directory (config.json,
//! model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json) that
//! transformers loads. Written under a temporary name and renamed when complete.

use super::outdir::{write_dir_atomically, DType};
use crate::load::load;
use anyhow::{bail, Context, Result};
use qlora_engine::Weight;
use qlora_io::{write_safetensors, WriteTensor};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Convert a .gguf model to a Hugging Face directory (weights dequantized to --dtype).
#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  qlora convert --model SmolLM2-135M-Instruct.Q4_1.gguf --out ./SmolLM2-135M-Instruct --dtype f16"
)]
pub struct Args {
    /// The .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// Output directory (must not exist yet).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value = "f16")]
    dtype: DType,
}

pub fn run(a: Args) -> Result<()> {
    if a.out.exists() {
        bail!(
            "{} already exists; choose a new --out directory",
            a.out.display()
        );
    }
    let loaded = load(&a.model, Default::default())?;
    let m = &loaded.model;
    let cfg = &m.config;
    write_dir_atomically(&a.out, |dir| write_dir(&a, &loaded, dir))?;
    eprintln!(
        "converted {} ({} layers, vocab {}) to {}",
        a.model.display(),
        cfg.num_hidden_layers,
        cfg.vocab_size,
        a.out.display()
    );
    Ok(())
}

fn write_dir(a: &Args, loaded: &crate::load::Loaded, dir: &Path) -> Result<()> {
    let m = &loaded.model;
    let cfg = &m.config;
    let mut named: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut add_w = |name: String, w: &Weight| named.push((name, vec![w.rows, w.cols], w.to_f32()));
    add_w("model.embed_tokens.weight".into(), &m.embed_tokens);
    for l in &m.layers {
        for p in l.projections() {
            add_w(format!("{}.weight", p.name), &p.base);
        }
    }
    if !cfg.tie_word_embeddings {
        add_w("lm_head.weight".into(), &m.lm_head.base);
    }
    let d = cfg.hidden_size;
    for (i, l) in m.layers.iter().enumerate() {
        named.push((
            format!("model.layers.{i}.input_layernorm.weight"),
            vec![d],
            l.input_layernorm.clone(),
        ));
        named.push((
            format!("model.layers.{i}.post_attention_layernorm.weight"),
            vec![d],
            l.post_attention_layernorm.clone(),
        ));
        for p in l.projections() {
            if let Some(b) = &p.bias {
                named.push((format!("{}.bias", p.name), vec![b.len()], b.clone()));
            }
        }
    }
    named.push(("model.norm.weight".into(), vec![d], m.norm.clone()));
    let tensors: Vec<WriteTensor> = named
        .iter()
        .map(|(name, shape, vals)| {
            let bytes = a.dtype.encode(vals);
            WriteTensor {
                name: name.clone(),
                dtype: a.dtype.element_type(),
                shape: shape.clone(),
                data: bytes.into(),
            }
        })
        .collect();
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(&dir.join("model.safetensors"), &tensors, &meta)?;

    let dtype_name = a.dtype.torch_name();
    let eos = cfg.eos_token_ids();
    let mut config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_kv_heads(),
        "head_dim": cfg.head_dim(),
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta(),
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": cfg.attention_bias,
        "mlp_bias": cfg.mlp_bias,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": true,
        "torch_dtype": dtype_name,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos.first(),
    });
    if let Some(r) = cfg.rope() {
        config["rope_scaling"] = json!({"rope_type": r.rope_type, "factor": r.factor});
    }
    write_json(&dir.join("config.json"), &config)?;
    write_json(
        &dir.join("generation_config.json"),
        &json!({"bos_token_id": cfg.bos_token_id, "eos_token_id": eos.first()}),
    )?;
    if let Some(tok) = &loaded.tokenizer {
        std::fs::write(dir.join("tokenizer.json"), &tok.json).context("writing tokenizer.json")?;
        let mut tc = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": tok.add_bos,
            "add_eos_token": false,
            "clean_up_tokenization_spaces": false,
            "model_max_length": cfg.max_position_embeddings,
            "bos_token": tok.bos_token,
            "eos_token": tok.eos_token,
        });
        if let Some(t) = &tok.chat_template {
            tc["chat_template"] = json!(t);
        }
        write_json(&dir.join("tokenizer_config.json"), &tc)?;
    }
    Ok(())
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

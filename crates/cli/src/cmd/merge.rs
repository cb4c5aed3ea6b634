//! `qlora merge`: a base plus PEFT adapters → a Hugging Face directory with the adapters merged
//! into the weights, as PEFT's `merge_and_unload` computes them (LoRA, rsLoRA, DoRA, lora_bias,
//! embedding targets, `modules_to_save`/`base_layer` replacements). A 4-bit or 8-bit base is
//! merged into its dequantized weights; `--requantize nf4|fp4` writes a bitsandbytes 4-bit
//! checkpoint again. Tensors are computed and written one at a time (extra memory near the
//! largest tensor), under a temporary name renamed when complete.

use super::outdir::{
    bnb4_specs, bnb4_tensors, copy_side_files, state_json_width, write_dir_atomically, DType,
};
use crate::load::{apply_replacements, plan_adapters, AdapterArgs, QuantType, QuantizeArgs};
use anyhow::{bail, Context, Result};
use qlora_engine::Weight;
use qlora_io::{BnbConfig, ElementType, ModelSource, StreamingWriter, TensorSpec};
use qlora_lora::merge::{merge_embedding, merge_linear};
use qlora_lora::{Adapter, EmbeddingDelta, LinearDelta, Plan, Provenance};
use qlora_model::quantize::quantize_tensor;
use qlora_model::{LoadOptions, Model, QuantizeSpec};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Merge PEFT adapters into a model and write a Hugging Face directory.
#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  qlora merge --model ./Mistral-7B-v0.1 --adapter ./checkpoint-500 --out ./mistral-merged --dtype bf16\n  qlora merge --model ./model-nf4 --adapter ./adapter --out ./merged-nf4 --requantize nf4 --double-quant"
)]
pub struct Args {
    /// Hugging Face model directory (dense, or a bitsandbytes 4-bit/8-bit, GPTQ or AWQ
    /// checkpoint).
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    quantize: QuantizeArgs,
    #[command(flatten)]
    adapter: AdapterArgs,
    /// Output directory (must not exist yet).
    #[arg(long)]
    out: PathBuf,
    /// Dtype of the written weights (default: the base's dtype, f32 for a quantized base).
    #[arg(long, value_enum)]
    dtype: Option<DType>,
    /// Quantize the merged linear layers again (a bitsandbytes 4-bit checkpoint, blocksize 64).
    /// Lossy: the merged matrix is rounded to 4 bits, as PEFT's merge on a 4-bit base does.
    #[arg(long, value_enum)]
    requantize: Option<QuantType>,
    /// Double-quantize the absmax of the requantized layers.
    #[arg(long = "requantize-double-quant", requires = "requantize")]
    requantize_double_quant: bool,
}

/// One output tensor to produce, in file order.
enum Item<'a> {
    Embedding(&'a Weight),
    Linear {
        name: String,
        w: &'a Weight,
        bias: Option<Vec<f32>>,
        quantize: bool,
    },
    Vector(String, &'a [f32]),
}

pub fn run(a: Args) -> Result<()> {
    if a.adapter.adapters.is_empty() {
        bail!("pass at least one --adapter DIR to merge");
    }
    if a.out.exists() {
        bail!(
            "{} already exists; choose a new --out directory",
            a.out.display()
        );
    }
    if !a.model.is_dir() {
        bail!(
            "{}: qlora merge reads a Hugging Face model directory; convert a .gguf first with `qlora convert`",
            a.model.display()
        );
    }
    let mut src = ModelSource::open(&a.model)?;
    let planned = plan_adapters(&src.config, &src.path, &a.adapter)?;
    apply_replacements(&mut src, &planned)?;
    let base_dtype = {
        let q = src.tensors.get("model.layers.0.self_attn.q_proj.weight");
        match q.map(|t| t.dtype) {
            Some(ElementType::F32) => Some(DType::F32),
            Some(ElementType::BF16) => Some(DType::Bf16),
            Some(ElementType::F16) => Some(DType::F16),
            _ => None,
        }
    };
    let dtype = a.dtype.or(base_dtype).unwrap_or(DType::F32);
    let model = Model::load_with(
        &mut src,
        LoadOptions {
            quantize: a.quantize.spec(),
        },
    )
    .with_context(|| format!("loading {}", a.model.display()))?;
    if model.config.tie_word_embeddings
        && planned
            .iter()
            .any(|(_, p)| p.linear.iter().any(|d| d.module == "lm_head"))
    {
        bail!("the adapter targets lm_head, but the base ties it to embed_tokens; merging would change the embedding too (not supported)");
    }
    let requant = a.requantize.map(|q| QuantizeSpec {
        quant: q.quant(),
        double_quant: a.requantize_double_quant,
        blocksize: 64,
    });
    write_dir_atomically(&a.out, |dir| {
        write_merged(&a, &model, &planned, dtype, requant, dir)
    })?;
    eprintln!(
        "merged {} adapter(s) into {}; wrote {} ({}{})",
        planned.len(),
        a.model.display(),
        a.out.display(),
        dtype.torch_name(),
        requant
            .map(|q| format!(", linear layers requantized to {}", q.quant.name()))
            .unwrap_or_default()
    );
    Ok(())
}

fn write_merged(
    a: &Args,
    model: &Model,
    planned: &[(Adapter, Plan)],
    dtype: DType,
    requant: Option<QuantizeSpec>,
    dir: &Path,
) -> Result<()> {
    let mut linear: BTreeMap<&str, Vec<&LinearDelta>> = BTreeMap::new();
    let mut embedding: Vec<&EmbeddingDelta> = Vec::new();
    for (_, plan) in planned {
        for d in &plan.linear {
            linear.entry(d.module.as_str()).or_default().push(d);
        }
        embedding.extend(&plan.embedding);
    }
    let cfg = &model.config;
    let mut items: Vec<Item> = vec![Item::Embedding(&model.embed_tokens)];
    for (i, l) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        items.push(Item::Vector(
            format!("{p}.input_layernorm.weight"),
            &l.input_layernorm,
        ));
        items.push(Item::Vector(
            format!("{p}.post_attention_layernorm.weight"),
            &l.post_attention_layernorm,
        ));
        for proj in l.projections() {
            items.push(Item::Linear {
                name: proj.name.clone(),
                w: &proj.base,
                bias: proj.bias.clone(),
                quantize: requant.is_some(),
            });
        }
    }
    items.push(Item::Vector("model.norm.weight".into(), &model.norm));
    if !cfg.tie_word_embeddings {
        items.push(Item::Linear {
            name: "lm_head".into(),
            w: &model.lm_head.base,
            bias: None,
            quantize: false,
        });
    }
    // Declare every tensor first: the header of a streamed safetensors file comes first.
    let dense = |name: String, shape: Vec<usize>| TensorSpec {
        name,
        dtype: dtype.element_type(),
        shape,
    };
    let mut specs = Vec::new();
    for it in &items {
        match it {
            Item::Embedding(w) => specs.push(dense(
                "model.embed_tokens.weight".into(),
                vec![w.rows, w.cols],
            )),
            Item::Vector(n, v) => specs.push(dense(n.clone(), vec![v.len()])),
            Item::Linear {
                name,
                w,
                bias,
                quantize,
            } => {
                let wname = format!("{name}.weight");
                match (quantize, requant) {
                    (true, Some(q)) => {
                        specs.extend(bnb4_specs(&wname, q, &[w.rows, w.cols], dtype.torch_name()))
                    }
                    _ => specs.push(dense(wname, vec![w.rows, w.cols])),
                }
                if let Some(b) = bias {
                    specs.push(dense(format!("{name}.bias"), vec![b.len()]));
                }
            }
        }
    }
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let mut out = StreamingWriter::create(&dir.join("model.safetensors"), &specs, &meta)?;
    for it in items {
        match it {
            Item::Embedding(w) => {
                let mut e = w.to_f32();
                merge_embedding(&mut e, w.rows, w.cols, &embedding);
                out.write("model.embed_tokens.weight", &dtype.encode(&e))?;
            }
            Item::Vector(n, v) => out.write(&n, &dtype.encode(v))?,
            Item::Linear {
                name,
                w,
                mut bias,
                quantize,
            } => {
                let mut values = w.to_f32();
                let deltas = linear.get(name.as_str()).cloned().unwrap_or_default();
                merge_linear(&mut values, &mut bias, w.rows, w.cols, &deltas, &name)?;
                let wname = format!("{name}.weight");
                match (quantize, requant) {
                    (true, Some(q)) => {
                        // The values bitsandbytes would quantize: the merged weight in the
                        // output dtype.
                        let rounded: Vec<f32> = match dtype {
                            DType::F32 => values,
                            _ => dtype
                                .encode(&values)
                                .chunks_exact(2)
                                .map(|c| {
                                    let bits = u16::from_le_bytes([c[0], c[1]]);
                                    if dtype == DType::Bf16 {
                                        half::bf16::from_bits(bits).to_f32()
                                    } else {
                                        half::f16::from_bits(bits).to_f32()
                                    }
                                })
                                .collect(),
                        };
                        let quantized = quantize_tensor(&rounded, q);
                        let shape = [w.rows, w.cols];
                        let width = state_json_width(q, &shape, dtype.torch_name());
                        for (spec, data) in bnb4_tensors(
                            &wname,
                            &quantized,
                            q,
                            &shape,
                            dtype.torch_name(),
                            Some(width),
                        ) {
                            out.write(&spec.name, &data)?;
                        }
                    }
                    _ => out.write(&wname, &dtype.encode(&values))?,
                }
                if let Some(b) = bias {
                    out.write(&format!("{name}.bias"), &dtype.encode(&b))?;
                }
            }
        }
    }
    out.finish()?;

    // config.json: the base's, without its quantization block (or with the new one).
    let cfg_path = a.model.join("config.json");
    let text = std::fs::read_to_string(&cfg_path)
        .with_context(|| format!("reading {}", cfg_path.display()))?;
    let mut config: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", cfg_path.display()))?;
    let obj = config
        .as_object_mut()
        .context("config.json is not a JSON object")?;
    obj.remove("quantization_config");
    if let Some(q) = requant {
        obj.insert(
            "quantization_config".into(),
            BnbConfig::transformers_4bit(q.quant, q.double_quant, dtype.torch_name()),
        );
    }
    obj.insert("torch_dtype".into(), dtype.torch_name().into());
    if obj.contains_key("dtype") {
        obj.insert("dtype".into(), dtype.torch_name().into());
    }
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config)? + "\n",
    )
    .context("writing config.json")?;
    copy_side_files(&a.model, dir)?;
    // Provenance: the base this was made from.
    Provenance {
        qlora_version: env!("CARGO_PKG_VERSION").into(),
        base_fingerprint: model.fingerprint.clone(),
        base_quantization: model.quantization.clone(),
        base_path: Some(a.model.display().to_string()),
    }
    .write(dir)
    .context("writing the provenance file")?;
    Ok(())
}

//! `qlora quantize`: a dense Hugging Face model directory → a bitsandbytes 4-bit checkpoint the
//! transformers way (every decoder linear's packed weight, absmax, quant_map, nested absmax and
//! map, quant-state JSON; config.json's `quantization_config`), so that
//! `AutoModelForCausalLM.from_pretrained(DIR)` loads it as 4-bit with no extra arguments.
//! Written under a temporary name and renamed when complete.

use super::outdir::{bnb4_tensors, copy_side_files, write_dir_atomically};
use crate::load::QuantType;
use anyhow::{bail, Context, Result};
use qlora_io::{write_safetensors, BnbConfig, ElementType, ModelSource, WriteTensor};
use qlora_model::quantize::{is_quantized_linear, quantize_tensor};
use qlora_model::{Model, QuantizeSpec};
use qlora_quant::bnb;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Quantize a model's decoder linear layers to 4-bit NF4/FP4 and write a bitsandbytes
/// checkpoint (byte-identical to transformers + bitsandbytes).
#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  qlora quantize --model ./SmolLM2-135M-Instruct --out ./SmolLM2-135M-Instruct-nf4 --type nf4 --double-quant"
)]
pub struct Args {
    /// Dense Hugging Face model directory (f32, f16 or bf16 safetensors).
    #[arg(long)]
    model: PathBuf,
    /// Output directory (must not exist yet).
    #[arg(long)]
    out: PathBuf,
    #[arg(long = "type", value_enum, default_value = "nf4")]
    quant_type: QuantType,
    /// Double-quantize the absmax (bnb_4bit_use_double_quant).
    #[arg(long)]
    double_quant: bool,
    /// Elements per absmax. transformers always uses 64. Other sizes travel in the quant state
    /// and transformers loads them, but bitsandbytes' AVX-512 CPU kernels then need each row
    /// length to be a multiple of the blocksize.
    #[arg(long, default_value_t = 64)]
    blocksize: usize,
}

fn torch_dtype(t: ElementType) -> Option<&'static str> {
    match t {
        ElementType::F32 => Some("float32"),
        ElementType::BF16 => Some("bfloat16"),
        ElementType::F16 => Some("float16"),
        _ => None,
    }
}

pub fn run(a: Args) -> Result<()> {
    if a.out.exists() {
        bail!(
            "{} already exists; choose a new --out directory",
            a.out.display()
        );
    }
    if !bnb::valid_blocksize(a.blocksize) {
        bail!(
            "--blocksize {} is not one bitsandbytes supports (a power of two from 32 to 4096; transformers uses 64)",
            a.blocksize
        );
    }
    if a.model.extension().is_some_and(|e| e == "gguf") || !a.model.is_dir() {
        bail!(
            "{}: qlora quantize reads a Hugging Face model directory; convert a .gguf first with `qlora convert --model FILE --out DIR --dtype bf16`",
            a.model.display()
        );
    }
    // Validate the whole model first (names, shapes, config) without computing anything.
    {
        let mut check = ModelSource::open(&a.model)?;
        if let Some(c) = BnbConfig::from_config(check.config.quantization_config.as_ref())
            .map_err(|r| anyhow::anyhow!("{}: {r}", a.model.join("config.json").display()))?
        {
            if c.load_in_4bit || c.load_in_8bit {
                bail!(
                    "{} is already a bitsandbytes checkpoint; quantize the dense model instead",
                    a.model.display()
                );
            }
        }
        Model::load(&mut check).with_context(|| format!("loading {}", a.model.display()))?;
    }
    let spec = QuantizeSpec {
        quant: a.quant_type.quant(),
        double_quant: a.double_quant,
        blocksize: a.blocksize,
    };
    write_dir_atomically(&a.out, |dir| write_dir(&a, spec, dir))
}

fn write_dir(a: &Args, spec: QuantizeSpec, dir: &Path) -> Result<()> {
    let src = ModelSource::open(&a.model)?;
    let names: Vec<String> = src.tensors.names().map(String::from).collect();
    let mut out: Vec<WriteTensor> = Vec::new();
    let (mut n_quantized, mut dense_bytes, mut packed_bytes) = (0usize, 0usize, 0usize);
    let mut model_dtype = None;
    for name in &names {
        let t = src.tensors.get(name).expect("listed");
        let Some(dtype_name) = torch_dtype(t.dtype) else {
            bail!(
                "{}: tensor \"{name}\" is {}; qlora quantize reads f32/f16/bf16 weights",
                src.tensors.file_of(name).unwrap_or(&a.model).display(),
                t.dtype.name()
            );
        };
        if !is_quantized_linear(name) {
            out.push(WriteTensor {
                name: name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                data: Cow::Borrowed(t.data.as_slice()),
            });
            continue;
        }
        model_dtype.get_or_insert(dtype_name);
        let q = quantize_tensor(&t.to_f32().map_err(anyhow::Error::msg)?, spec);
        n_quantized += 1;
        dense_bytes += t.data.len();
        packed_bytes += q.packed.len();
        for (spec_t, data) in bnb4_tensors(name, &q, spec, &t.shape, dtype_name, None) {
            out.push(WriteTensor {
                name: spec_t.name,
                dtype: spec_t.dtype,
                shape: spec_t.shape,
                data: Cow::Owned(data),
            });
        }
    }
    if n_quantized == 0 {
        bail!(
            "{}: no decoder linear layers (model.layers.N.self_attn.*_proj / mlp.*_proj) to quantize",
            a.model.display()
        );
    }
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(&dir.join("model.safetensors"), &out, &meta)?;

    // config.json: the original, plus the block transformers writes for a 4-bit model.
    let cfg_path = a.model.join("config.json");
    let text = std::fs::read_to_string(&cfg_path)
        .with_context(|| format!("reading {}", cfg_path.display()))?;
    let mut config: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", cfg_path.display()))?;
    let compute = model_dtype.unwrap_or("float32");
    config["quantization_config"] =
        BnbConfig::transformers_4bit(spec.quant, spec.double_quant, compute);
    let text = serde_json::to_string_pretty(&config)? + "\n";
    std::fs::write(dir.join("config.json"), text).context("writing config.json")?;

    // Tokenizer and generation files travel unchanged.
    copy_side_files(&a.model, dir)?;
    eprintln!(
        "quantized {n_quantized} linear layers to {}{} (blocksize {}): {:.1} MB → {:.1} MB packed; wrote {}",
        spec.quant.name(),
        if spec.double_quant { " with double quant" } else { "" },
        spec.blocksize,
        dense_bytes as f64 / 1e6,
        packed_bytes as f64 / 1e6,
        a.out.display()
    );
    Ok(())
}

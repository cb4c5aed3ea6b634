//! `qlora quantize`: a dense Hugging Face model directory → a bitsandbytes 4-bit checkpoint the
//! transformers way (every decoder linear's packed weight, absmax, quant_map, nested absmax and
//! map, quant-state JSON; config.json's `quantization_config`), so that
//! `AutoModelForCausalLM.from_pretrained(DIR)` loads it as 4-bit with no extra arguments.
//! Written under a temporary name and renamed when complete.

use crate::load::QuantType;
use anyhow::{bail, Context, Result};
use qlora_io::{
    quant_state_key, write_safetensors, BnbConfig, ElementType, ModelSource, NestedJson,
    QuantStateJson, RawTensor, WriteTensor,
};
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

fn widen(t: &RawTensor) -> Vec<f32> {
    let b = t.data.as_slice();
    match t.dtype {
        ElementType::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        ElementType::BF16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        ElementType::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => unreachable!("checked by the caller"),
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
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
    let tmp = a.out.with_file_name(format!(
        ".{}.partial",
        a.out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let result = write_dir(&a, spec, &tmp);
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
        return result;
    }
    std::fs::rename(&tmp, &a.out)
        .with_context(|| format!("renaming {} to {}", tmp.display(), a.out.display()))?;
    Ok(())
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
        let q = quantize_tensor(&widen(t), spec);
        n_quantized += 1;
        dense_bytes += t.data.len();
        packed_bytes += q.packed.len();
        let state = QuantStateJson {
            quant: spec.quant,
            blocksize: spec.blocksize,
            dtype: dtype_name.into(),
            shape: t.shape.clone(),
            nested: q.double.as_ref().map(|d| NestedJson {
                blocksize: bnb::NESTED_BLOCKSIZE,
                dtype: "float32".into(),
                offset: d.offset,
            }),
        };
        let push = |out: &mut Vec<WriteTensor>, suffix: &str, dtype, shape, data: Vec<u8>| {
            out.push(WriteTensor {
                name: format!("{name}{suffix}"),
                dtype,
                shape,
                data: Cow::Owned(data),
            })
        };
        let n_packed = q.packed.len();
        push(&mut out, "", ElementType::U8, vec![n_packed, 1], q.packed);
        match &q.double {
            None => push(
                &mut out,
                ".absmax",
                ElementType::F32,
                vec![q.absmax.len()],
                f32_bytes(&q.absmax),
            ),
            Some(d) => {
                push(
                    &mut out,
                    ".absmax",
                    ElementType::U8,
                    vec![d.codes.len()],
                    d.codes.clone(),
                );
                push(
                    &mut out,
                    ".nested_absmax",
                    ElementType::F32,
                    vec![d.nested_absmax.len()],
                    f32_bytes(&d.nested_absmax),
                );
                push(
                    &mut out,
                    ".nested_quant_map",
                    ElementType::F32,
                    vec![256],
                    f32_bytes(&bnb::dynamic_map()),
                );
            }
        }
        push(
            &mut out,
            ".quant_map",
            ElementType::F32,
            vec![16],
            f32_bytes(&spec.quant.code()),
        );
        let json = state.to_json().into_bytes();
        push(
            &mut out,
            &format!(".{}", quant_state_key(spec.quant)),
            ElementType::U8,
            vec![json.len()],
            json,
        );
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
    for entry in
        std::fs::read_dir(&a.model).with_context(|| format!("listing {}", a.model.display()))?
    {
        let entry = entry?;
        let fname = entry.file_name().to_string_lossy().into_owned();
        let skip = fname == "config.json"
            || fname.ends_with(".safetensors")
            || fname.ends_with(".safetensors.index.json")
            || fname.ends_with(".bin")
            || fname.starts_with('.');
        if !skip && entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), dir.join(&fname))
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
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

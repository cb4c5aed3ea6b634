//! What the commands that write model directories share: writing under a temporary name and
//! renaming when complete, carrying the tokenizer and generation files along, encoding f32
//! values to a stored dtype, and the tensors of a bitsandbytes 4-bit weight.

use anyhow::{bail, Context, Result};
use qlora_io::{quant_state_key, ElementType, NestedJson, PartialDir, QuantStateJson, TensorSpec};
use qlora_model::quantize::Quantized4;
use qlora_model::QuantizeSpec;
use qlora_quant::bnb;
use std::path::Path;

/// Runs `write` on `.<out>.partial` and renames it to `out` when it succeeds; removes it when
/// it fails, so no half-written directory is ever left under the requested name.
pub fn write_dir_atomically(out: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if out.exists() {
        bail!(
            "{} already exists; choose a new --out directory",
            out.display()
        );
    }
    let partial = PartialDir::create(out)
        .with_context(|| format!("creating a directory beside {}", out.display()))?;
    write(partial.path())?;
    partial
        .commit(false)
        .with_context(|| format!("renaming the finished directory to {}", out.display()))
}

/// Copies the tokenizer, generation and other side files of a model directory (everything but
/// config.json, weights and hidden files).
pub fn copy_side_files(src: &Path, dst: &Path) -> Result<()> {
    for entry in std::fs::read_dir(src).with_context(|| format!("listing {}", src.display()))? {
        let entry = entry?;
        let fname = entry.file_name().to_string_lossy().into_owned();
        let skip = fname == "config.json"
            || fname.ends_with(".safetensors")
            || fname.ends_with(".safetensors.index.json")
            || fname.ends_with(".bin")
            || fname.starts_with('.')
            || fname == qlora_lora::provenance::FILE;
        if !skip && entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), dst.join(&fname))
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// Output dtypes for dense tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DType {
    F32,
    Bf16,
    F16,
}

impl DType {
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::Bf16 => "bfloat16",
            DType::F16 => "float16",
        }
    }

    pub fn element_type(self) -> ElementType {
        match self {
            DType::F32 => ElementType::F32,
            DType::Bf16 => ElementType::BF16,
            DType::F16 => ElementType::F16,
        }
    }

    /// f32 values as this dtype's little-endian bytes (round to nearest even).
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            DType::F32 => bytemuck::cast_slice(values).to_vec(),
            DType::Bf16 => values
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
            DType::F16 => values
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
        }
    }
}

fn state(spec: QuantizeSpec, shape: &[usize], dtype: &str, offset: f32) -> QuantStateJson {
    QuantStateJson {
        quant: spec.quant,
        blocksize: spec.blocksize,
        dtype: dtype.into(),
        shape: shape.to_vec(),
        nested: spec.double_quant.then(|| NestedJson {
            blocksize: bnb::NESTED_BLOCKSIZE,
            dtype: "float32".into(),
            offset,
        }),
    }
}

/// The quant-state JSON of a weight; padded with spaces to `width` when given (JSON parsers,
/// bitsandbytes' included, ignore trailing whitespace), so a streaming writer can size it
/// before the offset is known.
fn state_json(
    q: &Quantized4,
    spec: QuantizeSpec,
    shape: &[usize],
    dtype: &str,
    width: Option<usize>,
) -> Vec<u8> {
    let offset = q.double.as_ref().map_or(0.0, |d| d.offset);
    let mut s = state(spec, shape, dtype, offset).to_json();
    while s.len() < width.unwrap_or(0) {
        s.push(' ');
    }
    s.into_bytes()
}

/// The longest quant-state JSON a weight can have: the offset printed with the most digits.
pub fn state_json_width(spec: QuantizeSpec, shape: &[usize], dtype: &str) -> usize {
    state(spec, shape, dtype, -1.234_567_9e-30).to_json().len() + 8
}

/// The tensors bitsandbytes stores for a 4-bit weight `name` (`P.weight`), in a fixed order:
/// packed codes, absmax, (nested absmax, nested map,) quant map, quant-state JSON.
pub fn bnb4_tensors(
    name: &str,
    q: &Quantized4,
    spec: QuantizeSpec,
    shape: &[usize],
    dtype: &str,
    json_width: Option<usize>,
) -> Vec<(TensorSpec, Vec<u8>)> {
    let t = |suffix: &str, dtype, shape: Vec<usize>, data: Vec<u8>| {
        (
            TensorSpec {
                name: format!("{name}{suffix}"),
                dtype,
                shape,
            },
            data,
        )
    };
    let mut out = vec![t(
        "",
        ElementType::U8,
        vec![q.packed.len(), 1],
        q.packed.clone(),
    )];
    match &q.double {
        None => out.push(t(
            ".absmax",
            ElementType::F32,
            vec![q.absmax.len()],
            bytemuck::cast_slice(&q.absmax).to_vec(),
        )),
        Some(d) => {
            out.push(t(
                ".absmax",
                ElementType::U8,
                vec![d.codes.len()],
                d.codes.clone(),
            ));
            out.push(t(
                ".nested_absmax",
                ElementType::F32,
                vec![d.nested_absmax.len()],
                bytemuck::cast_slice(&d.nested_absmax).to_vec(),
            ));
            out.push(t(
                ".nested_quant_map",
                ElementType::F32,
                vec![256],
                bytemuck::cast_slice(&bnb::dynamic_map()).to_vec(),
            ));
        }
    }
    out.push(t(
        ".quant_map",
        ElementType::F32,
        vec![16],
        bytemuck::cast_slice(&spec.quant.code()).to_vec(),
    ));
    let json = state_json(q, spec, shape, dtype, json_width);
    out.push(t(
        &format!(".{}", quant_state_key(spec.quant)),
        ElementType::U8,
        vec![json.len()],
        json,
    ));
    out
}

/// The specs `bnb4_tensors` will produce for a weight of `shape`, before it is computed.
pub fn bnb4_specs(name: &str, spec: QuantizeSpec, shape: &[usize], dtype: &str) -> Vec<TensorSpec> {
    let n: usize = shape.iter().product();
    let blocks = n.div_ceil(spec.blocksize);
    let mut s = vec![TensorSpec {
        name: name.into(),
        dtype: ElementType::U8,
        shape: vec![n.div_ceil(2), 1],
    }];
    let push = |s: &mut Vec<TensorSpec>, suffix: &str, dtype, shape| {
        s.push(TensorSpec {
            name: format!("{name}{suffix}"),
            dtype,
            shape,
        })
    };
    if spec.double_quant {
        push(&mut s, ".absmax", ElementType::U8, vec![blocks]);
        push(
            &mut s,
            ".nested_absmax",
            ElementType::F32,
            vec![blocks.div_ceil(bnb::NESTED_BLOCKSIZE)],
        );
        push(&mut s, ".nested_quant_map", ElementType::F32, vec![256]);
    } else {
        push(&mut s, ".absmax", ElementType::F32, vec![blocks]);
    }
    push(&mut s, ".quant_map", ElementType::F32, vec![16]);
    push(
        &mut s,
        &format!(".{}", quant_state_key(spec.quant)),
        ElementType::U8,
        vec![state_json_width(spec, shape, dtype)],
    );
    s
}

//! What the commands that write model directories share: writing under a temporary name and
//! renaming when complete, carrying the tokenizer and generation files along, and encoding f32
//! values to a stored dtype. (The tensors of a bitsandbytes 4-bit weight: `qlora_io`.)

use anyhow::{bail, Context, Result};
pub use qlora_io::{bnb4_specs, bnb4_tensors, state_json_width};
use qlora_io::{ElementType, PartialDir};
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

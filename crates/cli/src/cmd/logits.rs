//! `qlora logits`: run token ids through the model and write every position's logits.

use crate::load::{load_with_adapters, AdapterArgs, QuantizeArgs};
use anyhow::{Context, Result};
use qlora_io::{write_safetensors, ElementType, WriteTensor};
use qlora_model::Logits;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Write the logits of a token sequence to a safetensors file (`logits`, f32 [n_tokens, vocab]).
#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  qlora logits --model ./SmolLM2-135M-Instruct --tokens 1,504,3458 --out logits.safetensors"
)]
pub struct Args {
    /// Hugging Face model directory or .gguf file.
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    quantize: QuantizeArgs,
    #[command(flatten)]
    adapter: AdapterArgs,
    #[command(flatten)]
    device: crate::device::DeviceArgs,
    /// Comma-separated token ids, e.g. 1,2,3.
    #[arg(long, value_delimiter = ',', required = true)]
    tokens: Vec<u32>,
    /// Output safetensors file.
    #[arg(long)]
    out: PathBuf,
    /// Run the tokens through the model this many at a time over one KV cache (1 = as a decode
    /// loop does); the logits are the same function either way. Default: all at once.
    #[arg(long)]
    chunk: Option<usize>,
}

pub fn run(a: Args) -> Result<()> {
    refuse_model_file(&a.model, &a.out)?;
    let loaded = load_with_adapters(&a.model, a.quantize, &a.adapter)?;
    let model = &loaded.model;
    let chunk = a.chunk.unwrap_or(a.tokens.len()).max(1);
    if a.chunk == Some(0) {
        anyhow::bail!("--chunk must be at least 1");
    }
    let logits = a.device.with_decoder(model, |d| {
        let mut all = Vec::with_capacity(a.tokens.len() * model.vocab_size());
        for c in a.tokens.chunks(chunk) {
            all.extend(d.step(c, Logits::All)?);
        }
        Ok(all)
    })?;
    let t = WriteTensor {
        name: "logits".into(),
        dtype: ElementType::F32,
        shape: vec![a.tokens.len(), model.vocab_size()],
        data: std::borrow::Cow::Borrowed(bytemuck::cast_slice(&logits)),
    };
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(&a.out, &[t], &meta)
        .with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!(
        "wrote logits [{}, {}] to {}",
        a.tokens.len(),
        model.vocab_size(),
        a.out.display()
    );
    Ok(())
}

/// `--out` must not name a file of the model itself (a typo there would destroy a weight file).
fn refuse_model_file(model: &std::path::Path, out: &std::path::Path) -> Result<()> {
    let (Ok(m), Ok(o)) = (model.canonicalize(), out.canonicalize()) else {
        return Ok(()); // the output does not exist yet, or the model path is checked at load
    };
    if o == m || (m.is_dir() && o.starts_with(&m)) {
        anyhow::bail!(
            "--out {} is inside the model {} and exists; write the logits elsewhere",
            out.display(),
            model.display()
        );
    }
    Ok(())
}

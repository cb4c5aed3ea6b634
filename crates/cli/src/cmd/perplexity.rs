//! `qlora perplexity`: exp(mean negative log-likelihood) of a text, in windows of --context.

use crate::load::{encode, load_with_adapters, AdapterArgs, QuantizeArgs};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

/// Perplexity of a text file: the text is tokenized once and cut into consecutive windows of
/// --context tokens; every token after the first of a window is predicted from those before it.
#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  qlora perplexity --model ./SmolLM2-135M-Instruct --text hamlet.txt --context 512"
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
    /// UTF-8 text file.
    #[arg(long)]
    text: PathBuf,
    /// Window length in tokens (default: 512, capped by the model's max_position_embeddings).
    #[arg(long)]
    context: Option<usize>,
    /// Feed each window one token a step through the KV cache, as generation does, so the
    /// decode kernels (and their options, such as QLORA_CPU_Q8=1) make every prediction;
    /// slower. Without it each window is one forward pass (the prefill kernels).
    #[arg(long)]
    stepwise: bool,
}

pub fn run(a: Args) -> Result<()> {
    let text = std::fs::read_to_string(&a.text)
        .with_context(|| format!("reading {}", a.text.display()))?;
    let loaded = load_with_adapters(&a.model, a.quantize, &a.adapter)?;
    let tok = loaded.tokenizer(&a.model)?;
    let ids = encode(tok, &text, true)?;
    let context = a
        .context
        .unwrap_or(512)
        .min(loaded.model.config.max_position_embeddings);
    if context < 2 {
        bail!("--context must be at least 2 tokens");
    }
    if ids.len() < 2 {
        bail!("{}: the text has fewer than 2 tokens", a.text.display());
    }
    let (mut nll, mut n) = (0f64, 0usize);
    let t0 = std::time::Instant::now();
    a.device.with_decoder(&loaded.model, |d| {
        for w in ids.chunks(context) {
            let (s, c) = if a.stepwise {
                d.nll_stepwise(w)?
            } else {
                d.nll(w)?
            };
            nll += s;
            n += c;
        }
        Ok(())
    })?;
    if n == 0 {
        bail!("no token was predicted; use a larger --context");
    }
    let ppl = (nll / n as f64).exp();
    println!("{ppl:.4}");
    eprintln!(
        "perplexity {ppl:.4} over {n} predicted tokens ({} tokens, windows of {context}{}), {:.1} tok/s",
        ids.len(),
        if a.stepwise { ", one token a step" } else { "" },
        ids.len() as f64 / t0.elapsed().as_secs_f64()
    );
    Ok(())
}

//! `qlora perplexity`: exp(mean negative log-likelihood) of a text, in windows of --context.

use crate::load::{encode, load};
use anyhow::{bail, Context, Result};
use qlora_model::{KvCache, Logits, Model};
use std::path::PathBuf;

/// Perplexity of a text file: the text is tokenized once and cut into consecutive windows of
/// --context tokens; every token after the first of a window is predicted from those before it.
#[derive(clap::Args)]
#[command(after_help = "Example:\n  qlora perplexity --model ./SmolLM2-135M-Instruct --text hamlet.txt --context 512")]
pub struct Args {
    /// Hugging Face model directory or .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// UTF-8 text file.
    #[arg(long)]
    text: PathBuf,
    /// Window length in tokens (default: 512, capped by the model's max_position_embeddings).
    #[arg(long)]
    context: Option<usize>,
}

/// Σ −log p(token_i | tokens_<i) over a window, and the number of predictions.
pub fn window_nll(model: &Model, ids: &[u32]) -> Result<(f64, usize)> {
    let mut cache = KvCache::new(model);
    let logits = model.forward(ids, &mut cache, Logits::All)?;
    let v = model.vocab_size();
    let mut nll = 0f64;
    for (i, &next) in ids.iter().enumerate().skip(1) {
        let row = &logits[(i - 1) * v..i * v];
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln() + max;
        nll += lse - row[next as usize] as f64;
    }
    Ok((nll, ids.len().saturating_sub(1)))
}

pub fn run(a: Args) -> Result<()> {
    let text = std::fs::read_to_string(&a.text).with_context(|| format!("reading {}", a.text.display()))?;
    let loaded = load(&a.model)?;
    let tok = loaded.tokenizer(&a.model)?;
    let ids = encode(tok, &text, true)?;
    let context = a.context.unwrap_or(512).min(loaded.model.config.max_position_embeddings);
    if context < 2 {
        bail!("--context must be at least 2 tokens");
    }
    if ids.len() < 2 {
        bail!("{}: the text has fewer than 2 tokens", a.text.display());
    }
    let (mut nll, mut n) = (0f64, 0usize);
    let t0 = std::time::Instant::now();
    for w in ids.chunks(context) {
        let (s, c) = window_nll(&loaded.model, w)?;
        nll += s;
        n += c;
    }
    if n == 0 {
        bail!("no token was predicted; use a larger --context");
    }
    let ppl = (nll / n as f64).exp();
    println!("{ppl:.4}");
    eprintln!(
        "perplexity {ppl:.4} over {n} predicted tokens ({} tokens, windows of {context}), {:.1} tok/s",
        ids.len(),
        ids.len() as f64 / t0.elapsed().as_secs_f64()
    );
    Ok(())
}

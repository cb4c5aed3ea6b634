//! `qlora eval`: how good a model (with adapters) is on data: the mean token loss on a JSONL file
//! in any training format, and exact match of greedy chat answers against expected ones.

use crate::load::{encode, load_with_adapters, AdapterArgs, QuantizeArgs};
use anyhow::{bail, Context, Result};
use qlora_model::{generate_with, render_chat, GenerateParams, SamplingParams};
use qlora_train::data::{load_jsonl, Tokenize};
use std::path::PathBuf;

/// Eval loss on a JSONL file, and/or exact match of greedy chat answers.
#[derive(clap::Args)]
#[command(
    after_help = "--generate FILE: JSONL lines {\"prompt\": …, \"expected\": …}; each prompt is answered greedily in the chat template and compared with `expected` after trimming.\n\nExample:\n  qlora eval --model ./base-nf4 --adapter runs/demo/checkpoint-60 --data eval.jsonl --generate heldout.jsonl"
)]
pub struct Args {
    /// Hugging Face model directory or .gguf file.
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    quantize: QuantizeArgs,
    #[command(flatten)]
    adapter: AdapterArgs,
    /// The device of --generate's answers (--data's loss is computed on the CPU).
    #[command(flatten)]
    device: crate::device::DeviceArgs,
    /// JSONL in a training format: prints the mean loss of its trained tokens.
    #[arg(long)]
    data: Option<PathBuf>,
    /// JSONL of {"prompt", "expected"}: prints each answer and the exact-match score.
    #[arg(long)]
    generate: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 512)]
    max_len: usize,
    /// Print only the summary lines.
    #[arg(long)]
    quiet: bool,
}

pub fn run(a: Args) -> Result<()> {
    if a.data.is_none() && a.generate.is_none() {
        bail!("pass --data FILE (eval loss) and/or --generate FILE (exact match)");
    }
    let loaded = load_with_adapters(&a.model, a.quantize, &a.adapter)?;
    let tok = loaded.tokenizer(&a.model)?;
    let label = if a.adapter.adapters.is_empty() {
        "base".to_string()
    } else {
        "base + adapter".to_string()
    };
    if let Some(p) = &a.data {
        let tk = Tokenize {
            tok,
            eos_id: loaded.stop_ids().first().copied(),
        };
        let (data, stats) = load_jsonl(p, &tk, None, a.max_len).map_err(anyhow::Error::msg)?;
        let ad = qlora_train::Adapters::default();
        let loss = qlora_train::run::eval_loss(&loaded.model, &ad, &data);
        println!(
            "{label}: eval loss {loss:.4} over {} tokens of {} examples ({})",
            stats.trained_tokens,
            stats.examples,
            p.display()
        );
    }
    if let Some(p) = &a.generate {
        let template = tok
            .chat_template
            .as_deref()
            .context("--generate answers in the chat template, and this tokenizer has none")?;
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        let params = GenerateParams {
            max_new_tokens: a.max_new_tokens,
            sampling: SamplingParams {
                temperature: 0.0,
                top_k: 0,
                top_p: 1.0,
                repetition_penalty: 1.0,
                seed: 0,
            },
            stop: loaded.stop_ids(),
        };
        let (right, n) = a.device.with_decoder(&loaded.model, |d| {
            let (mut right, mut n) = (0, 0);
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let v: serde_json::Value = serde_json::from_str(line)
                    .with_context(|| format!("{}:{}: invalid JSON", p.display(), i + 1))?;
                let (Some(prompt), Some(expected)) = (v["prompt"].as_str(), v["expected"].as_str())
                else {
                    bail!(
                        "{}:{}: expected {{\"prompt\": …, \"expected\": …}}",
                        p.display(),
                        i + 1
                    );
                };
                let chat = render_chat(
                    template,
                    prompt,
                    tok.bos_token.as_deref(),
                    tok.eos_token.as_deref(),
                )?;
                let ids = encode(tok, &chat, false)?;
                let g = generate_with(d, &tok.tokenizer, &ids, &params, |_| {})?;
                let answer = g.text.trim();
                let ok = answer == expected.trim();
                right += ok as usize;
                n += 1;
                if !a.quiet {
                    println!("{} {answer}", if ok { "✓" } else { "✗" });
                    if !ok {
                        println!("    expected {expected}");
                    }
                }
            }
            Ok((right, n))
        })?;
        println!(
            "{label}: exact match {right}/{n} ({:.0} %) on {}",
            100.0 * right as f64 / n.max(1) as f64,
            p.display()
        );
    }
    Ok(())
}

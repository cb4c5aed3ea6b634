//! `qlora generate`: stream a completion (or a chat reply) to stdout, timings to stderr.

use crate::load::{encode, load_with_adapters, AdapterArgs, QuantizeArgs};
use anyhow::{bail, Result};
use qlora_model::{generate_with, render_chat, GenerateParams, SamplingParams};
use std::io::Write;
use std::path::PathBuf;

/// Generate text from a prompt, streaming tokens to stdout until EOS or --max-new-tokens.
#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  qlora generate --model SmolLM2-135M-Instruct.Q4_1.gguf --chat --temperature 0 \\\n      --prompt \"What is the capital of France?\""
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
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// 0 means greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches P (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// transformers' repetition penalty (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(a: Args) -> Result<()> {
    if !(a.temperature >= 0.0 && a.top_p > 0.0 && a.top_p <= 1.0 && a.repetition_penalty > 0.0) {
        bail!("--temperature must be ≥ 0, --top-p in (0, 1] and --repetition-penalty > 0");
    }
    let loaded = load_with_adapters(&a.model, a.quantize, &a.adapter)?;
    let tok = loaded.tokenizer(&a.model)?;
    let ids = if a.chat {
        let Some(template) = &tok.chat_template else {
            bail!(
                "{}: the model has no chat template (tokenizer_config.json chat_template or GGUF tokenizer.chat_template); drop --chat to use a plain prompt",
                a.model.display()
            );
        };
        let text = render_chat(
            template,
            &a.prompt,
            tok.bos_token.as_deref(),
            tok.eos_token.as_deref(),
        )?;
        // The template writes BOS itself where the model wants it (transformers does the same).
        encode(tok, &text, false)?
    } else {
        encode(tok, &a.prompt, true)?
    };
    let params = GenerateParams {
        max_new_tokens: a.max_new_tokens,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            repetition_penalty: a.repetition_penalty,
            seed: a.seed,
        },
        stop: loaded.stop_ids(),
    };
    let mut stdout = std::io::stdout().lock();
    let g = a.device.with_decoder(&loaded.model, |d| {
        Ok(generate_with(d, &tok.tokenizer, &ids, &params, |piece| {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        })?)
    })?;
    let _ = writeln!(stdout);
    eprintln!(
        "prompt {} tokens, prefill {:.1} tok/s; generated {} tokens, decode {:.1} tok/s{}",
        g.prompt_tokens,
        g.prefill_tok_s(),
        g.tokens.len(),
        g.decode_tok_s(),
        if g.stopped_at_eos {
            "; stopped at EOS"
        } else {
            ""
        }
    );
    Ok(())
}

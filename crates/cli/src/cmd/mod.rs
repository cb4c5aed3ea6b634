//! The commands and their flags (the public interface: keep names and flags stable).

mod bench;
mod convert;
mod eval;
mod export;
mod generate;
mod inspect;
mod logits;
mod merge;
mod outdir;
mod perplexity;
mod quantize;
mod serve;
mod train;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "qlora",
    version,
    about = "QLoRA for Llama/Mistral-family models: load, run, quantize (NF4/FP4, bit-exact with bitsandbytes), fine-tune LoRA (QLoRA), apply, inspect and merge PEFT adapters, convert, export to GGUF"
)]
pub struct Cli {
    /// Worker threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Logits(logits::Args),
    Generate(generate::Args),
    Perplexity(perplexity::Args),
    Convert(convert::Args),
    Quantize(quantize::Args),
    Inspect(inspect::Args),
    Merge(merge::Args),
    Export(export::Args),
    Train(Box<train::Args>),
    Eval(eval::Args),
    Bench(bench::Args),
    Serve(Box<serve::Args>),
}

/// More worker threads than this is a typo, not a machine.
const MAX_THREADS: usize = 4096;

pub fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(n) = cli.threads {
        if n == 0 || n > MAX_THREADS {
            anyhow::bail!("--threads {n}: use 1 to {MAX_THREADS}");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()?;
    }
    match cli.command {
        Command::Logits(a) => logits::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Perplexity(a) => perplexity::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Quantize(a) => quantize::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Merge(a) => merge::run(a),
        Command::Export(a) => export::run(a),
        Command::Train(a) => train::run(*a),
        Command::Eval(a) => eval::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Serve(a) => serve::run(*a),
    }
}

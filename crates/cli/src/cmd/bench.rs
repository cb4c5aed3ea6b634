//! `qlora bench`: prefill and decode tokens/s on this machine, with the weight-read bandwidth
//! decode achieves against the machine's measured read bandwidth. Medians over --repeats.

use crate::load::{load, QuantizeArgs};
use anyhow::{bail, Result};
use qlora_model::{KvCache, Logits};
use rayon::prelude::*;
use std::path::PathBuf;
use std::time::Instant;

/// Measure prefill and decode throughput (tokens/s) and achieved memory bandwidth.
#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  qlora bench --model SmolLM2-135M-Instruct.Q4_1.gguf --prompt-tokens 128 --gen-tokens 64 --repeats 5 --threads 2"
)]
pub struct Args {
    /// Hugging Face model directory or .gguf file.
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    quantize: QuantizeArgs,
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
    #[arg(long, default_value_t = 5)]
    repeats: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Read bandwidth in GB/s: parallel sums over a buffer much larger than the caches.
fn read_bandwidth() -> f64 {
    let n = 256 << 20; // 1 GiB of f32
    let buf: Vec<f32> = (0..n).into_par_iter().map(|i| (i % 7) as f32).collect();
    let runs: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            let s: f32 = buf.par_chunks(1 << 16).map(|c| c.iter().sum::<f32>()).sum();
            std::hint::black_box(s);
            (n * 4) as f64 / t.elapsed().as_secs_f64() / 1e9
        })
        .collect();
    median(runs)
}

pub fn run(a: Args) -> Result<()> {
    if a.repeats == 0 || a.prompt_tokens == 0 || a.gen_tokens == 0 {
        bail!("--repeats, --prompt-tokens and --gen-tokens must be positive");
    }
    let loaded = load(&a.model, a.quantize)?;
    let m = &loaded.model;
    let v = m.vocab_size() as u64;
    // Arbitrary in-vocabulary ids: the cost of a forward pass does not depend on them.
    let prompt: Vec<u32> = (0..a.prompt_tokens as u64)
        .map(|i| ((i * 7919 + 13) % v) as u32)
        .collect();
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    for _ in 0..a.repeats {
        let mut cache = KvCache::new(m);
        let t = Instant::now();
        m.forward(&prompt, &mut cache, Logits::Last)?;
        prefill.push(a.prompt_tokens as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        let mut id = 1u32;
        for _ in 0..a.gen_tokens {
            let l = m.forward(&[id], &mut cache, Logits::Last)?;
            id = qlora_model::Sampler::new(Default::default()).sample(&l, &[]);
        }
        decode.push(a.gen_tokens as f64 / t.elapsed().as_secs_f64());
    }
    let (p, d) = (median(prefill), median(decode));
    let bpt = m.bytes_per_token() as f64;
    let achieved = bpt * d / 1e9;
    let bw = read_bandwidth();
    println!("model            {}", a.model.display());
    println!("threads          {}", rayon::current_num_threads());
    println!("weights/token    {:.1} MB", bpt / 1e6);
    println!(
        "prefill          {p:.1} tok/s ({} tokens, median of {})",
        a.prompt_tokens, a.repeats
    );
    println!(
        "decode           {d:.1} tok/s ({} tokens after the prompt, median of {})",
        a.gen_tokens, a.repeats
    );
    println!("decode reads     {achieved:.2} GB/s of weights");
    println!("memory read bw   {bw:.2} GB/s (measured, parallel sum over 1 GiB)");
    println!("decode/bw        {:.0} %", 100.0 * achieved / bw);
    Ok(())
}

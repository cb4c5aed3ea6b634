//! `qlora bench`: prefill and decode tokens/s on this machine, with the weight-read bandwidth
//! decode achieves against the machine's measured read bandwidth. Medians over --repeats.

use crate::load::{load_with_adapters, AdapterArgs, QuantizeArgs};
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
    #[arg(long, required_unless_present = "kernels")]
    model: Option<PathBuf>,
    /// Instead of a model: NF4 dequantize and GEMV throughput at Mistral-7B's linear shapes,
    /// against the measured memory read bandwidth.
    #[arg(long)]
    kernels: bool,
    #[command(flatten)]
    quantize: QuantizeArgs,
    #[command(flatten)]
    adapter: AdapterArgs,
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
    if a.kernels {
        return kernels(a.repeats);
    }
    let model = a
        .model
        .clone()
        .expect("clap requires --model without --kernels");
    let loaded = load_with_adapters(&model, a.quantize, &a.adapter)?;
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
    println!("model            {}", model.display());
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

/// NF4 (blocksize 64, double-quantized absmax) kernels at Mistral-7B's linear shapes:
/// dequantizing whole 64-row tiles (the prefill path) and the fused GEMV (decode).
fn kernels(repeats: usize) -> Result<()> {
    use qlora_engine::{ops::linear, Weight};
    use qlora_model::quantize::quantize_tensor;
    use qlora_model::QuantizeSpec;
    use qlora_quant::Quant4;
    use std::sync::Arc;
    let bw = read_bandwidth();
    println!("threads          {}", rayon::current_num_threads());
    println!("memory read bw   {bw:.2} GB/s (measured, parallel sum over 1 GiB)");
    let spec = QuantizeSpec {
        quant: Quant4::Nf4,
        double_quant: true,
        blocksize: 64,
    };
    for (name, rows, cols) in [
        ("q_proj/o_proj", 4096usize, 4096usize),
        ("gate/up_proj", 14336, 4096),
        ("down_proj", 4096, 14336),
        ("SmolLM2 q_proj", 576, 576),
        ("SmolLM2 k_proj", 192, 576),
        ("SmolLM2 up_proj", 1536, 576),
        ("SmolLM2 down", 576, 1536),
    ] {
        let values: Vec<f32> = (0..rows * cols)
            .into_par_iter()
            .map(|i| {
                let h = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
                (h as f32 / (1u64 << 24) as f32 - 0.5) * 0.04
            })
            .collect();
        let q = quantize_tensor(&values, spec);
        drop(values);
        let absmax = q.effective_absmax();
        let w = Weight::bnb4(
            spec.quant,
            spec.quant.code(),
            64,
            rows,
            cols,
            Arc::new(q.packed),
            absmax,
        )
        .map_err(anyhow::Error::msg)?;
        let stored = w.stored_bytes() as f64;
        let mut deq = Vec::new();
        let mut gemv = Vec::new();
        let x: Vec<f32> = (0..cols).map(|i| ((i % 17) as f32 - 8.0) / 8.0).collect();
        let mut y = vec![0f32; rows];
        for _ in 0..repeats {
            let t = Instant::now();
            (0..rows.div_ceil(64)).into_par_iter().for_each_init(
                || vec![0f32; 64 * cols],
                |buf, c| {
                    let n = 64.min(rows - c * 64);
                    w.dequantize_rows(c * 64, &mut buf[..n * cols]);
                    std::hint::black_box(&buf);
                },
            );
            deq.push(t.elapsed().as_secs_f64());
            // Small matrices: time many calls so the clock is not the measurement.
            let calls = (64 << 20) / w.stored_bytes().max(1) + 1;
            let t = Instant::now();
            for _ in 0..calls {
                linear(&x, 1, &w, &mut y);
                std::hint::black_box(&y);
            }
            gemv.push(t.elapsed().as_secs_f64() / calls as f64);
        }
        let (d, g) = (median(deq), median(gemv));
        println!(
            "{name:<15} [{rows}, {cols}]  dequantize {:.2} G weights/s ({:.2} GB/s packed, {:.0} % of bw)  gemv {:.2} GB/s ({:.0} % of bw, {:.1} µs)",
            (rows * cols) as f64 / d / 1e9,
            stored / d / 1e9,
            100.0 * stored / d / 1e9 / bw,
            stored / g / 1e9,
            100.0 * stored / g / 1e9 / bw,
            g * 1e6
        );
    }
    Ok(())
}

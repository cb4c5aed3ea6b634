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
    after_help = "Examples:\n  qlora bench --model SmolLM2-135M-Instruct.Q4_1.gguf --prompt-tokens 128 --gen-tokens 64 --repeats 5 --threads 2\n  qlora bench --synthetic mistral-7b --quantize nf4 --double-quant --device cuda --prompt-tokens 2048 --batch 1,8,32,64\n  qlora bench --kernels --device cuda"
)]
pub struct Args {
    /// Hugging Face model directory or .gguf file.
    #[arg(long, required_unless_present_any = ["kernels", "synthetic"])]
    model: Option<PathBuf>,
    /// Instead of --model: random weights of a real architecture built in memory (no download):
    /// mistral-7b, llama-3-8b or smollm2-135m. The base is bf16, or 4-bit with --quantize.
    #[arg(long, conflicts_with = "model")]
    synthetic: Option<String>,
    /// With --synthetic: this many decoder layers instead of the architecture's.
    #[arg(long, requires = "synthetic")]
    layers: Option<usize>,
    /// With --synthetic: a LoRA adapter of this rank on all seven projections (unmerged).
    #[arg(long, requires = "synthetic")]
    adapter_rank: Option<usize>,
    /// GPU: batched decode at these batch sizes (aggregate tok/s), e.g. 1,8,32,64.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    batch: Vec<usize>,
    /// With --synthetic on a GPU: N different random adapters (rank --adapter-rank, default
    /// 16, all seven projections) loaded at once, each decode batch's sequences split evenly
    /// over them, as `qlora serve` batches requests for many adapters.
    #[arg(long, requires = "synthetic", default_value_t = 0)]
    mixed_adapters: usize,
    #[command(flatten)]
    device: crate::device::DeviceArgs,
    /// Instead of a model: NF4 dequantize and GEMV throughput at Mistral-7B's linear shapes,
    /// against the measured memory read bandwidth (with --device cuda: on the GPU, against its
    /// device-to-device copy bandwidth).
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
    /// Instead of inference: training steps (forward, backward, clipping, AdamW) on one
    /// micro-batch of --batch sequences of --prompt-tokens tokens, with a fresh LoRA of rank
    /// --adapter-rank (default 16) on all seven projections; tok/s, time per phase and peak
    /// device memory.
    #[arg(long)]
    train: bool,
    /// With --train on a GPU: auto, always or never (see `qlora train --recompute`).
    #[arg(long, default_value = "auto", value_parser = ["auto", "always", "never"])]
    recompute: String,
    /// With --train: the adapters' dropout probability. The default, 0, is the GPU peer's
    /// (`h200_peer.py --train`); `qlora train` defaults to 0.05.
    #[arg(long, default_value_t = 0.0, requires = "train")]
    dropout: f32,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Read bandwidth in GB/s: parallel sums over a buffer much larger than the caches, 32
/// independent lanes per thread (one running sum is an add chain, bound by the add's latency:
/// 9 GB/s where the memory gives 27 on a 2-core AVX-512 host).
fn read_bandwidth() -> f64 {
    let n = 256 << 20; // 1 GiB of f32
    let buf: Vec<f32> = (0..n).into_par_iter().map(|i| (i % 7) as f32).collect();
    let sum = |c: &[f32]| {
        let mut acc = [0f32; 32];
        for v in c.chunks_exact(32) {
            for (a, x) in acc.iter_mut().zip(v) {
                *a += x;
            }
        }
        acc.iter().sum::<f32>()
    };
    let runs: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            let s: f32 = buf.par_chunks(1 << 16).map(sum).sum();
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
    let device = a.device.resolve()?;
    if a.kernels {
        #[cfg(feature = "cuda")]
        if let qlora_engine::Device::Cuda(n) = device {
            return gpu_kernels(&a, n);
        }
        return kernels(a.repeats);
    }
    let (loaded_model, model) = match &a.synthetic {
        Some(name) => (
            synthetic(&a, name)?,
            PathBuf::from(format!("synthetic {name}")),
        ),
        None => {
            let model = a
                .model
                .clone()
                .expect("clap requires --model without --kernels or --synthetic");
            (
                load_with_adapters(&model, a.quantize, &a.adapter)?.model,
                model,
            )
        }
    };
    let m = &loaded_model;
    if a.train {
        if a.mixed_adapters > 0 {
            bail!("--mixed-adapters is for decode benchmarks; drop it with --train");
        }
        return train_bench(&a, m, &model, device);
    }
    #[cfg(feature = "cuda")]
    if let qlora_engine::Device::Cuda(n) = device {
        return gpu_bench(&a, m, &model, n);
    }
    if a.batch != [1] || a.mixed_adapters > 0 {
        bail!("--batch and --mixed-adapters are for GPU benchmarks (--device cuda)");
    }
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

/// A random model for `--synthetic NAME`.
fn synthetic(a: &Args, name: &str) -> Result<qlora_model::Model> {
    use qlora_model::synthetic::{
        synthetic_config, synthetic_model, SyntheticBase, SYNTHETIC_NAMES,
    };
    let Some(mut cfg) = synthetic_config(name) else {
        bail!(
            "--synthetic {name}: unknown architecture; use one of {}",
            SYNTHETIC_NAMES.join(", ")
        );
    };
    if let Some(l) = a.layers {
        if l == 0 {
            bail!("--layers must be positive");
        }
        cfg.num_hidden_layers = l;
    }
    if !a.adapter.adapters.is_empty() {
        bail!("--synthetic builds its own adapter (--adapter-rank R); drop --adapter");
    }
    let base = match a.quantize.spec() {
        None => SyntheticBase::Bf16,
        Some(s) => SyntheticBase::Bnb4(s.quant),
    };
    let t = Instant::now();
    // --train builds its own trainable adapter.
    let rank = if a.train || a.mixed_adapters > 0 {
        None
    } else {
        a.adapter_rank
    };
    let m = synthetic_model(cfg, base, rank, 1)?;
    eprintln!(
        "built synthetic {name} ({} layers, {base:?} base) in {:.1} s",
        m.layers.len(),
        t.elapsed().as_secs_f64()
    );
    Ok(m)
}

/// `--train`: optimizer steps on one packed micro-batch, on the CPU or a GPU.
fn train_bench(
    a: &Args,
    m: &qlora_model::Model,
    name: &std::path::Path,
    device: qlora_engine::Device,
) -> Result<()> {
    use qlora_train::run::{init_adapters, TrainOptions};
    use qlora_train::{AdamW, CpuBackend, LossBackend, Schedule};
    if !(0.0..1.0).contains(&a.dropout) {
        bail!("--dropout must be in [0, 1), got {}", a.dropout);
    }
    let batch = a.batch[0].max(1);
    let seq = a.prompt_tokens;
    let rank = a.adapter_rank.unwrap_or(16);
    let modules: Vec<String> = m
        .layers
        .iter()
        .flat_map(|l| l.projections())
        .map(|p| p.name.clone())
        .collect();
    let o = TrainOptions {
        rank,
        alpha: 2.0 * rank as f32,
        dropout: a.dropout,
        rslora: false,
        dora: false,
        lr: 1e-4,
        schedule: Schedule::Constant,
        warmup_steps: 0,
        weight_decay: 0.0,
        max_grad_norm: Some(1.0),
        steps: a.repeats,
        batch_size: batch,
        grad_accum: 1,
        save_every: None,
        eval_every: None,
        seed: 1,
        keep_activations_bytes: qlora_train::KEEP_ACTIVATIONS_BYTES,
        target_names: Vec::new(),
        base_name: String::new(),
    };
    let mut ad = init_adapters(m, &modules, &o);
    // PEFT's B = 0 would leave A's gradient zero: a small B makes every product real.
    for p in ad.params.iter_mut() {
        for (i, b) in p.b.iter_mut().enumerate() {
            *b = ((i % 7) as f32 - 3.0) * 1e-3;
        }
    }
    let v = m.vocab_size() as u64;
    let data: Vec<(Vec<u32>, Vec<Option<u32>>)> = (0..batch as u64)
        .map(|k| {
            let ids: Vec<u32> = (0..seq as u64)
                .map(|i| ((i * 7919 + k * 104_729 + 13) % v) as u32)
                .collect();
            let labels = (0..seq)
                .map(|i| (i + 1 < seq).then(|| ids[i + 1]))
                .collect();
            (ids, labels)
        })
        .collect();
    let seqs: Vec<(&[u32], &[Option<u32>])> = data.iter().map(|(i, l)| (&i[..], &l[..])).collect();
    let tokens = batch * seq;
    let mut opt = AdamW::new(&ad, 0.0);
    #[cfg(feature = "cuda")]
    let mut before = 0usize;
    let mut backend: Box<dyn LossBackend + '_> = match device {
        qlora_engine::Device::Cpu => Box::new(CpuBackend {
            model: m,
            keep_activations_bytes: o.keep_activations_bytes,
        }),
        #[cfg(feature = "cuda")]
        qlora_engine::Device::Cuda(n) => {
            let gpu = a.device.open_gpu(n)?;
            let (f, t) = gpu.mem_info()?;
            before = t - f;
            let policy: qlora_cuda::Recompute = a.recompute.parse().map_err(anyhow::Error::msg)?;
            Box::new(
                qlora_cuda::CudaTrainer::new(gpu, m, &ad, policy)
                    .map_err(|e| anyhow::anyhow!("--device cuda:{n}: {e}"))?,
            )
        }
        #[cfg(not(feature = "cuda"))]
        qlora_engine::Device::Cuda(_) => bail!("this qlora was built without the `cuda` feature"),
    };
    let noise = |s: u64| Some(qlora_train::Noise { seed: s });
    // A backend that keeps the adapters and the optimizer on its device (a GPU) runs the
    // whole step there; the CPU computes on the host adapters.
    let resident = backend.resident();
    if resident {
        backend
            .resident_load(&ad, &opt)
            .map_err(anyhow::Error::msg)?;
    }
    // One warm-up step (allocations, cuBLAS's first calls), then the timed ones.
    let (mut step_s, mut fwd_s, mut opt_s, mut losses) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for s in 0..=a.repeats {
        let t0 = Instant::now();
        if resident {
            backend.resident_loss(noise(s as u64), &seqs, tokens as f32, false)
        } else {
            backend.packed_loss(&ad, noise(s as u64), &seqs, tokens as f32, None)
        }
        .map_err(anyhow::Error::msg)?;
        let f = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let mut g = ad.zero_grads();
        let (loss, n) = if resident {
            backend.resident_zero_grads().map_err(anyhow::Error::msg)?;
            backend.resident_loss(noise(s as u64), &seqs, tokens as f32, true)
        } else {
            backend.packed_loss(&ad, noise(s as u64), &seqs, tokens as f32, Some(&mut g))
        }
        .map_err(anyhow::Error::msg)?;
        let fb = t1.elapsed().as_secs_f64();
        let t2 = Instant::now();
        if resident {
            backend
                .resident_update(&mut opt, o.lr, o.max_grad_norm)
                .map_err(anyhow::Error::msg)?;
        } else {
            qlora_train::optim::clip_grad_norm(&mut g, o.max_grad_norm);
            opt.update(&mut ad, &g, o.lr);
        }
        let u = t2.elapsed().as_secs_f64();
        if s > 0 {
            step_s.push(fb + u);
            fwd_s.push(f);
            opt_s.push(u);
            losses.push(loss / n.max(1) as f64);
        }
    }
    let step = median(step_s);
    let flops = train_flops(m, batch, seq);
    println!("model            {}", name.display());
    println!("device           {device:?}");
    println!(
        "train            batch {batch} × {seq} tokens, LoRA r={rank} on all seven projections ({} parameters), dropout {}",
        ad.params.iter().map(|p| p.a.len() + p.b.len()).sum::<usize>(),
        a.dropout
    );
    println!(
        "step             {:.1} ms ({:.0} tok/s, median of {})",
        step * 1e3,
        tokens as f64 / step,
        a.repeats
    );
    println!(
        "phases           forward alone {:.1} ms; forward+backward {:.1} ms; clip + AdamW ({}) {:.1} ms",
        median(fwd_s) * 1e3,
        (step - median(opt_s.clone())) * 1e3,
        if resident { "device" } else { "host" },
        median(opt_s) * 1e3
    );
    println!(
        "model FLOPs      {:.1} GFLOP/token (forward, input gradients, attention), {:.1} TFLOP/s achieved",
        flops / tokens as f64 / 1e9,
        flops / step / 1e12
    );
    println!(
        "losses           {}",
        losses
            .iter()
            .map(|l| format!("{l:.4}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    #[cfg(feature = "cuda")]
    if let qlora_engine::Device::Cuda(n) = device {
        let gpu = a.device.open_gpu(n)?;
        let (f, t) = gpu.mem_info()?;
        println!(
            "device memory    {:.2} GiB in use by the run (weights, adapters, activations, scratch), {:.2} GiB on the device",
            (t - f).saturating_sub(before) as f64 / (1u64 << 30) as f64,
            (t - f) as f64 / (1u64 << 30) as f64
        );
    }
    Ok(())
}

/// FLOPs of one training step over `batch` sequences of `seq` tokens with the base frozen:
/// the forward (2 per weight element per token), the input gradients (2 more), attention's
/// forward (QKᵀ, PV) and backward (twice the forward's), adapters not counted.
fn train_flops(m: &qlora_model::Model, batch: usize, seq: usize) -> f64 {
    let linear: usize = m
        .layers
        .iter()
        .flat_map(|l| l.projections())
        .map(|p| p.d_in() * p.d_out())
        .sum::<usize>()
        + m.lm_head.d_in() * m.lm_head.d_out();
    let cfg = &m.config;
    let qd = (cfg.num_attention_heads * cfg.head_dim()) as f64;
    let keys: f64 = (0..seq).map(|i| (i + 1) as f64).sum();
    let tokens = (batch * seq) as f64;
    4.0 * linear as f64 * tokens + 3.0 * 4.0 * qd * keys * batch as f64 * m.layers.len() as f64
}

/// FLOPs of one forward over `t` new tokens after `past` cached positions: 2 per weight
/// element per token in every linear layer (adapters included), plus attention's QKᵀ and PV.
fn forward_flops(m: &qlora_model::Model, t: usize, past: usize) -> f64 {
    let linear: usize = m
        .layers
        .iter()
        .flat_map(|l| l.projections())
        .map(|p| {
            p.d_in() * p.d_out()
                + p.lora
                    .iter()
                    .map(|l| l.a.rows * (p.d_in() + p.d_out()))
                    .sum::<usize>()
        })
        .sum::<usize>()
        + m.lm_head.d_in() * m.lm_head.d_out();
    let cfg = &m.config;
    let qd = (cfg.num_attention_heads * cfg.head_dim()) as f64;
    // Σ over new tokens of the keys each attends to (causal).
    let keys: f64 = (0..t).map(|i| (past + i + 1) as f64).sum();
    2.0 * linear as f64 * t as f64 + 4.0 * qd * keys * m.layers.len() as f64
}

#[cfg(feature = "cuda")]
fn gpu_kernels(a: &Args, ordinal: usize) -> Result<()> {
    let gpu = a.device.open_gpu(ordinal)?;
    println!(
        "device           cuda:{ordinal} {} (sm_{}{}, {} SMs), {:?}",
        gpu.name, gpu.arch.0, gpu.arch.1, gpu.sms, gpu.precision
    );
    let rows = qlora_cuda::bench::bench_kernels(&gpu, a.repeats.max(5))?;
    let copy = rows[0].gbps;
    for r in &rows {
        println!(
            "{:<58} {:>9.1} µs {:>8.0} GB/s {:>5.0} % of copy",
            r.name,
            r.ms * 1e3,
            r.gbps,
            100.0 * r.gbps / copy
        );
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn gpu_bench(
    a: &Args,
    m: &qlora_model::Model,
    name: &std::path::Path,
    ordinal: usize,
) -> Result<()> {
    use qlora_cuda::CudaOptions;
    const DECODE_PROMPT: usize = 16;
    let max_b = *a.batch.iter().max().unwrap_or(&1);
    if a.batch.contains(&0) {
        bail!("--batch sizes must be positive");
    }
    let gpu = a.device.open_gpu(ordinal)?;
    let opts = CudaOptions {
        max_batch_tokens: a
            .prompt_tokens
            .max(max_b)
            .max(DECODE_PROMPT * max_b)
            .min(8192),
        max_seqs: max_b,
        kv_tokens: a.prompt_tokens
            + 64
            + max_b * (DECODE_PROMPT + a.gen_tokens + 2 * qlora_cuda::KV_BLOCK),
        graphs: std::env::var_os("QLORA_CUDA_GRAPHS").is_none_or(|v| v != "0"),
        prefill_attention: std::env::var_os("QLORA_CUDA_PREFILL_ATTN").is_none_or(|v| v != "0"),
    };
    let t = Instant::now();
    let mut cm = qlora_cuda::CudaModel::upload(gpu, m, opts)
        .map_err(|e| anyhow::anyhow!("--device cuda:{ordinal}: {e}"))?;
    let upload_s = t.elapsed().as_secs_f64();
    let (free, total) = cm.gpu.mem_info()?;
    println!("model            {}", name.display());
    println!(
        "device           cuda:{ordinal} {} (sm_{}{}), {:?}, graphs {}",
        cm.gpu.name,
        cm.gpu.arch.0,
        cm.gpu.arch.1,
        cm.gpu.precision,
        if opts.graphs { "on" } else { "off" }
    );
    println!(
        "upload           {upload_s:.1} s; GPU memory used {:.1} GiB of {:.1}",
        (total - free) as f64 / (1u64 << 30) as f64,
        total as f64 / (1u64 << 30) as f64
    );
    println!("weights/token    {:.1} MB", cm.weight_bytes as f64 / 1e6);
    // Serving's mixed batch: adapter sets 1..=N beside the bare base.
    let n_sets = a.mixed_adapters;
    if n_sets > 0 {
        let r = a.adapter_rank.unwrap_or(16);
        let t = Instant::now();
        for k in 0..n_sets {
            let am = qlora_model::synthetic::with_synthetic_lora(m, r, 77 + k as u64);
            cm.add_adapters(&am)
                .map_err(|e| anyhow::anyhow!("cuda:{ordinal}: {e}"))?;
        }
        println!(
            "adapters         {n_sets} of rank {r} on all seven projections, uploaded in {:.1} s; a batch's sequences split evenly over them",
            t.elapsed().as_secs_f64()
        );
    }
    // Sequence i of a batch of b runs with set 1 + i·N / b (contiguous groups), or 0.
    let set_of = |i: usize, b: usize| if n_sets == 0 { 0 } else { 1 + i * n_sets / b };
    let v = m.vocab_size() as u64;
    let ids = |n: usize, salt: u64| -> Vec<u32> {
        (0..n as u64)
            .map(|i| ((i * 7919 + 13 + salt * 104729) % v) as u32)
            .collect()
    };
    let err = |e: qlora_cuda::Error| anyhow::anyhow!("cuda:{ordinal}: {e}");
    // Prefill.
    let prompt = ids(a.prompt_tokens, 0);
    let mut runs = Vec::new();
    for r in 0..a.repeats + 1 {
        let mut s = cm.new_seq();
        let t = Instant::now();
        cm.forward(&mut [(&mut s, &prompt)], Logits::Last)
            .map_err(err)?;
        if r > 0 {
            runs.push(t.elapsed().as_secs_f64());
        }
        cm.free_seq(&mut s);
    }
    let p = median(runs);
    let flops = forward_flops(m, a.prompt_tokens, 0);
    println!(
        "prefill          {:.0} tok/s ({} tokens, {:.1} ms, {:.0} TFLOP/s, median of {})",
        a.prompt_tokens as f64 / p,
        a.prompt_tokens,
        p * 1e3,
        flops / p / 1e12,
        a.repeats
    );
    // Decode at each batch size: DECODE_PROMPT-token prompts, then greedy steps of one token each.
    for &b in &a.batch {
        let mut runs = Vec::new();
        for r in 0..a.repeats + 1 {
            let mut seqs: Vec<qlora_cuda::Seq> = (0..b)
                .map(|i| cm.new_seq_with(set_of(i, b)))
                .collect::<std::result::Result<_, _>>()
                .map_err(err)?;
            let prompts: Vec<Vec<u32>> = (0..b).map(|i| ids(DECODE_PROMPT, i as u64 + 1)).collect();
            let mut batch: Vec<(&mut qlora_cuda::Seq, &[u32])> = seqs
                .iter_mut()
                .zip(&prompts)
                .map(|(s, p)| (s, p.as_slice()))
                .collect();
            let logits = cm.forward(&mut batch, Logits::Last).map_err(err)?;
            let mut next: Vec<[u32; 1]> = logits
                .chunks(v as usize)
                .map(|l| [qlora_model::sampling_argmax(l)])
                .collect();
            let t = Instant::now();
            for _ in 0..a.gen_tokens {
                let mut batch: Vec<(&mut qlora_cuda::Seq, &[u32])> = seqs
                    .iter_mut()
                    .zip(&next)
                    .map(|(s, n)| (s, n.as_slice()))
                    .collect();
                let ids = cm.step_greedy(&mut batch).map_err(err)?;
                next = ids.into_iter().map(|i| [i]).collect();
            }
            if r > 0 {
                runs.push(t.elapsed().as_secs_f64());
            }
            for s in seqs.iter_mut() {
                cm.free_seq(s);
            }
        }
        let d = median(runs);
        let steps = a.gen_tokens as f64 / d;
        println!(
            "decode batch {b:<3} {:.0} tok/s aggregate ({:.1} steps/s, {} tokens each, median of {}); weights read {:.2} TB/s",
            steps * b as f64,
            steps,
            a.gen_tokens,
            a.repeats,
            cm.weight_bytes as f64 * steps / 1e12
        );
    }
    Ok(())
}

/// Median seconds to widen a weight to f32 in 64-row tiles (the prefill path) and of one
/// single-token product with it (decode), over `repeats` runs.
fn time_widen_and_gemv(w: &qlora_engine::Weight, repeats: usize) -> (f64, f64) {
    let (rows, cols) = (w.rows, w.cols);
    let (mut deq, mut gemv) = (Vec::new(), Vec::new());
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
            qlora_engine::ops::linear(&x, 1, w, &mut y);
            std::hint::black_box(&y);
        }
        gemv.push(t.elapsed().as_secs_f64() / calls as f64);
    }
    (median(deq), median(gemv))
}

/// NF4 (blocksize 64, double-quantized absmax) kernels at Mistral-7B's linear shapes:
/// dequantizing whole 64-row tiles (the prefill path) and the fused GEMV (decode); then the
/// GPTQ/AWQ int4 GEMV, fused and widened.
fn kernels(repeats: usize) -> Result<()> {
    use qlora_engine::Weight;
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
        let (d, g) = time_widen_and_gemv(&w, repeats);
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
    // GPTQ/AWQ int4, group size 128: the fused decode dot on contiguous groups, and on an
    // act-order checkpoint (columns sorted by group at load, the input permuted per call).
    for (name, rows, cols) in [
        ("q_proj/o_proj", 4096usize, 4096usize),
        ("down_proj", 4096, 14336),
    ] {
        let groups = cols / 128;
        let codes: Vec<u8> = (0..rows * cols / 2)
            .map(|i| ((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
            .collect();
        let codes = Arc::new(codes);
        for act_order in [false, true] {
            let g_idx: Vec<u32> = (0..cols)
                .map(|c| {
                    if act_order {
                        // A permutation of the columns (7919 is prime to both widths).
                        ((c * 7919) % cols / 128) as u32
                    } else {
                        (c / 128) as u32
                    }
                })
                .collect();
            let scales = vec![0.01f32; rows * groups];
            let zeros = vec![8f32; rows * groups];
            let w = Weight::grouped(
                4,
                rows,
                cols,
                codes.clone(),
                qlora_engine::Groups::new(g_idx, groups, scales, zeros),
            )
            .map_err(anyhow::Error::msg)?;
            let stored = w.stored_bytes() as f64;
            let (d, g) = time_widen_and_gemv(&w, repeats);
            println!(
                "{name:<15} [{rows}, {cols}]  gptq int4 g128 {}  dequantize {:.2} G weights/s  gemv {:.2} GB/s ({:.0} % of bw, {:.1} µs)",
                if act_order { "act-order" } else { "         " },
                (rows * cols) as f64 / d / 1e9,
                stored / g / 1e9,
                100.0 * stored / g / 1e9 / bw,
                g * 1e6
            );
        }
    }
    Ok(())
}

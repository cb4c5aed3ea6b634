//! `qlora train`: LoRA fine-tuning on a frozen base (dense, or quantized at load to NF4/FP4 as
//! bitsandbytes does), writing PEFT checkpoints, metrics and a loss plot.

use crate::load::{load, plan_adapters, AdapterArgs, QuantizeArgs};
use anyhow::{bail, Context, Result};
use qlora_lora::{ModelShapes, Targets};
use qlora_train::data::{load_jsonl, Tokenize};
use qlora_train::run::{init_adapters, read_optimizer, Progress, TrainOptions};
use qlora_train::{AdamW, Schedule};
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Sched {
    Constant,
    Linear,
    Cosine,
}

/// Fine-tune LoRA adapters on a frozen base and write PEFT checkpoints.
#[derive(clap::Args)]
#[command(
    args_override_self = true,
    after_help = "Config: --config FILE.toml holds the same options as `key = value` lines (rank = 16, targets = [\"q_proj\", \"v_proj\"], double_quant = true, …); flags given on the command line override it.\n\nData: JSONL lines {\"text\"}, {\"prompt\",\"completion\"} or {\"messages\":[{\"role\",\"content\"}]}, or any fields with --template.\n\nExample:\n  qlora train --model ./SmolLM2-135M-Instruct --quantize nf4 --double-quant --data train.jsonl \\\n      --eval-data eval.jsonl --out runs/notes --rank 16 --alpha 32 --targets all-linear --steps 200"
)]
pub struct Args {
    /// A flat TOML file with any of these options (`key = value`); flags override it.
    #[arg(long, value_name = "FILE.toml")]
    config: Option<PathBuf>,
    /// Hugging Face model directory or .gguf file (the frozen base).
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    quantize: QuantizeArgs,
    /// Training data (JSONL).
    #[arg(long)]
    data: PathBuf,
    /// Run directory: checkpoint-N/, final/, metrics.jsonl, loss.svg.
    #[arg(long)]
    out: PathBuf,
    /// Format each line's fields into one text, e.g. "### A note: {note}" (all tokens trained).
    #[arg(long)]
    template: Option<String>,
    #[arg(long, default_value_t = 8)]
    rank: usize,
    #[arg(long, default_value_t = 16.0)]
    alpha: f32,
    /// Dropout on the adapter input.
    #[arg(long, default_value_t = 0.05)]
    dropout: f32,
    /// Comma-separated module names (q_proj,v_proj,…, lm_head) or all-linear.
    #[arg(long, default_value = "all-linear")]
    targets: String,
    /// Scale by alpha/√r (rsLoRA) instead of alpha/r.
    #[arg(long)]
    rslora: bool,
    /// DoRA: also train a magnitude per output row (PEFT's use_dora).
    #[arg(long)]
    dora: bool,
    #[arg(long, default_value_t = 2e-4)]
    lr: f32,
    #[arg(long, value_enum, default_value = "linear")]
    schedule: Sched,
    #[arg(long, default_value_t = 0)]
    warmup_steps: usize,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    /// Clip the global gradient norm (0 = off).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f32,
    /// Optimizer steps (default: one epoch).
    #[arg(long, conflicts_with = "epochs")]
    steps: Option<usize>,
    #[arg(long)]
    epochs: Option<usize>,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Longer examples are truncated (and counted).
    #[arg(long, default_value_t = 512)]
    max_len: usize,
    /// Memory (MiB) for keeping each micro-batch's layer activations from the forward pass to
    /// the backward; a micro-batch that needs more recomputes each layer from its input instead
    /// (about a quarter slower on SmolLM2, the same results to the bit). 0 always recomputes.
    #[arg(long, default_value_t = 512)]
    keep_activations_mb: usize,
    #[arg(long)]
    save_every: Option<usize>,
    #[arg(long)]
    eval_data: Option<PathBuf>,
    #[arg(long)]
    eval_every: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Start from this PEFT adapter instead of a fresh one.
    #[arg(long, conflicts_with = "resume")]
    init_adapter: Option<PathBuf>,
    /// Continue a run from one of its checkpoints (same flags as the original run).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Where to train: cpu, cuda (GPU 0), cuda:N, or auto (GPU 0 when the NVIDIA driver
    /// reports one, else cpu).
    #[arg(long, default_value = "cpu", value_parser = crate::device::parse_device)]
    device: qlora_engine::DeviceRequest,
    /// GPU arithmetic: bf16 (bf16 products with the base, f32 adapters and accumulation; the
    /// default) or f32 (no TF32; the CPU's gradients within 1e-4, for checking).
    #[arg(long, value_parser = ["bf16", "f32"])]
    precision: Option<String>,
    /// GPU: keep every layer's activations for the backward (never recompute), recompute each
    /// layer from its input (always: least memory), or keep them when they fit in the free
    /// GPU memory (auto). The same results to the bit either way. The CPU uses
    /// --keep-activations-mb instead.
    #[arg(long, default_value = "auto", value_parser = ["auto", "always", "never"])]
    recompute: String,
    /// Data-parallel training on several GPUs of this host, e.g. 0,1: one process per GPU,
    /// each with the frozen base and a replica of the adapters; each step's micro-batches are
    /// split over them (--grad-accum counts per GPU, so a step takes batch-size · grad-accum ·
    /// GPUs sequences) and their gradients summed in rank order. With --device cuda.
    #[arg(long, value_delimiter = ',', conflicts_with = "dist_addr")]
    gpus: Vec<usize>,
    /// One rank of a data-parallel run over several processes or hosts (what --gpus starts on
    /// one host): rank 0 listens at HOST:PORT and the other ranks connect to it. Every rank
    /// runs the same command but for --dist-rank and its --device; only rank 0 writes --out.
    #[arg(long, value_name = "HOST:PORT", requires_all = ["dist_rank", "dist_world"])]
    dist_addr: Option<String>,
    /// This process's rank (0 … --dist-world − 1).
    #[arg(long, requires = "dist_addr")]
    dist_rank: Option<usize>,
    /// The number of ranks.
    #[arg(long, requires = "dist_addr")]
    dist_world: Option<usize>,
    /// Seconds a rank waits for the others (to join, and at each gradient sum) before it
    /// stops with an error naming the rank it waited for.
    #[arg(long, default_value_t = 600)]
    dist_timeout: u64,
}

pub fn run(a: Args) -> Result<()> {
    if !a.gpus.is_empty() {
        return spawn_ranks(&a);
    }
    if a.rank == 0 || a.batch_size == 0 || a.grad_accum == 0 || a.max_len < 2 {
        bail!("--rank, --batch-size and --grad-accum must be positive and --max-len at least 2");
    }
    if !(0.0..1.0).contains(&a.dropout) {
        bail!("--dropout must be in [0, 1)");
    }
    if !(a.lr.is_finite() && a.lr > 0.0) {
        bail!("--lr must be a positive finite number, not {}", a.lr);
    }
    if !a.alpha.is_finite() || a.alpha == 0.0 {
        bail!("--alpha must be a finite nonzero number, not {}", a.alpha);
    }
    let finite_nonneg = |v: f32| v.is_finite() && v >= 0.0;
    if !finite_nonneg(a.weight_decay) || !finite_nonneg(a.max_grad_norm) {
        bail!("--weight-decay and --max-grad-norm must be finite and ≥ 0");
    }
    if a.save_every == Some(0) || a.eval_every == Some(0) {
        bail!("--save-every and --eval-every count steps and must be at least 1");
    }
    let world = a.dist_world.unwrap_or(1);
    let dist_rank = a.dist_rank.unwrap_or(0);
    if world == 0 || dist_rank >= world {
        bail!("--dist-rank {dist_rank} must be below --dist-world {world}");
    }
    // Ranks above 0 say only what goes wrong.
    let quiet = dist_rank > 0;
    let say = |s: String| {
        if !quiet {
            eprintln!("{s}");
        }
    };
    let loaded = load(&a.model, a.quantize)?;
    let model = &loaded.model;
    let tok = loaded.tokenizer(&a.model)?;
    let eos_id = loaded.stop_ids().first().copied();
    let tk = Tokenize { tok, eos_id };
    let (data, stats) =
        load_jsonl(&a.data, &tk, a.template.as_deref(), a.max_len).map_err(anyhow::Error::msg)?;
    say(format!(
        "data: {} examples, {} tokens ({} trained){}",
        stats.examples,
        stats.tokens,
        stats.trained_tokens,
        if stats.truncated > 0 {
            format!(", {} truncated to --max-len {}", stats.truncated, a.max_len)
        } else {
            String::new()
        }
    ));
    let eval = match &a.eval_data {
        Some(p) => {
            load_jsonl(p, &tk, a.template.as_deref(), a.max_len)
                .map_err(anyhow::Error::msg)?
                .0
        }
        None => Vec::new(),
    };
    // Which modules get adapters.
    let shapes = ModelShapes::from_config(&model.config);
    let (targets, names): (Targets, Vec<String>) = if a.targets == "all-linear" {
        let all = qlora_io::LAYER_LINEARS.map(qlora_io::short_name);
        (
            Targets::List(all.iter().map(|s| s.to_string()).collect()),
            all.iter().map(|s| s.to_string()).collect(),
        )
    } else {
        let l: Vec<String> = a
            .targets
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        (Targets::List(l.clone()), l)
    };
    let modules: Vec<String> = shapes
        .linears
        .keys()
        .filter(|m| targets.matches(m))
        .cloned()
        .collect();
    if modules.is_empty() {
        bail!("--targets {} matches no linear module of this model (e.g. q_proj, v_proj, down_proj, lm_head)", a.targets);
    }
    if model.config.tie_word_embeddings && modules.iter().any(|m| m == "lm_head") {
        bail!(
            "--targets includes lm_head, but this model ties it to embed_tokens; not supported yet"
        );
    }
    let per_step = a.batch_size * a.grad_accum * world;
    let steps = a
        .steps
        .unwrap_or_else(|| a.epochs.unwrap_or(1) * data.len().div_ceil(per_step));
    let o = TrainOptions {
        rank: a.rank,
        alpha: a.alpha,
        dropout: a.dropout,
        rslora: a.rslora,
        dora: a.dora,
        lr: a.lr,
        schedule: match a.schedule {
            Sched::Constant => Schedule::Constant,
            Sched::Linear => Schedule::Linear,
            Sched::Cosine => Schedule::Cosine,
        },
        warmup_steps: a.warmup_steps,
        weight_decay: a.weight_decay,
        max_grad_norm: (a.max_grad_norm > 0.0).then_some(a.max_grad_norm),
        steps,
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        save_every: a.save_every,
        eval_every: a
            .eval_every
            .or(a.eval_data.as_ref().map(|_| steps.div_ceil(10).max(1))),
        seed: a.seed,
        keep_activations_bytes: a.keep_activations_mb.saturating_mul(1 << 20),
        target_names: names,
        base_name: a.model.display().to_string(),
    };
    let from = a.resume.as_ref().or(a.init_adapter.as_ref());
    let mut ad = match from {
        None => init_adapters(model, &modules, &o),
        Some(dir) => {
            let one = AdapterArgs {
                adapters: vec![dir.clone()],
                strict: false,
            };
            let planned = plan_adapters(&model.config, &a.model, &one)?;
            let (adapter, plan) = planned.first().context("no adapter found")?;
            if a.resume.is_some() {
                check_resume_matches(adapter, plan, &a, &modules)?;
            }
            qlora_train::adapters_from_plan(plan, a.dropout).map_err(anyhow::Error::msg)?
        }
    };
    ad.dropout = a.dropout;
    let mut opt = AdamW::new(&ad, a.weight_decay);
    let start = match &a.resume {
        Some(dir) => read_optimizer(dir, &ad, &mut opt).map_err(anyhow::Error::msg)?,
        None => 0,
    };
    if start >= steps && a.resume.is_some() {
        bail!(
            "--resume: the checkpoint is at step {start} and the run has {steps} steps; nothing to do (raise --steps to train further)"
        );
    }
    let trainable: usize = ad.params.iter().map(|p| p.a.len() + p.b.len()).sum();
    say(format!(
        "training {} adapters ({} parameters, rank {}) on {} for {} steps of {} sequences{}{}",
        ad.params.len(),
        trainable,
        a.rank,
        qlora_train::run::describe_base(&a.model, model.quantization.as_ref()),
        steps,
        per_step,
        if world > 1 {
            format!(" over {world} data-parallel ranks")
        } else {
            String::new()
        },
        if start > 0 {
            format!(", resuming at step {start}")
        } else {
            String::new()
        }
    ));
    let mut group = match &a.dist_addr {
        Some(addr) => Some(
            qlora_train::dist::TcpGroup::join(
                addr,
                dist_rank,
                world,
                std::time::Duration::from_secs(a.dist_timeout.max(1)),
            )
            .map_err(anyhow::Error::msg)?,
        ),
        None => None,
    };
    let dev = crate::device::DeviceArgs {
        device: a.device,
        precision: a.precision.clone(),
        kv_tokens: None,
    };
    let device = dev.resolve()?;
    let mut backend: Box<dyn qlora_train::LossBackend> = match device {
        qlora_engine::Device::Cpu => Box::new(qlora_train::CpuBackend {
            model,
            keep_activations_bytes: o.keep_activations_bytes,
        }),
        #[cfg(feature = "cuda")]
        qlora_engine::Device::Cuda(n) => {
            let gpu = dev.open_gpu(n)?;
            let policy: qlora_cuda::Recompute = a.recompute.parse().map_err(anyhow::Error::msg)?;
            let t0 = std::time::Instant::now();
            let mut gt = qlora_cuda::CudaTrainer::new(gpu.clone(), model, &ad, policy)
                .map_err(|e| anyhow::anyhow!("--device cuda:{n}: {e}"))?;
            if let Some(grp) = group.as_mut().filter(|_| world > 1) {
                // Rank 0 decides (NCCL found and not turned off) and gives the others the
                // communicator's id, or nothing: then every rank sums through the host.
                use qlora_train::dist::Collective;
                let mut id = Vec::new();
                if dist_rank == 0
                    && qlora_cuda::nccl_present()
                    && std::env::var_os("QLORA_NCCL").is_none_or(|v| v != "0")
                {
                    id = qlora_cuda::nccl_unique_id()
                        .map_err(|e| anyhow::anyhow!("{e}"))?
                        .to_vec();
                }
                grp.broadcast(&mut id).map_err(anyhow::Error::msg)?;
                if let Ok(id) = <[u8; 128]>::try_from(id.as_slice()) {
                    let comm = qlora_cuda::NcclComm::new(gpu.clone(), id, dist_rank, world)
                        .map_err(|e| anyhow::anyhow!("rank {dist_rank}, cuda:{n}: {e}"))?;
                    gt.set_comm(comm);
                    say(format!(
                        "{world} ranks: gradients summed by NCCL on the GPUs"
                    ));
                } else {
                    say(format!(
                        "{world} ranks: gradients summed through the host (NCCL not found or QLORA_NCCL=0)"
                    ));
                }
            }
            say(format!(
                "cuda:{n}: {} (sm_{}{}), {:?}, kernels compiled in {:.2} s, base uploaded in {:.2} s",
                gpu.name,
                gpu.arch.0,
                gpu.arch.1,
                gpu.precision,
                gpu.compile_s,
                t0.elapsed().as_secs_f64()
            ));
            Box::new(gt)
        }
        #[cfg(not(feature = "cuda"))]
        qlora_engine::Device::Cuda(_) => {
            bail!("this qlora was built without the `cuda` feature; rebuild with `cargo build --release --features cuda` or use --device cpu")
        }
    };
    let mut view = ProgressView::new(start, steps);
    let r = qlora_train::run::train_ranks(
        backend.as_mut(),
        group
            .as_mut()
            .map(|g| g as &mut dyn qlora_train::dist::Collective),
        model,
        &mut ad,
        &mut opt,
        &data,
        &eval,
        &o,
        &a.out,
        start,
        &mut |p| view.show(p),
    );
    view.bar.finish_and_clear();
    r.map_err(anyhow::Error::msg)
}

/// `--gpus`: this command again once per GPU, as the ranks of a data-parallel group meeting on
/// a free local port; waits for them, and when one fails stops the others and says which.
fn spawn_ranks(a: &Args) -> Result<()> {
    match a.device {
        qlora_engine::DeviceRequest::Exactly(qlora_engine::Device::Cuda(_)) => {}
        _ => bail!("--gpus lists GPUs for data-parallel training: use it with --device cuda"),
    }
    let mut seen = std::collections::BTreeSet::new();
    if let Some(g) = a.gpus.iter().find(|g| !seen.insert(**g)) {
        bail!("--gpus lists GPU {g} twice: one process per GPU");
    }
    // A free port for the ranks' group (bound, then released for rank 0 to bind).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("finding a free local port for the ranks")?
        .port();
    let addr = format!("127.0.0.1:{port}");
    // The command line again without --gpus and --device.
    let mut base: Vec<String> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(x) = args.next() {
        if x == "--gpus" || x == "--device" {
            args.next();
        } else if !(x.starts_with("--gpus=") || x.starts_with("--device=")) {
            base.push(x);
        }
    }
    let exe = std::env::current_exe().context("finding the qlora binary to start the ranks")?;
    let world = a.gpus.len();
    let mut children = Vec::new();
    for (r, g) in a.gpus.iter().enumerate() {
        let child = std::process::Command::new(&exe)
            .args(&base)
            .args(["--device", &format!("cuda:{g}")])
            .args(["--dist-addr", &addr])
            .args([
                "--dist-rank",
                &r.to_string(),
                "--dist-world",
                &world.to_string(),
            ])
            .spawn()
            .with_context(|| format!("starting rank {r} (cuda:{g})"))?;
        children.push((r, *g, child));
    }
    let mut failed: Option<String> = None;
    while !children.is_empty() {
        let mut i = 0;
        while i < children.len() {
            let (r, g, c) = &mut children[i];
            match c.try_wait()? {
                Some(status) => {
                    if !status.success() && failed.is_none() {
                        failed = Some(format!("rank {r} (cuda:{g}) failed ({status})"));
                    }
                    children.swap_remove(i);
                }
                None => i += 1,
            }
        }
        if failed.is_some() {
            for (_, _, c) in children.iter_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
            children.clear();
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    match failed {
        Some(f) => bail!("{f}; the other ranks were stopped (its error is above)"),
        None => Ok(()),
    }
}

/// `train`'s progress on stderr: an indicatif bar redrawn in place on a terminal (eval results
/// and the end printed above it as lines), one line per step otherwise (logs, CI).
struct ProgressView {
    bar: indicatif::ProgressBar,
    terminal: bool,
}

impl ProgressView {
    fn new(start: usize, steps: usize) -> Self {
        let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let bar = if terminal {
            let b = indicatif::ProgressBar::new(steps as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template("[{bar:24}] {pos}/{len} {msg}")
                    .expect("a valid template")
                    .progress_chars("#> "),
            );
            b.set_position(start as u64);
            b
        } else {
            indicatif::ProgressBar::hidden()
        };
        ProgressView { bar, terminal }
    }

    fn show(&mut self, p: Progress) {
        let line = |s: String| {
            if self.terminal {
                self.bar.println(s);
            } else {
                eprintln!("{s}");
            }
        };
        match p {
            Progress::Start { steps, eval_loss } => {
                line(format!("step 0/{steps} eval_loss {eval_loss:.4}"))
            }
            Progress::Step {
                step,
                steps,
                loss,
                eval_loss,
                lr,
                grad_norm,
                tokens_per_s,
                eta_s,
            } => {
                let eval = eval_loss
                    .map(|e| format!(" eval_loss {e:.4}"))
                    .unwrap_or_default();
                let status = format!(
                    "loss {loss:.4}{eval} lr {lr:.2e} grad_norm {grad_norm:.3} {tokens_per_s:.0} tok/s ETA {eta_s:.0}s"
                );
                if self.terminal {
                    self.bar.set_position(step as u64);
                    self.bar.set_message(status.clone());
                    if eval_loss.is_some() {
                        line(format!("step {step}/{steps} {status}"));
                    }
                } else {
                    line(format!("step {step}/{steps} {status}"));
                }
            }
            Progress::Done {
                steps,
                secs,
                tokens_per_s,
                adapter,
            } => {
                self.bar.finish_and_clear();
                eprintln!(
                    "trained {steps} steps in {secs:.1}s ({tokens_per_s:.0} tok/s); adapter in {}",
                    adapter.display()
                );
            }
        }
    }
}

/// `--resume` continues a run: its options must be the checkpoint's, or the new checkpoints'
/// config would contradict their tensors (rank, targets) or silently change the scaling.
fn check_resume_matches(
    adapter: &qlora_lora::Adapter,
    plan: &qlora_lora::Plan,
    a: &Args,
    modules: &[String],
) -> Result<()> {
    let c = &adapter.config;
    let mut diffs = Vec::new();
    if c.r != a.rank {
        diffs.push(format!("rank {} (--rank {})", c.r, a.rank));
    }
    if (c.lora_alpha - a.alpha as f64).abs() > 1e-9 * c.lora_alpha.abs().max(1.0) {
        diffs.push(format!("alpha {} (--alpha {})", c.lora_alpha, a.alpha));
    }
    if c.use_dora != a.dora {
        diffs.push(format!("use_dora {} (--dora {})", c.use_dora, a.dora));
    }
    if c.use_rslora != a.rslora {
        diffs.push(format!(
            "use_rslora {} (--rslora {})",
            c.use_rslora, a.rslora
        ));
    }
    let mut have: Vec<&str> = plan.linear.iter().map(|d| d.module.as_str()).collect();
    let mut want: Vec<&str> = modules.iter().map(|m| m.as_str()).collect();
    have.sort_unstable();
    want.sort_unstable();
    if have != want {
        diffs.push(format!(
            "{} adapted modules ({} with --targets {})",
            have.len(),
            want.len(),
            a.targets
        ));
    }
    if !diffs.is_empty() {
        bail!(
            "--resume {}: the checkpoint was trained with other options: {}; pass the run's own options (or its --config) to continue it, or start a new run with --init-adapter",
            adapter.dir.display(),
            diffs.join(", ")
        );
    }
    Ok(())
}

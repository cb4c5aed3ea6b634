//! The training loop and its run directory: checkpoints as PEFT adapter directories (with the
//! provenance sidecar, the optimizer and trainer state beside them), `final/`, `metrics.jsonl`
//! and `loss.svg`. Every directory and file is written under a temporary name and renamed.

use crate::backend::{CpuBackend, LossBackend};
use crate::data::Example;
use crate::dist::Collective;
use crate::grad::{Adapters, Grads, LoraParam, Noise};
use crate::optim::{clip_grad_norm, AdamW, Schedule};
use crate::{Error, Result};
use qlora_io::{write_peft_adapter, write_safetensors, ElementType, PeftLoraConfig, WriteTensor};
use qlora_lora::{BaseQuantization, Provenance};
use qlora_model::Model;
use serde_json::json;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub rank: usize,
    pub alpha: f32,
    pub dropout: f32,
    pub rslora: bool,
    /// DoRA: a trainable magnitude per output row, initialized to ‖W‖ (PEFT's init with B = 0).
    pub dora: bool,
    pub lr: f32,
    pub schedule: Schedule,
    pub warmup_steps: usize,
    pub weight_decay: f32,
    pub max_grad_norm: Option<f32>,
    pub steps: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub save_every: Option<usize>,
    pub eval_every: Option<usize>,
    pub seed: u64,
    /// Budget for keeping activations from forward to backward (`packed_loss`).
    pub keep_activations_bytes: usize,
    /// Leaf names written as `target_modules`.
    pub target_names: Vec<String>,
    pub base_name: String,
}

/// splitmix64: seeded, portable, the one source of randomness for init and shuffling.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// PEFT's default init for new adapters: A Kaiming-uniform with a = √5 (bound 1/√fan_in),
/// B zero, so training starts from the base model exactly.
pub fn init_adapters(model: &Model, modules: &[String], o: &TrainOptions) -> Adapters {
    let mut rng = Rng::new(o.seed);
    let mut params = Vec::new();
    let projections = model
        .layers
        .iter()
        .flat_map(|l| l.projections())
        .chain(std::iter::once(&model.lm_head));
    for p in projections {
        if !modules.contains(&p.name) {
            continue;
        }
        let (d_out, d_in, r) = (p.d_out(), p.d_in(), o.rank);
        let bound = 1.0 / (d_in as f32).sqrt();
        let a = (0..r * d_in)
            .map(|_| (rng.f32() * 2.0 - 1.0) * bound)
            .collect();
        let scaling = if o.rslora {
            o.alpha / (r as f32).sqrt()
        } else {
            o.alpha / r as f32
        };
        let magnitude = o.dora.then(|| {
            let w = p.base.to_f32();
            w.chunks(d_in)
                .map(|row| {
                    row.iter()
                        .map(|v| (*v as f64) * (*v as f64))
                        .sum::<f64>()
                        .sqrt() as f32
                })
                .collect()
        });
        params.push(LoraParam {
            module: p.name.clone(),
            rank: r,
            d_in,
            d_out,
            scaling,
            a,
            b: vec![0f32; d_out * r],
            magnitude,
        });
    }
    Adapters::new(params, o.dropout)
}

/// The order examples are visited in: a fresh permutation per epoch, from the seed.
fn example_at(n: usize, seed: u64, cursor: usize) -> usize {
    let epoch = cursor / n;
    let mut perm: Vec<usize> = (0..n).collect();
    let mut rng = Rng::new(seed ^ 0xA5A5_5A5A ^ (epoch as u64).wrapping_mul(0x1000_0000_01B3));
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        perm.swap(i, j);
    }
    perm[cursor % n]
}

/// Writes a directory under a temporary name and renames it into place, replacing an older
/// one of the same name.
fn write_dir_atomic(dir: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let err = |e: std::io::Error| Error::file(dir, e);
    let partial = qlora_io::PartialDir::create(dir).map_err(err)?;
    write(partial.path())?;
    partial.commit(true).map_err(err)
}

/// A PEFT adapter directory: adapter_config.json (only the fields old PEFT knows, plus
/// use_rslora when set), adapter_model.safetensors (f32), and the provenance sidecar.
pub fn write_adapter(dir: &Path, ad: &Adapters, o: &TrainOptions, model: &Model) -> Result<()> {
    let mut tensors = Vec::new();
    for p in &ad.params {
        tensors.push(WriteTensor {
            name: format!("base_model.model.{}.lora_A.weight", p.module),
            dtype: ElementType::F32,
            shape: vec![p.rank, p.d_in],
            data: std::borrow::Cow::Borrowed(bytemuck::cast_slice(&p.a)),
        });
        tensors.push(WriteTensor {
            name: format!("base_model.model.{}.lora_B.weight", p.module),
            dtype: ElementType::F32,
            shape: vec![p.d_out, p.rank],
            data: std::borrow::Cow::Borrowed(bytemuck::cast_slice(&p.b)),
        });
        if let Some(m) = &p.magnitude {
            tensors.push(WriteTensor {
                name: format!("base_model.model.{}.lora_magnitude_vector", p.module),
                dtype: ElementType::F32,
                shape: vec![p.d_out],
                data: std::borrow::Cow::Borrowed(bytemuck::cast_slice(m)),
            });
        }
    }
    let mut cfg =
        PeftLoraConfig::causal_lm(o.rank, o.alpha as f64, o.dropout as f64, &o.target_names);
    cfg.base_model_name_or_path = o.base_name.clone();
    cfg.use_rslora = o.rslora;
    cfg.use_dora = ad.params.iter().any(|p| p.magnitude.is_some());
    write_peft_adapter(dir, &tensors, &cfg)?;
    Provenance {
        qlora_version: env!("CARGO_PKG_VERSION").into(),
        base_fingerprint: model.fingerprint.clone(),
        base_quantization: model.quantization.clone(),
        base_path: Some(o.base_name.clone()),
    }
    .write(dir)
    .map_err(|e| Error::Invalid(e.to_string()))
}

fn write_checkpoint(
    dir: &Path,
    ad: &Adapters,
    opt: &AdamW,
    o: &TrainOptions,
    model: &Model,
    step: usize,
) -> Result<()> {
    write_dir_atomic(dir, |d| {
        write_adapter(d, ad, o, model)?;
        let mut t = Vec::new();
        for (i, p) in ad.params.iter().enumerate() {
            let mut parts = vec![
                ("A", &opt.m.a[i], &opt.v.a[i], vec![p.rank, p.d_in]),
                ("B", &opt.m.b[i], &opt.v.b[i], vec![p.d_out, p.rank]),
            ];
            if p.magnitude.is_some() {
                parts.push(("magnitude_vector", &opt.m.m[i], &opt.v.m[i], vec![p.d_out]));
            }
            for (kind, m, v, shape) in parts {
                t.push(WriteTensor {
                    name: format!("exp_avg.{}.lora_{kind}", p.module),
                    dtype: ElementType::F32,
                    shape: shape.clone(),
                    data: std::borrow::Cow::Borrowed(bytemuck::cast_slice(m)),
                });
                t.push(WriteTensor {
                    name: format!("exp_avg_sq.{}.lora_{kind}", p.module),
                    dtype: ElementType::F32,
                    shape,
                    data: std::borrow::Cow::Borrowed(bytemuck::cast_slice(v)),
                });
            }
        }
        let meta = BTreeMap::from([("optimizer_step".to_string(), opt.step.to_string())]);
        write_safetensors(&d.join("optimizer.safetensors"), &t, &meta)?;
        let state = json!({"global_step": step, "seed": o.seed, "optimizer": "AdamW",
                           "lr": o.lr, "weight_decay": o.weight_decay});
        let state_path = d.join("trainer_state.json");
        std::fs::write(
            &state_path,
            serde_json::to_string_pretty(&state).expect("json") + "\n",
        )
        .map_err(|e| Error::file(&state_path, e))
    })
}

/// Restores the optimizer state and step from a checkpoint written by `write_checkpoint`.
pub fn read_optimizer(dir: &Path, ad: &Adapters, opt: &mut AdamW) -> Result<usize> {
    let f = qlora_io::SafetensorsFile::open(&dir.join("optimizer.safetensors"))?;
    let get = |name: &str| -> Result<Vec<f32>> {
        f.tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| {
                Error::Invalid(format!("{}: optimizer state lacks {name}", dir.display()))
            })?
            .to_f32()
            .map_err(|r| Error::Invalid(format!("{}: {name}: {r}", dir.display())))
    };
    for (i, p) in ad.params.iter().enumerate() {
        opt.m.a[i] = get(&format!("exp_avg.{}.lora_A", p.module))?;
        opt.v.a[i] = get(&format!("exp_avg_sq.{}.lora_A", p.module))?;
        opt.m.b[i] = get(&format!("exp_avg.{}.lora_B", p.module))?;
        opt.v.b[i] = get(&format!("exp_avg_sq.{}.lora_B", p.module))?;
        if p.magnitude.is_some() {
            opt.m.m[i] = get(&format!("exp_avg.{}.lora_magnitude_vector", p.module))?;
            opt.v.m[i] = get(&format!("exp_avg_sq.{}.lora_magnitude_vector", p.module))?;
        }
    }
    opt.step = f
        .metadata
        .get("optimizer_step")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("trainer_state.json"))
            .map_err(|e| Error::file(dir, e))?,
    )
    .map_err(|e| Error::Invalid(format!("{}: trainer_state.json: {e}", dir.display())))?;
    state["global_step"]
        .as_u64()
        .map(|s| s as usize)
        .ok_or_else(|| {
            Error::Invalid(format!(
                "{}: trainer_state.json lacks global_step",
                dir.display()
            ))
        })
}

/// The loss curve as an SVG line chart (training loss, and eval loss points).
fn loss_svg(train: &[(usize, f64)], eval: &[(usize, f64)]) -> String {
    let (w, h, pad) = (640.0, 360.0, 48.0);
    let all: Vec<f64> = train.iter().chain(eval).map(|p| p.1).collect();
    let (lo, hi) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(*v), b.max(*v)));
    let hi = if hi > lo { hi } else { lo + 1.0 };
    let max_step = train
        .iter()
        .chain(eval)
        .map(|p| p.0)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let x = |s: usize| pad + (s as f64 / max_step) * (w - 2.0 * pad);
    let y = |v: f64| h - pad - (v - lo) / (hi - lo) * (h - 2.0 * pad);
    let pts: Vec<String> = train
        .iter()
        .map(|(s, v)| format!("{:.1},{:.1}", x(*s), y(*v)))
        .collect();
    let dots: String = eval
        .iter()
        .map(|(s, v)| {
            format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"#d62728\"/>",
                x(*s),
                y(*v)
            )
        })
        .collect();
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\
<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\
<line x1=\"{pad}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"#333\"/><line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{b}\" stroke=\"#333\"/>\
<text x=\"{pad}\" y=\"{t}\">loss {hi:.3}</text><text x=\"{pad}\" y=\"{bl}\">{lo:.3}</text><text x=\"{r}\" y=\"{bl}\" text-anchor=\"end\">step {max_step}</text>\
<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\" points=\"{}\"/>{dots}\
<text x=\"{r}\" y=\"{t}\" text-anchor=\"end\" fill=\"#1f77b4\">train</text><text x=\"{r}\" y=\"{t2}\" text-anchor=\"end\" fill=\"#d62728\">eval</text></svg>\n",
        pts.join(" "),
        b = h - pad,
        r = w - pad,
        t = pad - 16.0,
        t2 = pad - 2.0,
        bl = h - pad + 16.0,
    )
}

/// Mean loss over examples, no gradients, no dropout, on the CPU.
pub fn eval_loss(model: &Model, ad: &Adapters, data: &[Example]) -> f64 {
    let mut cpu = CpuBackend {
        model,
        keep_activations_bytes: 0,
    };
    eval_loss_on(&mut cpu, ad, data).expect("the CPU backend does not fail")
}

/// Mean loss over examples, no gradients, no dropout, one example a pass.
pub fn eval_loss_on(backend: &mut dyn LossBackend, ad: &Adapters, data: &[Example]) -> Result<f64> {
    let (mut total, mut n) = (0.0, 0usize);
    for e in data {
        let (l, c) = backend.packed_loss(ad, None, &[(&e.ids, &e.labels)], 1.0, None)?;
        total += l;
        n += c;
    }
    Ok(total / n.max(1) as f64)
}

/// What `train` reports as it goes (the library prints nothing; the binary draws these).
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// The eval loss before the first step of a new run.
    Start { steps: usize, eval_loss: f64 },
    /// A step is done (its checkpoint, if any, is written next).
    Step {
        step: usize,
        steps: usize,
        loss: f64,
        eval_loss: Option<f64>,
        lr: f32,
        grad_norm: f32,
        tokens_per_s: f64,
        eta_s: f64,
    },
    /// The run is complete; `tokens_per_s` over the whole run.
    Done {
        steps: usize,
        secs: f64,
        tokens_per_s: f64,
        adapter: std::path::PathBuf,
    },
}

/// Trains on the CPU from `start_step` to `o.steps`, writing the run directory and reporting
/// each step to `on_progress`.
#[allow(clippy::too_many_arguments)]
pub fn train(
    model: &Model,
    ad: &mut Adapters,
    opt: &mut AdamW,
    data: &[Example],
    eval: &[Example],
    o: &TrainOptions,
    out: &Path,
    start_step: usize,
    on_progress: &mut dyn FnMut(Progress),
) -> Result<()> {
    let mut cpu = CpuBackend {
        model,
        keep_activations_bytes: o.keep_activations_bytes,
    };
    train_on(
        &mut cpu,
        model,
        ad,
        opt,
        data,
        eval,
        o,
        out,
        start_step,
        on_progress,
    )
}

/// `train` with the losses and gradients computed by `backend` (`model` is the base the
/// checkpoints describe; the backend holds its own copy of it, on its device).
#[allow(clippy::too_many_arguments)]
pub fn train_on(
    backend: &mut dyn LossBackend,
    model: &Model,
    ad: &mut Adapters,
    opt: &mut AdamW,
    data: &[Example],
    eval: &[Example],
    o: &TrainOptions,
    out: &Path,
    start_step: usize,
    on_progress: &mut dyn FnMut(Progress),
) -> Result<()> {
    train_ranks(
        backend,
        None,
        model,
        ad,
        opt,
        data,
        eval,
        o,
        out,
        start_step,
        on_progress,
    )
}

/// The adapters' gradients as one vector (every A in the adapters' order, then every B).
fn flatten(g: &Grads) -> Vec<f32> {
    g.a.iter().chain(&g.b).flatten().copied().collect()
}

fn unflatten(v: &[f32], g: &mut Grads) {
    let mut at = 0;
    for t in g.a.iter_mut().chain(g.b.iter_mut()) {
        let n = t.len();
        t.copy_from_slice(&v[at..at + n]);
        at += n;
    }
}

/// `train_on` as one rank of a data-parallel run (`dist`: the ranks' group; None: alone).
/// A step takes `batch_size · grad_accum · world` examples, the same as one process with
/// `grad_accum · world` micro-batches: rank r computes micro-batches r, r + world, …, the
/// ranks' gradients and losses are summed (in rank order, `dist::Collective`), and every rank
/// applies the same update to identical adapters. Only rank 0 writes the run directory and
/// reports progress; every rank must be given the same options, data and start.
#[allow(clippy::too_many_arguments)]
pub fn train_ranks<'d>(
    backend: &mut dyn LossBackend,
    mut dist: Option<&mut (dyn Collective + 'd)>,
    model: &Model,
    ad: &mut Adapters,
    opt: &mut AdamW,
    data: &[Example],
    eval: &[Example],
    o: &TrainOptions,
    out: &Path,
    start_step: usize,
    on_progress: &mut dyn FnMut(Progress),
) -> Result<()> {
    let rank = dist.as_ref().map_or(0, |d| d.rank());
    if rank > 0 {
        return follow(backend, dist, ad, opt, data, o, start_step);
    }
    let metrics_path = out.join("metrics.jsonl");
    if start_step == 0 && out.is_dir() {
        let taken = std::fs::read_dir(out)
            .map_err(|e| Error::file(out, e))?
            .filter_map(|e| e.ok())
            .any(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n == "metrics.jsonl" || n == "final" || n.starts_with("checkpoint-")
            });
        if taken {
            return Err(Error::Invalid(format!(
                "{}: already holds a training run (metrics.jsonl, checkpoints); continue it with --resume {}/checkpoint-N, or choose a new --out",
                out.display(),
                out.display()
            )));
        }
    }
    std::fs::create_dir_all(out).map_err(|e| Error::file(out, e))?;
    // Checkpoints a killed run left half-written (`.checkpoint-N.partial`): ours, never complete.
    for e in std::fs::read_dir(out)
        .map_err(|e| Error::file(out, e))?
        .flatten()
    {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with('.') && n.ends_with(".partial") && e.path().is_dir() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    if start_step > 0 && metrics_path.exists() {
        // A resumed run rewrites the steps after its checkpoint: drop their old lines.
        let text =
            std::fs::read_to_string(&metrics_path).map_err(|e| Error::file(&metrics_path, e))?;
        let kept: String = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_none_or(|s| s as usize <= start_step)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&metrics_path, kept).map_err(|e| Error::file(&metrics_path, e))?;
    }
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out.join("metrics.jsonl"))
        .map_err(|e| Error::file(&metrics_path, e))?;
    let (mut curve, mut eval_curve) = (Vec::new(), Vec::new());
    // A backend holding the adapters and optimizer on its device takes them once here.
    let resident = backend.resident();
    if resident {
        backend.resident_load(ad, opt)?;
    }
    let eval_now = |backend: &mut dyn LossBackend, ad: &Adapters| -> Result<f64> {
        if !resident {
            return eval_loss_on(backend, ad, eval);
        }
        let (mut total, mut n) = (0.0, 0usize);
        for e in eval {
            let (l, c) = backend.resident_loss(None, &[(&e.ids, &e.labels)], 1.0, false)?;
            total += l;
            n += c;
        }
        Ok(total / n.max(1) as f64)
    };
    if start_step == 0 && o.eval_every.is_some() && !eval.is_empty() {
        // The starting point, so a run shows whether it helped.
        let el = eval_now(backend, ad)?;
        writeln!(metrics, "{}", json!({"step": 0, "eval_loss": el}))
            .map_err(|e| Error::file(&metrics_path, e))?;
        eval_curve.push((0, el));
        on_progress(Progress::Start {
            steps: o.steps,
            eval_loss: el,
        });
    }
    let started = Instant::now();
    let mut tokens_done = 0usize;
    for step in start_step..o.steps {
        let t0 = Instant::now();
        let StepDone {
            batch,
            loss,
            lr,
            grad_norm,
        } = ranks_step(backend, dist.as_deref_mut(), ad, opt, data, o, step)?;
        if !loss.is_finite() || !grad_norm.is_finite() {
            // Stop before the update: the adapter and the checkpoints on disk stay as they were.
            let last = (1..=step)
                .rev()
                .find(|s| {
                    o.save_every.is_some_and(|e| s % e == 0)
                        && out.join(format!("checkpoint-{s}")).is_dir()
                })
                .map(|s| {
                    format!(
                        "; the last checkpoint is {}",
                        out.join(format!("checkpoint-{s}")).display()
                    )
                })
                .unwrap_or_default();
            return Err(Error::NonFinite {
                step: step + 1,
                loss,
                grad_norm,
                last,
            });
        }
        let seq_tokens: usize = batch.iter().map(|e| e.ids.len()).sum();
        tokens_done += seq_tokens;
        let tps = seq_tokens as f64 / t0.elapsed().as_secs_f64();
        let done = step + 1;
        let mut line = json!({"step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                              "tokens_per_s": tps, "tokens": seq_tokens});
        if let Some(every) = o.eval_every {
            if !eval.is_empty() && (done % every == 0 || done == o.steps) {
                let el = eval_now(backend, ad)?;
                line["eval_loss"] = json!(el);
                eval_curve.push((done, el));
            }
        }
        writeln!(metrics, "{line}").map_err(|e| Error::file(&metrics_path, e))?;
        curve.push((done, loss));
        let svg = loss_svg(&curve, &eval_curve);
        let tmp = out.join(".loss.svg.tmp");
        std::fs::write(&tmp, svg)
            .and_then(|_| std::fs::rename(&tmp, out.join("loss.svg")))
            .map_err(|e| Error::file(&out.join("loss.svg"), e))?;
        let elapsed = started.elapsed().as_secs_f64();
        let eta = elapsed / (done - start_step) as f64 * (o.steps - done) as f64;
        on_progress(Progress::Step {
            step: done,
            steps: o.steps,
            loss,
            eval_loss: line.get("eval_loss").and_then(|v| v.as_f64()),
            lr,
            grad_norm,
            tokens_per_s: tps,
            eta_s: eta,
        });
        if o.save_every.is_some_and(|e| done % e == 0) || done == o.steps {
            if resident {
                backend.resident_store(ad, opt)?;
            }
            write_checkpoint(
                &out.join(format!("checkpoint-{done}")),
                ad,
                opt,
                o,
                model,
                done,
            )?;
        }
    }
    if resident {
        backend.resident_store(ad, opt)?;
    }
    write_dir_atomic(&out.join("final"), |d| write_adapter(d, ad, o, model))?;
    let secs = started.elapsed().as_secs_f64();
    on_progress(Progress::Done {
        steps: o.steps - start_step,
        secs,
        tokens_per_s: tokens_done as f64 / secs.max(1e-9),
        adapter: out.join("final"),
    });
    Ok(())
}

/// This rank's share of a step's micro-batches (`train_ranks`): the summed loss over all
/// ranks, and the summed gradients (in `Grads` off the device; None when the backend keeps
/// them resident, where they are summed in place).
fn rank_gradients<'d>(
    backend: &mut dyn LossBackend,
    dist: Option<&mut (dyn Collective + 'd)>,
    ad: &Adapters,
    batch: &[&Example],
    o: &TrainOptions,
    step: usize,
) -> Result<(f64, Option<Grads>)> {
    let (rank, world) = dist.as_ref().map_or((0, 1), |d| (d.rank(), d.world()));
    let resident = backend.resident();
    let n_tok: usize = batch.iter().map(|e| e.trained_tokens()).sum();
    let mut g = if resident {
        backend.resident_zero_grads()?;
        None
    } else {
        Some(ad.zero_grads())
    };
    let mut total = 0.0;
    // Each micro-batch of `batch_size` sequences is packed into one pass; rank r takes
    // micro-batches r, r + world, … (the noise seed is the micro-batch's index in the step).
    for (k, micro) in batch.chunks(o.batch_size).enumerate() {
        if k % world != rank {
            continue;
        }
        let noise = Noise {
            seed: o.seed ^ ((step as u64) << 20) ^ k as u64,
        };
        let seqs: Vec<(&[u32], &[Option<u32>])> =
            micro.iter().map(|e| (&e.ids[..], &e.labels[..])).collect();
        total += match g.as_mut() {
            Some(g) => backend.packed_loss(ad, Some(noise), &seqs, n_tok as f32, Some(g))?,
            None => backend.resident_loss(Some(noise), &seqs, n_tok as f32, true)?,
        }
        .0;
    }
    if let Some(d) = dist {
        let mut t = [total];
        d.all_reduce_sum_f64(&mut t)?;
        total = t[0];
        match g.as_mut() {
            Some(g) => {
                let mut flat = flatten(g);
                d.all_reduce_sum(&mut flat)?;
                unflatten(&flat, g);
            }
            None if d.world() == 1 || backend.resident_all_reduce()? => {}
            None => {
                let mut flat = Vec::new();
                backend.resident_grads(&mut flat)?;
                d.all_reduce_sum(&mut flat)?;
                backend.resident_set_grads(&flat)?;
            }
        }
    }
    Ok((total, g))
}

/// What one step of `train_ranks` did.
struct StepDone<'a> {
    /// The step's examples (every rank's).
    batch: Vec<&'a Example>,
    /// The mean loss over the step's trained tokens, the learning rate, the gradient norm
    /// before clipping.
    loss: f64,
    lr: f32,
    grad_norm: f32,
}

/// One optimizer step on every rank alike: this rank's micro-batches, the sums over the ranks,
/// then clipping and AdamW, unless the loss or the gradient norm is not finite (then nothing
/// is updated and the caller stops).
fn ranks_step<'a, 'd>(
    backend: &mut dyn LossBackend,
    dist: Option<&mut (dyn Collective + 'd)>,
    ad: &mut Adapters,
    opt: &mut AdamW,
    data: &'a [Example],
    o: &TrainOptions,
    step: usize,
) -> Result<StepDone<'a>> {
    let world = dist.as_ref().map_or(1, |d| d.world());
    let per_step = o.batch_size * o.grad_accum * world;
    let batch: Vec<&Example> = (0..per_step)
        .map(|k| &data[example_at(data.len(), o.seed, step * per_step + k)])
        .collect();
    let n_tok: usize = batch.iter().map(|e| e.trained_tokens()).sum();
    let (total, mut g) = rank_gradients(backend, dist, ad, &batch, o, step)?;
    let loss = total / n_tok as f64;
    let lr = o.lr * o.schedule.factor(step, o.warmup_steps, o.steps) as f32;
    // On the device the update happens here, unless the norm is not finite.
    let grad_norm = match g.as_mut() {
        Some(g) => clip_grad_norm(g, o.max_grad_norm),
        None if loss.is_finite() => backend.resident_update(opt, lr, o.max_grad_norm)?,
        None => f32::NAN,
    };
    if loss.is_finite() && grad_norm.is_finite() {
        if let Some(g) = &g {
            opt.update(ad, g, lr);
        }
    }
    Ok(StepDone {
        batch,
        loss,
        lr,
        grad_norm,
    })
}

/// A rank above 0 of `train_ranks`: the same steps and updates as rank 0, writing nothing.
fn follow<'d>(
    backend: &mut dyn LossBackend,
    mut dist: Option<&mut (dyn Collective + 'd)>,
    ad: &mut Adapters,
    opt: &mut AdamW,
    data: &[Example],
    o: &TrainOptions,
    start_step: usize,
) -> Result<()> {
    if backend.resident() {
        backend.resident_load(ad, opt)?;
    }
    for step in start_step..o.steps {
        let s = ranks_step(backend, dist.as_deref_mut(), ad, opt, data, o, step)?;
        if !s.loss.is_finite() || !s.grad_norm.is_finite() {
            // Rank 0 sees the same sums and reports it with its last checkpoint.
            return Err(Error::NonFinite {
                step: step + 1,
                loss: s.loss,
                grad_norm: s.grad_norm,
                last: String::new(),
            });
        }
    }
    Ok(())
}

/// What a run needs to know about the base for `TrainOptions::base_name` and warnings.
pub fn describe_base(path: &Path, q: Option<&BaseQuantization>) -> String {
    format!("{} ({})", path.display(), BaseQuantization::describe(q))
}

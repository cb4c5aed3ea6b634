//! `qlora serve`: an OpenAI-compatible server for one base and many adapters, chosen per
//! request by `model`.

use crate::device::DeviceArgs;
use crate::load::{
    apply_planned, load, load_with_adapters, plan_adapters, AdapterArgs, QuantizeArgs,
};
use anyhow::{bail, Context, Result};
use qlora_engine::Device;
use qlora_model::Model;
use qlora_serve::{serve, AdapterLoader, Backend, CpuBackend, Limits, ServeConfig, Served};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

/// Serve the base and its adapters over HTTP with the OpenAI API (chat and text completions,
/// streaming, /v1/models), a request's `model` naming the base or an adapter.
#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  qlora serve --model SmolLM2-135M-Instruct --quantize nf4 \\\n      --adapter support=runs/support/final --adapter-dir adapters/ --port 8000\n  curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\\n      -d '{\"model\": \"support\", \"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}'"
)]
pub struct Args {
    /// Hugging Face model directory or .gguf file.
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    quantize: QuantizeArgs,
    /// An adapter to serve: NAME=DIR, or DIR (named by its directory). Repeatable.
    #[arg(long = "adapter", value_name = "NAME=DIR")]
    adapters: Vec<String>,
    /// Serve every adapter directory (one holding adapter_config.json) inside DIR, named by
    /// its subdirectory.
    #[arg(long, value_name = "DIR")]
    adapter_dir: Option<PathBuf>,
    /// The base's name in requests and /v1/models (default: the model's file or directory name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Make adapter provenance mismatches errors (another base, or another quantization).
    #[arg(long)]
    strict: bool,
    /// Enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's endpoints): clients
    /// may then make the server read adapter directories by path.
    #[arg(long)]
    allow_runtime_adapters: bool,
    /// Where generation runs (`--device cuda`: the base uploaded once, every adapter beside
    /// it, all requests in one batch; `--kv-tokens` sizes the shared KV cache).
    #[command(flatten)]
    device: DeviceArgs,
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// TCP port (0 picks a free one; the address is printed).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Requests generated at once; the others wait in the queue.
    #[arg(long, default_value_t = 8)]
    max_concurrent: usize,
    /// Requests that may wait; beyond it the server answers 429.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Most prompt tokens a request may have (default: the model's context).
    #[arg(long)]
    max_prompt_tokens: Option<usize>,
    /// Most tokens a request may generate (and the default when it sets no max_tokens).
    #[arg(long, default_value_t = 1024)]
    max_tokens: usize,
    /// Largest request body in bytes; beyond it the server answers 413.
    #[arg(long, default_value_t = 1 << 20)]
    max_body_bytes: usize,
    /// Prompt tokens prefilled per step, so a long prompt does not stall running streams.
    #[arg(long, default_value_t = 256)]
    prefill_chunk: usize,
}

pub fn run(a: Args) -> Result<()> {
    let device = a.device.resolve()?;
    for (v, name) in [
        (a.max_concurrent, "--max-concurrent"),
        (a.max_queue, "--max-queue"),
        (a.max_tokens, "--max-tokens"),
        (a.max_body_bytes, "--max-body-bytes"),
        (a.prefill_chunk, "--prefill-chunk"),
    ] {
        if v == 0 {
            bail!("{name} must be at least 1");
        }
    }
    let mut named: Vec<(String, PathBuf)> = Vec::new();
    for spec in &a.adapters {
        let (name, dir) = match spec.split_once('=') {
            Some((n, d)) if !n.is_empty() => (n.to_string(), PathBuf::from(d)),
            Some(_) => bail!("--adapter {spec}: the name before = is empty; use NAME=DIR"),
            None => (dir_name(Path::new(spec))?, PathBuf::from(spec)),
        };
        named.push((name, dir));
    }
    if let Some(root) = &a.adapter_dir {
        let mut found: Vec<(String, PathBuf)> = std::fs::read_dir(root)
            .with_context(|| format!("--adapter-dir {}", root.display()))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.join("adapter_config.json").is_file())
            .map(|p| Ok((dir_name(&p)?, p)))
            .collect::<Result<_>>()?;
        if found.is_empty() {
            bail!(
                "--adapter-dir {}: no subdirectory holds an adapter_config.json",
                root.display()
            );
        }
        found.sort();
        named.extend(found);
    }
    let base_name = match &a.served_model_name {
        Some(n) => n.clone(),
        None => dir_name(&a.model)?,
    };
    let mut seen = std::collections::HashSet::new();
    seen.insert(base_name.clone());
    for (n, _) in &named {
        if !seen.insert(n.clone()) {
            bail!("two served models are named \"{n}\": name them apart with --adapter NAME=DIR (or --served-model-name for the base)");
        }
    }

    let mut base = load(&a.model, a.quantize)?;
    base.tokenizer(&a.model)?; // a clear error when there is none
    let stop_ids = base.stop_ids();
    let tokenizer = base.tokenizer.take().context("the model's tokenizer")?;
    let mut models = Vec::new();
    for (name, dir) in &named {
        let model = adapter_model(&base.model, &a.model, a.quantize, dir, a.strict)
            .with_context(|| format!("adapter \"{name}\""))?;
        eprintln!("adapter          {name} ({})", dir.display());
        models.push(Served {
            name: name.clone(),
            parent: Some(base_name.clone()),
            model,
        });
    }
    let loader: Option<AdapterLoader> = a.allow_runtime_adapters.then(|| {
        let (base, path, quantize, strict) =
            (base.model.clone(), a.model.clone(), a.quantize, a.strict);
        let on_gpu = device != Device::Cpu;
        Box::new(move |dir: &Path| {
            let m = adapter_model(&base, &path, quantize, dir, strict).map_err(|e| format!("{e:#}"))?;
            if on_gpu && !base.shares_base(&m) {
                return Err("this adapter replaces base weights (modules_to_save, or a trained embedding or head); on a GPU every adapter runs on the one uploaded base".into());
            }
            Ok(m)
        }) as AdapterLoader
    });
    let context = base.model.config.max_position_embeddings;
    let max_prompt_tokens = a.max_prompt_tokens.unwrap_or(context).min(context);
    let backend: Box<dyn Backend> = match device {
        Device::Cpu => Box::new(CpuBackend::default()),
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => {
            // One uploaded base serves every adapter: an adapter that replaces base weights
            // cannot share it.
            for m in &models {
                if !base.model.shares_base(&m.model) {
                    bail!(
                        "adapter \"{}\" replaces base weights (modules_to_save, or a trained embedding or head); on a GPU every adapter runs on the one uploaded base: serve it with --device cpu, or merge it (`qlora merge`) and serve the merged model",
                        m.name
                    );
                }
            }
            // Room for every running request at its longest, unless --kv-tokens says.
            let per_request = (max_prompt_tokens + a.max_tokens).min(context);
            let mut dev = a.device.clone();
            dev.kv_tokens = Some(
                a.device
                    .kv_tokens
                    .unwrap_or_else(|| (a.max_concurrent * per_request).clamp(1, 1 << 18)),
            );
            let cm = dev.upload(&base.model, n, a.max_concurrent)?;
            Box::new(crate::serve_gpu::CudaBackend::new(cm, base.model.clone()))
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => bail!(
            "this qlora was built without the `cuda` feature; rebuild with `cargo build --release --features cuda` or use --device cpu"
        ),
    };
    models.insert(
        0,
        Served {
            name: base_name.clone(),
            parent: None,
            model: base.model,
        },
    );
    let limits = Limits {
        max_concurrent: a.max_concurrent,
        max_queue: a.max_queue,
        max_prompt_tokens,
        max_tokens: a.max_tokens,
        max_body_bytes: a.max_body_bytes,
        prefill_chunk: a.prefill_chunk,
    };
    let cfg = ServeConfig {
        models,
        tokenizer,
        stop_ids,
        limits,
        loader,
        backend,
    };
    serve(
        cfg,
        SocketAddr::new(a.host, a.port),
        |addr| {
            eprintln!(
                "qlora serve: {base_name} and {} adapter(s), listening on http://{addr}",
                named.len()
            );
        },
        || eprintln!("qlora serve: shutting down (finishing running requests)"),
    )
    .with_context(|| format!("serving on {}:{}", a.host, a.port))
}

/// The base with one adapter directory on it, after the same checks as `qlora inspect`: a
/// clone sharing the base's weights, or, for an adapter that replaces base tensors
/// (modules_to_save, a trained embedding or head), its own copy of the model.
fn adapter_model(
    base: &Model,
    model_path: &Path,
    quantize: QuantizeArgs,
    dir: &Path,
    strict: bool,
) -> Result<Model> {
    let args = AdapterArgs {
        adapters: vec![dir.to_path_buf()],
        strict,
    };
    let mut planned = plan_adapters(&base.config, model_path, &args)?;
    // Copies of the base's own tensors (a tied embedding/head's base layer) change nothing.
    if planned.iter().any(|(_, p)| !p.replacements.is_empty()) {
        let src = qlora_io::ModelSource::open(model_path)?;
        qlora_model::plan::drop_unchanged_replacements(&src, &mut planned);
    }
    if planned.iter().any(|(_, p)| !p.replacements.is_empty()) {
        return Ok(load_with_adapters(model_path, quantize, &args)?.model);
    }
    let mut m = base.clone();
    apply_planned(&mut m, &planned, strict)?;
    Ok(m)
}

/// A path's last component as a served name.
fn dir_name(p: &Path) -> Result<String> {
    let p = p.components().next_back().map(|c| c.as_os_str().to_owned());
    match p.and_then(|s| s.into_string().ok()) {
        Some(s) if !s.is_empty() && s != "." && s != ".." => {
            Ok(s.strip_suffix(".gguf").unwrap_or(&s).to_string())
        }
        _ => {
            bail!("cannot name a served model after this path; use NAME=DIR or --served-model-name")
        }
    }
}

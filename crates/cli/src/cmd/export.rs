//! `qlora export --format gguf`: a model, merged with PEFT adapters when given, as one GGUF
//! file that llama.cpp, Ollama and LM Studio load (tokenizer and chat template in its metadata,
//! Q/K rows permuted back to llama.cpp's interleaved RoPE layout, weights encoded by ggml's
//! reference quantizers); or, with `--lora-only`, the adapters alone as a GGUF LoRA file for
//! `llama-cli --lora`, as llama.cpp's `convert_lora_to_gguf.py` lays it out. Tensors are computed
//! and written one at a time, into a temporary file renamed when complete.

use crate::load::{apply_replacements, plan_adapters, AdapterArgs};
use anyhow::{bail, Context, Result};
use qlora_io::{
    gguf_name, gguf_tokenizer_metadata, permute_rows, GgmlType, GgufFile, GgufTensorSpec,
    GgufValue, GgufWriter, ModelConfig, ModelSource,
};
use qlora_lora::merge::{merge_embedding, merge_linear};
use qlora_lora::{Adapter, EmbeddingDelta, LinearDelta, Plan};
use qlora_model::{LoadOptions, Model};
use qlora_quant::quantize_ggml;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Export a model (merged with adapters if given), or only its adapters, as GGUF.
#[derive(clap::Args)]
#[command(after_help = "Examples:
  qlora export --model ./Mistral-7B-v0.1 --adapter ./checkpoint-500 --type q8_0 --out mistral-ft.q8_0.gguf
  qlora export --model SmolLM2-135M-Instruct.Q4_1.gguf --adapter ./adapter --lora-only --out adapter.gguf
  llama-cli -m SmolLM2-135M-Instruct.Q4_1.gguf --lora adapter.gguf")]
pub struct Args {
    /// Hugging Face model directory (dense, or a bitsandbytes 4-bit/8-bit, GPTQ or AWQ
    /// checkpoint: its dequantized weights are exported) or .gguf file.
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    adapter: AdapterArgs,
    /// The output format (GGUF v3, llama architecture).
    #[arg(long, value_enum, default_value = "gguf")]
    format: Format,
    /// Encoding of the 2-D weights (norms are always f32). Quantized types use ggml's
    /// reference rounding, the bytes `llama-quantize --pure` writes; a matrix whose rows are
    /// not whole blocks falls back as llama-quantize does (q4_k → q5_0, q6_k → q8_0, else f16).
    /// With --lora-only: f32, f16 or bf16.
    #[arg(long = "type", value_enum, default_value = "f16")]
    ty: OutType,
    /// Encoding of the token embedding (which a tied model's head reuses). Default: --type,
    /// but q8_0 under a 4/5-bit --type (q4_k included) (llama-quantize keeps it at 6 bits or more too: the
    /// head is the most sensitive matrix). As llama-quantize's --token-embedding-type.
    #[arg(long, value_enum)]
    embedding_type: Option<OutType>,
    /// Encoding of an untied lm_head (`output.weight`); default as for --embedding-type. As
    /// llama-quantize's --output-tensor-type.
    #[arg(long, value_enum)]
    output_type: Option<OutType>,
    /// Write only the adapters (a GGUF LoRA file for llama.cpp's --lora) instead of a merged
    /// model; each adapter's scaling is folded into its B, and adapters on the same module are
    /// stacked into one of the summed rank.
    #[arg(long)]
    lora_only: bool,
    /// The .gguf file to write (must not exist yet).
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Format {
    Gguf,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq)]
enum OutType {
    F32,
    F16,
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_1")]
    Q4_1,
    #[value(name = "q5_0")]
    Q5_0,
    #[value(name = "q5_1")]
    Q5_1,
    #[value(name = "q4_k")]
    Q4K,
    #[value(name = "q6_k")]
    Q6K,
}

impl OutType {
    fn ggml(self) -> GgmlType {
        match self {
            OutType::F32 => GgmlType::F32,
            OutType::F16 => GgmlType::F16,
            OutType::Bf16 => GgmlType::BF16,
            OutType::Q8_0 => GgmlType::Q8_0,
            OutType::Q4_0 => GgmlType::Q4_0,
            OutType::Q4_1 => GgmlType::Q4_1,
            OutType::Q5_0 => GgmlType::Q5_0,
            OutType::Q5_1 => GgmlType::Q5_1,
            OutType::Q4K => GgmlType::Q4K,
            OutType::Q6K => GgmlType::Q6K,
        }
    }

    /// llama.cpp's `general.file_type` (`llama_ftype`).
    fn file_type(self) -> u32 {
        match self {
            OutType::F32 => 0,
            OutType::F16 => 1,
            OutType::Q4_0 => 2,
            OutType::Q4_1 => 3,
            OutType::Q8_0 => 7,
            OutType::Q5_0 => 8,
            OutType::Q5_1 => 9,
            OutType::Q4K => 14,
            OutType::Q6K => 18,
            OutType::Bf16 => 32,
        }
    }
}

pub fn run(a: Args) -> Result<()> {
    let Format::Gguf = a.format;
    if a.out.exists() {
        bail!(
            "{} already exists; choose a new --out file",
            a.out.display()
        );
    }
    if a.lora_only && a.adapter.adapters.is_empty() {
        bail!("--lora-only writes the adapters: pass at least one --adapter DIR");
    }
    if a.lora_only && !matches!(a.ty, OutType::F32 | OutType::F16 | OutType::Bf16) {
        bail!("--lora-only writes f32, f16 or bf16 LoRA tensors (a rank is rarely a whole 32-element block); drop --type or pick one of those");
    }
    let mut src = ModelSource::open(&a.model)?;
    let planned = plan_adapters(&src.config, &src.path, &a.adapter)?;
    if a.lora_only {
        return export_lora(&a, &src.config, &planned);
    }
    let tokenizer = src.tokenizer.take();
    apply_replacements(&mut src, &planned)?;
    let cfg = src.config.clone();
    let rope = rope_metadata(&cfg)?;
    let model = Model::load_with(&mut src, LoadOptions::default())
        .with_context(|| format!("loading {}", a.model.display()))?;
    if cfg.tie_word_embeddings
        && planned
            .iter()
            .any(|(_, p)| p.linear.iter().any(|d| d.module == "lm_head"))
    {
        bail!("the adapter targets lm_head, but the base ties it to embed_tokens; merging would change the embedding too (not supported)");
    }
    if let Some(w) = cfg.attention_window() {
        if w < cfg.max_position_embeddings {
            eprintln!("warning: {} attends over a sliding window of {w} tokens; llama.cpp's llama architecture attends over the whole context (as convert_hf_to_gguf.py's files do)", a.model.display());
        }
    }

    // Metadata: the architecture's, then the tokenizer's.
    let mut meta = model_metadata(&a, &cfg, a.ty, rope);
    meta.extend(tokenizer_metadata(
        &a.model,
        tokenizer.as_ref(),
        cfg.vocab_size,
    )?);

    let mut linear: BTreeMap<&str, Vec<&LinearDelta>> = BTreeMap::new();
    let mut embedding: Vec<&EmbeddingDelta> = Vec::new();
    for (_, plan) in &planned {
        for d in &plan.linear {
            linear.entry(d.module.as_str()).or_default().push(d);
        }
        embedding.extend(&plan.embedding);
    }
    let items = items(&model);
    let head_default = match a.ty {
        OutType::Q4_0 | OutType::Q4_1 | OutType::Q5_0 | OutType::Q5_1 | OutType::Q4K => {
            OutType::Q8_0
        }
        t => t,
    };
    let specs: Vec<GgufTensorSpec> = items
        .iter()
        .map(|it| {
            let (rows, cols) = it.shape();
            let want = match it {
                Item::Embedding(_) => a.embedding_type.unwrap_or(head_default),
                Item::Weight { module, .. } if module == "lm_head" => {
                    a.output_type.unwrap_or(head_default)
                }
                _ => a.ty,
            }
            .ggml();
            let t = if rows == 0 {
                GgmlType::F32
            } else {
                fit(want, cols)
            };
            GgufTensorSpec {
                name: gguf_name(&it.hf_name()).expect("every exported tensor has a GGUF name"),
                dims: if rows == 0 {
                    vec![cols as u64]
                } else {
                    vec![cols as u64, rows as u64]
                },
                ggml_type: t,
            }
        })
        .collect();
    let mut fell_back = BTreeMap::new();
    for s in specs
        .iter()
        .filter(|s| s.dims.len() == 2 && s.ggml_type != a.ty.ggml())
    {
        *fell_back.entry(s.ggml_type.name()).or_insert(0) += 1;
    }
    for (t, n) in fell_back {
        eprintln!("note: {n} matrices written as {t} (the embedding/head's type, or rows that are not whole {} blocks, as llama-quantize falls back)", a.ty.ggml().name());
    }
    // lora_B.bias on a module without a bias cannot be merged.
    for (m, ds) in &linear {
        if ds.iter().any(|d| d.b_bias.is_some())
            && !items
                .iter()
                .any(|it| matches!(it, Item::Bias { module, .. } if module == m))
        {
            bail!("adapter has lora_B.bias for \"{m}\", which has no bias to merge it into (PEFT cannot merge it either)");
        }
    }
    let mut w = GgufWriter::create(&a.out, &meta, &specs)?;
    for (it, spec) in items.iter().zip(&specs) {
        let name = it.hf_name();
        let values: Vec<f32> = match it {
            Item::Embedding(e) => {
                let mut v = e.to_f32();
                merge_embedding(&mut v, e.rows, e.cols, &embedding);
                v
            }
            Item::Vector(_, v) => v.to_vec(),
            Item::Weight { module, w: wt, .. } => {
                let mut v = wt.to_f32();
                let deltas = linear.get(module.as_str()).cloned().unwrap_or_default();
                // lora_B.bias is merged into the bias's own item (checked above).
                let mut bias = Some(vec![0f32; wt.rows]);
                merge_linear(&mut v, &mut bias, wt.rows, wt.cols, &deltas, module)?;
                permuted(&cfg, module, v, wt.rows)?
            }
            Item::Bias { module, bias } => {
                // b + s·lora_B.bias of each adapter, as merge_linear adds it.
                let mut b = bias.clone();
                for d in linear.get(module.as_str()).into_iter().flatten() {
                    if let Some(bb) = &d.b_bias {
                        b.iter_mut().zip(bb).for_each(|(x, y)| *x += d.scaling * y);
                    }
                }
                let n = b.len();
                permuted(&cfg, module, b, n)?
            }
        };
        let mut bytes = Vec::new();
        quantize_ggml(spec.ggml_type, &values, &mut bytes)
            .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        w.write(&spec.name, &bytes)?;
    }
    w.finish()?;
    eprintln!(
        "exported {}{} to {} ({}, {} tensors)",
        a.model.display(),
        if planned.is_empty() {
            String::new()
        } else {
            format!(" with {} adapter(s) merged", planned.len())
        },
        a.out.display(),
        a.ty.ggml().name(),
        specs.len()
    );
    Ok(())
}

/// The type a matrix with rows of `cols` values gets: `want`, or llama-quantize's fallback when
/// the rows are not whole blocks of it (Q4_K → Q5_0, Q6_K → Q8_0; a 32-block type → F16).
fn fit(want: GgmlType, cols: usize) -> GgmlType {
    if cols.is_multiple_of(want.block().0) {
        return want;
    }
    let fallback = match want {
        GgmlType::Q4K => GgmlType::Q5_0,
        GgmlType::Q5K => GgmlType::Q5_1,
        GgmlType::Q6K => GgmlType::Q8_0,
        _ => GgmlType::F16,
    };
    if cols.is_multiple_of(fallback.block().0) {
        fallback
    } else {
        GgmlType::F16
    }
}

/// One tensor of the exported model, in llama.cpp's file order.
enum Item<'a> {
    Embedding(&'a qlora_engine::Weight),
    Vector(String, &'a [f32]),
    Weight {
        module: String,
        w: &'a qlora_engine::Weight,
    },
    Bias {
        module: String,
        bias: Vec<f32>,
    },
}

impl Item<'_> {
    fn hf_name(&self) -> String {
        match self {
            Item::Embedding(_) => "model.embed_tokens.weight".into(),
            Item::Vector(n, _) => n.clone(),
            Item::Weight { module, .. } => format!("{module}.weight"),
            Item::Bias { module, .. } => format!("{module}.bias"),
        }
    }
    /// (rows, cols); rows 0 for a vector.
    fn shape(&self) -> (usize, usize) {
        match self {
            Item::Embedding(w) | Item::Weight { w, .. } => (w.rows, w.cols),
            Item::Vector(_, v) => (0, v.len()),
            Item::Bias { bias, .. } => (0, bias.len()),
        }
    }
}

fn items(model: &Model) -> Vec<Item<'_>> {
    let mut items = vec![Item::Embedding(&model.embed_tokens)];
    for (i, l) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        items.push(Item::Vector(
            format!("{p}.input_layernorm.weight"),
            &l.input_layernorm,
        ));
        for proj in l.projections() {
            items.push(Item::Weight {
                module: proj.name.clone(),
                w: &proj.base,
            });
            if let Some(b) = &proj.bias {
                items.push(Item::Bias {
                    module: proj.name.clone(),
                    bias: b.clone(),
                });
            }
        }
        items.push(Item::Vector(
            format!("{p}.post_attention_layernorm.weight"),
            &l.post_attention_layernorm,
        ));
    }
    items.push(Item::Vector("model.norm.weight".into(), &model.norm));
    if !model.config.tie_word_embeddings {
        items.push(Item::Weight {
            module: "lm_head".into(),
            w: &model.lm_head.base,
        });
    }
    items
}

/// The heads whose rows llama.cpp interleaves for RoPE: q_proj's and k_proj's.
fn rope_heads(cfg: &ModelConfig, module: &str) -> Option<usize> {
    if module.ends_with("self_attn.q_proj") {
        Some(cfg.num_attention_heads)
    } else if module.ends_with("self_attn.k_proj") {
        Some(cfg.num_kv_heads())
    } else {
        None
    }
}

fn permuted(cfg: &ModelConfig, module: &str, v: Vec<f32>, rows: usize) -> Result<Vec<f32>> {
    match rope_heads(cfg, module) {
        Some(h) => permute_rows(&v, rows, h).map_err(|e| anyhow::anyhow!("{module}: {e}")),
        None => Ok(v),
    }
}

/// llama.cpp's RoPE scaling keys for the config's scaling.
fn rope_metadata(cfg: &ModelConfig) -> Result<Vec<(String, GgufValue)>> {
    let Some(r) = cfg.rope() else {
        return Ok(Vec::new());
    };
    match r.rope_type.as_deref() {
        None | Some("default") => Ok(Vec::new()),
        Some("linear") => Ok(vec![
            ("llama.rope.scaling.type".into(), GgufValue::String("linear".into())),
            (
                "llama.rope.scaling.factor".into(),
                GgufValue::F32(r.factor.unwrap_or(1.0) as f32),
            ),
        ]),
        Some(t) => bail!("RoPE scaling \"{t}\" cannot be exported to GGUF yet (qlora writes none and linear); llama.cpp's convert_hf_to_gguf.py handles it"),
    }
}

fn model_metadata(
    a: &Args,
    cfg: &ModelConfig,
    ty: OutType,
    rope: Vec<(String, GgufValue)>,
) -> Vec<(String, GgufValue)> {
    let name = a
        .model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let s = |v: &str| GgufValue::String(v.into());
    let u = |v: usize| GgufValue::U32(v as u32);
    let mut m = vec![
        ("general.architecture".to_string(), s("llama")),
        ("general.type".into(), s("model")),
        ("general.name".into(), GgufValue::String(name)),
        ("general.file_type".into(), GgufValue::U32(ty.file_type())),
        ("general.quantization_version".into(), GgufValue::U32(2)),
        (
            "llama.context_length".into(),
            u(cfg.max_position_embeddings),
        ),
        ("llama.embedding_length".into(), u(cfg.hidden_size)),
        ("llama.block_count".into(), u(cfg.num_hidden_layers)),
        ("llama.feed_forward_length".into(), u(cfg.intermediate_size)),
        (
            "llama.attention.head_count".into(),
            u(cfg.num_attention_heads),
        ),
        (
            "llama.attention.head_count_kv".into(),
            u(cfg.num_kv_heads()),
        ),
        (
            "llama.rope.freq_base".into(),
            GgufValue::F32(cfg.rope_theta() as f32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            GgufValue::F32(cfg.rms_norm_eps as f32),
        ),
        ("llama.rope.dimension_count".into(), u(cfg.head_dim())),
        ("llama.vocab_size".into(), u(cfg.vocab_size)),
    ];
    if cfg.head_dim() * cfg.num_attention_heads != cfg.hidden_size {
        m.push(("llama.attention.key_length".into(), u(cfg.head_dim())));
        m.push(("llama.attention.value_length".into(), u(cfg.head_dim())));
    }
    m.extend(rope);
    m
}

/// The tokenizer's GGUF keys: a GGUF source's own, unchanged; else built from tokenizer.json.
fn tokenizer_metadata(
    model: &Path,
    tok: Option<&qlora_io::TokenizerInfo>,
    vocab: usize,
) -> Result<Vec<(String, GgufValue)>> {
    if model.is_file() {
        let g = GgufFile::open(model)?;
        if g.get("tokenizer.ggml.model").is_none() {
            bail!(
                "{} has no tokenizer metadata (tokenizer.ggml.*); llama.cpp needs the tokenizer in the GGUF file: export from the model's Hugging Face directory instead",
                model.display()
            );
        }
        return Ok(g
            .metadata
            .iter()
            .filter(|(k, _)| k.starts_with("tokenizer."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect());
    }
    let Some(tok) = tok else {
        bail!(
            "{} has no tokenizer.json; llama.cpp needs the tokenizer in the GGUF file",
            model.display()
        );
    };
    let path = model.join("tokenizer.json");
    gguf_tokenizer_metadata(tok, vocab, &path)
        .with_context(|| format!("writing {}'s tokenizer to GGUF", model.display()))
}

/// `--lora-only`: the adapters' A and s·B per module, stacked when several adapters share one.
fn export_lora(a: &Args, cfg: &ModelConfig, planned: &[(Adapter, Plan)]) -> Result<()> {
    let mut by_module: BTreeMap<String, Vec<(&Adapter, &LinearDelta)>> = BTreeMap::new();
    for (ad, plan) in planned {
        let dir = ad.dir.display();
        if let Some(e) = plan.embedding.first() {
            bail!("adapter {dir} has a LoRA on the embedding \"{}\"; a GGUF LoRA file holds linear layers only here. Export the merged model instead (drop --lora-only)", e.module);
        }
        if let Some(r) = plan.replacements.first() {
            bail!("adapter {dir} replaces base tensor \"{}\" (modules_to_save or a trained bias); llama.cpp's LoRA files cannot; export the merged model instead (drop --lora-only)", r.name);
        }
        for d in &plan.linear {
            if d.magnitude.is_some() {
                bail!("adapter {dir} is DoRA on \"{}\"; llama.cpp applies plain LoRA only. Export the merged model instead (drop --lora-only)", d.module);
            }
            if d.b_bias.is_some() {
                bail!("adapter {dir} has lora_B.bias on \"{}\"; llama.cpp's LoRA files have none. Export the merged model instead (drop --lora-only)", d.module);
            }
            if d.module == "lm_head" && cfg.tie_word_embeddings {
                bail!("adapter {dir} targets lm_head, which this base ties to the embedding; llama.cpp has no output.weight to adapt");
            }
            by_module.entry(d.module.clone()).or_default().push((ad, d));
        }
    }
    let ty = a.ty.ggml();
    let mut specs = Vec::new();
    let mut tensors: Vec<Vec<f32>> = Vec::new();
    // llama.cpp reads the pairs by name; layer order keeps the file readable.
    let mut modules: Vec<&String> = by_module.keys().collect();
    modules.sort_by_key(|m| layer_order(m));
    for m in modules {
        let ds = &by_module[m];
        let base = gguf_name(&format!("{m}.weight"))
            .with_context(|| format!("no GGUF name for module \"{m}\""))?;
        let inp = ds[0].1.a.len() / ds[0].1.rank;
        let out = ds[0].1.b.len() / ds[0].1.rank;
        let r: usize = ds.iter().map(|(_, d)| d.rank).sum();
        // A [r, in]: the adapters' rows stacked; B [out, r]: their columns side by side, each
        // times its scaling.
        let mut am = Vec::with_capacity(r * inp);
        let mut bm = vec![0f32; out * r];
        let mut c0 = 0;
        for (_, d) in ds {
            am.extend_from_slice(&d.a);
            for o in 0..out {
                for k in 0..d.rank {
                    bm[o * r + c0 + k] = d.scaling * d.b[o * d.rank + k];
                }
            }
            c0 += d.rank;
        }
        let bm = match rope_heads(cfg, m) {
            Some(h) => permute_rows(&bm, out, h).map_err(|e| anyhow::anyhow!("{m}: {e}"))?,
            None => bm,
        };
        specs.push(GgufTensorSpec {
            name: format!("{base}.lora_a"),
            dims: vec![inp as u64, r as u64],
            ggml_type: ty,
        });
        specs.push(GgufTensorSpec {
            name: format!("{base}.lora_b"),
            dims: vec![r as u64, out as u64],
            ggml_type: ty,
        });
        tensors.push(am);
        tensors.push(bm);
    }
    let s = |v: &str| GgufValue::String(v.into());
    let name = planned[0]
        .0
        .dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "adapter".into());
    let meta = vec![
        ("general.architecture".to_string(), s("llama")),
        ("general.type".into(), s("adapter")),
        ("general.name".into(), GgufValue::String(name)),
        ("adapter.type".into(), s("lora")),
        // 0: llama.cpp scales by 1 (times --lora-scaled), the scalings being in B already.
        ("adapter.lora.alpha".into(), GgufValue::F32(0.0)),
    ];
    let mut w = GgufWriter::create(&a.out, &meta, &specs)?;
    for (spec, v) in specs.iter().zip(&tensors) {
        let mut bytes = Vec::new();
        quantize_ggml(spec.ggml_type, v, &mut bytes)
            .map_err(|e| anyhow::anyhow!("{}: {e}", spec.name))?;
        w.write(&spec.name, &bytes)?;
    }
    w.finish()?;
    eprintln!(
        "exported {} adapter(s) on {} modules to {} (GGUF LoRA, {})",
        planned.len(),
        specs.len() / 2,
        a.out.display(),
        ty.name()
    );
    Ok(())
}

/// (layer, module name) for sorting `model.layers.N.…` numerically; others last.
fn layer_order(m: &str) -> (usize, String) {
    let layer = m
        .strip_prefix("model.layers.")
        .and_then(|r| r.split('.').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(usize::MAX);
    (layer, m.to_string())
}

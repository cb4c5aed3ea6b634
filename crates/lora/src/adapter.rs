//! Opening PEFT adapter directories and matching their tensors to a model's modules.

use crate::config::AdapterConfig;
use crate::pickle;
use crate::provenance::Provenance;
use qlora_io::{ModelConfig, RawTensor, SafetensorsFile};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Config {
        path: PathBuf,
        source: crate::config::ConfigError,
    },
    #[error("{path}: {source}")]
    Provenance {
        path: PathBuf,
        source: crate::provenance::ProvenanceError,
    },
    #[error("{path}: {source}")]
    Pickle {
        path: PathBuf,
        source: crate::pickle::PickleError,
    },
    #[error(transparent)]
    Io(#[from] qlora_io::Error),
}

fn file_err(path: &Path, reason: impl Into<String>) -> LoraError {
    LoraError::File {
        path: path.into(),
        reason: reason.into(),
    }
}

/// One adapter as PEFT saved it.
#[derive(Debug)]
pub struct Adapter {
    pub dir: PathBuf,
    /// "default" for the top directory, the subdirectory name for the others.
    pub name: String,
    pub config: AdapterConfig,
    pub weights_path: PathBuf,
    /// Tensors by their name inside the model (`base_model.model.` removed).
    pub tensors: Vec<RawTensor>,
    pub provenance: Option<Provenance>,
}

/// The adapters in a directory: `dir/` itself (PEFT's "default") and every `dir/<name>/` with an
/// `adapter_config.json` (PEFT's other adapters).
pub fn open_adapters(dir: &Path) -> Result<Vec<Adapter>, LoraError> {
    if !dir.is_dir() {
        return Err(file_err(
            dir,
            if dir.exists() {
                "not a directory; pass the adapter directory (holding adapter_config.json)"
            } else {
                "no such adapter directory"
            },
        ));
    }
    // A training run's directory holds one adapter per checkpoint: applying them all at once
    // is never what was meant.
    let checkpoints: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| file_err(dir, e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    if !checkpoints.is_empty() || dir.join("metrics.jsonl").exists() {
        let mut names = checkpoints;
        names.sort();
        return Err(file_err(
            dir,
            format!(
                "is a training run directory ({}); pass one checkpoint directory, e.g. {}",
                if names.is_empty() {
                    "metrics.jsonl".to_string()
                } else {
                    names.join(", ")
                },
                dir.join(names.last().map_or("final", |s| s.as_str()))
                    .display()
            ),
        ));
    }
    let mut out = Vec::new();
    if dir.join("adapter_config.json").exists() {
        out.push(open_one(dir, "default")?);
    }
    let mut subs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| file_err(dir, e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && p.join("adapter_config.json").exists())
        .collect();
    subs.sort();
    for s in subs {
        let name = s.file_name().unwrap().to_string_lossy().into_owned();
        out.push(open_one(&s, &name)?);
    }
    if out.is_empty() {
        return Err(file_err(
            dir,
            "no adapter_config.json here or in a subdirectory; this is not a PEFT adapter directory",
        ));
    }
    Ok(out)
}

fn open_one(dir: &Path, name: &str) -> Result<Adapter, LoraError> {
    let cfg_path = dir.join("adapter_config.json");
    let text =
        std::fs::read_to_string(&cfg_path).map_err(|e| file_err(&cfg_path, e.to_string()))?;
    let config = AdapterConfig::parse(&text).map_err(|source| LoraError::Config {
        path: cfg_path.clone(),
        source,
    })?;
    let st = dir.join("adapter_model.safetensors");
    let bin = dir.join("adapter_model.bin");
    let (weights_path, raw) = if st.exists() {
        let f = SafetensorsFile::open(&st)?;
        (st, f.tensors)
    } else if bin.exists() {
        let t = pickle::read_torch_file(&bin).map_err(|source| LoraError::Pickle {
            path: bin.clone(),
            source,
        })?;
        (bin, t)
    } else {
        return Err(file_err(
            dir,
            "no adapter_model.safetensors or adapter_model.bin next to adapter_config.json",
        ));
    };
    let tensors = raw
        .into_iter()
        .map(|mut t| {
            if let Some(rest) = t.name.strip_prefix("base_model.model.") {
                t.name = rest.to_string();
            }
            t
        })
        .collect();
    let provenance = Provenance::read(dir).map_err(|source| LoraError::Provenance {
        path: dir.join(crate::provenance::FILE),
        source,
    })?;
    Ok(Adapter {
        dir: dir.into(),
        name: name.into(),
        config,
        weights_path,
        tensors,
        provenance,
    })
}

/// The modules and tensors of a Llama/Mistral model, from its config: what an adapter may touch.
#[derive(Debug, Clone)]
pub struct ModelShapes {
    /// Linear modules (`model.layers.0.self_attn.q_proj`, `lm_head`): [out, in].
    pub linears: BTreeMap<String, (usize, usize)>,
    /// Embedding modules (`model.embed_tokens`): [num_embeddings, dim].
    pub embeddings: BTreeMap<String, (usize, usize)>,
    /// Every base tensor by name.
    pub tensors: BTreeMap<String, Vec<usize>>,
    pub vocab: usize,
}

impl ModelShapes {
    pub fn from_config(c: &ModelConfig) -> ModelShapes {
        let (d, v) = (c.hidden_size, c.vocab_size);
        let mut linears = BTreeMap::new();
        let mut tensors = BTreeMap::new();
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            for l in c.layer_linears() {
                let (name, out, inp, bias) = (l.name, l.d_out, l.d_in, l.bias);
                let m = format!("{p}.{name}");
                tensors.insert(format!("{m}.weight"), vec![out, inp]);
                if bias {
                    tensors.insert(format!("{m}.bias"), vec![out]);
                }
                linears.insert(m, (out, inp));
            }
            tensors.insert(format!("{p}.input_layernorm.weight"), vec![d]);
            tensors.insert(format!("{p}.post_attention_layernorm.weight"), vec![d]);
        }
        linears.insert("lm_head".into(), (v, d));
        tensors.insert("lm_head.weight".into(), vec![v, d]);
        tensors.insert("model.embed_tokens.weight".into(), vec![v, d]);
        tensors.insert("model.norm.weight".into(), vec![d]);
        ModelShapes {
            linears,
            embeddings: BTreeMap::from([("model.embed_tokens".to_string(), (v, d))]),
            tensors,
            vocab: v,
        }
    }

    fn all_modules(&self) -> impl Iterator<Item = &String> {
        self.linears.keys().chain(self.embeddings.keys())
    }

    /// Up to three module names closest to `name` (edit distance), for "did you mean".
    pub fn nearest(&self, name: &str) -> Vec<String> {
        let mut scored: Vec<(usize, &String)> = self
            .all_modules()
            .map(|m| (strsim::levenshtein(m, name), m))
            .collect();
        scored.sort();
        scored.into_iter().take(3).map(|(_, m)| m.clone()).collect()
    }
}

/// A LoRA (or DoRA) delta on one linear module.
#[derive(Debug, Clone)]
pub struct LinearDelta {
    pub module: String,
    pub rank: usize,
    pub scaling: f32,
    /// [rank, in], row-major f32.
    pub a: Vec<f32>,
    /// [out, rank].
    pub b: Vec<f32>,
    /// `lora_B.bias` (lora_bias), [out].
    pub b_bias: Option<Vec<f32>>,
    /// DoRA magnitude, [out].
    pub magnitude: Option<Vec<f32>>,
}

/// A LoRA (or DoRA) delta on an embedding module.
#[derive(Debug, Clone)]
pub struct EmbeddingDelta {
    pub module: String,
    pub rank: usize,
    pub scaling: f32,
    /// `lora_embedding_A`, [rank, num_embeddings].
    pub a: Vec<f32>,
    /// `lora_embedding_B`, [dim, rank].
    pub b: Vec<f32>,
    /// DoRA magnitude, [dim].
    pub magnitude: Option<Vec<f32>>,
}

/// What applying one adapter to one model means, checked.
#[derive(Debug, Default)]
pub struct Plan {
    pub linear: Vec<LinearDelta>,
    pub embedding: Vec<EmbeddingDelta>,
    /// Base tensors the adapter replaces (`base_layer.weight` of targeted embeddings/heads,
    /// `modules_to_save` copies, biases saved with `bias="all"`), under the base tensor's name.
    pub replacements: Vec<RawTensor>,
    /// Things PEFT would do silently that a user should know.
    pub warnings: Vec<String>,
}

#[derive(Default)]
struct Parts {
    a: Option<RawTensor>,
    b: Option<RawTensor>,
    b_bias: Option<RawTensor>,
    magnitude: Option<RawTensor>,
    emb_a: Option<RawTensor>,
    emb_b: Option<RawTensor>,
}

/// Splits `module.part` for the LoRA parameter names, with or without an adapter name inside
/// (`lora_A.weight`, `lora_A.default.weight`).
fn lora_part(name: &str) -> Option<(&str, &'static str)> {
    const PARTS: [(&str, &str); 6] = [
        (".lora_A.", "A"),
        (".lora_B.", "B"),
        (".lora_magnitude_vector", "M"),
        (".lora_embedding_A", "EA"),
        (".lora_embedding_B", "EB"),
        (".lora_A", "A"),
    ];
    PARTS.iter().find_map(|(pat, kind)| {
        name.find(pat).map(|i| {
            let kind: &'static str = if *kind == "B" && name.ends_with(".bias") {
                "Bb"
            } else {
                kind
            };
            (&name[..i], kind)
        })
    })
}

impl Adapter {
    /// Matches every tensor to the model, checks every shape, and computes each module's
    /// scaling. Errors list every problem found, one sentence each.
    pub fn plan(&self, shapes: &ModelShapes) -> Result<Plan, Vec<String>> {
        let cfg = &self.config;
        let mut problems = Vec::new();
        let mut plan = Plan::default();
        let mut parts: BTreeMap<String, Parts> = BTreeMap::new();
        let adapted_modules: std::collections::HashSet<&str> = self
            .tensors
            .iter()
            .filter_map(|t| lora_part(&t.name).map(|(m, _)| m))
            .collect();
        for t in &self.tensors {
            if let Some((module, kind)) = lora_part(&t.name) {
                let p = parts.entry(module.to_string()).or_default();
                let slot = match kind {
                    "A" => &mut p.a,
                    "B" => &mut p.b,
                    "Bb" => &mut p.b_bias,
                    "M" => &mut p.magnitude,
                    "EA" => &mut p.emb_a,
                    _ => &mut p.emb_b,
                };
                if let Some(prev) = slot.as_ref() {
                    problems.push(format!(
                        "module \"{module}\" has two {kind} tensors, \"{}\" and \"{}\"; the adapter file is ambiguous (keep one)",
                        prev.name, t.name
                    ));
                    continue;
                }
                *slot = Some(t.clone());
                continue;
            }
            // A full tensor: base_layer.* of a wrapped module, a modules_to_save copy, or a bias.
            let base_name = t
                .name
                .replace(".base_layer.", ".")
                .replace(".modules_to_save.default.", ".")
                .replace(&format!(".modules_to_save.{}.", self.name), ".");
            // Only what the config declares may replace a base tensor: a modules_to_save copy, a
            // wrapped module's base_layer, a bias when `bias` is not "none", or a targeted
            // embedding/lm_head saved whole (save_embedding_layers). PEFT ignores the rest.
            let module = base_name
                .rsplit_once('.')
                .map_or(base_name.as_str(), |(m, _)| m);
            let in_modules_to_save = cfg
                .modules_to_save
                .iter()
                .any(|m| module == m || module.ends_with(&format!(".{m}")));
            let adapted = adapted_modules.contains(module);
            let declared = in_modules_to_save
                || (t.name.contains(".base_layer.") && adapted)
                || (base_name.ends_with(".bias") && cfg.bias != "none")
                || (matches!(module, "lm_head" | "model.embed_tokens") && cfg.targets(module));
            if !declared && shapes.tensors.contains_key(&base_name) {
                problems.push(format!(
                    "tensor \"{}\" would replace the base's \"{base_name}\", but adapter_config.json does not declare it (not in modules_to_save, not the base_layer of an adapted module, not a targeted embedding); PEFT ignores such tensors, and qlora will not replace a base weight silently: remove it from the file",
                    t.name
                ));
                continue;
            }
            match shapes.tensors.get(&base_name) {
                None => problems.push(format!(
                    "tensor \"{}\" matches nothing in the model (no base tensor \"{base_name}\"); PEFT would ignore it silently",
                    t.name
                )),
                Some(want) if *want != t.shape => {
                    let is_vocab = base_name == "lm_head.weight" || base_name == "model.embed_tokens.weight";
                    if is_vocab && t.shape.len() == 2 && t.shape[1] == want[1] {
                        problems.push(format!(
                            "tensor \"{}\" has {} rows but the model's vocabulary has {}: the adapter was trained with a resized vocabulary (resize the base's embeddings to {} tokens, with the tokenizer the adapter came with)",
                            t.name, t.shape[0], want[0], t.shape[0]
                        ));
                    } else {
                        problems.push(format!(
                            "tensor \"{}\": shape {:?}, expected {:?} for \"{base_name}\"",
                            t.name, t.shape, want
                        ));
                    }
                }
                Some(_) => {
                    let mut r = t.clone();
                    r.name = base_name;
                    plan.replacements.push(r);
                }
            }
        }
        let f32s = |t: &RawTensor, problems: &mut Vec<String>| match t.to_f32() {
            Ok(v) => Some(v),
            Err(e) => {
                problems.push(e.to_string());
                None
            }
        };
        for (module, p) in &parts {
            let is_linear = shapes.linears.get(module);
            let is_emb = shapes.embeddings.get(module);
            if is_linear.is_none() && is_emb.is_none() {
                let near = shapes.nearest(module);
                problems.push(format!(
                    "adapter tensors target module \"{module}\", which this model does not have (nearest: {}); PEFT would skip them silently and the adapter would do nothing there",
                    near.join(", ")
                ));
                continue;
            }
            if !cfg.targets(module) {
                problems.push(format!(
                    "adapter tensors for module \"{module}\", which adapter_config.json's target_modules (with layers_to_transform / exclude_modules) does not select; PEFT would not apply them: fix the config or drop the tensors"
                ));
                continue;
            }
            let (rank, _) = cfg.rank_alpha(module);
            let scaling = cfg.scaling(module);
            if let Some(&(out, inp)) = is_linear {
                let (Some(a), Some(b)) = (&p.a, &p.b) else {
                    problems.push(format!(
                        "module \"{module}\" has {} but not {}; the adapter file is incomplete",
                        if p.a.is_some() { "lora_A" } else { "lora_B" },
                        if p.a.is_some() { "lora_B" } else { "lora_A" }
                    ));
                    continue;
                };
                let r = a.shape.first().copied().unwrap_or(0);
                let mut ok = true;
                for (t, want) in [(a, vec![r, inp]), (b, vec![out, r])] {
                    if t.shape != want {
                        problems.push(format!(
                            "tensor \"{}\": shape {:?}, expected {:?} (the model's \"{module}\" is [{out}, {inp}])",
                            t.name, t.shape, want
                        ));
                        ok = false;
                    }
                }
                if ok && r != rank {
                    problems.push(format!(
                        "module \"{module}\" has rank {r} in the weights but {rank} in adapter_config.json (r / rank_pattern); PEFT would refuse to load it"
                    ));
                    ok = false;
                }
                for (t, what) in [
                    (&p.b_bias, "lora_B.bias"),
                    (&p.magnitude, "lora_magnitude_vector"),
                ] {
                    if let Some(t) = t {
                        if t.shape != [out] {
                            problems.push(format!(
                                "tensor \"{}\": shape {:?}, expected [{out}] ({what} of \"{module}\")",
                                t.name, t.shape
                            ));
                            ok = false;
                        }
                    }
                }
                if !ok {
                    continue;
                }
                let (Some(av), Some(bv)) = (f32s(a, &mut problems), f32s(b, &mut problems)) else {
                    continue;
                };
                let b_bias = p.b_bias.as_ref().and_then(|t| f32s(t, &mut problems));
                let magnitude = p.magnitude.as_ref().and_then(|t| f32s(t, &mut problems));
                plan.linear.push(LinearDelta {
                    module: module.clone(),
                    rank: r,
                    scaling,
                    a: av,
                    b: bv,
                    b_bias,
                    magnitude,
                });
            } else if let Some(&(vocab, dim)) = is_emb {
                let (Some(a), Some(b)) = (&p.emb_a, &p.emb_b) else {
                    problems.push(format!(
                        "embedding module \"{module}\" needs lora_embedding_A and lora_embedding_B; the adapter file is incomplete"
                    ));
                    continue;
                };
                let r = a.shape.first().copied().unwrap_or(0);
                if a.shape.len() == 2 && a.shape[1] != vocab && b.shape == [dim, r] {
                    problems.push(format!(
                        "tensor \"{}\" covers {} tokens but the model's vocabulary has {vocab}: the adapter was trained with a resized vocabulary",
                        a.name, a.shape[1]
                    ));
                    continue;
                }
                let mut ok = true;
                for (t, want) in [(a, vec![r, vocab]), (b, vec![dim, r])] {
                    if t.shape != want {
                        problems.push(format!(
                            "tensor \"{}\": shape {:?}, expected {:?} (the model's \"{module}\" is [{vocab}, {dim}])",
                            t.name, t.shape, want
                        ));
                        ok = false;
                    }
                }
                if let Some(m) = &p.magnitude {
                    if m.shape != [dim] {
                        problems.push(format!(
                            "tensor \"{}\": shape {:?}, expected [{dim}]",
                            m.name, m.shape
                        ));
                        ok = false;
                    }
                }
                if ok && r != rank {
                    problems.push(format!(
                        "module \"{module}\" has rank {r} in the weights but {rank} in adapter_config.json"
                    ));
                    ok = false;
                }
                if !ok {
                    continue;
                }
                let (Some(av), Some(bv)) = (f32s(a, &mut problems), f32s(b, &mut problems)) else {
                    continue;
                };
                let magnitude = p.magnitude.as_ref().and_then(|t| f32s(t, &mut problems));
                plan.embedding.push(EmbeddingDelta {
                    module: module.clone(),
                    rank: r,
                    scaling,
                    a: av,
                    b: bv,
                    magnitude,
                });
            }
        }
        // What the config targets but the file lacks: PEFT would wrap these modules and leave
        // them at their initialization (usually a no-op).
        let have: Vec<&String> = parts.keys().collect();
        let missing: Vec<&String> = shapes
            .all_modules()
            .filter(|m| cfg.targets(m) && !have.contains(m))
            .collect();
        if !missing.is_empty() {
            plan.warnings.push(format!(
                "adapter_config.json targets {} module(s) with no weights in {} (first: \"{}\"); they are left unchanged",
                missing.len(),
                self.weights_path.display(),
                missing[0]
            ));
        }
        if problems.is_empty()
            && plan.linear.is_empty()
            && plan.embedding.is_empty()
            && plan.replacements.is_empty()
        {
            problems.push(format!(
                "{} holds no LoRA weights for this model: the adapter would do nothing",
                self.weights_path.display()
            ));
        }
        if cfg.use_dora && parts.values().all(|p| p.magnitude.is_none()) {
            plan.warnings.push(
                "use_dora is set but the file has no lora_magnitude_vector; applied as plain LoRA (what PEFT's initial magnitude computes)".into(),
            );
        }
        if cfg.fan_in_fan_out {
            plan.warnings.push(
                "fan_in_fan_out is true, which only applies to GPT-2 style Conv1D layers; PEFT resets it to false for Linear layers, and so does qlora".into(),
            );
        }
        if !cfg.unknown_fields.is_empty() {
            plan.warnings.push(format!(
                "adapter_config.json has fields this qlora does not know ({}), probably from a newer PEFT; they are ignored",
                cfg.unknown_fields.join(", ")
            ));
        }
        if problems.is_empty() {
            return Ok(plan);
        }
        // When no module fits, the cause is one sentence: another model.
        let shape_problems = problems.iter().filter(|p| p.contains(": shape [")).count();
        if plan.linear.is_empty() && plan.embedding.is_empty() && shape_problems == problems.len() {
            problems.insert(
                0,
                format!(
                    "no module's shapes match: the adapter was made for a different model{} (this one has hidden size {}, vocabulary {})",
                    cfg.base_model_name_or_path
                        .as_deref()
                        .map(|b| format!(" (adapter_config.json names {b:?})"))
                        .unwrap_or_default(),
                    shapes.linears.get("lm_head").map_or(0, |s| s.1),
                    shapes.vocab
                ),
            );
        }
        Err(problems)
    }

    /// Number of adapter parameters and bytes on disk.
    pub fn size(&self) -> (usize, usize) {
        (
            self.tensors.iter().map(|t| t.numel()).sum(),
            self.tensors.iter().map(|t| t.data.len()).sum(),
        )
    }
}

/// Problems as one indented list, the first `max` in full.
pub fn format_problems(problems: &[String], max: usize) -> String {
    let mut s: Vec<String> = problems
        .iter()
        .take(max)
        .map(|p| format!("  - {p}"))
        .collect();
    if problems.len() > max {
        s.push(format!("  - … and {} more", problems.len() - max));
    }
    s.join("\n")
}

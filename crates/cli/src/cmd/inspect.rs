//! `qlora inspect`: what a model is (config, tensors, quantization, memory) and, with
//! `--adapter`, what an adapter is (type, targets, rank/alpha/scaling per module, parameters,
//! dtype, size, PEFT version, the base it names) and whether it fits the model: every tensor
//! matched to a module, every shape checked. Exit 0 when every adapter applies, 1 otherwise.

use anyhow::{Context, Result};
use qlora_io::{BnbConfig, ModelSource};
use qlora_lora::{open_adapters, Adapter, ModelShapes};
use qlora_model::Model;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Describe a model and, with --adapter, an adapter and whether it fits the model.
#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  qlora inspect --model ./Mistral-7B-v0.1 --adapter ./checkpoint-500\n  qlora inspect --model ./model-nf4 --json"
)]
pub struct Args {
    /// Hugging Face model directory or .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// PEFT adapter directory (repeatable).
    #[arg(long = "adapter", value_name = "DIR")]
    adapters: Vec<PathBuf>,
    /// Print one JSON document instead of text.
    #[arg(long)]
    json: bool,
}

fn model_report(a: &Args) -> Result<(Value, ModelShapes, Model)> {
    let mut src = ModelSource::open(&a.model)?;
    let shapes = ModelShapes::from_config(&src.config);
    let cfg = src.config.clone();
    let mut by_type: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for n in src.tensors.names() {
        let t = src.tensors.get(n).expect("listed");
        let e = by_type.entry(t.dtype.name()).or_default();
        e.0 += 1;
        e.1 += t.data.len();
    }
    let stored: usize = by_type.values().map(|v| v.1).sum();
    let bnb =
        BnbConfig::from_config(cfg.quantization_config.as_ref()).map_err(anyhow::Error::msg)?;
    let model = Model::load(&mut src).with_context(|| format!("loading {}", a.model.display()))?;
    let quant = match &model.quantization {
        None => Value::Null,
        Some(q) => {
            json!({"type": q.quant_type, "blocksize": q.blocksize, "double_quant": q.double_quant, "block_words": q.block_words()})
        }
    };
    let params: usize = shapes
        .tensors
        .values()
        .map(|s| s.iter().product::<usize>())
        .sum();
    let v = json!({
        "path": a.model.display().to_string(),
        "architecture": cfg.architectures.first().cloned().unwrap_or_default(),
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_kv_heads(),
        "head_dim": cfg.head_dim(),
        "vocab_size": cfg.vocab_size,
        "tied_embeddings": cfg.tie_word_embeddings,
        "parameters": params,
        "tensors": by_type.iter().map(|(k, (n, b))| (k.clone(), json!({"count": n, "bytes": b}))).collect::<serde_json::Map<_, _>>(),
        "stored_bytes": stored,
        "quantization": quant,
        "bitsandbytes_config": bnb.is_some(),
        "fingerprint": model.fingerprint,
    });
    Ok((v, shapes, model))
}

fn adapter_report(ad: &Adapter, shapes: &ModelShapes, model: &Model) -> (Value, bool) {
    let c = &ad.config;
    let (params, bytes) = ad.size();
    let mut dtypes: Vec<String> = ad.tensors.iter().map(|t| t.dtype.name()).collect();
    dtypes.sort();
    dtypes.dedup();
    let (fits, problems, warnings, modules) = match ad.plan(shapes) {
        Ok(plan) => {
            let mut mods: Vec<Value> = plan
                .linear
                .iter()
                .map(|d| {
                    json!({"module": d.module, "kind": "linear", "rank": d.rank, "alpha": c.rank_alpha(&d.module).1,
                           "scaling": d.scaling, "dora": d.magnitude.is_some(), "lora_bias": d.b_bias.is_some()})
                })
                .collect();
            mods.extend(plan.embedding.iter().map(|d| {
                json!({"module": d.module, "kind": "embedding", "rank": d.rank, "alpha": c.rank_alpha(&d.module).1,
                       "scaling": d.scaling, "dora": d.magnitude.is_some()})
            }));
            mods.extend(plan.replacements.iter().map(
                |r| json!({"module": r.name, "kind": "replaces base tensor", "shape": r.shape}),
            ));
            (true, Vec::new(), plan.warnings, mods)
        }
        Err(p) => (false, p, Vec::new(), Vec::new()),
    };
    let provenance = ad.provenance.as_ref().map(|p| {
        json!({
            "recorded": p.to_json(),
            "differences": p.differences(&model.fingerprint, model.quantization.as_ref()),
        })
    });
    let kind = match (c.use_dora, c.use_rslora) {
        (true, true) => "DoRA (rsLoRA scaling)",
        (true, false) => "DoRA",
        (false, true) => "LoRA (rsLoRA scaling)",
        (false, false) => "LoRA",
    };
    let v = json!({
        "path": ad.dir.display().to_string(),
        "name": ad.name,
        "type": kind,
        "peft_version": c.peft_version,
        "base_model_name_or_path": c.base_model_name_or_path,
        "target_modules": c.target_modules.as_ref().map(|t| t.describe()),
        "r": c.r,
        "lora_alpha": c.lora_alpha,
        "weights_file": ad.weights_path.display().to_string(),
        "parameters": params,
        "dtypes": dtypes,
        "bytes": bytes,
        "fits": fits,
        "problems": problems,
        "warnings": warnings,
        "modules": modules,
        "provenance": provenance,
    });
    (v, fits)
}

fn print_text(m: &Value, adapters: &[Value]) {
    println!("model      {}", m["path"].as_str().unwrap_or(""));
    println!(
        "           {} · {} layers · hidden {} · intermediate {} · heads {} (kv {}, head_dim {}) · vocab {}{}",
        m["architecture"].as_str().unwrap_or("?"),
        m["layers"], m["hidden_size"], m["intermediate_size"], m["heads"], m["kv_heads"], m["head_dim"],
        m["vocab_size"],
        if m["tied_embeddings"].as_bool() == Some(true) { " · tied embeddings" } else { "" }
    );
    let types: Vec<String> = m["tensors"]
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| format!("{} {k}", v["count"]))
                .collect()
        })
        .unwrap_or_default();
    println!(
        "           {:.1} M parameters · {} tensors ({}) · {:.1} MB stored",
        m["parameters"].as_f64().unwrap_or(0.0) / 1e6,
        m["tensors"].as_object().map_or(0, |o| o
            .values()
            .filter_map(|v| v["count"].as_u64())
            .sum::<u64>()),
        types.join(", "),
        m["stored_bytes"].as_f64().unwrap_or(0.0) / 1e6
    );
    let q = &m["quantization"];
    println!(
        "           quantization: {} · fingerprint {}",
        if q.is_null() {
            "none".to_string()
        } else {
            format!(
                "{} {}{}",
                q["type"].as_str().unwrap_or("?"),
                q["block_words"].as_str().unwrap_or("?"),
                if q["double_quant"].as_bool() == Some(true) {
                    ", double quant"
                } else {
                    ""
                }
            )
        },
        m["fingerprint"].as_str().unwrap_or("?")
    );
    for a in adapters {
        println!(
            "adapter    {} ({})",
            a["path"].as_str().unwrap_or(""),
            a["name"].as_str().unwrap_or("")
        );
        println!(
            "           {} · r {} · alpha {} · targets {} · PEFT {} · base {}",
            a["type"].as_str().unwrap_or("?"),
            a["r"],
            a["lora_alpha"],
            a["target_modules"].as_str().unwrap_or("none"),
            a["peft_version"].as_str().unwrap_or("unknown (< 0.18)"),
            a["base_model_name_or_path"]
                .as_str()
                .unwrap_or("not recorded")
        );
        println!(
            "           {} parameters ({}) · {:.1} KB in {}",
            a["parameters"],
            a["dtypes"]
                .as_array()
                .map(|d| d
                    .iter()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default(),
            a["bytes"].as_f64().unwrap_or(0.0) / 1e3,
            a["weights_file"].as_str().unwrap_or("")
        );
        // Group modules with the same role, rank and scaling.
        let mut groups: BTreeMap<String, usize> = BTreeMap::new();
        for m in a["modules"].as_array().into_iter().flatten() {
            let name = m["module"].as_str().unwrap_or("");
            let role = name.rsplit('.').next().unwrap_or(name);
            let key = if m["kind"] == "replaces base tensor" {
                format!("replaces {name}")
            } else {
                format!(
                    "{role}: rank {}, alpha {}, scaling {:.4}{}{}",
                    m["rank"],
                    m["alpha"],
                    m["scaling"].as_f64().unwrap_or(0.0),
                    if m["dora"].as_bool() == Some(true) {
                        ", DoRA"
                    } else {
                        ""
                    },
                    if m["lora_bias"].as_bool() == Some(true) {
                        ", lora_bias"
                    } else {
                        ""
                    }
                )
            };
            *groups.entry(key).or_default() += 1;
        }
        for (k, n) in groups {
            println!("           {k} ×{n}");
        }
        for w in a["warnings"].as_array().into_iter().flatten() {
            println!("           warning: {}", w.as_str().unwrap_or(""));
        }
        if let Some(p) = a["provenance"].as_object() {
            let diffs = p["differences"].as_array().cloned().unwrap_or_default();
            if diffs.is_empty() {
                println!("           provenance: made by qlora on this base");
            }
            for d in diffs {
                println!("           provenance: {}", d.as_str().unwrap_or(""));
            }
        }
        if a["fits"].as_bool() == Some(true) {
            println!("           fits: yes");
        } else {
            println!("           fits: NO (see the error below)");
        }
    }
}

pub fn run(a: Args) -> Result<()> {
    let (m, shapes, model) = model_report(&a)?;
    let mut reports = Vec::new();
    let mut all_fit = true;
    for dir in &a.adapters {
        for ad in open_adapters(dir)? {
            let (r, fits) = adapter_report(&ad, &shapes, &model);
            all_fit &= fits;
            reports.push(r);
        }
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"model": m, "adapters": reports}))?
        );
    } else {
        print_text(&m, &reports);
    }
    if !all_fit {
        let bad: Vec<String> = reports
            .iter()
            .filter(|r| r["fits"].as_bool() != Some(true))
            .map(|r| {
                let problems: Vec<String> = r["problems"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p.as_str().map(String::from))
                    .collect();
                format!(
                    "adapter {} does not fit {}:\n{}",
                    r["path"].as_str().unwrap_or(""),
                    a.model.display(),
                    qlora_lora::format_problems(&problems, 12)
                )
            })
            .collect();
        anyhow::bail!("{}", bad.join("\n"));
    }
    Ok(())
}

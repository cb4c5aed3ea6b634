//! Putting PEFT adapters on a base: each adapter opened and checked against the base's config,
//! its replacement tensors (`base_layer.weight`, `modules_to_save` copies) put in place before
//! the base loads (so they get the base's checks), then applied with its provenance record
//! compared to the loaded base. Warnings are returned for the caller to show.

use crate::{Error, Model, Result};
use qlora_io::{ModelConfig, ModelSource};
use qlora_lora::{open_adapters, Adapter, ModelShapes, Plan};
use std::path::{Path, PathBuf};

/// An adapter and how it maps onto the base.
pub type Planned = (Adapter, Plan);

fn adapter_err(dir: &Path, reason: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("adapter {}: {reason}", dir.display()))
}

/// Opens every adapter under `dirs` and plans it against `config` (`base` names the model in
/// messages); the problems of an adapter come in one message. Pushes "adapter DIR: …"
/// warnings.
pub fn plan_adapters(
    config: &ModelConfig,
    base: &Path,
    dirs: &[PathBuf],
    warnings: &mut Vec<String>,
) -> Result<Vec<Planned>> {
    let shapes = ModelShapes::from_config(config);
    let mut out = Vec::new();
    for dir in dirs {
        for a in open_adapters(dir).map_err(|e| Error::Invalid(e.to_string()))? {
            match a.plan(&shapes) {
                Ok(plan) => {
                    for w in &plan.warnings {
                        warnings.push(format!("adapter {}: {w}", a.dir.display()));
                    }
                    out.push((a, plan));
                }
                Err(problems) => {
                    return Err(Error::Invalid(format!(
                        "adapter {} does not fit {}:\n{}",
                        a.dir.display(),
                        base.display(),
                        qlora_lora::format_problems(&problems, 12)
                    )))
                }
            }
        }
    }
    Ok(out)
}

/// Drops the replacement tensors that hold exactly the base's own stored tensor (the same
/// shape and values): PEFT saves a tied embedding's or head's base layer beside an adapter
/// that targets it, and such a copy changes nothing, so the adapter can share the base's
/// weights (one base for many adapters when serving). Returns how many were dropped.
pub fn drop_unchanged_replacements(src: &ModelSource, planned: &mut [Planned]) -> usize {
    let mut dropped = 0;
    for (_, plan) in planned.iter_mut() {
        plan.replacements.retain(|r| {
            let base = src.tensors.get(&r.name).or_else(|| {
                (src.config.tie_word_embeddings && r.name == "lm_head.weight")
                    .then(|| src.tensors.get("model.embed_tokens.weight"))
                    .flatten()
            });
            // The same values: byte for byte in one dtype, else both widened exactly to f32
            // (PEFT saves the base layer in the dtype it trained in, f32 over a bf16 base).
            let same = base.is_some_and(|b| {
                b.shape == r.shape
                    && if b.dtype == r.dtype {
                        b.data.as_slice() == r.data.as_slice()
                    } else {
                        match (b.to_f32(), r.to_f32()) {
                            (Ok(x), Ok(y)) => {
                                x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits())
                            }
                            _ => false,
                        }
                    }
            });
            dropped += same as usize;
            !same
        });
    }
    dropped
}

/// Puts the adapters' replacement tensors in place of the base's before it loads.
pub fn apply_replacements(src: &mut ModelSource, planned: &[Planned]) -> Result<()> {
    for (a, plan) in planned {
        for r in &plan.replacements {
            if src.config.tie_word_embeddings && r.name == "lm_head.weight" {
                return Err(adapter_err(
                    &a.dir,
                    format!(
                        "replaces lm_head, but {} ties lm_head to embed_tokens; untied heads on tied bases are not supported",
                        src.path.display()
                    ),
                ));
            }
            src.tensors.insert(r.clone(), &a.weights_path);
        }
    }
    Ok(())
}

/// Puts planned adapters on a loaded model and compares each one's provenance record with the
/// base: differences are warnings, or errors when `strict`.
pub fn apply_planned(
    model: &mut Model,
    planned: &[Planned],
    strict: bool,
    warnings: &mut Vec<String>,
) -> Result<()> {
    for (a, plan) in planned {
        model
            .apply_adapter(plan)
            .map_err(|e| Error::Invalid(format!("applying adapter {}: {e}", a.dir.display())))?;
        if let Some(p) = &a.provenance {
            for d in p.differences(&model.fingerprint, model.quantization.as_ref()) {
                if strict {
                    return Err(adapter_err(&a.dir, format!("{d} (--strict)")));
                }
                warnings.push(format!("adapter {}: {d}", a.dir.display()));
            }
        }
    }
    Ok(())
}

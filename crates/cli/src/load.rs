//! Opening `--model PATH` (an HF directory or a .gguf file) into a model and its tokenizer.

use anyhow::{bail, Context, Result};
use qlora_io::{ModelConfig, ModelSource, TokenizerInfo};
use qlora_lora::{open_adapters, Adapter, ModelShapes, Plan};
use qlora_model::{LoadOptions, Model, QuantizeSpec};
use qlora_quant::Quant4;
use std::path::Path;
use std::path::PathBuf;

/// `--quantize nf4|fp4|none [--double-quant]`: quantize the decoder's linear layers at load,
/// as transformers' `BitsAndBytesConfig(load_in_4bit=True, ...)` does (`none`: as stored).
#[derive(clap::Args, Clone, Copy, Debug, Default)]
pub struct QuantizeArgs {
    /// Quantize the decoder's linear layers to 4-bit at load (embeddings, norms and lm_head
    /// stay as stored), bit-exact with bitsandbytes; `none` (the default) loads as stored.
    #[arg(long, value_enum)]
    quantize: Option<LoadQuant>,
    /// Double-quantize the absmax (bnb_4bit_use_double_quant).
    #[arg(long, requires = "quantize")]
    double_quant: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum QuantType {
    Nf4,
    Fp4,
}

impl QuantType {
    pub fn quant(self) -> Quant4 {
        match self {
            QuantType::Nf4 => Quant4::Nf4,
            QuantType::Fp4 => Quant4::Fp4,
        }
    }
}

/// The values of `--quantize`.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum LoadQuant {
    Nf4,
    Fp4,
    None,
}

impl QuantizeArgs {
    pub fn spec(&self) -> Option<QuantizeSpec> {
        let quant = match self.quantize? {
            LoadQuant::Nf4 => Quant4::Nf4,
            LoadQuant::Fp4 => Quant4::Fp4,
            LoadQuant::None => return None,
        };
        Some(QuantizeSpec {
            quant,
            double_quant: self.double_quant,
            blocksize: 64,
        })
    }
}

pub struct Loaded {
    pub model: Model,
    pub tokenizer: Option<TokenizerInfo>,
}

/// `--adapter DIR` (repeatable) and `--strict`: PEFT adapters applied on top of the base.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct AdapterArgs {
    /// A PEFT adapter directory (adapter_config.json + adapter_model.safetensors or .bin;
    /// subdirectories holding more adapters are applied too). Repeat to add several: their
    /// deltas add up.
    #[arg(long = "adapter", value_name = "DIR")]
    pub adapters: Vec<PathBuf>,
    /// Make provenance mismatches errors: an adapter made by qlora on another base, or on the
    /// same base with another quantization.
    #[arg(long)]
    pub strict: bool,
}

pub fn load(path: &Path, quantize: QuantizeArgs) -> Result<Loaded> {
    load_with_adapters(path, quantize, &AdapterArgs::default())
}

/// Opens and checks every adapter against the base's config (`base` names it in messages);
/// the problems of an adapter in one message. Warnings go to stderr.
pub fn plan_adapters(
    config: &ModelConfig,
    base: &Path,
    args: &AdapterArgs,
) -> Result<Vec<(Adapter, Plan)>> {
    let shapes = ModelShapes::from_config(config);
    let mut out = Vec::new();
    for dir in &args.adapters {
        for a in open_adapters(dir)? {
            match a.plan(&shapes) {
                Ok(plan) => {
                    for w in &plan.warnings {
                        eprintln!("warning: adapter {}: {w}", a.dir.display());
                    }
                    out.push((a, plan));
                }
                Err(problems) => bail!(
                    "adapter {} does not fit {}:\n{}",
                    a.dir.display(),
                    base.display(),
                    qlora_lora::format_problems(&problems, 12)
                ),
            }
        }
    }
    Ok(out)
}

/// Puts the adapters' replacement tensors (`base_layer.weight`, `modules_to_save` copies) in
/// place of the base's before it loads, so they get the base's checks.
pub fn apply_replacements(src: &mut ModelSource, planned: &[(Adapter, Plan)]) -> Result<()> {
    for (a, plan) in planned {
        for r in &plan.replacements {
            if src.config.tie_word_embeddings && r.name == "lm_head.weight" {
                bail!(
                    "adapter {} replaces lm_head, but {} ties lm_head to embed_tokens; untied heads on tied bases are not supported",
                    a.dir.display(),
                    src.path.display()
                );
            }
            src.tensors.insert(r.clone(), &a.weights_path);
        }
    }
    Ok(())
}

pub fn load_with_adapters(
    path: &Path,
    quantize: QuantizeArgs,
    adapters: &AdapterArgs,
) -> Result<Loaded> {
    let mut src = ModelSource::open(path)?;
    let tokenizer = src.tokenizer.take();
    let planned = plan_adapters(&src.config, &src.path, adapters)?;
    apply_replacements(&mut src, &planned)?;
    let opts = LoadOptions {
        quantize: quantize.spec(),
    };
    let mut model =
        Model::load_with(&mut src, opts).with_context(|| format!("loading {}", path.display()))?;
    apply_planned(&mut model, &planned, adapters.strict)?;
    Ok(Loaded { model, tokenizer })
}

/// Puts planned adapters on a loaded model, checking each one's provenance record against the
/// base (warnings, or errors with `strict`).
pub fn apply_planned(model: &mut Model, planned: &[(Adapter, Plan)], strict: bool) -> Result<()> {
    for (a, plan) in planned {
        model
            .apply_adapter(plan)
            .with_context(|| format!("applying adapter {}", a.dir.display()))?;
        if let Some(p) = &a.provenance {
            let diffs = p.differences(&model.fingerprint, model.quantization.as_ref());
            for d in &diffs {
                if strict {
                    bail!("adapter {}: {d} (--strict)", a.dir.display());
                }
                eprintln!("warning: adapter {}: {d}", a.dir.display());
            }
        }
    }
    Ok(())
}

impl Loaded {
    pub fn tokenizer(&self, path: &Path) -> Result<&TokenizerInfo> {
        self.tokenizer.as_ref().with_context(|| {
            format!(
                "{}: no tokenizer found (tokenizer.json or GGUF tokenizer metadata); pass token ids with `qlora logits --tokens` or add tokenizer.json",
                path.display()
            )
        })
    }

    /// Token ids that end generation: the config's and the tokenizer's EOS.
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut ids = self.model.config.eos_token_ids();
        if let Some(t) = &self.tokenizer {
            if let Some(id) = t
                .eos_token
                .as_ref()
                .and_then(|e| t.tokenizer.token_to_id(e))
            {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// Encodes text; `special` adds BOS etc. the way the tokenizer's post-processor does.
pub fn encode(tok: &TokenizerInfo, text: &str, special: bool) -> Result<Vec<u32>> {
    let enc = tok
        .tokenizer
        .encode(text, special)
        .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
    Ok(enc.get_ids().to_vec())
}

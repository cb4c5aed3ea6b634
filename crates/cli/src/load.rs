//! Opening `--model PATH` (an HF directory or a .gguf file) into a model and its tokenizer.

use anyhow::{Context, Result};
use qlora_io::{ModelConfig, ModelSource, TokenizerInfo};
use qlora_lora::{Adapter, Plan};
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

/// Prints a library's warnings as the commands do.
pub fn warn_all(warnings: Vec<String>) {
    for w in warnings {
        eprintln!("warning: {w}");
    }
}

/// `qlora_model::plan::plan_adapters` for `--adapter`, its warnings on stderr.
pub fn plan_adapters(
    config: &ModelConfig,
    base: &Path,
    args: &AdapterArgs,
) -> Result<Vec<(Adapter, Plan)>> {
    let mut w = Vec::new();
    let planned = qlora_model::plan::plan_adapters(config, base, &args.adapters, &mut w);
    warn_all(w);
    Ok(planned?)
}

pub use qlora_model::plan::apply_replacements;

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

/// `qlora_model::plan::apply_planned`, its warnings on stderr.
pub fn apply_planned(model: &mut Model, planned: &[(Adapter, Plan)], strict: bool) -> Result<()> {
    let mut w = Vec::new();
    let r = qlora_model::plan::apply_planned(model, planned, strict, &mut w);
    warn_all(w);
    Ok(r?)
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

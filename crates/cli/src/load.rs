//! Opening `--model PATH` (an HF directory or a .gguf file) into a model and its tokenizer.

use anyhow::{Context, Result};
use qlora_io::{ModelSource, TokenizerInfo};
use qlora_model::Model;
use std::path::Path;

pub struct Loaded {
    pub model: Model,
    pub tokenizer: Option<TokenizerInfo>,
}

pub fn load(path: &Path) -> Result<Loaded> {
    let mut src = ModelSource::open(path)?;
    let tokenizer = src.tokenizer.take();
    let model = Model::load(&mut src).with_context(|| format!("loading {}", path.display()))?;
    Ok(Loaded { model, tokenizer })
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

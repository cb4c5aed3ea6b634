//! Writing a PEFT LoRA adapter directory: `adapter_model.safetensors` and an
//! `adapter_config.json` that PEFT 0.4 and later load (only the fields old versions know, plus
//! `use_rslora`/`use_dora` when set, so older PEFT does not refuse unknown keys).

use crate::{write_safetensors, Error, Result, WriteTensor};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// `adapter_config.json` as qlora writes it. Fields in alphabetical order: the file's key
/// order, as earlier versions wrote it.
#[derive(Debug, Clone, Serialize)]
pub struct PeftLoraConfig {
    pub alpha_pattern: BTreeMap<String, f64>,
    pub base_model_name_or_path: String,
    pub bias: &'static str,
    pub fan_in_fan_out: bool,
    pub inference_mode: bool,
    pub init_lora_weights: bool,
    pub layers_pattern: Option<String>,
    pub layers_to_transform: Option<Vec<usize>>,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub modules_to_save: Option<Vec<String>>,
    pub peft_type: &'static str,
    pub r: usize,
    pub rank_pattern: BTreeMap<String, usize>,
    pub revision: Option<String>,
    pub target_modules: Vec<String>,
    pub task_type: &'static str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub use_dora: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub use_rslora: bool,
}

impl PeftLoraConfig {
    /// A causal-LM LoRA of rank `r` on the named modules, no bias, no patterns.
    pub fn causal_lm(r: usize, lora_alpha: f64, lora_dropout: f64, targets: &[String]) -> Self {
        PeftLoraConfig {
            alpha_pattern: BTreeMap::new(),
            base_model_name_or_path: String::new(),
            bias: "none",
            fan_in_fan_out: false,
            inference_mode: true,
            init_lora_weights: true,
            layers_pattern: None,
            layers_to_transform: None,
            lora_alpha,
            lora_dropout,
            modules_to_save: None,
            peft_type: "LORA",
            r,
            rank_pattern: BTreeMap::new(),
            revision: None,
            target_modules: targets.to_vec(),
            task_type: "CAUSAL_LM",
            use_dora: false,
            use_rslora: false,
        }
    }
}

/// Writes `adapter_model.safetensors` (the tensors, PEFT's names) and `adapter_config.json`
/// into `dir`, which must exist.
pub fn write_peft_adapter(dir: &Path, tensors: &[WriteTensor], cfg: &PeftLoraConfig) -> Result<()> {
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(&dir.join("adapter_model.safetensors"), tensors, &meta)?;
    let path = dir.join("adapter_config.json");
    let text = serde_json::to_string_pretty(cfg).expect("serializable") + "\n";
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
}

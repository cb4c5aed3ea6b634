//! Provenance: the sidecar file qlora writes next to the adapters and models it makes, recording
//! the base they were made on, so that loading onto a different base (another checkpoint, or the
//! same weights without the quantization used in training) is said in plain words. It is a
//! separate file because older PEFT rejects unknown keys in adapter_config.json.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

pub const FILE: &str = "qlora_provenance.json";

/// How a base was quantized when the adapter was made.
#[derive(Debug, Clone, PartialEq)]
pub struct BaseQuantization {
    pub quant_type: String,
    pub blocksize: usize,
    pub double_quant: bool,
}

impl BaseQuantization {
    pub fn describe(q: Option<&BaseQuantization>) -> String {
        match q {
            None => "an unquantized (f32/f16/bf16) base".into(),
            Some(q) => format!(
                "a {} base ({}{})",
                q.quant_type.to_uppercase(),
                q.block_words(),
                if q.double_quant { ", double quant" } else { "" }
            ),
        }
    }

    /// "blocksize 64" (bitsandbytes), "group size 128" or "one group per row" (GPTQ/AWQ).
    pub fn block_words(&self) -> String {
        let grouped = self.quant_type.starts_with("gptq") || self.quant_type.starts_with("awq");
        match (grouped, self.blocksize) {
            (true, 0) => "one group per row".into(),
            (true, g) => format!("group size {g}"),
            (false, b) => format!("blocksize {b}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Provenance {
    pub qlora_version: String,
    /// `fingerprint` of the base checkpoint's files (see `Fingerprint`).
    pub base_fingerprint: String,
    pub base_quantization: Option<BaseQuantization>,
    pub base_path: Option<String>,
}

/// `qlora_provenance.json` as stored (keys in alphabetical order, as earlier versions wrote).
#[derive(Serialize, Deserialize)]
struct ProvenanceFile {
    base: BaseFile,
    #[serde(default = "unknown")]
    qlora_version: String,
}

#[derive(Serialize, Deserialize)]
struct BaseFile {
    fingerprint: String,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    quantization: Option<QuantizationFile>,
}

#[derive(Serialize, Deserialize)]
struct QuantizationFile {
    #[serde(default = "default_blocksize")]
    blocksize: usize,
    #[serde(default)]
    double_quant: bool,
    #[serde(rename = "type", default = "unknown")]
    quant_type: String,
}

fn unknown() -> String {
    "?".into()
}

fn default_blocksize() -> usize {
    64
}

/// Why a provenance file was refused (the caller adds its path).
#[derive(Debug, thiserror::Error)]
pub enum ProvenanceError {
    #[error("{0}")]
    Read(#[from] std::io::Error),
    #[error("invalid {FILE}: {0}")]
    Json(#[from] serde_json::Error),
}

impl Provenance {
    pub fn read(dir: &Path) -> Result<Option<Provenance>, ProvenanceError> {
        let p = dir.join(FILE);
        if !p.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&p)?;
        let f: ProvenanceFile = serde_json::from_str(&text)?;
        Ok(Some(Provenance {
            qlora_version: f.qlora_version,
            base_fingerprint: f.base.fingerprint,
            base_quantization: f.base.quantization.map(|q| BaseQuantization {
                quant_type: q.quant_type,
                blocksize: q.blocksize,
                double_quant: q.double_quant,
            }),
            base_path: f.base.path,
        }))
    }

    fn file(&self) -> ProvenanceFile {
        ProvenanceFile {
            qlora_version: self.qlora_version.clone(),
            base: BaseFile {
                fingerprint: self.base_fingerprint.clone(),
                path: self.base_path.clone(),
                quantization: self.base_quantization.as_ref().map(|q| QuantizationFile {
                    blocksize: q.blocksize,
                    double_quant: q.double_quant,
                    quant_type: q.quant_type.clone(),
                }),
            },
        }
    }

    pub fn to_json(&self) -> Value {
        serde_json::to_value(self.file()).expect("serializable")
    }

    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(&self.file()).expect("serializable") + "\n";
        std::fs::write(dir.join(FILE), text)
    }

    /// Plain-words differences between the base recorded here and the one being loaded.
    pub fn differences(
        &self,
        fingerprint: &str,
        quantization: Option<&BaseQuantization>,
    ) -> Vec<String> {
        let mut out = Vec::new();
        if self.base_quantization.as_ref() != quantization {
            out.push(format!(
                "this adapter was made on {} but is being applied to {}; its weights were fitted to the other base's rounding, so results will differ from what was trained (pass the same --quantize options as in training)",
                BaseQuantization::describe(self.base_quantization.as_ref()),
                BaseQuantization::describe(quantization)
            ));
        }
        if self.base_fingerprint != fingerprint {
            out.push(format!(
                "this adapter was made on a different base checkpoint (fingerprint {} recorded{}, this base is {})",
                self.base_fingerprint,
                self.base_path
                    .as_deref()
                    .map(|p| format!(" for {p}"))
                    .unwrap_or_default(),
                fingerprint
            ));
        }
        out
    }
}

/// A fingerprint of a checkpoint's tensors: FNV-1a over every tensor's name, type, shape and 64
/// evenly spaced 64-byte samples of its data (fast on a 7B model, and any re-export, fine-tune or
/// different model changes it).
#[derive(Default)]
pub struct Fingerprint {
    entries: Vec<(String, u64)>,
}

fn fnv(h: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *h ^= b as u64;
        *h = h.wrapping_mul(0x100_0000_01b3);
    }
}

impl Fingerprint {
    pub fn add(&mut self, name: &str, dtype: &str, shape: &[usize], data: &[u8]) {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        fnv(&mut h, name.as_bytes());
        fnv(&mut h, dtype.as_bytes());
        for d in shape {
            fnv(&mut h, &d.to_le_bytes());
        }
        fnv(&mut h, &data.len().to_le_bytes());
        let n = data.len();
        for i in 0..64 {
            let at = n.saturating_sub(64) * i / 63;
            fnv(&mut h, &data[at..(at + 64).min(n)]);
        }
        self.entries.push((name.to_string(), h));
    }

    pub fn finish(mut self) -> String {
        self.entries.sort();
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for (n, e) in &self.entries {
            fnv(&mut h, n.as_bytes());
            fnv(&mut h, &e.to_le_bytes());
        }
        format!("fnv64:{h:016x}")
    }
}

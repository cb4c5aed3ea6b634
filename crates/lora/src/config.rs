//! `adapter_config.json` (PEFT's LoraConfig), read by serde derives: every LoRA field PEFT has
//! written from 0.4 to today, each of the JSON type PEFT gives it (a wrong type is an error
//! naming the field), and unknown fields from newer versions kept as warnings, not errors.

use qlora_io::OrderedMap;
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;

/// `target_modules` / `exclude_modules`: a list of names (suffix match) or one regex (full match).
#[derive(Debug, Clone, PartialEq)]
pub enum Targets {
    List(Vec<String>),
    Regex(String),
}

impl Targets {
    /// PEFT's rule: a list entry `t` matches module `k` if `k == t` or `k` ends with `.t`; a string
    /// is a regex that must match all of `k`.
    pub fn matches(&self, module: &str) -> bool {
        match self {
            Targets::List(l) => l
                .iter()
                .any(|t| module == t || module.ends_with(&format!(".{t}"))),
            Targets::Regex(r) => regex::Regex::new(&format!("^(?:{r})$"))
                .map(|re| re.is_match(module))
                .unwrap_or(false),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Targets::List(l) => format!("[{}]", l.join(", ")),
            Targets::Regex(r) => format!("regex {r:?}"),
        }
    }
}

/// The LoRA fields of `adapter_config.json` that change what an adapter computes or where it
/// applies, plus the informational ones `inspect` prints.
#[derive(Debug, Clone)]
pub struct AdapterConfig {
    pub peft_type: String,
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub use_dora: bool,
    pub target_modules: Option<Targets>,
    pub exclude_modules: Option<Targets>,
    pub layers_to_transform: Option<Vec<usize>>,
    pub layers_pattern: Option<Vec<String>>,
    pub rank_pattern: Vec<(String, usize)>,
    pub alpha_pattern: Vec<(String, f64)>,
    pub modules_to_save: Vec<String>,
    pub fan_in_fan_out: bool,
    pub bias: String,
    pub lora_bias: bool,
    pub lora_dropout: f64,
    pub init_lora_weights: Value,
    pub base_model_name_or_path: Option<String>,
    pub revision: Option<String>,
    pub peft_version: Option<String>,
    pub task_type: Option<String>,
    /// Fields this reader does not know (from a newer PEFT): reported, never fatal.
    pub unknown_fields: Vec<String>,
}

/// Fields PEFT writes that do not change the computation of a LoRA adapter in inference, or that
/// only apply to methods whose presence is checked separately.
const KNOWN_INERT: &[&str] = &[
    "alora_invocation_tokens",
    "arrow_config",
    "auto_mapping",
    "corda_config",
    "ensure_weight_tying",
    "eva_config",
    "inference_mode",
    "kasa_config",
    "layer_replication",
    "loftq_config",
    "lora_ga_config",
    "megatron_config",
    "megatron_core",
    "monteclora_config",
    "qalora_group_size",
    "target_parameters",
    "trainable_token_indices",
    "use_bdlora",
    "use_qalora",
    "velora_config",
];

/// Why an `adapter_config.json` was refused (the file's path is added by the caller).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid JSON: {0}")]
    Json(serde_json::Error),
    #[error("not a JSON object ({0})")]
    NotAnObject(serde_json::Error),
    /// A field of the wrong JSON shape (serde's message, the field's path in the file).
    #[error("\"{field}\": {reason}")]
    Field { field: String, reason: String },
    #[error("peft_type is \"{0}\"; qlora applies LoRA adapters (and DoRA, which PEFT stores as LORA with use_dora)")]
    NotLora(String),
    #[error("\"r\" must be a positive integer, not {0}")]
    Rank(u64),
    #[error("\"lora_alpha\" must be a finite number, not {0}")]
    Alpha(f64),
    #[error("\"{field}\" key {pattern:?} is not a valid regular expression")]
    PatternRegex {
        field: &'static str,
        pattern: String,
    },
    #[error("\"rank_pattern\" entry {pattern:?} is {value}; a rank must be a positive integer")]
    PatternRank { pattern: String, value: f64 },
    #[error("\"alpha_pattern\" entry {pattern:?} is {value}; it must be a finite number")]
    PatternAlpha { pattern: String, value: f64 },
    #[error("init_lora_weights is \"{0}\": this initialization changes the base weights, so the adapter only works on the base it modified; convert it to a plain LoRA in PEFT first (path_initial_model_for_weight_conversion)")]
    BaseModifyingInit(String),
}

/// `target_modules` / `exclude_modules` as stored.
#[derive(Deserialize)]
#[serde(untagged, expecting = "a list of module names or a regex string")]
enum RawTargets {
    Regex(String),
    List(Vec<String>),
}

/// One value or a list of them (`layers_to_transform`, `layers_pattern`).
#[derive(Deserialize)]
#[serde(untagged, expecting = "one value or a list of them")]
enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    fn into_vec(self) -> Vec<T> {
        match self {
            OneOrMany::One(v) => vec![v],
            OneOrMany::Many(v) => v,
        }
    }
}

/// `adapter_config.json` as PEFT writes it, by serde: each field optional (absent and null
/// alike take PEFT's default), of the JSON shape PEFT gives it; every other key kept by name.
#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    peft_type: Option<String>,
    #[serde(default)]
    r: Option<u64>,
    #[serde(default)]
    lora_alpha: Option<f64>,
    #[serde(default)]
    use_rslora: Option<bool>,
    #[serde(default)]
    use_dora: Option<bool>,
    #[serde(default)]
    target_modules: Option<RawTargets>,
    #[serde(default)]
    exclude_modules: Option<RawTargets>,
    #[serde(default)]
    layers_to_transform: Option<OneOrMany<u64>>,
    #[serde(default)]
    layers_pattern: Option<OneOrMany<String>>,
    #[serde(default)]
    rank_pattern: Option<OrderedMap<f64>>,
    #[serde(default)]
    alpha_pattern: Option<OrderedMap<f64>>,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    fan_in_fan_out: Option<bool>,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    lora_bias: Option<bool>,
    #[serde(default)]
    lora_dropout: Option<f64>,
    #[serde(default)]
    init_lora_weights: Value,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
    #[serde(default)]
    revision: Option<String>,
    #[serde(default)]
    peft_version: Option<String>,
    #[serde(default)]
    task_type: Option<String>,
    #[serde(flatten)]
    rest: BTreeMap<String, IgnoredAny>,
}

/// PEFT matches pattern keys as regular expressions: an invalid one is an error, not a
/// silently skipped entry.
fn check_patterns<T>(field: &'static str, v: &[(String, T)]) -> Result<(), ConfigError> {
    match v
        .iter()
        .find(|(p, _)| regex::Regex::new(&format!("^(?:.*\\.)?(?:{p})$")).is_err())
    {
        Some((p, _)) => Err(ConfigError::PatternRegex {
            field,
            pattern: p.clone(),
        }),
        None => Ok(()),
    }
}

impl AdapterConfig {
    pub fn parse(text: &str) -> Result<AdapterConfig, ConfigError> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if inner.is_data() && path != "." {
                ConfigError::Field {
                    field: path,
                    reason: inner.to_string(),
                }
            } else if inner.is_data() {
                ConfigError::NotAnObject(inner)
            } else {
                ConfigError::Json(inner)
            }
        })?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: RawConfig) -> Result<AdapterConfig, ConfigError> {
        let peft_type = raw.peft_type.unwrap_or_else(|| "LORA".into());
        if peft_type != "LORA" {
            return Err(ConfigError::NotLora(peft_type));
        }
        let r = match raw.r {
            None => 8,
            Some(0) => return Err(ConfigError::Rank(0)),
            Some(r) => usize::try_from(r).map_err(|_| ConfigError::Rank(r))?,
        };
        let lora_alpha = raw.lora_alpha.unwrap_or(8.0);
        if !lora_alpha.is_finite() {
            return Err(ConfigError::Alpha(lora_alpha));
        }
        let rank_pattern = raw.rank_pattern.map(|o| o.0).unwrap_or_default();
        check_patterns("rank_pattern", &rank_pattern)?;
        let rank_pattern = rank_pattern
            .into_iter()
            .map(|(p, n)| {
                if n >= 1.0 && n.fract() == 0.0 && n <= u32::MAX as f64 {
                    Ok((p, n as usize))
                } else {
                    Err(ConfigError::PatternRank {
                        pattern: p,
                        value: n,
                    })
                }
            })
            .collect::<Result<_, _>>()?;
        let alpha_pattern = raw.alpha_pattern.map(|o| o.0).unwrap_or_default();
        check_patterns("alpha_pattern", &alpha_pattern)?;
        if let Some((p, a)) = alpha_pattern.iter().find(|(_, a)| !a.is_finite()) {
            return Err(ConfigError::PatternAlpha {
                pattern: p.clone(),
                value: *a,
            });
        }
        if let Some(s) = raw.init_lora_weights.as_str() {
            let lower = s.to_ascii_lowercase();
            if ["pissa", "olora", "corda", "loftq"]
                .iter()
                .any(|m| lower.starts_with(m))
            {
                return Err(ConfigError::BaseModifyingInit(s.to_string()));
            }
        }
        let targets = |t: Option<RawTargets>| {
            t.map(|t| match t {
                RawTargets::Regex(r) => Targets::Regex(r),
                RawTargets::List(l) => Targets::List(l),
            })
        };
        let unknown_fields = raw
            .rest
            .into_keys()
            .filter(|k| !KNOWN_INERT.contains(&k.as_str()))
            .collect();
        Ok(AdapterConfig {
            peft_type,
            r,
            lora_alpha,
            use_rslora: raw.use_rslora.unwrap_or(false),
            use_dora: raw.use_dora.unwrap_or(false),
            target_modules: targets(raw.target_modules),
            exclude_modules: targets(raw.exclude_modules),
            layers_to_transform: raw
                .layers_to_transform
                .map(|l| l.into_vec().into_iter().map(|i| i as usize).collect()),
            layers_pattern: raw.layers_pattern.map(OneOrMany::into_vec),
            rank_pattern,
            alpha_pattern,
            modules_to_save: raw.modules_to_save.unwrap_or_default(),
            fan_in_fan_out: raw.fan_in_fan_out.unwrap_or(false),
            bias: raw.bias.unwrap_or_else(|| "none".into()),
            lora_bias: raw.lora_bias.unwrap_or(false),
            lora_dropout: raw.lora_dropout.unwrap_or(0.0),
            init_lora_weights: raw.init_lora_weights,
            base_model_name_or_path: raw.base_model_name_or_path,
            revision: raw.revision,
            peft_version: raw.peft_version,
            task_type: raw.task_type,
            unknown_fields,
        })
    }

    /// The first `rank_pattern`/`alpha_pattern` key that matches a module, by PEFT's rule: the
    /// regex `(.*\.)?(key)$` matched from the start of the module name.
    fn pattern_value<T: Copy>(patterns: &[(String, T)], module: &str) -> Option<T> {
        patterns.iter().find_map(|(p, v)| {
            regex::Regex::new(&format!("^(?:.*\\.)?(?:{p})$"))
                .ok()
                .filter(|re| re.is_match(module))
                .map(|_| *v)
        })
    }

    /// Rank and alpha of one module after `rank_pattern` / `alpha_pattern`.
    pub fn rank_alpha(&self, module: &str) -> (usize, f64) {
        (
            Self::pattern_value(&self.rank_pattern, module).unwrap_or(self.r),
            Self::pattern_value(&self.alpha_pattern, module).unwrap_or(self.lora_alpha),
        )
    }

    /// alpha / r, or alpha / √r with rsLoRA.
    pub fn scaling(&self, module: &str) -> f32 {
        let (r, alpha) = self.rank_alpha(module);
        if self.use_rslora {
            (alpha / (r as f64).sqrt()) as f32
        } else {
            (alpha / r as f64) as f32
        }
    }

    /// Whether the config targets a module (what PEFT would wrap): target_modules, minus
    /// exclude_modules, restricted by layers_to_transform / layers_pattern for list targets.
    pub fn targets(&self, module: &str) -> bool {
        let Some(t) = &self.target_modules else {
            return false;
        };
        if !t.matches(module) {
            return false;
        }
        if self
            .exclude_modules
            .as_ref()
            .is_some_and(|e| e.matches(module))
        {
            return false;
        }
        if let (Some(layers), Targets::List(_)) = (&self.layers_to_transform, t) {
            let patterns = self.layers_pattern.clone().unwrap_or_default();
            let idx = layer_index(module, &patterns);
            return idx.is_some_and(|i| layers.contains(&i));
        }
        true
    }
}

/// The layer index in a module name (`.*?\.{pattern}\.(\d+)\.`, any segment without a pattern).
fn layer_index(module: &str, patterns: &[String]) -> Option<usize> {
    let res: Vec<String> = if patterns.is_empty() {
        vec![r"^.*?\.[^.]*\.(\d+)\.".into()]
    } else {
        patterns
            .iter()
            .map(|p| format!(r"^.*?\.{}\.(\d+)\.", regex::escape(p)))
            .collect()
    };
    res.iter().find_map(|r| {
        regex::Regex::new(r)
            .ok()?
            .captures(module)
            .and_then(|c| c[1].parse().ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaling_patterns_and_targets_follow_peft() {
        let c = AdapterConfig::parse(
            r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_rslora": true,
                "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 3},
                "target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1],
                "layers_pattern": "layers", "future_field": 1}"#,
        )
        .unwrap();
        assert_eq!(c.rank_alpha("model.layers.0.self_attn.q_proj"), (2, 16.0));
        assert!((c.scaling("model.layers.0.self_attn.q_proj") - 16.0 / 2f32.sqrt()).abs() < 1e-6);
        assert!((c.scaling("model.layers.0.self_attn.v_proj") - 3.0 / 8f32.sqrt()).abs() < 1e-6);
        assert!(c.targets("model.layers.1.self_attn.q_proj"));
        assert!(!c.targets("model.layers.0.self_attn.q_proj"));
        assert!(!c.targets("model.layers.1.self_attn.k_proj"));
        assert_eq!(c.unknown_fields, vec!["future_field".to_string()]);
        let re =
            AdapterConfig::parse(r#"{"target_modules": ".*\\.layers\\.1\\.mlp\\.(gate|up)_proj"}"#)
                .unwrap();
        assert!(re.targets("model.layers.1.mlp.gate_proj"));
        assert!(!re.targets("model.layers.0.mlp.gate_proj"));
    }

    #[test]
    fn bad_fields_are_named() {
        let e = |j: &str| AdapterConfig::parse(j).unwrap_err().to_string();
        assert!(e(r#"{"r": "eight"}"#).contains("\"r\""));
        assert!(e(r#"{"r": 0}"#).contains("positive integer"));
        assert!(e(r#"{"peft_type": "IA3"}"#).contains("IA3"));
        assert!(e("{not json").contains("invalid JSON"));
        assert!(e("[1, 2]").contains("not a JSON object"));
        assert!(e(r#"{"use_dora": 3}"#).contains("\"use_dora\""));
        assert!(e(r#"{"target_modules": 5}"#).contains("a list of module names or a regex"));
        assert!(e(r#"{"target_modules": ["q_proj", 5]}"#).contains("target_modules"));
        assert!(e(r#"{"layers_to_transform": [1, -2]}"#).contains("layers_to_transform"));
        assert!(e(r#"{"rank_pattern": {"q_proj": "x"}}"#).contains("rank_pattern.q_proj"));
        assert!(e(r#"{"init_lora_weights": "pissa_niter_4"}"#).contains("changes the base"));
    }

    #[test]
    fn patterns_and_alpha_that_would_panic_or_be_skipped_are_errors() {
        for (json, words) in [
            (r#"{"rank_pattern": {"q_proj": 0}}"#, "positive integer"),
            (r#"{"rank_pattern": {"q_proj": 2.5}}"#, "positive integer"),
            (r#"{"rank_pattern": {"q_proj": -3}}"#, "positive integer"),
            (
                r#"{"rank_pattern": {"q_proj(": 4}}"#,
                "not a valid regular expression",
            ),
            (
                r#"{"alpha_pattern": {"[v_proj": 4}}"#,
                "not a valid regular expression",
            ),
            (r#"{"lora_alpha": "x"}"#, "lora_alpha"),
        ] {
            let e = AdapterConfig::parse(json).unwrap_err().to_string();
            assert!(e.contains(words), "{json}: {e}");
        }
        assert!(AdapterConfig::parse(r#"{"rank_pattern": {"q_proj": 4}}"#).is_ok());
        // Two keys that both match: PEFT takes the first in the dict's (the file's) order.
        let c = AdapterConfig::parse(r#"{"rank_pattern": {"self_attn.q_proj": 4, "q_proj": 2}}"#)
            .unwrap();
        assert_eq!(c.rank_alpha("model.layers.0.self_attn.q_proj").0, 4);
    }
}

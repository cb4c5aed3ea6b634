//! `adapter_config.json` (PEFT's LoraConfig), read leniently: every LoRA field PEFT has written
//! from 0.4 to today, and unknown fields from newer versions kept as warnings, not errors.

use serde_json::{Map, Value};

/// `target_modules` / `exclude_modules`: a list of names (suffix match) or one regex (full match).
#[derive(Debug, Clone, PartialEq)]
pub enum Targets {
    List(Vec<String>),
    Regex(String),
}

impl Targets {
    fn from_value(v: &Value, field: &str) -> Result<Option<Targets>, String> {
        match v {
            Value::Null => Ok(None),
            Value::String(s) => Ok(Some(Targets::Regex(s.clone()))),
            Value::Array(a) => a
                .iter()
                .map(|x| {
                    x.as_str()
                        .map(String::from)
                        .ok_or(format!("\"{field}\" has a non-string entry {x}"))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(|l| Some(Targets::List(l))),
            other => Err(format!(
                "\"{field}\" must be a list of names or a regex string, not {other}"
            )),
        }
    }

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

impl AdapterConfig {
    pub fn parse(text: &str) -> Result<AdapterConfig, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
        let obj = v.as_object().ok_or("not a JSON object")?;
        Self::from_object(obj)
    }

    fn from_object(o: &Map<String, Value>) -> Result<AdapterConfig, String> {
        let get = |k: &str| o.get(k).unwrap_or(&Value::Null);
        let boolean = |k: &str| -> Result<bool, String> {
            match get(k) {
                Value::Null => Ok(false),
                Value::Bool(b) => Ok(*b),
                other => Err(format!("\"{k}\" must be true or false, not {other}")),
            }
        };
        let string = |k: &str| get(k).as_str().map(String::from);
        let peft_type = string("peft_type").unwrap_or_else(|| "LORA".into());
        if peft_type != "LORA" {
            return Err(format!(
                "peft_type is \"{peft_type}\"; qlora applies LoRA adapters (and DoRA, which PEFT stores as LORA with use_dora)"
            ));
        }
        let r = match get("r") {
            Value::Null => 8,
            v => v
                .as_u64()
                .filter(|r| *r > 0)
                .ok_or(format!("\"r\" must be a positive integer, not {v}"))?
                as usize,
        };
        let lora_alpha = match get("lora_alpha") {
            Value::Null => 8.0,
            v => v
                .as_f64()
                .filter(|a| a.is_finite())
                .ok_or(format!("\"lora_alpha\" must be a finite number, not {v}"))?,
        };
        let layers_to_transform = match get("layers_to_transform") {
            Value::Null => None,
            Value::Number(n) => Some(vec![n
                .as_u64()
                .ok_or("\"layers_to_transform\" must be a layer index")?
                as usize]),
            Value::Array(a) => Some(
                a.iter()
                    .map(|x| x.as_u64().map(|u| u as usize))
                    .collect::<Option<Vec<_>>>()
                    .ok_or("\"layers_to_transform\" must list layer indices")?,
            ),
            other => {
                return Err(format!(
                    "\"layers_to_transform\" must be a list of layer indices, not {other}"
                ))
            }
        };
        let layers_pattern = match get("layers_pattern") {
            Value::Null => None,
            Value::String(s) => Some(vec![s.clone()]),
            Value::Array(a) => Some(
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect(),
            ),
            other => {
                return Err(format!(
                    "\"layers_pattern\" must be a string or a list, not {other}"
                ))
            }
        };
        let pattern = |k: &str| -> Result<Vec<(String, f64)>, String> {
            match get(k) {
                Value::Null => Ok(Vec::new()),
                Value::Object(m) => m
                    .iter()
                    .map(|(p, v)| {
                        v.as_f64()
                            .map(|n| (p.clone(), n))
                            .ok_or(format!("\"{k}\" entry {p:?} must be a number, not {v}"))
                    })
                    .collect(),
                other => Err(format!("\"{k}\" must be an object, not {other}")),
            }
            .and_then(|v: Vec<(String, f64)>| {
                // PEFT matches these keys as regular expressions: an invalid one is an error,
                // not a silently skipped entry.
                match v
                    .iter()
                    .find(|(p, _)| regex::Regex::new(&format!("^(?:.*\\.)?(?:{p})$")).is_err())
                {
                    Some((p, _)) => Err(format!(
                        "\"{k}\" key {p:?} is not a valid regular expression"
                    )),
                    None => Ok(v),
                }
            })
        };
        let modules_to_save = match get("modules_to_save") {
            Value::Null => Vec::new(),
            Value::Array(a) => a
                .iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect(),
            other => return Err(format!("\"modules_to_save\" must be a list, not {other}")),
        };
        let init = get("init_lora_weights").clone();
        if let Some(s) = init.as_str() {
            let lower = s.to_ascii_lowercase();
            if ["pissa", "olora", "corda", "loftq"]
                .iter()
                .any(|m| lower.starts_with(m))
            {
                return Err(format!(
                    "init_lora_weights is \"{s}\": this initialization changes the base weights, so the adapter only works on the base it modified; convert it to a plain LoRA in PEFT first (path_initial_model_for_weight_conversion)"
                ));
            }
        }
        let known: Vec<&str> = [
            "peft_type",
            "r",
            "lora_alpha",
            "use_rslora",
            "use_dora",
            "target_modules",
            "exclude_modules",
            "layers_to_transform",
            "layers_pattern",
            "rank_pattern",
            "alpha_pattern",
            "modules_to_save",
            "fan_in_fan_out",
            "bias",
            "lora_bias",
            "lora_dropout",
            "init_lora_weights",
            "base_model_name_or_path",
            "revision",
            "peft_version",
            "task_type",
        ]
        .into_iter()
        .chain(KNOWN_INERT.iter().copied())
        .collect();
        let unknown_fields = o
            .keys()
            .filter(|k| !known.contains(&k.as_str()))
            .cloned()
            .collect();
        Ok(AdapterConfig {
            peft_type,
            r,
            lora_alpha,
            use_rslora: boolean("use_rslora")?,
            use_dora: boolean("use_dora")?,
            target_modules: Targets::from_value(get("target_modules"), "target_modules")?,
            exclude_modules: Targets::from_value(get("exclude_modules"), "exclude_modules")?,
            layers_to_transform,
            layers_pattern,
            rank_pattern: pattern("rank_pattern")?
                .into_iter()
                .map(|(p, n)| {
                    if n >= 1.0 && n.fract() == 0.0 && n <= u32::MAX as f64 {
                        Ok((p, n as usize))
                    } else {
                        Err(format!("\"rank_pattern\" entry {p:?} is {n}; a rank must be a positive integer"))
                    }
                })
                .collect::<Result<_, String>>()?,
            alpha_pattern: pattern("alpha_pattern")?
                .into_iter()
                .map(|(p, a)| {
                    if a.is_finite() {
                        Ok((p, a))
                    } else {
                        Err(format!("\"alpha_pattern\" entry {p:?} is {a}; it must be a finite number"))
                    }
                })
                .collect::<Result<_, String>>()?,
            modules_to_save,
            fan_in_fan_out: boolean("fan_in_fan_out")?,
            bias: string("bias").unwrap_or_else(|| "none".into()),
            lora_bias: boolean("lora_bias")?,
            lora_dropout: get("lora_dropout").as_f64().unwrap_or(0.0),
            init_lora_weights: init,
            base_model_name_or_path: string("base_model_name_or_path"),
            revision: string("revision"),
            peft_version: string("peft_version"),
            task_type: string("task_type"),
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
        assert!(AdapterConfig::parse(r#"{"r": "eight"}"#)
            .unwrap_err()
            .contains("\"r\""));
        assert!(AdapterConfig::parse(r#"{"peft_type": "IA3"}"#)
            .unwrap_err()
            .contains("IA3"));
        assert!(AdapterConfig::parse("{not json")
            .unwrap_err()
            .contains("invalid JSON"));
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
            let e = AdapterConfig::parse(json).unwrap_err();
            assert!(e.contains(words), "{json}: {e}");
        }
        assert!(AdapterConfig::parse(r#"{"rank_pattern": {"q_proj": 4}}"#).is_ok());
    }
}

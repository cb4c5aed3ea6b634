//! GPTQ and AWQ checkpoints: config.json's `quantization_config` (or AutoGPTQ's separate
//! `quantize_config.json`) and the unpacking of their int32 tensors into per-output-row codes.
//!
//! Layouts (`../shared/docs/formats.md` §5), for a linear with `in` inputs and `out` outputs
//! and `p = 32 / bits` values a word:
//! - GPTQ `qweight` i32 `[in / p, out]`, packed along the input: word `[r, o]` holds inputs
//!   `p·r … p·r + p − 1` of output `o`, LSB first. `qzeros` i32 `[groups, out / p]`, packed
//!   along the output the same way; format `gptq` (v1) stores every zero minus one, subtracted
//!   from the packed word (so a borrow can cross fields), `gptq_v2` the zero itself. `scales`
//!   `[groups, out]`; `g_idx` i32 `[in]`, the group of each input (not monotone with act-order).
//! - AWQ (`version: gemm`) `qweight` i32 `[in, out / 8]`, packed along the output in the order
//!   `0 2 4 6 1 3 5 7`; `qzeros` `[in / G, out / 8]` the same, holding the zero itself;
//!   `scales` `[in / G, out]`; no `g_idx` (groups are contiguous).
//!
//! Both dequantize as `w[o, i] = scale[g, o] · (q[o, i] − zero[g, o])`, `g` the group of `i`.

use serde::Deserialize;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// Which library's layout the checkpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupedMethod {
    Gptq,
    Awq,
}

impl GroupedMethod {
    pub fn name(&self) -> &'static str {
        match self {
            GroupedMethod::Gptq => "gptq",
            GroupedMethod::Awq => "awq",
        }
    }
}

/// One entry of GPTQModel's `dynamic`: modules whose name matches `pattern` (a literal name,
/// or a regex anchored at the start as Python's `re.match`) are left dense (`-:` prefix) or
/// quantized with the given fields overridden. The first matching entry, in file order, wins.
#[derive(Debug, Clone, PartialEq)]
pub struct DynamicRule {
    pub pattern: String,
    pub dense: bool,
    pub bits: Option<u32>,
    pub group_size: Option<Option<usize>>,
    pub sym: Option<bool>,
    pub desc_act: Option<bool>,
}

/// The `dynamic` object of a config file's `quantization_config` (or of quantize_config.json
/// itself), in file order.
fn dynamic_in_order(
    text: &str,
    nested: bool,
) -> Result<Option<Vec<(String, Value)>>, GroupedError> {
    #[derive(Deserialize)]
    struct Q {
        #[serde(default)]
        dynamic: Option<crate::OrderedMap<Value>>,
    }
    #[derive(Deserialize)]
    struct C {
        #[serde(default)]
        quantization_config: Option<Q>,
    }
    let q = if nested {
        serde_json::from_str::<C>(text)?.quantization_config
    } else {
        Some(serde_json::from_str::<Q>(text)?)
    };
    Ok(q.and_then(|q| q.dynamic).map(|o| o.0))
}

/// A GPTQ or AWQ `quantization_config`, validated.
/// Why a GPTQ/AWQ config or linear was refused (the caller names the file or tensor).
#[derive(Debug, thiserror::Error)]
pub enum GroupedError {
    #[error("invalid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("\"quantization_config\" is not a JSON object")]
    NotAnObject,
    #[error("quantization_config.{key} is {value}, expected an integer")]
    NotAnInteger { key: String, value: Value },
    #[error("quantization_config for {0} has no \"bits\"; the checkpoint's config is incomplete")]
    NoBits(&'static str),
    #[error("{method} with {bits}-bit weights is not supported (qlora reads {method} with {supported} bits); re-quantize at 4 bits")]
    Bits {
        method: &'static str,
        bits: i64,
        supported: &'static str,
    },
    #[error("quantization_config.group_size is {0}; expected a positive size or -1")]
    GroupSize(i64),
    #[error("AWQ with group_size -1 is not a layout AutoAWQ writes")]
    AwqWithoutGroups,
    #[error("{method} checkpoint format \"{format}\" is not supported (qlora reads {supported}); convert it with GPTQModel first")]
    Format {
        method: &'static str,
        format: String,
        supported: &'static str,
    },
    #[error("quantization_config.dynamic gives {module} {bits} bits (entry \"{pattern}\"); qlora reads {method} with {supported} bits")]
    DynamicBits {
        module: String,
        bits: u32,
        pattern: String,
        method: &'static str,
        supported: &'static str,
    },
    #[error(
        "quantization_config.dynamic entry \"{pattern}\" is not a regex qlora can read: {source}"
    )]
    DynamicRegex {
        pattern: String,
        source: regex::Error,
    },
    #[error("quantization_config.dynamic[\"{key}\"] is {value}, expected an object")]
    DynamicNotAnObject { key: String, value: Value },
    #[error("quantization_config.dynamic[\"{key}\"].{field} is {value}, expected an integer")]
    DynamicNotAnInteger {
        key: String,
        field: String,
        value: Value,
    },
    #[error("quantization_config.dynamic[\"{key}\"].group_size is {value}; expected a positive size or -1")]
    DynamicGroupSize { key: String, value: i64 },
    #[error("quantization_config.dynamic[\"{key}\"].bits is {value}")]
    DynamicBitsRange { key: String, value: i64 },
    #[error("a [{out}, {inp}] linear cannot be GPTQ-packed at {bits} bits ({per} values a word need both dims to be multiples of {per})")]
    GptqShape {
        out: usize,
        inp: usize,
        bits: u32,
        per: usize,
    },
    #[error("a [{out}, {inp}] linear cannot be AWQ-packed with group size {group} (outputs must be a multiple of 8, inputs of the group size)")]
    AwqShape {
        out: usize,
        inp: usize,
        group: usize,
    },
    #[error("g_idx has {len} entries for {inp} inputs")]
    GIdxLen { len: usize, inp: usize },
    #[error("g_idx[{index}] = {value} is out of range: the scales have {groups} groups; the checkpoint is corrupt")]
    GIdxRange {
        index: usize,
        value: i32,
        groups: usize,
    },
    #[error("scale {value} at [{row}, {col}] is not finite; the checkpoint is corrupt")]
    Scale { value: f32, row: usize, col: usize },
}

/// The bit widths qlora reads for a method, and as words.
fn supported_bits(m: GroupedMethod) -> (&'static [u32], &'static str) {
    match m {
        GroupedMethod::Gptq => (&[4, 8], "4 or 8"),
        GroupedMethod::Awq => (&[4], "4"),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct GroupedConfig {
    pub method: GroupedMethod,
    /// 4 or 8 (GPTQ); 4 (AWQ).
    pub bits: u32,
    /// Inputs per group; `None` for one group over the whole input (`group_size: -1`).
    pub group_size: Option<usize>,
    /// GPTQ act-order: inputs grouped through `g_idx`, not by position.
    pub desc_act: bool,
    pub sym: bool,
    /// GPTQ v1 (`checkpoint_format: gptq`): zeros are stored minus one.
    pub zeros_minus_one: bool,
    /// GPTQModel's per-module overrides, in file order.
    pub dynamic: Vec<DynamicRule>,
}

impl GroupedConfig {
    /// The config of a GPTQ/AWQ checkpoint: `quantization_config` from config.json when it has
    /// one, else `dir/quantize_config.json` (AutoGPTQ's older layout). `Ok(None)` for other
    /// checkpoints.
    pub fn from_model(dir: &Path, q: Option<&Value>) -> crate::Result<Option<GroupedConfig>> {
        let bad = |path: PathBuf| {
            move |e: GroupedError| crate::Error::Config {
                path,
                reason: e.to_string(),
            }
        };
        let cfg = dir.join("config.json");
        if let Some(q) = q {
            let Some(mut c) = Self::from_value(q).map_err(bad(cfg.clone()))? else {
                return Ok(None);
            };
            if q.get("dynamic").is_some_and(|d| !d.is_null()) {
                let text = std::fs::read_to_string(&cfg).map_err(|e| crate::Error::io(&cfg, e))?;
                let order = dynamic_in_order(&text, true).map_err(bad(cfg.clone()))?;
                c.dynamic = parse_dynamic(&order.unwrap_or_default()).map_err(bad(cfg))?;
            }
            return Ok(Some(c));
        }
        let side = dir.join("quantize_config.json");
        if !side.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&side).map_err(|e| crate::Error::io(&side, e))?;
        let mut v: Value = serde_json::from_str(&text).map_err(|e| crate::Error::Json {
            path: side.clone(),
            reason: e.to_string(),
        })?;
        // AutoGPTQ's file has no quant_method key: it is GPTQ by being there.
        if let Some(o) = v.as_object_mut() {
            o.entry("quant_method")
                .or_insert_with(|| Value::String("gptq".into()));
        }
        let Some(mut c) = Self::from_value(&v).map_err(bad(side.clone()))? else {
            return Ok(None);
        };
        let order = dynamic_in_order(&text, false).map_err(bad(side.clone()))?;
        c.dynamic = parse_dynamic(&order.unwrap_or_default()).map_err(bad(side))?;
        Ok(Some(c))
    }

    /// The config that applies to module `name` (e.g. `model.layers.3.mlp.down_proj`,
    /// `lm_head`): `None` when a `dynamic` entry leaves it dense.
    pub fn for_module(&self, name: &str) -> Result<Option<GroupedConfig>, GroupedError> {
        for r in &self.dynamic {
            if !rule_matches(&r.pattern, name)? {
                continue;
            }
            if r.dense {
                return Ok(None);
            }
            let mut c = self.clone();
            c.dynamic.clear();
            if let Some(b) = r.bits {
                c.bits = b;
            }
            if let Some(g) = r.group_size {
                c.group_size = g;
            }
            if let Some(s) = r.sym {
                c.sym = s;
            }
            if let Some(d) = r.desc_act {
                c.desc_act = d;
            }
            let (ok, words) = supported_bits(c.method);
            if !ok.contains(&c.bits) {
                return Err(GroupedError::DynamicBits {
                    module: name.to_string(),
                    bits: c.bits,
                    pattern: r.pattern.clone(),
                    method: c.method.name(),
                    supported: words,
                });
            }
            return Ok(Some(c));
        }
        Ok(Some(self.clone()))
    }

    /// `Ok(None)` when `quant_method` is neither `gptq` nor `awq`; the error is the reason
    /// (`from_model` names the file).
    pub(crate) fn from_value(q: &Value) -> Result<Option<GroupedConfig>, GroupedError> {
        let obj = q.as_object().ok_or(GroupedError::NotAnObject)?;
        let method = match obj.get("quant_method").and_then(Value::as_str) {
            Some("gptq") => GroupedMethod::Gptq,
            Some("awq") => GroupedMethod::Awq,
            _ => return Ok(None),
        };
        let int = |k: &str| -> Result<Option<i64>, GroupedError> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_i64()
                    .map(Some)
                    .ok_or_else(|| GroupedError::NotAnInteger {
                        key: k.to_string(),
                        value: v.clone(),
                    }),
            }
        };
        let flag = |o: &Map<String, Value>, k: &str| o.get(k).and_then(Value::as_bool);
        let m = method.name();
        let bits = int("bits")?
            .or(int("w_bit")?)
            .ok_or(GroupedError::NoBits(m))?;
        let (supported, words) = supported_bits(method);
        if !supported.iter().any(|&b| i64::from(b) == bits) {
            return Err(GroupedError::Bits {
                method: m,
                bits,
                supported: words,
            });
        }
        let gs = int("group_size")?.or(int("q_group_size")?).unwrap_or(-1);
        let group_size = match gs {
            -1 => None,
            g if g > 0 => Some(g as usize),
            g => return Err(GroupedError::GroupSize(g)),
        };
        if method == GroupedMethod::Awq && group_size.is_none() {
            return Err(GroupedError::AwqWithoutGroups);
        }
        let format = obj
            .get("checkpoint_format")
            .or(obj.get("format"))
            .or(obj.get("version"))
            .and_then(Value::as_str)
            .map(str::to_ascii_lowercase);
        let zeros_minus_one = match (method, format.as_deref()) {
            (GroupedMethod::Gptq, None | Some("gptq")) => true,
            (GroupedMethod::Gptq, Some("gptq_v2")) => false,
            (GroupedMethod::Awq, None | Some("gemm")) => false,
            (_, Some(f)) => {
                return Err(GroupedError::Format {
                    method: m,
                    format: f.to_string(),
                    supported: match method {
                        GroupedMethod::Gptq => "\"gptq\" and \"gptq_v2\"",
                        GroupedMethod::Awq => "\"gemm\"",
                    },
                })
            }
        };
        Ok(Some(GroupedConfig {
            dynamic: Vec::new(),
            method,
            bits: bits as u32,
            group_size,
            desc_act: flag(obj, "desc_act").unwrap_or(false),
            sym: flag(obj, "sym")
                .or(flag(obj, "zero_point").map(|z| !z))
                .unwrap_or(true),
            zeros_minus_one,
        }))
    }

    /// What `qlora inspect` and the provenance record call it, e.g. `gptq-int4`.
    pub fn quant_type(&self) -> String {
        format!("{}-int{}", self.method.name(), self.bits)
    }
}

/// Whether a `dynamic` pattern (its `+:`/`-:` prefix removed) selects module `name`: equality
/// for a literal, Python's `re.match` (anchored at the start) for a regex.
fn rule_matches(pattern: &str, name: &str) -> Result<bool, GroupedError> {
    if !pattern.contains([
        '.', '^', '$', '*', '+', '?', '(', ')', '[', ']', '{', '}', '|', '\\',
    ]) {
        return Ok(pattern == name);
    }
    let re = regex::Regex::new(&format!("^(?:{pattern})")).map_err(|source| {
        GroupedError::DynamicRegex {
            pattern: pattern.to_string(),
            source,
        }
    })?;
    Ok(re.is_match(name))
}

/// GPTQModel's `dynamic` entries, in order.
fn parse_dynamic(entries: &[(String, Value)]) -> Result<Vec<DynamicRule>, GroupedError> {
    let mut rules = Vec::new();
    for (key, v) in entries {
        let (dense, pattern) = match key.strip_prefix("-:") {
            Some(p) => (true, p),
            None => (false, key.strip_prefix("+:").unwrap_or(key)),
        };
        let o = v
            .as_object()
            .ok_or_else(|| GroupedError::DynamicNotAnObject {
                key: key.clone(),
                value: v.clone(),
            })?;
        let int = |k: &str| -> Result<Option<i64>, GroupedError> {
            match o.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_i64()
                    .map(Some)
                    .ok_or_else(|| GroupedError::DynamicNotAnInteger {
                        key: key.clone(),
                        field: k.to_string(),
                        value: x.clone(),
                    }),
            }
        };
        let group_size = match int("group_size")? {
            None => None,
            Some(-1) => Some(None),
            Some(g) if g > 0 => Some(Some(g as usize)),
            Some(g) => {
                return Err(GroupedError::DynamicGroupSize {
                    key: key.clone(),
                    value: g,
                })
            }
        };
        let bits = match int("bits")? {
            None => None,
            Some(b) if (1..=32).contains(&b) => Some(b as u32),
            Some(b) => {
                return Err(GroupedError::DynamicBitsRange {
                    key: key.clone(),
                    value: b,
                })
            }
        };
        rule_matches(pattern, "")?;
        rules.push(DynamicRule {
            pattern: pattern.to_string(),
            dense,
            bits,
            group_size,
            sym: o.get("sym").and_then(Value::as_bool),
            desc_act: o.get("desc_act").and_then(Value::as_bool),
        });
    }
    Ok(rules)
}

/// One linear's grouped-integer weight, unpacked to qlora's layout.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupedParts {
    /// `[out, in]` codes, row-major: two a byte (element `2k` in the high nibble, as
    /// bitsandbytes packs) for 4 bits, one a byte for 8.
    pub codes: Vec<u8>,
    /// The group of each input column, `< groups`.
    pub g_idx: Vec<u32>,
    /// `[out, groups]`, row-major.
    pub scales: Vec<f32>,
    /// `[out, groups]`, the integer zero points (`0 ..= 2^bits`).
    pub zeros: Vec<f32>,
    pub groups: usize,
}

/// Little-endian int32 words (any alignment).
fn words(bytes: &[u8]) -> Vec<u32> {
    bytemuck::pod_collect_to_vec(bytes)
}

/// AWQ's nibble slot of output `8c + j` within word `c`.
const AWQ_SLOT: [usize; 8] = [0, 4, 1, 5, 2, 6, 3, 7];

/// Unpacks the zero points `[groups, out / p]` (packed along the output).
fn unpack_zeros(
    qzeros: &[u8],
    groups: usize,
    out: usize,
    bits: u32,
    method: GroupedMethod,
    minus_one: bool,
) -> Vec<f32> {
    let p = (32 / bits) as usize;
    let mask = (1u32 << bits) - 1;
    // v1 subtracted one from every field of the packed word; adding it back to the word undoes
    // any borrow between fields (what GPTQModel's v1 → v2 conversion does).
    let one: u32 = (0..p).fold(0, |w, j| w | (1 << (bits as usize * j)));
    let mut w = words(qzeros);
    if minus_one {
        w.iter_mut().for_each(|x| *x = x.wrapping_add(one));
    }
    let per_row = out / p;
    let mut z = vec![0f32; out * groups];
    for g in 0..groups {
        for o in 0..out {
            let slot = match method {
                GroupedMethod::Awq => AWQ_SLOT[o % 8],
                GroupedMethod::Gptq => o % p,
            };
            let v = (w[g * per_row + o / p] >> (bits as usize * slot)) & mask;
            z[o * groups + g] = v as f32;
        }
    }
    z
}

/// `[groups, out]` scales of any float type (already widened to f32) → `[out, groups]`.
fn transpose_scales(s: &[f32], groups: usize, out: usize) -> Vec<f32> {
    let mut t = vec![0f32; s.len()];
    for g in 0..groups {
        for o in 0..out {
            t[o * groups + g] = s[g * out + o];
        }
    }
    t
}

fn put_code(codes: &mut [u8], bits: u32, cols: usize, o: usize, i: usize, v: u32) {
    if bits == 8 {
        codes[o * cols + i] = v as u8;
    } else {
        let e = o * cols + i;
        codes[e / 2] |= (v as u8) << (4 * (1 - e % 2));
    }
}

/// The groups a linear's checkpoint tensors imply, and each tensor's expected shape, for
/// checking shapes before unpacking (the caller names the tensor that disagrees).
pub struct GroupedShapes {
    pub groups: usize,
    pub qweight: [usize; 2],
    pub qzeros: [usize; 2],
    pub scales: [usize; 2],
}

impl GroupedConfig {
    /// The tensor shapes a `[out, in]` linear must have, or why it cannot be stored this way.
    pub fn shapes(&self, out: usize, inp: usize) -> Result<GroupedShapes, GroupedError> {
        let p = (32 / self.bits) as usize;
        let gs = self.group_size.unwrap_or(inp).min(inp.max(1));
        let groups = inp.div_ceil(gs.max(1)).max(1);
        match self.method {
            GroupedMethod::Gptq => {
                if !inp.is_multiple_of(p) || !out.is_multiple_of(p) {
                    return Err(GroupedError::GptqShape {
                        out,
                        inp,
                        bits: self.bits,
                        per: p,
                    });
                }
                Ok(GroupedShapes {
                    groups,
                    qweight: [inp / p, out],
                    qzeros: [groups, out / p],
                    scales: [groups, out],
                })
            }
            GroupedMethod::Awq => {
                if !out.is_multiple_of(8) || !inp.is_multiple_of(gs) {
                    return Err(GroupedError::AwqShape {
                        out,
                        inp,
                        group: gs,
                    });
                }
                Ok(GroupedShapes {
                    groups,
                    qweight: [inp, out / 8],
                    qzeros: [groups, out / 8],
                    scales: [groups, out],
                })
            }
        }
    }

    /// Unpacks one linear. `qweight`/`qzeros` are the i32 tensors' bytes, `scales` widened to
    /// f32 in their stored `[groups, out]` order, `g_idx` the GPTQ tensor if present. Shapes
    /// must already match `shapes(out, inp)`; the error names what is out of range.
    pub fn unpack(
        &self,
        out: usize,
        inp: usize,
        qweight: &[u8],
        qzeros: &[u8],
        scales: &[f32],
        g_idx: Option<&[i32]>,
    ) -> Result<GroupedParts, GroupedError> {
        let sh = self.shapes(out, inp)?;
        let groups = sh.groups;
        let bits = self.bits;
        let p = (32 / bits) as usize;
        let mask = (1u32 << bits) - 1;
        let gs = self.group_size.unwrap_or(inp).min(inp.max(1)).max(1);
        let g_idx: Vec<u32> = match g_idx {
            Some(g) => {
                if g.len() != inp {
                    return Err(GroupedError::GIdxLen { len: g.len(), inp });
                }
                if let Some((i, &v)) = g
                    .iter()
                    .enumerate()
                    .find(|(_, &v)| v < 0 || v as usize >= groups)
                {
                    return Err(GroupedError::GIdxRange {
                        index: i,
                        value: v,
                        groups,
                    });
                }
                g.iter().map(|&v| v as u32).collect()
            }
            None => (0..inp).map(|i| (i / gs) as u32).collect(),
        };
        let nbytes = if bits == 8 {
            out * inp
        } else {
            (out * inp).div_ceil(2)
        };
        let mut codes = vec![0u8; nbytes];
        let w = words(qweight);
        match self.method {
            GroupedMethod::Gptq => {
                for r in 0..inp / p {
                    for o in 0..out {
                        let word = w[r * out + o];
                        for j in 0..p {
                            let v = (word >> (bits as usize * j)) & mask;
                            put_code(&mut codes, bits, inp, o, r * p + j, v);
                        }
                    }
                }
            }
            GroupedMethod::Awq => {
                let per_row = out / 8;
                for i in 0..inp {
                    for o in 0..out {
                        let word = w[i * per_row + o / 8];
                        let v = (word >> (4 * AWQ_SLOT[o % 8])) & 0xF;
                        put_code(&mut codes, bits, inp, o, i, v);
                    }
                }
            }
        }
        if let Some((k, s)) = scales.iter().enumerate().find(|(_, s)| !s.is_finite()) {
            return Err(GroupedError::Scale {
                value: *s,
                row: k / out,
                col: k % out,
            });
        }
        Ok(GroupedParts {
            codes,
            g_idx,
            scales: transpose_scales(scales, groups, out),
            zeros: unpack_zeros(qzeros, groups, out, bits, self.method, self.zeros_minus_one),
            groups,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(v: Value) -> Result<Option<GroupedConfig>, GroupedError> {
        GroupedConfig::from_value(&v)
    }

    #[test]
    fn configs_are_read_and_checked() {
        let c = cfg(json!({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": true, "sym": false}))
            .unwrap()
            .unwrap();
        assert_eq!(c.group_size, Some(128));
        assert!(c.desc_act && !c.sym && c.zeros_minus_one);
        let v2 = cfg(json!({"quant_method": "gptq", "bits": 8, "group_size": -1, "checkpoint_format": "gptq_v2"}))
            .unwrap()
            .unwrap();
        assert_eq!(
            (v2.bits, v2.group_size, v2.zeros_minus_one),
            (8, None, false)
        );
        let awq = cfg(json!({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": true, "version": "gemm"}))
            .unwrap()
            .unwrap();
        assert!(!awq.sym && !awq.zeros_minus_one);
        assert_eq!(cfg(json!({"quant_method": "bitsandbytes"})).unwrap(), None);
        let d = parse_dynamic(&[
            (r"-:model\.layers\.1\.mlp\.down_proj".into(), json!({})),
            (".*gate_proj".into(), json!({"bits": 8, "group_size": 64})),
            (
                "lm_head".into(),
                json!({"bits": 8, "group_size": -1, "sym": true}),
            ),
            (".*".into(), json!({"bits": 4})),
        ])
        .unwrap();
        let base = GroupedConfig {
            dynamic: d,
            ..c.clone()
        };
        assert_eq!(
            base.for_module("model.layers.1.mlp.down_proj").unwrap(),
            None
        );
        let g = base
            .for_module("model.layers.0.mlp.gate_proj")
            .unwrap()
            .unwrap();
        assert_eq!((g.bits, g.group_size), (8, Some(64)));
        let h = base.for_module("lm_head").unwrap().unwrap();
        assert_eq!((h.bits, h.group_size, h.sym), (8, None, true));
        // Anchored at the start, as re.match: "mlp" alone does not match a full name.
        let m = parse_dynamic(&[("mlp".into(), json!({"bits": 8}))]).unwrap();
        let m = GroupedConfig {
            dynamic: m,
            ..c.clone()
        };
        assert_eq!(
            m.for_module("model.layers.0.mlp.up_proj")
                .unwrap()
                .unwrap()
                .bits,
            4
        );
        let bad = parse_dynamic(&[("(unclosed".into(), json!({}))])
            .unwrap_err()
            .to_string();
        assert!(bad.contains("(unclosed"), "{bad}");
        let three = GroupedConfig {
            dynamic: parse_dynamic(&[(".*".into(), json!({"bits": 3}))]).unwrap(),
            ..c.clone()
        };
        assert!(three
            .for_module("x")
            .unwrap_err()
            .to_string()
            .contains("3 bits"));
        for (bad, says) in [
            (
                json!({"quant_method": "gptq", "bits": 3, "group_size": 128}),
                "3-bit",
            ),
            (
                json!({"quant_method": "gptq", "group_size": 128}),
                "no \"bits\"",
            ),
            (
                json!({"quant_method": "gptq", "bits": 4, "group_size": 0}),
                "group_size is 0",
            ),
            (
                json!({"quant_method": "gptq", "bits": "4"}),
                "expected an integer",
            ),
            (
                json!({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}),
                "\"gemv\"",
            ),
            (
                json!({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}),
                "\"marlin\"",
            ),
        ] {
            let e = cfg(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn v1_zeros_undo_the_borrow_of_the_packed_subtraction() {
        // Zeros 0, 3, 15, 8 … packed, then one subtracted from every field as AutoGPTQ did:
        // the 0 field borrows from its neighbour.
        let z = [0u32, 3, 15, 8, 1, 0, 7, 2];
        let packed: u32 = z.iter().enumerate().map(|(j, &v)| v << (4 * j)).sum();
        let v1 = packed.wrapping_sub(0x1111_1111);
        let got = unpack_zeros(&v1.to_le_bytes(), 1, 8, 4, GroupedMethod::Gptq, true);
        assert_eq!(got, z.map(|v| v as f32));
    }

    #[test]
    fn awq_order_and_gptq_order_unpack_to_the_same_codes() {
        // One [8, 8] linear, codes q[o, i] = (o + 3i) % 16, packed both ways.
        let q = |o: usize, i: usize| ((o + 3 * i) % 16) as u32;
        let mut gptq = Vec::new();
        for o in 0..8 {
            gptq.push((0..8).map(|j| q(o, j) << (4 * j)).sum::<u32>());
        }
        let mut awq = Vec::new();
        for i in 0..8 {
            awq.push((0..8).map(|o| q(o, i) << (4 * AWQ_SLOT[o])).sum::<u32>());
        }
        let bytes = |w: &[u32]| w.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let zeros = bytes(&[0x8888_8888]);
        let g = GroupedConfig {
            method: GroupedMethod::Gptq,
            bits: 4,
            group_size: None,
            desc_act: false,
            sym: true,
            zeros_minus_one: false,
            dynamic: Vec::new(),
        };
        let a = g
            .unpack(8, 8, &bytes(&gptq), &zeros, &[1.0; 8], None)
            .unwrap();
        let awq_cfg = GroupedConfig {
            method: GroupedMethod::Awq,
            group_size: Some(8),
            ..g.clone()
        };
        let b = awq_cfg
            .unpack(8, 8, &bytes(&awq), &zeros, &[1.0; 8], None)
            .unwrap();
        assert_eq!(a.codes, b.codes);
        assert_eq!(a.codes[0], (q(0, 0) << 4 | q(0, 1)) as u8);
        assert_eq!(a.zeros, vec![8.0; 8]);
    }

    #[test]
    fn g_idx_out_of_range_is_named() {
        let g = GroupedConfig {
            method: GroupedMethod::Gptq,
            bits: 4,
            group_size: Some(4),
            desc_act: true,
            sym: true,
            zeros_minus_one: true,
            dynamic: Vec::new(),
        };
        let e = g
            .unpack(
                8,
                8,
                &[0; 32],
                &[0; 8],
                &[1.0; 16],
                Some(&[0, 1, 0, 1, 2, 0, 1, 0]),
            )
            .unwrap_err();
        assert!(
            matches!(
                e,
                GroupedError::GIdxRange {
                    index: 4,
                    value: 2,
                    ..
                }
            ),
            "{e}"
        );
    }
}

//! bitsandbytes checkpoints as transformers saves them: the quant-state JSON blob stored as a
//! uint8 tensor next to each 4-bit weight, and config.json's `quantization_config`.
//!
//! Keys of a 4-bit linear `P` (bitsandbytes `QuantState.as_dict(packed=True)`):
//! `P.weight` (packed codes), `P.weight.absmax`, `P.weight.quant_map`,
//! `P.weight.nested_absmax` and `P.weight.nested_quant_map` (double quantization only) and
//! `P.weight.quant_state.bitsandbytes__nf4` (or `__fp4`). 8-bit: `P.weight` int8, `P.SCB`,
//! optionally `P.weight_format`.

use crate::{ElementType, TensorSpec};
use qlora_quant::{bnb, Quant4, QuantizeSpec, Quantized4};
use serde_json::{Map, Value};

/// The JSON part of a 4-bit quant state.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantStateJson {
    pub quant: Quant4,
    pub blocksize: usize,
    /// The dtype the weight had before quantization ("bfloat16", "float16", "float32").
    pub dtype: String,
    /// The logical shape `[out, in]`.
    pub shape: Vec<usize>,
    pub nested: Option<NestedJson>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NestedJson {
    pub blocksize: usize,
    pub dtype: String,
    pub offset: f32,
}

/// The suffix of the quant-state key for a weight: `weight.quant_state.bitsandbytes__nf4`.
pub fn quant_state_key(quant: Quant4) -> String {
    format!("quant_state.bitsandbytes__{}", quant.name())
}

/// What is wrong with config.json's `quantization_config` (the caller names the file).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QuantConfigError {
    #[error("\"quantization_config\" is not a JSON object")]
    NotObject,
    #[error("quantization_config.quant_method is \"{0}\"; qlora reads bitsandbytes 4-bit/8-bit, GPTQ and AWQ checkpoints (dequantize other formats with their own tools first)")]
    Method(String),
}

/// What is wrong with a bitsandbytes quant-state blob (the caller adds the file and tensor).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QuantStateError {
    #[error("quant state is not valid JSON ({0})")]
    Json(String),
    #[error("quant state is not a JSON object")]
    NotObject,
    #[error("quant state lacks \"{0}\"")]
    Missing(String),
    #[error("quant state \"{field}\" is not {want}")]
    Type { field: String, want: &'static str },
    #[error("unknown quant_type \"{0}\" (bitsandbytes 4-bit is \"nf4\" or \"fp4\")")]
    QuantType(String),
    #[error("blocksize {0} is not one bitsandbytes makes (a power of two from 32 to 4096)")]
    Blocksize(usize),
}

impl QuantStateJson {
    /// Parses the blob; the error says which field is missing or wrong.
    pub fn parse(bytes: &[u8]) -> Result<Self, QuantStateError> {
        use QuantStateError as E;
        let v: Value = serde_json::from_slice(bytes).map_err(|e| E::Json(e.to_string()))?;
        let obj = v.as_object().ok_or(E::NotObject)?;
        let field = |k: &str| obj.get(k).ok_or_else(|| E::Missing(k.into()));
        let wrong = |k: &str, want| E::Type {
            field: k.into(),
            want,
        };
        let uint = |k: &str| -> Result<usize, E> {
            field(k)?
                .as_u64()
                .map(|u| u as usize)
                .ok_or_else(|| wrong(k, "a non-negative integer"))
        };
        let string = |k: &str| -> Result<String, E> {
            field(k)?
                .as_str()
                .map(String::from)
                .ok_or_else(|| wrong(k, "a string"))
        };
        let qt = string("quant_type")?;
        let quant = Quant4::parse(&qt).ok_or_else(|| E::QuantType(qt.clone()))?;
        let blocksize = uint("blocksize")?;
        if !qlora_quant::bnb::valid_blocksize(blocksize) {
            return Err(E::Blocksize(blocksize));
        }
        let shape = field("shape")?
            .as_array()
            .and_then(|a| a.iter().map(|d| d.as_u64().map(|u| u as usize)).collect())
            .ok_or_else(|| wrong("shape", "a list of sizes"))?;
        let nested = if obj.contains_key("nested_blocksize") || obj.contains_key("nested_offset") {
            let offset = field("nested_offset")?
                .as_f64()
                .ok_or_else(|| wrong("nested_offset", "a number"))?;
            Some(NestedJson {
                blocksize: uint("nested_blocksize")?,
                dtype: string("nested_dtype").unwrap_or_else(|_| "float32".into()),
                offset: offset as f32,
            })
        } else {
            None
        };
        Ok(QuantStateJson {
            quant,
            blocksize,
            dtype: string("dtype")?,
            shape,
            nested,
        })
    }

    /// The blob as bitsandbytes writes it: `json.dumps` with default separators and its key
    /// order; `nested_offset` as Python prints a float.
    pub fn to_json(&self) -> String {
        let shape: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        let mut s = format!(
            "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
            self.quant.name(),
            self.blocksize,
            self.dtype,
            shape.join(", ")
        );
        if let Some(n) = &self.nested {
            s += &format!(
                ", \"nested_blocksize\": {}, \"nested_dtype\": \"{}\", \"nested_offset\": {}",
                n.blocksize,
                n.dtype,
                python_float_repr(n.offset as f64)
            );
        }
        s + "}"
    }
}

/// Python's `repr(float)`: the shortest round-trip digits, fixed notation for exponents in
/// [-4, 16), scientific (`1e-05`, `1.5e+16`) outside.
pub fn python_float_repr(v: f64) -> String {
    if v == 0.0 {
        return if v.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    if !v.is_finite() {
        return if v.is_nan() {
            "nan".into()
        } else if v > 0.0 {
            "inf".into()
        } else {
            "-inf".into()
        };
    }
    let sci = format!("{v:e}"); // e.g. "-5.1685333251953125e-2"
    let (mant, exp) = sci.split_once('e').unwrap();
    let exp: i32 = exp.parse().unwrap();
    let (sign, mant) = match mant.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mant),
    };
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let body = if point <= 0 {
            format!("0.{}{}", "0".repeat((-point) as usize), digits)
        } else if point as usize >= digits.len() {
            format!("{}{}.0", digits, "0".repeat(point as usize - digits.len()))
        } else {
            format!(
                "{}.{}",
                &digits[..point as usize],
                &digits[point as usize..]
            )
        };
        format!("{sign}{body}")
    } else {
        let m = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits
        };
        let es = if exp < 0 { "-" } else { "+" };
        format!("{sign}{m}e{es}{:02}", exp.abs())
    }
}

/// config.json's `quantization_config` for bitsandbytes, read leniently (2023 configs lack the
/// newer keys).
#[derive(Debug, Clone, PartialEq)]
pub struct BnbConfig {
    pub load_in_4bit: bool,
    pub load_in_8bit: bool,
    pub quant_type: Option<String>,
    pub double_quant: bool,
    pub quant_storage: Option<String>,
    pub skip_modules: Vec<String>,
}

impl BnbConfig {
    /// `Ok(None)` when there is no quantization config or it is GPTQ/AWQ (`GroupedConfig`
    /// reads those); an error for other methods or a malformed block.
    pub fn from_config(q: Option<&Value>) -> Result<Option<BnbConfig>, QuantConfigError> {
        let Some(q) = q else { return Ok(None) };
        let obj = q.as_object().ok_or(QuantConfigError::NotObject)?;
        let method = obj
            .get("quant_method")
            .and_then(Value::as_str)
            .unwrap_or("bitsandbytes");
        if method == "gptq" || method == "awq" {
            return Ok(None);
        }
        if method != "bitsandbytes" {
            return Err(QuantConfigError::Method(method.into()));
        }
        let flag = |o: &Map<String, Value>, k: &str| o.get(k).and_then(Value::as_bool);
        let load_in_4bit = flag(obj, "load_in_4bit")
            .or(flag(obj, "_load_in_4bit"))
            .unwrap_or(false);
        let load_in_8bit = flag(obj, "load_in_8bit")
            .or(flag(obj, "_load_in_8bit"))
            .unwrap_or(false);
        let s = |k: &str| obj.get(k).and_then(Value::as_str).map(String::from);
        Ok(Some(BnbConfig {
            load_in_4bit,
            load_in_8bit,
            quant_type: s("bnb_4bit_quant_type"),
            double_quant: flag(obj, "bnb_4bit_use_double_quant").unwrap_or(false),
            quant_storage: s("bnb_4bit_quant_storage"),
            skip_modules: obj
                .get("llm_int8_skip_modules")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|m| m.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default(),
        }))
    }

    /// The block transformers writes for a 4-bit checkpoint (`BitsAndBytesConfig.to_dict()`).
    pub fn transformers_4bit(quant: Quant4, double_quant: bool, compute_dtype: &str) -> Value {
        serde_json::json!({
            "_load_in_4bit": true,
            "_load_in_8bit": false,
            "bnb_4bit_compute_dtype": compute_dtype,
            "bnb_4bit_quant_storage": "uint8",
            "bnb_4bit_quant_type": quant.name(),
            "bnb_4bit_use_double_quant": double_quant,
            "llm_int8_enable_fp32_cpu_offload": false,
            "llm_int8_has_fp16_weight": false,
            "llm_int8_skip_modules": null,
            "llm_int8_threshold": 6.0,
            "load_in_4bit": true,
            "load_in_8bit": false,
            "quant_method": "bitsandbytes"
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Writing a 4-bit weight as bitsandbytes stores it (`qlora quantize`, `merge --requantize`).

fn state(spec: QuantizeSpec, shape: &[usize], dtype: &str, offset: f32) -> QuantStateJson {
    QuantStateJson {
        quant: spec.quant,
        blocksize: spec.blocksize,
        dtype: dtype.into(),
        shape: shape.to_vec(),
        nested: spec.double_quant.then(|| NestedJson {
            blocksize: bnb::NESTED_BLOCKSIZE,
            dtype: "float32".into(),
            offset,
        }),
    }
}

/// The quant-state JSON of a weight; padded with spaces to `width` when given (JSON parsers,
/// bitsandbytes' included, ignore trailing whitespace), so a streaming writer can size it
/// before the offset is known.
fn state_json(
    q: &Quantized4,
    spec: QuantizeSpec,
    shape: &[usize],
    dtype: &str,
    width: Option<usize>,
) -> Vec<u8> {
    let offset = q.double.as_ref().map_or(0.0, |d| d.offset);
    let mut s = state(spec, shape, dtype, offset).to_json();
    while s.len() < width.unwrap_or(0) {
        s.push(' ');
    }
    s.into_bytes()
}

/// The longest quant-state JSON a weight can have: the offset printed with the most digits.
pub fn state_json_width(spec: QuantizeSpec, shape: &[usize], dtype: &str) -> usize {
    state(spec, shape, dtype, -1.234_567_9e-30).to_json().len() + 8
}

/// The tensors bitsandbytes stores for a 4-bit weight `name` (`P.weight`), in a fixed order:
/// packed codes, absmax, (nested absmax, nested map,) quant map, quant-state JSON.
pub fn bnb4_tensors(
    name: &str,
    q: &Quantized4,
    spec: QuantizeSpec,
    shape: &[usize],
    dtype: &str,
    json_width: Option<usize>,
) -> Vec<(TensorSpec, Vec<u8>)> {
    let t = |suffix: &str, dtype, shape: Vec<usize>, data: Vec<u8>| {
        (
            TensorSpec {
                name: format!("{name}{suffix}"),
                dtype,
                shape,
            },
            data,
        )
    };
    let mut out = vec![t(
        "",
        ElementType::U8,
        vec![q.packed.len(), 1],
        q.packed.clone(),
    )];
    match &q.double {
        None => out.push(t(
            ".absmax",
            ElementType::F32,
            vec![q.absmax.len()],
            bytemuck::cast_slice(&q.absmax).to_vec(),
        )),
        Some(d) => {
            out.push(t(
                ".absmax",
                ElementType::U8,
                vec![d.codes.len()],
                d.codes.clone(),
            ));
            out.push(t(
                ".nested_absmax",
                ElementType::F32,
                vec![d.nested_absmax.len()],
                bytemuck::cast_slice(&d.nested_absmax).to_vec(),
            ));
            out.push(t(
                ".nested_quant_map",
                ElementType::F32,
                vec![256],
                bytemuck::cast_slice(&bnb::dynamic_map()).to_vec(),
            ));
        }
    }
    out.push(t(
        ".quant_map",
        ElementType::F32,
        vec![16],
        bytemuck::cast_slice(&spec.quant.code()).to_vec(),
    ));
    let json = state_json(q, spec, shape, dtype, json_width);
    out.push(t(
        &format!(".{}", quant_state_key(spec.quant)),
        ElementType::U8,
        vec![json.len()],
        json,
    ));
    out
}

/// The specs `bnb4_tensors` will produce for a weight of `shape`, before it is computed.
pub fn bnb4_specs(name: &str, spec: QuantizeSpec, shape: &[usize], dtype: &str) -> Vec<TensorSpec> {
    let n: usize = shape.iter().product();
    let blocks = n.div_ceil(spec.blocksize);
    let mut s = vec![TensorSpec {
        name: name.into(),
        dtype: ElementType::U8,
        shape: vec![n.div_ceil(2), 1],
    }];
    let push = |s: &mut Vec<TensorSpec>, suffix: &str, dtype, shape| {
        s.push(TensorSpec {
            name: format!("{name}{suffix}"),
            dtype,
            shape,
        })
    };
    if spec.double_quant {
        push(&mut s, ".absmax", ElementType::U8, vec![blocks]);
        push(
            &mut s,
            ".nested_absmax",
            ElementType::F32,
            vec![blocks.div_ceil(bnb::NESTED_BLOCKSIZE)],
        );
        push(&mut s, ".nested_quant_map", ElementType::F32, vec![256]);
    } else {
        push(&mut s, ".absmax", ElementType::F32, vec![blocks]);
    }
    push(&mut s, ".quant_map", ElementType::F32, vec![16]);
    push(
        &mut s,
        &format!(".{}", quant_state_key(spec.quant)),
        ElementType::U8,
        vec![state_json_width(spec, shape, dtype)],
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_repr_of_floats() {
        for (v, s) in [
            (0.051685333251953125, "0.051685333251953125"),
            (1e-5, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (0.0001, "0.0001"),
            (12.0, "12.0"),
            (-0.25, "-0.25"),
            (1e16, "1e+16"),
            (123456789.0, "123456789.0"),
        ] {
            assert_eq!(python_float_repr(v), s);
        }
    }

    #[test]
    fn quant_state_round_trips_in_bitsandbytes_form() {
        let dq = r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [128, 128], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.051685333251953125}"#;
        let plain =
            r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [128, 128]}"#;
        for s in [dq, plain] {
            assert_eq!(QuantStateJson::parse(s.as_bytes()).unwrap().to_json(), s);
        }
        assert_eq!(dq.len(), 171);
        assert_eq!(plain.len(), 80);
    }

    #[test]
    fn quant_state_errors_name_the_field() {
        let e = QuantStateJson::parse(br#"{"quant_type": "int3", "blocksize": 64}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("int3"), "{e}");
        let e =
            QuantStateJson::parse(br#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32"}"#)
                .unwrap_err()
                .to_string();
        assert!(e.contains("shape"), "{e}");
        let e = QuantStateJson::parse(
            br#"{"quant_type": "nf4", "blocksize": 48, "dtype": "float32", "shape": [2, 2]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("48"), "{e}");
    }
}

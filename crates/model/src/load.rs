//! Building a `Model` from HF-named tensors: every expected tensor present, with the shape the
//! config implies and a type qlora computes with; nothing unexplained left over.

use crate::model::{Layer, Model, Projection};
use crate::quantize::{quantize_tensor, QuantizeSpec};
use crate::{inv_freq, Error, Result};
use qlora_engine::{Weight, WeightFormat};
use qlora_io::{
    quant_state_key, BnbConfig, ElementType, GroupedConfig, ModelSource, QuantStateJson, RawTensor,
};
use qlora_quant::bnb;
use qlora_quant::{GgmlType, Quant4};
use std::path::Path;
use std::sync::Arc;

/// How to load: as stored, or with the decoder's linear layers quantized on the way in.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    pub quantize: Option<QuantizeSpec>,
}

struct Loader<'a> {
    src: &'a mut ModelSource,
    opts: LoadOptions,
    /// The checkpoint's GPTQ/AWQ config, if it is one.
    grouped: Option<GroupedConfig>,
}

impl Loader<'_> {
    fn path(&self, name: &str) -> &Path {
        self.src.tensors.file_of(name).unwrap_or(&self.src.path)
    }

    fn err(&self, name: &str, reason: impl std::fmt::Display) -> Error {
        Error::Tensor {
            path: self.path(name).into(),
            tensor: name.into(),
            reason: reason.to_string(),
        }
    }

    fn take(&mut self, name: &str, shape: &[usize]) -> Result<RawTensor> {
        let Some(t) = self.src.tensors.get(name).cloned() else {
            return Err(Error::Missing {
                path: self.src.path.clone(),
                tensor: name.into(),
            });
        };
        if t.shape != shape {
            return Err(self.err(
                name,
                format!(
                    "shape {:?} does not match the config, which implies {:?}; config.json and the weights disagree",
                    t.shape, shape
                ),
            ));
        }
        self.src.tensors.remove(name);
        Ok(t)
    }

    fn weight(&mut self, name: &str, rows: usize, cols: usize) -> Result<Weight> {
        let t = self.take(name, &[rows, cols])?;
        self.widenable(name, t, rows, cols)
    }

    fn vector(&mut self, name: &str, n: usize) -> Result<Vec<f32>> {
        let t = self.take(name, &[n])?;
        Ok(self.widenable(name, t, 1, n)?.to_f32())
    }

    /// Wraps a tensor's bytes as a [rows, cols] weight in its stored format.
    fn widenable(&self, name: &str, t: RawTensor, rows: usize, cols: usize) -> Result<Weight> {
        let format = match t.dtype {
            ElementType::F32 => GgmlType::F32,
            ElementType::F16 => GgmlType::F16,
            ElementType::BF16 => GgmlType::BF16,
            ElementType::Ggml(g) => g,
            other => {
                return Err(self.err(
                    name,
                    format!("type {} is not a weight type qlora computes with (f32, f16, bf16, GGUF blocks)", other.name()),
                ))
            }
        };
        Weight::new(WeightFormat::Ggml(format), rows, cols, Arc::new(t.data))
            .map_err(|r| self.err(name, r))
    }

    fn has(&self, name: &str) -> bool {
        self.src.tensors.get(name).is_some()
    }

    /// A tensor that must be present, of one of the given types and `n` elements (any shape).
    fn take_aux(
        &mut self,
        name: &str,
        owner: &str,
        types: &[ElementType],
        n: usize,
    ) -> Result<RawTensor> {
        let Some(t) = self.src.tensors.get(name).cloned() else {
            return Err(self.err(
                owner,
                format!("4-bit weight without \"{name}\"; the checkpoint's quant state is incomplete (re-save it with transformers, or re-quantize with `qlora quantize`)"),
            ));
        };
        if !types.contains(&t.dtype) || t.numel() != n {
            let want: Vec<String> = types.iter().map(|t| t.name()).collect();
            return Err(self.err(
                name,
                format!(
                    "{} {:?} where the quant state needs {} values of type {}; the checkpoint is corrupt",
                    t.dtype.name(),
                    t.shape,
                    n,
                    want.join(" or ")
                ),
            ));
        }
        self.src.tensors.remove(name);
        Ok(t)
    }

    fn f32s(t: &RawTensor) -> Vec<f32> {
        bytemuck::pod_collect_to_vec(t.data.as_slice())
    }

    /// A bitsandbytes 4-bit weight `wname` (`P.weight`) and its quant-state tensors.
    fn bnb4(&mut self, wname: &str, quant: Quant4, rows: usize, cols: usize) -> Result<Weight> {
        let key = format!("{wname}.{}", quant_state_key(quant));
        let blob = self
            .src
            .tensors
            .get(&key)
            .cloned()
            .expect("caller saw the key");
        let st = QuantStateJson::parse(blob.data.as_slice()).map_err(|r| self.err(&key, r))?;
        if st.quant != quant {
            return Err(self.err(
                &key,
                format!(
                    "the key says {} but the quant state says {}; the checkpoint is corrupt",
                    quant.name(),
                    st.quant.name()
                ),
            ));
        }
        if st.shape != [rows, cols] {
            return Err(self.err(
                &key,
                format!("quant state shape {:?} does not match the config, which implies [{rows}, {cols}]", st.shape),
            ));
        }
        self.src.tensors.remove(&key);
        let n = rows * cols;
        let blocks = n.div_ceil(st.blocksize);
        let map = self.take_aux(
            &format!("{wname}.quant_map"),
            wname,
            &[ElementType::F32],
            16,
        )?;
        let code: [f32; 16] = Self::f32s(&map).try_into().expect("16 values");
        let absmax = match &st.nested {
            None => {
                let a = self.take_aux(
                    &format!("{wname}.absmax"),
                    wname,
                    &[ElementType::F32],
                    blocks,
                )?;
                Self::f32s(&a)
            }
            Some(nested) => {
                if nested.blocksize == 0 {
                    return Err(self.err(&key, "nested_blocksize is 0"));
                }
                let a = self.take_aux(
                    &format!("{wname}.absmax"),
                    wname,
                    &[ElementType::U8],
                    blocks,
                )?;
                let nb = blocks.div_ceil(nested.blocksize);
                let na = self.take_aux(
                    &format!("{wname}.nested_absmax"),
                    wname,
                    &[ElementType::F32],
                    nb,
                )?;
                let nm = self.take_aux(
                    &format!("{wname}.nested_quant_map"),
                    wname,
                    &[ElementType::F32],
                    256,
                )?;
                let nested_code: [f32; 256] = Self::f32s(&nm).try_into().expect("256 values");
                bnb::dequantize_absmax(
                    a.data.as_slice(),
                    &Self::f32s(&na),
                    &nested_code,
                    nested.blocksize,
                    nested.offset,
                )
            }
        };
        let packed = self
            .src
            .tensors
            .remove(wname)
            .ok_or_else(|| Error::Missing {
                path: self.src.path.clone(),
                tensor: wname.into(),
            })?;
        if !matches!(
            packed.dtype,
            ElementType::U8 | ElementType::BF16 | ElementType::F16 | ElementType::F32
        ) {
            return Err(self.err(
                wname,
                format!("packed 4-bit codes stored as {}; bitsandbytes stores them as uint8 (or the bnb_4bit_quant_storage float type)", packed.dtype.name()),
            ));
        }
        Weight::bnb4(
            quant,
            code,
            st.blocksize,
            rows,
            cols,
            Arc::new(packed.data),
            absmax,
        )
        .map_err(|r| self.err(wname, r))
    }

    /// An LLM.int8 weight: int8 `P.weight` and f32 `P.SCB`.
    fn int8(&mut self, name: &str, rows: usize, cols: usize) -> Result<Weight> {
        let wname = format!("{name}.weight");
        let scb = self.take_aux(&format!("{name}.SCB"), &wname, &[ElementType::F32], rows)?;
        self.src.tensors.remove(&format!("{name}.weight_format"));
        let t = self.take(&wname, &[rows, cols])?;
        if t.dtype != ElementType::I8 {
            return Err(self.err(&wname, format!("8-bit weight stored as {}, expected int8 (LLM.int8 checkpoints store int8 rows and an f32 SCB)", t.dtype.name())));
        }
        Weight::int8(rows, cols, Arc::new(t.data), Self::f32s(&scb))
            .map_err(|r| self.err(&wname, r))
    }

    /// A GPTQ/AWQ linear `name` (`name.qweight`, `.qzeros`, `.scales`, GPTQ's `.g_idx`),
    /// unpacked to qlora's row-major codes.
    fn grouped(&mut self, name: &str, rows: usize, cols: usize) -> Result<Weight> {
        let qw = format!("{name}.qweight");
        let Some(base) = self.grouped.clone() else {
            return Err(self.err(
                &qw,
                "a GPTQ/AWQ packed weight, but config.json has no GPTQ or AWQ quantization_config (nor is there a quantize_config.json); the checkpoint is incomplete",
            ));
        };
        let Some(cfg) = base.for_module(name).map_err(|r| self.err(&qw, r))? else {
            return Err(self.err(
                &qw,
                format!("quantization_config.dynamic leaves {name} dense, but the checkpoint has it packed; the config and the weights disagree"),
            ));
        };
        let sh = cfg.shapes(rows, cols).map_err(|r| self.err(&qw, r))?;
        let int32 = |ld: &mut Self, part: &str, shape: &[usize]| -> Result<RawTensor> {
            let n = format!("{name}.{part}");
            let t = ld.take(&n, shape)?;
            if t.dtype != ElementType::I32 {
                return Err(ld.err(
                    &n,
                    format!(
                        "stored as {}; {} stores it as int32",
                        t.dtype.name(),
                        cfg.method.name().to_uppercase()
                    ),
                ));
            }
            Ok(t)
        };
        let qweight = int32(self, "qweight", &sh.qweight)?;
        let qzeros = int32(self, "qzeros", &sh.qzeros)?;
        let sname = format!("{name}.scales");
        let st = self.take(&sname, &sh.scales)?;
        if !matches!(
            st.dtype,
            ElementType::F16 | ElementType::BF16 | ElementType::F32
        ) {
            return Err(self.err(
                &sname,
                format!(
                    "scales stored as {}; expected f16, bf16 or f32",
                    st.dtype.name()
                ),
            ));
        }
        let scales = self
            .widenable(&sname, st, sh.scales[0], sh.scales[1])?
            .to_f32();
        let gname = format!("{name}.g_idx");
        let g_idx = match self.src.tensors.get(&gname).cloned() {
            None => None,
            Some(_) if cfg.method == qlora_io::GroupedMethod::Awq => {
                return Err(self.err(
                    &gname,
                    "AWQ checkpoints have no g_idx; this one is not a layout qlora knows",
                ));
            }
            Some(_) => {
                let t = int32(self, "g_idx", &[cols])?;
                Some(bytemuck::pod_collect_to_vec::<u8, i32>(t.data.as_slice()))
            }
        };
        let parts = cfg
            .unpack(
                rows,
                cols,
                qweight.data.as_slice(),
                qzeros.data.as_slice(),
                &scales,
                g_idx.as_deref(),
            )
            .map_err(|r| {
                let about_g_idx = matches!(
                    r,
                    qlora_io::GroupedError::GIdxLen { .. }
                        | qlora_io::GroupedError::GIdxRange { .. }
                );
                self.err(if about_g_idx { &gname } else { &qw }, r)
            })?;
        Weight::grouped(
            cfg.bits as u8,
            rows,
            cols,
            Arc::new(parts.codes),
            qlora_engine::Groups::new(parts.g_idx, parts.groups, parts.scales, parts.zeros),
        )
        .map_err(|r| self.err(&qw, r))
    }

    /// A decoder linear's weight in whatever form the checkpoint has it, quantized on the way
    /// in when asked.
    fn linear_weight(&mut self, name: &str, rows: usize, cols: usize) -> Result<Weight> {
        let wname = format!("{name}.weight");
        if self.has(&format!("{name}.qweight")) {
            return self.grouped(name, rows, cols);
        }
        for quant in [Quant4::Nf4, Quant4::Fp4] {
            if self.has(&format!("{wname}.{}", quant_state_key(quant))) {
                return self.bnb4(&wname, quant, rows, cols);
            }
        }
        if self.has(&format!("{name}.SCB")) {
            return self.int8(name, rows, cols);
        }
        for part in ["absmax", "quant_map", "nested_absmax"] {
            if self.has(&format!("{wname}.{part}")) {
                return Err(self.err(
                    &wname,
                    format!("has \"{wname}.{part}\" but no \"{wname}.quant_state.bitsandbytes__nf4\" (or __fp4): the 4-bit quant state is missing; the checkpoint is incomplete"),
                ));
            }
        }
        let Some(spec) = self.opts.quantize else {
            return self.weight(&wname, rows, cols);
        };
        let t = self.take(&wname, &[rows, cols])?;
        let source = t.data.clone();
        let w = self.widenable(&wname, t, rows, cols)?;
        let q = quantize_tensor(&w.to_f32(), spec);
        drop(w);
        // The dense source is no longer needed: let the kernel drop its pages, so that resident
        // memory is the packed model, not packed + source.
        source.release();
        let absmax = q.effective_absmax();
        Weight::bnb4(
            spec.quant,
            spec.quant.code(),
            spec.blocksize,
            rows,
            cols,
            Arc::new(q.packed),
            absmax,
        )
        .map_err(|r| self.err(&wname, r))
    }

    fn projection(
        &mut self,
        name: &str,
        d_out: usize,
        d_in: usize,
        bias: bool,
    ) -> Result<Projection> {
        let base = if name == "lm_head" && !self.has("lm_head.qweight") {
            self.weight(&format!("{name}.weight"), d_out, d_in)?
        } else {
            self.linear_weight(name, d_out, d_in)?
        };
        let bias_name = format!("{name}.bias");
        let bias = if bias || self.src.tensors.get(&bias_name).is_some() {
            Some(self.vector(&bias_name, d_out)?)
        } else {
            None
        };
        Ok(Projection {
            name: name.into(),
            base,
            bias,
            lora: Vec::new(),
        })
    }
}

impl Model {
    /// Loads the model a `ModelSource` describes, consuming its tensors.
    pub fn load(src: &mut ModelSource) -> Result<Model> {
        Self::load_with(src, LoadOptions::default())
    }

    /// `load`, optionally quantizing the decoder's linear layers (like transformers'
    /// `BitsAndBytesConfig`); already-quantized checkpoints load as they are.
    pub fn load_with(src: &mut ModelSource, opts: LoadOptions) -> Result<Model> {
        let cfg = src.config.clone();
        let bnb_cfg = BnbConfig::from_config(cfg.quantization_config.as_ref()).map_err(|r| {
            Error::Invalid(format!("{}: {r}", src.path.join("config.json").display()))
        })?;
        let grouped = GroupedConfig::from_model(&src.path, cfg.quantization_config.as_ref())?;
        if let (Some(g), Some(_)) = (&grouped, opts.quantize) {
            return Err(Error::Invalid(format!(
                "{} is already a {} checkpoint; drop --quantize (it loads as stored)",
                src.path.display(),
                g.method.name().to_uppercase()
            )));
        }
        if let (Some(c), Some(_)) = (&bnb_cfg, opts.quantize) {
            if c.load_in_4bit || c.load_in_8bit {
                return Err(Error::Invalid(format!(
                    "{} is already a bitsandbytes {}-bit checkpoint; drop --quantize (it loads as stored)",
                    src.path.display(),
                    if c.load_in_4bit { 4 } else { 8 }
                )));
            }
        }
        let fingerprint = {
            let mut f = qlora_lora::Fingerprint::default();
            for name in src.tensors.names() {
                let t = src.tensors.get(name).expect("listed");
                f.add(name, &t.dtype.name(), &t.shape, t.data.as_slice());
            }
            f.finish()
        };
        let quantization = match (opts.quantize, &bnb_cfg) {
            (Some(q), _) => Some(qlora_lora::BaseQuantization {
                quant_type: q.quant.name().into(),
                blocksize: q.blocksize,
                double_quant: q.double_quant,
            }),
            (None, Some(c)) if c.load_in_4bit => Some(qlora_lora::BaseQuantization {
                quant_type: c.quant_type.clone().unwrap_or_else(|| "fp4".into()),
                blocksize: 64,
                double_quant: c.double_quant,
            }),
            (None, Some(c)) if c.load_in_8bit => Some(qlora_lora::BaseQuantization {
                quant_type: "int8".into(),
                blocksize: 0,
                double_quant: false,
            }),
            _ => grouped.as_ref().map(|g| qlora_lora::BaseQuantization {
                quant_type: g.quant_type(),
                blocksize: g.group_size.unwrap_or(0),
                double_quant: false,
            }),
        };
        let (d, v) = (cfg.hidden_size, cfg.vocab_size);
        let mut ld = Loader { src, opts, grouped };
        let embed_tokens = ld.weight("model.embed_tokens.weight", v, d)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let input_layernorm = ld.vector(&format!("{p}.input_layernorm.weight"), d)?;
            // In graph order, the second norm between attention and MLP (errors name the first
            // tensor that is wrong in that order).
            let mut lin = Vec::with_capacity(7);
            let mut post_attention_layernorm = Vec::new();
            for (k, l) in cfg.layer_linears().iter().enumerate() {
                if k == 4 {
                    post_attention_layernorm =
                        ld.vector(&format!("{p}.post_attention_layernorm.weight"), d)?;
                }
                lin.push(ld.projection(&format!("{p}.{}", l.name), l.d_out, l.d_in, l.bias)?);
            }
            let [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]: [Projection; 7] =
                lin.try_into().expect("seven linears");
            layers.push(Layer {
                input_layernorm,
                q_proj,
                k_proj,
                v_proj,
                o_proj,
                post_attention_layernorm,
                gate_proj,
                up_proj,
                down_proj,
            });
        }
        let norm = ld.vector("model.norm.weight", d)?;
        let lm_head = if cfg.tie_word_embeddings {
            // Some tied checkpoints also store the (identical) head; transformers ignores it.
            ld.src.tensors.remove("lm_head.weight");
            Projection {
                name: "lm_head".into(),
                base: embed_tokens.clone(),
                bias: None,
                lora: Vec::new(),
            }
        } else {
            ld.projection("lm_head", v, d, false)?
        };
        // Old checkpoints carry rotary buffers; they are recomputed from the config.
        let leftovers: Vec<String> = ld
            .src
            .tensors
            .names()
            .filter(|n| !n.ends_with("rotary_emb.inv_freq"))
            .map(String::from)
            .collect();
        if let Some(first) = leftovers.first() {
            return Err(ld.err(
                first,
                format!(
                    "unexpected tensor ({} unexpected in all) for a {}-layer {} model; config.json and the weights disagree",
                    leftovers.len(),
                    cfg.num_hidden_layers,
                    cfg.model_type
                ),
            ));
        }
        Ok(Model {
            inv_freq: inv_freq(&cfg),
            config: cfg,
            embed_tokens,
            layers,
            norm,
            lm_head,
            embed_lora: Vec::new(),
            fingerprint,
            quantization,
        })
    }
}

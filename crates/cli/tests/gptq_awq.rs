//! GPTQ and AWQ bases against the libraries that wrote them (tools/reference/
//! make_gptq_awq_models.py: GPTQModel on CPU): every dequantized weight bit for bit, logits
//! within 2e-4 of transformers with and without a PEFT adapter, inspect, merge into a dense
//! model, and broken files failing with the tensor named.

mod common;
use common::*;
use qlora_io::{write_safetensors, ElementType, ModelSource, SafetensorsFile, WriteTensor};
use std::path::{Path, PathBuf};

const LOGITS_TOL: f32 = 2e-4;

const CASES: &[&str] = &[
    "gptq-llama64-g32-descact-asym",
    "gptq-gqa-g16-sym",
    "gptq-gqa-8bit-nogroup-descact",
    "gptq-llama3-bias-g16-v2",
    "gptq-llama64-lmhead-dynamic",
    "awq-llama64-g32",
    "awq-llama64-g64-zeropoint",
];

fn case_dir(case: &str) -> PathBuf {
    repo_root().join("tests/fixtures/gptq").join(case)
}

fn tokens(case: &str) -> String {
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(case_dir(case).join("case.json")).unwrap())
            .unwrap();
    let ids: Vec<String> = c["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.to_string())
        .collect();
    ids.join(",")
}

fn logits(model: &Path, case: &str, extra: &[&str]) -> Vec<f32> {
    // Tests run in parallel over the same cases: one directory per call.
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let out = temp_dir(&format!("gptq-logits-{case}-{n}")).join("l.safetensors");
    let t = tokens(case);
    let mut args = vec![
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        &t,
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    let o = qlora(&args);
    assert!(o.status.success(), "{case}: {}", stderr(&o));
    read_f32(&out, "logits").1
}

#[test]
fn dequantized_weights_equal_the_librarys_bit_for_bit() {
    for case in CASES {
        let dir = case_dir(case);
        let mut src = ModelSource::open(&dir).unwrap();
        let model = qlora_model::Model::load(&mut src).unwrap_or_else(|e| panic!("{case}: {e}"));
        let expected = SafetensorsFile::open(&dir.join("expected.safetensors")).unwrap();
        // Every linear by its module name; the library dequantized the packed ones.
        let mut projs = vec![("lm_head".to_string(), &model.lm_head)];
        for (i, layer) in model.layers.iter().enumerate() {
            let ps = [
                &layer.q_proj,
                &layer.k_proj,
                &layer.v_proj,
                &layer.o_proj,
                &layer.gate_proj,
                &layer.up_proj,
                &layer.down_proj,
            ];
            for (lin, p) in qlora_io::LAYER_LINEARS.iter().zip(ps) {
                projs.push((format!("model.layers.{i}.{lin}"), p));
            }
        }
        let mut checked = 0;
        for (name, p) in projs {
            let grouped = matches!(p.base.format, qlora_engine::WeightFormat::Grouped { .. });
            let Some(t) = expected
                .tensors
                .iter()
                .find(|t| t.name == format!("deq.{name}"))
            else {
                assert!(!grouped, "{case} {name}: packed here, dense in the library");
                continue;
            };
            assert!(grouped, "{case} {name}: loaded as {:?}", p.base.format);
            let want = t.to_f32().unwrap();
            let got = p.base.to_f32();
            assert_eq!(got.len(), want.len(), "{case} {name}");
            let differ = got
                .iter()
                .zip(&want)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(differ, 0, "{case} {name}: {differ} elements differ");
            checked += 1;
        }
        let deq = expected
            .tensors
            .iter()
            .filter(|t| t.name.starts_with("deq."))
            .count();
        assert_eq!(checked, deq, "{case}");
    }
}

#[test]
fn dynamic_overrides_and_a_quantized_head_load_as_gptqmodel_wrote_them() {
    let mut src = ModelSource::open(&case_dir("gptq-llama64-lmhead-dynamic")).unwrap();
    let model = qlora_model::Model::load(&mut src).unwrap();
    use qlora_engine::WeightFormat::{Ggml, Grouped};
    assert_eq!(model.lm_head.base.format, Grouped { bits: 8 });
    assert_eq!(model.layers[0].gate_proj.base.format, Grouped { bits: 8 });
    assert_eq!(model.layers[0].up_proj.base.format, Grouped { bits: 4 });
    assert!(matches!(model.layers[1].down_proj.base.format, Ggml(_)));
    let gate = model.layers[0].gate_proj.base.groups().unwrap();
    assert_eq!(gate.groups, 1, "group size 64 over 64 inputs");
}

#[test]
fn logits_match_transformers_on_the_dequantized_weights() {
    for case in CASES {
        let want = read_f32(&case_dir(case).join("expected.safetensors"), "logits").1;
        let got = logits(&case_dir(case), case, &[]);
        let d = max_abs_diff(&got, &want);
        assert!(d <= LOGITS_TOL, "{case}: max |Δ| {d}");
    }
}

#[test]
fn peft_adapters_on_gptq_and_awq_bases_match_peft() {
    let mut n = 0;
    for case in CASES {
        let adapter = case_dir(case).join("adapter");
        if !adapter.exists() {
            continue;
        }
        let want = read_f32(
            &case_dir(case).join("expected.safetensors"),
            "logits_adapter",
        )
        .1;
        let got = logits(
            &case_dir(case),
            case,
            &["--adapter", adapter.to_str().unwrap()],
        );
        let d = max_abs_diff(&got, &want);
        assert!(d <= LOGITS_TOL, "{case} + adapter: max |Δ| {d}");
        let base = read_f32(&case_dir(case).join("expected.safetensors"), "logits").1;
        assert!(
            max_abs_diff(&base, &want) > 1e-2,
            "{case}: the adapter does nothing"
        );
        n += 1;
    }
    assert_eq!(n, 3);
}

#[test]
fn inspect_and_provenance_name_the_quantization() {
    let o = qlora(&[
        "inspect",
        "--model",
        case_dir("gptq-llama64-g32-descact-asym").to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let q = &v["model"]["quantization"];
    assert_eq!(q["type"], "gptq-int4", "{v}");
    assert_eq!(q["blocksize"], 32);
    let o = qlora(&[
        "inspect",
        "--model",
        case_dir("gptq-gqa-8bit-nogroup-descact").to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("gptq-int8 one group per row"),
        "{text}{}",
        stderr(&o)
    );
    let o = qlora(&[
        "inspect",
        "--model",
        case_dir("awq-llama64-g64-zeropoint").to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("awq-int4 group size 64"), "{text}");
}

#[test]
fn merging_an_adapter_into_a_gptq_base_writes_the_dense_model_peft_computes() {
    for case in ["gptq-llama64-g32-descact-asym", "awq-llama64-g32"] {
        let out = temp_dir(&format!("gptq-merge-{case}")).join("merged");
        let o = qlora(&[
            "merge",
            "--model",
            case_dir(case).to_str().unwrap(),
            "--adapter",
            case_dir(case).join("adapter").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{case}: {}", stderr(&o));
        let cfg = std::fs::read_to_string(out.join("config.json")).unwrap();
        assert!(
            !cfg.contains("quantization_config"),
            "{case}: the merged model is dense but says {cfg}"
        );
        let want = read_f32(
            &case_dir(case).join("expected.safetensors"),
            "logits_adapter",
        )
        .1;
        let got = logits(&out, case, &[]);
        let d = max_abs_diff(&got, &want);
        assert!(d <= LOGITS_TOL, "{case} merged: max |Δ| {d}");
    }
}

#[test]
fn quantizing_a_gptq_checkpoint_again_is_refused() {
    let o = qlora(&[
        "logits",
        "--model",
        case_dir("gptq-gqa-g16-sym").to_str().unwrap(),
        "--tokens",
        "1,2",
        "--quantize",
        "nf4",
        "--out",
        temp_dir("gptq-requantize")
            .join("l.safetensors")
            .to_str()
            .unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("already a GPTQ checkpoint"),
        "{}",
        stderr(&o)
    );
}

/// A copy of `case` with `edit` applied to its tensors (name → (dtype, shape, bytes)) and
/// `cfg` to its config.json.
fn broken(
    case: &str,
    tag: &str,
    edit: impl Fn(&mut Vec<(String, ElementType, Vec<usize>, Vec<u8>)>),
    cfg: impl Fn(&mut serde_json::Value),
) -> PathBuf {
    let dir = temp_dir(&format!("gptq-broken-{tag}"));
    let src = case_dir(case);
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let st = SafetensorsFile::open(&src.join("model.safetensors")).unwrap();
    let mut ts: Vec<_> = st
        .tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                t.dtype,
                t.shape.clone(),
                t.data.as_slice().to_vec(),
            )
        })
        .collect();
    edit(&mut ts);
    let specs: Vec<WriteTensor> = ts
        .iter()
        .map(|(n, d, s, b)| WriteTensor {
            name: n.clone(),
            dtype: *d,
            shape: s.clone(),
            data: std::borrow::Cow::Borrowed(b),
        })
        .collect();
    write_safetensors(&dir.join("model.safetensors"), &specs, &Default::default()).unwrap();
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    cfg(&mut c);
    std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
    dir
}

fn fails_with(dir: &Path, says: &[&str]) {
    let out = dir.join("logits.safetensors");
    let o = qlora(&[
        "logits",
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        "1,2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!out.exists(), "a failed run wrote {}", out.display());
    assert!(!o.status.success(), "{} loaded", dir.display());
    let e = stderr(&o);
    assert!(!e.contains("panicked"), "{e}");
    for s in says {
        assert!(e.contains(s), "expected {s:?} in: {e}");
    }
}

#[test]
fn broken_gptq_and_awq_files_fail_with_the_tensor_named() {
    let k = "model.layers.1.self_attn.k_proj";
    let none = |_: &mut serde_json::Value| {};
    // qzeros with one group too few.
    let d = broken(
        "gptq-llama64-g32-descact-asym",
        "qzeros-shape",
        |ts| {
            let t = ts
                .iter_mut()
                .find(|t| t.0 == format!("{k}.qzeros"))
                .unwrap();
            t.2[0] -= 1;
            let n = t.2.iter().product::<usize>() * 4;
            t.3.truncate(n);
        },
        none,
    );
    fails_with(&d, &[&format!("{k}.qzeros"), "does not match"]);
    // g_idx pointing past the last group.
    let d = broken(
        "gptq-llama64-g32-descact-asym",
        "g-idx-range",
        |ts| {
            let t = ts.iter_mut().find(|t| t.0 == format!("{k}.g_idx")).unwrap();
            t.3[12..16].copy_from_slice(&7i32.to_le_bytes());
        },
        none,
    );
    fails_with(&d, &[&format!("{k}.g_idx"), "g_idx[3] = 7", "out of range"]);
    // A negative g_idx.
    let d = broken(
        "gptq-gqa-g16-sym",
        "g-idx-negative",
        |ts| {
            let t = ts.iter_mut().find(|t| t.0 == format!("{k}.g_idx")).unwrap();
            t.3[0..4].copy_from_slice(&(-1i32).to_le_bytes());
        },
        none,
    );
    fails_with(&d, &[&format!("{k}.g_idx"), "g_idx[0] = -1"]);
    // Bits the reader does not support.
    let d = broken(
        "gptq-gqa-g16-sym",
        "bits-3",
        |_| {},
        |c| c["quantization_config"]["bits"] = 3.into(),
    );
    fails_with(&d, &["config.json", "3-bit", "not supported"]);
    // qweight stored as f32 (same bytes, wrong type).
    let d = broken(
        "awq-llama64-g32",
        "qweight-dtype",
        |ts| {
            let t = ts
                .iter_mut()
                .find(|t| t.0 == format!("{k}.qweight"))
                .unwrap();
            t.1 = ElementType::F32;
        },
        none,
    );
    fails_with(&d, &[&format!("{k}.qweight"), "int32"]);
    // Packed tensors but no quantization config.
    let d = broken(
        "gptq-gqa-g16-sym",
        "no-config",
        |_| {},
        |c| {
            c.as_object_mut().unwrap().remove("quantization_config");
        },
    );
    std::fs::remove_file(d.join("quantize_config.json")).ok();
    fails_with(&d, &["qweight", "no GPTQ or AWQ quantization_config"]);
    // A dynamic entry that leaves a packed module dense.
    let d = broken(
        "gptq-llama64-lmhead-dynamic",
        "dynamic-dense",
        |_| {},
        |c| {
            let dy = c["quantization_config"]["dynamic"].as_object_mut().unwrap();
            dy.insert(
                r"-:model\.layers\.0\.self_attn\.k_proj".into(),
                serde_json::json!({}),
            );
        },
    );
    fails_with(
        &d,
        &["model.layers.0.self_attn.k_proj.qweight", "leaves", "dense"],
    );
    // A missing scales tensor.
    let d = broken(
        "awq-llama64-g64-zeropoint",
        "no-scales",
        |ts| ts.retain(|t| t.0 != format!("{k}.scales")),
        none,
    );
    fails_with(&d, &[&format!("{k}.scales")]);
    // A non-finite scale.
    let d = broken(
        "gptq-gqa-g16-sym",
        "nan-scale",
        |ts| {
            let t = ts
                .iter_mut()
                .find(|t| t.0 == format!("{k}.scales"))
                .unwrap();
            t.3[2..4].copy_from_slice(&half::f16::NAN.to_bits().to_le_bytes());
        },
        none,
    );
    fails_with(&d, &[&format!("{k}.qweight"), "not finite"]);
}

#[test]
fn qlora_train_on_an_awq_base_records_it_and_the_adapter_loads_there() {
    let tmp = temp_dir("gptq-train");
    let lines: Vec<String> = (0..8)
        .map(|i| {
            let text: Vec<String> = (0..16)
                .map(|j| format!("t{}", 3 + (i * 37 + j * 11) % 125))
                .collect();
            serde_json::json!({"text": text.join(" ")}).to_string()
        })
        .collect();
    let data = tmp.join("d.jsonl");
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    let base = case_dir("awq-llama64-g32");
    let out = tmp.join("run");
    let o = qlora(&[
        "train",
        "--model",
        base.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--rank",
        "4",
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--lr",
        "1e-2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let prov: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("final/qlora_provenance.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(prov["base"]["quantization"]["type"], "awq-int4", "{prov}");
    // On its own base: no provenance warning. On another quantization of it: a warning that
    // says which.
    let res = tmp.join("l.safetensors");
    let run = |model: &Path| {
        qlora(&[
            "logits",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            out.join("final").to_str().unwrap(),
            "--tokens",
            "1,5,6",
            "--out",
            res.to_str().unwrap(),
        ])
    };
    let o = run(&base);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));
    let o = run(&case_dir("awq-llama64-g64-zeropoint"));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("AWQ-INT4 base (group size 32)"),
        "{}",
        stderr(&o)
    );
}

//! bitsandbytes checkpoints against transformers + bitsandbytes (CPU, fp32 compute), on the
//! tiny seeded models (tools/reference/make_bnb_models.py): reading what transformers saved
//! (NF4/FP4, with and without double quant, bf16 quant storage, sharded, LLM.int8), quantizing at
//! load with `--quantize`, and `qlora quantize` writing the same bytes transformers writes.

mod common;
use common::*;
use qlora_io::{ElementType, ModelSource, QuantStateJson};
use serde_json::Value;
use std::path::{Path, PathBuf};

const LOGITS_TOL: f32 = 2e-4;

const CASES: &[&str] = &[
    "llama-gqa-nf4-dq",
    "mistral-window-nf4-dq-bf16storage",
    "mqa-tied-fp4",
    "llama3-bias-f16-fp4-dq",
    "llama-gqa-int8",
];

fn case_dir(case: &str) -> PathBuf {
    repo_root().join("tests/fixtures/bnb").join(case)
}

fn case_json(case: &str) -> Value {
    let text = std::fs::read_to_string(case_dir(case).join("case.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn tokens(c: &Value) -> String {
    let ids: Vec<String> = c["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.to_string())
        .collect();
    ids.join(",")
}

/// `--quantize` flags equivalent to the case's BitsAndBytesConfig (4-bit cases only).
fn quantize_flags(c: &Value) -> Option<Vec<&'static str>> {
    let b = &c["bnb"];
    if !b["load_in_4bit"].as_bool().unwrap_or(false) {
        return None;
    }
    let mut f = vec![match b["bnb_4bit_quant_type"].as_str().unwrap() {
        "nf4" => "nf4",
        "fp4" => "fp4",
        other => panic!("{other}"),
    }];
    if b["bnb_4bit_use_double_quant"].as_bool().unwrap_or(false) {
        f.push("--double-quant");
    }
    Some(f)
}

fn logits_of(model: &Path, c: &Value, extra: &[&str], out: &Path) -> Vec<f32> {
    let mut args = vec!["logits", "--model", model.to_str().unwrap(), "--tokens"];
    let t = tokens(c);
    args.push(&t);
    args.extend(["--out", out.to_str().unwrap()]);
    args.extend(extra);
    let o = qlora(&args);
    assert!(o.status.success(), "{}: {}", model.display(), stderr(&o));
    read_f32(out, "logits").1
}

fn expected(case: &str) -> Vec<f32> {
    read_f32(&case_dir(case).join("expected.safetensors"), "logits").1
}

fn dense_model(c: &Value, dir: &Path) -> PathBuf {
    let tiny = c["tiny"].as_str().unwrap();
    let d = dir.join(tiny);
    write_model(&spec(tiny), &d);
    d
}

#[test]
fn checkpoints_saved_by_transformers_load_and_match_its_logits() {
    let tmp = temp_dir("bnb-read");
    for case in CASES {
        let c = case_json(case);
        let got = logits_of(
            &case_dir(case),
            &c,
            &[],
            &tmp.join(format!("{case}.safetensors")),
        );
        let diff = max_abs_diff(&got, &expected(case));
        assert!(diff <= LOGITS_TOL, "{case}: max |Δlogit| = {diff}");
    }
}

#[test]
fn quantize_at_load_matches_transformers() {
    let tmp = temp_dir("bnb-load");
    for case in CASES {
        let c = case_json(case);
        let Some(flags) = quantize_flags(&c) else {
            continue;
        };
        let dense = dense_model(&c, &tmp);
        let mut extra = vec!["--quantize"];
        extra.extend(flags);
        let got = logits_of(&dense, &c, &extra, &tmp.join(format!("{case}.safetensors")));
        let diff = max_abs_diff(&got, &expected(case));
        assert!(
            diff <= LOGITS_TOL,
            "{case} {extra:?}: max |Δlogit| = {diff}"
        );
    }
}

fn tensors(dir: &Path) -> std::collections::BTreeMap<String, qlora_io::RawTensor> {
    let src = ModelSource::open(dir).unwrap();
    src.tensors
        .names()
        .map(|n| (n.to_string(), src.tensors.get(n).unwrap().clone()))
        .collect()
}

#[test]
fn qlora_quantize_writes_what_transformers_writes() {
    let tmp = temp_dir("bnb-write");
    let mut compared = 0;
    for case in CASES {
        let c = case_json(case);
        let Some(flags) = quantize_flags(&c) else {
            continue;
        };
        let dense = dense_model(&c, &tmp);
        let out = tmp.join(format!("{case}-q"));
        let mut args = vec![
            "quantize",
            "--model",
            dense.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--type",
        ];
        args.extend(flags);
        let o = qlora(&args);
        assert!(o.status.success(), "{case}: {}", stderr(&o));

        let theirs = tensors(&case_dir(case));
        let ours = tensors(&out);
        let names = |m: &std::collections::BTreeMap<String, qlora_io::RawTensor>| {
            m.keys().cloned().collect::<Vec<_>>()
        };
        assert_eq!(names(&ours), names(&theirs), "{case}: tensor names");
        for (name, t) in &theirs {
            let mine = &ours[name];
            if name.contains(".quant_state.bitsandbytes__") {
                let a = QuantStateJson::parse(mine.data.as_slice()).unwrap();
                let b = QuantStateJson::parse(t.data.as_slice()).unwrap();
                assert_eq!(a, b, "{case}: {name}");
                assert_eq!(
                    mine.data.as_slice(),
                    t.data.as_slice(),
                    "{case}: {name} text"
                );
            } else {
                // bnb_4bit_quant_storage reinterprets the same packed bytes as another dtype.
                if t.dtype == mine.dtype {
                    assert_eq!(mine.shape, t.shape, "{case}: {name} shape");
                } else {
                    assert_eq!(mine.dtype, ElementType::U8, "{case}: {name}");
                }
                assert!(
                    mine.data.as_slice() == t.data.as_slice(),
                    "{case}: {name}: bytes differ from transformers + bitsandbytes: {:?} vs {:?}",
                    &mine.data.as_slice()[..mine.data.len().min(16)],
                    &t.data.as_slice()[..t.data.len().min(16)]
                );
            }
            compared += 1;
        }
        let cfg = |d: &Path| -> Value {
            serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap()
        };
        let (mut a, b) = (
            cfg(&out)["quantization_config"].clone(),
            cfg(&case_dir(case))["quantization_config"].clone(),
        );
        // The one intended difference: qlora writes uint8 storage.
        a["bnb_4bit_quant_storage"] = b["bnb_4bit_quant_storage"].clone();
        assert_eq!(a, b, "{case}: quantization_config");

        // And the written checkpoint computes what transformers computes.
        let got = logits_of(&out, &c, &[], &tmp.join(format!("{case}-q.safetensors")));
        let diff = max_abs_diff(&got, &expected(case));
        assert!(diff <= LOGITS_TOL, "{case}: max |Δlogit| = {diff}");
    }
    assert!(compared > 50);
}

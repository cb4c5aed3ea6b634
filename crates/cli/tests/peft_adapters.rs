//! PEFT adapters against PEFT's own logits (fp32, CPU, eval): every variant PEFT writes, on
//! dense tiny bases and on NF4 bases quantized at load (with and without double quant)
//! (tools/reference/make_peft_adapters.py).

mod common;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

const LOGITS_TOL: f32 = 2e-4;

fn cases() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(repo_root().join("tests/fixtures/peft"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

fn meta(case: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(case.join("case.json")).unwrap()).unwrap()
}

/// The dense base of a case, written once per test run.
fn base_dir(base: &str, tmp: &Path) -> PathBuf {
    let d = tmp.join(base);
    if !d.exists() {
        write_model(&spec(base), &d);
    }
    d
}

fn logits(args: &[&str]) -> Result<Vec<f32>, String> {
    let out = std::env::temp_dir().join(format!(
        "qlora-peft-{}-{}.safetensors",
        std::process::id(),
        args.join("_").len()
    ));
    let mut a = vec!["logits"];
    a.extend(args);
    a.extend(["--out", out.to_str().unwrap()]);
    let o = qlora(&a);
    if !o.status.success() {
        return Err(stderr(&o));
    }
    let v = read_f32(&out, "logits").1;
    let _ = std::fs::remove_file(&out);
    Ok(v)
}

fn case_args(case: &Path, m: &Value, base: &Path) -> Vec<String> {
    let tokens: Vec<String> = m["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.to_string())
        .collect();
    let mut args = vec![
        "--model".to_string(),
        base.to_str().unwrap().to_string(),
        "--tokens".into(),
        tokens.join(","),
        "--adapter".into(),
        case.join("adapter").to_str().unwrap().to_string(),
    ];
    match m["quantize"].as_str() {
        None => {}
        Some("nf4") => args.extend(["--quantize".into(), "nf4".into()]),
        Some("nf4-dq") => args.extend(["--quantize".into(), "nf4".into(), "--double-quant".into()]),
        Some(other) => panic!("quantize {other}"),
    }
    args
}

#[test]
fn every_peft_variant_matches_peft_logits() {
    let tmp = temp_dir("peft");
    let mut failures = Vec::new();
    let mut n = 0;
    for case in cases() {
        let m = meta(&case);
        let base = base_dir(m["base"].as_str().unwrap(), &tmp);
        let args = case_args(&case, &m, &base);
        let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let want = read_f32(&case.join("expected.safetensors"), "logits").1;
        match logits(&args) {
            Err(e) => failures.push(format!("{}: {e}", case.display())),
            Ok(got) => {
                let diff = max_abs_diff(&got, &want);
                if diff > LOGITS_TOL {
                    failures.push(format!("{}: max |Δlogit| = {diff}", case.display()));
                }
            }
        }
        n += 1;
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(n >= 18);
}

#[test]
fn adapters_change_the_logits() {
    // A check that the comparison above is not vacuous: without the adapter the logits differ.
    let tmp = temp_dir("peft-noop");
    for name in ["basic-qv", "embedding-lora", "nf4-dq-dora"] {
        let case = repo_root().join("tests/fixtures/peft").join(name);
        let m = meta(&case);
        let base = base_dir(m["base"].as_str().unwrap(), &tmp);
        let mut args = case_args(&case, &m, &base);
        let i = args.iter().position(|a| a == "--adapter").unwrap();
        args.drain(i..i + 2);
        let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let plain = logits(&args).unwrap();
        let want = read_f32(&case.join("expected.safetensors"), "logits").1;
        assert!(
            max_abs_diff(&plain, &want) > 1e-2,
            "{name}: the adapter must matter"
        );
    }
}

#[test]
fn merged_models_give_the_unmerged_logits() {
    let tmp = temp_dir("peft-merge");
    let mut failures = Vec::new();
    let mut n = 0;
    for case in cases() {
        let m = meta(&case);
        let base = base_dir(m["base"].as_str().unwrap(), &tmp);
        let name = case.file_name().unwrap().to_string_lossy().into_owned();
        let merged = tmp.join(format!("{name}-merged"));
        let mut args = vec![
            "merge".to_string(),
            "--model".into(),
            base.to_str().unwrap().into(),
            "--adapter".into(),
            case.join("adapter").to_str().unwrap().into(),
            "--out".into(),
            merged.to_str().unwrap().into(),
            "--dtype".into(),
            "f32".into(),
        ];
        // The quantization the adapter was applied on, so the merge starts from the same
        // (dequantized) weights.
        let all = case_args(&case, &m, &base);
        if let Some(i) = all.iter().position(|a| a == "--quantize") {
            args.extend(all[i..].iter().cloned());
        }
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let o = qlora(&a);
        if name == "lora-bias" {
            // lora_bias on up_proj, which has no bias: PEFT cannot merge it either.
            assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
            assert!(
                stderr(&o).contains("no bias to merge it into"),
                "{}",
                stderr(&o)
            );
            assert!(!merged.exists());
            continue;
        }
        if !o.status.success() {
            failures.push(format!("{name}: merge failed: {}", stderr(&o)));
            continue;
        }
        let cfg = std::fs::read_to_string(merged.join("config.json")).unwrap();
        assert!(!cfg.contains("quantization_config"), "{name}: {cfg}");
        let tokens: Vec<String> = m["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.to_string())
            .collect();
        let tokens = tokens.join(",");
        let got = logits(&["--model", merged.to_str().unwrap(), "--tokens", &tokens]).unwrap();
        let want = read_f32(&case.join("expected.safetensors"), "logits").1;
        let diff = max_abs_diff(&got, &want);
        if diff > LOGITS_TOL {
            failures.push(format!("{name}: merged max |Δlogit| = {diff}"));
        }
        n += 1;
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(n >= 17);
}

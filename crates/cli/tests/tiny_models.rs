//! `qlora logits` and the model's loss against transformers (fp32, CPU) on tiny seeded models:
//! GQA and MQA, explicit head_dim, tied and untied embeddings, Mistral's sliding window shorter
//! than the sequence, llama3 and linear RoPE scaling, attention biases, f32/bf16/f16 storage,
//! sharded files, and a directory written by transformers' own save_pretrained.

mod common;
use common::*;

/// The bound for logits of scale ~1-3; observed differences are ~1e-6.
const LOGITS_TOL: f32 = 2e-4;
/// Relative bound on perplexity (the issue asks for 0.5 %; the loss agrees far more closely).
const PPL_REL_TOL: f64 = 5e-3;

const MODELS: &[&str] = &[
    "llama-gqa",
    "llama-mqa-headdim-tied",
    "mistral-window",
    "llama3-rope-bias",
    "llama-linear-rope",
    "llama-64",
];

/// Runs `qlora logits` on a model directory with a fixture's tokens; returns (shape, logits).
fn run_logits(
    model_dir: &std::path::Path,
    spec: &serde_json::Value,
    out: &std::path::Path,
) -> (Vec<usize>, Vec<f32>) {
    let o = qlora(&[
        "logits",
        "--model",
        model_dir.to_str().unwrap(),
        "--tokens",
        &tokens_arg(spec),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        o.status.success(),
        "{}: {}",
        model_dir.display(),
        stderr(&o)
    );
    read_f32(out, "logits")
}

fn expected(name: &str) -> (Vec<usize>, Vec<f32>) {
    read_f32(&tiny_dir(name).join("expected.safetensors"), "logits")
}

fn check_logits(model_dir: &std::path::Path, name: &str, out_dir: &std::path::Path) {
    let (shape, got) = run_logits(
        model_dir,
        &spec(name),
        &out_dir.join(format!("{name}.safetensors")),
    );
    let (want_shape, want) = expected(name);
    assert_eq!(shape, want_shape, "{name}");
    let diff = max_abs_diff(&got, &want);
    assert!(diff < LOGITS_TOL, "{name}: max |Δlogit| = {diff}");
}

#[test]
fn logits_match_transformers_on_every_tiny_model() {
    let tmp = temp_dir("tiny-logits");
    for name in MODELS {
        let dir = tmp.join(name);
        write_model(&spec(name), &dir);
        check_logits(&dir, name, &tmp);
    }
}

#[test]
fn directory_saved_by_transformers_loads_sharded_bf16() {
    let tmp = temp_dir("hf-saved");
    check_logits(&tiny_dir("hf-saved-mistral-bf16"), "mistral-window", &tmp);
}

#[test]
fn loss_and_perplexity_match_transformers() {
    let tmp = temp_dir("tiny-loss");
    for name in MODELS {
        let spec = spec(name);
        let dir = tmp.join(name);
        write_model(&spec, &dir);
        let mut src = qlora_io::ModelSource::open(&dir).unwrap();
        let model = qlora_model::Model::load(&mut src).unwrap();
        let ids: Vec<u32> = spec["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect();
        let (nll, n) = model.nll(&ids).unwrap();
        let loss = nll / n as f64;
        let want = spec["loss"].as_f64().unwrap();
        let rel = ((loss.exp() - want.exp()) / want.exp()).abs();
        assert!(
            rel < PPL_REL_TOL,
            "{name}: perplexity {} vs {}",
            loss.exp(),
            want.exp()
        );
        assert!((loss - want).abs() < 1e-4, "{name}: loss {loss} vs {want}");
    }
}

#[test]
fn sliding_window_changes_the_result() {
    // Guards the window path itself: without it the mistral fixture must not match.
    let spec = spec("mistral-window");
    let mut cfg = spec["config"].clone();
    cfg["sliding_window"] = serde_json::json!(null);
    let tmp = temp_dir("nowindow");
    let mut s2 = spec.clone();
    s2["config"] = cfg;
    write_model(&s2, &tmp.join("m"));
    let (_, got) = run_logits(&tmp.join("m"), &spec, &tmp.join("l.safetensors"));
    let (_, want) = expected("mistral-window");
    assert!(max_abs_diff(&got, &want) > 1e-3);
}

#[test]
fn logits_token_by_token_equal_all_at_once() {
    // `--chunk N` runs the same tokens N at a time over one KV cache (the decode path).
    let tmp = temp_dir("tiny-chunk");
    for name in ["mistral-window", "llama-mqa-headdim-tied"] {
        let dir = tmp.join(name);
        write_model(&spec(name), &dir);
        let (_, whole) = run_logits(&dir, &spec(name), &tmp.join("whole.safetensors"));
        for chunk in ["1", "7"] {
            let out = tmp.join(format!("chunk{chunk}.safetensors"));
            let o = qlora(&[
                "logits",
                "--model",
                dir.to_str().unwrap(),
                "--tokens",
                &tokens_arg(&spec(name)),
                "--chunk",
                chunk,
                "--out",
                out.to_str().unwrap(),
            ]);
            assert!(o.status.success(), "{}", stderr(&o));
            let got = read_f32(&out, "logits").1;
            let d = max_abs_diff(&got, &whole);
            assert!(d < 1e-5, "{name} --chunk {chunk}: max |Δlogit| = {d}");
        }
    }
    let o = qlora(&[
        "logits", "--model", "x", "--tokens", "1", "--chunk", "0", "--out", "y",
    ]);
    assert!(!o.status.success());
}

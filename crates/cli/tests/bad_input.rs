//! Broken inputs give a clean error: exit 1 (2 for bad usage), no panic, and a message naming
//! the file or tensor and what is wrong.

mod common;
use common::*;
use std::path::Path;

fn fails_with(args: &[&str], code: i32, words: &[&str]) {
    let o = qlora(args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(code), "args {args:?}\nstderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    for w in words {
        assert!(err.contains(w), "expected {w:?} in: {err}");
    }
}

fn logits_fails(model: &Path, words: &[&str]) {
    let out = model.with_extension("out.safetensors");
    fails_with(
        &[
            "logits",
            "--model",
            model.to_str().unwrap(),
            "--tokens",
            "1,2",
            "--out",
            out.to_str().unwrap(),
        ],
        1,
        words,
    );
    assert!(!out.exists(), "no output may be written on failure");
}

/// Rewrites a model directory's config.json.
fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&p, cfg.to_string()).unwrap();
}

fn good_model(tag: &str) -> std::path::PathBuf {
    let dir = temp_dir(tag).join("m");
    write_model(&spec("llama-gqa"), &dir);
    dir
}

#[test]
fn missing_model_path() {
    logits_fails(
        Path::new("/nonexistent/model-dir"),
        &["/nonexistent/model-dir", "no such file"],
    );
}

#[test]
fn directory_without_config_is_not_a_model() {
    let dir = temp_dir("noconfig");
    logits_fails(&dir, &["not a model", "config.json"]);
}

#[test]
fn missing_weight_file() {
    let dir = good_model("noweights");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    logits_fails(&dir, &["model.safetensors", "no model.safetensors"]);
}

#[test]
fn missing_shard_named_by_index() {
    let tmp = temp_dir("noshard");
    let mut s = spec("llama-gqa");
    s["sharded"] = serde_json::json!(true);
    write_model(&s, &tmp);
    std::fs::remove_file(tmp.join("model-00002-of-00002.safetensors")).unwrap();
    logits_fails(&tmp, &["model-00002-of-00002.safetensors", "missing"]);
}

#[test]
fn truncated_weight_file() {
    let dir = good_model("truncated");
    let f = dir.join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    logits_fails(&dir, &["model.safetensors", "truncated"]);
}

fn raw_safetensors(path: &Path, header: &str, data_len: usize) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.resize(bytes.len() + data_len, 0);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn safetensors_header_whose_offsets_lie() {
    let dir = good_model("lying");
    let f = dir.join("model.safetensors");
    // Overlapping tensors.
    raw_safetensors(
        &f,
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
        12,
    );
    logits_fails(&dir, &["model.safetensors", "invalid safetensors"]);
    // Offsets past the end of the data.
    raw_safetensors(
        &f,
        r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
        8,
    );
    logits_fails(&dir, &["model.safetensors", "do not match the file size"]);
    // A header length beyond the file.
    std::fs::write(&f, 1_000_000u64.to_le_bytes()).unwrap();
    logits_fails(&dir, &["model.safetensors", "header length"]);
}

#[test]
fn config_sizes_disagree_with_tensors() {
    let dir = good_model("disagree");
    edit_config(&dir, |cfg| {
        cfg["intermediate_size"] = serde_json::json!(96);
    });
    logits_fails(
        &dir,
        &[
            "model.layers.0.mlp.gate_proj.weight",
            "[80, 48]",
            "[96, 48]",
            "disagree",
        ],
    );
}

#[test]
fn config_with_fewer_layers_than_the_weights() {
    let dir = good_model("fewerlayers");
    edit_config(&dir, |cfg| {
        cfg["num_hidden_layers"] = serde_json::json!(1);
    });
    logits_fails(&dir, &["model.layers.1.", "unexpected tensor"]);
}

#[test]
fn missing_tensor_is_named() {
    let tmp = temp_dir("missingtensor");
    write_model(&spec("llama-gqa"), &tmp);
    // The config promises one more layer than the file holds.
    edit_config(&tmp, |cfg| {
        cfg["num_hidden_layers"] = serde_json::json!(3);
    });
    logits_fails(&tmp, &["model.layers.2.input_layernorm.weight", "missing"]);
}

#[test]
fn unsupported_architecture() {
    let dir = good_model("arch");
    edit_config(&dir, |cfg| {
        cfg["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
        cfg["model_type"] = serde_json::json!("gpt2");
    });
    logits_fails(
        &dir,
        &["config.json", "unsupported architecture", "GPT2LMHeadModel"],
    );
}

#[test]
fn invalid_config_json() {
    let dir = good_model("badjson");
    std::fs::write(dir.join("config.json"), "{\"hidden_size\": 48,").unwrap();
    logits_fails(&dir, &["config.json", "invalid JSON"]);
}

#[test]
fn unsupported_tensor_type_in_safetensors() {
    let dir = good_model("i64");
    let f = dir.join("model.safetensors");
    raw_safetensors(
        &f,
        r#"{"model.embed_tokens.weight":{"dtype":"F8_E4M3","shape":[100,48],"data_offsets":[0,4800]}}"#,
        4800,
    );
    logits_fails(
        &dir,
        &["model.embed_tokens.weight", "unsupported tensor type"],
    );
}

/// A minimal GGUF v3 file: general.architecture = llama and one tensor.
fn gguf_bytes(ggml_type: u32, dims: &[u64], data_len: usize) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // tensors
    b.extend(1u64.to_le_bytes()); // kv
    let s = |b: &mut Vec<u8>, t: &str| {
        b.extend((t.len() as u64).to_le_bytes());
        b.extend(t.as_bytes());
    };
    s(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes());
    s(&mut b, "llama");
    s(&mut b, "token_embd.weight");
    b.extend((dims.len() as u32).to_le_bytes());
    for d in dims {
        b.extend(d.to_le_bytes());
    }
    b.extend(ggml_type.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    while !b.len().is_multiple_of(32) {
        b.push(0);
    }
    b.resize(b.len() + data_len, 0);
    b
}

#[test]
fn gguf_with_unsupported_tensor_type() {
    let f = temp_dir("gguf-type").join("m.gguf");
    std::fs::write(&f, gguf_bytes(10, &[256, 4], 84 * 4)).unwrap(); // Q2_K
    logits_fails(
        &f,
        &[
            "m.gguf",
            "token_embd.weight",
            "unsupported ggml tensor type id 10",
        ],
    );
}

#[test]
fn truncated_gguf() {
    let f = temp_dir("gguf-trunc").join("m.gguf");
    let mut b = gguf_bytes(0, &[64, 4], 64 * 4 * 4);
    b.truncate(b.len() - 10);
    std::fs::write(&f, &b).unwrap();
    logits_fails(&f, &["m.gguf", "token_embd.weight", "truncated"]);
    std::fs::write(&f, &b[..20]).unwrap();
    logits_fails(&f, &["m.gguf", "invalid GGUF"]);
}

#[test]
fn gguf_missing_metadata() {
    let f = temp_dir("gguf-meta").join("m.gguf");
    std::fs::write(&f, gguf_bytes(0, &[64, 4], 64 * 4 * 4)).unwrap();
    logits_fails(&f, &["m.gguf", "llama.attention.head_count", "missing"]);
}

#[test]
fn token_ids_out_of_range() {
    let dir = good_model("range");
    let out = dir.with_extension("o.safetensors");
    fails_with(
        &[
            "logits",
            "--model",
            dir.to_str().unwrap(),
            "--tokens",
            "1,500",
            "--out",
            out.to_str().unwrap(),
        ],
        1,
        &["token id 500 is out of range", "100 tokens"],
    );
}

#[test]
fn bad_usage_exits_2() {
    fails_with(&["logits", "--model", "x"], 2, &["--tokens"]);
    fails_with(
        &["logits", "--model", "x", "--tokens", "1,a", "--out", "o"],
        2,
        &["invalid"],
    );
    fails_with(&["frobnicate"], 2, &[]);
}

#[test]
fn convert_refuses_existing_output_and_non_gguf() {
    let dir = good_model("convert-exists");
    fails_with(
        &[
            "convert",
            "--model",
            "/nonexistent.gguf",
            "--out",
            dir.to_str().unwrap(),
        ],
        1,
        &["already exists"],
    );
}

/// A copy of transformers' 4-bit checkpoint of llama-gqa (NF4, double quant) with its tensors
/// edited by `edit`.
fn corrupt_bnb(
    tag: &str,
    edit: impl FnOnce(&mut Vec<qlora_io::WriteTensor<'static>>),
) -> std::path::PathBuf {
    let src = repo_root().join("tests/fixtures/bnb/llama-gqa-nf4-dq");
    let dir = temp_dir(tag).join("m");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let f = qlora_io::SafetensorsFile::open(&src.join("model.safetensors")).unwrap();
    let mut tensors: Vec<qlora_io::WriteTensor<'static>> = f
        .tensors
        .iter()
        .map(|t| qlora_io::WriteTensor {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            data: t.data.as_slice().to_vec().into(),
        })
        .collect();
    edit(&mut tensors);
    let meta = std::collections::BTreeMap::from([("format".to_string(), "pt".to_string())]);
    qlora_io::write_safetensors(&dir.join("model.safetensors"), &tensors, &meta).unwrap();
    dir
}

const Q: &str = "model.layers.1.self_attn.q_proj.weight";

fn set_json(tensors: &mut [qlora_io::WriteTensor<'static>], text: &str) {
    let t = tensors
        .iter_mut()
        .find(|t| t.name == format!("{Q}.quant_state.bitsandbytes__nf4"))
        .unwrap();
    t.shape = vec![text.len()];
    t.data = text.as_bytes().to_vec().into();
}

#[test]
fn bnb_missing_quant_state() {
    let m = corrupt_bnb("bnb-noqs", |t| {
        t.retain(|t| t.name != format!("{Q}.quant_state.bitsandbytes__nf4"))
    });
    logits_fails(&m, &[Q, "quant state is missing"]);
}

#[test]
fn bnb_absmax_of_the_wrong_length() {
    let m = corrupt_bnb("bnb-absmax", |t| {
        let a = t
            .iter_mut()
            .find(|t| t.name == format!("{Q}.absmax"))
            .unwrap();
        a.shape = vec![30];
        a.data = a.data[..30].to_vec().into();
    });
    logits_fails(&m, &[&format!("{Q}.absmax"), "36 values", "corrupt"]);
}

#[test]
fn bnb_unknown_quant_type() {
    let m = corrupt_bnb("bnb-qtype", |t| {
        set_json(
            t,
            r#"{"quant_type": "int3", "blocksize": 64, "dtype": "float32", "shape": [48, 48]}"#,
        )
    });
    logits_fails(&m, &[Q, "unknown quant_type \"int3\""]);
}

#[test]
fn bnb_quant_state_shape_disagrees_with_the_config() {
    let m = corrupt_bnb("bnb-shape", |t| {
        set_json(
            t,
            r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [48, 50], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.1}"#,
        )
    });
    logits_fails(&m, &[Q, "[48, 50]", "[48, 48]"]);
}

#[test]
fn bnb_packed_weight_truncated() {
    let m = corrupt_bnb("bnb-packed", |t| {
        let w = t.iter_mut().find(|t| t.name == Q).unwrap();
        w.shape = vec![1000, 1];
        w.data = w.data[..1000].to_vec().into();
    });
    logits_fails(
        &m,
        &[Q, "1000 bytes of packed 4-bit codes", "expected 1152"],
    );
}

#[test]
fn quantize_flag_on_an_already_quantized_checkpoint() {
    let m = repo_root().join("tests/fixtures/bnb/llama-gqa-nf4-dq");
    let out = temp_dir("bnb-requant").join("out.safetensors");
    fails_with(
        &[
            "logits",
            "--model",
            m.to_str().unwrap(),
            "--tokens",
            "1,2",
            "--out",
            out.to_str().unwrap(),
            "--quantize",
            "nf4",
        ],
        1,
        &["already a bitsandbytes 4-bit checkpoint", "drop --quantize"],
    );
}

#[test]
fn qlora_quantize_refuses_bad_blocksize_and_existing_output() {
    let m = good_model("quantize-bad");
    let out = m.parent().unwrap().join("q");
    fails_with(
        &[
            "quantize",
            "--model",
            m.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--blocksize",
            "48",
        ],
        1,
        &["--blocksize 48"],
    );
    assert!(!out.exists());
    std::fs::create_dir_all(&out).unwrap();
    fails_with(
        &[
            "quantize",
            "--model",
            m.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        1,
        &["already exists"],
    );
}

#[test]
fn corrupt_config_values_are_errors_before_any_allocation() {
    let dir = good_model("config-values");
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "num_hidden_layers",
            serde_json::json!(1_000_000_000u64),
            "num_hidden_layers",
        ),
        ("rope_theta", serde_json::json!(-1.0), "rope_theta"),
        ("rope_theta", serde_json::json!(0.0), "rope_theta"),
        ("rms_norm_eps", serde_json::json!(0.0), "rms_norm_eps"),
        ("rms_norm_eps", serde_json::json!(-1e-5), "rms_norm_eps"),
        ("head_dim", serde_json::json!(1u64 << 62), "overflows"),
        (
            "vocab_size",
            serde_json::json!(1u64 << 40),
            "vocab_size × hidden_size",
        ),
    ];
    for (key, value, words) in cases {
        let orig = std::fs::read_to_string(dir.join("config.json")).unwrap();
        edit_config(&dir, |c| c[key] = value.clone());
        logits_fails(&dir, &["config.json", words]);
        std::fs::write(dir.join("config.json"), orig).unwrap();
    }
}

#[test]
fn training_flags_that_would_give_nan_or_panic_are_refused() {
    let dir = good_model("train-flags");
    let data = dir.parent().unwrap().join("d.jsonl");
    std::fs::write(&data, "{\"text\": \"a b c\"}\n").unwrap();
    let out = dir.parent().unwrap().join("run");
    for (flag, value, words) in [
        ("--lr", "nan", "--lr"),
        ("--lr", "0", "--lr"),
        ("--alpha", "inf", "--alpha"),
        ("--save-every", "0", "--save-every"),
        ("--eval-every", "0", "--eval-every"),
        ("--max-grad-norm", "inf", "--max-grad-norm"),
        ("--weight-decay", "nan", "--weight-decay"),
    ] {
        fails_with(
            &[
                "train",
                "--model",
                dir.to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--steps",
                "1",
                flag,
                value,
            ],
            1,
            &[words],
        );
        assert!(!out.exists(), "{flag} {value}: nothing written");
    }
}

#[test]
fn absurd_thread_counts_are_refused() {
    fails_with(
        &["--threads", "1000000", "inspect", "--model", "x"],
        1,
        &["--threads"],
    );
    fails_with(
        &["--threads", "0", "inspect", "--model", "x"],
        1,
        &["--threads"],
    );
}

#[test]
fn logits_never_overwrite_a_file_of_the_model() {
    let dir = good_model("logits-out");
    let weights = dir.join("model.safetensors");
    let before = std::fs::read(&weights).unwrap();
    fails_with(
        &[
            "logits",
            "--model",
            dir.to_str().unwrap(),
            "--tokens",
            "1,2",
            "--out",
            weights.to_str().unwrap(),
        ],
        1,
        &["--out", "inside the model"],
    );
    assert_eq!(std::fs::read(&weights).unwrap(), before);
}

#[test]
fn gguf_with_a_tensor_listed_twice() {
    let mut b = gguf_bytes(0, &[64, 4], 0);
    // Bump the tensor count to 2 and repeat the tensor's table entry right after the first.
    b[8..16].copy_from_slice(&2u64.to_le_bytes());
    let name = b"token_embd.weight";
    let at = b.windows(name.len()).position(|w| w == name).unwrap() - 8;
    let entry_len = 8 + name.len() + 4 + 2 * 8 + 4 + 8;
    let entry = b[at..at + entry_len].to_vec();
    let mut c = b[..at + entry_len].to_vec();
    c.extend(&entry);
    while !c.len().is_multiple_of(32) {
        c.push(0);
    }
    c.resize(c.len() + 64 * 4 * 4, 0);
    let f = temp_dir("gguf-dup").join("m.gguf");
    std::fs::write(&f, &c).unwrap();
    logits_fails(&f, &["m.gguf", "token_embd.weight", "twice"]);
}

#[test]
fn a_shard_holding_a_tensor_the_index_puts_elsewhere() {
    let dir = temp_dir("shard-lie").join("m");
    let mut s = spec("llama-gqa");
    s["sharded"] = serde_json::json!(true);
    write_model(&s, &dir);
    let idx = dir.join("model.safetensors.index.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&idx).unwrap()).unwrap();
    let map = v["weight_map"].as_object_mut().unwrap();
    let (name, file) = map
        .iter()
        .next()
        .map(|(k, f)| (k.clone(), f.as_str().unwrap().to_string()))
        .unwrap();
    let other = if file.contains("00001") {
        "model-00002-of-00002.safetensors"
    } else {
        "model-00001-of-00002.safetensors"
    };
    map.insert(name.clone(), serde_json::json!(other));
    std::fs::write(&idx, v.to_string()).unwrap();
    logits_fails(&dir, &[&name, "puts it in", other]);
}

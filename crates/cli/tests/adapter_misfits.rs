//! Adapters that do not fit, or are broken, fail cleanly with exit 1 and a message naming the
//! tensor or module and the reason, both at `qlora inspect` and when loading (`qlora logits`).
//! Provenance mismatches warn, and fail under --strict.

mod common;
use common::*;
use qlora_io::{write_safetensors, SafetensorsFile, WriteTensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn peft(case: &str) -> PathBuf {
    repo_root()
        .join("tests/fixtures/peft")
        .join(case)
        .join("adapter")
}

/// A base and a copy of a reference adapter whose tensors `edit` may change.
fn setup(
    tag: &str,
    base: &str,
    case: &str,
    edit: impl FnOnce(&mut Vec<WriteTensor<'static>>),
) -> (PathBuf, PathBuf) {
    let tmp = temp_dir(tag);
    let model = tmp.join("base");
    write_model(&spec(base), &model);
    let ad = tmp.join("adapter");
    std::fs::create_dir_all(&ad).unwrap();
    let src = peft(case);
    std::fs::copy(
        src.join("adapter_config.json"),
        ad.join("adapter_config.json"),
    )
    .unwrap();
    let f = SafetensorsFile::open(&src.join("adapter_model.safetensors")).unwrap();
    let mut t: Vec<WriteTensor<'static>> = f
        .tensors
        .iter()
        .map(|t| WriteTensor {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            data: t.data.as_slice().to_vec().into(),
        })
        .collect();
    edit(&mut t);
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(&ad.join("adapter_model.safetensors"), &t, &meta).unwrap();
    (model, ad)
}

/// Both `inspect` and `logits` exit 1 with every word in `words`, and without a panic.
fn both_fail(model: &Path, adapter: &Path, words: &[&str]) {
    let out = model.with_extension("out.safetensors");
    for args in [
        vec![
            "inspect",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
        ],
        vec![
            "logits",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--tokens",
            "1,2,3",
            "--out",
            out.to_str().unwrap(),
        ],
    ] {
        let o = qlora(&args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        for w in words {
            assert!(err.contains(w), "{args:?}: expected {w:?} in: {err}");
        }
    }
    assert!(!out.exists(), "no output on failure");
}

fn rename(t: &mut [WriteTensor<'static>], from: &str, to: &str) {
    for x in t.iter_mut() {
        x.name = x.name.replace(from, to);
    }
}

#[test]
fn shape_mismatch_names_tensor_expected_and_got() {
    let (m, a) = setup("mis-shape", "llama-gqa", "basic-qv", |t| {
        let x = t
            .iter_mut()
            .find(|x| x.name.ends_with("layers.1.self_attn.v_proj.lora_A.weight"))
            .unwrap();
        x.shape = vec![4, 40];
        x.data = x.data[..4 * 40 * 4].to_vec().into();
    });
    both_fail(
        &m,
        &a,
        &[
            "model.layers.1.self_attn.v_proj.lora_A.weight",
            "shape [4, 40]",
            "expected [4, 48]",
        ],
    );
}

#[test]
fn module_the_model_lacks_gets_nearest_names() {
    let (m, a) = setup("mis-module", "llama-gqa", "basic-qv", |t| {
        rename(t, "self_attn.v_proj", "self_attn.value")
    });
    both_fail(
        &m,
        &a,
        &[
            "model.layers.0.self_attn.value",
            "does not have",
            "nearest: model.layers.0.self_attn.v_proj",
        ],
    );
}

#[test]
fn keys_that_match_nothing_are_an_error_not_a_silent_no_op() {
    let (m, a) = setup("mis-nothing", "llama-gqa", "basic-qv", |t| {
        t.push(WriteTensor {
            name: "base_model.model.model.extra_head.weight".into(),
            dtype: qlora_io::ElementType::F32,
            shape: vec![2],
            data: vec![0u8; 8].into(),
        })
    });
    both_fail(
        &m,
        &a,
        &[
            "model.extra_head.weight",
            "matches nothing",
            "ignore it silently",
        ],
    );
}

#[test]
fn a_resized_vocabulary_is_named() {
    let (m, a) = setup("mis-vocab", "llama-64", "lm-head-target", |t| {
        let x = t
            .iter_mut()
            .find(|x| x.name.ends_with("lm_head.base_layer.weight"))
            .unwrap();
        x.shape = vec![130, 64];
        x.data = vec![0u8; 130 * 64 * 4].into();
    });
    both_fail(
        &m,
        &a,
        &[
            "lm_head.base_layer.weight",
            "130 rows",
            "vocabulary has 128",
        ],
    );
}

#[test]
fn an_adapter_for_another_model_says_so_first() {
    let tmp = temp_dir("mis-model");
    let m = tmp.join("base");
    write_model(&spec("llama-gqa"), &m);
    both_fail(
        &m,
        &peft("dora"),
        &["made for a different model", "hidden size 48"],
    );
}

#[test]
fn invalid_json_config() {
    let (m, a) = setup("mis-json", "llama-gqa", "basic-qv", |_| {});
    std::fs::write(a.join("adapter_config.json"), "{\"r\": 4,").unwrap();
    both_fail(&m, &a, &["adapter_config.json", "invalid JSON"]);
}

#[test]
fn lying_safetensors_header_and_truncated_file() {
    let (m, a) = setup("mis-trunc", "llama-gqa", "basic-qv", |_| {});
    let p = a.join("adapter_model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    both_fail(
        &m,
        &a,
        &["adapter_model.safetensors", "invalid safetensors"],
    );
    // A header whose length field points past the end of the file.
    let mut lying = bytes.clone();
    lying[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&p, &lying).unwrap();
    both_fail(
        &m,
        &a,
        &["adapter_model.safetensors", "invalid safetensors"],
    );
}

/// A stored (uncompressed) zip, as torch.save writes.
fn zip(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in entries {
        let off = out.len() as u32;
        let mut h = vec![0x50, 0x4b, 0x03, 0x04, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        h.extend(0u32.to_le_bytes()); // crc (unchecked)
        h.extend((data.len() as u32).to_le_bytes());
        h.extend((data.len() as u32).to_le_bytes());
        h.extend((name.len() as u16).to_le_bytes());
        h.extend(0u16.to_le_bytes());
        out.extend(&h);
        out.extend(name.as_bytes());
        out.extend(*data);
        let mut c = vec![0x50, 0x4b, 0x01, 0x02, 20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        c.extend(0u32.to_le_bytes());
        c.extend((data.len() as u32).to_le_bytes());
        c.extend((data.len() as u32).to_le_bytes());
        c.extend((name.len() as u16).to_le_bytes());
        c.extend([0u8; 12]);
        c.extend(off.to_le_bytes());
        c.extend(name.as_bytes());
        central.extend(c);
    }
    let cd_off = out.len() as u32;
    out.extend(&central);
    out.extend([0x50, 0x4b, 0x05, 0x06, 0, 0, 0, 0]);
    out.extend((entries.len() as u16).to_le_bytes());
    out.extend((entries.len() as u16).to_le_bytes());
    out.extend((central.len() as u32).to_le_bytes());
    out.extend(cd_off.to_le_bytes());
    out.extend(0u16.to_le_bytes());
    out
}

#[test]
fn pickle_with_a_forbidden_global_is_refused_without_running_it() {
    let (m, a) = setup("mis-pickle", "llama-gqa", "basic-qv", |_| {});
    std::fs::remove_file(a.join("adapter_model.safetensors")).unwrap();
    let marker = a.join("pwned");
    // {'x': os.system('touch <marker>')}
    let cmd = format!("touch {}", marker.display());
    let mut pkl = vec![0x80, 2, b'}', b'X'];
    pkl.extend(1u32.to_le_bytes());
    pkl.extend(b"x");
    pkl.extend(b"cos\nsystem\n");
    pkl.push(b'X');
    pkl.extend((cmd.len() as u32).to_le_bytes());
    pkl.extend(cmd.as_bytes());
    pkl.extend([0x85, b'R', b's', b'.']);
    std::fs::write(
        a.join("adapter_model.bin"),
        zip(&[("archive/data.pkl", &pkl)]),
    )
    .unwrap();
    both_fail(&m, &a, &["adapter_model.bin", "os.system", "refusing"]);
    assert!(!marker.exists(), "nothing may be executed");
}

#[test]
fn not_an_adapter_directory() {
    let tmp = temp_dir("mis-dir");
    let m = tmp.join("base");
    write_model(&spec("llama-gqa"), &m);
    let empty = tmp.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    both_fail(&m, &empty, &["no adapter_config.json"]);
    both_fail(&m, &tmp.join("missing"), &["no such adapter directory"]);
}

fn write_provenance(dir: &Path, fingerprint: &str, quant: Option<&str>) {
    let q = quant
        .map(|q| format!("{{\"type\": \"{q}\", \"blocksize\": 64, \"double_quant\": true}}"))
        .unwrap_or_else(|| "null".into());
    std::fs::write(
        dir.join("qlora_provenance.json"),
        format!("{{\"qlora_version\": \"0.1.0\", \"base\": {{\"fingerprint\": \"{fingerprint}\", \"quantization\": {q}, \"path\": \"/somewhere/base\"}}}}"),
    )
    .unwrap();
}

#[test]
fn provenance_mismatch_warns_and_strict_refuses() {
    let (m, a) = setup("prov", "llama-gqa", "basic-qv", |_| {});
    // Made on the NF4 version of another checkpoint; loaded on this dense base.
    write_provenance(&a, "fnv64:0000000000000000", Some("nf4"));
    let out = m.with_extension("out.safetensors");
    let base = [
        "logits",
        "--model",
        m.to_str().unwrap(),
        "--adapter",
        a.to_str().unwrap(),
        "--tokens",
        "1,2",
        "--out",
        out.to_str().unwrap(),
    ];
    let o = qlora(&base);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("warning") && err.contains("made on a NF4 base (blocksize 64, double quant)"),
        "{err}"
    );
    assert!(err.contains("an unquantized (f32/f16/bf16) base"), "{err}");
    assert!(err.contains("different base checkpoint"), "{err}");
    let mut strict = base.to_vec();
    strict.push("--strict");
    let _ = std::fs::remove_file(&out);
    let o = qlora(&strict);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("--strict"));
    assert!(!out.exists());

    // The same adapter with provenance matching this base loads without a word.
    let o = qlora(&["inspect", "--model", m.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let fp = v["model"]["fingerprint"].as_str().unwrap().to_string();
    write_provenance(&a, &fp, None);
    let o = qlora(&strict);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));
}

#[test]
fn undeclared_base_tensors_are_refused_not_applied() {
    // A full tensor the config does not declare would silently replace the base's.
    for (name, shape) in [
        ("base_model.model.model.norm.weight", vec![48usize]),
        (
            "base_model.model.model.layers.0.mlp.up_proj.base_layer.weight",
            vec![80, 48],
        ),
    ] {
        let n: usize = shape.iter().product();
        let (m, a) = setup("mis-undeclared", "llama-gqa", "basic-qv", |t| {
            t.push(WriteTensor {
                name: name.into(),
                dtype: qlora_io::ElementType::F32,
                shape: shape.clone(),
                data: vec![0u8; n * 4].into(),
            })
        });
        both_fail(
            &m,
            &a,
            &[
                name.trim_start_matches("base_model.model."),
                "does not declare",
            ],
        );
    }
}

#[test]
fn tensors_for_modules_the_config_does_not_target_are_refused() {
    // basic-qv targets q_proj and v_proj; a k_proj pair in the file would not be applied by PEFT.
    let (m, a) = setup("mis-untargeted", "llama-gqa", "basic-qv", |t| {
        let extra: Vec<WriteTensor<'static>> = t
            .iter()
            .filter(|x| x.name.contains("layers.0.self_attn.v_proj"))
            .map(|x| WriteTensor {
                name: x.name.replace("v_proj", "k_proj"),
                dtype: x.dtype,
                shape: x.shape.clone(),
                data: x.data.clone(),
            })
            .collect();
        t.extend(extra);
    });
    both_fail(
        &m,
        &a,
        &["model.layers.0.self_attn.k_proj", "target_modules"],
    );
}

#[test]
fn two_tensors_for_one_lora_part_are_ambiguous() {
    let (m, a) = setup("mis-dup", "llama-gqa", "basic-qv", |t| {
        let x = t
            .iter()
            .find(|x| x.name.ends_with("layers.0.self_attn.q_proj.lora_A.weight"))
            .unwrap();
        let dup = WriteTensor {
            name: x.name.replace("lora_A.weight", "lora_A.default.weight"),
            dtype: x.dtype,
            shape: x.shape.clone(),
            data: x.data.clone(),
        };
        t.push(dup);
    });
    both_fail(
        &m,
        &a,
        &[
            "model.layers.0.self_attn.q_proj",
            "two A tensors",
            "ambiguous",
        ],
    );
}

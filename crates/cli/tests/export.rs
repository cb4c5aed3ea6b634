//! `qlora export --format gguf` on the real SmolLM2-135M: the exported file reads back with the
//! same weights and tokenizer, merged adapters give the unmerged model's logits, a LoRA-only
//! file holds A and s·B in llama.cpp's layout, and bad requests fail before writing anything.
//! Bit-identity with `llama-quantize --pure` and llama.cpp's own runs of the files are checked
//! by tools/check-gguf-export.sh (they need a llama.cpp build; BENCHMARKS.md has the results).
//! Skips without the GGUF unless QLORA_REQUIRE_FIXTURES=1 (CI).

mod common;
use common::*;
use qlora_io::{permute_rows, GgufFile, GgufValue};
use serde_json::json;
use std::path::Path;

const IDS: &str = "1,504,3458,282,4649,314,2496,30,378,8,198,28,339,253";

fn logits(model: &Path, extra: &[&str], out: &Path) -> Vec<f32> {
    let mut args = vec![
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        IDS,
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = qlora(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    read_f32(out, "logits").1
}

fn export(args: &[&str]) {
    let mut a = vec!["export"];
    a.extend_from_slice(args);
    let o = qlora(&a);
    assert!(o.status.success(), "{}", stderr(&o));
}

fn greedy(model: &Path) -> String {
    let o = qlora(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "What is the capital of France?",
        "--chat",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    String::from_utf8(o.stdout).unwrap()
}

/// f32 export holds the source's dequantized weights exactly: the same logits and text;
/// q8_0/q4_0 exports move logits by their quantization error only.
#[test]
fn exported_models_read_back_with_the_source_weights() {
    let Some(src) = smollm2_or_skip() else { return };
    let _disk = one_big_writer();
    let tmp = scratch_dir("export-roundtrip");
    let want = logits(&src, &[], &tmp.join("src.safetensors"));
    let f32_file = tmp.join("smol-f32.gguf");
    export(&[
        "--model",
        src.to_str().unwrap(),
        "--type",
        "f32",
        "--out",
        f32_file.to_str().unwrap(),
    ]);
    let got = logits(&f32_file, &[], &tmp.join("f32.safetensors"));
    let d = max_abs_diff(&got, &want);
    assert!(d < 1e-4, "f32 export: max |Δlogit| = {d}");
    assert_eq!(greedy(&f32_file), greedy(&src));
    // The tokenizer metadata is the source's, key for key.
    let (a, b) = (
        GgufFile::open(&src).unwrap(),
        GgufFile::open(&f32_file).unwrap(),
    );
    for (k, v) in a
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
    {
        assert_eq!(b.get(k), Some(v), "{k}");
    }
    assert_eq!(b.get("general.file_type"), Some(&GgufValue::U32(0)));
    drop(b);
    std::fs::remove_file(&f32_file).unwrap();
    // Quantizing again (the source is already Q4_1) adds error: bounds on the RMS of Δlogit
    // relative to the logits' (measured: q8_0 0.02, q4_0 0.35 with a Q8_0 embedding).
    let rms = |v: &[f32]| (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
    for (ty, bound) in [("q8_0", 0.05f32), ("q4_0", 0.5)] {
        let f = tmp.join(format!("smol-{ty}.gguf"));
        export(&[
            "--model",
            src.to_str().unwrap(),
            "--type",
            ty,
            "--out",
            f.to_str().unwrap(),
        ]);
        let g = GgufFile::open(&f).unwrap();
        let t = g
            .tensors
            .iter()
            .find(|t| t.name == "blk.0.ffn_down.weight")
            .unwrap();
        assert_eq!(t.ggml_type.name(), ty.to_uppercase());
        let norm = g.tensors.iter().find(|t| t.name == "output_norm.weight");
        assert_eq!(norm.unwrap().ggml_type.name(), "F32");
        // The embedding (the tied head) stays at 8 bits under a 4-bit --type.
        let emb = g.tensors.iter().find(|t| t.name == "token_embd.weight");
        assert_eq!(emb.unwrap().ggml_type.name(), "Q8_0");
        let got = logits(&f, &[], &tmp.join(format!("{ty}.safetensors")));
        let delta: Vec<f32> = got.iter().zip(&want).map(|(a, b)| a - b).collect();
        let r = rms(&delta) / rms(&want);
        assert!(r > 0.0 && r < bound, "{ty}: relative RMS of Δlogit = {r}");
        drop(g);
        std::fs::remove_file(&f).unwrap();
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// From a Hugging Face directory the GGUF tokenizer is rebuilt from tokenizer.json: the same
/// tokens, merges, token types, pre-tokenizer, special ids and chat template as the GGUF the
/// directory was converted from, and the same weights.
#[test]
fn export_from_a_directory_rebuilds_the_gguf_tokenizer() {
    let Some(src) = smollm2_or_skip() else { return };
    let _disk = one_big_writer();
    let tmp = scratch_dir("export-hf");
    let hf = tmp.join("hf");
    let o = qlora(&[
        "convert",
        "--model",
        src.to_str().unwrap(),
        "--out",
        hf.to_str().unwrap(),
        "--dtype",
        "f32",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = tmp.join("from-hf.gguf");
    export(&[
        "--model",
        hf.to_str().unwrap(),
        "--type",
        "f32",
        "--out",
        out.to_str().unwrap(),
    ]);
    std::fs::remove_dir_all(&hf).unwrap();
    let (a, b) = (GgufFile::open(&src).unwrap(), GgufFile::open(&out).unwrap());
    for k in [
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.chat_template",
    ] {
        assert!(a.get(k).is_some(), "{k} missing in the source");
        assert_eq!(
            b.get(k).map(|v| format!("{v:?}")),
            a.get(k).map(|v| format!("{v:?}")),
            "{k}"
        );
    }
    let want = logits(&src, &[], &tmp.join("src.safetensors"));
    let got = logits(&out, &[], &tmp.join("hf.safetensors"));
    let d = max_abs_diff(&got, &want);
    assert!(d < 1e-4, "max |Δlogit| = {d}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// Adapters merged at export (LoRA and rsLoRA, two at once) give the logits of the base with
/// the adapters applied unmerged.
#[test]
fn merged_exports_equal_the_unmerged_adapters() {
    let Some(src) = smollm2_or_skip() else { return };
    let _disk = one_big_writer();
    let tmp = scratch_dir("export-merge");
    let (a1, a2) = (tmp.join("a1"), tmp.join("a2"));
    let all = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ];
    write_smollm2_adapter(&a1, &all, 4, 3, json!({}));
    write_smollm2_adapter(
        &a2,
        &["q_proj", "k_proj"],
        8,
        5,
        json!({"use_rslora": true}),
    );
    let ads = [
        "--adapter",
        a1.to_str().unwrap(),
        "--adapter",
        a2.to_str().unwrap(),
    ];
    let want = logits(&src, &ads, &tmp.join("unmerged.safetensors"));
    let base = logits(&src, &[], &tmp.join("base.safetensors"));
    assert!(max_abs_diff(&want, &base) > 0.5, "the adapters must matter");
    let out = tmp.join("merged.gguf");
    let mut args = vec![
        "--model",
        src.to_str().unwrap(),
        "--type",
        "f32",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(&ads);
    export(&args);
    let got = logits(&out, &[], &tmp.join("merged.safetensors"));
    // f32 rounding only: W + s·BA summed once against x·W + s·(x·A)·B, relative to the size
    // of logits these large random adapters produce (measured: 1.1e-4 of it over 30 layers).
    let d = max_abs_diff(&got, &want);
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(
        d < 2e-4 * scale,
        "max |Δlogit| = {d} of logits up to {scale}"
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// `--lora-only`: llama.cpp's adapter layout (general.type "adapter", `.lora_a` [in, r] and
/// `.lora_b` [r, out] in GGUF's dims), the scaling folded into B, q/k rows permuted as the
/// base's, and two adapters on one module stacked into one of the summed rank.
#[test]
fn lora_only_exports_hold_a_and_scaled_b() {
    let Some(src) = smollm2_or_skip() else { return };
    let tmp = temp_dir("export-lora");
    let (a1, a2) = (tmp.join("a1"), tmp.join("a2"));
    write_smollm2_adapter(&a1, &["q_proj", "v_proj"], 4, 3, json!({"lora_alpha": 16}));
    write_smollm2_adapter(&a2, &["q_proj"], 2, 4, json!({"lora_alpha": 2}));
    let out = tmp.join("lora.gguf");
    export(&[
        "--model",
        src.to_str().unwrap(),
        "--adapter",
        a1.to_str().unwrap(),
        "--adapter",
        a2.to_str().unwrap(),
        "--lora-only",
        "--type",
        "f32",
        "--out",
        out.to_str().unwrap(),
    ]);
    let g = GgufFile::open(&out).unwrap();
    assert_eq!(
        g.get("general.type").and_then(|v| v.as_str()),
        Some("adapter")
    );
    assert_eq!(g.get("adapter.type").and_then(|v| v.as_str()), Some("lora"));
    assert_eq!(
        g.get("general.architecture").and_then(|v| v.as_str()),
        Some("llama")
    );
    assert_eq!(g.tensors.len(), 30 * 2 * 2);
    let data = std::fs::read(&out).unwrap();
    let read = |name: &str| -> (Vec<u64>, Vec<f32>) {
        let t = g.tensors.iter().find(|t| t.name == name).unwrap();
        let v = data[t.range.clone()]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        (t.dims.clone(), v)
    };
    let adapter = |dir: &Path, key: &str| -> Vec<f32> {
        read_f32(
            &dir.join("adapter_model.safetensors"),
            &format!("base_model.model.model.layers.7.self_attn.{key}.weight"),
        )
        .1
    };
    // v_proj: one adapter, r = 4, s = 16 / 4.
    let (dims, a) = read("blk.7.attn_v.weight.lora_a");
    assert_eq!(dims, vec![576, 4]);
    assert_eq!(a, adapter(&a1, "v_proj.lora_A"));
    let (dims, b) = read("blk.7.attn_v.weight.lora_b");
    assert_eq!(dims, vec![4, 192]);
    let want: Vec<f32> = adapter(&a1, "v_proj.lora_B")
        .iter()
        .map(|x| 4.0 * x)
        .collect();
    assert_eq!(b, want);
    // q_proj: stacked, r = 4 + 2, B = [4·B1 | 1·B2] with rows permuted for RoPE (9 heads).
    let (dims, a) = read("blk.7.attn_q.weight.lora_a");
    assert_eq!(dims, vec![576, 6]);
    let mut stacked = adapter(&a1, "q_proj.lora_A");
    stacked.extend(adapter(&a2, "q_proj.lora_A"));
    assert_eq!(a, stacked);
    let (dims, b) = read("blk.7.attn_q.weight.lora_b");
    assert_eq!(dims, vec![6, 576]);
    let (b1, b2) = (adapter(&a1, "q_proj.lora_B"), adapter(&a2, "q_proj.lora_B"));
    let mut cat = Vec::new();
    for o in 0..576 {
        cat.extend(b1[o * 4..(o + 1) * 4].iter().map(|x| 4.0 * x));
        cat.extend(&b2[o * 2..(o + 1) * 2]);
    }
    assert_eq!(b, permute_rows(&cat, 576, 9).unwrap());
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// Refusals name the problem and leave no file behind.
#[test]
fn bad_exports_fail_cleanly() {
    let Some(src) = smollm2_or_skip() else { return };
    let tmp = temp_dir("export-bad");
    let s = src.to_str().unwrap();
    let out = tmp.join("x.gguf");
    let o_ = out.to_str().unwrap();
    let ad = tmp.join("ad");
    write_smollm2_adapter(&ad, &["q_proj"], 4, 1, json!({}));
    let wrong = tmp.join("wrong");
    write_smollm2_adapter(&wrong, &["q_proj"], 4, 1, json!({}));
    // An adapter for another model: A's width does not fit q_proj.
    std::fs::write(
        wrong.join("adapter_model.safetensors"),
        std::fs::read(ad.join("adapter_model.safetensors")).unwrap(),
    )
    .unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--model", s, "--lora-only", "--out", o_],
            "at least one --adapter",
        ),
        (
            vec![
                "--model",
                s,
                "--adapter",
                ad.to_str().unwrap(),
                "--lora-only",
                "--type",
                "q8_0",
                "--out",
                o_,
            ],
            "f32, f16 or bf16",
        ),
        (
            vec!["--model", "/no/such/model", "--out", o_],
            "/no/such/model",
        ),
        (vec!["--model", s, "--type", "q3_k", "--out", o_], "q3_k"),
    ];
    for (args, words) in cases {
        let mut a = vec!["export"];
        a.extend(args);
        let o = qlora(&a);
        assert!(!o.status.success(), "{a:?} succeeded");
        let e = stderr(&o);
        assert!(e.contains(words), "{a:?}: {e}");
        assert!(!out.exists(), "{a:?} left {}", out.display());
    }
    // A GGUF model without tokenizer metadata: llama.cpp could not load what would be written.
    let full = tmp.join("full.gguf");
    export(&[
        "--model",
        s,
        "--type",
        "q8_0",
        "--out",
        full.to_str().unwrap(),
    ]);
    let g = GgufFile::open(&full).unwrap();
    let data = std::fs::read(&full).unwrap();
    let meta: Vec<(String, GgufValue)> = g
        .metadata
        .iter()
        .filter(|(k, _)| !k.starts_with("tokenizer."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let specs: Vec<qlora_io::GgufTensorSpec> = g
        .tensors
        .iter()
        .map(|t| qlora_io::GgufTensorSpec {
            name: t.name.clone(),
            dims: t.dims.clone(),
            ggml_type: t.ggml_type,
        })
        .collect();
    let bare = tmp.join("bare.gguf");
    let mut w = qlora_io::GgufWriter::create(&bare, &meta, &specs).unwrap();
    for t in &g.tensors {
        w.write(&t.name, &data[t.range.clone()]).unwrap();
    }
    w.finish().unwrap();
    let o = qlora(&["export", "--model", bare.to_str().unwrap(), "--out", o_]);
    assert!(
        !o.status.success() && stderr(&o).contains("no tokenizer metadata"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());
    std::fs::write(&out, b"keep").unwrap();
    let o = qlora(&["export", "--model", s, "--out", o_]);
    assert!(!o.status.success() && stderr(&o).contains("already exists"));
    assert_eq!(std::fs::read(&out).unwrap(), b"keep");
    let leftovers: Vec<_> = std::fs::read_dir(&tmp)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Every written type gives llama.cpp's bytes: FNV-1a hashes of three tensors as
/// `llama-quantize --pure` (llama.cpp 0c1e570, the llama-cpp-python 0.3.36 sdist; with
/// `--token-embedding-type q8_0` for the 4/5-bit types, qlora's default) wrote them from the
/// f32 export of the same GGUF (tools/check-gguf-export.sh compares whole files). attn_q rows
/// (576) are not whole 256-blocks, so q4_k/q6_k fall back there as llama.cpp does.
#[test]
fn quantized_exports_have_llama_quantize_bytes() {
    let Some(src) = smollm2_or_skip() else { return };
    let tmp = temp_dir("export-bytes");
    // (--type, [(tensor, its ggml type, FNV-1a of its bytes)])
    type Expected = (&'static str, [(&'static str, &'static str, u64); 3]);
    let want: [Expected; 8] = [
        (
            "q8_0",
            [
                ("blk.0.attn_q.weight", "Q8_0", 0x79141677325c6310),
                ("blk.3.ffn_down.weight", "Q8_0", 0xf6dceb2f96fde8a6),
                ("token_embd.weight", "Q8_0", 0xb781c33a3e759a55),
            ],
        ),
        (
            "q4_0",
            [
                ("blk.0.attn_q.weight", "Q4_0", 0x8c91186498d4bed0),
                ("blk.3.ffn_down.weight", "Q4_0", 0xcc9a9b48de1816d5),
                ("token_embd.weight", "Q8_0", 0xb781c33a3e759a55),
            ],
        ),
        (
            "q4_1",
            [
                ("blk.0.attn_q.weight", "Q4_1", 0xaadbc77c88f41a2d),
                ("blk.3.ffn_down.weight", "Q4_1", 0x097e880424b0c14f),
                ("token_embd.weight", "Q8_0", 0xb781c33a3e759a55),
            ],
        ),
        (
            "q5_0",
            [
                ("blk.0.attn_q.weight", "Q5_0", 0xdad4dcf466f21d6e),
                ("blk.3.ffn_down.weight", "Q5_0", 0xddf314a747ee5c0d),
                ("token_embd.weight", "Q8_0", 0xb781c33a3e759a55),
            ],
        ),
        (
            "q5_1",
            [
                ("blk.0.attn_q.weight", "Q5_1", 0x5b89e64f2e2017c7),
                ("blk.3.ffn_down.weight", "Q5_1", 0x201cec030abe957d),
                ("token_embd.weight", "Q8_0", 0xb781c33a3e759a55),
            ],
        ),
        (
            "q4_k",
            [
                ("blk.0.attn_q.weight", "Q5_0", 0xdad4dcf466f21d6e),
                ("blk.3.ffn_down.weight", "Q4_K", 0xb4a46b32826d8e56),
                ("token_embd.weight", "Q8_0", 0xb781c33a3e759a55),
            ],
        ),
        (
            "q6_k",
            [
                ("blk.0.attn_q.weight", "Q8_0", 0x79141677325c6310),
                ("blk.3.ffn_down.weight", "Q6_K", 0x08b281b1a129a315),
                ("token_embd.weight", "Q8_0", 0xb781c33a3e759a55),
            ],
        ),
        (
            "bf16",
            [
                ("blk.0.attn_q.weight", "BF16", 0x292fec5b5c4709b7),
                ("blk.3.ffn_down.weight", "BF16", 0x9acdd8f181acc57e),
                ("token_embd.weight", "BF16", 0x609d2f5d4dbb29ed),
            ],
        ),
    ];
    let mut bad = Vec::new();
    for (ty, tensors) in want {
        let f = tmp.join(format!("{ty}.gguf"));
        export(&[
            "--model",
            src.to_str().unwrap(),
            "--type",
            ty,
            "--out",
            f.to_str().unwrap(),
        ]);
        let g = GgufFile::open(&f).unwrap();
        let data = std::fs::read(&f).unwrap();
        for (name, t, hash) in tensors {
            let info = g.tensors.iter().find(|x| x.name == name).unwrap();
            let got = (info.ggml_type.name(), fnv1a(&data[info.range.clone()]));
            if got != (t, hash) {
                bad.push(format!(
                    "--type {ty} {name}: {got:?}, llama-quantize wrote ({t}, {hash:#x})"
                ));
            }
        }
        std::fs::remove_file(&f).unwrap();
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    std::fs::remove_dir_all(&tmp).unwrap();
}

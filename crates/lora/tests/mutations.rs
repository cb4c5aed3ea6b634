//! A bounded mutation fuzzer over every file parser, run in CI: valid inputs from the fixtures
//! (a bitsandbytes 4-bit safetensors checkpoint, a GGUF, config.json, a GPTQ quantization
//! config with `dynamic` rules, a quant-state JSON, an adapter_config.json, a PyTorch `.bin`
//! adapter) are mutated (bit flips, byte overwrites with
//! boundary values, insertions, deletions, truncation, splices) and fed to their parser. Every
//! result must be Ok or Err: a panic or a parse slower than its bound fails the test, with the
//! seed and the case to reproduce it.
//!
//! QLORA_FUZZ_CASES=N runs N mutations per parser (default 300; CI uses the default).

use qlora_io::{GgufFile, ModelConfig, QuantStateJson, SafetensorsFile};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One to four random edits of `seed`.
fn mutate(seed: &[u8], r: &mut Rng) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + r.below(4) {
        if b.is_empty() {
            b.push(r.next() as u8);
            continue;
        }
        let at = r.below(b.len());
        match r.below(7) {
            0 => b[at] ^= 1 << r.below(8),
            1 => b[at] = [0u8, 0xff, 0x7f, 0x80, b'"', b'{', b'9'][r.below(7)],
            2 => {
                // A boundary 8-byte integer (lengths, offsets, counts).
                let v: u64 = [0, 1, u32::MAX as u64, u64::MAX, 1 << 40, 1 << 62][r.below(6)];
                for (k, byte) in v.to_le_bytes().iter().enumerate() {
                    if at + k < b.len() {
                        b[at + k] = *byte;
                    }
                }
            }
            3 => {
                let n = 1 + r.below(16);
                b.splice(at..at, std::iter::repeat_n(r.next() as u8, n));
            }
            4 => {
                let n = (1 + r.below(64)).min(b.len() - at);
                b.drain(at..at + n);
            }
            5 => b.truncate(at),
            _ => {
                // Copy a slice of the input elsewhere (repeats structures).
                let from = r.below(b.len());
                let n = (1 + r.below(32)).min(b.len() - from);
                let piece = b[from..from + n].to_vec();
                b.splice(at..at, piece);
            }
        }
    }
    b
}

fn cases() -> usize {
    std::env::var("QLORA_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

/// Runs `parse` on mutations of `seed`; parsers that read files get them through `file`.
fn fuzz(name: &str, seed: &[u8], limit: Duration, parse: impl Fn(&[u8])) {
    let mut r = Rng(0x9E37_79B9_7F4A_7C15 ^ name.len() as u64);
    // The unmutated input parses (the fuzzer starts from valid data).
    parse(seed);
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut failure = None;
    for case in 0..cases() {
        let input = mutate(seed, &mut r);
        let t = Instant::now();
        let res = catch_unwind(AssertUnwindSafe(|| parse(&input)));
        let took = t.elapsed();
        if res.is_err() {
            let saved = std::env::temp_dir()
                .join(format!("qlora-fuzz-{name}-case{case}.bin").replace(' ', "_"));
            let _ = std::fs::write(&saved, &input);
            failure = Some(format!(
                "{name}: case {case} panicked ({} bytes, saved to {}; keep it as a regression input)",
                input.len(),
                saved.display()
            ));
            break;
        }
        if took > limit {
            failure = Some(format!(
                "{name}: case {case} took {took:?} (limit {limit:?})"
            ));
            break;
        }
    }
    std::panic::set_hook(quiet);
    if let Some(f) = failure {
        panic!("{f}");
    }
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qlora-fuzz-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn safetensors_headers() {
    let seed = std::fs::read(root().join("tests/fixtures/bnb/llama-gqa-nf4-dq/model.safetensors"))
        .unwrap();
    // Mutate the header region (and a little past it): the data is opaque bytes.
    let n = 8 + u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize;
    let head = &seed[..(n + 64).min(seed.len())];
    let dir = tmp("st");
    fuzz("safetensors", head, Duration::from_secs(2), |b| {
        let p = dir.join("m.safetensors");
        std::fs::write(&p, b).unwrap();
        let _ = SafetensorsFile::open(&p);
    });
}

/// A small valid GGUF: llama metadata and one f32 tensor.
fn gguf_seed() -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.extend(3u64.to_le_bytes());
    let s = |b: &mut Vec<u8>, t: &str| {
        b.extend((t.len() as u64).to_le_bytes());
        b.extend(t.as_bytes());
    };
    s(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes());
    s(&mut b, "llama");
    s(&mut b, "llama.block_count");
    b.extend(4u32.to_le_bytes());
    b.extend(2u32.to_le_bytes());
    s(&mut b, "tokenizer.ggml.tokens");
    b.extend(9u32.to_le_bytes());
    b.extend(8u32.to_le_bytes());
    b.extend(3u64.to_le_bytes());
    for t in ["<s>", "a", "b"] {
        s(&mut b, t);
    }
    s(&mut b, "token_embd.weight");
    b.extend(2u32.to_le_bytes());
    b.extend(8u64.to_le_bytes());
    b.extend(3u64.to_le_bytes());
    b.extend(0u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    while !b.len().is_multiple_of(32) {
        b.push(0);
    }
    b.resize(b.len() + 8 * 3 * 4, 0);
    b
}

#[test]
fn gguf_files() {
    let dir = tmp("gguf");
    fuzz("gguf", &gguf_seed(), Duration::from_secs(2), |b| {
        let p = dir.join("m.gguf");
        std::fs::write(&p, b).unwrap();
        if let Ok(g) = GgufFile::open(&p) {
            let _ = g.config();
            let _ = qlora_io::tokenizer_from_gguf(&g);
        }
    });
}

#[test]
fn gptq_quantization_configs() {
    // GPTQModel's config with per-module `dynamic` regexes; every module of the model asked.
    let seed =
        std::fs::read(root().join("tests/fixtures/gptq/gptq-llama64-lmhead-dynamic/config.json"))
            .unwrap();
    let dir = tmp("gptq");
    fuzz("gptq config", &seed, Duration::from_secs(1), |b| {
        let p = dir.join("config.json");
        std::fs::write(&p, b).unwrap();
        let Ok(cfg) = ModelConfig::load(&p) else {
            return;
        };
        if let Ok(Some(g)) =
            qlora_io::GroupedConfig::from_model(&dir, cfg.quantization_config.as_ref())
        {
            for i in 0..cfg.num_hidden_layers.min(4) {
                for l in qlora_io::LAYER_LINEARS {
                    if let Ok(Some(c)) = g.for_module(&format!("model.layers.{i}.{l}")) {
                        let _ = c.shapes(cfg.hidden_size, cfg.intermediate_size);
                    }
                }
            }
            let _ = g.for_module("lm_head");
        }
    });
}

#[test]
fn config_json() {
    let seed =
        std::fs::read(root().join("tests/fixtures/bnb/llama-gqa-nf4-dq/config.json")).unwrap();
    let dir = tmp("cfg");
    fuzz("config.json", &seed, Duration::from_secs(1), |b| {
        let p = dir.join("config.json");
        std::fs::write(&p, b).unwrap();
        let _ = ModelConfig::load(&p);
    });
}

#[test]
fn quant_state_json() {
    let seed = br#"{"quant_type": "nf4", "absmax_shape": [96], "blocksize": 64, "quant_map": [0.0], "dtype": "float32", "shape": [48, 128], "nested_blocksize": 256, "nested_offset": 0.01, "nested_dtype": "float32", "nested_absmax_shape": [1], "nested_quant_map": [0.0]}"#;
    fuzz("quant state", seed, Duration::from_secs(1), |b| {
        let _ = QuantStateJson::parse(b);
    });
}

#[test]
fn adapter_config_json() {
    let seed = std::fs::read(
        root().join("tests/fixtures/peft/rslora-patterns/adapter/adapter_config.json"),
    )
    .unwrap();
    fuzz("adapter_config.json", &seed, Duration::from_secs(1), |b| {
        let _ = qlora_lora::AdapterConfig::parse(&String::from_utf8_lossy(b));
    });
}

#[test]
fn torch_bin_adapters() {
    let seed = std::fs::read(root().join("tests/fixtures/peft/old-bin/adapter/adapter_model.bin"))
        .unwrap();
    let dir = tmp("bin");
    fuzz("adapter_model.bin", &seed, Duration::from_secs(2), |b| {
        let p = dir.join("adapter_model.bin");
        std::fs::write(&p, b).unwrap();
        let _ = qlora_lora::pickle::read_torch_file(&p);
    });
}

#[test]
#[should_panic(expected = "panicked")]
fn the_harness_reports_a_parser_that_panics() {
    // A parser with a bug on short inputs: the fuzzer must find it and fail.
    fuzz(
        "self-check",
        b"0123456789abcdef",
        Duration::from_secs(1),
        |b| {
            if b.len() < 8 {
                panic!("bug");
            }
        },
    );
}

#[test]
fn regression_inputs_found_by_fuzzing() {
    // Each file in tests/fixtures/fuzz once made its parser panic; now each is a clean error.
    let dir = root().join("tests/fixtures/fuzz");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let r = catch_unwind(AssertUnwindSafe(|| {
            match p.extension().and_then(|x| x.to_str()) {
                Some("gguf") => GgufFile::open(&p).and_then(|g| g.config()).is_err(),
                Some("safetensors") => SafetensorsFile::open(&p).is_err(),
                Some("bin") => qlora_lora::pickle::read_torch_file(&p).is_err(),
                Some("json") => ModelConfig::load(&p).is_err(),
                _ => panic!("{name}: unknown kind"),
            }
        }));
        assert_eq!(
            r.ok(),
            Some(true),
            "{name}: must be an error, not a panic or a success"
        );
        n += 1;
    }
    assert!(n > 0);
}

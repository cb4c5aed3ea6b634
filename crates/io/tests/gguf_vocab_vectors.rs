//! Tokenizers built from GGUF metadata against llama.cpp's own test vectors
//! (`models/ggml-vocab-*.gguf` with `.inp`/`.out`, from the llama-cpp-python 0.3.36 sdist).
//! tools/fetch-fixtures.sh extracts them; `make test` points QLORA_LLAMA_CPP_MODELS at them.
//! Skipped when unset, unless QLORA_REQUIRE_FIXTURES is set (CI).

use std::path::PathBuf;

fn models_dir() -> Option<PathBuf> {
    let d = PathBuf::from(std::env::var_os("QLORA_LLAMA_CPP_MODELS")?);
    d.is_dir().then_some(d)
}

fn check(vocab: &str) {
    let Some(dir) = models_dir() else {
        assert!(
            std::env::var("QLORA_REQUIRE_FIXTURES").is_err(),
            "QLORA_LLAMA_CPP_MODELS unset or missing while QLORA_REQUIRE_FIXTURES is set; run tools/fetch-fixtures.sh"
        );
        eprintln!("skipping: QLORA_LLAMA_CPP_MODELS not set; run tools/fetch-fixtures.sh");
        return;
    };
    let g = qlora_io::GgufFile::open(&dir.join(format!("ggml-vocab-{vocab}.gguf"))).unwrap();
    let tok = qlora_io::tokenizer_from_gguf(&g).unwrap().unwrap();
    check_vectors(&dir, vocab, &tok);
    // Round trip through `qlora export`'s writer: the tokenizer.json document written back as
    // GGUF metadata, read again, tokenizes the same.
    let n = g
        .get("tokenizer.ggml.tokens")
        .unwrap()
        .as_array()
        .unwrap()
        .len();
    let meta = qlora_io::gguf_tokenizer_metadata(&tok, n, &g.path).unwrap();
    let out = std::env::temp_dir().join(format!("qlora-vocab-{vocab}-{}.gguf", std::process::id()));
    qlora_io::GgufWriter::create(&out, &meta, &[])
        .unwrap()
        .finish()
        .unwrap();
    let back = qlora_io::GgufFile::open(&out).unwrap();
    for key in [
        "tokenizer.ggml.model",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.bos_token_id",
    ] {
        assert_eq!(back.get(key), g.get(key), "{vocab}: {key}");
    }
    if let Some(pre) = g.get("tokenizer.ggml.pre") {
        let pre = pre.as_str().unwrap();
        let want = if pre == "llama3" { "llama-bpe" } else { pre };
        assert_eq!(
            back.get("tokenizer.ggml.pre").and_then(|v| v.as_str()),
            Some(want)
        );
    }
    let tok2 = qlora_io::tokenizer_from_gguf(&back).unwrap().unwrap();
    std::fs::remove_file(&out).unwrap();
    check_vectors(&dir, vocab, &tok2);
}

fn check_vectors(dir: &std::path::Path, vocab: &str, tok: &qlora_io::TokenizerInfo) {
    let inp = std::fs::read_to_string(dir.join(format!("ggml-vocab-{vocab}.gguf.inp"))).unwrap();
    let out = std::fs::read_to_string(dir.join(format!("ggml-vocab-{vocab}.gguf.out"))).unwrap();
    let inputs: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    let outputs: Vec<&str> = out.lines().collect();
    let mut failures = Vec::new();
    for (text, want) in inputs.iter().zip(&outputs) {
        let want: Vec<u32> = want
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect();
        let got = tok
            .tokenizer
            .encode(*text, false)
            .unwrap()
            .get_ids()
            .to_vec();
        if got != want {
            failures.push(format!("{text:?}: got {got:?}, want {want:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{vocab}: {} of {} differ:\n{}",
        failures.len(),
        outputs.len(),
        failures.join("\n")
    );
}

#[test]
fn llama_spm_vectors() {
    check("llama-spm");
}

#[test]
fn llama_bpe_vectors() {
    check("llama-bpe");
}

#[test]
fn gpt2_vectors() {
    check("gpt-2");
}

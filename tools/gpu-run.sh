#!/usr/bin/env bash
# Runs on the GPU device machine, from the repository root of the carried tree, with .gpu/
# built by tools/gpu-build.sh. Stages (any of): check (the GPU test executables with
# QLORA_REQUIRE_GPU=1), bench (qlora bench on a synthetic Mistral-7B), peer (HF + PEFT +
# bitsandbytes, ../shared/peers/h200_peer.py, when its wheel is in .gpu-peer/whl; carry it too).
# Logs under $OUT.
set -uo pipefail
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
Q=.gpu/bin/qlora
export QLORA_REQUIRE_GPU=1 QLORA_BIN="$PWD/$Q" QLORA_REPO="$PWD"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
date -u | tee -a "$OUT/gpu.txt"
for stage in "$@"; do
  case "$stage" in
    check)
      for t in .gpu/bin/test-*; do
        echo "== $t"; "$t" --test-threads=1 --nocapture 2>&1 | tee -a "$OUT/check.log" | grep -E "^test |test result|panicked|over|differ|synthetic" ; done ;;
    bench)
      for prec in bf16; do
        echo "== kernels ($prec)"; $Q bench --kernels --device cuda --precision $prec 2>&1 | tee -a "$OUT/bench.log"
        echo "== NF4+DQ base ($prec)"
        $Q bench --synthetic mistral-7b --quantize nf4 --double-quant --device cuda --precision $prec \
          --prompt-tokens 2048 --gen-tokens 64 --batch 1,8,32,64 --repeats 3 2>&1 | tee -a "$OUT/bench.log"
        echo "== NF4+DQ base + r=16 all-linear adapter ($prec)"
        $Q bench --synthetic mistral-7b --quantize nf4 --double-quant --adapter-rank 16 --device cuda --precision $prec \
          --prompt-tokens 2048 --gen-tokens 64 --batch 1,8,32,64 --repeats 3 2>&1 | tee -a "$OUT/bench.log"
      done
      for k in gemv4_t1 gemv4_p3_t1; do
        echo "== batch-1 decode with the register-pipelined GEMV, QLORA_GEMV_T1=$k"
        QLORA_GEMV=registers QLORA_GEMV_T1=$k $Q bench --synthetic mistral-7b --quantize nf4 --double-quant --device cuda \
          --prompt-tokens 16 --gen-tokens 64 --repeats 3 2>&1 | grep -E "decode|prefill" | tee -a "$OUT/bench.log"
      done ;;
    peer)
      if ls .gpu-peer/whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu-peer/whl/*.whl && \
          PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site python3 .gpu/h200_peer.py --decode --out "$OUT/peer.json" 2>&1 | tail -20 | tee "$OUT/peer.log"
      else echo "no .gpu-peer/whl: peer skipped"; fi ;;
    *) echo "unknown stage $stage" ;;
  esac
done

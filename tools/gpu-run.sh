#!/usr/bin/env bash
# Runs on the GPU device machine, from the repository root of the carried tree, with .gpu/
# built by tools/gpu-build.sh. Stages (any of): check (the GPU test executables with
# QLORA_REQUIRE_GPU=1), ops (the op-level GPU tests alone), bench (qlora bench on a synthetic Mistral-7B), kernels (the kernel
# bench alone), decode1 (batch-1 decode with and without an adapter), ncu (Nsight Compute: the decode GEMVs' stall reasons), steps (every kernel's
# time over two decode steps), fold (the fused LoRA against the two-product path, and ncu per kernel with it), opsfuse (the fused one-token GEMV op test alone), attrope (the attention with RoPE inside, A/B with its L2 prefetch), window (the one-token GEMVs' barrier every 8 passes against 1 and 16, A/B), serve (test-serve alone), attn (the decode attention and GEMV kernels' durations at batch 1
# and 64, short and long contexts), models (test-gpu alone), gemvcap (decode with the tensor-core
# GEMVs off, A/B), peer (HF + PEFT +
# bitsandbytes, ../shared/peers/h200_peer.py --decode, when its wheel is in .gpu-peer/whl; carry it too),
# train (qlora bench --train on a synthetic Mistral-7B), gputrain (the GPU training tests alone),
# peertrain (h200_peer.py --train), mma (the default tensor-core GEMV against QLORA_GEMV=cuda), sets (many
# adapters at once: the adapter-set and GPU-serve tests, mixed-adapter decode), ncumma (Nsight Compute on the tensor-core
# GEMVs: gemv4m in batch-8 decode, gemv4m4 in a 16-token prefill), f16 (the f16 tensor-core GEMV
# against the kernels before it, decode at batch 1 and 8), pdl (the early PDL trigger, A/B), fuse (the decode fusions one by one, A/B), t1h (the one-token GEMV with f16 products
# against gemv4x_t1, decode at batch 1), ncuxh (Nsight Compute on gemv4xh_t1), serve7b (the HTTP
# load test of the GPU server at Mistral-7B size), split (the fused LoRA's shrink in 1 / 2 / 4
# parts a row: op and model tests, batch-1 decode with an adapter), stage16 (the fused LoRA's B
# staged by 16-byte against 4-byte copies: op and model tests, batch-1 decode).
# Logs under $OUT.
set -uo pipefail
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
Q=.gpu/bin/qlora
export QLORA_REQUIRE_GPU=1 QLORA_BIN="$PWD/$Q" QLORA_REPO="$PWD"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
date -u | tee -a "$OUT/gpu.txt"
# Sums an ncu --csv gpu__time_duration report per kernel name.
ncu_summary() {
  python3 - "$1" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
h = rows[0]; ki = h.index("Kernel Name"); vi = h.index("Metric Value"); ui = h.index("Metric Unit")
tot = collections.defaultdict(float); cnt = collections.Counter()
for r in rows[1:]:
    v = float(r[vi].replace(",", "")) * {"ns": 1e-3, "nsecond": 1e-3, "ms": 1e3, "msecond": 1e3}.get(r[ui], 1.0)
    tot[r[ki][:60]] += v; cnt[r[ki][:60]] += 1
s = sum(tot.values())
for k, v in sorted(tot.items(), key=lambda kv: -kv[1]): print(f"{v:10.1f} us {100*v/s:5.1f}% {cnt[k]:5d}x {k}")
print(f"{s:10.1f} us total over {sum(cnt.values())} kernels")
PY
}
# Decode A/B over a switch: VAR unset, then each of VALUES, twice over, each with and without
# an r=16 adapter, at BATCHES.   decode_ab VAR "VALUES" BATCHES
# Decode at batch 1 and 8 under each setting ("-" = the default, or VAR=VALUE), two rounds
# without an adapter, then the first two settings with an r=16 adapter.
decode_settings() {
  local r st
  for r in 1 2; do
    for st in "$@"; do
      echo "== decode, ${st/#-/default} (no adapter)" | tee -a "$OUT/bench.log"
      env $([ "$st" != - ] && echo "$st") $Q bench --synthetic mistral-7b --quantize nf4 --double-quant --device cuda \
        --prompt-tokens 16 --gen-tokens 64 --batch 1,8 --repeats 3 2>&1 | grep -E "decode" | tee -a "$OUT/bench.log"
    done
  done
  for st in "$1" "$2"; do
    echo "== decode, ${st/#-/default} --adapter-rank 16" | tee -a "$OUT/bench.log"
    env $([ "$st" != - ] && echo "$st") $Q bench --synthetic mistral-7b --quantize nf4 --double-quant --adapter-rank 16 \
      --device cuda --prompt-tokens 16 --gen-tokens 64 --batch 1,8 --repeats 3 2>&1 | grep -E "decode" | tee -a "$OUT/bench.log"
  done
}
decode_ab() {
  local var=$1 values=$2 batches=$3 f ad pre
  for f in default $values default $values; do
    for ad in "" "--adapter-rank 16"; do
      echo "== decode, $var=$f ${ad:-(no adapter)}" | tee -a "$OUT/bench.log"
      if [ "$f" = default ]; then pre=""; else pre="$var=$f"; fi
      env $pre $Q bench --synthetic mistral-7b --quantize nf4 --double-quant $ad --device cuda \
        --prompt-tokens 16 --gen-tokens 64 --batch "$batches" --repeats 3 2>&1 | grep -E "decode|prefill" | tee -a "$OUT/bench.log"
    done
  done
}
for stage in "$@"; do
  echo "== stage $stage at $(date -u +%T)" | tee -a "$OUT/gpu.txt"
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
      echo "== batch-1 decode with the staged GEMV (QLORA_GEMV=staged)"
      QLORA_GEMV=staged $Q bench --synthetic mistral-7b --quantize nf4 --double-quant --device cuda \
        --prompt-tokens 16 --gen-tokens 64 --repeats 3 2>&1 | grep -E "decode|prefill" | tee -a "$OUT/bench.log" ;;
    ops)
      echo "== .gpu/bin/test-ops"; .gpu/bin/test-ops --test-threads=1 2>&1 | tee -a "$OUT/check.log" | grep -E "^test |test result|panicked"
      echo "== the GEMV op test with QLORA_GEMV=mma (tensor-core passes up to 64 tokens)"
      QLORA_GEMV=mma .gpu/bin/test-ops fused_4bit --test-threads=1 --nocapture 2>&1 | tee -a "$OUT/check.log" | grep -E "^test |test result|panicked|dispatch" ;;
    decode1)
      for ad in "" "--adapter-rank 16"; do
        echo "== batch-1 decode, NF4+DQ base ${ad:-(no adapter)}"
        $Q bench --synthetic mistral-7b --quantize nf4 --double-quant $ad --device cuda \
          --prompt-tokens 16 --gen-tokens 64 --repeats 3 2>&1 | grep -E "decode|prefill" | tee -a "$OUT/bench.log"
      done ;;
    mma)
      # The tensor-core GEMV (the bf16 default from 2 tokens) against the CUDA-core kernels
      # (QLORA_GEMV=cuda), decode at batch 1, 8 and 32, with and without an adapter; then the
      # model-level GPU tests without it.
      for fam in "" cuda; do
        for ad in "" "--adapter-rank 16"; do
          echo "== decode, GEMV ${fam:-default}, ${ad:-no adapter}"
          QLORA_GEMV=$fam $Q bench --synthetic mistral-7b --quantize nf4 --double-quant $ad --device cuda \
            --prompt-tokens 16 --gen-tokens 64 --batch 1,8,32 --repeats 3 2>&1 | grep -E "decode|prefill" | tee -a "$OUT/bench.log"
        done
      done
      echo "== .gpu/bin/test-gpu with QLORA_GEMV=cuda"
      QLORA_GEMV=cuda .gpu/bin/test-gpu --test-threads=1 --nocapture 2>&1 | tee -a "$OUT/check-cuda.log" | grep -E "^test |test result|panicked|over" ;;
    serve7b)
      # The HTTP load test of `qlora serve --device cuda` at Mistral-7B size: a random
      # Mistral-7B (tools/make-random-mistral.py, as the peer's) quantized to NF4 + double
      # quant at load, 8 random r=16 all-linear adapters, 8/32/64 concurrent streams to the
      # base, to one adapter, and mixed over all.
      echo "== .gpu/bin/test-serve"; .gpu/bin/test-serve --test-threads=1 2>&1 | tee -a "$OUT/check.log" | grep -E "^test .*gpu|test result|panicked"
      python3 tools/make-random-mistral.py /tmp/m7b 2>&1 | tail -1 | tee "$OUT/serve7b.log"
      python3 tools/serve-load-test.py --qlora "$Q" --model /tmp/m7b --adapters 8 --adapter-modules all \
        --adapter-rank 16 --clients 8,32,64 --routes base,one,mixed --requests-per-client 3 --max-tokens 64 \
        --max-concurrent 64 --threads 16 --serve-arg=--device --serve-arg=cuda --serve-arg=--quantize \
        --serve-arg=nf4 --serve-arg=--double-quant 2>>"$OUT/serve7b.log" | tee "$OUT/serve7b.json"
      tail -5 "$OUT/serve7b.log" ;;
    sets)
      # Many adapters at once: the model-level adapter-set test, the server on the GPU
      # against `qlora generate`, and batched decode with 8 adapters mixed in every batch
      # beside the no-adapter and one-adapter figures.
      echo "== adapter sets"; .gpu/bin/test-gpu adapter_sets --test-threads=1 --nocapture 2>&1 | tee -a "$OUT/check.log" | grep -E "^test |test result|panicked|off the"
      echo "== serve on the GPU"; .gpu/bin/test-serve serve_on_the_gpu --test-threads=1 --nocapture 2>&1 | tee -a "$OUT/check.log" | grep -E "^test |test result|panicked"
      echo "== adapter sets, QLORA_BGMV=always"; QLORA_BGMV=always .gpu/bin/test-gpu adapter_sets --test-threads=1 --nocapture 2>&1 | tee -a "$OUT/check.log" | grep -E "^test |test result|panicked|off the"
      echo "== adapter sets, QLORA_SET_STACK=0"; QLORA_SET_STACK=0 .gpu/bin/test-gpu adapter_sets --test-threads=1 --nocapture 2>&1 | tee -a "$OUT/check.log" | grep -E "^test |test result|panicked|off the"
      for ad in "" "--adapter-rank 16" "--mixed-adapters 8 --adapter-rank 16" "stack0 --mixed-adapters 8 --adapter-rank 16"; do
        pre=""; case "$ad" in stack0*) pre="QLORA_SET_STACK=0"; ad="${ad#stack0 }";; esac
        echo "== decode, NF4+DQ base ${ad:-(no adapter)} $pre" | tee -a "$OUT/bench.log"
        env $pre $Q bench --synthetic mistral-7b --quantize nf4 --double-quant $ad --device cuda \
          --prompt-tokens 16 --gen-tokens 64 --batch 1,8,16,32,64 --repeats 3 2>&1 | grep -E "adapters|decode|prefill" | tee -a "$OUT/bench.log"
      done ;;
    f16)
      # The f16 tensor-core GEMV (gemv4h, the bf16 default for 2-8 tokens; QLORA_GEMV_F16=1
      # at one token too) against the kernels before it (QLORA_GEMV_F16=0: gemv4m at 2-8).
      decode_ab QLORA_GEMV_F16 "0 1" 1,8 ;;
    pdl)
      # The early PDL trigger (QLORA_PDL_TRIGGER, default on) against the implicit one.
      decode_ab QLORA_PDL_TRIGGER "0" 1,8 ;;
    fuse)
      # The decode fusions one by one against the default, twice, batch 1 and 8 (no adapter;
      # then the default and the first setting once each with one): the norm and SwiGLU
      # folded into the one-token GEMV (and the LoRA expands), the early PDL trigger for the
      # GEMVs alone.
      decode_settings - QLORA_GEMV_FUSE=0 QLORA_PDL_TRIGGER=gemv ;;
    t1h)
      # The one-token GEMV with f16 products (gemv4xh_t1, the bf16 default at one token;
      # QLORA_GEMV_T1H=4: 4 rows a thread and pass) against the f32 gemv4x_t1 (=0).
      decode_ab QLORA_GEMV_T1H "0 4" 1 ;;
    ncuxh)
      # Nsight Compute on four of the batch-1 decode steps' gemv4xh_t1 launches (a layer's four).
      ncu --clock-control none -k regex:gemv4xh --launch-skip 8 --launch-count 4 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
        --metrics dram__bytes_read.sum,smsp__inst_executed.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum \
        $Q bench --synthetic mistral-7b --quantize nf4 --double-quant --device cuda \
        --prompt-tokens 16 --gen-tokens 8 --batch 1 --repeats 1 > "$OUT/ncu-xh.txt" 2>&1
      grep -E "gemv4|Duration|DRAM Throughput|Memory Throughput|Compute \(SM\)|Achieved Occupancy|Registers Per|Issued Ipc|No Eligible|Stall|bytes_read|inst_executed|bank|wavefronts" "$OUT/ncu-xh.txt" | head -80 ;;
    kernels)
      echo "== kernels (bf16)"; $Q bench --kernels --device cuda --precision bf16 2>&1 | tee -a "$OUT/bench.log" ;;
    ncumma)
      # Nsight Compute on the tensor-core GEMVs, one layer's four calls: gemv4m in batch-8
      # decode, and with --batch 1 the launches skipped land in the 16-token prefill's gemv4m4.
      NCU="ncu --clock-control none"
      for b in 8 1; do
        echo "== ncu: decode batch $b"
        $NCU -k regex:gemv4 --launch-skip 300 --launch-count 4 \
          --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
          --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables --section LaunchStats \
          --metrics l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum,l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum,dram__bytes_read.sum,lts__t_sectors_srcunit_tex_op_read.sum,smsp__inst_executed.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum \
          $Q bench --synthetic mistral-7b --quantize nf4 --double-quant --device cuda \
          --prompt-tokens 16 --gen-tokens 8 --batch $b --repeats 1 > "$OUT/ncu-b$b.txt" 2>&1
        grep -E "gemv4|Duration|DRAM Throughput|Memory Throughput|Compute \(SM\)|Achieved Occupancy|Registers Per|Issued Ipc|No Eligible|Stall|Block Size|Grid Size|sectors|requests|bytes_read|inst_executed|bank|wavefronts|L1/TEX Hit|L2 Hit" "$OUT/ncu-b$b.txt" | head -120
      done
      ;;
    ncu)
      # Nsight Compute (Firecracker only): the decode GEMVs' stall reasons and pipes.
      NCU="ncu --clock-control none"
      for fam in x staged; do
        echo "== ncu: GEMV family $fam"
        QLORA_GEMV=$fam $NCU -k regex:gemv4 --launch-skip 300 --launch-count 4 \
          --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
          --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section LaunchStats \
          $Q bench --synthetic mistral-7b --quantize nf4 --double-quant --device cuda \
          --prompt-tokens 16 --gen-tokens 8 --repeats 1 > "$OUT/ncu-$fam.txt" 2>&1
        grep -E "gemv4|Duration|DRAM Throughput|Memory Throughput|Compute \(SM\)|Achieved Occupancy|Registers Per|Issued Ipc|No Eligible|Stall|Block Size|Grid Size|One or More" "$OUT/ncu-$fam.txt" | head -80
      done
      ;;
    steps)
      # Every kernel's duration over two decode steps (batch 1, graph nodes), caches as the
      # step leaves them (--cache-control none), clocks untouched.
      echo "== ncu: per-kernel durations over decode steps"
      ncu --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv \
        --launch-skip 2500 --launch-count 600 \
        $Q bench --synthetic mistral-7b --quantize nf4 --double-quant --device cuda \
        --prompt-tokens 16 --gen-tokens 32 --repeats 1 > "$OUT/ncu-step.csv" 2>"$OUT/ncu-step.err"
      ncu_summary "$OUT/ncu-step.csv"
      ;;
    fold)
      # The fused LoRA in the one-token GEMV (the default) against the two-product path
      # (QLORA_LORA_FOLD=0), batch 1 and 8 with an r=16 adapter on all seven projections, twice;
      # then every kernel's duration over decode steps with the adapter, fold on.
      for r in 1 2; do
        for st in - QLORA_LORA_FOLD=0; do
          echo "== decode, ${st/#-/default} --adapter-rank 16" | tee -a "$OUT/bench.log"
          env $([ "$st" != - ] && echo "$st") $Q bench --synthetic mistral-7b --quantize nf4 --double-quant --adapter-rank 16 \
            --device cuda --prompt-tokens 16 --gen-tokens 64 --batch 1,8 --repeats 3 2>&1 | grep -E "decode" | tee -a "$OUT/bench.log"
        done
      done
      echo "== ncu: per-kernel durations over decode steps with an adapter (fold on)"
      ncu --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv \
        --launch-skip 2500 --launch-count 600 \
        $Q bench --synthetic mistral-7b --quantize nf4 --double-quant --adapter-rank 16 --device cuda \
        --prompt-tokens 16 --gen-tokens 32 --repeats 1 > "$OUT/ncu-fold.csv" 2>"$OUT/ncu-fold.err"
      ncu_summary "$OUT/ncu-fold.csv" ;;
    attrope)
      # The decode attention with RoPE and the cache store inside it (QLORA_ATT_ROPE) and its
      # keys asked of L2 before the grid wait (QLORA_ATT_PREFETCH): the attention op tests,
      # then decode at batch 1 and 8, A/B.
      echo "== .gpu/bin/test-ops attention"; .gpu/bin/test-ops attention --test-threads=1 2>&1 | tee -a "$OUT/check.log" | grep -E "^test |test result|panicked"
      decode_settings - QLORA_ATT_ROPE=0 QLORA_ATT_PREFETCH=0 "QLORA_ATT_ROPE=0 QLORA_ATT_PREFETCH=0" ;;
    window)
      # The one-token f16 GEMVs' barrier every 8 passes (the default) against every pass
      # (QLORA_GEMV_WINDOW=1) and every 16: the op tests, then decode A/B. (Run 68 also had
      # the attention merge in its last part's block here: 393 against 453 tok/s, removed.)
      for w in "" QLORA_GEMV_WINDOW=16; do
        echo "== ${w:-default} .gpu/bin/test-ops fused_"
        env $w .gpu/bin/test-ops fused_ --test-threads=1 2>&1 | tee -a "$OUT/check.log" | grep -E "^test |test result|panicked"
      done
      echo "== .gpu/bin/test-ops attention"; .gpu/bin/test-ops attention --test-threads=1 2>&1 | tee -a "$OUT/check.log" | grep -E "^test |test result|panicked"
      decode_settings - QLORA_GEMV_WINDOW=1 QLORA_GEMV_WINDOW=16 ;;
    serve)
      echo "== .gpu/bin/test-serve"; .gpu/bin/test-serve --test-threads=1 2>&1 | tee -a "$OUT/check.log" | grep -E "^test |test result|panicked" ;;
    opsfuse)
      echo "== .gpu/bin/test-ops fused_norm"; .gpu/bin/test-ops fused_norm --test-threads=1 --nocapture 2>&1 | tee -a "$OUT/check.log" | grep -E "^test |test result|panicked|fused GEMV" ;;
    models)
      echo "== .gpu/bin/test-gpu"; .gpu/bin/test-gpu --test-threads=1 --nocapture 2>&1 | tee -a "$OUT/check.log" | grep -E "^test |test result|panicked|over|differ|synthetic" ;;
    gemvcap)
      # Decode at batch 1-64 with every batch of 2 or more tokens dequantized for cuBLAS
      # (QLORA_GEMV_MAX_T=1) instead of the tensor-core GEMVs, against the default.
      for cap in - 1; do
        echo "== decode, QLORA_GEMV_MAX_T=$cap" | tee -a "$OUT/bench.log"
        env $( [ "$cap" != - ] && echo QLORA_GEMV_MAX_T=$cap ) \
          $Q bench --synthetic mistral-7b --quantize nf4 --double-quant --device cuda \
          --prompt-tokens 16 --gen-tokens 64 --batch 1,8,32,64 --repeats 3 2>&1 | grep -E "decode|prefill" | tee -a "$OUT/bench.log"
      done ;;
    attn)
      # The decode kernels' durations (attention and the GEMVs, the only decode-only kernels)
      # at batch 1 with 16 and 2,048 tokens of context and at batch 64 with 2,048, caches as
      # the steps leave them; the step time itself from the bench line.
      for cfg in "1 16" "1 2048" "64 2048"; do
        read -r b ctx <<< "$cfg"
        echo "== ncu: decode kernels, batch $b, prompt $ctx"
        ncu --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv \
          --kernel-name regex:'^(attention|gemv)' --launch-skip 64 --launch-count 320 \
          $Q bench --synthetic mistral-7b --quantize nf4 --double-quant --device cuda \
          --prompt-tokens $ctx --gen-tokens 8 --batch $b --repeats 1 > "$OUT/ncu-attn-$b-$ctx.csv" 2>"$OUT/ncu-attn-$b-$ctx.err"
        ncu_summary "$OUT/ncu-attn-$b-$ctx.csv" | tee -a "$OUT/attn.log"
        $Q bench --synthetic mistral-7b --quantize nf4 --double-quant --device cuda \
          --prompt-tokens $ctx --gen-tokens 64 --batch $b --repeats 3 2>&1 | grep -E "decode|prefill" | tee -a "$OUT/attn.log"
      done ;;
    train)
      # QLoRA training on a synthetic Mistral-7B (NF4 base, LoRA r=16 on all seven projections,
      # seq 2048), batch 1 and 4, recomputing and keeping the activations.
      for cfg in "1 always" "4 always" "1 never" "4 never"; do
        read -r b r <<< "$cfg"
        echo "== train: batch $b, recompute $r"
        $Q bench --train --synthetic mistral-7b --quantize nf4 --double-quant --device cuda \
          --prompt-tokens 2048 --batch "$b" --recompute "$r" --repeats 3 2>&1 | tee -a "$OUT/train.log"
      done ;;
    trainprof)
      # Every kernel's time over one training step (2 layers of Mistral-7B, NF4, batch 1 × 2048,
      # activations kept), the warm-up step and the forward-alone pass included.
      echo "== ncu: per-kernel durations over a training step"
      ncu --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv \
        $Q bench --train --synthetic mistral-7b --layers 2 --quantize nf4 --double-quant --device cuda \
        --prompt-tokens 2048 --batch 1 --recompute never --repeats 1 > "$OUT/ncu-train.csv" 2>"$OUT/ncu-train.err"
      ncu_summary "$OUT/ncu-train.csv" | head -40 ;;
    split)
      # The fused LoRA's shrink split into QLORA_LORA_SPLIT parts a row (default 2): the
      # fused-GEMV op tests (fallback bits included) under the default and under 4, the model
      # tests, then batch-1 decode with the adapter, 1 / 2 / 4, twice over.
      for k in 2 4; do
        echo "== test-ops fused, QLORA_LORA_SPLIT=$k" | tee -a "$OUT/split.log"
        QLORA_LORA_SPLIT=$k .gpu/bin/test-ops fused --test-threads=1 --nocapture 2>&1 | grep -E "^test |test result|panicked" | tee -a "$OUT/split.log"
      done
      echo "== test-gpu" | tee -a "$OUT/split.log"
      .gpu/bin/test-gpu --test-threads=1 --nocapture 2>&1 | grep -E "^test |test result|panicked" | tee -a "$OUT/split.log"
      for r in 1 2; do for k in 1 2 4; do
        echo "== decode batch 1 r=16, QLORA_LORA_SPLIT=$k" | tee -a "$OUT/split.log"
        QLORA_LORA_SPLIT=$k $Q bench --synthetic mistral-7b --quantize nf4 --double-quant --adapter-rank 16 --device cuda \
          --prompt-tokens 16 --gen-tokens 64 --batch 1 --repeats 3 2>&1 | grep -E "decode" | tee -a "$OUT/split.log"
      done; done ;;
    stage16)
      # The fused LoRA's B staged by 16-byte copies (QLORA_LORA_STAGE16, default 1) against the
      # 4-byte ones: the fused-GEMV op tests and the model tests under each, then batch-1
      # decode with the adapter, 0 / 1 alternated three times, and the base once.
      for k in 1 0; do
        echo "== test-ops fused, QLORA_LORA_STAGE16=$k" | tee -a "$OUT/stage16.log"
        QLORA_LORA_STAGE16=$k .gpu/bin/test-ops fused --test-threads=1 --nocapture 2>&1 | grep -E "^test |test result|panicked" | tee -a "$OUT/stage16.log"
      done
      echo "== test-gpu" | tee -a "$OUT/stage16.log"
      .gpu/bin/test-gpu --test-threads=1 --nocapture 2>&1 | grep -E "^test |test result|panicked" | tee -a "$OUT/stage16.log"
      for r in 1 2 3; do for k in 0 1; do
        echo "== decode batch 1 r=16, QLORA_LORA_STAGE16=$k" | tee -a "$OUT/stage16.log"
        QLORA_LORA_STAGE16=$k $Q bench --synthetic mistral-7b --quantize nf4 --double-quant --adapter-rank 16 --device cuda \
          --prompt-tokens 16 --gen-tokens 64 --batch 1 --repeats 3 2>&1 | grep -E "decode" | tee -a "$OUT/stage16.log"
      done; done
      echo "== decode batch 1 base" | tee -a "$OUT/stage16.log"
      $Q bench --synthetic mistral-7b --quantize nf4 --double-quant --device cuda \
        --prompt-tokens 16 --gen-tokens 64 --batch 1 --repeats 3 2>&1 | grep -E "decode" | tee -a "$OUT/stage16.log" ;;
    gputrain)
      echo "== .gpu/bin/test-gpu_train"; .gpu/bin/test-gpu_train --test-threads=1 --nocapture 2>&1 | tee -a "$OUT/check.log" | grep -E "^test |test result|panicked|Bf16|F32" ;;
    peer|peertrain)
      what=--decode; [ "$stage" = peertrain ] && what=--train
      if ls .gpu-peer/whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu-peer/whl/*.whl && \
          PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site python3 .gpu/h200_peer.py $what --out "$OUT/$stage.json" 2>&1 | tail -20 | tee "$OUT/$stage.log"
      else echo "no .gpu-peer/whl: peer skipped"; fi ;;
    *) echo "unknown stage $stage" ;;
  esac
done

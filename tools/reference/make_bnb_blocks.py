"""Reference cases for qlora-quant's bitsandbytes formats, made by bitsandbytes' CPU path.

Writes tests/fixtures/bnb/blocks.safetensors. For each case `cN`:
  cN.input         the tensor quantized (f32, bf16 or f16)
  cN.packed        quantize_4bit's packed codes, uint8 [(n+1)//2]
  cN.absmax        f32 absmax, or uint8 codes with double quantization
  cN.nested_absmax f32, cN.offset f32[1], cN.nested_code f32[256]   (double quantization only)
  cN.dequant       dequantize_4bit's output, in the input dtype
and the case parameters as JSON in the metadata key "cases".
Also cases `iN.*` for LLM.int8: iN.input f16 [rows, cols], iN.cb int8, iN.scb f32, iN.dequant f32.

Run: ~/.cache/qlora/venv/bin/python tools/reference/make_bnb_blocks.py
"""
import json
import os

import torch
import bitsandbytes.functional as F
from safetensors.torch import save_file
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "bnb", "blocks.safetensors")
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def make_input(kind, shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 0.02
    if kind == "zeros":
        # Whole blocks of zeros, and a row of tiny values.
        x.view(-1)[:256] = 0.0
        x.view(-1)[300:364] = 1e-30
    elif kind == "ties":
        # Values that sit exactly on FP4/NF4 fractions of the block absmax (16-bit exact).
        v = torch.tensor([24.0, 5.0, 7.0, 20.0, -5.0, -7.0, 12.0, -24.0, 2.0, 0.125, -0.0625, 1.0])
        flat = x.view(-1)
        for i in range(0, flat.numel() - 12, 16):
            flat[i : i + 12] = v * (0.001 * (1 + i % 5))
    elif kind == "scales":
        # Rows with very different magnitudes.
        rows = torch.logspace(-6, 2, shape[0]).unsqueeze(1)
        x = x * rows
    elif kind == "flat":
        # Every block has the same absmax: double quantization sees 0 / 0.
        x = torch.full(shape, 0.5)
        x.view(-1)[::2] = -0.25
    elif kind == "specials":
        flat = x.view(-1)
        flat[3] = float("inf") if dtype != torch.float16 else 65504.0
        flat[70] = -0.0
    return x.to(dtype)


def main():
    tensors, cases = {}, []
    spec = []
    for dt in ["f32", "bf16", "f16"]:
        for q in ["nf4", "fp4"]:
            for dq in [False, True]:
                spec.append(("normal", (33, 70), 64, dt, q, dq))
                spec.append(("ties", (16, 64), 64, dt, q, dq))
            spec.append(("normal", (7, 9), 64, dt, q, True))
            spec.append(("zeros", (8, 128), 128, dt, q, True))
            spec.append(("scales", (24, 96), 128, dt, q, False))
    spec += [
        ("normal", (300, 70), 64, "bf16", "nf4", True),  # 329 blocks: two nested blocks
        ("normal", (130, 257), 64, "f32", "nf4", True),  # odd rows, blocks across rows
        ("normal", (5, 50), 32, "f16", "fp4", True),
        ("normal", (20, 300), 256, "bf16", "nf4", True),
        ("normal", (3, 4100), 4096, "f32", "nf4", True),
        ("normal", (1, 1), 64, "f32", "nf4", False),
        ("scales", (64, 64), 64, "bf16", "nf4", True),
        ("flat", (4, 64), 64, "f32", "nf4", True),
        ("flat", (4, 64), 64, "bf16", "fp4", True),
        ("specials", (8, 128), 64, "bf16", "nf4", True),
        ("specials", (8, 128), 64, "f16", "fp4", False),
    ]
    for i, (kind, shape, bs, dt, q, dq) in enumerate(spec):
        x = make_input(kind, shape, DTYPES[dt], 100 + i)
        packed, st = F.quantize_4bit(x, blocksize=bs, quant_type=q, compress_statistics=dq)
        if shape[-1] % bs == 0:
            deq = F.dequantize_4bit(packed, st)
        else:
            # bitsandbytes 0.50.2's AVX-512 CPU kernel indexes blocks per row and is wrong when
            # blocks cross rows (its own default backend, CUDA and the quantizer index the flat
            # tensor), so the reference for those shapes is the default backend's computation.
            absmax = F.dequantize_blockwise(st.absmax, st.state2) + st.offset if dq else st.absmax
            deq = _dequantize_4bit_compute(packed.reshape(-1), absmax, st.code, bs, shape, x.dtype)
        p = f"c{i}"
        tensors[f"{p}.input"] = x.contiguous()
        tensors[f"{p}.packed"] = packed.reshape(-1).contiguous()
        tensors[f"{p}.absmax"] = st.absmax.contiguous()
        if dq:
            tensors[f"{p}.nested_absmax"] = st.state2.absmax.contiguous()
            tensors[f"{p}.offset"] = st.offset.reshape(1).float().contiguous()
            tensors[f"{p}.nested_code"] = st.state2.code.contiguous()
        tensors[f"{p}.dequant"] = deq.contiguous()
        cases.append({"name": p, "kind": kind, "shape": list(shape), "blocksize": bs, "dtype": dt,
                      "quant_type": q, "double_quant": dq})
    int8 = []
    for i, shape in enumerate([(16, 40), (3, 7)]):
        g = torch.Generator().manual_seed(7 + i)
        w = (torch.randn(shape, generator=g) * 0.05).half()
        w[0, :] = 0.0
        cb, scb, _ = F.int8_vectorwise_quant(w)
        tensors[f"i{i}.input"] = w
        tensors[f"i{i}.cb"] = cb.contiguous()
        tensors[f"i{i}.scb"] = scb.contiguous()
        tensors[f"i{i}.dequant"] = F.int8_vectorwise_dequant(cb, scb).contiguous()
        int8.append({"name": f"i{i}", "shape": list(shape)})
    meta = {"cases": json.dumps(cases), "int8": json.dumps(int8), "torch_threads": str(torch.get_num_threads())}
    save_file(tensors, OUT, metadata=meta)
    print(f"wrote {len(cases)} 4-bit and {len(int8)} int8 cases to {OUT}")


if __name__ == "__main__":
    main()

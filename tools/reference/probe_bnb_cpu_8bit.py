"""Checks qlora's model of bitsandbytes' CPU 8-bit blockwise quantizer (the second stage of
double quantization) against the compiled kernel.

bitsandbytes 0.50.2's CPU kernel does not round to the nearest code of the dynamic map. It
behaves as a 65536-entry lookup: x = (s + 1) * 32767.5 in float32 (s = A / absmax), k = floor(x +
0.5), code = LUT[k], where LUT[j] is the code nearest to j / 32767.5 - 1 (ties to the lower
index). Near zero this skips the map's finest codes (1e-7..1e-5 all become the code of ~3e-5 or
0), and elsewhere its boundaries sit up to ~1e-5 from the midpoints. qlora_quant::bnb implements
exactly this; this script checks the rule on a million probes (inputs in blocks whose absmax is
1.0, so s is the input itself, dense near 0) and on random blocks of any scale.

Run: ~/.cache/qlora/venv/bin/python tools/reference/probe_bnb_cpu_8bit_thresholds.py
"""
import numpy as np
import torch
import bitsandbytes.functional as F

f32 = np.float32
code = F.create_dynamic_map(signed=True).numpy().astype(np.float64)
j = np.arange(65536)
g = j / 32767.5 - 1
idx = np.clip(np.searchsorted(code, g, side="right") - 1, 0, 254)
LUT = np.where(np.abs(g - code[idx + 1]) < np.abs(g - code[idx]), idx + 1, idx)


def rule(s):
    x = ((s.astype(np.float32) + f32(1)) * f32(32767.5)).astype(np.float32)
    k = np.clip(np.floor(x.astype(np.float64) + 0.5), 0, 65535).astype(np.int64)
    return LUT[k]


def kernel_unit_absmax(v):
    v = np.asarray(v, dtype=np.float32)
    n = len(v)
    vv = np.concatenate([v, np.zeros((-n) % 255, dtype=np.float32)]).reshape(-1, 255)
    a = np.concatenate([np.ones((vv.shape[0], 1), dtype=np.float32), vv], 1).reshape(-1)
    out, _ = F.quantize_blockwise(torch.from_numpy(a), blocksize=256)
    return out.numpy().reshape(-1, 256)[:, 1:].reshape(-1)[:n]


rng = np.random.default_rng(0)
s = np.concatenate([rng.uniform(-1, 1, 200000), rng.uniform(-1e-3, 1e-3, 100000),
                    rng.uniform(-3e-5, 3e-5, 50000)]).astype(np.float32)
s = np.clip(np.concatenate([s, np.nextafter(s, f32(2)), np.nextafter(s, f32(-2))]), -1, 1).astype(np.float32)
bad = int((rule(s) != kernel_unit_absmax(s)).sum())
print(f"unit-absmax probes: {bad} of {len(s)} differ from the rule")
nearest = np.clip(np.searchsorted(code, s, side="right") - 1, 0, 254)
nearest = np.where(np.abs(s - code[nearest + 1]) < np.abs(s - code[nearest]), nearest + 1, nearest)
print(f"(rounding to the nearest code instead would differ on {int((nearest != kernel_unit_absmax(s)).sum())})")

torch.manual_seed(5)
bad2 = tot = 0
for trial in range(60):
    n = int(rng.integers(1, 1500))
    A = (torch.randn(n) * float(rng.choice([1e-4, 1e-2, 1.0, 30.0]))).float()
    if trial % 3 == 0:
        A = A + float(rng.choice([0.1, -0.05]))
    out, st = F.quantize_blockwise(A, blocksize=256)
    a, am = A.numpy(), st.absmax.numpy()
    sd = np.array([a[i] / am[i // 256] for i in range(n)], dtype=np.float32)
    bad2 += int((rule(sd) != out.numpy()).sum())
    tot += n
print(f"random blocks: {bad2} of {tot} differ from the rule")
assert bad == 0 and bad2 == 0

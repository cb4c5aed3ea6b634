#!/usr/bin/env python3
"""Compares two GGUF files tensor by tensor (names, types, dims, bytes) and, with --meta, the
metadata keys they share. Used to check `qlora export` against llama.cpp's own tools (e.g.
`llama-quantize --pure`). Needs llama.cpp's gguf-py on PYTHONPATH (and numpy).
Usage: compare-gguf-tensors.py A.gguf B.gguf [--meta]"""
import sys
from gguf import GGUFReader

a, b = GGUFReader(sys.argv[1]), GGUFReader(sys.argv[2])
ta = {t.name: t for t in a.tensors}
tb = {t.name: t for t in b.tensors}
bad = 0
if set(ta) != set(tb):
    print("names differ:", sorted(set(ta) ^ set(tb))[:10])
    bad += 1
same = 0
for n in sorted(set(ta) & set(tb)):
    x, y = ta[n], tb[n]
    if x.tensor_type != y.tensor_type or list(x.shape) != list(y.shape):
        print(f"{n}: {x.tensor_type.name}{list(x.shape)} vs {y.tensor_type.name}{list(y.shape)}")
        bad += 1
    elif x.data.tobytes() != y.data.tobytes():
        d = sum(p != q for p, q in zip(x.data.tobytes(), y.data.tobytes()))
        print(f"{n}: {x.tensor_type.name}, {d} of {x.data.nbytes} bytes differ")
        bad += 1
    else:
        same += 1
print(f"{same} of {len(ta)} tensors identical")
if "--meta" in sys.argv:
    fa = {k: f for k, f in a.fields.items()}
    fb = {k: f for k, f in b.fields.items()}
    for k in sorted(set(fa) & set(fb)):
        if k.startswith("GGUF."):
            continue
        va, vb = fa[k].contents(), fb[k].contents()
        if va != vb:
            show = lambda v: (str(v)[:60] + "…") if len(str(v)) > 60 else v
            print(f"metadata {k}: {show(va)} vs {show(vb)}")
    only = sorted(set(fa) ^ set(fb))
    if only:
        print("metadata in one only:", only)
sys.exit(1 if bad else 0)

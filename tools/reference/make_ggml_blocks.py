"""Reference dequantization of every GGUF block type qlora reads, from gguf-py (llama.cpp's own
Python package, `gguf.quants.dequantize`).

Run:  ~/.cache/qlora/venv/bin/python tools/reference/make_ggml_blocks.py
Writes tests/fixtures/ggml_blocks.safetensors: for each type T, `T.bytes` (u8, 4 blocks of random
bytes with finite f16 scales) and `T.values` (f32, the dequantized elements).
"""
import os

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize
from safetensors.numpy import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "ggml_blocks.safetensors")

# type: (block elements, block bytes, byte offsets of f16 scale fields)
TYPES = {
    "Q4_0": (Q.Q4_0, 32, 18, [0]),
    "Q4_1": (Q.Q4_1, 32, 20, [0, 2]),
    "Q5_0": (Q.Q5_0, 32, 22, [0]),
    "Q5_1": (Q.Q5_1, 32, 24, [0, 2]),
    "Q8_0": (Q.Q8_0, 32, 34, [0]),
    "Q4_K": (Q.Q4_K, 256, 144, [0, 2]),
    "Q5_K": (Q.Q5_K, 256, 176, [0, 2]),
    "Q6_K": (Q.Q6_K, 256, 210, [208]),
}


def main():
    rng = np.random.default_rng(1234)
    tensors = {}
    for name, (qt, n, nb, scales) in TYPES.items():
        blocks = rng.integers(0, 256, size=(4, nb), dtype=np.uint8)
        for off in scales:
            s = rng.uniform(-0.05, 0.05, size=4).astype(np.float16).view(np.uint8).reshape(4, 2)
            blocks[:, off:off + 2] = s
        raw = blocks.reshape(-1)
        values = dequantize(raw.reshape(1, -1), qt).reshape(-1).astype(np.float32)
        assert values.size == 4 * n and np.all(np.isfinite(values))
        tensors[f"{name}.bytes"] = raw
        tensors[f"{name}.values"] = values
    save_file(tensors, OUT, metadata={"gguf": gguf.__version__ if hasattr(gguf, "__version__") else "0.19.0",
                                      "command": "python tools/reference/make_ggml_blocks.py"})
    print("wrote", OUT)


if __name__ == "__main__":
    main()

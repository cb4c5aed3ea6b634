"""Formula-initialised test weights, bit-identical to crates/model/tests/common/weights.rs.

Every value is a correctly rounded IEEE operation on an exact integer hash, so numpy and Rust
produce the same f32 bits. A tensor's seed is the FNV-1a hash of its HF name.
"""
import numpy as np

MASK = np.uint64(0xFFFFFFFF)


def fnv1a(name: str) -> int:
    h = 0x811C9DC5
    for b in name.encode():
        h ^= b
        h = (h * 0x01000193) & 0xFFFFFFFF
    return h


def uniform(seed: int, n: int) -> np.ndarray:
    """n values in [-1, 1), multiples of 2^-23, as float64."""
    i = np.arange(n, dtype=np.uint64)
    h = (i * np.uint64(0x9E3779B1) + np.uint64(seed) * np.uint64(0x85EBCA77)) & MASK
    h ^= h >> np.uint64(15)
    h = (h * np.uint64(0x2C1B3C6D)) & MASK
    h ^= h >> np.uint64(12)
    h = (h * np.uint64(0x297A2D39)) & MASK
    h ^= h >> np.uint64(15)
    return (h >> np.uint64(8)).astype(np.float64) / float(1 << 24) * 2.0 - 1.0


def tensor(name: str, shape) -> np.ndarray:
    """The f32 value of a named tensor: norms 1 + u/8, biases u/8, matrices u / sqrt(cols)."""
    n = int(np.prod(shape))
    u = uniform(fnv1a(name), n)
    if name.endswith("norm.weight"):
        v = 1.0 + u / 8.0
    elif name.endswith(".bias"):
        v = u / 8.0
    else:
        v = u / np.sqrt(float(shape[-1]))
    return v.astype(np.float32).reshape(shape)

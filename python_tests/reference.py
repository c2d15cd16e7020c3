"""Independent references for the tests: NumPy float64 implementations written from the
format specifications in docs/FORMATS.md (not from the package's code), and helpers that
build fresh random inputs.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import mlx.core as mx

# OCP MX v1.0 E2M1 values, codes 0..15 (sign bit 3): the specification's table.
FP4_E2M1_TABLE = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
)


def to_np(a: mx.array) -> np.ndarray:
    """mx.array -> float64/int NumPy array (bfloat16 goes through float32 exactly)."""
    if a.dtype == mx.bfloat16:
        a = a.astype(mx.float32)
    return np.array(a)


def unpack_bits(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """LSB-first bit stream of each row of uint32 words -> integer codes [..., count]."""
    raw = np.ascontiguousarray(words).view(np.uint8)
    bitstream = np.unpackbits(raw, axis=-1, bitorder="little")[..., : count * bits]
    bitstream = bitstream.reshape(*raw.shape[:-1], count, bits).astype(np.int64)
    return (bitstream << np.arange(bits)).sum(-1)


def dequant_affine_ref(w, scales, biases, group_size: int, bits: int) -> np.ndarray:
    w = np.array(w)
    K = w.shape[-1] * 32 // bits
    q = unpack_bits(w, bits, K).astype(np.float64)
    s = np.repeat(to_np(scales).astype(np.float64), group_size, axis=-1)
    b = np.repeat(to_np(biases).astype(np.float64), group_size, axis=-1)
    return q * s + b


def dequant_mxfp4_ref(w, scales, table=FP4_E2M1_TABLE) -> np.ndarray:
    w = np.array(w)
    K = w.shape[-1] * 8
    codes = unpack_bits(w, 4, K)
    s = np.exp2(np.array(scales).astype(np.float64) - 127.0)
    return table[codes] * np.repeat(s, 32, axis=-1)


def softmax64(logits) -> np.ndarray:
    l = to_np(logits).astype(np.float64)
    m = l.max(-1, keepdims=True)
    p = np.exp(l - m)
    return p / p.sum(-1, keepdims=True)


def silu64(g):
    return g / (1.0 + np.exp(-g))


def moe_mlp_ref(x, ids, weights, dense_gate, dense_up, dense_down) -> np.ndarray:
    """float64: y[t] = sum_j w[t,j] * down_e(silu(gate_e x) * up_e x). dense_*: callables e -> [N, K]."""
    x = to_np(x).astype(np.float64)
    ids = np.array(ids).astype(np.int64)
    weights = to_np(weights).astype(np.float64)
    T, k = ids.shape
    y = np.zeros((T, x.shape[-1]))
    cache = {}

    def dense(name, fn, e):
        key = (name, e)
        if key not in cache:
            cache[key] = fn(e)
        return cache[key]

    for t in range(T):
        for j in range(k):
            e = int(ids[t, j])
            g = dense("g", dense_gate, e) @ x[t]
            u = dense("u", dense_up, e) @ x[t]
            y[t] += weights[t, j] * (dense("d", dense_down, e) @ (silu64(g) * u))
    return y


# --------------------------------------------------------------------- random inputs


def random_affine(rng, shape, bits=4, group_size=64, scale_dtype=mx.float16, magnitude=0.02):
    """Fresh random MLX-affine weight [*, N, K]: packed uint32 codes, scales, biases."""
    *lead, N, K = shape
    words = rng.integers(0, 2**32, size=(*lead, N, K * bits // 32), dtype=np.uint64).astype(np.uint32)
    G = K // group_size
    levels = (1 << bits) - 1
    scales = rng.uniform(0.5, 1.5, size=(*lead, N, G)) * (2 * magnitude / levels)
    biases = -rng.uniform(0.5, 1.5, size=(*lead, N, G)) * magnitude
    return (mx.array(words), mx.array(scales.astype(np.float32)).astype(scale_dtype),
            mx.array(biases.astype(np.float32)).astype(scale_dtype))


def random_mxfp4(rng, shape, scale_center=121):
    *lead, N, K = shape
    words = rng.integers(0, 2**32, size=(*lead, N, K // 8), dtype=np.uint64).astype(np.uint32)
    scales = rng.integers(scale_center - 3, scale_center + 3, size=(*lead, N, K // 32)).astype(np.uint8)
    return mx.array(words), mx.array(scales)


def random_logits(rng, T, E, dtype=mx.float32):
    return mx.array(rng.standard_normal((T, E)).astype(np.float32)).astype(dtype)


def random_routing(rng, T, E, k):
    """Distinct expert ids per token and positive weights (not from the code under test)."""
    ids = np.stack([rng.choice(E, size=k, replace=False) for _ in range(T)]) if T else np.zeros((0, k), np.int64)
    w = rng.uniform(0.05, 1.0, size=(T, k))
    return mx.array(ids.astype(np.uint32)), mx.array(w.astype(np.float32))


def poison_cache(nbytes_list, value=float("nan")):
    """Fill MLX's buffer cache with NaN-filled buffers of the given sizes, so that a kernel
    which fails to write part of its output shows NaN/garbage instead of a lucky zero."""
    junk = [mx.full((max(1, n // 4),), value, dtype=mx.float32) for n in nbytes_list]
    mx.eval(*junk)
    del junk


def misaligned_view(a: mx.array) -> mx.array:
    """A row-major view of a's values whose data is not 16-byte aligned: a slice of a larger
    buffer one element in, reshaped (no copy: checked where NumPy sees MLX's memory)."""
    flat = mx.concatenate([a.reshape(-1)[:1], a.reshape(-1)])
    mx.eval(flat)
    v = flat[1:].reshape(a.shape)
    mx.eval(v)
    if v.dtype != mx.bfloat16:  # (NumPy has no bfloat16)
        ptr = lambda z: np.asarray(z).__array_interface__["data"][0]
        pf, pv = ptr(flat), ptr(v)
        if pv - pf == a.itemsize and pf % 16 == 0:  # the view (MLX's allocations are aligned)
            assert pv % 16 != 0
    return v


def misaligned_weight(q):
    """q (a QuantizedWeight) with every array replaced by a misaligned view of it."""
    names = [n for n in ("w", "scales", "biases", "grid", "su", "sv") if getattr(q, n) is not None]
    return dataclasses.replace(q, **{n: misaligned_view(getattr(q, n)) for n in names})

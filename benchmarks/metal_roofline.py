"""Roofline estimate of the Metal path on Apple GPUs: bytes per call over each chip's memory
bandwidth, flops over its fp32 peak, for the Qwen3-30B-A3B MoE layer (E=128, D=2048,
F=768, top-8, affine 4-bit, group 64, bf16 activations), next to the same estimate for
mlx-lm's SwitchGLU (three mx.gather_qmm calls).

Our bytes come from the Metal harness's counters (tests/docs: docs/METAL_HARNESS.md): every
dispatch the real host code encodes, run on the real kernels, counting each device byte once
per threadgroup that reads it (`tg_unique_read`) plus every byte written. The harness
executes kernels on the CPU, so token counts above --measure-max use a byte model of the
same kernels, which the script checks against the counters where both exist.

The baseline's bytes are a lower bound: every touched expert's weights read once (unsorted
gather_qmm below 64 indices reads them once per (token, slot) pair: counted so), plus its
bf16 intermediates. This is an estimate, not a measurement: timings need a Mac
(docs/MACOS.md).

    python benchmarks/metal_roofline.py [--tokens 1 4 16 ...] [--measure-max 4] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import re
import sys
from pathlib import Path

import numpy as np

import mlx.core as mx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mlx_moe  # noqa: E402

# Vendor figures: unified-memory bandwidth (GB/s) and fp32 peak (TFLOPS) of the top GPU bin.
CHIPS = {
    "M1 Max": (400, 10.4),
    "M2 Ultra": (800, 27.2),
    "M3 Max": (400, 16.4),
    "M4 Max": (546, 18.4),
}
E, D, F, K, BITS, GROUP = 128, 2048, 768, 8, 4, 64
XB = 2  # bf16 activations


def proj_bytes(n, k):
    """One expert's affine projection [n, k]: packed codes + fp16 scales and biases."""
    return n * k * BITS // 8 + 2 * (n * (k // GROUP)) * 2


EXPERT = 2 * proj_bytes(F, D) + proj_bytes(D, F)


def routing(T, seed):
    rng = np.random.default_rng(seed)
    logits = mx.array(rng.standard_normal((T, E)).astype(np.float32))
    ids, w = mlx_moe.route(logits, K)
    mx.eval(ids, w)
    return ids, w, np.bincount(np.array(ids).reshape(-1), minlength=E)


def model_ours(T, counts):
    """Bytes the Metal kernels move (encode.h's choices), per call."""
    P = T * K
    tm = 8
    while tm > 1 and tm * D * XB > 16384:
        tm //= 2
    ids_b = P * 4
    bucket = 2 * ids_b + P * 4 + 64 * E  # counts, scan, scatter: ids twice, pairs, small tables
    if T < 64:
        fs = 64
        ns = math.ceil(F / fs)
        tiles = int(sum(math.ceil(c / tm) for c in counts))
        weights = tiles * EXPERT                       # each (tile, slice) reads its slice once
        x = P * D * XB * ns                            # each slice's threadgroup stages its rows
        partial = P * ns * D * 4                       # written, then read by the combine
        small = tiles * ns * (tm * 8 + 64)             # pairs, offsets, route weights
        return bucket + weights + x + 2 * partial + small + T * D * XB
    tiles = int(sum(math.ceil(c / 32) for c in counts))
    nt_f, nt_d = math.ceil(F / 32), math.ceil(D / 32)
    gateup = tiles * 2 * proj_bytes(F, D) + tiles * 32 * D * XB * nt_f
    h = P * F * 4
    down = tiles * proj_bytes(D, F) + tiles * 32 * F * 4 * nt_d
    partial = P * D * 4
    return bucket + gateup + h + down + 2 * partial + T * D * XB


def model_ours_compulsory(T, counts):
    """Distinct bytes per dispatch (every byte read once, as if caches kept everything shared
    between threadgroups): the touched experts' weights once, activations once, scratch once."""
    P = T * K
    touched = int((counts > 0).sum())
    bucket = 2 * P * 4 + P * 4 + 64 * E
    if T < 64:
        ns = math.ceil(F / 64)
        return bucket + touched * EXPERT + T * D * XB + 2 * P * ns * D * 4 + P * 8 + T * D * XB
    return bucket + touched * EXPERT + T * D * XB + 2 * P * F * 4 + 2 * P * D * 4 + P * 8 + T * D * XB


def model_baseline(T, counts):
    """Lower bound for mlx-lm's SwitchGLU: weights of the touched experts once (once per pair
    when unsorted), activations and bf16 intermediates once each."""
    P = T * K
    touched = int((counts > 0).sum())
    weights = (P if P < 64 else touched) * EXPERT
    sort = 0 if P < 64 else 2 * P * D * XB + 2 * P * D * XB  # gather x rows, unsort outputs
    inter = P * F * XB * 2 + P * F * XB * 3 + P * D * XB * 2  # gate/up out, silu*up, down out
    return weights + T * D * XB + sort + inter + T * D * XB


def measured_ours(T, seed):
    from mlx_moe.testing import metal as mh
    ids, w, _ = routing(T, seed)
    rng = np.random.default_rng(seed + 1)
    projs = []
    for n, k in ((F, D), (F, D), (D, F)):
        wq = mx.array(rng.integers(0, 2**32, size=(E, n, k * BITS // 32), dtype=np.uint64).astype(np.uint32))
        s = mx.array(rng.uniform(0.001, 0.002, size=(E, n, k // GROUP)).astype(np.float16))
        b = mx.array(-rng.uniform(0.01, 0.02, size=(E, n, k // GROUP)).astype(np.float16))
        projs.append(mlx_moe.QuantizedWeight(wq, s, b, bits=BITS, group_size=GROUP))
    x = mx.array(rng.standard_normal((T, D)).astype(np.float32)).astype(mx.bfloat16)
    y = mlx_moe.moe_mlp(x, ids, w, mlx_moe.Experts(*projs))
    r = mh.replay(y)
    written = sum(res.total("unique_written") for _, res in r.results)
    return (r.bytes_read("tg_unique_read") + written, r.bytes_read("unique_read") + written)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024, 4096])
    ap.add_argument("--measure-max", type=int, default=4,
                    help="run the harness for token counts up to this (slow: it is a CPU)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    rows = []
    for T in args.tokens:
        _, _, counts = routing(T, seed=T)
        tg_model, cp_model = model_ours(T, counts), model_ours_compulsory(T, counts)
        meas = measured_ours(T, seed=T) if T <= args.measure_max else None
        tg_b, cp_b = meas if meas is not None else (tg_model, cp_model)
        base = model_baseline(T, counts)
        flops = 2 * T * K * 3 * D * F
        rows.append((T, int((counts > 0).sum()), meas is not None, cp_b, tg_b, base, flops))
        print(f"T={T:5d}  experts {rows[-1][1]:3d}  ours {cp_b / 1e6:8.1f} MB compulsory, "
              f"{tg_b / 1e6:8.1f} MB per-threadgroup ({'harness' if meas else 'model'})  "
              f"SwitchGLU >= {base / 1e6:8.1f} MB", flush=True)
        if meas is not None:
            print(f"         model vs harness: compulsory {100 * abs(cp_model - cp_b) / cp_b:.1f}%, "
                  f"per-threadgroup {100 * abs(tg_model - tg_b) / tg_b:.1f}% apart")

    head = ["tokens", "experts touched", "ours MB: compulsory / per-threadgroup (source)",
            "SwitchGLU MB (lower bound)"]
    head += [f"{c}: ours / SwitchGLU us" for c in CHIPS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for T, nt, meas, ours, tg_b, base, flops in rows:
        cells = [str(T), str(nt), f"{ours / 1e6:.1f} / {tg_b / 1e6:.1f} ({'harness' if meas else 'model'})",
                 f"{base / 1e6:.1f}"]
        for bw, tf in CHIPS.values():
            t_ours = max(ours / (bw * 1e9), flops / (tf * 1e12)) * 1e6
            t_base = max(base / (bw * 1e9), flops / (tf * 1e12)) * 1e6
            cells.append(f"{t_ours:.0f} / {t_base:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.no_write:
        return
    doc = ROOT / "docs" / "PERFORMANCE.md"
    text = doc.read_text() if doc.exists() else "# Performance\n"
    title = "### Metal roofline estimate (Apple GPUs, from the harness's byte counters)"
    body = (f"{title}\n\n{datetime.date.today().isoformat()}, `benchmarks/metal_roofline.py` on "
            f"{platform.machine()} (no Apple GPU: an estimate, not a timing). Qwen3-30B-A3B "
            f"layer, affine 4-bit, bf16; one expert's weights = {EXPERT / 1e6:.2f} MB. Time "
            "floor = max(bytes / bandwidth, flops / fp32 peak), vendor figures "
            + ", ".join(f"{c} {bw} GB/s {tf} TFLOPS" for c, (bw, tf) in CHIPS.items())
            + ". Ours, two counts of the bytes every dispatch of the call reads and writes: "
            "*compulsory* (each distinct byte once: caches share everything) and "
            "*per-threadgroup* (each threadgroup fetches what it reads: nothing shared; the "
            "upper bound), from the Metal harness's counters where marked, else from the byte "
            "model of the same kernels (equal to the counters at the measured sizes). The "
            "time columns use the compulsory bytes. SwitchGLU: a lower bound (touched "
            "experts' weights once, once per pair below 64 indices, bf16 intermediates).\n\n"
            + table + "\n")
    pattern = re.compile(re.escape(title) + r".*?(?=\n### |\n## |\Z)", re.S)
    text = pattern.sub(body.rstrip("\n"), text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + body
    doc.write_text(text)
    print(f"wrote {doc}")


if __name__ == "__main__":
    main()

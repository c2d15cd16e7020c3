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
# The host's variant switch, read from the host code itself (mlx_moe/csrc/metal/encode.h).
MMA_MIN_PAIRS_PER_EXPERT = float(re.search(
    r"MMA_MIN_PAIRS_PER_EXPERT = ([0-9.]+);",
    (ROOT / "mlx_moe" / "csrc" / "metal" / "encode.h").read_text()).group(1))
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


PAIR_FLOPS = 2 * 3 * D * F  # one (token, slot) pair through gate, up and down


def simd_tm(d=D, xb=XB, T=2):
    """encode.h: the simd instance's token tile (activation rows within 16 KiB; 1 to decode)."""
    tm = 8
    while tm > 1 and tm * d * xb > 16384:
        tm //= 2
    return 1 if T == 1 else tm


def model_variant(variant, T, counts, *, d=D, f=F, k=K, xb=XB, expert=None):
    """Bytes a call moves with one instance of kernels/moe_mlp.metal (encode.h's dispatches:
    4 bucketing kernels + the MLP kernel with its in-kernel combine), counted per threadgroup
    (each threadgroup fetches what it reads), and the flops the instance executes (the simd
    instance skips the empty rows of a tile, the simdgroup_matrix one computes all 32).
    Returns (bytes per threadgroup, compulsory bytes, executed flops)."""
    expert = EXPERT if expert is None else expert
    P = T * k
    e = len(counts)
    tm = simd_tm(d, xb, T) if variant == "simd" else 32
    fs = 64 if variant == "simd" else 128  # hidden units per slice (encode.h)
    ns = math.ceil(f / fs)
    tiles = int(sum(math.ceil(c / tm) for c in counts))
    touched = int((counts > 0).sum())
    bucket = 2 * P * 4 + P * 4 + 64 * e + 4 * (P + T)      # ids twice, pairs, tables, counters
    partial = P * ns * d * 4                       # each (pair, slice) row written once
    # in-kernel combine: the slice rows read by the pair sums when there are several slices
    # (their results overwrite slice 0's rows: no new bytes), slice 0's rows read again by
    # the token sums (another threadgroup, mostly), y written
    tg_combine = (partial if ns > 1 else 0) + P * d * 4 + T * d * xb
    small = tiles * ns * (tm * 12 + 64)            # pairs, route weights, tile lookup
    tg_bytes = bucket + tiles * expert + P * d * xb * ns + partial + tg_combine + small
    compulsory = bucket + touched * expert + T * d * xb + partial + partial + T * d * xb + P * 12
    flops = (P if variant == "simd" else tiles * 32) * 2 * 3 * d * f
    return tg_bytes, compulsory, flops


def model_ours(T, counts):
    variant = "mma" if T * K >= MMA_MIN_PAIRS_PER_EXPERT * E else "simd"
    return model_variant(variant, T, counts)


def model_baseline(T, counts):
    """Lower bound for mlx-lm's SwitchGLU: weights of the touched experts once (once per pair
    when unsorted), activations and bf16 intermediates once each."""
    P = T * K
    touched = int((counts > 0).sum())
    weights = (P if P < 64 else touched) * EXPERT
    sort = 0 if P < 64 else 2 * P * D * XB + 2 * P * D * XB  # gather x rows, unsort outputs
    inter = P * F * XB * 2 + P * F * XB * 3 + P * D * XB * 2  # gate/up out, silu*up, down out
    return weights + T * D * XB + sort + inter + T * D * XB


def quantized_experts(rng, e, d, f):
    projs = []
    for n, kk in ((f, d), (f, d), (d, f)):
        wq = mx.array(rng.integers(0, 2**32, size=(e, n, kk * BITS // 32), dtype=np.uint64).astype(np.uint32))
        s = mx.array(rng.uniform(0.001, 0.002, size=(e, n, kk // GROUP)).astype(np.float16))
        b = mx.array(-rng.uniform(0.01, 0.02, size=(e, n, kk // GROUP)).astype(np.float16))
        projs.append(mlx_moe.QuantizedWeight(wq, s, b, bits=BITS, group_size=GROUP))
    return mlx_moe.Experts(*projs)


def measured(T, seed, *, e=E, d=D, f=F, k=K, variant=None):
    """(bytes per threadgroup, compulsory bytes) from the harness's counters: every dispatch
    the host code encodes for one call, run on the real kernels. variant: force the simd or
    mma instance (MLX_MOE_METAL_VARIANT), else the host's choice."""
    import os
    from mlx_moe.testing import metal as mh
    rng = np.random.default_rng(seed)
    logits = mx.array(rng.standard_normal((T, e)).astype(np.float32))
    ids, w = mlx_moe.route(logits, k)
    mx.eval(ids, w)
    experts = quantized_experts(rng, e, d, f)
    x = mx.array(rng.standard_normal((T, d)).astype(np.float32)).astype(mx.bfloat16)
    old = os.environ.get("MLX_MOE_METAL_VARIANT")
    os.environ["MLX_MOE_METAL_VARIANT"] = variant or "auto"
    try:
        r = mh.replay(mlx_moe.moe_mlp(x, ids, w, experts))
    finally:
        if old is None:
            del os.environ["MLX_MOE_METAL_VARIANT"]
        else:
            os.environ["MLX_MOE_METAL_VARIANT"] = old
    written = sum(res.total("unique_written") for _, res in r.results)
    counts = np.bincount(np.array(ids).reshape(-1), minlength=e)
    return (r.bytes_read("tg_unique_read") + written, r.bytes_read("unique_read") + written), counts


def check_model(tokens=(1, 5, 24, 80)):
    """The byte model against the harness at a reduced shape, both instances: returns rows
    (variant, T, measured tg / compulsory, model tg / compulsory)."""
    e, d, f, k = 16, 256, 128, 4
    expert = 2 * (f * d * BITS // 8 + 2 * f * (d // GROUP) * 2) + (d * f * BITS // 8 + 2 * d * (f // GROUP) * 2)
    rows = []
    for variant in ("simd", "mma"):
        for T in tokens:
            (tg, cp), counts = measured(T, seed=T, e=e, d=d, f=f, k=k, variant=variant)
            mt, mc, _ = model_variant(variant, T, counts, d=d, f=f, k=k, expert=expert)
            rows.append((variant, T, tg, cp, mt, mc))
            print(f"model check {variant:4s} T={T:3d}: harness {tg:9d} / {cp:9d}  model {mt:9d} / {mc:9d}"
                  f"  ({100 * (mt - tg) / tg:+.1f}% / {100 * (mc - cp) / cp:+.1f}%)", flush=True)
    return rows


SHAPES = {"Qwen3-30B-A3B": (128, 8, 2048, 768), "GLM-4.7-Flash": (64, 4, 2048, 1536)}


def expert_bytes(d, f):
    return 2 * (f * d * BITS // 8 + 2 * f * (d // GROUP) * 2) + (d * f * BITS // 8 + 2 * d * (f // GROUP) * 2)


def expected_counts(T, e, k, seed):
    rng = np.random.default_rng(seed)
    ids = np.argsort(rng.standard_normal((T, e)), axis=1)[:, :k]
    return np.bincount(ids.reshape(-1), minlength=e)


def variant_time(variant, T, counts, bw, tf, e, k, d, f):
    tg, _, flops = model_variant(variant, T, counts, d=d, f=f, k=k, expert=expert_bytes(d, f))
    return max(tg / (bw * 1e9), flops / (tf * 1e12))


def variant_choice():
    """Per shape and chip: the modelled time of each instance over pairs per expert, and the
    smallest pairs-per-expert from which the simdgroup_matrix instance is faster."""
    tables, crossover = [], {}
    for shape, (e, k, d, f) in SHAPES.items():
        ppes = [0.5, 1, 2, 4, 8, 12, 16, 24, 32, 64]
        lines = [f"| {shape}: pairs per expert (tokens) | "
                 + " | ".join(f"{c}: simd / mma us" for c in CHIPS) + " |",
                 "|" + "---:|" * (1 + len(CHIPS))]
        for ppe in ppes:
            T = max(1, round(ppe * e / k))
            counts = expected_counts(T, e, k, seed=T)
            cells = [f"{ppe:g} ({T})"]
            for bw, tf in CHIPS.values():
                ts = variant_time("simd", T, counts, bw, tf, e, k, d, f) * 1e6
                tm = variant_time("mma", T, counts, bw, tf, e, k, d, f) * 1e6
                cells.append(f"{ts:.0f} / {tm:.0f}" + (" *" if tm < ts else ""))
            lines.append("| " + " | ".join(cells) + " |")
        tables.append("\n".join(lines))
        for chip, (bw, tf) in CHIPS.items():
            for ppe in np.arange(0.5, 64.5, 0.5):
                T = max(1, round(ppe * e / k))
                counts = expected_counts(T, e, k, seed=T)
                if variant_time("mma", T, counts, bw, tf, e, k, d, f) < variant_time("simd", T, counts, bw, tf, e, k, d, f):
                    crossover[(shape, chip)] = float(ppe)
                    break
    return tables, crossover


def replace_section(text, title, body):
    pattern = re.compile(re.escape(title) + r".*?(?=\n### |\n## |\Z)", re.S)
    return pattern.sub(lambda _: body.rstrip("\n") + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + body


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024, 4096])
    ap.add_argument("--measure-max", type=int, default=4,
                    help="run the harness at the full shape for token counts up to this (slow: it is a CPU)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    check = check_model()
    rows = []
    for T in args.tokens:
        _, _, counts = routing(T, seed=T)
        tg_model, cp_model, flops_exec = model_ours(T, counts)
        meas = None
        if T <= args.measure_max:
            meas, counts = measured(T, seed=T)
        tg_b, cp_b = meas if meas is not None else (tg_model, cp_model)
        base = model_baseline(T, counts)
        flops = 2 * T * K * 3 * D * F
        rows.append((T, int((counts > 0).sum()), meas is not None, cp_b, tg_b, base, flops))
        print(f"T={T:5d}  experts {rows[-1][1]:3d}  ours {cp_b / 1e6:8.1f} MB compulsory, "
              f"{tg_b / 1e6:8.1f} MB per-threadgroup ({'harness' if meas else 'model'})  "
              f"SwitchGLU >= {base / 1e6:8.1f} MB", flush=True)

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

    check_lines = ["| instance | tokens | harness bytes: per-threadgroup / compulsory | model | model - harness |",
                   "|---|---:|---:|---:|---:|"]
    for variant, T, tg, cp, mt, mc in check:
        check_lines.append(f"| {variant} | {T} | {tg} / {cp} | {mt} / {mc} | "
                           f"{100 * (mt - tg) / tg:+.1f}% / {100 * (mc - cp) / cp:+.1f}% |")
    vtables, crossover = variant_choice()
    need = max(crossover.values()) if crossover else float("inf")
    cross_text = "; ".join(f"{shape}, {chip}: {ppe:g}" for (shape, chip), ppe in crossover.items())
    print("\n".join(check_lines))
    print("\n\n".join(vtables))
    print(f"crossover (pairs per expert): {cross_text}")
    print(f"encode.h switches at {MMA_MIN_PAIRS_PER_EXPERT:g} pairs per expert; the model asks for >= {need:g}")
    if args.no_write:
        return
    doc = ROOT / "docs" / "PERFORMANCE.md"
    text = doc.read_text() if doc.exists() else "# Performance\n"
    date = datetime.date.today().isoformat()
    title = "### Metal roofline estimate (Apple GPUs, from the harness's byte counters)"
    body = (f"{title}\n\n{date}, `benchmarks/metal_roofline.py` on "
            f"{platform.machine()} (no Apple GPU: an estimate, not a timing). Qwen3-30B-A3B "
            f"layer, affine 4-bit, bf16; one expert's weights = {EXPERT / 1e6:.2f} MB. Time "
            "floor = max(bytes / bandwidth, flops / fp32 peak), vendor figures "
            + ", ".join(f"{c} {bw} GB/s {tf} TFLOPS" for c, (bw, tf) in CHIPS.items())
            + ". Ours, two counts of the bytes every dispatch of the call reads and writes: "
            "*compulsory* (each distinct byte once: caches share everything) and "
            "*per-threadgroup* (each threadgroup fetches what it reads: nothing shared; the "
            "upper bound), from the Metal harness's counters where marked, else from the byte "
            "model of the same kernels (within 2% of the counters, table below). The "
            "time columns use the compulsory bytes. SwitchGLU: a lower bound (touched "
            "experts' weights once, once per pair below 64 indices, bf16 intermediates).\n\n"
            + table + "\n")
    text = replace_section(text, title, body)
    title2 = "### Metal variant choice (from the harness's byte counters)"
    body2 = (f"{title2}\n\n{date}, `benchmarks/metal_roofline.py`. The fused MLP kernel has two "
             "instances of one body (kernels/moe_mlp.metal): the simd policy (a token tile of "
             f"{simd_tm()} pairs at D=2048 bf16, 1 for a single token, lanes across K) and the simdgroup_matrix policy "
             "(32-pair tiles). Their bytes differ in how often a touched expert's weights are "
             "read (once per tile) and their executed flops in the rows a tile computes (the "
             "simd policy skips empty rows, the matrix one computes all 32). Byte model vs the "
             "harness's counters (E=16, D=256, F=128, k=4, both instances forced with "
             "`MLX_MOE_METAL_VARIANT`):\n\n" + "\n".join(check_lines) + "\n\n"
             "Modelled time max(per-threadgroup bytes / bandwidth, executed flops / fp32 peak) "
             "per instance (random top-k routing; * where the matrix instance is faster):\n\n"
             + "\n\n".join(vtables) + "\n\n"
             f"The matrix instance is faster from (pairs per expert): {cross_text}. The host "
             f"(`mlx_moe/csrc/metal/encode.h`, `MMA_MIN_PAIRS_PER_EXPERT` = "
             f"{MMA_MIN_PAIRS_PER_EXPERT:g}) switches where it is faster on every chip listed. "
             "This is a bytes-and-flops model with the per-threadgroup (no cache sharing) byte "
             "count, not a timing: a Mac can time both instances at any size with "
             "`MLX_MOE_METAL_VARIANT=simd|mma python benchmarks/bench_moe.py` (docs/MACOS.md).\n")
    text = replace_section(text, title2, body2)
    doc.write_text(text)
    print(f"wrote {doc}")


if __name__ == "__main__":
    main()

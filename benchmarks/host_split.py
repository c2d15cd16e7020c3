"""Where the time of a chained MoE layer goes: host graph building, host encoding, device.

For mlx-lm's SwitchGLU path (baseline) and mlx_moe's route + moe_mlp, side by side in one
run, on L layers with distinct weights chained in one eval (Qwen3-30B-A3B layer shape):

* build: Python + op construction (calling the layer functions, nothing evaluated);
* encode: `mx.async_eval` of the chain's output (MLX runs every primitive's eval on the
  host: allocation, kernel nodes, graph update and launch) -- host work only;
* wait: the rest of `mx.eval` after that (the device finishing);
* serial: all three back to back (what `bench_moe.py`'s chained column measures);
* pipelined: each step built and queued while the previous step runs (mlx-lm's generate
  loop), i.e. max(host, device) per step.

Also prints the same split for a chain of trivial MLX adds (MLX's own per-node cost).
Per-layer microseconds. Timing only; `bench_moe.py` is the benchmark of record.

    python benchmarks/host_split.py --tokens 1 4 16 [--format mxfp4] [--layers 8]
    python benchmarks/host_split.py --tokens 1 2 16 --ab MLX_MOE_CUDA_PDL=0 --rounds 8

With --ab VAR=VALUE, mlx_moe alone runs with and without that environment setting (the
CUDA knobs are read at every evaluation) in interleaved rounds in one process, and the
medians over the rounds are printed: an A/B of one knob's host and device cost that the
host's drift between runs does not blur.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_moe import (FORMATS, SHAPES, baseline_layer, make_layer, ours_layer,  # noqa: E402
                       time_pipelined)


def split(build, reps=20):
    for _ in range(3):
        mx.eval(build())
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        y = build()
        t1 = time.perf_counter()
        mx.async_eval(y)
        t2 = time.perf_counter()
        mx.eval(y)
        t3 = time.perf_counter()
        ts.append((t1 - t0, t2 - t1, t3 - t2, t3 - t0))
    return [statistics.median(c) * 1e6 for c in zip(*ts)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--format", choices=[f for f in FORMATS if f != "trellis4"], default="affine4")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--ab", metavar="VAR=VALUE", help="A/B of mlx_moe: unset vs this env setting")
    ap.add_argument("--rounds", type=int, default=8, help="interleaved rounds of --ab")
    args = ap.parse_args(argv)
    shape, L = SHAPES["qwen3"], args.layers
    print(f"{shape['name']} layer, {args.format}, bfloat16, {L} layers per eval, device {mx.default_device()}")
    a0 = mx.ones((16,))
    mx.eval(a0)
    for n in (L, 3 * L):
        def adds(n=n):
            a = a0
            for _ in range(n):
                a = a + 1
            return a
        b, e, w, s = (v / n for v in split(adds))
        print(f"MLX add x{n}: per node build {b:.1f} us, encode {e:.1f} us, wait {w:.1f} us")
    layers = [make_layer(shape, FORMATS[args.format], seed=i) for i in range(L)]
    impls = {"baseline": [baseline_layer(e, shape["k"]) for e in layers],
             "mlx_moe": [ours_layer(e, shape["k"]) for e in layers]}
    print("| tokens | path | build us/layer | encode us/layer | wait us/layer | serial us/layer | pipelined us/layer |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for T in args.tokens:
        rng = np.random.default_rng(T)
        x = mx.array(rng.standard_normal((T, shape["D"])).astype(np.float32)).astype(mx.bfloat16)
        lgs = [mx.array(rng.standard_normal((T, shape["E"])).astype(np.float32)) for _ in range(L)]
        mx.eval(x, lgs)

        def measure(fns):
            def chain(y):
                for f, lg in zip(fns, lgs):
                    y = f(y, lg)
                return y
            b, e, w, s = (v / L for v in split(lambda: chain(x)))
            return b, e, w, s, time_pipelined(chain, x) * 1e6 / L

        if args.ab:
            var, val = args.ab.split("=", 1)
            old = os.environ.pop(var, None)
            runs = {"mlx_moe": [], f"mlx_moe {args.ab}": []}
            for _ in range(args.rounds):
                for name in runs:
                    if name == "mlx_moe":
                        os.environ.pop(var, None)
                    else:
                        os.environ[var] = val
                    runs[name].append(measure(impls["mlx_moe"]))
            os.environ.pop(var, None)
            if old is not None:
                os.environ[var] = old
            for name, v in runs.items():
                b, e, w, s, p = (statistics.median(c) for c in zip(*v))
                print(f"| {T} | {name} (median of {args.rounds}) | {b:.1f} | {e:.1f} | {w:.1f} | {s:.1f} | {p:.1f} |",
                      flush=True)
            continue
        for name, fns in impls.items():
            b, e, w, s, p = measure(fns)
            print(f"| {T} | {name} | {b:.1f} | {e:.1f} | {w:.1f} | {s:.1f} | {p:.1f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())

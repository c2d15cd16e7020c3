"""Where a layer's device time goes, kernel by kernel: start and end of each kernel of
mlx_moe's layer (route + moe_mlp) relative to the layer's first kernel start, from the CUDA
kernel timeline (CUPTI through torch.profiler; MLX's CUDA backend only).

A kernel launched as a programmatic dependent starts before the kernel it depends on has
finished (its blocks wait at `griddepcontrol.wait`), so its duration overstates its work;
the end times do not: end(kernel j) - end(kernel j - 1) is what kernel j added to the span.
Layers run chained as in bench_moe.py (L layers with distinct weights in one eval); the first
and last layer of each eval are left out (the chain's ramp), each cell is the median over
the other layers and the evals.

    python benchmarks/kernel_timeline.py --shape qwen3 --format affine4bf --tokens 1 4 16
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_moe as b  # noqa: E402


def short_name(name: str) -> str:
    """The kernel's function name without namespaces and template arguments."""
    base = name.split("(")[0]
    depth, out = 0, []
    for ch in base:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    fn = "".join(out).split("::")[-1].strip()
    return re.sub(r"^void ", "", fn) or base[:40]


def timeline(fn, x, layers, n):
    """Per-layer kernels as lists of (name, start, end) in us, start-ordered, from n evals."""
    ev = b.kernel_events(fn, x, n)
    if not ev or len(ev) % (n * layers):
        sys.exit(f"{len(ev)} kernels over {n} evals of {layers} layers: not one kernel list per "
                 "layer (a kernel outside the layers, or layers that differ)")
    per = len(ev) // (n * layers)
    return [[(short_name(nm), s, e) for s, e, nm in ev[i:i + per]] for i in range(0, len(ev), per)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=b.SHAPES, default="qwen3")
    ap.add_argument("--format", choices=b.FORMATS, default="affine4bf")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--evals", type=int, default=10)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args(argv)
    if mx.default_device().type != mx.gpu or not mx.cuda.is_available():
        sys.exit("kernel_timeline.py needs MLX's CUDA backend")
    import torch

    torch.cuda.init()
    shape, fmt = b.SHAPES[args.shape], b.FORMATS[args.format]
    L, fns = args.layers, None
    dtype = getattr(mx, args.dtype)
    print(f"{shape['name']} layer, {args.format}, {args.dtype}, {b.machine_name()}; per kernel: "
          "median start / end (us) from the layer's first kernel start; 'adds': end minus the "
          "previous kernel's end; 'span': next layer's start minus this one's")
    for T in args.tokens:
        fns, x, chain = b.chain_inputs(shape, fmt, T, L, dtype, fns)
        lays = timeline(chain, x, L, args.evals)
        inner = [(lays[i], lays[i + 1]) for i in range(len(lays) - 1) if 0 < i % L < L - 1]
        names = [nm for nm, _, _ in inner[0][0]]
        starts = [[ly[j][1] - ly[0][1] for ly, _ in inner] for j in range(len(names))]
        ends = [[ly[j][2] - ly[0][1] for ly, _ in inner] for j in range(len(names))]
        span = statistics.median(nx[0][1] - ly[0][1] for ly, nx in inner)
        print(f"\ntokens {T}: span {span:.1f} us per layer")
        print("| kernel | start | end | adds |")
        print("|---|---:|---:|---:|")
        prev = 0.0
        for j, nm in enumerate(names):
            s, e = statistics.median(starts[j]), statistics.median(ends[j])
            print(f"| {nm} | {s:.1f} | {e:.1f} | {e - prev:.1f} |")
            prev = e
        print(f"| (next layer starts) | {span:.1f} | | {span - prev:.1f} |", flush=True)


if __name__ == "__main__":
    main()

"""A/B of mlx_moe builds: time per layer of mlx_moe's chained layers for two or more compiled
extensions, each in its own process, the builds interleaved over rounds.

The layers are bench_moe.py's (route + moe_mlp, L layers with distinct weights chained in one
eval, the same weights and inputs). On MLX's CUDA backend with PyTorch the figure is device
time, as `bench_moe.py --device-time` measures it (CUPTI kernel timeline: first kernel start
to last kernel end of each eval, median of 10, per layer); elsewhere wall-clock per layer.
Each build runs with the working tree's Python package and its own `_ext` module, and with
its own environment settings if given (`--env NAME:VAR=VALUE`: one extension under two
settings of the MLX_MOE_CUDA_* knobs is two builds). This compares builds of mlx_moe with
each other; the benchmark of record, with mlx-lm's path beside ours, is bench_moe.py.

    python benchmarks/ab_builds.py --build old=/tmp/old/_ext.cpython-312-x86_64-linux-gnu.so \\
        --build new=build/dev/_ext.cpython-312-x86_64-linux-gnu.so \\
        --case qwen3:affine4:1,2,4,16,64 --case glm47flash:affine4:16 --rounds 2
    python benchmarks/ab_builds.py --build decode=$SO --build grouped=$SO \\
        --env grouped:MLX_MOE_CUDA_TR_MMA_MAX_PAIRS=0 --case qwen3:trellis4:1,4,16,64,96
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE = HERE.parent / "mlx_moe"


def parse_case(text: str):
    try:
        shape, fmt, tokens = text.split(":")
        return shape, fmt, [int(t) for t in tokens.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--case wants SHAPE:FORMAT:T1,T2,..., got {text!r}")


def worker(args):
    import mlx.core as mx

    sys.path.insert(0, str(HERE))
    import bench_moe as b
    import mlx_moe

    expect = os.environ.get("MLX_MOE_AB_ROOT")
    if expect and not Path(mlx_moe.__file__).resolve().is_relative_to(Path(expect).resolve()):
        sys.exit(f"mlx_moe came from {mlx_moe.__file__}, not from the build under test ({expect})")
    device_time = mx.default_device().type == mx.gpu and mx.cuda.is_available()
    if device_time:
        try:
            import torch

            torch.cuda.init()
        except Exception as e:  # noqa: BLE001 -- any failure means no CUPTI timeline here
            sys.exit(f"device time on MLX's CUDA backend needs PyTorch with CUDA ({e})")
    dtype = getattr(mx, args.dtype)
    for shape_name, fmt_name, tokens in args.case:
        shape, fmt = b.SHAPES[shape_name], b.FORMATS[fmt_name]
        L, fns = args.layers, None
        for T in tokens:
            fns, x, chain = b.chain_inputs(shape, fmt, T, L, dtype, fns)
            if device_time:
                t = b.device_span_per_layer(chain, x, L, 10)
            else:
                t = b.time_fn(chain, (x,)) / L
            print(f"AB\t{shape_name}\t{fmt_name}\t{T}\t{t * 1e6:.1f}", flush=True)
    print(f"AB-CLOCK\t{'device' if device_time else 'wall'}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", action="append", default=[], metavar="NAME=PATH",
                    help="a compiled mlx_moe extension (_ext*.so / .pyd); two or more")
    ap.add_argument("--env", action="append", default=[], metavar="NAME:VAR=VALUE",
                    help="an environment variable for build NAME's processes (repeatable)")
    ap.add_argument("--case", action="append", type=parse_case, metavar="SHAPE:FORMAT:T,..",
                    help="bench_moe.py shape and format, token counts (default qwen3:affine4:1,16)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.case = args.case or [parse_case("qwen3:affine4:1,16")]
    if args.worker:
        return worker(args)
    builds = []
    for spec in args.build:
        name, sep, path = spec.partition("=")
        if not sep or not Path(path).is_file() or not Path(path).name.startswith("_ext"):
            ap.error(f"--build wants NAME=PATH to a compiled _ext module, got {spec!r}")
        builds.append((name, Path(path).resolve()))
    if len(builds) < 2:
        ap.error("give two or more --build NAME=PATH")
    if len({name for name, _ in builds}) < len(builds):
        ap.error("--build names must differ")
    extra = defaultdict(dict)
    for spec in args.env:
        name, _, kv = spec.partition(":")
        var, sep, val = kv.partition("=")
        if name not in dict(builds) or not sep or not var:
            ap.error(f"--env wants NAME:VAR=VALUE for a --build NAME, got {spec!r}")
        extra[name][var] = val

    results = defaultdict(lambda: defaultdict(list))
    clock = "?"
    with tempfile.TemporaryDirectory() as tmp:
        roots = {}
        for name, so in builds:  # the working tree's package with this build's extension
            root = Path(tmp) / name
            shutil.copytree(PACKAGE, root / "mlx_moe", ignore=shutil.ignore_patterns(
                "_ext*.so", "_ext*.pyd", "__pycache__", "csrc", "*.metallib"))
            shutil.copy2(so, root / "mlx_moe" / so.name)
            for lib in so.parent.glob("*.metallib"):
                shutil.copy2(lib, root / "mlx_moe" / lib.name)
            roots[name] = root
        case_args = [a for shape, fmt, tokens in args.case
                     for a in ("--case", f"{shape}:{fmt}:{','.join(map(str, tokens))}")]
        for r in range(args.rounds):
            for name, _ in builds:
                env = dict(os.environ, **extra[name], MLX_MOE_AB_ROOT=str(roots[name]),
                           PYTHONPATH=os.pathsep.join([str(roots[name])] + (
                               [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
                cmd = [sys.executable, __file__, "--worker", "--layers", str(args.layers),
                       "--dtype", args.dtype, *case_args]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp)
                if out.returncode != 0:
                    sys.exit(f"build {name}, round {r + 1} failed:\n{out.stdout}{out.stderr}")
                for line in out.stdout.splitlines():
                    f = line.split("\t")
                    if f[0] == "AB":
                        results[(f[1], f[2], int(f[3]))][name].append(float(f[4]))
                    elif f[0] == "AB-CLOCK":
                        clock = f[1]
                print(f"round {r + 1}: {name} done", file=sys.stderr, flush=True)
    unit = "device us/layer" if clock == "device" else "wall-clock us/layer"
    print(f"\n{args.layers} chained layers, {args.dtype}, {unit}, rounds separated by /:\n")
    for name, kv in extra.items():
        if kv:
            print(f"{name}: " + " ".join(f"{k}={v}" for k, v in kv.items()))
    print("| shape | format | tokens | " + " | ".join(n for n, _ in builds) + " |")
    print("|---|---|---:|" + "---:|" * len(builds))
    for (shape, fmt, T), by in results.items():
        print(f"| {shape} | {fmt} | {T} | "
              + " | ".join(" / ".join(f"{v:.1f}" for v in by[n]) for n, _ in builds) + " |")


if __name__ == "__main__":
    main()

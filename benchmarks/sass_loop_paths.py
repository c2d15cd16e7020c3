"""Instruction counts of the CUDA decode kernels' unit loop, read off their SASS (no GPU needed).

Compiles the tensor-core decode kernels of kernels/moe_cuda.cuh for sm_90 with nvcc (the
instantiations the host launches for bf16 activations: gate/up with 8 warps and 16 rows, down
with 4 warps and 32 rows), disassembles them with cuobjdump, and prints per kernel its
registers and the number of instructions on the shortest path through one iteration of its
unit loop (from the join after the cp.async wait to the back-edge) that executes as many
HMMA as any path does and skips the blocks that divide (MUFU) or decode the other format
(mxfp4: the byte permute of fp4_mag2; affine: the LOP3 of nib2_bf16_128): the iteration of a
layer in --format whose units are all present, scaled to 4 units and per 16 x 16 x 16 MMA
step (a unit is 4 steps in every form: 2 projections or 2 row tiles, 2 halves or runs).
--format trellis compiles the kernels' trellis form (TR), whose loop has two versions
(scale applied per unit when every group is whole units, per run otherwise): both are
counted, told apart by their FFMA. The counts compare two versions of the loop; device time
decides what lands (bench_moe.py).

    python benchmarks/sass_loop_paths.py                      # the working tree's kernels
    python benchmarks/sass_loop_paths.py --kernels /path/to/other/kernels
    python benchmarks/sass_loop_paths.py --format mxfp4
    python benchmarks/sass_loop_paths.py --format trellis

nvcc must be on PATH (or --nvcc); cuobjdump ships with the CUDA toolkit or in PyPI's
nvidia-cuda-cuobjdump wheel (--cuobjdump).
"""

from __future__ import annotations

import argparse
import functools
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (name, template arguments, activation type, HMMA per unit: 2 per projection and 16 rows,
# twice with split activations; trellis: 1 per run, projection and 16 rows, three times
# with split activations)
KERNELS = [
    ("gate/up bf16", "true, __nv_bfloat16, false, 1, MM_WARPS_GU", "__nv_bfloat16", 4),
    ("down", "false, float, true, 2, MM_WARPS_DN", "float", 8),
]
KERNELS_TR = [
    ("gate/up bf16", "true, __nv_bfloat16, false, 1, MM_WARPS_GU, true", "__nv_bfloat16", 4),
    ("down", "false, float, true, 2, MM_WARPS_DN, true", "float", 12),
]
STEPS_PER_UNIT = 4


def instantiate(kernels=KERNELS) -> str:
    lines = ['#include "moe_cuda.cuh"', "namespace mlx_moe::cuda {"]
    for _, targs, xt, _ in kernels:
        lines.append(
            f"template __global__ void mlp_mma_dec_kernel<{targs}>(MlpDesc, const {xt}*,"
            " const float*,"
            " const uint32_t*, const uint32_t*, const uint32_t*, const uint32_t*, const float*,"
            " uint32_t, float*, DecExtra);")
    lines.append("}")
    return "\n".join(lines) + "\n"


def parse(sass: str) -> list[tuple[int, str]]:
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), re.sub(r"\s+", " ", m.group(2).strip())))
    return ins


def functions(sass: str) -> dict[str, str]:
    """cuobjdump -sass output split by kernel: {mangled name: its text}."""
    return {m.group(1): body for body in re.split(r"(?=\t\tFunction : )", sass)
            for m in [re.match(r"\t\tFunction : (\S+)", body)] if m}


def unit_loops(ins: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """The unit loops: the backward branches (start, back-edge) whose bodies hold HMMA and
    contain no other such loop (the trellis form has two)."""
    loops = []
    for a, t in ins:
        m = re.search(r"BRA (?:!?U?P\d, )?(0x[0-9a-f]+)$", t)
        if m and int(m.group(1), 16) <= a:
            lo = int(m.group(1), 16)
            if any(lo <= x <= a and "HMMA" in y for x, y in ins):
                loops.append((lo, a))
    return sorted({(lo, hi) for lo, hi in loops
                   if not any((l2, h2) != (lo, hi) and lo <= l2 and h2 <= hi for l2, h2 in loops)})


def loop_path(ins: list[tuple[int, str]], skip: tuple[str, ...],
              loop: tuple[int, int] | None = None) -> tuple[float, int]:
    """(instructions, HMMA) of the shortest path through the unit loop's iteration among
    those with the most HMMA (loop: one of unit_loops, else the first)."""
    idx = {a: i for i, (a, _) in enumerate(ins)}
    lo, hi = loop or unit_loops(ins)[0]
    # the join after the cp.async wait's switch (the first forward jump in the loop), or the
    # loop's start where the wait is outside it (the trellis form's loop over units)
    start = next((int(m.group(1), 16) for a, t in ins if lo <= a <= hi
                  for m in [re.search(r"^BRA (0x[0-9a-f]+)$", t)]
                  if m and a < int(m.group(1), 16) <= hi), lo)
    sys.setrecursionlimit(100000)

    def succs(i: int) -> list[int]:
        a, t = ins[i]
        if any(s in t for s in skip) or t.startswith(("BRX", "EXIT", "RET")) or a == hi:
            return []
        m = re.search(r"BRA (?:!?U?P\d, )?(0x[0-9a-f]+)$", t)
        if not m:
            return [i + 1]
        out = []
        tgt = int(m.group(1), 16)
        if lo <= tgt <= hi and tgt > a:
            out.append(idx[tgt])
        if t.startswith("@") or re.search(r"BRA !?U?P\d,", t):
            out.append(i + 1)
        return [s for s in out if ins[s][0] <= hi]

    @functools.lru_cache(None)
    def most(i: int) -> float:  # most HMMA on a path from i to the back-edge
        a, t = ins[i]
        if any(s in t for s in skip):
            return -float("inf")
        if a == hi:
            return 0
        return ("HMMA" in t) + max((most(s) for s in succs(i)), default=-float("inf"))

    need_mma = int(most(idx[start]))

    @functools.lru_cache(None)
    def walk(i: int, mma: int):
        a, t = ins[i]
        if any(s in t for s in skip):
            return float("inf")
        mma = min(need_mma, mma + ("HMMA" in t))
        if a == hi:
            return 1 if mma >= need_mma else float("inf")
        return 1 + min((walk(s, mma) for s in succs(i)), default=float("inf"))

    return walk(idx[start], 0), need_mma


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernels", type=Path, default=ROOT / "kernels", help="the kernels/ folder")
    ap.add_argument("--nvcc", default="nvcc")
    ap.add_argument("--cuobjdump", default="cuobjdump")
    ap.add_argument("--format", choices=["affine4", "mxfp4", "trellis"], default="affine4",
                    help="the codes the counted path decodes")
    args = ap.parse_args(argv)
    # division, and the other format's decode (fp4_mag2's byte permute / nib2_bf16_128's LOP3)
    skip = {"affine4": ("MUFU", "0xc080604"), "mxfp4": ("MUFU", "0xf000f,"),
            "trellis": ("MUFU",)}[args.format]
    kernels = KERNELS_TR if args.format == "trellis" else KERNELS
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = Path(tmp) / "dec.cu", Path(tmp) / "dec.cubin"
        src.write_text(instantiate(kernels))
        r = subprocess.run([args.nvcc, f"-I{args.kernels}", "-O3", "-std=c++20", "-arch=sm_90",
                            "--expt-relaxed-constexpr", "-diag-suppress=997,20012", "-cubin",
                            "-Xptxas", "-v", "-o", str(cubin), str(src)],
                           capture_output=True, text=True, check=True)
        sass = subprocess.run([args.cuobjdump, "-sass", str(cubin)], capture_output=True,
                              text=True, check=True).stdout
    regs, fn = {}, None
    for line in r.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        fn = m.group(1) if m else fn
        m = re.search(r"Used (\d+) registers", line)
        if m and fn:
            regs[fn] = int(m.group(1))
    funcs = functions(sass)
    for name, targs, _, per_unit in kernels:
        tag = "Lb1E" if targs.startswith("true") else "Lb0E"
        fn = next(f for f in funcs if "mlp_mma_dec_kernel" in f and f"kernelI{tag}" in f)
        ins = parse(funcs[fn])
        loops = unit_loops(ins)
        ffma = [sum(1 for a, t in ins if lo <= a <= hi and "FFMA" in t) for lo, hi in loops]
        for (lo, hi), nf in sorted(zip(loops, ffma), key=lambda z: z[1]):
            n, mma = loop_path(ins, skip, (lo, hi))
            units = mma / per_unit
            form = ""
            if len(loops) > 1:
                form = " (scale per unit)" if nf == min(ffma) else " (scale per run)"
            print(f"{name}, {args.format}{form}: {regs.get(fn, '?')} registers; unit loop: {n} "
                  f"instructions per iteration of {units:g} units ({mma} HMMA), "
                  f"{n * 4 / units:.0f} per 4 units, {n / (units * STEPS_PER_UNIT):.1f} per MMA step")


if __name__ == "__main__":
    main()

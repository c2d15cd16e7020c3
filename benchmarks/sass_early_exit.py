"""Which global loads the register-operand kernels issue before their early exit (no GPU needed).

The register-operand kernels (kernels/moe_cuda_regw.cuh) load weights with `rw_ldg`, an asm
statement the compiler may move like any pure value: the twenty-fifth session found it
hoisting such loads out of the condition that guarded them (docs/DESIGN.md, "Streaming
form"). Their blocks also return early: the bucketed blocks past the active experts
(`j >= meta[0]`), whose `active[j]` is then unwritten scratch, and the direct gate/up blocks of
a dropped id. A weight load hoisted above that return would read at an expert index that is
garbage. This script disassembles a built extension and prints, for each `mlp_regw_kernel`,
the global loads before its first predicated EXIT. It fails when there are more than the
guard's own:
- bucketed kernels: one, `meta[0]`;
- direct gate/up kernels: the id load, at most three (load_id's per-dtype forms);
- the direct down kernels have no early exit (a dropped slot is predicated, `live`) and
  are not counted.

    python benchmarks/sass_early_exit.py                 # the installed mlx_moe's extension
    python benchmarks/sass_early_exit.py --so path/to/_ext.cpython-312-x86_64-linux-gnu.so

cuobjdump ships with the CUDA toolkit or in PyPI's nvidia-cuda-cuobjdump wheel (--cuobjdump).
Run it on every CUDA build whose kernels changed: a compiler or kernel change can move loads.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

from sass_loop_paths import functions, parse

# template parameters of mlp_regw_kernel<GATEUP, GS, NP, DIRECT, BITS, FP4, STREAM>
_TARGS = re.compile(r"mlp_regw_kernelILb([01])ELi(\d+)ELi(\d+)ELb([01])ELi(\d+)ELb([01])ELb([01])E")


def loads_before_exit(body: str):
    """(index of the first predicated EXIT or None, the LDG instructions before it)."""
    ins = [t for _, t in parse(body)]
    stop = next((i for i, t in enumerate(ins) if re.match(r"@!?U?P\d+ EXIT", t)), None)
    return stop, [t for t in ins[: stop if stop is not None else 0] if "LDG" in t]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--so", type=Path, help="the extension (default: the installed mlx_moe's)")
    ap.add_argument("--cuobjdump", default="cuobjdump")
    args = ap.parse_args(argv)
    so = args.so
    if so is None:
        import mlx_moe

        so = next(Path(mlx_moe.__file__).parent.glob("_ext*.so"))
    sass = subprocess.run([args.cuobjdump, "-sass", str(so)], capture_output=True, text=True,
                          check=True).stdout
    funcs = functions(sass)
    bad = n = 0
    for name in sorted(funcs):
        m = _TARGS.search(name)
        if not m:
            continue
        gateup, gs, np_, direct, bits, fp4, stream = m.groups()
        tag = (f"{'gate/up' if gateup == '1' else 'down':7s} gs {gs:>3s} {bits}-bit"
               f"{' fp4' if fp4 == '1' else '    '} {'direct' if direct == '1' else 'bucketed'}"
               f"{' stream' if stream == '1' else ''}")
        if direct == "1" and gateup == "0":
            print(f"{tag:45s} no early exit (dropped slots predicated)")
            continue
        n += 1
        stop, ldg = loads_before_exit(funcs[name])
        allowed = 3 if direct == "1" else 1
        ok = stop is not None and len(ldg) <= allowed
        bad += not ok
        print(f"{tag:45s} {'ok ' if ok else 'BAD'} exit at instruction {stop}, "
              f"{len(ldg)} load(s) before it (allowed {allowed})")
        if not ok:
            for t in ldg:
                print("    ", t)
    if n == 0:
        print("no mlp_regw_kernel in", so, "(not a CUDA build?)")
        return 1
    print(f"{n - bad} of {n} kernels with an early exit load only their guard's operands before it")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

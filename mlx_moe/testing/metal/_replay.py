"""Replay what the Metal eval_gpu of an mlx_moe op would encode, in the harness.

The extension's `metal_record(out)` runs the real Metal host code (mlx_moe/csrc/metal/
encode.h) against a recorder: kernel names, buffer bindings with offsets, set_bytes
payloads, threadgroup-memory lengths, grids and indirect dispatches. `replay` executes those
commands, in order, on the project's .metal kernels compiled by the harness: the Apple-GPU
path end to end, minus MLX's encoder and Apple's compiler."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import compile as _compile, run, run_indirect

_STORAGE = {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32,
            "uint32": np.uint32, "int32": np.int32, "int64": np.int64, "uint8": np.uint8,
            "uint16": np.uint16, "int8": np.int8, "bool": np.bool_}


def kernels_dir() -> Path:
    """The project's kernels/: inside the installed package, or the source tree's."""
    here = Path(__file__).resolve().parents[2]  # mlx_moe/
    for d in (here / "kernels", here.parent / "kernels"):
        if (d / "moe_mlp.metal").exists():
            return d
    raise FileNotFoundError("cannot find the project's kernels/ directory")


_kernels: dict | None = None


def project_kernels() -> dict:
    """{host name: harness Kernel} over every kernels/*.metal file."""
    global _kernels
    if _kernels is None:
        d = kernels_dir()
        ks = {}
        for f in sorted(d.glob("*.metal")):
            lib = _compile(f, include_dirs=[d])
            ks.update(lib.kernels)
        _kernels = ks
    return _kernels


def project_kernel(name: str, function_constants=(), defines=None):
    """The harness Kernel `name`, from the kernels/*.metal file that defines it, specialised
    with uint function constants 0, 1, ... (as the host creates the pipeline), compiled with
    extra -D `defines` if given."""
    kernel = project_kernels()[name]
    if not function_constants and not defines:
        return kernel
    f = kernel.library.path
    lib = _compile(f, include_dirs=[f.parent], defines=defines,
                   function_constants=dict(enumerate(function_constants)))
    return lib.kernel(name)


def _to_numpy(a) -> np.ndarray:
    import mlx.core as mx
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.ascontiguousarray(np.array(a, copy=True))


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


@dataclass
class Replay:
    outputs: list            # NumPy arrays (bfloat16 as uint16 bits)
    dtypes: list             # their MLX dtype names
    results: list = field(default_factory=list)   # (kernel name, harness Result) per command
    temps: dict = field(default_factory=dict)

    def output(self, i: int) -> np.ndarray:
        """Output i as a NumPy array (bfloat16 widened to float32)."""
        o = self.outputs[i]
        return bf16_to_float32(o) if self.dtypes[i] == "bfloat16" else o

    def bytes_read(self, field_: str = "tg_unique_read") -> int:
        return sum(r.total(field_) for _, r in self.results)


def replay(out, *, reverse: bool = False, poison: int = 0xAB, specialise: bool = True,
           device_fence: bool = True, defines: dict | None = None, **run_kw) -> Replay:
    """Run, in the harness, the Metal commands that evaluating `out` (an unevaluated output of
    mlx_moe.route / bucket / dequantize / moe_mlp) would encode. Outputs and scratch buffers
    start poisoned (every byte `poison`). specialise=False ignores the function constants the
    host sets (runs the generic kernels). device_fence=False records the host code as built
    against a Metal 3.1 SDK (defines={"__METAL_VERSION__": 310} compiles the kernels so)."""
    from mlx_moe import _ext

    rec = _ext.metal_record(out, device_fence)
    inputs = [_to_numpy(a) for a in rec["inputs"]]
    storage = []
    out_arrays, out_dtypes = [], []
    temps = {}
    for h, (kind, index, shape, dtype) in enumerate(rec["arrays"]):
        if kind == "input":
            storage.append(inputs[index])
            continue
        a = np.empty(shape, _STORAGE[dtype])
        a.view(np.uint8)[...] = poison
        storage.append(a)
        if kind == "output":
            out_arrays.append(a)
            out_dtypes.append(dtype)
        else:
            temps[h] = a
    kernels = project_kernels()
    results = []
    for c in rec["commands"]:
        name = c["kernel"]
        if name not in kernels:
            raise KeyError(f"the host code dispatches {name!r}, which no kernels/*.metal defines")
        kernel = project_kernel(name, c["function_constants"] if specialise else (), defines)
        bufs = {}
        for slot, handle, offset, _is_out, payload in c["buffers"]:
            if handle < 0:
                bufs[slot] = payload
            else:
                raw = storage[handle].reshape(-1).view(np.uint8)
                bufs[slot] = raw[offset:]
        tg = dict(c["threadgroup_memory"])
        if c["indirect"] is not None:
            h, off = c["indirect"]
            res = run_indirect(kernel, storage[h], c["threads"], bufs, tg, offset=off,
                               reverse=reverse, **run_kw)
        else:
            res = run(kernel, c["groups"], c["threads"], bufs, tg, reverse=reverse, **run_kw)
        results.append((name, res))
    return Replay(out_arrays, out_dtypes, results, temps)

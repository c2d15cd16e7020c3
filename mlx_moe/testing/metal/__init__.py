"""Metal harness: run the project's .metal kernels, unmodified, on the CPU with Metal's
execution semantics, and check every memory access they make.

    from mlx_moe.testing import metal as mh
    lib = mh.compile("kernels/moe_route.metal", include_dirs=["kernels"])
    res = mh.run(lib.kernel("moe_route_float32"), grid=(2, 1, 1), threadgroup=(64, 1, 1),
                 buffers=[logits, ids, weights, args], threadgroup_memory=[2 * 128 * 4])
    res.counters[0].bytes_read      # bytes buffer(0) was read by the dispatch

How it works, and what it does not model: docs/METAL_HARNESS.md.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._source import Kernel as KernelInfo, MetalSourceError, entry_points, transform

__all__ = [
    "compile", "run", "run_indirect", "Library", "Kernel", "Result", "Counters",
    "HarnessError", "OutOfBounds", "BarrierDivergence", "Deadlock", "UninitializedRead",
    "RaceDetected", "KernelCrash", "MetalSourceError", "CompileError", "compiler",
]

_HERE = Path(__file__).resolve().parent
_RUNTIME = _HERE / "runtime"
_STAGE1 = _HERE / "stage1"
METAL_VERSION = 320  # __METAL_VERSION__ the sources see (MSL 3.2; defines= may lower it)
MAX_BUFFERS = 32


# ----------------------------------------------------------------------------------------
# Errors
class HarnessError(AssertionError):
    """A kernel did something Metal leaves undefined (or that is certainly a bug)."""

    def __init__(self, message, kernel=None, buffer=None):
        super().__init__(message)
        self.kernel = kernel
        self.buffer = buffer


class OutOfBounds(HarnessError):
    pass


class BarrierDivergence(HarnessError):
    pass


class Deadlock(HarnessError):
    pass


class UninitializedRead(HarnessError):
    pass


class RaceDetected(HarnessError):
    pass


class KernelCrash(HarnessError):
    pass


class CompileError(RuntimeError):
    pass


_ERRORS = {1: OutOfBounds, 2: BarrierDivergence, 3: Deadlock, 4: UninitializedRead,
           5: RaceDetected, 6: KernelCrash, 7: ValueError}


# ----------------------------------------------------------------------------------------
# ctypes mirror of runtime/mh_abi.h
class _Buffer(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_void_p), ("size", ctypes.c_uint64), ("kind", ctypes.c_uint32),
                ("pad", ctypes.c_uint32)]


class _Counters(ctypes.Structure):
    _fields_ = [("bytes_read", ctypes.c_uint64), ("bytes_written", ctypes.c_uint64),
                ("tg_unique_read", ctypes.c_uint64), ("unique_read", ctypes.c_uint64),
                ("unique_written", ctypes.c_uint64)]


_ENTRY = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)


class _Launch(ctypes.Structure):
    _fields_ = [("groups", ctypes.c_uint32 * 3), ("tptg", ctypes.c_uint32 * 3),
                ("threads", ctypes.c_uint32 * 3), ("flags", ctypes.c_uint32),
                ("n_tg_buffers", ctypes.c_uint32), ("tg_sizes", ctypes.c_uint64 * 32),
                ("buffers", _Buffer * MAX_BUFFERS), ("counters", _Counters * MAX_BUFFERS),
                ("entry", ctypes.c_void_p), ("kernel_name", ctypes.c_char_p),
                ("threadgroups_run", ctypes.c_uint64), ("barriers", ctypes.c_uint64),
                ("simd_collectives", ctypes.c_uint64), ("fiber_switches", ctypes.c_uint64),
                ("error", ctypes.c_int32), ("error_buffer", ctypes.c_int32),
                ("message", ctypes.c_char * 1024)]


_REVERSE, _NO_TG_CHECKS, _NO_UNIQUE = 1, 2, 4


# ----------------------------------------------------------------------------------------
# Compiler
def compiler() -> list[str]:
    """The C++ compiler command: $MLX_MOE_HARNESS_CXX (for example clang++-19), else the clang
    inside the `ziglang` wheel (pip-installable everywhere, one pinned clang version)."""
    env = os.environ.get("MLX_MOE_HARNESS_CXX")
    if env:
        return shlex.split(env)
    try:
        import ziglang  # noqa: F401
    except ImportError as e:
        raise CompileError("the Metal harness needs a clang: pip install 'ziglang==0.17.1' "
                           "(or set MLX_MOE_HARNESS_CXX=clang++-19)") from e
    return [sys.executable, "-m", "ziglang", "c++"]


def _linker() -> list[str]:
    env = os.environ.get("MLX_MOE_HARNESS_CC")
    if env:
        return shlex.split(env)
    if os.environ.get("MLX_MOE_HARNESS_CXX"):
        return shlex.split(os.environ["MLX_MOE_HARNESS_CXX"])
    return [sys.executable, "-m", "ziglang", "cc"]


def _is_zig(cmd: list[str]) -> bool:
    return "ziglang" in cmd


def _target_flags(cmd: list[str]) -> list[str]:
    if not _is_zig(cmd):
        return []
    arch = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}.get(
        platform.machine().lower(), platform.machine())
    if sys.platform == "darwin":
        return ["-target", f"{arch}-macos"]
    return ["-target", f"{arch}-linux-gnu.2.17"]


def _native_flags(cmd: list[str]) -> list[str]:
    """Kernels run on the machine that compiles them: use its FMA / vector units (fma() and
    simdgroup_matrix products are otherwise libm calls)."""
    if os.environ.get("MLX_MOE_HARNESS_PORTABLE"):
        return []
    return ["-march=native"] if platform.machine().lower() in ("x86_64", "amd64") else ["-mcpu=native"]


def _cache_dir() -> Path:
    d = os.environ.get("MLX_MOE_HARNESS_CACHE")
    p = Path(d) if d else Path(tempfile.gettempdir()) / f"mlx_moe_metal_harness_{os.getuid()}"
    p.mkdir(parents=True, exist_ok=True)
    return p


def _run(cmd: list[str], what: str, cwd=None) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if r.returncode != 0:
        raise CompileError(f"{what} failed ({shlex.join(cmd[:6])} ...):\n{r.stderr[-6000:]}")
    return r.stdout


_lock = threading.Lock()


def _runtime_object() -> Path:
    cxx = compiler()
    src = (_RUNTIME / "mh_runtime.cpp").read_text() + (_RUNTIME / "mh_runtime.h").read_text() + \
        (_RUNTIME / "mh_abi.h").read_text()
    key = hashlib.sha256((src + shlex.join(cxx)).encode()).hexdigest()[:16]
    obj = _cache_dir() / f"mh_runtime_{key}.o"
    if not obj.exists():
        tmp = obj.with_suffix(f".{os.getpid()}.o")
        _run(cxx + _target_flags(cxx) + ["-std=c++20", "-O2", "-fPIC", "-fno-exceptions",
             "-fno-rtti", "-fvisibility=hidden", "-c", str(_RUNTIME / "mh_runtime.cpp"),
             "-o", str(tmp)], "compiling the harness runtime")
        tmp.replace(obj)
    return obj


SANITIZE = ["-fsanitize=address", "-mllvm", "-asan-instrumentation-with-call-threshold=0",
            "-mllvm", "-asan-stack=0", "-mllvm", "-asan-globals=0",
            "-fno-sanitize-address-use-after-scope"]


# ----------------------------------------------------------------------------------------
# Library / Kernel
@dataclass
class Kernel:
    """One kernel of a compiled library (by its host name)."""
    name: str
    info: KernelInfo
    library: "Library"
    address: int

    def __repr__(self):
        return f"<metal harness kernel {self.name}>"


class Library:
    """A .metal translation unit compiled for the harness (like an MTLLibrary)."""

    def __init__(self, path: Path, kernels: list[KernelInfo], lib: ctypes.CDLL, source: str):
        self.path = path
        self._lib = lib
        self.source = source
        self.kernels = {}
        for k in kernels:
            fn = getattr(lib, f"mh_k_{k.host_name}")
            self.kernels[k.host_name] = Kernel(k.host_name, k, self,
                                               ctypes.cast(fn, ctypes.c_void_p).value)
        lib.mh_alloc.restype = ctypes.c_void_p
        lib.mh_alloc.argtypes = [ctypes.c_uint64]
        lib.mh_free.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
        lib.mh_dispatch.argtypes = [ctypes.POINTER(_Launch)]
        lib.mh_dispatch.restype = ctypes.c_int

    def kernel(self, name: str) -> Kernel:
        try:
            return self.kernels[name]
        except KeyError:
            raise KeyError(f"{self.path.name} has no kernel {name!r}; it has: "
                           f"{', '.join(sorted(self.kernels))}") from None

    def __contains__(self, name):
        return name in self.kernels

    def __repr__(self):
        return f"<metal harness library {self.path.name}: {len(self.kernels)} kernels>"


_libraries: dict[str, Library] = {}  # by hash of the compiled source and flags
_requests: dict[tuple, Library] = {}   # by compile() arguments, within this process


def preprocess(path, include_dirs=(), defines=None) -> str:
    cxx = compiler()
    cmd = cxx + _target_flags(cxx) + ["-E", "-x", "c++", "-std=c++20",
                                      f"-D__METAL_VERSION__={METAL_VERSION}", "-D__METAL_MACOS__",
                                      "-D__HAVE_SIMDGROUP_MATRIX__", f"-I{_STAGE1}"]
    cmd += [f"-I{d}" for d in include_dirs]
    cmd += [f"-D{k}={v}" for k, v in (defines or {}).items()]
    cmd += [str(path)]
    return _run(cmd, f"preprocessing {Path(path).name}")


def compile(path, include_dirs=(), defines=None, function_constants=None, *, extra_flags=(),
            optimize="-O2") -> Library:
    """Compile a .metal file for the harness (cached on its preprocessed text and options).

    include_dirs: where the file's #include "..." are found (like mlx_build_metallib's
    INCLUDE_DIRS); defines: -D macros; function_constants: {index or name: value}, the
    specialisation a Metal pipeline would be created with."""
    path = Path(path).resolve()
    include_dirs = [str(Path(d).resolve()) for d in include_dirs]
    # The same request in one process returns the same library without preprocessing again
    # (replay asks for each specialised pipeline once per dispatch).
    request = (str(path), tuple(include_dirs), tuple(sorted((defines or {}).items())),
               tuple(sorted((str(k), v) for k, v in (function_constants or {}).items())),
               tuple(extra_flags), optimize)
    if request in _requests:
        return _requests[request]
    pre = preprocess(path, include_dirs, defines)
    body, kernels = transform(pre, function_constants)
    cxx = compiler()
    flags = _target_flags(cxx) + _native_flags(cxx) + ["-std=c++20", optimize, "-fPIC", "-fno-exceptions", "-fno-rtti",
                                  "-fvisibility=hidden", "-ffp-contract=off", "-w",
                                  f"-D__METAL_VERSION__={METAL_VERSION}", f"-I{_RUNTIME}",
                                  "-include", str(_RUNTIME / "mh_metal.h")] + SANITIZE
    flags += list(extra_flags)
    source = body + entry_points(kernels)
    shim = "".join((_RUNTIME / f).read_text() for f in sorted(os.listdir(_RUNTIME)))
    key = hashlib.sha256((source + shim + shlex.join(cxx + flags)).encode()).hexdigest()[:20]
    with _lock:
        if key in _libraries:
            _requests[request] = _libraries[key]
            return _libraries[key]
        d = _cache_dir()
        so = d / f"{path.stem}_{key}.so"
        if not so.exists():
            cpp = d / f"{path.stem}_{key}.cpp"
            cpp.write_text(source)
            obj = d / f"{path.stem}_{key}.{os.getpid()}.o"
            _run(cxx + flags + ["-c", str(cpp), "-o", str(obj)], f"compiling {path.name}")
            ld = _linker()
            tmp = so.with_suffix(f".{os.getpid()}.so")
            _run(ld + _target_flags(ld) + ["-shared", "-o", str(tmp), str(obj),
                                           str(_runtime_object()), "-lm", "-Wl,-Bsymbolic"],
                 f"linking {path.name}")
            tmp.replace(so)
            obj.unlink(missing_ok=True)
        lib = Library(path, kernels, ctypes.CDLL(str(so)), source)
        _libraries[key] = lib
        _requests[request] = lib
        return lib


# ----------------------------------------------------------------------------------------
# Dispatch
@dataclass
class Counters:
    bytes_read: int
    bytes_written: int
    tg_unique_read: int   # sum over threadgroups of the distinct bytes each read
    unique_read: int      # distinct bytes the dispatch read
    unique_written: int   # distinct bytes the dispatch wrote


@dataclass
class Result:
    kernel: str
    counters: dict        # buffer slot -> Counters
    threadgroups: int
    barriers: int
    simd_collectives: int
    fiber_switches: int

    def total(self, field: str, slots=None) -> int:
        return sum(getattr(c, field) for s, c in self.counters.items()
                   if slots is None or s in slots)


def _as_bytes_array(v, slot, param):
    if isinstance(v, (bytes, bytearray, memoryview)):
        return np.frombuffer(bytes(v), dtype=np.uint8), False
    if isinstance(v, ctypes.Structure):
        return np.frombuffer(bytes(v), dtype=np.uint8), False
    if isinstance(v, np.ndarray):
        return v, True
    raise TypeError(f"buffer({slot}) ({param}): expected a NumPy array, bytes or a ctypes "
                    f"Structure, got {type(v).__name__}")


def _normalise(x, n, what, minimum=1):
    if isinstance(x, int):
        x = (x,)
    x = tuple(int(v) for v in x) + (1,) * (3 - len(tuple(x)))
    if len(x) != 3 or any(v < minimum for v in x):
        raise ValueError(f"{what}: expected up to 3 positive sizes, got {x}")
    return x


def run(kernel: Kernel, grid, threadgroup, buffers, threadgroup_memory=(), *, threads=None,
        reverse=False, check_threadgroup_memory=True, count_unique=True) -> Result:
    """Dispatch `kernel` on the CPU.

    grid: threadgroups per grid (dispatchThreadgroups), up to 3 sizes; or pass `threads`
    (threads per grid, dispatchThreads: the edge threadgroups are partial) and grid=None.
    threadgroup: threads per threadgroup. buffers: list (slot = position; None = unbound) or
    {slot: array}; NumPy arrays are device buffers (copied in, and back unless the kernel's
    parameter is const), bytes / ctypes Structures are constant data.
    threadgroup_memory: list or {index: bytes} of [[threadgroup(i)]] lengths.
    reverse: run threadgroups and threads in reverse order (a schedule variant: a result that
    changes with it depends on an order Metal does not guarantee).

    Raises OutOfBounds, BarrierDivergence, Deadlock, UninitializedRead, RaceDetected or
    KernelCrash naming the kernel and the offending thread."""
    info = kernel.info
    lib = kernel.library._lib
    tptg = _normalise(threadgroup, 3, "threadgroup")
    if np.prod(tptg) > 1024:
        raise ValueError(f"threadgroup: {tptg} is {np.prod(tptg)} threads; Metal allows 1024")
    L = _Launch()
    if threads is not None:
        thr = _normalise(threads, 3, "threads")
        L.threads[:] = thr
        L.groups[:] = tuple(-(-t // s) for t, s in zip(thr, tptg))
    else:
        L.groups[:] = _normalise(grid, 3, "grid", minimum=0)
    L.tptg[:] = tptg
    L.flags = (_REVERSE if reverse else 0) | (0 if check_threadgroup_memory else _NO_TG_CHECKS) | \
        (0 if count_unique else _NO_UNIQUE)
    L.entry = kernel.address
    L.kernel_name = kernel.name.encode()

    bufs = dict(enumerate(buffers)) if isinstance(buffers, (list, tuple)) else dict(buffers)
    bufs = {int(k): v for k, v in bufs.items() if v is not None}
    params = info.buffer_params()
    for slot, p in params.items():
        if slot not in bufs:
            raise ValueError(f"{kernel.name}: buffer({slot}) ({p.type} {p.name}) is not bound")
    tgm = dict(enumerate(threadgroup_memory)) if isinstance(threadgroup_memory, (list, tuple)) \
        else dict(threadgroup_memory)
    for idx, p in info.threadgroup_params().items():
        if int(tgm.get(idx, 0)) <= 0:
            raise ValueError(f"{kernel.name}: threadgroup({idx}) ({p.name}) has no length; pass "
                             "threadgroup_memory")
    n_tg = max([i + 1 for i in tgm] + [0])
    if n_tg > 32:
        raise ValueError("threadgroup_memory: at most 32 entries")
    L.n_tg_buffers = n_tg
    for i in range(n_tg):
        L.tg_sizes[i] = int(tgm.get(i, 0))

    allocs = []
    copy_back = []
    try:
        for slot, v in bufs.items():
            if not 0 <= slot < MAX_BUFFERS:
                raise ValueError(f"buffer slot {slot}: Metal has slots 0..{MAX_BUFFERS - 1}")
            p = params.get(slot)
            arr, is_array = _as_bytes_array(v, slot, p.name if p else "unused")
            if is_array and not arr.flags.c_contiguous:
                raise ValueError(f"buffer({slot}): the array must be C-contiguous")
            n = arr.nbytes
            ptr = lib.mh_alloc(n)
            if not ptr:
                raise MemoryError(f"buffer({slot}): cannot allocate {n} bytes")
            allocs.append((ptr, n))
            if n:
                ctypes.memmove(ptr, arr.ctypes.data, n)
            L.buffers[slot].ptr = ptr
            L.buffers[slot].size = n
            constant = p is not None and p.type.lstrip().startswith("constant") or not is_array
            L.buffers[slot].kind = 2 if constant else 1
            if is_array and p is not None and not p.is_const:
                if not arr.flags.writeable:
                    raise ValueError(f"buffer({slot}) ({p.name}): the kernel may write it, but the "
                                     "array is read-only")
                copy_back.append((arr, ptr, n))
        lib.mh_dispatch(ctypes.byref(L))
        if L.error:
            msg = L.message.decode(errors="replace")
            exc = _ERRORS.get(L.error, HarnessError)
            if exc is ValueError:
                raise ValueError(msg)
            raise exc(msg, kernel=kernel.name,
                      buffer=None if L.error_buffer < 0 else int(L.error_buffer))
        for arr, ptr, n in copy_back:
            if n:
                ctypes.memmove(arr.ctypes.data, ptr, n)
    finally:
        for ptr, n in allocs:
            lib.mh_free(ptr, n)
    counters = {s: Counters(L.counters[s].bytes_read, L.counters[s].bytes_written,
                            L.counters[s].tg_unique_read, L.counters[s].unique_read,
                            L.counters[s].unique_written) for s in bufs}
    return Result(kernel.name, counters, L.threadgroups_run, L.barriers, L.simd_collectives,
                  L.fiber_switches)


def run_indirect(kernel: Kernel, indirect_buffer: np.ndarray, threadgroup, buffers,
                 threadgroup_memory=(), *, offset: int = 0, **kw) -> Result:
    """dispatchThreadgroups(indirectBuffer:indirectBufferOffset:threadsPerThreadgroup:): the
    threadgroups per grid are the three uint32 at byte `offset` of `indirect_buffer` (typically
    written by a previous kernel)."""
    raw = np.ascontiguousarray(indirect_buffer).view(np.uint8)
    if offset % 4 or offset + 12 > raw.nbytes:
        raise ValueError(f"indirect_buffer: needs 3 uint32 at byte offset {offset} (4-aligned), "
                         f"the buffer has {raw.nbytes} bytes")
    groups = tuple(int(g) for g in raw[offset:offset + 12].view(np.uint32))
    return run(kernel, groups, threadgroup, buffers, threadgroup_memory, **kw)


from ._replay import Replay, bf16_to_float32, kernels_dir, project_kernels, replay  # noqa: E402

__all__ += ["replay", "Replay", "project_kernels", "kernels_dir", "bf16_to_float32"]

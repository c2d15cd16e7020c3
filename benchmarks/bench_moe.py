"""Side-by-side timing of one MoE layer: mlx-lm's SwitchGLU path (three mx.gather_qmm, a
SiLU and the host-side routing ops, i.e. what mlx-lm runs today) against mlx_moe's
route + moe_mlp, on the same quantized weights, in one run, for a sweep of token counts.

Prints the table and writes it to docs/PERFORMANCE.md (its own section, keyed by device and
format, with date and machine), next to the floor of each row:
max(weight bytes of the touched experts / memory bandwidth, flops / matmul rate), both
measured on this machine in the same run.

    python benchmarks/bench_moe.py                       # Qwen3-30B-A3B layer, affine 4-bit
    python benchmarks/bench_moe.py --format mxfp4 --tokens 1 16 256
    python benchmarks/bench_moe.py --shape glm47flash
    python benchmarks/bench_moe.py --chain 8     # also: 8 layers with distinct weights in one eval
    python benchmarks/bench_moe.py --format trellis4   # random trellis tiles (baseline: affine 4-bit)

Per-call timings evaluate one layer at a time (graph launch included; at 1 token the touched
weights, ~21 MB, can stay in a GPU's L2). With --chain L the same token counts also run
through L layers with distinct weights, each layer's output feeding the next, in one eval:
the time per layer then reflects streaming weights from memory, as in a model; its "chained
GB/s" column is the touched experts' weight bytes over that time, with its share of the
measured copy bandwidth. Chained evals are serial: graph building (host) then the device
work. The "pipelined" columns (up to 64 tokens) run the same chain as mlx-lm's generate
loop does: each step is built and queued (mx.async_eval) while the previous one runs, so
host and device work overlap, and each step's input is the previous step's output.

With --device-time (MLX's CUDA backend, PyTorch installed) the chained evals also run under
torch.profiler, and the "device" columns give the chain's device time per layer: first
kernel start to last kernel end over the L layers (median of 10 evals; 3 from 512 tokens),
from CUPTI's kernel timeline, without the host's work that the chained columns include.

    python benchmarks/bench_moe.py --chain 8 --device-time     # H100: device time per layer
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import mlx.core as mx
import mlx_moe

SHAPES = {
    "qwen3": dict(name="Qwen3-30B-A3B", E=128, D=2048, F=768, k=8),
    "glm47flash": dict(name="GLM-4.7-Flash", E=64, D=2048, F=1536, k=4),
}
FORMATS = {
    "affine4": dict(mode="affine", bits=4, group_size=64),
    # The same quantized from bf16 weights: bf16 scales and biases, as in mlx-community's
    # checkpoints of bf16 models (affine4 quantizes fp32 weights: fp32 scales and biases).
    "affine4bf": dict(mode="affine", bits=4, group_size=64, wdtype="bfloat16"),
    # ... and from fp16 weights: fp16 scales and biases (checkpoints of fp16 models, run with
    # fp16 activations: --dtype float16)
    "affine4h": dict(mode="affine", bits=4, group_size=64, wdtype="float16"),
    "affine8": dict(mode="affine", bits=8, group_size=64),
    "affine8bf": dict(mode="affine", bits=8, group_size=64, wdtype="bfloat16"),
    "mxfp4": dict(mode="mxfp4", bits=4, group_size=32),
    # Random trellis tiles (timing only: no quantizer run); the baseline then runs mlx-lm's
    # path on affine 4-bit weights of the same shape, so there is no error column.
    "trellis4": dict(mode="trellis", bits=4, group_size=64),
}


def mlx_lm_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("mlx-lm")


def machine_name() -> str:
    dev = mx.default_device()
    if dev.type == mx.gpu:
        try:
            info = mx.device_info()
            return str(info.get("device_name", info.get("architecture", "GPU")))
        except Exception:
            return "GPU"
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def make_layer(shape, fmt, seed=0):
    """Random fp32 weights quantized by mx.quantize, in the layout mlx-lm stores."""
    E, D, F = shape["E"], shape["D"], shape["F"]
    mx.random.seed(seed)
    if fmt["mode"] == "trellis":
        return make_trellis_layer(shape, fmt)
    projs = []
    for out_f, in_f in ((F, D), (F, D), (D, F)):
        parts = []
        for e0 in range(0, E, 16):  # quantize in chunks to bound peak memory
            w = mx.random.normal((min(16, E - e0), out_f, in_f)) * (in_f ** -0.5)
            if "wdtype" in fmt:
                w = w.astype(getattr(mx, fmt["wdtype"]))
            q = mx.quantize(w, group_size=fmt["group_size"], bits=fmt["bits"], mode=fmt["mode"])
            mx.eval(*q)
            parts.append(q)
        arrays = [mx.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]
        mx.eval(*arrays)
        projs.append(mlx_moe.QuantizedWeight(
            arrays[0], arrays[1], arrays[2] if fmt["mode"] == "affine" else None,
            mode=fmt["mode"], bits=fmt["bits"], group_size=fmt["group_size"]))
    return mlx_moe.Experts(*projs)


def make_trellis_layer(shape, fmt):
    """Random trellis tiles, scales, shared codebook, su and sv (docs/FORMATS.md)."""
    E, D, F, bits, gs = shape["E"], shape["D"], shape["F"], fmt["bits"], fmt["group_size"]
    projs = []
    for N, K in ((F, D), (F, D), (D, F)):
        w = mx.random.randint(0, 256, (E, K // 16, -(-N // 16), 32 * bits)).astype(mx.uint8)
        scales = (mx.random.uniform(0.5, 1.5, (E, K // gs, N)) * (0.5 * K ** -0.5)).astype(mx.float16)
        grid = mx.sort(mx.random.normal((2**bits,)))
        su = mx.where(mx.random.uniform(shape=(E, K)) < 0.5, -1.0, 1.0).astype(mx.float16)
        sv = mx.random.uniform(0.5, 1.5, (E, N)).astype(mx.float16)
        mx.eval(w, scales, grid, su, sv)
        projs.append(mlx_moe.QuantizedWeight(w, scales, mode="trellis", bits=bits, group_size=gs,
                                             grid=grid, su=su, sv=sv))
    return mlx_moe.Experts(*projs)


def baseline_layer(experts: mlx_moe.Experts, k: int):
    """mlx-lm's own routed-expert path: qwen3_moe's block code around mlx-lm's SwitchGLU
    (three mx.gather_qmm, SwiGLU, sorting of many tokens) on the same quantized arrays."""
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwiGLU, SwitchGLU

    def wrap(q):
        m = QuantizedSwitchLinear.__new__(QuantizedSwitchLinear)
        nn.Module.__init__(m)
        m.group_size, m.bits, m.mode, m.global_scale = q.group_size, q.bits, q.mode, None
        m.weight, m.scales, m.biases = q.w, q.scales, q.biases
        m.freeze()
        return m

    E, F, D = experts.gate.w.shape[0], experts.gate.out_features, experts.gate.in_features
    sg = SwitchGLU.__new__(SwitchGLU)
    nn.Module.__init__(sg)
    sg.gate_proj, sg.up_proj, sg.down_proj = wrap(experts.gate), wrap(experts.up), wrap(experts.down)
    sg.activation = SwiGLU()

    def run(x, logits):  # Qwen3MoeSparseMoeBlock.__call__ after its router matmul
        gates = mx.softmax(logits, axis=-1, precise=True)
        inds = mx.stop_gradient(mx.argpartition(gates, kth=-k, axis=-1)[..., -k:])
        scores = mx.take_along_axis(gates, inds, axis=-1)
        scores /= mx.sum(scores, axis=-1, keepdims=True)
        y = sg(x, inds)
        return (y * scores[..., None]).sum(axis=-2).astype(y.dtype)

    return run


def ours_layer(experts: mlx_moe.Experts, k: int):
    def run(x, logits):
        ids, w = mlx_moe.route(logits, k)
        return mlx_moe.moe_mlp(x, ids, w, experts)

    return run


def time_fn(fn, args, min_reps=3, budget_s=2.0, max_reps=50):
    mx.eval(fn(*args))  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        mx.eval(fn(*args))
        times.append(time.perf_counter() - t0)
        if times[-1] > budget_s:
            break
    return statistics.median(times)


def time_pipelined(fn, x, steps=24):
    """Per-step time when each step's graph is built and queued while the previous step runs,
    as mlx-lm's generate loop does (mx.async_eval one step ahead): host work overlaps GPU
    work, so this is max(host, device) per step rather than their sum. Each step feeds the
    previous step's output in (the data dependence of decoding)."""
    y = fn(x)
    mx.eval(y)  # warm-up
    t0 = time.perf_counter()
    y = fn(x)
    mx.async_eval(y)
    for _ in range(steps - 1):
        nxt = fn(y)
        mx.async_eval(nxt)
        mx.eval(y)
        y = nxt
    mx.eval(y)
    return (time.perf_counter() - t0) / steps


def kernel_events(fn, x, n):
    """The CUDA kernels of n evals of fn(x) (after two warm-up evals) as (start, end, name),
    in us, start-ordered, from the kernel timeline (CUPTI through torch.profiler; MLX's CUDA
    backend only)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        mx.eval(fn(x))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            mx.eval(fn(x))
        torch.cuda.synchronize()
    return sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                  if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start)


def chain_inputs(shape, fmt, T, layers, dtype, fns=None):
    """bench_moe's chained case: `layers` layers of our path with distinct weights (or fns),
    T tokens of activations and each layer's router logits (seeded by T), and the chain
    x -> layer 1 -> ... -> layer L as a function of x."""
    E, D, k = shape["E"], shape["D"], shape["k"]
    fns = fns or [ours_layer(make_layer(shape, fmt, seed=i), k) for i in range(layers)]
    rng = np.random.default_rng(T)
    x = mx.array(rng.standard_normal((T, D)).astype(np.float32)).astype(dtype)
    lgs = [mx.array(rng.standard_normal((T, E)).astype(np.float32)) for _ in range(layers)]
    mx.eval(x, lgs)

    def chain(x):
        for f, lg in zip(fns, lgs):
            x = f(x, lg)
        return x

    return fns, x, chain


def device_span_per_layer(fn, x, layers, n):
    """Device time per layer of fn(x) (a chain of `layers` layers): over n evals, the median of
    (last kernel end - first kernel start) / layers, from the CUDA kernel timeline (CUPTI,
    through torch.profiler; MLX's CUDA backend only). The host's work per layer (graph
    building, MLX's encoding) is not in it; MLX's own kernels between ours are."""
    ev = [(s, e) for s, e, _ in kernel_events(fn, x, n)]
    if len(ev) < n:
        return float("nan")
    if len(ev) % n == 0:  # the n evals run the same kernels: K each, in order
        cuts = list(range(len(ev) // n, len(ev), len(ev) // n))
    else:  # else split the timeline at its n - 1 widest idle gaps (the host's work between evals)
        gaps, end = [], ev[0][1]
        for i in range(1, len(ev)):
            gaps.append((ev[i][0] - end, i))
            end = max(end, ev[i][1])
        cuts = sorted(i for _, i in sorted(gaps, reverse=True)[: n - 1])
    spans, lo = [], 0
    for hi in cuts + [len(ev)]:
        grp = ev[lo:hi]
        spans.append(max(e for _, e in grp) - grp[0][0])
        lo = hi
    return statistics.median(spans) * 1e-6 / layers  # us -> s


def measure_bandwidth_gbs(device_time=False):
    if mx.default_device().type == mx.gpu:
        # Device memory: read + write of a 1 GiB array (what the kernels stream from). With
        # --device-time the copy kernel's own device time (median of 10), so that floors and
        # bandwidth shares compare device time with device time (the wall-clock figure adds
        # the host's launch and allocation: 3020 to 3385 GB/s between runs on H200s, where
        # the device time gave 3844 and 3848).
        a = mx.ones((256 * 2**20,), dtype=mx.float32)
        mx.eval(a)
        if device_time:
            t = device_span_per_layer(lambda a: a * 2, a, 1, 10)
        else:
            t = min(time_fn(lambda a: a * 2, (a,), min_reps=5, budget_s=1.0) for _ in range(3))
        return 2 * a.nbytes / t / 1e9
    a = np.ones(64 * 2**20, dtype=np.float32)  # 256 MiB
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.nbytes / best / 1e9


def measure_matmul_gflops():
    if mx.default_device().type == mx.gpu:
        a = mx.random.normal((4096, 4096)).astype(mx.float16)
        mx.eval(a)
        t = time_fn(lambda a: a @ a, (a,), min_reps=5, budget_s=1.0)
        return 2 * 4096**3 / t / 1e9
    a = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * 2048**3 / best / 1e9


def expert_bytes(q: mlx_moe.QuantizedWeight) -> float:
    total = q.w.nbytes + q.scales.nbytes
    total += sum(a.nbytes for a in (q.biases, q.su, q.sv) if a is not None)
    return total / q.w.shape[0]


def write_section(path: Path, key: str, text: str):
    begin, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    body = path.read_text() if path.exists() else "# Performance\n\n"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in body:
        body = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, body, flags=re.S)
    else:
        body = body.rstrip() + "\n\n" + block + "\n"
    path.write_text(body)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="qwen3")
    ap.add_argument("--format", choices=FORMATS, default="affine4")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024, 4096])
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "PERFORMANCE.md")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--chain", type=int, default=0, metavar="L",
                    help="also time L layers with distinct weights in one eval (per-layer time)")
    ap.add_argument("--device-time", action="store_true",
                    help="with --chain on MLX's CUDA backend: also the chain's device time per "
                         "layer (CUPTI kernel timeline through torch.profiler; needs PyTorch)")
    args = ap.parse_args(argv)
    if args.device_time:
        if not args.chain or mx.default_device().type != mx.gpu or not mx.cuda.is_available():
            ap.error("--device-time needs --chain and MLX's CUDA backend")
        try:
            import torch

            torch.cuda.init()
        except Exception as e:  # noqa: BLE001 -- any failure means no CUPTI timeline here
            ap.error(f"--device-time needs PyTorch with CUDA ({e})")

    shape, fmt = SHAPES[args.shape], FORMATS[args.format]
    dtype = getattr(mx, args.dtype)
    E, D, F, k = shape["E"], shape["D"], shape["F"], shape["k"]
    device = mx.default_device()
    print(f"{shape['name']} MoE layer (E={E}, D={D}, F={F}, top-{k}), {args.format}, {args.dtype} "
          f"activations, device {device}: {machine_name()}", flush=True)
    experts = make_layer(shape, fmt)
    per_expert = sum(expert_bytes(q) for q in (experts.gate, experts.up, experts.down))
    bw, rate = measure_bandwidth_gbs(args.device_time), measure_matmul_gflops()
    print(f"measured: copy bandwidth {bw:.1f} GB/s, matmul {rate:.0f} GFLOP/s "
          f"(floor = max(touched expert bytes / bandwidth, flops / matmul rate))", flush=True)

    trellis = fmt["mode"] == "trellis"
    # mlx-lm has no trellis path: its baseline runs on affine 4-bit weights of the same shape.
    base_fmt = FORMATS["affine4"] if trellis else fmt
    base_experts = make_layer(shape, base_fmt) if trellis else experts
    base, ours = baseline_layer(base_experts, k), ours_layer(experts, k)
    chain = [experts] + [make_layer(shape, fmt, seed=i) for i in range(1, args.chain)]
    bchain = ([base_experts] + [make_layer(shape, base_fmt, seed=i) for i in range(1, args.chain)]
              if trellis else chain)
    base_chain = [baseline_layer(e, k) for e in bchain] if args.chain else []
    ours_chain = [ours_layer(e, k) for e in chain] if args.chain else []

    def run_chain(fns, x, logits_list):
        for fn, lg in zip(fns, logits_list):
            x = fn(x, lg)
        return x

    rows = []
    cols = ["tokens", "baseline ms", "mlx_moe ms", "speed-up", "floor ms", "mlx_moe / floor",
            "max abs err / max abs"]
    if args.chain:
        cols[6:6] = [f"chained x{args.chain}: baseline ms/layer", "chained mlx_moe ms/layer",
                     "chained speed-up", "chained mlx_moe / floor", "chained GB/s (% of copy)",
                     "pipelined: baseline ms/layer", "pipelined mlx_moe ms/layer", "pipelined speed-up"]
    if args.device_time:
        cols[-1:-1] = ["chained device time: baseline us/layer", "device mlx_moe us/layer",
                       "device speed-up", "device mlx_moe / floor", "device GB/s (% of copy)"]
    header = "| " + " | ".join(cols) + " |"
    print(header)
    print("|" + "---:|" * len(cols))
    for T in args.tokens:
        rng = np.random.default_rng(T)
        x = mx.array(rng.standard_normal((T, D)).astype(np.float32)).astype(dtype)
        # fp32 logits: in bf16, random logits tie often and the two paths would break
        # ties differently (ours: smaller id; argpartition: arbitrary), so the error
        # column would compare different expert choices.
        logits = mx.array(rng.standard_normal((T, E)).astype(np.float32))
        mx.eval(x, logits)
        y_ours = ours(x, logits)
        y_base = base(x, logits)
        err = mx.abs(y_ours.astype(mx.float32) - y_base.astype(mx.float32)).max().item()
        mag = mx.abs(y_base.astype(mx.float32)).max().item()
        err_s = "n/a (baseline on affine4)" if trellis else f"{err:.2e} / {mag:.2e}"
        t_ours = time_fn(ours, (x, logits))
        t_base = time_fn(base, (x, logits), min_reps=1 if T >= 256 else 3)
        ids, _ = mlx_moe.route(logits, k)
        touched = len(np.unique(np.array(ids)))
        floor = max(touched * per_expert / (bw * 1e9), 2 * 3 * D * F * T * k / (rate * 1e9))
        chained = ""
        if args.chain:
            lgs = [logits] + [mx.array(rng.standard_normal((T, E)).astype(np.float32))
                              for _ in range(args.chain - 1)]
            mx.eval(lgs)
            tc_ours = time_fn(lambda x: run_chain(ours_chain, x, lgs), (x,)) / args.chain
            # device time next to each chained timing (the GPU in the state that timing saw)
            n_dev = 10 if T <= 256 else 3  # (the baseline takes ~0.3 s per layer at 4096)
            if args.device_time:
                td_ours = device_span_per_layer(lambda x: run_chain(ours_chain, x, lgs), x, args.chain, n_dev)
            tc_base = time_fn(lambda x: run_chain(base_chain, x, lgs), (x,),
                              min_reps=1 if T >= 256 else 3) / args.chain
            if args.device_time:
                td_base = device_span_per_layer(lambda x: run_chain(base_chain, x, lgs), x, args.chain, n_dev)
            gbs = touched * per_expert / tc_ours / 1e9  # touched weight bytes per second
            chained = (f"{tc_base * 1e3:.3f} | {tc_ours * 1e3:.3f} | {tc_base / tc_ours:.1f}x | "
                       f"{tc_ours / floor:.1f} | {gbs:.0f} ({100 * gbs / bw:.0f}%) | ")
            if T <= 64:  # decoding sizes: the generate loop's overlap of host and device
                steps = 24 if T <= 16 else 8
                tp_ours = time_pipelined(lambda x: run_chain(ours_chain, x, lgs), x, steps) / args.chain
                tp_base = time_pipelined(lambda x: run_chain(base_chain, x, lgs), x, steps) / args.chain
                chained += f"{tp_base * 1e3:.3f} | {tp_ours * 1e3:.3f} | {tp_base / tp_ours:.1f}x | "
            else:
                chained += "- | - | - | "
            if args.device_time:
                gbs = touched * per_expert / td_ours / 1e9
                chained += (f"{td_base * 1e6:.1f} | {td_ours * 1e6:.1f} | {td_base / td_ours:.1f}x | "
                            f"{td_ours / floor:.1f} | {gbs:.0f} ({100 * gbs / bw:.0f}%) | ")
        row = (f"| {T} | {t_base * 1e3:.2f} | {t_ours * 1e3:.2f} | {t_base / t_ours:.1f}x | "
               f"{floor * 1e3:.3f} | {t_ours / floor:.1f} | {chained}{err_s} |")
        rows.append(row)
        print(row, flush=True)

    if not args.no_write:
        today = datetime.date.today().isoformat()
        key = f"{device.type}-{args.shape}-{args.format}-{args.dtype}".replace("DeviceType.", "")
        text = (f"### {shape['name']} layer, {args.format}, {args.dtype}, {device}\n\n"
                f"{today}, {machine_name()}, MLX {mx.__version__}; "
                f"`python benchmarks/bench_moe.py --shape {args.shape} --format {args.format} "
                f"--dtype {args.dtype}{f' --chain {args.chain}' if args.chain else ''}"
                f"{' --device-time' if args.device_time else ''}`.\n"
                f"Baseline: mlx-lm {mlx_lm_version()} SwitchGLU path as qwen3_moe runs it (mx.gather_qmm x3, "
                f"SwiGLU, softmax/argpartition routing). Measured here: copy bandwidth {bw:.1f} GB/s{' (device time of the copy kernel)' if args.device_time else ''}, matmul {rate:.0f} GFLOP/s. "
                f"Floor: touched experts x {per_expert / 1e6:.3f} MB/expert over that bandwidth, or the flops over that rate. "
                f"Error column: max |ours - baseline| over max |baseline| "
                f"(the baseline rounds its intermediates to {args.dtype}).\n\n"
                + header + "\n|" + "---:|" * len(cols) + "\n" + "\n".join(rows) + "\n")
        write_section(args.out, key, text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())

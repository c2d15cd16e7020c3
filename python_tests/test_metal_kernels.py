"""The Metal path, executed on Linux: every kernel in kernels/*.metal, dispatched exactly as
the Metal host code (mlx_moe/csrc/metal/encode.h) would dispatch it (variant, bindings,
threadgroup memory, grids, indirect dispatch), run by the Metal harness, against the same
independent references as the CPU path (NumPy float64, mx.dequantize) and against the CPU
path itself. Outputs and scratch buffers start poisoned (every byte 0xAB).

Tolerances: the kernels compute in fp32 like the CPU path, with a different summation
order (per-lane partial sums, simd_sum trees, per-slice partials), so the CPU-path bounds
apply (test_ops.py's docstring): fp32 outputs within 2e-5 of max|y| of float64; bf16/fp16
outputs add one final rounding. Index outputs (route ids, bucket pairs) must be identical.
"""

import math
import re
from pathlib import Path

import os

import numpy as np
import pytest

import mlx.core as mx
import mlx_moe

mh = pytest.importorskip("mlx_moe.testing.metal")
pytest.importorskip("ziglang", reason="the Metal harness needs clang: pip install ziglang")
if os.environ.get("MLX_MOE_SKIP_METAL_HARNESS"):
    pytest.skip("MLX_MOE_SKIP_METAL_HARNESS is set", allow_module_level=True)

from reference import (  # noqa: E402
    dequant_affine_ref,
    dequant_mxfp4_ref,
    moe_mlp_ref,
    random_affine,
    random_logits,
    random_mxfp4,
    random_routing,
)
from test_ops import assert_close_to, check_route, make_experts  # noqa: E402
from test_trellis_ops import random_trellis, trellis_experts  # noqa: E402

from mlx_moe.formats import trellis  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def rng(request):
    return np.random.default_rng(abs(hash(request.node.nodeid)) % (2**32))


def cpu(a):
    """The CPU path's result for the same lazy graph."""
    with mx.stream(mx.cpu):
        return np.array(a)


# ---------------------------------------------------------------------------------------------
# Compilation with the flags mlx_build_metallib uses on macOS
def metallib_flags():
    """The warning/language flags of MLX's mlx_build_metallib (its extension.cmake, shipped in
    the MLX wheel), minus the Metal-only ones clang does not know."""
    import mlx
    cmake = Path(mlx.__path__[0]) / "share" / "cmake" / "MLX" / "extension.cmake"
    text = cmake.read_text()
    m = re.search(r"set\(_MTLLIB_COMPILE_OPTIONS(.*?)\)", text, re.S)
    flags = m.group(1).split() if m else ["-Wall", "-Wextra", "-fno-fast-math"]
    return [f for f in flags if f.startswith("-") and "metal" not in f]


@pytest.mark.parametrize("source", sorted((ROOT / "kernels").glob("*.metal")), ids=lambda p: p.name)
def test_kernels_compile_with_metallib_flags(source):
    flags = metallib_flags()
    assert "-Wall" in flags and "-fno-fast-math" in flags
    lib = mh.compile(source, include_dirs=[ROOT / "kernels"], extra_flags=flags + ["-Wno-unused-parameter"])
    assert lib.kernels


def test_every_host_kernel_name_exists():
    """Every kernel name the host code can ask for is defined by kernels/*.metal."""
    names = set(mh.project_kernels())
    text = (ROOT / "mlx_moe" / "csrc" / "metal" / "encode.h").read_text()
    for prefix in re.findall(r'enc\.kernel\("(\w+?)_?"', text):
        assert any(n.startswith(prefix) for n in names), prefix
    for t in ("float32", "float16", "bfloat16"):
        for tm in (1, 2, 4, 8):
            assert f"moe_mlp_{t}_tm{tm}" in names
        assert f"moe_mlp_{t}_mma" in names and f"moe_mlp_combine_{t}" in names
        assert f"moe_route_{t}" in names and f"moe_dequant_trellis_{t}" in names
    for i in ("uint32", "int32", "int64"):
        assert f"moe_bucket_count_{i}" in names and f"moe_bucket_scatter_{i}" in names


# ---------------------------------------------------------------------------------------------
# Router
@pytest.mark.parametrize("T,E,k", [(1, 128, 8), (37, 64, 4), (300, 128, 8), (5, 3, 3), (9, 200, 6)])
@pytest.mark.parametrize("normalize", [True, False])
def test_route(rng, T, E, k, normalize):
    logits = random_logits(rng, T, E) * 3
    ids, w = mlx_moe.route(logits, k, normalize)
    r = mh.replay(ids)
    check_route(logits, k, normalize, r.output(0), r.output(1))
    np.testing.assert_array_equal(r.output(0), cpu(ids))


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_route_dtypes_and_edge_rows(rng, dtype):
    inf, nan = float("inf"), float("nan")
    base = np.array(random_logits(rng, 6, 16))
    base[0, 3] = nan
    base[1, :] = -inf
    base[2, [2, 9]] = inf
    base[3, :] = 1.0  # ties: smaller ids first
    logits = mx.array(base).astype(dtype)
    ids, w = mlx_moe.route(logits, 4)
    r = mh.replay(ids)
    got_ids, got_w = r.output(0), r.output(1)
    np.testing.assert_array_equal(got_ids, cpu(ids))
    np.testing.assert_array_equal(np.isnan(got_w), np.isnan(cpu(w)))
    assert got_ids[0].tolist() == [0, 1, 2, 3] and np.all(np.isnan(got_w[0]))
    assert got_ids[1].tolist() == [0, 1, 2, 3] and np.all(got_w[1] == 0)
    assert got_ids[2, :2].tolist() == [2, 9] and np.allclose(got_w[2], [0.5, 0.5, 0, 0])
    assert got_ids[3].tolist() == [0, 1, 2, 3]
    check_route(logits.astype(mx.float32)[4:], 4, True, got_ids[4:], got_w[4:])


# ---------------------------------------------------------------------------------------------
# Bucketing
@pytest.mark.parametrize("T,E,k,tile,dtype", [(1, 128, 8, 32, np.uint32), (37, 64, 4, 16, np.int32),
                                              (4096, 128, 8, 64, np.int32), (3, 5, 2, 1, np.int64),
                                              (300, 64, 4, 8, np.uint32)])
def test_bucket(rng, T, E, k, tile, dtype):
    ids = rng.integers(0, E, size=(T, k)).astype(dtype)
    counts, offsets, pairs, dispatch = mlx_moe.bucket(mx.array(ids), E, tile=tile)
    r = mh.replay(counts)
    flat = ids.reshape(-1)
    ref_counts = np.bincount(flat, minlength=E)
    assert r.output(0).tolist() == ref_counts.tolist()
    assert r.output(1).tolist() == [0] + np.cumsum(ref_counts).tolist()
    assert r.output(2).tolist() == np.argsort(flat, kind="stable").tolist()
    tiles = int(sum(math.ceil(c / tile) for c in ref_counts))
    assert r.output(3).tolist() == [max(1, tiles), 1, 1, 0]


def test_bucket_drops_and_counts_out_of_range_ids(rng):
    E = 16
    ids = rng.integers(0, E, size=(50, 4)).astype(np.int32)
    ids[3, 1], ids[10, 0], ids[49, 3] = 16, -1, 1000
    out = mlx_moe.bucket(mx.array(ids) + 0, E)  # lazy: the CPU-side check does not run
    r = mh.replay(out[0])
    flat = ids.reshape(-1)
    valid = (flat >= 0) & (flat < E)
    assert r.output(0).tolist() == np.bincount(flat[valid], minlength=E).tolist()
    assert r.output(3)[3] == 3  # dropped ids, for the host to check
    kept = np.flatnonzero(valid)
    order = kept[np.argsort(flat[valid], kind="stable")]
    assert r.output(2)[:len(order)].tolist() == order.tolist()
    assert np.all(r.output(2)[len(order):] == 0xFFFFFFFF)


def test_bucket_empty_grid_is_clamped():
    out = mlx_moe.bucket(mx.zeros((0, 4), dtype=mx.uint32), 8)
    r = mh.replay(out[0])
    assert r.output(3).tolist() == [1, 1, 1, 0]


# ---------------------------------------------------------------------------------------------
# Dequantize
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_dequantize_affine(rng, bits, group_size):
    w, s, b = random_affine(rng, (2, 24, 256), bits, group_size, scale_dtype=mx.float32)
    out = mlx_moe.dequantize(w, s, b, group_size=group_size, bits=bits, dtype=mx.float32)
    got = mh.replay(out).output(0)
    np.testing.assert_allclose(got, dequant_affine_ref(w, s, b, group_size, bits), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got, cpu(out))


@pytest.mark.parametrize("scale_dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("out_dtype", [mx.float16, mx.bfloat16, mx.float32])
def test_dequantize_affine_dtypes(rng, scale_dtype, out_dtype):
    w, s, b = random_affine(rng, (40, 128), 4, 64, scale_dtype=scale_dtype)
    out = mlx_moe.dequantize(w, s, b, dtype=out_dtype)
    got = mh.replay(out).output(0)
    ref = cpu(out.astype(mx.float32)) if out_dtype != mx.float32 else cpu(out)
    np.testing.assert_array_equal(got.astype(np.float32), ref)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize("decoder", ["e2m1", "e2m1_quarter_subnormal"])
def test_dequantize_mxfp4(rng, dtype, decoder):
    w, s = random_mxfp4(rng, (3, 16, 256))
    s = mx.array(rng.integers(100, 140, size=s.shape).astype(np.uint8))
    out = mlx_moe.dequantize(w, s, mode="mxfp4", dtype=dtype, fp4_decoder=decoder)
    got = mh.replay(out).output(0).astype(np.float32)
    np.testing.assert_array_equal(got, cpu(out.astype(mx.float32)))
    if decoder == "e2m1":  # bit-exact against MLX's own mxfp4 dequantize
        ref = mx.dequantize(w, s, mode="mxfp4", group_size=32, bits=4, dtype=dtype, stream=mx.cpu)
        np.testing.assert_array_equal(got, np.array(ref.astype(mx.float32)))
        if dtype == mx.float32:
            np.testing.assert_array_equal(got, dequant_mxfp4_ref(w, s))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_dequantize_trellis(rng, bits):
    qw = random_trellis(rng, 2, 40, 64, bits, su=bits % 2 == 0, sv=bits % 3 != 0,
                        per_expert_grid=bits == 5)
    out = mlx_moe.dequantize(qw, dtype=mx.float32)
    got = mh.replay(out).output(0)
    np.testing.assert_allclose(got, trellis.dequantize_reference(qw), rtol=4 * 2.0**-24, atol=0)


# ---------------------------------------------------------------------------------------------
# Fused expert MLP: every variant (one kernel body: simd policy with TM = 8, 4, 2, 1; the
# simdgroup_matrix policy for grouped batches), with the combine in the MLP dispatch (Metal
# 3.2) and as its own dispatch (Metal 3.1)
MLP_DISPATCH = ("moe_mlp_float", "moe_mlp_bfloat")  # kernel names of the fused MLP instances


def run_mlp(x, ids, w, experts, dense, dtype, **kw):
    y = mlx_moe.moe_mlp(x, ids, w, experts)
    r = mh.replay(y, **kw)
    got = r.output(0)
    ref = moe_mlp_ref(x.astype(mx.float32), ids, w, *dense)
    assert_close_to(mx.array(got.astype(np.float32)).astype(dtype), ref, dtype)
    return r, got, y


def kernels_used(r):
    return [n for n, _ in r.results]


@pytest.mark.parametrize("device_fence", [True, False], ids=["metal3.2", "metal3.1"])
@pytest.mark.parametrize("T,E,D,F,k,dtype,variant", [
    (1, 16, 256, 96, 4, mx.float32, "float32_tm1"),  # decode
    (5, 8, 128, 160, 2, mx.float32, "float32_tm8"),
    (3, 8, 2048, 64, 2, mx.bfloat16, "bfloat16_tm4"),
    (2, 8, 4096, 64, 2, mx.float16, "float16_tm2"),
    (2, 4, 6144, 32, 2, mx.float32, "float32_tm1"),
    (2, 4, 8192, 32, 2, mx.float32, "float32_mma"),  # one fp32 row is 32 KiB: K is streamed
    (40, 32, 192, 96, 8, mx.bfloat16, "bfloat16_tm8"),
    (64, 8, 128, 96, 2, mx.float32, "float32_mma"),
    (100, 16, 96, 160, 3, mx.bfloat16, "bfloat16_mma"),
    (70, 8, 64, 32, 2, mx.float16, "float16_mma"),
])
def test_moe_mlp_variants(rng, T, E, D, F, k, dtype, variant, device_fence):
    experts, dense = make_experts(rng, E, D, F, bits=(4, 8, 4), group_size=32)
    x = mx.array(rng.standard_normal((T, D)).astype(np.float32)).astype(dtype)
    ids, w = random_routing(rng, T, E, k)
    kw = {} if device_fence else {"device_fence": False, "defines": {"__METAL_VERSION__": 310}}
    r, got, y = run_mlp(x, ids, w, experts, dense, dtype, **kw)
    used = kernels_used(r)
    assert f"moe_mlp_{variant}" in used
    # gate + up + SwiGLU + down + combine: one dispatch after the bucketing (Metal 3.2)
    mlp = [n for n in used if not n.startswith("moe_bucket")]
    assert mlp == ([f"moe_mlp_{variant}"] if device_fence
                   else [f"moe_mlp_{variant}", f"moe_mlp_combine_{variant.split('_')[0]}"])
    # Apple GPUs give a threadgroup 32 KiB (the harness allows more): dynamic threadgroup
    # memory plus the kernel's two 32-word completion lists
    from mlx_moe import _ext
    for c in _ext.metal_record(y, device_fence)["commands"]:
        if c["kernel"].startswith(MLP_DISPATCH):
            assert sum(c["threadgroup_memory"].values()) + 2 * 32 * 4 <= 32768, c["threadgroup_memory"]


@pytest.mark.parametrize("shape", [("qwen3", 128, 8), ("glm47flash", 64, 4)])
@pytest.mark.parametrize("T", [1, 7, 96])
def test_moe_mlp_expert_counts_of_real_models(rng, shape, T):
    """E and k of Qwen3-30B-A3B and GLM-4.7-Flash (small D, F), routed by the router."""
    _, E, k = shape
    D, F = 128, 64
    experts, dense = make_experts(rng, E, D, F, group_size=64)
    x = mx.array(rng.standard_normal((T, D)).astype(np.float32))
    ids, w = mlx_moe.route(random_logits(rng, T, E), k)
    run_mlp(x, ids, w, experts, dense, mx.float32)


@pytest.mark.parametrize("E,k", [(8, 2), (128, 8), (64, 4)], ids=["E8k2", "qwen3", "glm47flash"])
def test_moe_mlp_4096_tokens(rng, E, k):
    T, D, F = 4096, 64, 32
    experts, dense = make_experts(rng, E, D, F, group_size=32)
    x = mx.array(rng.standard_normal((T, D)).astype(np.float32))
    ids, w = random_routing(rng, T, E, k)
    y = mlx_moe.moe_mlp(x, ids, w, experts)
    r = mh.replay(y, count_unique=False)
    got = r.output(0)
    sample = rng.choice(T, 64, replace=False)
    ref = moe_mlp_ref(x[mx.array(sample)], ids[mx.array(sample)], w[mx.array(sample)], *dense)
    assert_close_to(mx.array(got[sample]), ref, mx.float32)


@pytest.mark.parametrize("T", [3, 80])
def test_moe_mlp_mxfp4(rng, T):
    E, D, F, k = 8, 128, 64, 2
    experts, dense = make_experts(rng, E, D, F, fmt="mxfp4")
    x = mx.array(rng.standard_normal((T, D)).astype(np.float32))
    ids, w = random_routing(rng, T, E, k)
    run_mlp(x, ids, w, experts, dense, mx.float32)


@pytest.mark.parametrize("bits", [(6, 2, 3), (8, 5, 7)])
@pytest.mark.parametrize("T", [1, 70])
def test_moe_mlp_trellis_mixed_bits(rng, bits, T):
    E, D, F, k = 8, 128, 64, 2
    experts, dense = trellis_experts(rng, E, D, F, bits)
    x = mx.array(rng.standard_normal((T, D)).astype(np.float32))
    ids, w = random_routing(rng, T, E, k)
    run_mlp(x, ids, w, experts, dense, mx.float32)


@pytest.mark.parametrize("T", [2, 80])
def test_moe_mlp_trellis_widths_16_mod_32(rng, T):
    """Trellis widths need only be multiples of 16: the simd instance decodes 16 codes at a
    time and runs even where the matrix instance (32-code K steps) would be chosen."""
    E, D, F, k = 8, 144, 48, 2
    projs = [random_trellis(rng, E, n, kk, 4, group_size=16) for n, kk in ((F, D), (F, D), (D, F))]
    dense = [lambda e, q=q: trellis.dequantize_reference(q)[e] for q in projs]
    x = mx.array(rng.standard_normal((T, D)).astype(np.float32))
    ids, w = random_routing(rng, T, E, k)
    r, _, _ = run_mlp(x, ids, w, mlx_moe.Experts(*projs), dense, mx.float32)
    assert "moe_mlp_float32_tm8" in kernels_used(r)


def test_moe_mlp_mixed_formats(rng):
    E, D, F, k, T = 8, 128, 64, 2, 5
    g = random_trellis(rng, E, F, D, 6)
    uw, us = random_mxfp4(rng, (E, F, D))
    dw, ds, db = random_affine(rng, (E, D, F), 8, 32)
    experts = mlx_moe.Experts(g, mlx_moe.QuantizedWeight(uw, us, mode="mxfp4", bits=4, group_size=32),
                              mlx_moe.QuantizedWeight(dw, ds, db, bits=8, group_size=32))
    dense = [lambda e: trellis.dequantize_reference(g)[e], lambda e: dequant_mxfp4_ref(uw[e], us[e]),
             lambda e: dequant_affine_ref(dw[e], ds[e], db[e], 32, 8)]
    x = mx.array(rng.standard_normal((T, D)).astype(np.float32))
    ids, w = random_routing(rng, T, E, k)
    run_mlp(x, ids, w, experts, dense, mx.float32)


@pytest.mark.parametrize("T", [2, 66])
def test_decoders_are_specialised_per_projection_format(rng, T):
    """The host creates the MLP pipelines with each projection's (mode, bits) as function
    constants; the specialised kernels give the same bits as the generic ones."""
    from mlx_moe import _ext
    E, D, F, k = 8, 128, 64, 2
    bits = (6, 2, 3)
    projs = [random_trellis(rng, E, n, kk, b) for (n, kk), b in zip(((F, D), (F, D), (D, F)), bits)]
    projs[1] = mlx_moe.QuantizedWeight(*random_mxfp4(rng, (E, F, D)), mode="mxfp4", bits=4, group_size=32)
    x = mx.array(rng.standard_normal((T, D)).astype(np.float32))
    ids, w = random_routing(rng, T, E, k)
    y = mlx_moe.moe_mlp(x, ids, w, mlx_moe.Experts(*projs))
    rec = _ext.metal_record(y)
    mlp = [c for c in rec["commands"] if c["kernel"].startswith(MLP_DISPATCH)]
    assert mlp and all(c["function_constants"] == [2, 6, 1, 4, 2, 3] for c in mlp)
    a = mh.replay(y).output(0)
    b = mh.replay(y, specialise=False).output(0)
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("T", [4, 90])
def test_moe_mlp_bitwise_reproducible_under_any_schedule(rng, T):
    """Threadgroups and threads in reverse order give the same bits: the combine over slots
    and slices has a fixed order, no float atomics decide it."""
    E, D, F, k = 8, 128, 96, 3
    experts, _ = make_experts(rng, E, D, F, group_size=32)
    x = mx.array(rng.standard_normal((T, D)).astype(np.float32))
    ids, w = random_routing(rng, T, E, k)
    y = mlx_moe.moe_mlp(x, ids, w, experts)
    a = mh.replay(y).output(0)
    b = mh.replay(y, reverse=True).output(0)
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("device_fence", [True, False], ids=["metal3.2", "metal3.1"])
@pytest.mark.parametrize("T", [5, 70])
def test_moe_mlp_out_of_range_ids_contribute_nothing(rng, T, device_fence):
    """A GPU stream cannot raise on data: pairs whose id is outside [0, E) are dropped by the
    bucketing (counted in its dispatch[3]) and add nothing to y, also for a token whose every
    slot is out of range (y = 0 there, not the poisoned scratch)."""
    E, D, F, k = 8, 128, 96, 3
    experts, dense = make_experts(rng, E, D, F, group_size=32)
    x = mx.array(rng.standard_normal((T, D)).astype(np.float32))
    ids, w = random_routing(rng, T, E, k)
    ids = np.array(ids).astype(np.int32)
    ids[0, :] = [E, -1, 1000]          # token 0: nothing valid
    ids[T - 1, 1] = E + 3
    ids[T // 2, 2] = -7
    dropped = (ids < 0) | (ids >= E)
    lazy_ids = mx.array(ids) + 0       # lazy: the eager host-side check does not run
    y = mlx_moe.moe_mlp(x, lazy_ids, w, experts)
    kw = {} if device_fence else {"device_fence": False, "defines": {"__METAL_VERSION__": 310}}
    got = mh.replay(y, **kw).output(0)
    w_ref = np.where(dropped, 0.0, np.array(w))
    ref = moe_mlp_ref(x, np.where(dropped, 0, ids), mx.array(w_ref.astype(np.float32)), *dense)
    assert np.all(got[0] == 0.0)
    assert_close_to(mx.array(got), ref, mx.float32)


@pytest.mark.parametrize("T", [6, 75])
def test_combine_in_kernel_equals_combine_dispatch_bitwise(rng, T):
    """The in-kernel combine (Metal 3.2: the last threadgroup to finish a pair / a token sums,
    in slice / slot order) gives the same bits as the separate combine dispatch (Metal 3.1),
    in either schedule."""
    E, D, F, k = 8, 128, 160, 4
    experts, _ = make_experts(rng, E, D, F, group_size=32)
    x = mx.array(rng.standard_normal((T, D)).astype(np.float32)).astype(mx.bfloat16)
    ids, w = random_routing(rng, T, E, k)
    y = mlx_moe.moe_mlp(x, ids, w, experts)
    a = mh.replay(y, reverse=True).output(0)
    b = mh.replay(y, device_fence=False, defines={"__METAL_VERSION__": 310}).output(0)
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


def test_decode_reads_each_touched_weight_byte_once(rng):
    """Qwen3-30B-A3B layer, 1 token, 4-bit: device bytes read by all the call's dispatches
    (counted once per threadgroup, like a cache line that stays in a threadgroup's L1) within
    1.1x of the 8 touched experts' weights plus the activations."""
    T, E, D, F, k = 1, 128, 2048, 768, 8
    experts, dense = make_experts(rng, E, D, F, group_size=64)
    x = mx.array(rng.standard_normal((T, D)).astype(np.float32)).astype(mx.bfloat16)
    ids, w = mlx_moe.route(random_logits(rng, T, E), k)
    mx.eval(ids, w)
    r, got, y = run_mlp(x, ids, w, experts, dense, mx.bfloat16)
    touched = sum(a.nbytes // E * k for q in (experts.gate, experts.up, experts.down)
                  for a in (q.w, q.scales, q.biases))
    floor = touched + x.nbytes
    total = r.bytes_read("tg_unique_read")
    assert total <= 1.1 * floor, (total, floor)
    # and every byte of the touched experts' weights was read (nothing skipped)
    fused = dict(r.results)["moe_mlp_bfloat16_tm1"]  # the decode instance
    weight_slots = range(5, 14)
    assert sum(fused.counters[s].unique_read for s in weight_slots) == touched

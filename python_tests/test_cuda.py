"""The CUDA path against the CPU path, op by op, on the same inputs (skipped without MLX's
CUDA backend). The full CPU suite also runs on the GPU with MLX_MOE_TEST_DEVICE=gpu.

Agreement expected: route ids identical (weights within fp32 rounding of the softmax sum);
bucket bitwise; dequantize bitwise (trellis too: both evaluate common/trellis.h's fp32
product in the same order); moe_mlp within the fp32-accumulation tolerance of the
CPU suite (different summation orders; the large-batch path multiplies on tensor cores
with exact codes and split activations), except the grouped path for bf16/fp16 activations
(affine 4/8-bit, mxfp4, trellis), which rounds weights, H and the per-slot outputs
to the activation type, and trellis on the tensor-core decode kernels (codebook levels
rounded to bf16): both are checked against a float64 reference with a derived error bound
(below)."""

import numpy as np
import pytest

import mlx.core as mx
import mlx_moe
from reference import (misaligned_view, misaligned_weight, poison_cache, random_affine, random_logits,
                       random_mxfp4, random_routing, to_np)
from test_trellis_ops import random_trellis

pytestmark = pytest.mark.skipif(not mx.cuda.is_available(), reason="needs MLX's CUDA backend")


@pytest.fixture
def rng(request):
    return np.random.default_rng(abs(hash(request.node.nodeid)) % (2**32))


def both(fn):
    """fn(stream) evaluated on the CPU and on the GPU, as NumPy."""
    out = []
    for s in (mx.cpu, mx.gpu):
        r = fn(s)
        r = r if isinstance(r, (list, tuple)) else [r]
        mx.eval(*r)
        out.append([to_np(a) for a in r])
    return out


@pytest.mark.parametrize("T,E,k", [(1, 128, 8), (16, 128, 8), (4096, 128, 8), (33, 8, 2), (5, 300, 7)])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_route_gpu_vs_cpu(rng, T, E, k, dtype):
    logits = random_logits(rng, T, E, dtype)
    (ic, wc), (ig, wg) = both(lambda s: mlx_moe.route(logits, k, True, stream=s))
    assert np.array_equal(ic, ig)
    np.testing.assert_allclose(wg, wc, rtol=2e-6, atol=1e-8)


def test_route_edge_rows_gpu():
    inf = float("inf")
    logits = mx.array([[0.1, float("nan"), 0.3, 0.2], [-inf] * 4, [0.0, inf, 1.0, inf],
                       [1.0, -inf, 2.0, 0.0], [3.0, 3.0, 3.0, 1.0]])
    (ic, wc), (ig, wg) = both(lambda s: mlx_moe.route(logits, 2, stream=s))
    assert np.array_equal(ic, ig)
    assert np.array_equal(np.isnan(wc), np.isnan(wg))
    np.testing.assert_allclose(wg[~np.isnan(wg)], wc[~np.isnan(wc)], rtol=1e-6)


@pytest.mark.parametrize("E,k", [(128, 8), (256, 32), (8, 1), (64, 4), (37, 5)])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("normalize", [True, False])
def test_route_block_kernel_bitwise_equals_warp_kernel(rng, monkeypatch, E, k, dtype, normalize):
    """Few rows route with one block per row (top-k by ranks in shared memory), many rows with
    one warp per row (k rounds of a warp arg-max): the same picks in the same order and the
    same float operations, so bitwise the same ids and weights, ties (logits rounded to a
    coarse grid) and NaN / infinite rows included."""
    T = 40
    logits = np.round(rng.standard_normal((T, E)) * 2) / 2  # many ties
    logits[3, 1] = np.nan
    logits[4, :] = -np.inf
    logits[5, :2] = np.inf
    logits[6, 0] = -np.inf
    logits = mx.array(logits.astype(np.float32)).astype(dtype)

    def run(rows_max):
        monkeypatch.setenv("MLX_MOE_CUDA_ROUTE_BLOCK_MAX_ROWS", str(rows_max))
        ids, w = mlx_moe.route(logits, k, normalize, stream=mx.gpu)
        mx.eval(ids, w)
        return np.array(ids), np.array(w)

    (ib, wb), (iw, ww) = run(256), run(0)
    assert np.array_equal(ib, iw)
    assert np.array_equal(wb, ww, equal_nan=True)
    ic, wc = mlx_moe.route(logits, k, normalize, stream=mx.cpu)
    assert np.array_equal(ib, np.array(ic))


# (130 and 300 tokens: the one-block kernel with chunks of 2 and 3 steps of 32 pairs per warp,
# 17 and 25 of the 32 warps holding pairs)
@pytest.mark.parametrize("T,E,k,tile", [(1, 128, 8, 32), (4096, 128, 8, 64), (37, 64, 4, 16), (3, 5, 2, 1),
                                        (130, 64, 8, 16), (300, 128, 8, 64)])
@pytest.mark.parametrize("id_dtype", [np.uint32, np.int32, np.int64])
def test_bucket_gpu_vs_cpu(rng, T, E, k, tile, id_dtype):
    ids = mx.array(rng.integers(0, E, size=(T, k)).astype(id_dtype))
    cpu, gpu = both(lambda s: mlx_moe.bucket(ids, E, tile=tile, stream=s))
    for a, b in zip(cpu, gpu):
        assert np.array_equal(a, b)


def test_bucket_gpu_drops_out_of_range_ids():
    ids = mx.array([[1, 9], [2, 1]], dtype=mx.uint32) + 0  # lazy: checked by the kernel
    counts, offsets, pairs, dispatch = mlx_moe.bucket(ids, 8, stream=mx.gpu)
    assert np.array(counts).sum() == 3 and np.array(dispatch).tolist()[3] == 1
    assert np.array(pairs)[:3].tolist() == [0, 3, 2]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_dequantize_affine_gpu_vs_cpu(rng, bits, dtype):
    w, s, b = random_affine(rng, (3, 40, 256), bits, 64, scale_dtype=mx.bfloat16)
    cpu, gpu = both(lambda st: mlx_moe.dequantize(w, s, b, group_size=64, bits=bits, dtype=dtype,
                                                  stream=st))
    np.testing.assert_array_equal(cpu[0], gpu[0])


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_dequantize_mxfp4_gpu_vs_cpu(rng, dtype):
    w, s = random_mxfp4(rng, (4, 24, 256))
    s = mx.array(rng.integers(0, 256, size=s.shape).astype(np.uint8))
    cpu, gpu = both(lambda st: mlx_moe.dequantize(w, s, mode="mxfp4", dtype=dtype, stream=st))
    nan = np.isnan(cpu[0])
    assert np.array_equal(nan, np.isnan(gpu[0]))
    np.testing.assert_array_equal(cpu[0][~nan], gpu[0][~nan])


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_dequantize_trellis_gpu_vs_cpu(rng, bits, dtype):
    # Odd bits get a per-expert codebook and bfloat16 scales, even bits a shared codebook,
    # no su and float16 scales; N = 40 is not a multiple of the 16-wide tiles.
    qw = random_trellis(rng, 3, 40, 256, bits, group_size=64, su=bits % 2 == 1, sv=bits != 4,
                        per_expert_grid=bits % 2 == 1,
                        scale_dtype=mx.bfloat16 if bits % 2 else mx.float16)
    cpu, gpu = both(lambda st: mlx_moe.dequantize(qw, dtype=dtype, stream=st))
    np.testing.assert_array_equal(cpu[0], gpu[0])


def assert_mlp_gpu_close_to_cpu(x, ids, w, experts, dtype):
    """moe_mlp on the GPU against the CPU path: fp32 accumulation in both, different
    summation orders (4e-5 of the output scale), plus one final rounding for bf16 outputs
    (when the two fp32 sums straddle a rounding boundary the results differ by one bf16 ulp
    of the larger of the two, at most 2^-7 of its magnitude)."""
    (yc,), (yg,) = both(lambda s: mlx_moe.moe_mlp(x, ids, w, experts, stream=s))
    yc64, yg64 = yc.astype(np.float64), yg.astype(np.float64)
    scale = np.abs(yc64).max() + 1e-30
    rel = {mx.float32: 4e-5, mx.bfloat16: 2 ** -7}[dtype]
    err = np.abs(yg64 - yc64)
    mag = np.maximum(np.abs(yc64), np.abs(yg64))
    assert np.all(err <= rel * mag + 4e-5 * scale + 1e-7), f"max err {err.max():.3g} of {scale:.3g}"


def experts_for(rng, E, D, F, fmt, bits, gs, sdt):
    projs = []
    for shape, b in zip(((E, F, D), (E, F, D), (E, D, F)), bits):
        if fmt == "trellis":
            projs.append(random_trellis(rng, *shape, b, group_size=gs, scale_dtype=sdt))
        elif fmt == "affine":
            w, s, bi = random_affine(rng, shape, b, gs, sdt)
            projs.append(mlx_moe.QuantizedWeight(w, s, bi, mode="affine", bits=b, group_size=gs))
        else:
            w, s = random_mxfp4(rng, shape)
            projs.append(mlx_moe.QuantizedWeight(w, s, mode="mxfp4", bits=4, group_size=32))
    return mlx_moe.Experts(*projs)


@pytest.mark.parametrize(
    "T,E,D,F,k,fmt,bits,gs",
    [
        (1, 128, 2048, 768, 8, "affine", (4, 4, 4), 64),     # decode path, Qwen3 shape
        (16, 128, 2048, 768, 8, "affine", (4, 4, 4), 64),    # decode path, 128 pairs
        (64, 128, 2048, 768, 8, "affine", (4, 4, 4), 64),    # grouped (tensor-core) path
        (300, 8, 256, 96, 3, "affine", (3, 6, 5), 32),
        (9, 8, 128, 64, 3, "affine", (4, 8, 2), 64),
        (200, 8, 128, 128, 2, "affine", (8, 2, 4), 128),
        (3, 16, 256, 128, 4, "mxfp4", (4, 4, 4), 32),
        (100, 16, 256, 128, 4, "mxfp4", (4, 4, 4), 32),
    ],
)
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_moe_mlp_gpu_vs_cpu(rng, T, E, D, F, k, fmt, bits, gs, dtype):
    experts = experts_for(rng, E, D, F, fmt, bits, gs, mx.float16)
    x = mx.array(rng.standard_normal((T, D)).astype(np.float32)).astype(dtype)
    ids, w = mlx_moe.route(random_logits(rng, T, E), k, stream=mx.cpu)
    assert_mlp_gpu_close_to_cpu(x, ids, w, experts, dtype)


@pytest.mark.parametrize(
    "T,E,D,F,k,bits",
    [
        (1, 32, 2048, 768, 8, (4, 3, 2)),    # Qwen3 widths, decode
        (16, 32, 2048, 768, 8, (2, 4, 3)),   # 128 pairs
        (64, 16, 256, 128, 4, (6, 2, 3)),    # 256 pairs
        (37, 8, 128, 64, 2, (8, 5, 7)),
    ],
)
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_moe_mlp_trellis_gpu_vs_cpu(rng, monkeypatch, T, E, D, F, k, bits, dtype):
    # The fp32 decode kernels (the grouped kernels and the tensor-core decode kernels, which
    # round the weights, are kept off here and checked below against float64). Bits differ
    # per projection; up has no sv; same tolerance as the affine case above (the GPU decodes
    # the same fp32 weight values as the CPU and differs in summation order only).
    monkeypatch.setenv("MLX_MOE_CUDA_TR_GG_MIN_PAIRS", str(1 << 30))
    monkeypatch.setenv("MLX_MOE_CUDA_TR_MMA_MAX_PAIRS", "0")
    projs = [random_trellis(rng, E, n, kk, b, group_size=64, su=True, sv=(i != 1))
             for i, ((n, kk), b) in enumerate(zip(((F, D), (F, D), (D, F)), bits))]
    experts = mlx_moe.Experts(*projs)
    x = mx.array(rng.standard_normal((T, D)).astype(np.float32)).astype(dtype)
    ids, w = mlx_moe.route(random_logits(rng, T, E), k, stream=mx.cpu)
    assert_mlp_gpu_close_to_cpu(x, ids, w, experts, dtype)


def test_moe_mlp_trellis_with_affine_down_gpu_vs_cpu(rng):
    E, D, F, k, T = 8, 256, 128, 2, 200  # 400 pairs: the affine-only case would be grouped
    g = random_trellis(rng, E, F, D, 3, group_size=32)
    u = random_trellis(rng, E, F, D, 5, group_size=32, per_expert_grid=True)
    dw, ds, db = random_affine(rng, (E, D, F), 4, 32)
    experts = mlx_moe.Experts(g, u, mlx_moe.QuantizedWeight(dw, ds, db, bits=4, group_size=32))
    x = mx.array(rng.standard_normal((T, D)).astype(np.float32))
    ids, w = random_routing(rng, T, E, k)
    (yc,), (yg,) = both(lambda s: mlx_moe.moe_mlp(x, ids, w, experts, stream=s))
    scale = np.abs(yc).max()
    np.testing.assert_allclose(yg, yc, rtol=4e-5, atol=4e-5 * scale)


def test_moe_mlp_gpu_deterministic_and_drops_bad_ids(rng):
    experts = experts_for(rng, 16, 128, 64, "affine", (4, 4, 4), 64, mx.float16)
    for T in (5, 300):
        x = mx.array(rng.standard_normal((T, 128)).astype(np.float32))
        ids, w = random_routing(rng, T, 16, 4)
        a = np.array(mlx_moe.moe_mlp(x, ids, w, experts, stream=mx.gpu))
        for _ in range(3):
            assert np.array_equal(a, np.array(mlx_moe.moe_mlp(x, ids, w, experts, stream=mx.gpu)))
    # A lazily out-of-range id contributes nothing (the kernel cannot raise on the GPU).
    x = mx.array(rng.standard_normal((2, 128)).astype(np.float32))
    good = mx.array([[1, 2], [3, 4]], dtype=mx.uint32)
    bad = mx.array([[1, 99], [3, 4]], dtype=mx.uint32) + 0
    w = mx.array([[0.5, 0.5], [0.5, 0.5]])
    w1 = mx.array([[0.5, 0.0], [0.5, 0.5]])
    y_bad = np.array(mlx_moe.moe_mlp(x, bad, w, experts, stream=mx.gpu))
    y_ref = np.array(mlx_moe.moe_mlp(x, good, w1, experts, stream=mx.gpu))
    np.testing.assert_allclose(y_bad, y_ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "T,E,D,F,k,gs",
    [
        (3, 16, 224, 96, 4, 32),    # direct (12 pairs); odd unit counts; D not a multiple of 32 rows
        (40, 4, 224, 96, 2, 32),    # bucketed, ~20 tokens per expert: several token chunks
        (16, 32, 256, 128, 8, 64),  # bucketed, 128 pairs
    ],
)
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_moe_mlp_tensor_core_decode_gpu_vs_cpu(rng, T, E, D, F, k, gs, dtype):
    # Affine 4-bit projections at few pairs take the tensor-core decode kernels.
    experts = experts_for(rng, E, D, F, "affine", (4, 4, 4), gs, mx.bfloat16)
    x = mx.array(rng.standard_normal((T, D)).astype(np.float32)).astype(dtype)
    ids, w = mlx_moe.route(random_logits(rng, T, E), k, stream=mx.cpu)
    if dtype == mx.float16:
        (yc,), (yg,) = both(lambda s: mlx_moe.moe_mlp(x, ids, w, experts, stream=s))
        scale = np.abs(yc).max()
        np.testing.assert_allclose(yg.astype(np.float64), yc.astype(np.float64), rtol=2**-10, atol=2e-4 * scale)
    else:
        assert_mlp_gpu_close_to_cpu(x, ids, w, experts, dtype)


@pytest.mark.parametrize("fmt,bits", [("affine", (4, 4, 4)), ("affine", (4, 8, 4)), ("mxfp4", (4, 4, 4)),
                                      ("trellis", (4, 3, 2))])
@pytest.mark.parametrize("T", [1, 3, 9])
def test_moe_mlp_decode_variants_bitwise(rng, monkeypatch, fmt, bits, T):
    """Direct (no bucketing) and bucketed decode, fused and separate combine, one-block and
    three-kernel bucketing, the kernels as a chain of programmatic dependents or not
    (MLX_MOE_CUDA_PDL; with the three-kernel bucketing outside the chain): the same per-token
    arithmetic, so bitwise the same outputs."""
    experts = experts_for(rng, 16, 256, 128, fmt, bits, 64 if fmt == "affine" else 32, mx.float16)
    x = mx.array(rng.standard_normal((T, 256)).astype(np.float32)).astype(mx.bfloat16)
    ids, w = mlx_moe.route(random_logits(rng, T, 16), 4, stream=mx.cpu)

    def run(**env):
        for key in ("DIRECT_MAX_PAIRS", "FUSED_COMBINE", "BUCKET_ONE_BLOCK_MAX", "ONE_MAX_PAIRS", "PDL",
                    "MM_BULK", "DN_MT", "MM_RAW8"):
            monkeypatch.delenv("MLX_MOE_CUDA_" + key, raising=False)
        for key, v in env.items():
            monkeypatch.setenv("MLX_MOE_CUDA_" + key, str(v))
        return np.array(mlx_moe.moe_mlp(x, ids, w, experts, stream=mx.gpu).astype(mx.float32))

    ref = run(DIRECT_MAX_PAIRS=0, FUSED_COMBINE=0, BUCKET_ONE_BLOCK_MAX=0, ONE_MAX_PAIRS=0, PDL=0,
              MM_BULK=0, DN_MT=2, MM_RAW8=0)
    for env in (dict(), dict(ONE_MAX_PAIRS=0), dict(ONE_MAX_PAIRS=0, PDL=0),
                dict(ONE_MAX_PAIRS=0, DIRECT_MAX_PAIRS=0),
                dict(ONE_MAX_PAIRS=0, DIRECT_MAX_PAIRS=64), dict(ONE_MAX_PAIRS=0, FUSED_COMBINE=64),
                dict(ONE_MAX_PAIRS=0, DIRECT_MAX_PAIRS=0, FUSED_COMBINE=64),
                dict(ONE_MAX_PAIRS=0, DIRECT_MAX_PAIRS=64, FUSED_COMBINE=0), dict(ONE_MAX_PAIRS=64),
                dict(ONE_MAX_PAIRS=0, DIRECT_MAX_PAIRS=0, BUCKET_ONE_BLOCK_MAX=0),
                dict(ONE_MAX_PAIRS=0, MM_BULK=1), dict(ONE_MAX_PAIRS=0, DN_MT=4),
                dict(ONE_MAX_PAIRS=0, DIRECT_MAX_PAIRS=0, MM_BULK=1, DN_MT=4),
                dict(ONE_MAX_PAIRS=0, MM_RAW8=0)):
        assert np.array_equal(run(**env), ref), env


@pytest.mark.parametrize("fmt,D", [("affine", 224), ("mxfp4", 224), ("mxfp4", 256)])
@pytest.mark.parametrize("T", [1, 3, 40])  # 4 / 12 pairs: direct; 160: bucketed, several chunks
def test_decode_row_tiles_and_bulk_copies_bitwise(rng, monkeypatch, fmt, D, T):
    """The tensor-core decode kernels' down blocks of 32 or 64 rows (MLX_MOE_CUDA_DN_MT; D =
    224: the last 64-row block is half past the end), their weight rows copied whole by bulk
    copies or in per-warp cp.async slices (MLX_MOE_CUDA_MM_BULK) and mxfp4's scales copied as
    raw E8M0 bytes, with no activation unit sums, or loaded and converted (MLX_MOE_CUDA_MM_RAW8;
    raw where a row's scale groups are a multiple of 4: gate/up at D = 256, down at F = 128)
    compute the same sums in the same order: bitwise the same outputs, whatever the default
    picks. The form of the earlier sessions (32 rows, cp.async, converted scales) is checked
    against the CPU path."""
    E, F, k = 16, 128, 4  # (D = 224, affine: 7 scale groups per gate/up row, 4 per down row)
    experts = experts_for(rng, E, D, F, fmt, (4, 4, 4), 32, mx.bfloat16)
    ids, w = mlx_moe.route(random_logits(rng, T, E), k, stream=mx.cpu)
    old = dict(MM_BULK=0, DN_MT=2, MM_RAW8=0)
    for dtype in (mx.bfloat16, mx.float16, mx.float32):
        x = mx.array(rng.standard_normal((T, D)).astype(np.float32)).astype(dtype)
        gpu = lambda: mlx_moe.moe_mlp(x, ids, w, experts, stream=mx.gpu)
        run = lambda **env: _run_env(monkeypatch, gpu, **env)

        ref = run(**old)
        if dtype != mx.float16:  # the previous form against the CPU path
            with monkeypatch.context() as m:
                for key, v in old.items():
                    m.setenv("MLX_MOE_CUDA_" + key, str(v))
                assert_mlp_gpu_close_to_cpu(x, ids, w, experts, dtype)
        assert np.isfinite(ref).all()
        for env in (dict(), dict(MM_BULK=1), dict(DN_MT=4), dict(MM_BULK=1, DN_MT=4),
                    dict(MM_BULK=0, DN_MT=4), dict(MM_BULK=1, DN_MT=2), dict(MM_RAW8=0),
                    dict(MM_BULK=1, MM_RAW8=0), dict(MM_BULK=1, DN_MT=4, MM_RAW8=1)):
            assert np.array_equal(run(**env), ref), (dtype, env)


@pytest.mark.parametrize("T", [3, 20])  # 6 pairs: direct; 40: bucketed
def test_mxfp4_raw_scales_outside_split_k_area(rng, monkeypatch, T):
    """mxfp4 down rows of 132 scale groups (F = 4224): their raw E8M0 bytes do not fit the
    down block's split-K area (mm_layout), and take a region of their own; bitwise the
    loaded-scale form (MLX_MOE_CUDA_MM_RAW8=0), which is checked against the CPU. (64-row down
    blocks do not fit the shared memory at this width: DN_MT=4 keeps 32.)"""
    E, D, F, k = 4, 256, 4224, 2
    experts = experts_for(rng, E, D, F, "mxfp4", (4, 4, 4), 32, mx.bfloat16)
    ids, w = mlx_moe.route(random_logits(rng, T, E), k, stream=mx.cpu)
    x = mx.array(rng.standard_normal((T, D)).astype(np.float32)).astype(mx.bfloat16)
    gpu = lambda: mlx_moe.moe_mlp(x, ids, w, experts, stream=mx.gpu)
    ref = _run_env(monkeypatch, gpu, MM_RAW8=0)
    with monkeypatch.context() as m:
        m.setenv("MLX_MOE_CUDA_MM_RAW8", "0")
        assert_mlp_gpu_close_to_cpu(x, ids, w, experts, mx.bfloat16)
    assert np.isfinite(ref).all()
    for env in (dict(), dict(DN_MT=4)):
        assert np.array_equal(_run_env(monkeypatch, gpu, **env), ref), env


@pytest.mark.parametrize("T", [64, 300])
def test_moe_mlp_tensor_core_decode_many_pairs_gpu_vs_cpu(rng, monkeypatch, T):
    # The tensor-core decode kernel above its default pair count (chunks of 8 tokens per
    # expert block, weights read once per block).
    monkeypatch.setenv("MLX_MOE_CUDA_MMA_MAX_PAIRS", "100000")
    experts = experts_for(rng, 16, 256, 128, "affine", (4, 4, 4), 64, mx.float16)
    for dtype in (mx.float32, mx.bfloat16):
        x = mx.array(rng.standard_normal((T, 256)).astype(np.float32)).astype(dtype)
        ids, w = mlx_moe.route(random_logits(rng, T, 16), 4, stream=mx.cpu)
        assert_mlp_gpu_close_to_cpu(x, ids, w, experts, dtype)


# Trellis layers with bf16 / fp16 activations, up to MLX_MOE_CUDA_TR_MMA_MAX_PAIRS (768) pairs:
# the tensor-core decode kernels in their trellis form. Codebook levels enter the MMA as bf16
# (fp16 activations: bf16 hi + lo, ~16 bits, with the activations split likewise), su
# multiplies the bf16 activation operand (exact for the sign vectors used here and written
# by quantize), scale * sv is applied in fp32 to each run's (or pair of runs') products, and
# H and the per-slot outputs stay fp32: so each weight is rounded at most once to the
# activation type, the grouped path's error model, and _gg_check's float64 bound (below)
# applies as it is. Cases: Qwen3 widths at 1 token (direct) and 16 (bucketed), every bit
# width, gate / up / down of different widths, su / sv absent, per-expert and fp16 codebooks,
# bf16 / fp32 scales, group sizes 16 (one scale per run), 48 (three runs, not a power of two)
# to 128, widths with an odd number of units.
@pytest.mark.parametrize(
    "T,E,D,F,k,bits,gs,sdt,tr",
    [
        (1, 128, 2048, 768, 8, (4, 4, 4), 128, mx.float16, None),
        (16, 128, 2048, 768, 8, (4, 4, 4), 64, mx.float16, None),
        (64, 16, 256, 96, 4, (2, 3, 5), 32, mx.bfloat16,
         [(True, False, False, mx.float32), (False, True, True, mx.float32),
          (False, False, False, mx.float16)]),
        (9, 8, 192, 96, 3, (6, 7, 8), 48, mx.float32,
         [(False, True, False, mx.float32), (True, True, False, mx.float16),
          (True, False, True, mx.float32)]),
        (33, 16, 160, 224, 2, (8, 5, 4), 16, mx.float16, None),
    ],
)
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_moe_mlp_trellis_tensor_core_decode(rng, T, E, D, F, k, bits, gs, sdt, tr, dtype):
    _gg_check(rng, T, E, D, F, k, "trellis", bits, gs, dtype, sdt, tr=tr)


# ------------------------------------------------------------------ grouped tensor-core path
# Large batches with bf16 / fp16 activations and affine 4/8-bit, mxfp4 or trellis weights take
# mlp_gg_kernel (kernels/moe_cuda_grouped.cuh; on sm_90 mlp_wg_kernel): weights dequantized to
# the activation type (s*q+b, trellis's fp32 value, rounded once), fp32 accumulation, the hidden layer H and the per-slot down outputs
# stored in the activation type. Checked against an independent float64 NumPy reference with
# a first-order worst-case error bound derived from those roundings (u = unit roundoff of the
# activation type: 2^-8 bf16, 2^-11 fp16):
#   gate/up dot products: |dg| <= sum_k |x_k| e_k + 2^-22 sum |x||w|, e = u*|w| (one rounding of
#     the dequantized weight; with scales not representable in the activation type also
#     u*(q|s| + |b|)), the 2^-22 term for fp32 accumulation;
#   h = silu(g)*up: |dh| <= |silu'(g) up| dg + |silu(g)| du + dg du + 0.25 dg^2 |up| + u|h|;
#   per slot: |dys| <= sum |h~| e + sum |w| dh (+ fp32 accumulation), then the routing weight
#     and one rounding of Yp: w_j dys + u |w_j ys|; output: sum over slots + u |y|.
# The test allows 1.25x that bound (second-order terms); no scale-relative slack. Also
# norm-wise: ||err|| <= 4u ||y|| (see _gg_check).

def _codes(words, bits, K):
    w = np.asarray(words).astype(np.uint32)
    per = 32 // bits
    sh = (np.arange(per, dtype=np.uint32) * bits).astype(np.uint32)
    return ((w[..., None] >> sh) & np.uint32((1 << bits) - 1)).reshape(*w.shape[:-1], K)


def _tr_indices(w, bits, N, K):
    """Codebook indices [N, K] of one expert's trellis tiles w [K/16, ceil(N/16), 32*bits]
    (docs/FORMATS.md: element (k, n) is number (n % 16) * 16 + k % 16 of its tile, bits LSB
    first)."""
    TK, TN = w.shape[:2]
    b = np.unpackbits(np.asarray(w), axis=-1, bitorder="little").reshape(TK, TN, 256, bits)
    idx = (b.astype(np.int64) << np.arange(bits)).sum(-1).reshape(TK, TN, 16, 16)  # [kt, nt, n, k]
    return idx.transpose(1, 2, 0, 3).reshape(TN * 16, TK * 16)[:N, :K]


def _gg_projection(rng, shape, fmt, bits, gs, sdt, tr=None, e_range=None):
    E, N, K = shape
    if fmt == "trellis":
        su, sv, pe, gdt = tr
        q = random_trellis(rng, E, N, K, bits, group_size=gs, su=su, sv=sv, per_expert_grid=pe,
                           scale_dtype=sdt, grid_dtype=gdt)
        f64 = lambda a: None if a is None else to_np(a).astype(np.float64)
        raw = ("trellis", bits, gs, np.array(q.w), f64(q.scales), (f64(q.grid), f64(q.su), f64(q.sv)))
        return q, raw
    if fmt == "affine":
        w, s, b = random_affine(rng, shape, bits, gs, sdt)
        q = mlx_moe.QuantizedWeight(w, s, b, mode="affine", bits=bits, group_size=gs)
        raw = ("affine", bits, gs, np.array(w), to_np(s).astype(np.float64), to_np(b).astype(np.float64))
    else:
        w, s = random_mxfp4(rng, shape)
        if e_range is not None:  # E8M0 bytes drawn from [lo, hi)
            s = mx.array(rng.integers(*e_range, size=s.shape).astype(np.uint8))
        q = mlx_moe.QuantizedWeight(w, s, mode="mxfp4", bits=4, group_size=32)
        raw = ("mxfp4", 4, 32, np.array(w), np.array(s).astype(np.float64), None)
    return q, raw


def _gg_dense(raw, e, u, scales_exact):
    """Dense float64 weight of expert e and the bound of its dequantization error."""
    fmt, bits, gs, w, s, b = raw
    if fmt == "trellis":  # value ((grid[idx] * scale) * su) * sv, exact in float64
        grid, su, sv = b
        N, K = s.shape[-1], s.shape[-2] * gs
        idx = _tr_indices(w[e], bits, N, K)
        W = (grid[e] if grid.ndim == 2 else grid)[idx] * np.repeat(s[e].T, gs, axis=-1)
        W = W * (su[e][None, :] if su is not None else 1.0) * (sv[e][:, None] if sv is not None else 1.0)
        return W, u * np.abs(W)  # one rounding to the activation type (the fp32 product: ~2^-22)
    K = w.shape[-1] * 32 // bits
    q = _codes(w[e], bits, K).astype(np.float64)
    if fmt == "affine":
        S = np.repeat(s[e], gs, axis=-1)
        B = np.repeat(b[e], gs, axis=-1)
        W = q * S + B
        err = u * np.abs(W) if scales_exact else u * (np.abs(W) + q * np.abs(S) + np.abs(B))
    else:
        from reference import FP4_E2M1_TABLE
        W = FP4_E2M1_TABLE[q.astype(np.int64)] * np.repeat(np.exp2(s[e] - 127.0), 32, axis=-1)
        err = u * np.abs(W)
    return W, err


def _gg_ref_bound(x, ids, rw, raws, E, u, scales_exact):
    x = to_np(x).astype(np.float64)
    ids = np.array(ids).astype(np.int64)
    rw = to_np(rw).astype(np.float64)
    T, k = ids.shape
    D = x.shape[1]
    y = np.zeros((T, D))
    dy = np.zeros((T, D))
    ft, fe, fw = np.repeat(np.arange(T), k), ids.reshape(-1), rw.reshape(-1)
    acc = 2.0 ** -22
    for e in np.unique(fe):
        if e < 0 or e >= E:
            continue
        sel = fe == e
        toks, wts = ft[sel], fw[sel][:, None]
        (Wg, Eg), (Wu, Eu), (Wd, Ed) = (_gg_dense(r, e, u, scales_exact) for r in raws)
        xe = x[toks]
        ax = np.abs(xe)
        g, up = xe @ Wg.T, xe @ Wu.T
        dg = ax @ Eg.T + acc * (ax @ np.abs(Wg).T)
        du = ax @ Eu.T + acc * (ax @ np.abs(Wu).T)
        sg = 1.0 / (1.0 + np.exp(-g))
        si, dsi = g * sg, sg * (1.0 + g * (1.0 - sg))
        h = si * up
        dh = np.abs(dsi * up) * dg + np.abs(si) * du + dg * du + 0.25 * dg * dg * np.abs(up) + u * np.abs(h)
        ys = h @ Wd.T
        dys = (np.abs(h) + dh) @ Ed.T + dh @ np.abs(Wd).T + acc * (np.abs(h) @ np.abs(Wd).T)
        np.add.at(y, toks, wts * ys)
        np.add.at(dy, toks, np.abs(wts) * dys + u * np.abs(wts * ys))
    return y, dy + u * np.abs(y)


def _counts_routing(rng, counts, k):
    """Routing in which expert e has exactly counts[e] pairs (distinct experts per token: the
    sorted multiset of ids dealt out k-strided, every count <= T), tokens shuffled, positive
    weights."""
    T = sum(counts) // k
    assert T * k == sum(counts) and max(counts) <= T
    flat = np.repeat(np.arange(len(counts)), counts)
    ids = flat.reshape(k, T).T[rng.permutation(T)]
    assert all(len(set(r)) == k for r in ids.tolist())
    w = rng.uniform(0.05, 1.0, size=(T, k))
    return mx.array(ids.astype(np.uint32)), mx.array(w.astype(np.float32))


def _gg_check(rng, T, E, D, F, k, fmt, bits, gs, dtype, sdt=None, bad_ids=False, tr=None,
              counts=None, x_scale=1.0, e_ranges=(None, None, None)):
    # fmt, gs: one for all three projections, or a tuple of three (gate, up, down)
    fmts = fmt if isinstance(fmt, tuple) else (fmt,) * 3
    gss = gs if isinstance(gs, tuple) else (gs,) * 3
    sdt = sdt or (mx.float16 if fmts[0] == "trellis" else dtype)
    u = 2.0 ** -8 if dtype == mx.bfloat16 else 2.0 ** -11
    # trellis: (su, sv, per-expert grid, grid dtype) of each projection
    tr = tr or [(True, True, False, mx.float32)] * 3
    projs, raws = zip(*(_gg_projection(rng, s, f, b, g, sdt, t, er)
                        for s, f, b, g, t, er in zip(((E, F, D), (E, F, D), (E, D, F)), fmts, bits, gss,
                                                     tr, e_ranges)))
    experts = mlx_moe.Experts(*projs)
    if counts is not None:  # (T: from the counts)
        ids, w = _counts_routing(rng, counts, k)
        T = ids.shape[0]
    x = mx.array((rng.standard_normal((T, D)) * x_scale).astype(np.float32)).astype(dtype)
    if counts is None:
        ids, w = mlx_moe.route(random_logits(rng, T, E), k, stream=mx.cpu)
    if bad_ids:  # a lazily out-of-range id contributes nothing
        idn = np.array(ids)
        idn[::7, 1] = E + 5
        ids = mx.array(idn) + 0
    # The output and the scratch buffers poisoned: MLX's buffer cache filled with NaN buffers
    # of the sizes the call allocates (the bf16 output, H and the slots' outputs as the
    # kernels' 4-byte scratch words, the bucketing's arrays), so that a kernel which skips part
    # of its output, or reads a scratch word it did not write (an index, say), shows NaN or
    # faults instead of finding a lucky zero. x and w are evaluated first, so that their own
    # buffers do not take the poisoned ones; the bad-ids cases' ids stay lazy (as above).
    mx.eval(x, w)
    P = ids.size
    sizes = [T * D * 2, P * F * 4, P * D * 4, P * 4, (E + 1) * 4, E * 4, E * 4, 16]
    poison_cache(sizes)
    yg = mlx_moe.moe_mlp(x, ids, w, experts, stream=mx.gpu)
    mx.eval(yg)
    poison_cache(sizes)
    y2 = mlx_moe.moe_mlp(x, ids, w, experts, stream=mx.gpu)
    mx.eval(y2)
    yg, y2 = to_np(yg).astype(np.float64), to_np(y2).astype(np.float64)
    assert np.array_equal(yg, y2)  # deterministic
    # (affine scales not exact in the activation type)
    exact = sdt == dtype or "affine" not in fmts
    return _assert_within_gg_bound(yg, x, ids, w, raws, E, u, exact)


def _assert_within_gg_bound(yg, x, ids, w, raws, E, u, exact):
    """yg (float64) against _gg_ref_bound's float64 reference: element-wise within its
    worst-case bound, norm-wise within 4 u."""
    y, bound = _gg_ref_bound(x, ids, w, raws, E, u, exact)
    err = np.abs(yg - y)
    scale = np.abs(y).max()
    assert np.all(err <= 1.25 * bound + 1e-7 * scale), (
        f"max err {err.max():.3g}, worst err/bound {(err / (bound + 1e-30)).max():.3g}, scale {scale:.3g}")
    # Norm-wise: a NumPy simulation of exactly these roundings gives ||err|| / ||y|| ~ 1.0 u
    # (bf16, affine 4-bit); the worst-case bound above is loose (~10% of max |y| for random
    # weights), so this catches errors that a wrong k order or scale would make.
    assert np.linalg.norm(err) <= 4 * u * np.linalg.norm(y), np.linalg.norm(err) / np.linalg.norm(y) / u
    return err, bound


# Every grouped case runs four times: with the sm_90a kernels (mlp_wg_kernel, wgmma; taken on
# compute capability 9.0 where the scales leave room for its stages) on tiles of 128 pairs
# (2 warpgroups) and of 192 pairs (3 warpgroups, MLX_MOE_CUDA_WG_TM=192; where shared memory
# does not allow it, 128), in its register-sourced form (MLX_MOE_CUDA_WG_RS=1: layers whose
# projections are all affine 4-bit or mxfp4; the others as "wgmma"), and with
# MLX_MOE_CUDA_WGMMA=0 (mlp_gg_kernel, mma.sync). All dequantize to the same values and
# accumulate in fp32, so the same bound holds for all (their fp32 sums differ in order only).
@pytest.fixture(params=["wgmma", "wgmma192", "wgmma_rs", "mma"])
def gg_kernel(request, monkeypatch):
    monkeypatch.setenv("MLX_MOE_CUDA_WGMMA", "0" if request.param == "mma" else "1")
    monkeypatch.setenv("MLX_MOE_CUDA_WG_TM", "192" if request.param == "wgmma192" else "128")
    monkeypatch.setenv("MLX_MOE_CUDA_WG_RS", "1" if request.param == "wgmma_rs" else "0")
    return request.param


# The register-operand kernels' pair limits default to pairs per expert (6 E 8-bit, 10 E
# mxfp4, 12 E affine 4-bit); the cases below on 8 or 16 experts with 20-80 pairs per expert
# exercise their multi-chunk paths, so those tests pin the limits in pairs (the Qwen3 values).
REGW_PAIR_CAPS = {"MLX_MOE_CUDA_REGW_MAX_PAIRS": "1536", "MLX_MOE_CUDA_REGW8_MAX_PAIRS": "768",
                  "MLX_MOE_CUDA_REGW_FP4_MAX_PAIRS": "1280"}


def _setenv_all(monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)


# The shared-memory tensor-core decode kernels' pair limits (MLX_MOE_CUDA_MMA_MAX_PAIRS: affine
# 4-bit / mxfp4 layers the register-operand kernels do not take; MLX_MOE_CUDA_TR_MMA_MAX_PAIRS:
# trellis) default to pairs per expert where the layer has the sm_90a grouped kernels, and to
# 1024 / 768 pairs elsewhere. The cases in this file were written against the absolute values,
# and many run few experts with many pairs each to exercise the decode kernels' multi-chunk
# paths, so every test pins them unless it sets its own;
# test_moe_mlp_decode_pair_limits_default checks the defaults.
DECODE_PAIR_CAPS = {"MLX_MOE_CUDA_MMA_MAX_PAIRS": "1024", "MLX_MOE_CUDA_TR_MMA_MAX_PAIRS": "768"}


@pytest.fixture(autouse=True)
def _decode_pair_caps(monkeypatch):
    _setenv_all(monkeypatch, DECODE_PAIR_CAPS)


def _sm90():
    """Whether the GPU has compute capability 9.0 (the sm_90a grouped kernels), from
    nvidia-smi; None when that cannot be read."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] == "9.0" if out else None


# The defaults of those limits. With the sm_90a grouped kernels (and scales they take): 5.5 E
# pairs (affine 4-bit / mxfp4) and 5 E (trellis) with bf16 activations, 2.75 E with fp16, and
# never below the decode path's 128 pairs for affine / mxfp4; MLX_MOE_CUDA_WGMMA=0 (the
# mma.sync grouped kernels) or bf16 scales with fp16 activations: 1024 / 768. Each case runs
# just under and just over its limit; the default's output must be bitwise that of the path
# the rule picks, forced by the limits (decode: 100000; grouped: 0, with the decode path's 128
# pairs, MLX_MOE_CUDA_DECODE_MAX_PAIRS, 0 too), and the two paths' outputs
# must differ (the decode kernels keep H in fp32, the grouped ones round it to the activation
# type), so that the comparison tells them apart. Each path has its own tests above and below.
@pytest.mark.parametrize(
    "fmt,sdt,dtype,E,k,T_dec,T_grp",
    [
        ("affine", mx.float32, mx.bfloat16, 32, 4, 44, 45),   # 176 pairs (5.5 E), 180
        ("mxfp4", None, mx.float16, 64, 4, 44, 45),           # 176 pairs (2.75 E), 180
        ("affine", mx.float16, mx.float16, 16, 4, 32, 33),    # 2.75 E = 44 < 128: 128, 132
        ("trellis", mx.float16, mx.bfloat16, 16, 4, 20, 21),  # 80 pairs (5 E), 84
        ("trellis", mx.float16, mx.float16, 16, 4, 11, 12),   # 44 pairs (2.75 E), 48
        ("affine", mx.bfloat16, mx.float16, 16, 4, 40, 41),   # bf16 scales, fp16: 1024 (no grouped)
    ],
)
@pytest.mark.parametrize("wgmma", ["1", "0"])
def test_moe_mlp_decode_pair_limits_default(rng, monkeypatch, fmt, sdt, dtype, E, k, T_dec, T_grp, wgmma):
    sm90 = _sm90()
    if sm90 is None:
        pytest.skip("compute capability not readable (nvidia-smi)")
    for name in DECODE_PAIR_CAPS:
        monkeypatch.delenv(name)
    monkeypatch.setenv("MLX_MOE_CUDA_WGMMA", wgmma)
    # (bf16 scales with fp16 activations: no grouped tensor-core kernel; forced past the limit,
    # the older fp32 kernel, whose rounding is not asserted to differ)
    grouped_kernel = not (sdt is not None and sdt == mx.bfloat16 and dtype == mx.float16)
    per_expert = sm90 and wgmma == "1" and grouped_kernel
    D, F = 256, 128
    experts = experts_for(rng, E, D, F, fmt, (4, 4, 4), 64 if fmt != "mxfp4" else 32, sdt)
    lim = "TR_MMA_MAX_PAIRS" if fmt == "trellis" else "MMA_MAX_PAIRS"
    for T, over in ((T_dec, False), (T_grp, True)):
        x = mx.array(rng.standard_normal((T, D)).astype(np.float32)).astype(dtype)
        ids, w = mlx_moe.route(random_logits(rng, T, E), k, stream=mx.cpu)
        mx.eval(x, ids, w)
        run = lambda: mlx_moe.moe_mlp(x, ids, w, experts, stream=mx.gpu)
        y_dec = _run_env(monkeypatch, run, **{lim: 100000})
        y_grp = _run_env(monkeypatch, run, **{lim: 0, "DECODE_MAX_PAIRS": 0})
        poison_cache([x.nbytes, k * T * F * 4, k * T * D * 4])
        y = _run_env(monkeypatch, run)
        assert np.isfinite(y_dec).all() and np.isfinite(y_grp).all()
        if grouped_kernel:
            assert not np.array_equal(y_dec, y_grp)
        assert np.array_equal(y, y_grp if (over and per_expert) else y_dec), (T, k * T, per_expert)


# The register-operand decode kernels (kernels/moe_cuda_regw.cuh): bucketed decode path
# (3 tokens .. 1536 pairs), bf16 activations, affine 4-bit projections with bf16 scales and biases,
# widths multiples of 256 up to 2048. Exact codes and fp32 scaling, H rounded to bf16, the
# per-slot outputs in fp32: a subset of the roundings _gg_check's float64 bound covers (which
# also rounds the weights and Yp), so the same bound and norm-wise check apply. Each case also
# runs with MLX_MOE_CUDA_REGW=0 (the shared-memory kernels, fp32 H), which must pass it too.
@pytest.mark.parametrize(
    "T,E,D,F,k,gs",
    [
        (5, 16, 2048, 768, 8, 64),     # 40 pairs, Qwen3 widths
        (16, 128, 2048, 768, 8, 64),   # Qwen3 layer, 16 tokens
        (40, 8, 512, 256, 4, 32),      # ~20 tokens per expert: three chunks of 8
        (12, 64, 2048, 1536, 4, 128),  # GLM-4.7-Flash widths, 48 pairs
        (100, 16, 256, 512, 6, 64),    # 600 pairs, one warp per block
        (160, 16, 256, 512, 8, 64),    # 1280 pairs: decode for these layers only (REGW_MAX_PAIRS)
    ],
)
@pytest.mark.parametrize("regw", ["1", "0"])
def test_moe_mlp_regw_decode(rng, monkeypatch, T, E, D, F, k, gs, regw):
    monkeypatch.setenv("MLX_MOE_CUDA_REGW", regw)
    _setenv_all(monkeypatch, REGW_PAIR_CAPS)
    _gg_check(rng, T, E, D, F, k, "affine", (4, 4, 4), gs, mx.bfloat16, sdt=mx.bfloat16)


# 8-bit projections (group size 32 / 64) in the same kernels: each code's nibbles as two 4-bit
# codes of a row twice as long against the activations staged as (x, 16 x) pairs (exact), so
# the same products in fp32 and the same bound; bucketed at 1 token too. Mixed widths (4-bit
# gate/up with 8-bit down and the reverse) take one kernel of each.
@pytest.mark.parametrize(
    "T,E,D,F,k,gs,bits",
    [
        (1, 128, 2048, 768, 8, 64, (8, 8, 8)),     # Qwen3 8-bit layer, 1 token
        (16, 128, 2048, 768, 8, 64, (8, 8, 8)),    # 16 tokens
        (12, 64, 2048, 1536, 4, 32, (8, 8, 8)),    # GLM-4.7-Flash widths, group size 32
        (40, 8, 512, 256, 4, 64, (8, 8, 8)),       # chunks of 8 tokens
        (100, 16, 256, 512, 6, 32, (8, 8, 8)),     # two warps per gate/up block
        (6, 16, 512, 512, 8, 64, (4, 4, 8)),
        (6, 16, 512, 512, 8, 64, (8, 8, 4)),
    ],
)
@pytest.mark.parametrize("regw", ["1", "0"])
def test_moe_mlp_regw_decode_8bit(rng, monkeypatch, T, E, D, F, k, gs, bits, regw):
    monkeypatch.setenv("MLX_MOE_CUDA_REGW", regw)
    _setenv_all(monkeypatch, REGW_PAIR_CAPS)
    _gg_check(rng, T, E, D, F, k, "affine", bits, gs, mx.bfloat16, sdt=mx.bfloat16)


# The bucketed kernels' streaming form (STREAM in kernels/moe_cuda_regw.cuh: blocks of W
# tiles of 16 rows with KS warps each, every warp streaming its K / 256 / KS chunks of the
# weights through two units of registers; by default up to 8 E pairs,
# MLX_MOE_CUDA_REGW_STREAM_MAX_PAIRS), in shapes MLX_MOE_CUDA_REGW_{GU,DN}_{W,KS} select ("gu
# W x KS / dn W x KS"; "on": the default shapes at any pair count, gate/up 4 x 2 (mxfp4 8 x 1
# from E pairs up) and down plain; a shape that does not divide a layer's N or K leaves that
# projection on the plain form), and the plain form. The products are the plain form's,
# summed in another order (per warp over its chunks, then over the KS warps), so
# _gg_check's bound holds for every shape. Down at K = 768 streams 3 chunks (an odd count:
# the second unit's last reload skipped), gate/up at K = 2048 with W = 8 all 8 on one warp;
# 40 tokens on 8 experts take three passes of 8 columns (the units reloaded per pass).
_ON = {"MLX_MOE_CUDA_REGW_STREAM_MAX_PAIRS": "1536"}
REGW_STREAM_SHAPES = {
    "plain": {"MLX_MOE_CUDA_REGW_STREAM_MAX_PAIRS": "0"},
    "on": _ON,
    "1x8/8x1": {**_ON, "MLX_MOE_CUDA_REGW_GU_W": "1", "MLX_MOE_CUDA_REGW_GU_KS": "8",
                "MLX_MOE_CUDA_REGW_DN_W": "8", "MLX_MOE_CUDA_REGW_DN_KS": "1"},
    "8x1/2x3": {**_ON, "MLX_MOE_CUDA_REGW_GU_W": "8", "MLX_MOE_CUDA_REGW_GU_KS": "1",
                "MLX_MOE_CUDA_REGW_DN_W": "2", "MLX_MOE_CUDA_REGW_DN_KS": "3"},
    "2x4/4x2": {**_ON, "MLX_MOE_CUDA_REGW_GU_W": "2", "MLX_MOE_CUDA_REGW_GU_KS": "4",
                "MLX_MOE_CUDA_REGW_DN_W": "4", "MLX_MOE_CUDA_REGW_DN_KS": "2"},
}


# (T, E, D, F, k, format, bits, group size) of the streaming and ring forms' cases
REGW_FORM_CASES = [
    (16, 128, 2048, 768, 8, "affine", (4, 4, 4), 64),    # Qwen3 layer, 16 tokens
    (12, 64, 2048, 1536, 4, "affine", (4, 4, 4), 128),   # GLM-4.7-Flash widths
    (40, 8, 512, 256, 4, "affine", (4, 4, 4), 32),       # three passes of 8 columns
    (16, 128, 2048, 768, 8, "mxfp4", (4, 4, 4), 32),     # mxfp4
    (100, 16, 256, 512, 6, "affine", (4, 4, 4), 64),     # gate/up K = 256: one chunk (one warp)
]


@pytest.mark.parametrize(
    "T,E,D,F,k,fmt,bits,gs",
    REGW_FORM_CASES + [(16, 128, 2048, 768, 8, "affine", (8, 8, 8), 64)],  # 8-bit: 16 chunks per gate/up row
)
@pytest.mark.parametrize("shape", list(REGW_STREAM_SHAPES))
def test_moe_mlp_regw_stream(rng, monkeypatch, T, E, D, F, k, fmt, bits, gs, shape):
    _regw_form_check(rng, monkeypatch, REGW_STREAM_SHAPES[shape], T, E, D, F, k, fmt, bits, gs)


def _regw_form_check(rng, monkeypatch, env, T, E, D, F, k, fmt, bits, gs):
    """_gg_check of a bf16 layer (affine with bf16 scales, or mxfp4) under the settings env (and
    the register-operand kernels' pair limits in pairs)."""
    _setenv_all(monkeypatch, {**REGW_PAIR_CAPS, **env})
    _gg_check(rng, T, E, D, F, k, fmt, bits, gs, mx.bfloat16,
              sdt=None if fmt == "mxfp4" else mx.bfloat16)


# Dropped ids in the streaming form: affine 4-bit at Qwen3 widths, and mxfp4 with E8M0
# scales 2^-127 .. 2^-124 on gate / up and activations scaled by 2^110 (the register-operand
# kernels' scale-range case; down streamed at K = 256 with W = 8 in "1x8/8x1").
@pytest.mark.parametrize("case", ["affine", "mxfp4_scale_range"])
@pytest.mark.parametrize("shape", ["on", "1x8/8x1", "8x1/2x3"])
def test_moe_mlp_regw_stream_bad_ids(rng, monkeypatch, case, shape):
    _regw_bad_ids_check(rng, monkeypatch, REGW_STREAM_SHAPES[shape], case)


def _regw_bad_ids_check(rng, monkeypatch, env, case):
    """Dropped ids under the settings env: affine 4-bit at Qwen3 widths, or mxfp4 with E8M0
    scales 2^-127 .. 2^-124 on gate / up and activations scaled by 2^110."""
    _setenv_all(monkeypatch, env)
    if case == "affine":
        _gg_check(rng, 20, 16, 2048, 768, 4, "affine", (4, 4, 4), 64, mx.bfloat16,
                  sdt=mx.bfloat16, bad_ids=True)
    else:
        _gg_check(rng, 12, 16, 512, 256, 8, "mxfp4", (4, 4, 4), 32, mx.bfloat16,
                  x_scale=2.0 ** 110, e_ranges=((0, 4), (0, 4), None), bad_ids=True)


# The persistent ring-fed kernels (kernels/moe_cuda_ring.cuh, MLX_MOE_CUDA_REGW_RING: bit 0
# gate/up, bit 1 down; sm_90): the plain register-operand block's units and products, read from
# a ring of shared-memory stages that a producer warp fills by bulk copies, the warps' partials
# summed in the same order; so _gg_check's bound holds. By default gate/up has two stages (the
# ring wraps at every other item) and down three; "ns2" caps both at two and asks for three
# down blocks per SM (at Qwen3 and GLM-4.7-Flash widths two down stages do not fit there, and
# down takes the host's fallback, the register-operand kernel); "dn1": one down block per SM
# (six stages). 40 tokens on 8
# experts take three passes of 8 columns per item (the activations restaged per pass);
# gate/up at K = 256 has one consumer warp; 8-bit projections are not taken.
_RING = {"MLX_MOE_CUDA_REGW_RING": "3", "MLX_MOE_CUDA_REGW_RING_MAX_PAIRS": "1536"}
RING_SHAPES = {
    "both": _RING,
    "gu": {**_RING, "MLX_MOE_CUDA_REGW_RING": "1"},
    "dn": {**_RING, "MLX_MOE_CUDA_REGW_RING": "2"},
    "ns2": {**_RING, "MLX_MOE_CUDA_RING_NS": "2", "MLX_MOE_CUDA_RING_DN_BPS": "3"},
    "dn1": {**_RING, "MLX_MOE_CUDA_RING_DN_BPS": "1"},
}


@pytest.mark.parametrize(
    "T,E,D,F,k,fmt,bits,gs",
    REGW_FORM_CASES + [(6, 16, 512, 512, 8, "affine", (4, 4, 8), 64)],  # 8-bit down: not taken
)
@pytest.mark.parametrize("shape", list(RING_SHAPES))
def test_moe_mlp_regw_ring(rng, monkeypatch, T, E, D, F, k, fmt, bits, gs, shape):
    _regw_form_check(rng, monkeypatch, RING_SHAPES[shape], T, E, D, F, k, fmt, bits, gs)


@pytest.mark.parametrize("case", ["affine", "mxfp4_scale_range"])
@pytest.mark.parametrize("shape", ["both", "ns2"])
def test_moe_mlp_regw_ring_bad_ids(rng, monkeypatch, case, shape):
    _regw_bad_ids_check(rng, monkeypatch, RING_SHAPES[shape], case)


# The plain down block on 16 rows (MLX_MOE_CUDA_REGW_DN_MT=1: mxfp4's default) or 32 (=2:
# affine's; 8-bit down always 32): each row's products and its warps' partial sums are the
# same, in the same order, so the two outputs are bitwise equal (checked on a second layer of
# the case's shape), within _gg_check's bound, and dropped ids add nothing.
@pytest.mark.parametrize(
    "T,E,D,F,k,fmt,bits,gs",
    REGW_FORM_CASES + [(6, 16, 512, 512, 8, "affine", (4, 4, 8), 64)],  # 8-bit down: 32 rows
)
def test_moe_mlp_regw_dn_rows(rng, monkeypatch, T, E, D, F, k, fmt, bits, gs):
    _regw_form_check(rng, monkeypatch, {"MLX_MOE_CUDA_REGW_DN_MT": "1"}, T, E, D, F, k, fmt, bits, gs)
    experts = experts_for(rng, E, D, F, fmt, bits, gs, mx.bfloat16)
    x = mx.array(rng.standard_normal((T, D)).astype(np.float32)).astype(mx.bfloat16)
    ids, w = mlx_moe.route(random_logits(rng, T, E), k, stream=mx.cpu)
    mx.eval(x, ids, w)
    gpu = lambda: mlx_moe.moe_mlp(x, ids, w, experts, stream=mx.gpu)
    ref = _run_env(monkeypatch, gpu, REGW_DN_MT=2)
    assert np.isfinite(ref).all()
    assert np.array_equal(_run_env(monkeypatch, gpu, REGW_DN_MT=1), ref)


@pytest.mark.parametrize("case", ["affine", "mxfp4_scale_range"])
@pytest.mark.parametrize("rows", ["1", "2"])
def test_moe_mlp_regw_dn_rows_bad_ids(rng, monkeypatch, case, rows):
    _regw_bad_ids_check(rng, monkeypatch, {"MLX_MOE_CUDA_REGW_DN_MT": rows}, case)


def test_moe_mlp_regw_decode_bad_ids(rng):
    _gg_check(rng, 20, 16, 2048, 768, 4, "affine", (4, 4, 4), 64, mx.bfloat16, sdt=mx.bfloat16,
              bad_ids=True)


# Their direct form (no bucketing; by default up to 2 tokens, here up to 5): gate/up blocks
# per pair, down blocks per token summing its k slots (k <= 8, k F <= 6144) and writing the
# output. The same roundings (H to bf16; the slots summed in fp32 in slot order, one rounding
# of the output), so the same bound; each case also without the direct form
# (MLX_MOE_CUDA_REGW_DIRECT=0: the bucketed form, or at 1 token the shared-memory direct
# kernels).
@pytest.mark.parametrize(
    "T,E,D,F,k,gs",
    [
        (1, 128, 2048, 768, 8, 64),    # Qwen3 layer, 1 token: 768 threads per down block
        (4, 128, 2048, 768, 8, 64),    # 32 pairs
        (2, 64, 2048, 1536, 4, 128),   # GLM-4.7-Flash widths
        (3, 16, 512, 256, 8, 32),      # one warp per slot
        (5, 16, 256, 512, 6, 64),      # k = 6: two of the MMA's columns unused
    ],
)
@pytest.mark.parametrize("direct", ["1", "0"])
def test_moe_mlp_regw_direct(rng, monkeypatch, T, E, D, F, k, gs, direct):
    monkeypatch.setenv("MLX_MOE_CUDA_REGW_DIRECT", direct)
    monkeypatch.setenv("MLX_MOE_CUDA_REGW_DIRECT_MAX_TOKENS", "5")
    _gg_check(rng, T, E, D, F, k, "affine", (4, 4, 4), gs, mx.bfloat16, sdt=mx.bfloat16)


def test_moe_mlp_regw_direct_bad_ids(rng, monkeypatch):
    """Dropped slots (out-of-range ids; token 0's slot 1): the gate/up block of such a pair
    exits, and the down block stages zeros for its H row and leaves it out of the sum."""
    monkeypatch.setenv("MLX_MOE_CUDA_REGW_DIRECT_MAX_TOKENS", "4")
    _gg_check(rng, 4, 16, 2048, 768, 8, "affine", (4, 4, 4), 64, mx.bfloat16, sdt=mx.bfloat16,
              bad_ids=True)


@pytest.mark.parametrize("T", [1, 2])
def test_moe_mlp_regw_direct_dropped_slot_patterns(rng, T):
    """The direct down block's epilogue sums only the slots that have an expert (a ballot
    taken before its wait), in slot order: token 0's slot 0 (the sum starts at the first kept
    slot) and last slot dropped (an id past E and a negative one), and at 2 tokens token 1's
    every slot dropped, whose output row is exactly zero. Qwen3-30B-A3B widths, the output
    poisoned first; against the float64 reference of the kept slots (_gg_check's bound)."""
    E, D, F, k = 128, 2048, 768, 8
    projs, raws = zip(*(_gg_projection(rng, s, "affine", 4, 64, mx.bfloat16)
                        for s in ((E, F, D), (E, F, D), (E, D, F))))
    experts = mlx_moe.Experts(*projs)
    x = mx.array(rng.standard_normal((T, D)).astype(np.float32)).astype(mx.bfloat16)
    ids, w = mlx_moe.route(random_logits(rng, T, E), k, stream=mx.cpu)
    idn = np.array(ids).astype(np.int64)
    idn[0, 0], idn[0, k - 1] = E + 1, -3
    if T == 2:
        idn[1, :] = E + 7
    ids = mx.array(idn)
    mx.eval(x, ids, w, *[a for p in projs for a in p.arrays()])
    poison_cache([T * D * 2, T * k * F * 2, T * k * 4])
    y = to_np(mlx_moe.moe_mlp(x, ids, w, experts, stream=mx.gpu)).astype(np.float64)
    if T == 2:
        assert np.array_equal(y[1], np.zeros(D))
    assert np.abs(y[0]).max() > 0
    _assert_within_gg_bound(y, x, ids, w, raws, E, 2.0 ** -8, True)


# mxfp4 projections in the same kernels (FP4: E2M1 nibble pairs decoded to exact bf16 values
# of 2 v, each group's products scaled by its E8M0 scale / 2 in fp32; no bias, no group
# sums): bucketed and direct forms, the same roundings, so the same bound. Each case also
# with MLX_MOE_CUDA_REGW=0 (the shared-memory kernels, which decode with the same helper; at
# 1280 pairs the grouped kernels).
@pytest.mark.parametrize(
    "T,E,D,F,k,direct_max",
    [
        (1, 128, 2048, 768, 8, 2),     # Qwen3 layer, 1 token: direct form
        (2, 64, 2048, 1536, 4, 2),     # GLM-4.7-Flash widths, 2 tokens: direct form
        (3, 16, 512, 256, 8, 5),       # direct form, one warp per slot
        (16, 128, 2048, 768, 8, 2),    # Qwen3 layer, 16 tokens: bucketed
        (40, 8, 512, 256, 4, 2),       # chunks of 8 tokens
        (160, 16, 256, 512, 8, 2),     # 1280 pairs, one warp per gate/up block
        (183, 16, 256, 512, 7, 2),     # 1281 pairs: the grouped kernels (REGW_FP4_MAX_PAIRS)
    ],
)
@pytest.mark.parametrize("regw", ["1", "0"])
def test_moe_mlp_regw_mxfp4(rng, monkeypatch, T, E, D, F, k, direct_max, regw):
    monkeypatch.setenv("MLX_MOE_CUDA_REGW", regw)
    _setenv_all(monkeypatch, REGW_PAIR_CAPS)
    monkeypatch.setenv("MLX_MOE_CUDA_REGW_DIRECT_MAX_TOKENS", str(direct_max))
    _gg_check(rng, T, E, D, F, k, "mxfp4", (4, 4, 4), 32, mx.bfloat16)


# Layers mixing the two: mxfp4 gate/up with affine 4-bit down (bf16 scales, group size 64)
# and the reverse. Gate and up share a form; down takes its own kernel (FP4 or affine), in
# the direct (1-2 tokens) and bucketed forms, and at 1281 pairs (a layer with an mxfp4
# projection leaves the register-operand kernels above 1280) the grouped kernels.
@pytest.mark.parametrize("T,E,D,F,k", [(1, 128, 2048, 768, 8), (2, 64, 2048, 1536, 4),
                                       (16, 128, 2048, 768, 8), (183, 16, 256, 512, 7)])
@pytest.mark.parametrize("fmts", [("mxfp4", "mxfp4", "affine"), ("affine", "affine", "mxfp4")])
@pytest.mark.parametrize("regw", ["1", "0"])
def test_moe_mlp_regw_mixed_mxfp4_affine(rng, monkeypatch, T, E, D, F, k, fmts, regw):
    monkeypatch.setenv("MLX_MOE_CUDA_REGW", regw)
    _setenv_all(monkeypatch, REGW_PAIR_CAPS)
    gs = tuple(32 if f == "mxfp4" else 64 for f in fmts)
    _gg_check(rng, T, E, D, F, k, fmts, (4, 4, 4), gs, mx.bfloat16, sdt=mx.bfloat16)


# E8M0 bytes 0..3 (scales 2^-127 .. 2^-124: scale / 2 is an fp32 subnormal for 0 and 1) on
# gate / up, activations scaled by 2^110 so that H and the output stay normal (as in the
# grouped kernels' scale-range case; the unscaled group sums of 2 v x stay far below fp32's
# range), with dropped ids, in the direct (1 token) and bucketed (12) forms.
@pytest.mark.parametrize("T", [1, 12])
def test_moe_mlp_regw_mxfp4_scale_range_bad_ids(rng, T):
    _gg_check(rng, T, 16, 512, 256, 8, "mxfp4", (4, 4, 4), 32, mx.bfloat16, x_scale=2.0 ** 110,
              e_ranges=((0, 4), (0, 4), None), bad_ids=True)


@pytest.mark.parametrize("T", [1, 2, 3, 16])  # 1, 2 tokens: direct; 3, 16: bucketed
def test_regw_router_folded(rng, monkeypatch, T):
    """The register-operand kernels behind a folded-in router (the decode chain's first
    kernel): bitwise the result of route() evaluated first, within _gg_check's float64 bound
    of the routed ids and weights, and norm-wise within 8 u of the shared-memory kernels'
    (MLX_MOE_CUDA_REGW=0; each within 4 u of that reference)."""
    E, D, F, k = 128, 256, 256, 8
    projs, raws = zip(*(_gg_projection(rng, s, "affine", 4, 64, mx.bfloat16)
                        for s in ((E, F, D), (E, F, D), (E, D, F))))
    experts = mlx_moe.Experts(*projs)
    x = mx.array(rng.standard_normal((T, D)).astype(np.float32)).astype(mx.bfloat16)
    logits = random_logits(rng, T, E)
    mx.eval(x, logits, *[a for p in (experts.gate, experts.up, experts.down) for a in p.arrays()])
    with mx.stream(mx.gpu):
        ids, w = mlx_moe.route(logits, k, normalize=True)
        y = mlx_moe.moe_mlp(x, ids, w, experts)
        mx.eval(y)
        ids, w = mlx_moe.route(logits, k, normalize=True)
        mx.eval(ids, w)
        y_sep = mlx_moe.moe_mlp(x, ids, w, experts)
        mx.eval(y_sep)
    monkeypatch.setenv("MLX_MOE_CUDA_REGW", "0")
    y_smem = mlx_moe.moe_mlp(x, ids, w, experts, stream=mx.gpu)
    mx.eval(y_smem)
    assert np.array_equal(to_np(y), to_np(y_sep))
    a, b = to_np(y).astype(np.float64), to_np(y_smem).astype(np.float64)
    _assert_within_gg_bound(a, x, ids, w, raws, E, 2.0 ** -8, True)
    assert np.linalg.norm(a - b) <= 8 * 2.0 ** -8 * np.linalg.norm(b)


@pytest.mark.parametrize("fmt,bits,gs", [("affine", (4, 4, 4), 64), ("mxfp4", (4, 4, 4), 32)])
def test_moe_mlp_grouped_qwen3_4096(rng, gg_kernel, fmt, bits, gs):
    _gg_check(rng, 4096, 128, 2048, 768, 8, fmt, bits, gs, mx.bfloat16)


@pytest.mark.parametrize("D,sdt", [(2048, mx.bfloat16), (2560, mx.bfloat16), (2048, mx.float32)])
def test_moe_mlp_grouped_large_scale_blocks(rng, gg_kernel, D, sdt):
    """Group 32, where the gate/up block's scales and biases take the most shared memory:
    D = 2048 with bf16 scales puts the sm_90a kernel exactly at the 227 KB limit (4 raw
    stages), D = 2560 leaves it 3 stages, and fp32 scales do not fit it (mma.sync kernel)."""
    _gg_check(rng, 600, 16, D, 256, 4, "affine", (4, 4, 4), 32, mx.bfloat16, sdt)


@pytest.mark.parametrize(
    "T,E,D,F,k,fmt,bits,gs,sdt",
    [
        (700, 16, 160, 96, 4, "affine", (4, 4, 4), 32, None),   # K = 2.5 / 1.5 steps, N < tile
        (700, 16, 160, 96, 4, "affine", (8, 8, 8), 32, None),
        (700, 16, 192, 96, 4, "affine", (4, 4, 8), 32, None),   # down in another format
        (700, 16, 192, 128, 4, "affine", (8, 8, 4), 64, None),
        (700, 16, 160, 96, 4, "mxfp4", (4, 4, 4), 32, None),
        (700, 16, 160, 96, 4, "affine", (4, 4, 4), 32, mx.float32),  # fp32 scales: rounded
        (700, 16, 160, 128, 4, "affine", (8, 8, 8), 32, mx.float32),
        (700, 16, 160, 96, 4, "affine", (4, 4, 4), 32, "other"),  # the older kernel (fp16 <-> bf16)
        (300, 16, 2048, 320, 4, "affine", (4, 4, 4), 64, None),  # F % 128 != 0, 2048-wide rows
        (1500, 64, 128, 64, 6, "affine", (8, 8, 8), 64, None),
    ],
)
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_moe_mlp_grouped_odd_shapes(rng, gg_kernel, T, E, D, F, k, fmt, bits, gs, sdt, dtype):
    if sdt == "other":
        sdt = mx.float16 if dtype == mx.bfloat16 else mx.bfloat16
    _gg_check(rng, T, E, D, F, k, fmt, bits, gs, dtype, sdt)


# mxfp4 scale bytes at the ends of the activation type's range, where the sm_90a shared-tile
# kernel's tables with the scale folded in (gg_fp4_scaled; tiles of 128 pairs, the "wgmma"
# case) take their fp32 path: bf16 E = 0, 1 (values 2^(E-128) * 2|v|: subnormal, exact in
# bf16) beside E = 2, 3; f16 E = 104 .. 113 (subnormal in f16, exact: multiples of 2^-24)
# beside 114. Gate / up carry them, the activations are scaled so that H and the outputs
# stay normal (2^120 for bf16, 2^9 for f16), down has ordinary scales. The same float64
# reference and bound as every grouped case (the dequantized weights are exact, so the
# bound's weight rounding term only loosens it).
@pytest.mark.parametrize("dtype,e_range,x_scale", [(mx.bfloat16, (0, 4), 2.0 ** 120),
                                                   (mx.float16, (104, 115), 2.0 ** 9)])
def test_moe_mlp_grouped_mxfp4_scale_range(rng, gg_kernel, dtype, e_range, x_scale):
    _gg_check(rng, 700, 16, 160, 96, 4, "mxfp4", (4, 4, 4), 32, dtype, x_scale=x_scale,
              e_ranges=(e_range, e_range, None))


# The tile table's splits (tile_first_row, kernels/moe_cuda.cuh): experts whose pair counts sit
# on and around the tile sizes, so that the balanced split (tiles of 192: 193-256 pairs as
# 128 + the rest, 385-448 as 192 + 128 + the rest) and the plain one (MLX_MOE_CUDA_TILE_SPLIT=0)
# each meet full, short and 64-row tiles on every kernel; an empty and a one-pair expert too.
@pytest.mark.parametrize("split", ["1", "0"])
def test_moe_mlp_grouped_tile_splits(rng, gg_kernel, monkeypatch, split):
    monkeypatch.setenv("MLX_MOE_CUDA_TILE_SPLIT", split)
    counts = [200, 256, 193, 400, 448, 385, 130, 64, 1, 0, 192, 384, 257, 129, 65, 32]
    _gg_check(rng, None, 16, 160, 96, 4, "affine", (4, 4, 4), 32, mx.bfloat16, counts=counts)


@pytest.mark.parametrize("fmt", ["affine", "mxfp4", "trellis"])
def test_moe_mlp_grouped_bad_ids_and_repeat(rng, gg_kernel, fmt):
    _gg_check(rng, 700, 16, 160, 96, 4, fmt, (4, 4, 4), 32, mx.bfloat16, bad_ids=True)


# Trellis on the grouped path (both kernels, through gg_kernel; a layer whose tables do not
# fit the shared memory takes the fp32 decode kernels, which the same bound covers). The
# cases cover every bit width, gate/up of different widths, su / sv present or
# not, per-expert and fp16 codebooks, bf16 / fp32 scales, group sizes 32-128, K % 64 == 32
# (a half step) and N below one block. Per projection: (su, sv, per-expert codebook, its dtype).
_T = mx.float32


@pytest.mark.parametrize(
    "T,E,D,F,k,bits,gs,sdt,tr",
    [
        (1024, 128, 2048, 768, 8, (4, 4, 4), 128, mx.float16, None),  # Qwen3 widths
        (700, 16, 160, 96, 4, (6, 2, 3), 32, mx.float16,
         [(True, False, False, _T), (False, True, True, _T), (False, False, False, mx.float16)]),
        (700, 16, 192, 128, 4, (5, 7, 8), 64, mx.bfloat16,
         [(False, True, False, _T), (True, True, False, mx.float16), (True, False, True, _T)]),
        (300, 16, 2048, 320, 4, (3, 3, 2), 64, mx.float32, None),
        (1500, 64, 128, 64, 6, (8, 8, 4), 32, mx.float16, None),
    ],
)
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_moe_mlp_grouped_trellis(rng, gg_kernel, T, E, D, F, k, bits, gs, sdt, tr, dtype):
    _gg_check(rng, T, E, D, F, k, "trellis", bits, gs, dtype, sdt, tr=tr)


def test_unevaluated_and_strided_inputs_without_copy_nodes(rng, tmp_path):
    """On a CUDA stream the op builders add no Contiguous node for unevaluated inputs (each
    would cost a node's host work at every evaluation); the eval copies an input only when
    its layout turns out strided (a transposed activation and broadcast routing weights
    here), and the results equal the CPU path's on contiguous copies."""
    experts = experts_for(rng, 8, 64, 32, "affine", (4, 4, 4), 32, mx.float16)
    mx.eval(*[a for p in (experts.gate, experts.up, experts.down) for a in p.arrays()])
    x0 = mx.array(rng.standard_normal((64, 5)).astype(np.float32))
    g = mx.array(rng.standard_normal((64, 8)).astype(np.float32))
    mx.eval(x0, g)
    with mx.stream(mx.gpu):
        xt = mx.transpose(x0 * 1.0)           # unevaluated; strided at evaluation
        logits = mx.matmul(xt, g)             # unevaluated; row-major at evaluation
        ids, w = mlx_moe.route(logits, 2)
        wb = mx.broadcast_to(mx.array([0.6, 0.4]), (5, 2))
        y = mlx_moe.moe_mlp(xt, ids, w, experts)
        y2 = mlx_moe.moe_mlp(xt, ids, wb, experts)
    path = tmp_path / "g.dot"
    mx.export_to_dot(str(path), y, y2)
    labels = [ln.split('label ="')[1].split('"')[0] for ln in path.read_text().splitlines() if 'label ="' in ln]
    assert "Contiguous" not in labels, labels
    xc = np.ascontiguousarray(np.array(x0).T)
    # The GPU's own logits (its matmul may round differently from NumPy's), routed on the CPU.
    ids_c, w_c = mlx_moe.route(mx.array(np.array(logits)), 2, stream=mx.cpu)
    assert np.array_equal(np.array(ids), np.array(ids_c))
    np.testing.assert_allclose(np.array(w), np.array(w_c), rtol=1e-5, atol=1e-7)
    for yy, ww in ((y, w_c), (y2, mx.array(np.broadcast_to([0.6, 0.4], (5, 2)).astype(np.float32)))):
        yc = mlx_moe.moe_mlp(mx.array(xc), ids_c, ww, experts, stream=mx.cpu)
        yc64, yg64 = np.array(yc).astype(np.float64), np.array(yy).astype(np.float64)
        scale = np.abs(yc64).max()
        assert np.abs(yg64 - yc64).max() <= 4e-5 * scale + 1e-6


@pytest.mark.parametrize("T,fmt,dtype", [(1, "affine", mx.bfloat16), (16, "affine", mx.bfloat16),
                                         (16, "mxfp4", mx.float32), (300, "affine", mx.bfloat16),
                                         (300, "affine", mx.float16), (4, "trellis", mx.bfloat16),
                                         (300, "trellis", mx.bfloat16)])
def test_misaligned_inputs(rng, T, fmt, dtype):
    """Row-major inputs whose data is not 16-byte aligned (views into a larger buffer) are
    copied before the kernels' 16-byte loads and copies read them: the result equals the
    aligned inputs' bitwise, on every path (direct, bucketed and grouped decode; trellis)."""
    E, D, F, k = 16, 256, 128, 4
    ex = experts_for(rng, E, D, F, fmt, (4, 4, 4), 64 if fmt != "mxfp4" else 32, mx.bfloat16)
    x = mx.array(rng.standard_normal((T, D)).astype(np.float32)).astype(dtype)
    logits = random_logits(rng, T, E)
    ids, w = mlx_moe.route(logits, k, stream=mx.gpu)
    mx.eval(x, ids, w)
    y = mlx_moe.moe_mlp(x, ids, w, ex, stream=mx.gpu)
    exm = mlx_moe.Experts(*(misaligned_weight(p) for p in (ex.gate, ex.up, ex.down)))
    ym = mlx_moe.moe_mlp(misaligned_view(x), misaligned_view(ids), misaligned_view(w), exm, stream=mx.gpu)
    assert np.array_equal(np.array(y.astype(mx.float32)), np.array(ym.astype(mx.float32)))


@pytest.mark.parametrize("T", [1, 4, 16, 200])  # 8 / 32 pairs: direct; 128 / 1600: bucketed
@pytest.mark.parametrize("ldtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("fmt", ["affine", "trellis"])
def test_router_folded_into_moe_mlp(rng, monkeypatch, tmp_path, T, ldtype, normalize, fmt):
    """On a CUDA stream, moe_mlp over the two outputs of an unevaluated route() routes inside
    its own primitive (no route node in the graph): at 1 token inside its gate/up kernel, from
    4 tokens as the first kernel of the decode chain of programmatic dependents (sm_90; with
    MLX_MOE_CUDA_PDL=0 plain edges). Its result is bitwise that of route() evaluated first and
    moe_mlp over its outputs (the same routing function), with PDL=0, with PDL=0 and
    MLX_MOE_CUDA_ROUTE_IN_GU=0 (a router kernel with plain edges), with ROUTE_IN_GU=0 (at 1
    token too: the chain) and with MLX_MOE_CUDA_FUSED_ROUTE=0 too, and agrees with the CPU
    path (affine; trellis rounds its levels, checked against float64 in
    test_moe_mlp_trellis_tensor_core_decode)."""
    E, D, F, k = 128, 256, 128, 8
    experts = experts_for(rng, E, D, F, fmt, (4, 4, 4), 64, mx.float16)
    x = mx.array(rng.standard_normal((T, D)).astype(np.float32)).astype(mx.bfloat16)
    logits = random_logits(rng, T, E).astype(ldtype)
    mx.eval(x, logits, *[a for p in (experts.gate, experts.up, experts.down) for a in p.arrays()])

    def layer():
        with mx.stream(mx.gpu):
            ids, w = mlx_moe.route(logits, k, normalize=normalize)
            return mlx_moe.moe_mlp(x, ids, w, experts)

    y = layer()
    mx.export_to_dot(str(tmp_path / "g.dot"), y)
    text = (tmp_path / "g.dot").read_text()
    labels = [ln.split('label ="')[1].split('"')[0] for ln in text.splitlines() if 'label ="' in ln]
    assert labels == ["moe_mlp"], labels
    with mx.stream(mx.gpu):
        ids, w = mlx_moe.route(logits, k, normalize=normalize)
        mx.eval(ids, w)  # evaluated: moe_mlp takes them as inputs
        y_sep = mlx_moe.moe_mlp(x, ids, w, experts)
    mx.eval(y, y_sep)
    monkeypatch.setenv("MLX_MOE_CUDA_PDL", "0")
    y_nopdl = layer()
    mx.eval(y_nopdl)
    monkeypatch.setenv("MLX_MOE_CUDA_ROUTE_IN_GU", "0")
    y_nopdl_kernel = layer()
    mx.eval(y_nopdl_kernel)
    monkeypatch.delenv("MLX_MOE_CUDA_PDL")
    y_kernel = layer()
    mx.eval(y_kernel)
    monkeypatch.setenv("MLX_MOE_CUDA_FUSED_ROUTE", "0")
    y_off = layer()
    mx.eval(y, y_sep, y_off)
    assert np.array_equal(to_np(y), to_np(y_sep))
    assert np.array_equal(to_np(y_nopdl), to_np(y_sep))
    assert np.array_equal(to_np(y_nopdl_kernel), to_np(y_sep))
    assert np.array_equal(to_np(y_kernel), to_np(y_sep))
    assert np.array_equal(to_np(y_off), to_np(y_sep))
    if fmt == "affine":
        assert_mlp_gpu_close_to_cpu(x, ids, w, experts, mx.bfloat16)


def _one_launch_case(rng, T, E, D, F, k, fmt, dtype):
    gs = 64 if fmt == "affine" and D % 64 == 0 and F % 64 == 0 else 32
    experts = experts_for(rng, E, D, F, fmt, (4, 4, 4), gs, mx.bfloat16)
    x = mx.array(rng.standard_normal((T, D)).astype(np.float32)).astype(dtype)
    logits = random_logits(rng, T, E)
    mx.eval(x, logits, *[a for p in (experts.gate, experts.up, experts.down) for a in p.arrays()])
    return experts, x, logits


def _run_env(monkeypatch, fn, **env):
    for key, v in env.items():
        monkeypatch.setenv("MLX_MOE_CUDA_" + key, str(v))
    y = fn()
    mx.eval(y)
    for key in env:
        monkeypatch.delenv("MLX_MOE_CUDA_" + key, raising=False)
    return to_np(y)


@pytest.mark.parametrize(
    "T,E,D,F,k,fmt",
    [
        (1, 128, 2048, 768, 8, "affine"),  # Qwen3-30B-A3B decode
        (1, 128, 2048, 768, 8, "mxfp4"),
        (1, 64, 2048, 1536, 4, "affine"),  # GLM-4.7-Flash widths
        (2, 128, 2048, 768, 8, "affine"),  # 16 pairs
        (3, 16, 224, 96, 4, "affine"),     # odd unit counts (K = 224, 96)
        (5, 8, 256, 128, 1, "mxfp4"),
    ],
)
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize("routed", [True, False])
def test_one_launch_bitwise_equals_three_kernels(rng, monkeypatch, tmp_path, T, E, D, F, k, fmt,
                                                 dtype, routed):
    """The one-launch decode kernel (routing, gate/up, down and combine in one kernel) runs
    the same item arithmetic and combine order as the route + gate/up + down (+ combine)
    kernels: bitwise the same outputs, with the router folded in or ids given; and close to
    the CPU path."""
    experts, x, logits = _one_launch_case(rng, T, E, D, F, k, fmt, dtype)
    ids, w = mlx_moe.route(logits, k, normalize=True, stream=mx.gpu)
    mx.eval(ids, w)

    def layer():
        with mx.stream(mx.gpu):
            if routed:
                ii, ww = mlx_moe.route(logits, k, normalize=True)
                return mlx_moe.moe_mlp(x, ii, ww, experts)
            return mlx_moe.moe_mlp(x, ids, w, experts)

    if routed:
        mx.export_to_dot(str(tmp_path / "g.dot"), layer())
        text = (tmp_path / "g.dot").read_text()
        labels = [ln.split('label ="')[1].split('"')[0] for ln in text.splitlines() if 'label ="' in ln]
        assert labels == ["moe_mlp"], labels
    # (the three kernels it mirrors are the shared-memory ones: REGW=0, as mxfp4 and bf16-scale
    # layers otherwise take the register-operand kernels, whose rounding differs)
    y_three = _run_env(monkeypatch, layer, ONE_MAX_PAIRS=0, REGW=0)
    y_one = _run_env(monkeypatch, layer, ONE_MAX_PAIRS=64)
    assert np.array_equal(y_one, y_three)
    if dtype == mx.float16:
        (yc,) = [to_np(mlx_moe.moe_mlp(x, ids, w, experts, stream=mx.cpu))]
        scale = np.abs(yc).max()
        np.testing.assert_allclose(y_one.astype(np.float64), yc.astype(np.float64), rtol=2**-10,
                                   atol=2e-4 * scale)
    else:  # (the GPU side on the kernels y_one equals: fp32 H, as this check assumes)
        monkeypatch.setenv("MLX_MOE_CUDA_REGW", "0")
        assert_mlp_gpu_close_to_cpu(x, ids, w, experts, dtype)


def test_one_launch_repeated_interleaved_and_concurrent(rng, monkeypatch):
    """The one-launch kernel's counters live in a buffer kept across launches (zeroed by the
    last block of each launch): shapes of different pair counts and widths interleaved, run
    repeatedly, and two independent layers evaluated together (their kernels share the
    buffer, so the encoder must order them), all equal the three-kernel path's results."""
    cases = [_one_launch_case(rng, T, E, D, F, k, "affine", mx.bfloat16)
             for (T, E, D, F, k) in ((1, 128, 2048, 768, 8), (2, 16, 256, 128, 1),
                                      (2, 128, 2048, 768, 8), (3, 16, 224, 96, 4))]
    ks = (8, 1, 8, 4)

    def layer(c, kk):
        experts, x, logits = c
        with mx.stream(mx.gpu):
            ii, ww = mlx_moe.route(logits, kk)
            return mlx_moe.moe_mlp(x, ii, ww, experts)

    refs = [_run_env(monkeypatch, lambda c=c, kk=kk: layer(c, kk), ONE_MAX_PAIRS=0)
            for c, kk in zip(cases, ks)]
    for _ in range(3):
        for c, kk, ref in zip(cases, ks, refs):
            assert np.array_equal(to_np(layer(c, kk)), ref)
    ys = [layer(c, kk) for c, kk in zip(cases, ks)]
    mx.eval(*ys)  # independent layers in one graph
    for y, ref in zip(ys, refs):
        assert np.array_equal(to_np(y), ref)
    # A layer fed by the previous one (the decoding chain) in one evaluation.
    experts, x, logits = cases[0]
    with mx.stream(mx.gpu):
        y = x
        for _ in range(4):
            ii, ww = mlx_moe.route(logits, 8)
            y = mlx_moe.moe_mlp(y, ii, ww, experts)
    got = to_np(y)
    monkeypatch.setenv("MLX_MOE_CUDA_ONE_MAX_PAIRS", "0")
    with mx.stream(mx.gpu):
        y = x
        for _ in range(4):
            ii, ww = mlx_moe.route(logits, 8)
            y = mlx_moe.moe_mlp(y, ii, ww, experts)
    assert np.array_equal(got, to_np(y))

"""The CPU primitives against independent references: NumPy float64 written from the
format specs, and MLX's own ops (mx.dequantize, mx.gather_qmm). Fresh random inputs each
run (seeded per test for reproducibility of a failure), outputs poisoned before the run.

Tolerances (why they are right):
* route weights: fp32 softmax vs float64 softmax: a few fp32 ulps, rtol 1e-5.
* dequantize: affine is one fp32 multiply-add per value: rtol 1e-6 against float64;
  FP4 must be bit-identical to mx.dequantize.
* moe_mlp with fp32 activations: operands exact in fp32, fp32 accumulation over K <= 2048
  terms (random-walk error ~ sqrt(K) * 2^-24 of the magnitude): atol 2e-5 * max|y| + 1e-6.
* bf16/fp16 outputs: one final rounding (2^-8 resp. 2^-11 relative) on top of that.
"""

import math

import numpy as np
import pytest

import mlx.core as mx
import mlx_moe
from reference import (
    FP4_E2M1_TABLE,
    dequant_affine_ref,
    dequant_mxfp4_ref,
    moe_mlp_ref,
    poison_cache,
    random_affine,
    random_logits,
    random_mxfp4,
    random_routing,
    softmax64,
    to_np,
)


@pytest.fixture
def rng(request):
    seed = abs(hash(request.node.nodeid)) % (2**32)
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------- route


def check_route(logits, k, normalize, ids, w):
    ids = np.array(ids).astype(np.int64)
    w = np.array(w)
    p = softmax64(logits)
    T, E = p.shape
    assert ids.shape == (T, k) and w.shape == (T, k)
    assert np.all((ids >= 0) & (ids < E))
    for t in range(T):
        assert len(set(ids[t])) == k, "duplicate expert in a row"
    # The chosen experts are a top-k set of the float64 softmax, up to fp32 near-ties.
    chosen = np.take_along_axis(p, ids, -1)
    kth = np.sort(p, -1)[:, ::-1][:, k - 1]
    assert np.all(chosen >= kth[:, None] * (1 - 1e-5))
    # Weights in descending order.
    assert np.all(np.diff(w, axis=-1) <= 0)
    ref = chosen / chosen.sum(-1, keepdims=True) if normalize else chosen
    np.testing.assert_allclose(w, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("T,E,k", [(1, 128, 8), (7, 64, 4), (33, 8, 2), (4096, 128, 8), (5, 3, 3), (2, 1, 1)])
@pytest.mark.parametrize("normalize", [True, False])
def test_route_matches_float64(rng, T, E, k, normalize):
    logits = random_logits(rng, T, E) * 3
    poison_cache([T * k * 4] * 4)
    ids, w = mlx_moe.route(logits, k, normalize)
    mx.eval(ids, w)
    assert ids.dtype == mx.uint32 and w.dtype == mx.float32
    check_route(logits, k, normalize, ids, w)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32])
def test_route_input_dtypes(rng, dtype):
    logits = random_logits(rng, 16, 32, dtype)
    ids, w = mlx_moe.route(logits, 4)
    check_route(logits.astype(mx.float32), 4, True, ids, w)


def test_route_ties_go_to_smaller_id():
    # Rows built with exact ties: equal logits must order by expert id.
    logits = mx.array([[1.0, 3.0, 3.0, 0.5, 3.0, 2.0],
                       [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                       [2.0, 1.0, 2.0, 1.0, 2.0, 1.0]])
    ids, w = mlx_moe.route(logits, 4)
    assert np.array(ids).tolist() == [[1, 2, 4, 5], [0, 1, 2, 3], [0, 2, 4, 1]]
    np.testing.assert_allclose(np.array(w)[1], [0.25] * 4, rtol=1e-6)


def test_route_nan_and_all_neg_inf_rows():
    inf = float("inf")
    logits = mx.array([[0.1, float("nan"), 0.3, 0.2],
                       [-inf, -inf, -inf, -inf],
                       [0.0, inf, 1.0, inf],
                       [1.0, -inf, 2.0, 0.0]])
    ids, w = mlx_moe.route(logits, 2)
    ids, w = np.array(ids), np.array(w)
    # NaN row: ids 0..k-1, NaN weights (documented in docs/DESIGN.md).
    assert ids[0].tolist() == [0, 1] and np.all(np.isnan(w[0]))
    # All -inf: ids 0..k-1, zero weights (the zero sum is guarded, no NaN).
    assert ids[1].tolist() == [0, 1] and np.all(w[1] == 0)
    # +inf entries share the mass equally.
    assert ids[2].tolist() == [1, 3] and np.allclose(w[2], [0.5, 0.5])
    # -inf entries are never picked over finite ones.
    assert ids[3].tolist() == [2, 0]


def test_route_leading_dims_and_noncontiguous(rng):
    base = random_logits(rng, 24, 16).reshape(2, 3, 4, 16)
    logits = mx.transpose(base, (1, 0, 2, 3))  # non-contiguous view
    ids, w = mlx_moe.route(logits, 3)
    assert ids.shape == (3, 2, 4, 3)
    ref_ids, ref_w = mlx_moe.route(mx.array(np.ascontiguousarray(np.array(logits))), 3)
    assert np.array_equal(np.array(ids), np.array(ref_ids))
    check_route(logits.reshape(-1, 16), 3, True, ids.reshape(-1, 3), w.reshape(-1, 3))


# ----------------------------------------------------------------------------- bucket


@pytest.mark.parametrize("T,E,k,tile", [(1, 128, 8, 32), (37, 64, 4, 16), (4096, 128, 8, 64), (3, 5, 2, 1)])
def test_bucket(rng, T, E, k, tile):
    ids = rng.integers(0, E, size=(T, k)).astype(np.int32)
    poison_cache([E * 4, (E + 1) * 4, T * k * 4, 16])
    counts, offsets, pairs, dispatch = mlx_moe.bucket(mx.array(ids), E, tile=tile)
    counts, offsets, pairs, dispatch = map(np.array, (counts, offsets, pairs, dispatch))
    flat = ids.reshape(-1)
    ref_counts = np.bincount(flat, minlength=E)
    assert counts.tolist() == ref_counts.tolist()
    assert offsets.tolist() == [0] + np.cumsum(ref_counts).tolist()
    # Grouped by expert, ascending pair order inside each group: a stable sort by expert.
    assert pairs.tolist() == np.argsort(flat, kind="stable").tolist()
    tiles = int(sum(math.ceil(c / tile) for c in ref_counts))
    assert dispatch.tolist() == [max(1, tiles), 1, 1, 0]


def test_bucket_out_of_range_ids():
    if mx.default_device() == mx.gpu:
        pytest.skip("GPU streams do not raise: the kernels drop out-of-range ids and count "
                    "them in dispatch[3] (test_cuda.py)")
    with pytest.raises(ValueError, match="ids: expert id 9"):
        mlx_moe.bucket(mx.array([[1, 9]]), 8)
    with pytest.raises(ValueError, match="out of range"):
        mlx_moe.bucket(mx.array([[-1, 2]]), 8)
    lazy = mx.array([[1, 9]]) + 0  # not materialised yet: checked by the kernel
    with pytest.raises(RuntimeError, match="ids: expert id 9"):
        mx.eval(mlx_moe.bucket(lazy, 8))


def test_bucket_empty_grid_is_clamped():
    counts, offsets, pairs, dispatch = mlx_moe.bucket(mx.zeros((0, 4), dtype=mx.uint32), 8)
    assert np.array(dispatch).tolist() == [1, 1, 1, 0]
    assert np.array(counts).sum() == 0 and pairs.size == 0


# ----------------------------------------------------------------------------- dequantize


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_dequantize_affine(rng, bits, group_size):
    shape = (3, 40, 256)
    w, s, b = random_affine(rng, shape, bits, group_size, scale_dtype=mx.float32)
    poison_cache([np.prod(shape) * 4])
    ours = mlx_moe.dequantize(w, s, b, group_size=group_size, bits=bits, dtype=mx.float32)
    ref = dequant_affine_ref(w, s, b, group_size, bits)
    np.testing.assert_allclose(np.array(ours), ref, rtol=1e-6, atol=1e-7)
    mlx_ref = mx.dequantize(w, s, b, group_size=group_size, bits=bits)
    np.testing.assert_allclose(np.array(ours), np.array(mlx_ref), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("scale_dtype", [mx.float16, mx.bfloat16, mx.float32])
def test_dequantize_affine_dtypes(rng, scale_dtype):
    w, s, b = random_affine(rng, (64, 128), 4, 64, scale_dtype=scale_dtype)
    ours = mlx_moe.dequantize(w, s, b)  # dtype defaults to the scales' dtype, as MLX
    assert ours.dtype == scale_dtype
    # We compute scale * q + bias in fp32 and round once: within half an ulp of the
    # output dtype of the float64 value.
    half_ulp = {mx.float16: 2.0 ** -11, mx.bfloat16: 2.0 ** -8, mx.float32: 2.0 ** -24}[scale_dtype]
    ref = dequant_affine_ref(w, s, b, 64, 4)
    assert np.all(np.abs(to_np(ours) - ref) <= half_ulp * np.abs(ref) * 1.0001 + 1e-30)
    # MLX computes in the scales' dtype (fp16 arithmetic for fp16 scales): it may differ by
    # an ulp of the terms scale*q and bias, which cancel.
    terms = np.abs(np.repeat(to_np(b), 64, -1)) * 2
    mlx_ref = to_np(mx.dequantize(w, s, b))
    assert np.all(np.abs(to_np(ours) - mlx_ref) <= 4 * half_ulp * terms + 1e-30)


def test_fp4_table_is_the_standard_one():
    # Every one of the 16 codes, as OCP MX / NVIDIA / MLX define E2M1.
    words = mx.array(np.array([[0x76543210, 0xFEDCBA98, 0x01234567, 0x89ABCDEF]], dtype=np.uint32))
    scale = mx.array(np.array([[127]], dtype=np.uint8))  # 2^0
    ours = np.array(mlx_moe.dequantize(words, scale, mode="mxfp4", dtype=mx.float32))[0]
    np.testing.assert_array_equal(ours[:16], FP4_E2M1_TABLE)
    assert np.array_equal(np.signbit(ours[:16]), np.signbit(FP4_E2M1_TABLE))
    ref = np.array(mx.dequantize(words, scale, mode="mxfp4", group_size=32, bits=4, dtype=mx.float32))
    np.testing.assert_array_equal(ours, ref[0])


def test_fp4_quarter_subnormal_is_opt_in_only():
    words = mx.array(np.array([[0x76543210, 0xFEDCBA98, 0, 0]], dtype=np.uint32))
    scale = mx.array(np.array([[127]], dtype=np.uint8))
    default = np.array(mlx_moe.dequantize(words, scale, mode="mxfp4", dtype=mx.float32))[0, :16]
    quarter = np.array(mlx_moe.dequantize(words, scale, mode="mxfp4", dtype=mx.float32,
                                          fp4_decoder="e2m1_quarter_subnormal"))[0, :16]
    assert default[1] == 0.5 and default[9] == -0.5
    expected = FP4_E2M1_TABLE.copy()
    expected[1], expected[9] = 0.25, -0.25
    np.testing.assert_array_equal(quarter, expected)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
def test_dequantize_mxfp4_bit_exact(rng, dtype):
    w, s = random_mxfp4(rng, (4, 24, 256))
    s = mx.array(rng.integers(0, 256, size=s.shape).astype(np.uint8))  # every scale, 0 and 255 too
    poison_cache([4 * 24 * 256 * 4])
    ours = mlx_moe.dequantize(w, s, mode="mxfp4", dtype=dtype)
    # MLX's CPU dequantize is the reference (its CUDA kernel differs at the edge scales 0/255).
    ref = mx.dequantize(w, s, mode="mxfp4", group_size=32, bits=4, dtype=dtype, stream=mx.cpu)
    bits_t = mx.uint16 if dtype != mx.float32 else mx.uint32
    a, b = np.array(ours.view(bits_t)), np.array(ref.view(bits_t))
    nan_a, nan_b = np.isnan(to_np(ours)), np.isnan(to_np(ref))
    assert np.array_equal(nan_a, nan_b)  # NaN payloads may differ; where they sit may not
    assert np.array_equal(a[~nan_a], b[~nan_b])


def test_dequantize_mxfp4_default_dtype_matches_mlx(rng):
    w, s = random_mxfp4(rng, (16, 64))
    ours = mlx_moe.dequantize(w, s, mode="mxfp4")
    ref = mx.dequantize(w, s, mode="mxfp4", group_size=32, bits=4)
    assert ours.dtype == ref.dtype
    np.testing.assert_array_equal(to_np(ours), to_np(ref))
    np.testing.assert_allclose(to_np(mlx_moe.dequantize(w, s, mode="mxfp4", dtype=mx.float32)),
                               dequant_mxfp4_ref(w, s), rtol=0, atol=0)


# ----------------------------------------------------------------------------- moe_mlp


def make_experts(rng, E, D, F, fmt="affine", bits=(4, 4, 4), group_size=64, scale_dtype=mx.float16):
    projs, dense = [], []
    for shape, b in zip(((E, F, D), (E, F, D), (E, D, F)), bits):
        if fmt == "affine":
            w, s, bi = random_affine(rng, shape, b, group_size, scale_dtype)
            projs.append(mlx_moe.QuantizedWeight(w, s, bi, mode="affine", bits=b, group_size=group_size))
            dense.append(lambda e, w=w, s=s, bi=bi, b=b: dequant_affine_ref(w[e], s[e], bi[e], group_size, b))
        else:
            w, s = random_mxfp4(rng, shape)
            projs.append(mlx_moe.QuantizedWeight(w, s, mode="mxfp4", bits=4, group_size=32))
            dense.append(lambda e, w=w, s=s: dequant_mxfp4_ref(w[e], s[e]))
    return mlx_moe.Experts(*projs), dense


def assert_close_to(y, ref, dtype):
    y = to_np(y).astype(np.float64)
    scale = np.abs(ref).max() + 1e-30
    tol = {mx.float32: 2e-5, mx.bfloat16: 2 ** -8 + 2e-5, mx.float16: 2 ** -11 + 2e-5}[dtype]
    err = np.abs(y - ref)
    # Per element: the final rounding is relative to |y|; accumulation error to max|y|.
    bound = tol * np.abs(ref) + 2e-5 * scale + 1e-7
    assert np.all(err <= bound), f"max err {err.max():.3g}, max|ref| {scale:.3g}"


@pytest.mark.parametrize(
    "T,E,D,F,k",
    [(1, 16, 256, 96, 4), (5, 8, 128, 160, 2), (64, 32, 192, 96, 8), (300, 8, 64, 32, 3), (4096, 8, 64, 32, 2)],
)
def test_moe_mlp_matches_float64(rng, T, E, D, F, k):
    experts, dense = make_experts(rng, E, D, F, group_size=32)
    x = mx.array(rng.standard_normal((T, D)).astype(np.float32))
    ids, w = random_routing(rng, T, E, k)
    poison_cache([T * D * 4] * 3)
    y = mlx_moe.moe_mlp(x, ids, w, experts)
    mx.eval(y)
    assert y.shape == (T, D) and y.dtype == mx.float32
    sample = np.arange(T) if T <= 300 else rng.choice(T, 64, replace=False)
    ref = moe_mlp_ref(x[mx.array(sample)], ids[mx.array(sample)], w[mx.array(sample)], *dense)
    assert_close_to(y[mx.array(sample)], ref, mx.float32)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize("bits", [(4, 4, 4), (8, 8, 8), (4, 8, 2), (3, 6, 5)])
def test_moe_mlp_dtypes_and_bits(rng, dtype, bits):
    T, E, D, F, k = 9, 8, 128, 64, 3
    experts, dense = make_experts(rng, E, D, F, bits=bits, group_size=64, scale_dtype=mx.bfloat16)
    x = mx.array(rng.standard_normal((T, D)).astype(np.float32)).astype(dtype)
    ids, w = random_routing(rng, T, E, k)
    y = mlx_moe.moe_mlp(x, ids, w, experts)
    assert y.dtype == dtype
    assert_close_to(y, moe_mlp_ref(x.astype(mx.float32), ids, w, *dense), dtype)


@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("T", [1, 2, 4, 5, 40])
def test_moe_mlp_decode_and_panel_paths(rng, group_size, T):
    # T tokens over 8 experts with top-2: experts get 1..4 tokens (decode path) or more
    # (decoded-panel path); both must agree with the reference.
    E, D, F, k = 8, 256, 128, 2
    experts, dense = make_experts(rng, E, D, F, bits=(4, 8, 4), group_size=group_size)
    x = mx.array(rng.standard_normal((T, D)).astype(np.float32))
    ids, w = random_routing(rng, T, E, k)
    assert_close_to(mlx_moe.moe_mlp(x, ids, w, experts), moe_mlp_ref(x, ids, w, *dense), mx.float32)


def test_moe_mlp_mxfp4(rng):
    T, E, D, F, k = 17, 8, 128, 64, 2
    experts, dense = make_experts(rng, E, D, F, fmt="mxfp4")
    x = mx.array(rng.standard_normal((T, D)).astype(np.float32))
    ids, w = random_routing(rng, T, E, k)
    assert_close_to(mlx_moe.moe_mlp(x, ids, w, experts), moe_mlp_ref(x, ids, w, *dense), mx.float32)


def gather_qmm_switch_glu(x, ids, w, experts):
    """mlx-lm's SwitchGLU computation, spelled with MLX's own mx.gather_qmm."""
    def proj(inp, q):
        kw = dict(transpose=True, group_size=q.group_size, bits=q.bits, mode=q.mode)
        return mx.gather_qmm(inp, q.w, q.scales, q.biases, rhs_indices=ids, **kw)
    xe = mx.expand_dims(x, (-2, -3))
    a, b = proj(xe, experts.gate), proj(xe, experts.up)
    y = proj(mx.sigmoid(a) * a * b, experts.down).squeeze(-2)
    return (y * w[..., None].astype(y.dtype)).sum(-2)


@pytest.mark.parametrize("shape", [("qwen3", 128, 2048, 768, 8), ("glm47flash", 64, 2048, 1536, 4)])
@pytest.mark.parametrize("T", [1, 3, 16])
def test_moe_mlp_matches_gather_qmm_switch_glu(rng, shape, T):
    _, E, D, F, k = shape
    experts, _ = make_experts(rng, E, D, F, group_size=64)
    x = mx.array(rng.standard_normal((T, D)).astype(np.float32))
    ids, w = mlx_moe.route(random_logits(rng, T, E), k)
    ref = to_np(gather_qmm_switch_glu(x, ids, w, experts)).astype(np.float64)
    assert_close_to(mlx_moe.moe_mlp(x, ids, w, experts), ref, mx.float32)


def test_moe_mlp_qwen3_4096_tokens_sampled(rng):
    E, D, F, k, T = 128, 2048, 768, 8, 4096
    experts, dense = make_experts(rng, E, D, F, group_size=64)
    x = mx.array(rng.standard_normal((T, D)).astype(np.float32)).astype(mx.bfloat16)
    ids, w = mlx_moe.route(random_logits(rng, T, E), k)
    y = mlx_moe.moe_mlp(x, ids, w, experts)
    mx.eval(y)
    sample = mx.array(rng.choice(T, 3, replace=False))
    ref = moe_mlp_ref(x[sample].astype(mx.float32), ids[sample], w[sample], *dense)
    assert_close_to(y[sample], ref, mx.bfloat16)


def test_moe_mlp_is_deterministic(rng):
    experts, _ = make_experts(rng, 16, 128, 64)
    x = mx.array(rng.standard_normal((50, 128)).astype(np.float32))
    ids, w = random_routing(rng, 50, 16, 4)
    a = np.array(mlx_moe.moe_mlp(x, ids, w, experts))
    for _ in range(3):
        assert np.array_equal(a, np.array(mlx_moe.moe_mlp(x, ids, w, experts)))


def test_moe_mlp_leading_dims_broadcast_and_noncontiguous(rng):
    E, D, F, k = 8, 64, 32, 2
    experts, dense = make_experts(rng, E, D, F, group_size=32)
    x = mx.array(rng.standard_normal((3, 2, D)).astype(np.float32))
    ids, w = random_routing(rng, 6, E, k)
    ids, w = ids.reshape(3, 2, k), w.reshape(3, 2, k)
    y = mlx_moe.moe_mlp(x, ids, w, experts)
    assert y.shape == (3, 2, D)
    ref = moe_mlp_ref(x.reshape(6, D), ids.reshape(6, k), w.reshape(6, k), *dense)
    assert_close_to(y.reshape(6, D), ref, mx.float32)
    # Transposed views and broadcast weights work (and give the contiguous result).
    xt = mx.transpose(mx.transpose(x, (1, 0, 2)), (1, 0, 2))
    wb = mx.broadcast_to(mx.array([0.7, 0.3]), (3, 2, k))
    y2 = mlx_moe.moe_mlp(xt, ids, wb, experts)
    ref2 = moe_mlp_ref(x.reshape(6, D), ids.reshape(6, k), np.broadcast_to([0.7, 0.3], (6, k)), *dense)
    assert_close_to(y2.reshape(6, D), ref2, mx.float32)


def test_evaluated_noncontiguous_inputs_and_weights(rng):
    """Arrays already evaluated pass to the primitives without a copy node only when their
    layout is row-major: evaluated strided views (logits, x, and a weight's scales) still
    give the result of their contiguous copies."""
    E, D, F, k = 8, 64, 32, 2
    experts, dense = make_experts(rng, E, D, F, group_size=32)
    logits_c = random_logits(rng, 6, E)
    logits_v = mx.swapaxes(mx.array(np.ascontiguousarray(np.swapaxes(np.array(logits_c), 0, 1))), 0, 1)
    x_c = mx.array(rng.standard_normal((6, D)).astype(np.float32))
    x_v = mx.swapaxes(mx.array(np.ascontiguousarray(np.array(x_c).T)), 0, 1)
    g = experts.gate
    s_v = mx.swapaxes(mx.array(np.ascontiguousarray(np.swapaxes(np.array(g.scales), 1, 2))), 1, 2)
    mx.eval(logits_v, x_v, s_v)  # evaluated, with transposed strides
    ids, w = mlx_moe.route(logits_v, k)
    ids_c, w_c = mlx_moe.route(logits_c, k)
    assert np.array_equal(np.array(ids), np.array(ids_c))
    assert np.array_equal(np.array(w), np.array(w_c))
    experts_v = mlx_moe.Experts(
        mlx_moe.QuantizedWeight(g.w, s_v, g.biases, mode="affine", bits=g.bits, group_size=g.group_size),
        experts.up, experts.down)
    y = mlx_moe.moe_mlp(x_v, ids, w, experts_v)
    assert_close_to(y, moe_mlp_ref(x_c, ids_c, w_c, *dense), mx.float32)


def test_layer_graph_has_no_copy_nodes_for_evaluated_weights(rng, tmp_path):
    """route + moe_mlp over evaluated, row-major weights and logits add exactly their two
    primitives to the graph (one on a CUDA stream, where moe_mlp folds the router in): no
    per-call Contiguous node per weight array (each would cost host time at every
    evaluation)."""
    experts, _ = make_experts(rng, 8, 64, 32, group_size=32)
    logits = random_logits(rng, 3, 8)
    x = mx.array(rng.standard_normal((3, 64)).astype(np.float32))
    mx.eval(logits, x, *[a for p in (experts.gate, experts.up, experts.down) for a in p.arrays()])
    ids, w = mlx_moe.route(logits, 2)
    y = mlx_moe.moe_mlp(x, ids, w, experts)
    path = tmp_path / "g.dot"
    mx.export_to_dot(str(path), y)
    labels = [ln.split('label ="')[1].split('"')[0] for ln in path.read_text().splitlines() if 'label ="' in ln]
    cuda = mx.default_device() == mx.gpu and mx.cuda.is_available()
    assert sorted(labels) == (["moe_mlp"] if cuda else ["moe_mlp", "route"]), labels


def test_moe_mlp_empty_batch(rng):
    experts, _ = make_experts(rng, 8, 64, 32, group_size=32)
    y = mlx_moe.moe_mlp(mx.zeros((0, 64)), mx.zeros((0, 2), dtype=mx.uint32), mx.zeros((0, 2)), experts)
    assert y.shape == (0, 64)
    mx.eval(y)


# ----------------------------------------------------------------------------- compile


def test_ops_inside_compile(rng):
    E, D, F, k = 16, 128, 64, 4
    experts, _ = make_experts(rng, E, D, F)

    def layer(x, logits):
        ids, w = mlx_moe.route(logits, k)
        return mlx_moe.moe_mlp(x, ids, w, experts)

    x = mx.array(rng.standard_normal((12, D)).astype(np.float32))
    logits = random_logits(rng, 12, E)
    eager = np.array(layer(x, logits))
    compiled = np.array(mx.compile(layer)(x, logits))
    assert np.array_equal(eager, compiled)

    def buckets(ids):
        return mlx_moe.bucket(ids, E)

    ids = mx.array(rng.integers(0, E, size=(12, k)).astype(np.uint32))
    for a, b in zip(buckets(ids), mx.compile(buckets)(ids)):
        assert np.array_equal(np.array(a), np.array(b))
    wq = experts.gate
    f = mx.compile(lambda w: mlx_moe.dequantize(w, wq.scales, wq.biases, dtype=mx.float32))
    assert np.array_equal(np.array(f(wq.w)), np.array(wq.dequantize(mx.float32)))


def test_inference_only_errors(rng):
    experts, _ = make_experts(rng, 8, 64, 32, group_size=32)
    x = mx.array(rng.standard_normal((2, 64)).astype(np.float32))
    ids, w = random_routing(rng, 2, 8, 2)
    with pytest.raises(ValueError, match="inference-only"):
        mx.grad(lambda x: mlx_moe.moe_mlp(x, ids, w, experts).sum())(x)
    with pytest.raises(ValueError, match="inference-only"):
        mx.grad(lambda l: mlx_moe.route(l, 2)[1].sum())(random_logits(rng, 2, 8))
    with pytest.raises(ValueError, match="inference-only"):
        mx.jvp(lambda x: mlx_moe.moe_mlp(x, ids, w, experts), [x], [x])


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_route():
    with pytest.raises(TypeError, match="logits"):
        mlx_moe.route(mx.array([[1, 2]]), 1)
    with pytest.raises(ValueError, match=r"k must be in \[1, E\] = \[1, 4\], got 5"):
        mlx_moe.route(mx.zeros((2, 4)), 5)
    with pytest.raises(ValueError, match="got 0"):
        mlx_moe.route(mx.zeros((2, 4)), 0)
    with pytest.raises(ValueError, match="scalar"):
        mlx_moe.route(mx.array(1.0), 1)
    with pytest.raises(TypeError, match="logits must be an mx.array"):
        mlx_moe.route(np.zeros((2, 4)), 1)


def test_bad_inputs_bucket():
    with pytest.raises(TypeError, match="ids must be an integer"):
        mlx_moe.bucket(mx.zeros((2, 2)), 4)
    with pytest.raises(ValueError, match="num_experts"):
        mlx_moe.bucket(mx.zeros((2, 2), dtype=mx.uint32), 0)
    with pytest.raises(ValueError, match="tile"):
        mlx_moe.bucket(mx.zeros((2, 2), dtype=mx.uint32), 4, tile=0)


def test_bad_inputs_dequantize(rng):
    w, s, b = random_affine(rng, (8, 128), 4, 64)
    with pytest.raises(ValueError, match="group size mismatch"):
        mlx_moe.dequantize(w, s, b, group_size=32)
    with pytest.raises(ValueError, match="biases has shape"):
        mlx_moe.dequantize(w, s, b[:, :1])
    with pytest.raises(TypeError, match="biases must have the dtype of scales"):
        mlx_moe.dequantize(w, s, b.astype(mx.float32))
    with pytest.raises(TypeError, match="w must be uint32"):
        mlx_moe.dequantize(w.astype(mx.int32), s, b)
    with pytest.raises(ValueError, match="bits must be one of"):
        mlx_moe.dequantize(w, s, b, bits=7)
    with pytest.raises(ValueError, match="affine weights need biases"):
        mlx_moe.dequantize(w, s, None)
    with pytest.raises(TypeError, match="scales must be uint8"):
        mlx_moe.dequantize(w, s, mode="mxfp4")
    with pytest.raises(ValueError, match="group_size must be 32 for mxfp4"):
        mlx_moe.dequantize(w, s.astype(mx.uint8), mode="mxfp4", group_size=64)
    with pytest.raises(TypeError, match="dtype must be"):
        mlx_moe.dequantize(w, s, b, dtype=mx.int32)
    with pytest.raises(ValueError, match="mode must be one of"):
        mlx_moe.dequantize(w, s, b, mode="int4")
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        mlx_moe.dequantize(w[0], s[0], b[0])


def test_bad_inputs_moe_mlp(rng):
    E, D, F = 8, 64, 32
    experts, _ = make_experts(rng, E, D, F, group_size=32)
    x = mx.zeros((4, D))
    ids, w = random_routing(rng, 4, E, 2)
    with pytest.raises(TypeError, match="x must be float16, bfloat16 or float32"):
        mlx_moe.moe_mlp(x.astype(mx.int32), ids, w, experts)
    with pytest.raises(TypeError, match="ids must be an integer"):
        mlx_moe.moe_mlp(x, ids.astype(mx.float32), w, experts)
    with pytest.raises(TypeError, match="weights must be a floating"):
        mlx_moe.moe_mlp(x, ids, ids, experts)
    with pytest.raises(ValueError, match="ids has shape"):
        mlx_moe.moe_mlp(x, ids[:3], w[:3], experts)
    with pytest.raises(ValueError, match="weights has shape"):
        mlx_moe.moe_mlp(x, ids, w[:, :1], experts)
    with pytest.raises(ValueError, match="x has D = 48"):
        mlx_moe.moe_mlp(mx.zeros((4, 48)), ids, w, experts)
    with pytest.raises(ValueError, match="at least one slot"):
        mlx_moe.moe_mlp(x, ids[:, :0], w[:, :0], experts)
    with pytest.raises(ValueError, match="only 8 experts"):
        big = mx.array(np.tile(np.arange(8), (4, 2)).astype(np.uint32)[:, :9])
        mlx_moe.moe_mlp(x, big, mx.ones((4, 9)), experts)
    if mx.default_device() == mx.cpu:  # GPU streams drop out-of-range ids (test_cuda.py)
        with pytest.raises(ValueError, match="ids: expert id 8"):
            mlx_moe.moe_mlp(x, mx.array([[0, 8]] * 4, dtype=mx.uint32), w, experts)
    with pytest.raises(TypeError, match="experts must be an mlx_moe.Experts"):
        mlx_moe.moe_mlp(x, ids, w, [experts.gate, experts.up, experts.down])
    wrong = mlx_moe.Experts(experts.gate, experts.up, experts.gate)
    with pytest.raises(ValueError, match="down must map F"):
        mlx_moe.moe_mlp(x, ids, w, wrong)
    fewer = mlx_moe.Experts(experts.gate, mlx_moe.QuantizedWeight(
        experts.up.w[:4], experts.up.scales[:4], experts.up.biases[:4], group_size=32), experts.down)
    with pytest.raises(ValueError, match="up has 4 experts"):
        mlx_moe.moe_mlp(x, ids, w, fewer)
    with pytest.raises(ValueError, match="stacked over experts"):
        mlx_moe.moe_mlp(x, ids, w, mlx_moe.Experts(
            mlx_moe.QuantizedWeight(experts.gate.w[0], experts.gate.scales[0], experts.gate.biases[0],
                                    group_size=32), experts.up, experts.down))


# ----------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("fmt", ["affine", "mxfp4", "trellis"])
@pytest.mark.parametrize("T", [1, 16, 300])
def test_misaligned_views_same_result(rng, fmt, T):
    """Inputs whose data is not 16-byte aligned (row-major views into a larger buffer) give
    the aligned inputs' results bitwise: route, moe_mlp and dequantize (test_cuda.py has the
    GPU's form, whose kernels need the alignment and copy such inputs first)."""
    from reference import misaligned_view, misaligned_weight
    from test_trellis_ops import random_trellis

    E, D, F, k = 16, 256, 128, 4
    if fmt == "trellis":
        ex = mlx_moe.Experts(*(random_trellis(rng, *shape, 4, group_size=64, scale_dtype=mx.bfloat16)
                               for shape in ((E, F, D), (E, F, D), (E, D, F))))
    else:
        ex, _ = make_experts(rng, E, D, F, fmt, group_size=64, scale_dtype=mx.bfloat16)
    exm = mlx_moe.Experts(*(misaligned_weight(p) for p in (ex.gate, ex.up, ex.down)))
    x = mx.array(rng.standard_normal((T, D)).astype(np.float32)).astype(mx.bfloat16)
    logits = random_logits(rng, T, E)
    ids, w = mlx_moe.route(logits, k)
    idm, wm = mlx_moe.route(misaligned_view(logits), k)
    assert np.array_equal(np.array(ids), np.array(idm)) and np.array_equal(np.array(w), np.array(wm))
    y = mlx_moe.moe_mlp(x, ids, w, ex)
    ym = mlx_moe.moe_mlp(misaligned_view(x), misaligned_view(ids), misaligned_view(w), exm)
    assert np.array_equal(np.array(y.astype(mx.float32)), np.array(ym.astype(mx.float32)))
    d = mlx_moe.dequantize(ex.down, dtype=mx.float32)
    dm = mlx_moe.dequantize(exm.down, dtype=mx.float32)
    assert np.array_equal(np.array(d), np.array(dm))

"""Trellis weights through the C++ primitives (dequantize, moe_mlp) against the float64
reference decoder written from the spec (mlx_moe.formats.trellis.dequantize_reference),
on fresh random packed tiles, codebooks, scales and sign vectors.

Tolerances: the decode is three fp32 multiplies of float16/float32 inputs (relative error
<= 3 * 2^-24); moe_mlp accumulates in fp32 as for the other formats (see test_ops.py)."""

import numpy as np
import pytest

import mlx.core as mx
import mlx_moe
from mlx_moe.formats import trellis
from reference import moe_mlp_ref, poison_cache, random_routing, to_np


@pytest.fixture
def rng(request):
    return np.random.default_rng(abs(hash(request.node.nodeid)) % (2**32))


def random_trellis(rng, E, N, K, bits, group_size=32, su=True, sv=True, per_expert_grid=False,
                   scale_dtype=mx.float16, grid_dtype=mx.float32):
    lead = () if E is None else (E,)
    TK, TN = K // 16, -(-N // 16)
    w = rng.integers(0, 256, size=(*lead, TK, TN, 32 * bits), dtype=np.uint8)
    scales = rng.uniform(0.5, 1.5, size=(*lead, K // group_size, N)) * 0.05
    grid_shape = (*lead, 2**bits) if per_expert_grid else (2**bits,)
    grid = np.sort(rng.standard_normal(grid_shape), axis=-1)
    qw = mlx_moe.QuantizedWeight(
        mx.array(w), mx.array(scales.astype(np.float32)).astype(scale_dtype),
        mode="trellis", bits=bits, group_size=group_size,
        grid=mx.array(grid.astype(np.float32)).astype(grid_dtype),
        su=mx.array(rng.choice([-1.0, 1.0], size=(*lead, K)).astype(np.float32)).astype(mx.float16) if su else None,
        sv=mx.array(rng.uniform(-2, 2, size=(*lead, N)).astype(np.float32)).astype(mx.float16) if sv else None)
    return qw


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("shape", [(3, 40, 64), (None, 16, 128), (2, 7, 32)])
def test_trellis_dequantize_matches_reference(rng, bits, shape):
    E, N, K = shape
    qw = random_trellis(rng, E, N, K, bits, su=bits % 2 == 0, sv=bits % 3 != 0,
                        per_expert_grid=(E is not None and bits == 5))
    poison_cache([N * K * 4 * (E or 1)])
    ours = mlx_moe.dequantize(qw, dtype=mx.float32)
    ref = trellis.dequantize_reference(qw)
    ref = ref if E is not None else ref[0]
    assert ours.shape == ref.shape
    np.testing.assert_allclose(np.array(ours), ref, rtol=4 * 2.0**-24, atol=0)


def test_trellis_quantizer_output_roundtrips_through_dequantize(rng):
    w = rng.standard_normal((4, 48, 256)).astype(np.float32) * 0.02
    qw = trellis.quantize(w, 3, group_size=64, signs=True, progress=False)
    ours = np.array(mlx_moe.dequantize(qw, dtype=mx.float32))
    np.testing.assert_allclose(ours, trellis.dequantize_reference(qw), rtol=4 * 2.0**-24, atol=0)
    # and it is a quantization of w, not garbage (3-bit: MSE well under the variance)
    assert np.mean((ours - w) ** 2) < 0.06 * np.var(w)


def trellis_experts(rng, E, D, F, bits):
    """Gate, up, down in the trellis format with their own bit widths (su everywhere, no sv on
    up), and float64 references of each expert's dense matrices."""
    projs = [random_trellis(rng, E, n, kk, b, su=True, sv=(i != 1))
             for i, ((n, kk), b) in enumerate(zip(((F, D), (F, D), (D, F)), bits))]
    return mlx_moe.Experts(*projs), [lambda e, q=q: trellis.dequantize_reference(q)[e] for q in projs]


@pytest.mark.parametrize("bits", [(6, 2, 3), (4, 4, 4), (8, 5, 7)])
@pytest.mark.parametrize("T", [1, 3, 37])
def test_moe_mlp_trellis_mixed_bits(rng, bits, T):
    E, D, F, k = 8, 128, 64, 2
    experts, dense = trellis_experts(rng, E, D, F, bits)
    x = mx.array(rng.standard_normal((T, D)).astype(np.float32))
    ids, w = random_routing(rng, T, E, k)
    y = mlx_moe.moe_mlp(x, ids, w, experts)
    ref = moe_mlp_ref(x, ids, w, *dense)
    err = np.abs(to_np(y) - ref)
    assert np.all(err <= 2e-5 * np.abs(ref).max() + 2e-5 * np.abs(ref) + 1e-7), err.max()


def test_moe_mlp_trellis_with_affine_down(rng):
    # Formats may differ per projection.
    from reference import random_affine, dequant_affine_ref
    E, D, F, k, T = 8, 128, 64, 2, 5
    g = random_trellis(rng, E, F, D, 6)
    u = random_trellis(rng, E, F, D, 2)
    dw, ds, db = random_affine(rng, (E, D, F), 4, 32)
    down = mlx_moe.QuantizedWeight(dw, ds, db, bits=4, group_size=32)
    experts = mlx_moe.Experts(g, u, down)
    dense = [lambda e: trellis.dequantize_reference(g)[e], lambda e: trellis.dequantize_reference(u)[e],
             lambda e: dequant_affine_ref(dw[e], ds[e], db[e], 32, 4)]
    x = mx.array(rng.standard_normal((T, D)).astype(np.float32))
    ids, w = random_routing(rng, T, E, k)
    ref = moe_mlp_ref(x, ids, w, *dense)
    y = to_np(mlx_moe.moe_mlp(x, ids, w, experts))
    assert np.all(np.abs(y - ref) <= 2e-5 * np.abs(ref).max() + 2e-5 * np.abs(ref) + 1e-7)


def test_trellis_bad_inputs(rng):
    qw = random_trellis(rng, 2, 32, 64, 3)
    with pytest.raises(ValueError, match=r"w has shape .*expected"):
        mlx_moe.dequantize(mlx_moe.QuantizedWeight(qw.w, qw.scales, mode="trellis", bits=4,
                                                   group_size=32, grid=mx.zeros((16,))))
    with pytest.raises(ValueError, match=r"grid has shape"):
        mlx_moe.dequantize(mlx_moe.QuantizedWeight(qw.w, qw.scales, mode="trellis", bits=3,
                                                   group_size=32, grid=mx.zeros((7,))))
    with pytest.raises(ValueError, match=r"bits must be in 2..8"):
        mlx_moe.dequantize(mlx_moe.QuantizedWeight(qw.w, qw.scales, mode="trellis", bits=9,
                                                   group_size=32, grid=qw.grid))
    with pytest.raises(ValueError, match=r"group_size must be a positive multiple of 16"):
        mlx_moe.dequantize(mlx_moe.QuantizedWeight(qw.w, qw.scales, mode="trellis", bits=3,
                                                   group_size=24, grid=qw.grid))
    with pytest.raises(TypeError, match=r"w must be uint8"):
        mlx_moe.dequantize(mlx_moe.QuantizedWeight(qw.w.astype(mx.uint32), qw.scales, mode="trellis",
                                                   bits=3, group_size=32, grid=qw.grid))
    with pytest.raises(ValueError, match=r"su has shape"):
        mlx_moe.dequantize(mlx_moe.QuantizedWeight(qw.w, qw.scales, mode="trellis", bits=3,
                                                   group_size=32, grid=qw.grid, su=mx.ones((2, 65))))
    with pytest.raises(ValueError, match="trellis weights need a codebook grid"):
        mlx_moe.dequantize(mlx_moe.QuantizedWeight(qw.w, qw.scales, mode="trellis", bits=3, group_size=32))

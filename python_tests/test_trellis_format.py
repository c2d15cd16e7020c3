"""Trellis k-bit format (docs/FORMATS.md, "Trellis k-bit"): packing, the float64 reference
decoder, the quantizer's error against the Lloyd-Max optimum, input validation, and the
shared header kernels/common/trellis.h (built with g++ into a small ctypes library)."""

import ctypes
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import mlx.core as mx

from mlx_moe.formats import trellis as T

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng()  # fresh data every run; the seed is printed on failure
SEED = int(RNG.integers(1 << 31))
rng = np.random.default_rng(SEED)

ALL_BITS = list(range(2, 9))
SHAPES = [(1, 1), (16, 16), (17, 5), (5, 33), (48, 64), (31, 47)]  # (N, K)


def rand_idx(shape, bits):
    return rng.integers(0, 1 << bits, size=shape, dtype=np.uint8)


def rand_tw(E, N, K, bits, gs, su=True, sv=True, grid_per_expert=False, real_signs=False):
    """Random valid trellis arrays (NumPy) with exact small values."""
    L = 1 << bits
    idx = rand_idx((E, N, K), bits)
    grid = rng.standard_normal((E, L) if grid_per_expert else (L,)).astype(np.float32)
    scales = rng.uniform(0.01, 2.0, size=(E, K // gs, N)).astype(np.float16)

    def signs(n):
        if real_signs:
            return rng.uniform(-2, 2, size=(E, n)).astype(np.float32)
        return rng.choice(np.array([-1.0, 1.0], np.float16), size=(E, n))

    return SimpleNamespace(w=T.pack(idx, bits), scales=scales, grid=grid,
                           su=signs(K) if su else None, sv=signs(N) if sv else None,
                           bits=bits, group_size=gs), idx


def loop_index(w, e, k, n, K, N, bits):
    """Index of element (k, n) of expert e, bit by bit, straight from the spec's words."""
    TK, TN = (K + 15) // 16, (N + 15) // 16
    tile = (e * TK + k // 16) * TN + n // 16
    p = (n % 16) * 16 + (k % 16)
    flat = w.reshape(-1)
    v = 0
    for j in range(bits):
        bit = tile * 32 * bits * 8 + p * bits + j
        v |= ((int(flat[bit // 8]) >> (bit % 8)) & 1) << j
    return v


def loop_dequant(tw):
    E = tw.w.shape[0]
    G, N = tw.scales.shape[-2:]
    K = G * tw.group_size
    out = np.zeros((E, N, K))
    for e in range(E):
        for n in range(N):
            for k in range(K):
                q = loop_index(tw.w, e, k, n, K, N, tw.bits)
                g = tw.grid[q] if tw.grid.ndim == 1 else tw.grid[e, q]
                v = float(g) * float(tw.scales[e, k // tw.group_size, n])
                if tw.su is not None:
                    v *= float(tw.su[e, k])
                if tw.sv is not None:
                    v *= float(tw.sv[e, n])
                out[e, n, k] = v
    return out


# ---------------------------------------------------------------------------------------
# packing
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_pack_unpack_round_trip(bits, shape):
    N, K = shape
    idx = rand_idx((3, N, K), bits)
    p = T.pack(idx, bits)
    assert p.dtype == np.uint8
    assert p.shape == T.packed_shape(N, K, bits, experts=3) == (3, -(-K // 16), -(-N // 16), 32 * bits)
    np.testing.assert_array_equal(T.unpack(p, bits, K, N), idx)
    # one matrix, no leading axis; MLX input
    np.testing.assert_array_equal(T.pack(mx.array(idx[1]), bits), p[1])
    np.testing.assert_array_equal(T.unpack(p[1], bits, K, N), idx[1])


@pytest.mark.parametrize("bits", ALL_BITS)
def test_pack_bit_positions(bits):
    """Single set indices land exactly where the spec says (LSB first, p = n*16 + k)."""
    N, K = 40, 48  # TK = 3, TN = 3
    for (k, n) in [(0, 0), (1, 0), (0, 1), (15, 15), (16, 0), (0, 16), (47, 39), (21, 33)]:
        idx = np.zeros((N, K), np.uint8)
        q = (1 << bits) - 1 - (k % 3)  # a non-trivial pattern
        idx[n, k] = q
        flat = T.pack(idx, bits).reshape(-1)
        tile = (k // 16) * 3 + n // 16
        start = tile * 32 * bits * 8 + ((n % 16) * 16 + k % 16) * bits
        bits_le = np.unpackbits(flat, bitorder="little")
        expect = np.zeros_like(bits_le)
        expect[start:start + bits] = (q >> np.arange(bits)) & 1
        np.testing.assert_array_equal(bits_le, expect, err_msg=f"k={k} n={n}")


def test_pack_padding_is_zero():
    idx = np.full((5, 7), 3, np.uint8)
    p = T.pack(idx, 2)
    full = T.unpack(p, 2, 16, 16)
    assert full[:5, :7].min() == 3 and full[5:].max() == 0 and full[:, 7:].max() == 0


# ---------------------------------------------------------------------------------------
# reference decoder
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("variant", ["signs", "nosigns", "su_only", "grid_per_expert", "real"])
def test_reference_matches_loop(bits, variant):
    E, N, K, gs = 2, 19, 32, 16
    tw, _ = rand_tw(E, N, K, bits, gs, su=variant != "nosigns",
                    sv=variant not in ("nosigns", "su_only"),
                    grid_per_expert=variant == "grid_per_expert", real_signs=variant == "real")
    ref = T.dequantize_reference(tw)
    assert ref.dtype == np.float64 and ref.shape == (E, N, K)
    np.testing.assert_allclose(ref, loop_dequant(tw), rtol=1e-15, atol=0)


def test_reference_single_matrix_and_mlx_arrays():
    tw, _ = rand_tw(1, 24, 64, 3, 32)
    one = SimpleNamespace(w=mx.array(tw.w[0]), scales=mx.array(tw.scales[0]).astype(mx.bfloat16),
                          grid=mx.array(tw.grid), su=mx.array(tw.su[0]), sv=mx.array(tw.sv[0]),
                          bits=3, group_size=32)
    s_bf = np.array(mx.array(tw.scales[0]).astype(mx.bfloat16).astype(mx.float32))
    tw.scales = s_bf[None]
    np.testing.assert_array_equal(T.dequantize_reference(one), loop_dequant(tw))


# ---------------------------------------------------------------------------------------
# codebook and quantizer
# ---------------------------------------------------------------------------------------
LLOYD_MAX_KNOWN = {2: 0.1175, 3: 0.03455, 4: 0.009501}  # Max (1960)


def test_lloyd_max_gaussian_known_values():
    for bits, d in LLOYD_MAX_KNOWN.items():
        c, mse = T.lloyd_max_gaussian(bits)
        assert abs(mse - d) < 2e-4 * max(1, d * 100), (bits, mse)
        np.testing.assert_allclose(c, -c[::-1], atol=1e-12)
    for bits in ALL_BITS:
        c, mse = T.lloyd_max_gaussian(bits)
        assert np.all(np.diff(c) > 0)
        # fixed point of the Lloyd map and close to the Panter-Dite asymptote 2.72 * 4^-bits
        mu, _ = T._lloyd_map(c)
        np.testing.assert_allclose(mu, c, atol=1e-10)
        if bits >= 5:
            assert 0.9 < mse / (np.sqrt(3) * np.pi / 2 * 4.0 ** -bits) <= 1.0


@pytest.mark.parametrize("bits", ALL_BITS)
def test_quantize_mse_within_10_percent_of_lloyd_max(bits):
    sigma = float(rng.uniform(0.01, 3.0))
    w = (sigma * rng.standard_normal((2, 128, 1024))).astype(np.float32)
    tw = T.quantize(w, bits, progress=False, seed=int(rng.integers(1 << 30)))
    mse = T.quantization_mse(w, tw) / sigma**2
    opt = T.lloyd_max_gaussian(bits)[1]
    print(f"bits={bits} mse={mse:.6g} optimum={opt:.6g} ratio={mse / opt:.4f}")
    assert mse <= 1.10 * opt


def test_quantize_outputs_follow_the_spec():
    E, N, K, bits, gs = 3, 40, 256, 6, 64
    w = rng.standard_normal((E, N, K)).astype(np.float32) * 0.02
    tw = T.quantize(mx.array(w).astype(mx.bfloat16), bits, group_size=gs, signs=True,
                    seed=5, progress=False)
    from mlx_moe import QuantizedWeight

    assert isinstance(tw, QuantizedWeight) and tw.mode == "trellis"
    assert (tw.bits, tw.group_size) == (bits, gs)
    assert tw.w.dtype == mx.uint8 and tw.w.shape == (E, K // 16, 3, 32 * bits)
    assert tw.scales.dtype == mx.float16 and tw.scales.shape == (E, K // gs, N)
    assert tw.grid.dtype == mx.float32 and tw.grid.shape == (1 << bits,)
    assert tw.su.shape == (E, K) and tw.sv.shape == (E, N)
    assert set(np.unique(np.array(tw.su))) <= {-1.0, 1.0}
    assert T.check_arrays(tw.w, tw.scales, tw.grid, tw.su, tw.sv, bits=bits, group_size=gs) == (E, N, K)
    [a.shape for a in tw.arrays()]  # the order the C++ side reads: w, scales, grid, su, sv
    assert [id(a) for a in tw.arrays()] == [id(tw.w), id(tw.scales), id(tw.grid), id(tw.su), id(tw.sv)]
    wbf = np.array(mx.array(w).astype(mx.bfloat16).astype(mx.float32))
    rel = T.quantization_mse(wbf, tw) / np.mean(wbf.astype(np.float64) ** 2)
    assert rel < 1.1 * T.lloyd_max_gaussian(bits)[1]
    # the same seed gives the same signs and indices; a single matrix drops E
    tw2 = T.quantize(wbf, bits, group_size=gs, signs=True, seed=5, progress=False)
    np.testing.assert_array_equal(np.array(tw2.su), np.array(tw.su))
    one = T.quantize(wbf[0], bits, group_size=gs, progress=False)
    assert one.w.shape == (K // 16, 3, 32 * bits) and one.scales.shape == (K // gs, N)
    assert one.su is None and one.sv is None and one.grid.shape == (1 << bits,)


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16", "float32"])
def test_quantize_scale_dtypes_tiny_weights_and_per_expert_grid(scale_dtype):
    # magnitudes that would underflow float16 scales without the power-of-two shift
    w = rng.standard_normal((2, 16, 128)) * 1e-7
    w[1] *= 1e3  # experts on different scales
    w[0, 3] = 0.0  # an all-zero row
    tw = T.quantize(w, 4, group_size=32, scale_dtype=scale_dtype, per_expert_grid=True,
                    progress=False)
    assert tw.grid.shape == (2, 16) and str(tw.scales.dtype).endswith(scale_dtype)
    d = T.dequantize_reference(tw)
    assert np.all(d[0, 3] == 0.0)
    for e in range(2):
        rel = np.mean((d[e] - w[e]) ** 2) / np.mean(w[e] ** 2)
        assert rel < 1.2 * T.lloyd_max_gaussian(4)[1], (e, rel)


def test_quantize_progress_line(capsys):
    T.quantize(rng.standard_normal((3, 16, 32)), 2, group_size=32, progress=True, chunk_elems=512)
    err = capsys.readouterr().err
    assert "trellis 2-bit" in err and "3/3" in err


# ---------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------
def _raises(exc, match, fn, *a, **k):
    with pytest.raises(exc, match=match):
        fn(*a, **k)


def test_bad_inputs_quantize():
    w = rng.standard_normal((2, 16, 64)).astype(np.float32)
    _raises(ValueError, "bits", T.quantize, w, 1)
    _raises(ValueError, "bits", T.quantize, w, 9)
    _raises(TypeError, "bits", T.quantize, w, 3.0)
    _raises(ValueError, "group_size", T.quantize, w, 3, group_size=48)  # does not divide 64
    _raises(ValueError, "group_size", T.quantize, w, 3, group_size=24)  # not a multiple of 16
    _raises(TypeError, "group_size", T.quantize, w, 3, group_size="64")
    _raises(ValueError, "w must be", T.quantize, w[0, 0], 3)
    _raises(ValueError, "w must be", T.quantize, w[None], 3)
    _raises(TypeError, "w must be a floating-point", T.quantize, w.astype(np.int32), 3)
    _raises(TypeError, "w must be", T.quantize, "weights", 3)
    bad = w.copy()
    bad[1, 2, 3] = np.nan
    _raises(ValueError, "NaN", T.quantize, bad, 3, group_size=32, progress=False)
    _raises(ValueError, "group_size 128 does not divide K = 64", T.quantize, w, 3)
    _raises(ValueError, "scale_dtype", T.quantize, w, 3, group_size=32, scale_dtype="int8")
    _raises(TypeError, "signs", T.quantize, w, 3, group_size=32, signs="yes")


def test_bad_inputs_pack_unpack():
    _raises(ValueError, "bits", T.pack, np.zeros((4, 4), np.uint8), 10)
    _raises(ValueError, r"indices must lie in \[0, 8\)", T.pack, np.full((4, 4), 8), 3)
    _raises(TypeError, "indices must be an integer", T.pack, np.zeros((4, 4)), 3)
    _raises(ValueError, "indices must be", T.pack, np.zeros(4, np.uint8), 3)
    p = T.pack(np.zeros((20, 32), np.uint8), 3)
    _raises(ValueError, "packed must have shape", T.unpack, p, 4, 32, 20)
    _raises(ValueError, "packed must have shape", T.unpack, p, 3, 48, 20)
    _raises(TypeError, "packed must be uint8", T.unpack, p.astype(np.int16), 3, 32, 20)


def test_bad_inputs_check_arrays():
    tw, _ = rand_tw(2, 20, 64, 3, 32)
    ok = dict(w=tw.w, scales=tw.scales, grid=tw.grid, su=tw.su, sv=tw.sv)
    assert T.check_arrays(**ok, bits=3, group_size=32) == (2, 20, 64)
    assert T.check_arrays(tw.w[0], tw.scales[0], tw.grid, tw.su[0], tw.sv[0], bits=3,
                          group_size=32) == (None, 20, 64)

    def bad(exc, match, bits=3, group_size=32, **changes):
        _raises(exc, match, T.check_arrays, **{**ok, **changes}, bits=bits, group_size=group_size)

    bad(ValueError, "grid must have 2\\*\\*bits = 8 levels", grid=tw.grid[:7])
    bad(ValueError, "grid must have", grid=np.zeros((3, 8), np.float32))
    bad(TypeError, "grid must be one of", grid=tw.grid.astype(np.float64))
    bad(ValueError, "w: the last axis must be 32\\*bits", bits=4)
    bad(ValueError, "bits must be in 2..8", bits=1)
    bad(ValueError, "group_size must be a positive multiple of 16", group_size=20)
    bad(ValueError, "w has 4x2 tiles but scales", group_size=16)  # K would be 32
    bad(TypeError, "w must be uint8", w=tw.w.astype(np.int8))
    bad(ValueError, "w must be", w=tw.w[0, 0])
    bad(TypeError, "scales must be one of", scales=tw.scales.astype(np.float64))
    bad(ValueError, "scales must be", scales=tw.scales[0])
    bad(ValueError, "su must have shape \\[2, 64\\]", su=tw.su[:, :32])
    bad(ValueError, "sv must have shape \\[2, 20\\]", sv=tw.sv[:1])
    bad(TypeError, "su must be one of", su=tw.su.astype(np.int8))
    bad(TypeError, "sv must be a NumPy or MLX array", sv=[1.0] * 20)
    bad(ValueError, "grid is required", grid=None)


# ---------------------------------------------------------------------------------------
# kernels/common/trellis.h (C++20) against the NumPy reference
# ---------------------------------------------------------------------------------------
SHIM = r"""
#include "common/trellis.h"
template <uint32_t B>
void tiles(const uint8_t* w, const float* sc, const float* grid, const float* su,
           const float* sv, uint32_t E, uint32_t N, uint32_t K, uint32_t gs, uint32_t gpe,
           uint32_t has_su, uint32_t has_sv, int mode, float* out) {
  uint32_t idx[256];
  for (uint32_t e = 0; e < E; ++e)
    for (uint32_t kt = 0; kt < moe_trellis_tiles_k(K); ++kt)
      for (uint32_t nt = 0; nt < moe_trellis_tiles_n(N); ++nt) {
        const uint8_t* t = w + moe_trellis_tile_offset(e, kt, nt, K, N, B);
        if (mode == 0) moe_trellis_unpack_tile<B>(t, idx);
        if (mode == 1) moe_trellis_unpack_tile_words<B>(reinterpret_cast<const uint32_t*>(t), idx);
        if (mode == 2)
          for (uint32_t j = 0; j < 16; ++j)
            moe_trellis_unpack_run16<B>(t + j * moe_trellis_run_bytes(B), idx + 16 * j);
        if (mode == 3)
          for (uint32_t p = 0; p < 256; ++p) {
            uint32_t bit = moe_trellis_bit(p, B);
            uint32_t lo = t[bit >> 3], hi = (bit & 7) + B > 8 ? t[(bit >> 3) + 1] : 0;
            idx[p] = moe_trellis_index16(lo | (hi << 8), p, B);
          }
        for (uint32_t nn = 0; nn < 16; ++nn)
          for (uint32_t kk = 0; kk < 16; ++kk) {
            uint32_t n = nt * 16 + nn, k = kt * 16 + kk;
            if (n >= N || k >= K) continue;
            uint32_t q = idx[moe_trellis_pos(k, n)];
            float s = sc[moe_trellis_scale_index(e, k / gs, n, moe_trellis_groups(K, gs), N)];
            float u = has_su ? su[moe_trellis_su_index(e, k, K)] : 1.0f;
            float v = has_sv ? sv[moe_trellis_sv_index(e, n, N)] : 1.0f;
            out[(uint64_t(e) * N + n) * K + k] =
                moe_trellis_value(grid[moe_trellis_grid_index(e, q, B, gpe)], s, u, v);
          }
      }
}
extern "C" {
void deq_element(const uint8_t* w, const float* sc, const float* grid, const float* su,
                 const float* sv, uint32_t E, uint32_t N, uint32_t K, uint32_t bits,
                 uint32_t gs, uint32_t gpe, uint32_t has_su, uint32_t has_sv, float* out) {
  for (uint32_t e = 0; e < E; ++e)
    for (uint32_t n = 0; n < N; ++n)
      for (uint32_t k = 0; k < K; ++k)
        out[(uint64_t(e) * N + n) * K + k] =
            moe_trellis_element(w, sc, grid, su, sv, e, k, n, K, N, bits, gs, gpe, has_su, has_sv);
}
void deq_tiles(const uint8_t* w, const float* sc, const float* grid, const float* su,
               const float* sv, uint32_t E, uint32_t N, uint32_t K, uint32_t bits, uint32_t gs,
               uint32_t gpe, uint32_t has_su, uint32_t has_sv, int mode, float* out) {
  switch (bits) {
#define CASE(B) case B: tiles<B>(w, sc, grid, su, sv, E, N, K, gs, gpe, has_su, has_sv, mode, out); break;
    CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
  }
}
uint64_t element_byte(uint32_t e, uint32_t k, uint32_t n, uint32_t K, uint32_t N, uint32_t bits) {
  return moe_trellis_element_byte(e, k, n, K, N, bits);
}
}
"""


@pytest.fixture(scope="module")
def header_lib(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed")
    d = tmp_path_factory.mktemp("trellis_h")
    (d / "shim.cpp").write_text(SHIM)
    so = d / "libtrellis_shim.so"
    cmd = ["g++", "-std=c++20", "-O1", "-Wall", "-Wextra", "-Werror", "-fno-strict-aliasing",
           "-shared", "-fPIC", f"-I{ROOT / 'kernels'}", str(d / "shim.cpp"), "-o", str(so)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    lib = ctypes.CDLL(str(so))
    lib.element_byte.restype = ctypes.c_uint64
    return lib


def test_header_compiles_as_cpp14_and_cpp20():
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed")
    for std in ("c++14", "c++20"):  # MSL is C++14-based: the header must not need more
        r = subprocess.run(["g++", f"-std={std}", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
                            f"-I{ROOT / 'kernels'}", "-x", "c++", "-"],
                           input='#include "common/trellis.h"\n', capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-4000:]


def _p(a, ct=ctypes.c_float):
    return None if a is None else a.ctypes.data_as(ctypes.POINTER(ct))


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("variant", ["signs", "nosigns", "grid_per_expert", "real"])
def test_header_matches_reference(header_lib, bits, variant):
    E, N, K, gs = 3, 37, 64, 32
    tw, _ = rand_tw(E, N, K, bits, gs, su=variant != "nosigns", sv=variant != "nosigns",
                    grid_per_expert=variant == "grid_per_expert", real_signs=variant == "real")
    ref = T.dequantize_reference(tw)
    f32 = {k: (None if getattr(tw, k) is None else
               np.ascontiguousarray(getattr(tw, k), dtype=np.float32))
           for k in ("scales", "grid", "su", "sv")}
    w = np.ascontiguousarray(tw.w)
    args = [_p(w, ctypes.c_uint8), _p(f32["scales"]), _p(f32["grid"]), _p(f32["su"]),
            _p(f32["sv"]), E, N, K, bits, gs, int(f32["grid"].ndim == 2),
            int(tw.su is not None), int(tw.sv is not None)]
    outs = []
    out = np.full((E, N, K), np.nan, np.float32)
    header_lib.deq_element(*args, _p(out))
    outs.append(("element", out))
    for mode, name in enumerate(["tile", "tile_words", "run16", "index16"]):
        o = np.full((E, N, K), np.nan, np.float32)
        header_lib.deq_tiles(*args, mode, _p(o))
        outs.append((name, o))
    for name, o in outs:
        if variant == "real":  # three float32 roundings
            np.testing.assert_allclose(o, ref, rtol=4e-7, atol=0, err_msg=name)
        else:  # grid * scale is exact in float64: float32 rounds it once, signs are exact
            np.testing.assert_array_equal(o, ref.astype(np.float32), err_msg=name)


def test_header_element_byte(header_lib):
    K, N, bits = 48, 40, 5
    for (e, k, n) in [(0, 0, 0), (1, 17, 3), (2, 47, 39)]:
        tile = (e * 3 + k // 16) * 3 + n // 16
        expect = tile * 32 * bits + (((n % 16) * 16 + k % 16) * bits) // 8
        assert header_lib.element_byte(e, k, n, K, N, bits) == expect

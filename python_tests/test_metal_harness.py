"""The Metal harness itself: known answers (against NumPy) for every Metal construct our
kernels rely on, and planted bugs it must catch. Kernels: python_tests/metal/harness_cases.metal."""

from pathlib import Path

import os

import numpy as np
import pytest

mh = pytest.importorskip("mlx_moe.testing.metal", reason="the Metal harness needs NumPy")
pytest.importorskip("ziglang", reason="the Metal harness needs clang: pip install ziglang")
if os.environ.get("MLX_MOE_SKIP_METAL_HARNESS"):
    pytest.skip("MLX_MOE_SKIP_METAL_HARNESS is set", allow_module_level=True)

HERE = Path(__file__).resolve().parent
CASES = HERE / "metal" / "harness_cases.metal"


@pytest.fixture(scope="module")
def lib():
    return mh.compile(CASES)


def rng(seed=0):
    return np.random.default_rng(seed)


def poisoned(shape, dtype=np.float32):
    a = np.empty(shape, dtype)
    a.view(np.uint8)[...] = 0xAB
    return a


# ---------------------------------------------------------------------------------------------
# Known answers
def test_simd_functions(lib):
    n = 96  # three simdgroups
    x = rng(1).random(n).astype(np.float32)
    out = poisoned((8, n))
    bits = poisoned((2, n), np.uint32)
    mh.run(lib.kernel("simd_ops"), grid=(1, 1, 1), threadgroup=(n, 1, 1), buffers=[x, out, bits])
    xs = x.reshape(-1, 32).astype(np.float64)
    lane = np.arange(32)
    # fp32 sums over 32 values: the harness adds in lane order, the GPU in a tree; 1e-6
    # relative covers both (32 * 2^-24 * |sum|).
    np.testing.assert_allclose(out[0].reshape(-1, 32), np.repeat(xs.sum(1, keepdims=True), 32, 1), rtol=1e-6)
    np.testing.assert_array_equal(out[1].reshape(-1, 32), np.repeat(xs.max(1, keepdims=True), 32, 1))
    np.testing.assert_array_equal(out[2].reshape(-1, 32), np.repeat(xs.min(1, keepdims=True), 32, 1))
    excl = np.cumsum(xs, 1) - xs
    np.testing.assert_allclose(out[3].reshape(-1, 32), excl, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out[4].reshape(-1, 32), xs[:, lane ^ 5])
    np.testing.assert_array_equal(out[5].reshape(-1, 32), np.repeat(xs[:, 7:8], 32, 1))
    down = np.where(lane + 3 < 32, np.minimum(lane + 3, 31), lane)  # past the edge: unchanged
    np.testing.assert_array_equal(out[6].reshape(-1, 32), xs[:, down])
    np.testing.assert_array_equal(out[7].reshape(-1, 32), xs[:, (lane * 3) % 32])
    ballot = ((xs > 0.5) * (1 << lane)).sum(1).astype(np.uint32)
    np.testing.assert_array_equal(bits[0].reshape(-1, 32), np.repeat(ballot[:, None], 32, 1))
    np.testing.assert_array_equal(bits[1].reshape(-1, 32), np.tile((lane == 0).astype(np.uint32), (3, 1)))


def test_simd_butterfly_reduction(lib):
    x = rng(2).random(64).astype(np.float32)
    out = poisoned(64)
    mh.run(lib.kernel("simd_butterfly"), grid=1, threadgroup=64,
           buffers=[x, out, np.array([16], np.uint32).tobytes()])
    ref = np.repeat(x.reshape(2, 32).astype(np.float64).sum(1), 32)
    np.testing.assert_allclose(out, ref, rtol=1e-6)


def test_planted_simd_reduction_over_wrong_lanes_is_caught(lib):
    """Starting the butterfly at offset 8 sums 16 lanes, not 32: the harness computes what
    the GPU would (each lane gets the sum of its 16-lane half), so the known-answer check fails."""
    x = rng(3).random(32).astype(np.float32)
    out = poisoned(32)
    mh.run(lib.kernel("simd_butterfly"), grid=1, threadgroup=32,
           buffers=[x, out, np.array([8], np.uint32).tobytes()])
    halves = np.concatenate([np.repeat(x[:16].sum(), 16), np.repeat(x[16:].sum(), 16)])
    np.testing.assert_allclose(out, halves, rtol=1e-6)
    assert not np.allclose(out, x.sum(), rtol=1e-3)


def test_divergent_collective_uses_active_lanes(lib):
    x = rng(4).random(32).astype(np.float32)
    out = poisoned(32)
    mh.run(lib.kernel("simd_partial"), grid=1, threadgroup=32, buffers=[x, out])
    np.testing.assert_allclose(out[:16], np.repeat(x[:16].astype(np.float64).sum(), 16), rtol=1e-6)
    np.testing.assert_array_equal(out[16:], -1.0)


@pytest.mark.parametrize("reverse", [False, True])
def test_threadgroup_tree_reduction(lib, reverse):
    groups, n = 5, 128
    x = rng(5).standard_normal(groups * n).astype(np.float32)
    out = poisoned(groups)
    res = mh.run(lib.kernel("tg_tree_sum"), grid=groups, threadgroup=n, buffers=[x, out],
                 threadgroup_memory=[n * 4], reverse=reverse)
    np.testing.assert_allclose(out, x.reshape(groups, n).astype(np.float64).sum(1), rtol=1e-5, atol=1e-5)
    assert res.barriers == groups * (1 + 7)
    assert res.counters[0].bytes_read == x.nbytes and res.counters[0].unique_read == x.nbytes
    assert res.counters[1].bytes_written == out.nbytes


def test_kernel_scope_threadgroup_array(lib):
    x = rng(6).integers(0, 1 << 30, (3, 2, 16, 16), dtype=np.uint32)
    out = poisoned(x.shape, np.uint32)
    mh.run(lib.kernel("tg_static_transpose"), grid=(2, 3, 1), threadgroup=(16, 16, 1), buffers=[x, out])
    np.testing.assert_array_equal(out, x.transpose(0, 1, 3, 2))


@pytest.mark.parametrize("dtype,name", [(np.float32, "sg_matmul_float"), (np.float16, "sg_matmul_half")])
def test_simdgroup_matrix_product(lib, dtype, name):
    M, N, K = 24, 16, 40
    a = rng(7).standard_normal((M, K)).astype(dtype)
    b = rng(8).standard_normal((K, N)).astype(dtype)
    c = poisoned((M, N))
    res = mh.run(lib.kernel(name), grid=(N // 8, M // 8, 1), threadgroup=32,
                 buffers=[a, b, c, np.array([M, N, K, 0], np.uint32).tobytes()])
    ref = a.astype(np.float64) @ b.astype(np.float64)
    # Operands are exact in fp32; products accumulate in fp32 over K = 40 terms.
    np.testing.assert_allclose(c, ref, rtol=1e-5, atol=1e-5)
    # A simdgroup_load is one simd-group operation: each 8x8 tile counts once, not 32 times.
    tiles_a = (M // 8) * (N // 8) * (K // 8)
    assert res.counters[0].bytes_read == tiles_a * 64 * a.itemsize


def test_simdgroup_diagonal_constructor_and_transposed_load(lib):
    a = rng(9).standard_normal((8, 8)).astype(np.float32)
    out = poisoned((8, 8))
    mh.run(lib.kernel("sg_diag_transpose"), grid=1, threadgroup=32, buffers=[a, out])
    np.testing.assert_array_equal(out, a.T * 2)


def test_atomics_under_contention(lib):
    bins, groups, n = 7, 6, 256
    x = rng(10).integers(0, 1000, groups * n, dtype=np.uint32)
    ghist = np.zeros(bins, np.uint32)
    tgh = poisoned((groups, bins), np.uint32)
    mh.run(lib.kernel("atomic_histogram"), grid=groups, threadgroup=n,
           buffers=[x, ghist, tgh, np.array([bins], np.uint32).tobytes()], threadgroup_memory=[bins * 4])
    v = x % bins
    np.testing.assert_array_equal(ghist, np.bincount(v, minlength=bins))
    np.testing.assert_array_equal(tgh, np.stack([np.bincount(r, minlength=bins) for r in v.reshape(groups, n)]))


def test_spin_wait_inside_a_threadgroup_makes_progress(lib):
    out = poisoned(64, np.uint32)
    mh.run(lib.kernel("spin_chain"), grid=1, threadgroup=64, buffers=[out], threadgroup_memory=[16])
    np.testing.assert_array_equal(out, np.arange(64) * 10)


def test_indirect_dispatch(lib):
    n = np.array([200], np.uint32)
    args = poisoned(4, np.uint32)
    mh.run(lib.kernel("write_grid"), grid=1, threadgroup=32, buffers=[n, args])
    seen = np.zeros((2, 4), np.uint32)
    res = mh.run_indirect(lib.kernel("mark_groups"), args, threadgroup=64, buffers=[seen])
    assert res.threadgroups == 8
    np.testing.assert_array_equal(seen, np.ones((2, 4)))


def test_dispatch_threads_partial_threadgroups(lib):
    n = 100
    pos = poisoned(n, np.uint32)
    size = poisoned(n, np.uint32)
    mh.run(lib.kernel("grid_positions"), None, threadgroup=32, buffers=[pos, size], threads=n)
    np.testing.assert_array_equal(pos, np.arange(n) + 1)
    np.testing.assert_array_equal(size, np.where(np.arange(n) < 96, 32, 4))


@pytest.mark.parametrize("scale,add", [(3, True), (5, False)])
def test_function_constants(scale, add):
    lib = mh.compile(CASES, function_constants={0: scale, "ADD_ONE": add})
    x = rng(11).integers(0, 1000, 64, dtype=np.uint32)
    out = poisoned(64, np.uint32)
    mh.run(lib.kernel("specialised"), grid=1, threadgroup=64, buffers=[x, out])
    np.testing.assert_array_equal(out, x * scale + (1 if add else 0))


def test_numeric_conversions(lib):
    x = np.concatenate([rng(12).standard_normal(200).astype(np.float32) * 1e3,
                        np.array([np.inf, -np.inf, np.nan, 65520.0, 1e-8, -0.0, 3.0e38], np.float32)])
    x = np.concatenate([x, np.zeros((-len(x)) % 32, np.float32) + 1.5])
    n = len(x)
    h = poisoned(n, np.float16)
    b = poisoned(n, np.uint16)
    u = poisoned(n, np.uint32)
    mh.run(lib.kernel("convert_types"), grid=n // 32, threadgroup=32, buffers=[x, h, b, u])
    with np.errstate(over="ignore"):  # values past fp16's range become inf, as intended
        ref_h = x.astype(np.float16)
    np.testing.assert_array_equal(h.view(np.uint16), ref_h.view(np.uint16))
    np.testing.assert_array_equal(u, x.view(np.uint32))
    # bfloat16: round to nearest even of the top 16 bits (NaN stays NaN)
    xb = x.view(np.uint32).astype(np.uint64)
    ref = ((xb + 0x7FFF + ((xb >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    np.testing.assert_array_equal(b[~nan], ref[~nan])
    assert np.all((b[nan] & 0x7F80) == 0x7F80) and np.all(b[nan] & 0x7F)


def test_byte_counters_per_threadgroup(lib):
    """tg_unique_read counts each byte once per threadgroup that read it."""
    groups, n = 3, 64
    x = rng(13).standard_normal(groups * n).astype(np.float32)
    out = poisoned(groups)
    res = mh.run(lib.kernel("tg_tree_sum"), grid=groups, threadgroup=n, buffers=[x, out],
                 threadgroup_memory=[n * 4])
    c = res.counters[0]
    assert (c.bytes_read, c.tg_unique_read, c.unique_read) == (x.nbytes, x.nbytes, x.nbytes)


# ---------------------------------------------------------------------------------------------
# Planted bugs
def test_catches_missing_barrier(lib):
    with pytest.raises(mh.RaceDetected, match="bug_missing_barrier.*race"):
        mh.run(lib.kernel("bug_missing_barrier"), grid=1, threadgroup=64,
               buffers=[np.ones(64, np.float32), poisoned(64)], threadgroup_memory=[256])


def test_catches_out_of_bounds_write(lib):
    with pytest.raises(mh.OutOfBounds, match=r"bug_oob_write.*write of 4 bytes at byte offset 400 of buffer\(0\)") as e:
        mh.run(lib.kernel("bug_oob_write"), grid=4, threadgroup=128,
               buffers=[poisoned(100), np.array([100], np.uint32).tobytes()])
    assert e.value.buffer == 0 and e.value.kernel == "bug_oob_write"


def test_catches_out_of_bounds_threadgroup_write(lib):
    with pytest.raises(mh.OutOfBounds, match=r"threadgroup\(0\)"):
        mh.run(lib.kernel("bug_oob_threadgroup"), grid=1, threadgroup=32,
               buffers=[poisoned(32)], threadgroup_memory=[128])


def test_catches_barrier_in_divergent_branch(lib):
    with pytest.raises(mh.BarrierDivergence, match="bug_divergent_barrier"):
        mh.run(lib.kernel("bug_divergent_barrier"), grid=1, threadgroup=64,
               buffers=[poisoned(64)], threadgroup_memory=[256])


def test_catches_threads_at_different_barriers(lib):
    with pytest.raises(mh.BarrierDivergence, match="different threadgroup_barrier"):
        mh.run(lib.kernel("bug_two_barriers"), grid=1, threadgroup=64, buffers=[poisoned(64)])


def test_catches_uninitialized_threadgroup_read(lib):
    with pytest.raises(mh.UninitializedRead, match="bug_uninitialized"):
        mh.run(lib.kernel("bug_uninitialized"), grid=1, threadgroup=32,
               buffers=[poisoned(32)], threadgroup_memory=[128])


def test_catches_cross_threadgroup_spin_as_deadlock(lib):
    with pytest.raises(mh.Deadlock, match="bug_cross_group_wait"):
        mh.run(lib.kernel("bug_cross_group_wait"), grid=2, threadgroup=32,
               buffers=[np.zeros(1, np.uint32)])


def test_catches_short_constant_buffer(lib):
    with pytest.raises(mh.OutOfBounds, match=r"buffer\(0\)"):
        mh.run(lib.kernel("bug_short_constant"), grid=1, threadgroup=1,
               buffers=[np.array([1, 2], np.uint32).tobytes(), poisoned(1, np.uint32)])


def test_unbound_buffer_is_an_error(lib):
    with pytest.raises(ValueError, match=r"buffer\(1\).*not bound"):
        mh.run(lib.kernel("bug_oob_write"), grid=1, threadgroup=1, buffers={0: poisoned(4)})


def test_missing_threadgroup_memory_is_an_error(lib):
    with pytest.raises(ValueError, match=r"threadgroup\(0\)"):
        mh.run(lib.kernel("tg_tree_sum"), grid=1, threadgroup=32, buffers=[poisoned(32), poisoned(1)])


def test_read_only_input_is_not_written_back(lib):
    x = rng(14).standard_normal(64).astype(np.float32)
    x.setflags(write=False)
    out = poisoned(1)
    mh.run(lib.kernel("tg_tree_sum"), grid=1, threadgroup=64, buffers=[x, out], threadgroup_memory=[256])
    np.testing.assert_allclose(out[0], x.astype(np.float64).sum(), rtol=1e-5, atol=1e-5)


def test_position_builtins_of_mixed_sizes_are_refused(tmp_path):
    """Metal wants the vector-typed position built-ins of a kernel to have one size; the
    harness refuses what Apple's compiler would."""
    src = tmp_path / "mixed.metal"
    src.write_text("#include <metal_stdlib>\nusing namespace metal;\n"
                   "[[kernel]] void k(device float* y [[buffer(0)]],\n"
                   "  uint2 tg [[threadgroup_position_in_grid]], uint3 tpt [[threads_per_threadgroup]]) {\n"
                   "  y[tg.x] = float(tpt.x);\n}\n")
    with pytest.raises(mh.MetalSourceError, match="position built-ins"):
        mh.compile(src)
    src.write_text(src.read_text().replace("uint3 tpt", "uint2 tpt"))
    assert "k" in mh.compile(src).kernels

"""Trellis k-bit weight format: packing, a NumPy float64 reference decoder and a quantizer.

Bit-exact specification: docs/FORMATS.md, "Trellis k-bit" (kernels/common/trellis.h is the
C++/Metal/CUDA implementation of the same decode). In short, for a projection whose weight
is ``W [E, N, K]`` (``N`` out features, ``K`` in features, ``y = x @ W^T``):

* ``w      uint8   [E, K/16, ceil(N/16), 32*bits]``: 16x16 tiles of packed codebook indices,
  tile ``(kt, nt)`` at byte ``((e*TK + kt)*TN + nt) * 32*bits``; inside a tile element
  ``(k, n)`` is number ``p = (n % 16)*16 + (k % 16)`` and occupies bits
  ``[p*bits, (p+1)*bits)`` of the tile's bytes, least significant bit first;
* ``scales float16|bfloat16|float32 [E, K/group_size, N]``;
* ``grid   float32|float16 [2**bits]`` (one codebook for all experts) or ``[E, 2**bits]``;
* ``su     [E, K]`` and ``sv [E, N]`` (optional, float16|bfloat16|float32);
* ``W[e, n, k] = grid[idx] * scales[e, k // group_size, n] * su[e, k] * sv[e, n]``.

A single matrix drops the leading ``E`` axis of every array (``grid`` is then ``[2**bits]``).

This module needs only NumPy; :func:`quantize` imports ``mlx`` and ``mlx_moe.ops`` lazily to
build the :class:`mlx_moe.QuantizedWeight` it returns, and accepts NumPy or MLX arrays.
"""

from __future__ import annotations

import math
import sys
from functools import lru_cache
from statistics import NormalDist

import numpy as np

from .._progress import progress as show_progress

TILE = 16
"""Edge of a tile: tiles are 16 (k) x 16 (n) elements."""
TILE_ELEMS = TILE * TILE
BITS = tuple(range(2, 9))
"""Supported bits per index."""
DEFAULT_GROUP_SIZE = 128
"""Default number of consecutive k sharing one scale (per column n, per expert)."""
SCALE_DTYPES = ("float16", "bfloat16", "float32")
GRID_DTYPES = ("float16", "float32")

__all__ = [
    "TILE", "BITS", "DEFAULT_GROUP_SIZE", "tile_bytes", "packed_shape", "pack", "unpack",
    "check_arrays", "dequantize_reference", "quantize", "lloyd_max_gaussian",
    "quantization_mse",
]


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def _check_bits(bits, name="bits"):
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"{name} must be an int in 2..8, got {type(bits).__name__}")
    if int(bits) not in BITS:
        raise ValueError(f"{name} must be in 2..8 for trellis weights, got {bits}")
    return int(bits)


def _check_group_size(group_size, K=None):
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    gs = int(group_size)
    if gs <= 0 or gs % TILE:
        raise ValueError(
            f"group_size must be a positive multiple of {TILE} (the tile edge), got {gs}")
    if K is not None and K % gs:
        raise ValueError(f"group_size {gs} does not divide K = {K} (in_features)")
    return gs


def _is_mx(a):
    return type(a).__module__.startswith("mlx")


def _to_numpy(a, name, float_only=False):
    """NumPy view/copy of a NumPy or MLX array (bfloat16 is widened to float32)."""
    if a is None:
        return None
    if _is_mx(a):
        import mlx.core as mx

        if a.dtype == mx.bfloat16:
            a = a.astype(mx.float32)
        a = np.asarray(a)
    elif not isinstance(a, np.ndarray):
        if isinstance(a, (list, tuple)):
            a = np.asarray(a)
        else:
            raise TypeError(f"{name} must be a NumPy or MLX array, got {type(a).__name__}")
    if float_only and not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {a.dtype}")
    return a


def _dtype_name(a):
    """'float16' / 'bfloat16' / 'float32' / 'uint8' ... for NumPy and MLX arrays."""
    if _is_mx(a):
        return str(a.dtype).rsplit(".", 1)[-1]
    return np.dtype(a.dtype).name


def tile_bytes(bits: int) -> int:
    """Bytes of one packed 16x16 tile: ``256 * bits / 8 = 32 * bits``."""
    return 32 * _check_bits(bits)


def packed_shape(N: int, K: int, bits: int, experts: int | None = None) -> tuple:
    """Shape of ``w`` for ``[E?, N, K]`` weights: ``[E?, ceil(K/16), ceil(N/16), 32*bits]``."""
    s = (-(-int(K) // TILE), -(-int(N) // TILE), tile_bytes(bits))
    return s if experts is None else (int(experts),) + s


# ---------------------------------------------------------------------------------------
# packing
# ---------------------------------------------------------------------------------------
_CHUNK_TILES = 1 << 14  # tiles per vectorised step (bounds the bit-plane temporaries)


def pack(indices, bits: int) -> np.ndarray:
    """Pack codebook indices ``[..., N, K]`` (MLX orientation) into tiles.

    Returns ``uint8 [..., ceil(K/16), ceil(N/16), 32*bits]``. ``N`` and ``K`` may be any
    positive sizes; the unused elements of edge tiles are index 0.
    """
    bits = _check_bits(bits)
    idx = _to_numpy(indices, "indices")
    if not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"indices must be an integer array, got dtype {idx.dtype}")
    if idx.ndim < 2:
        raise ValueError(f"indices must be [..., N, K], got shape {idx.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= (1 << bits)):
        raise ValueError(f"indices must lie in [0, {1 << bits}) for bits={bits}, "
                         f"got [{idx.min()}, {idx.max()}]")
    *lead, N, K = idx.shape
    if N == 0 or K == 0:
        raise ValueError(f"indices must have N, K >= 1, got shape {idx.shape}")
    TK, TN = -(-K // TILE), -(-N // TILE)
    pad = np.zeros(tuple(lead) + (TN * TILE, TK * TILE), dtype=np.uint8)
    pad[..., :N, :K] = idx
    # [..., TN, n, TK, k] -> [..., TK, TN, n, k]: element p = n*16 + k inside a tile
    t = pad.reshape(tuple(lead) + (TN, TILE, TK, TILE))
    t = np.moveaxis(t, -2, -4).reshape(-1, TILE_ELEMS)  # [tiles, 256], tile order (kt, nt)
    out = np.empty((t.shape[0], 32 * bits), dtype=np.uint8)
    shifts = np.arange(bits, dtype=np.uint8)
    for s in range(0, t.shape[0], _CHUNK_TILES):
        c = t[s:s + _CHUNK_TILES]
        planes = (c[..., None] >> shifts) & 1  # [c, 256, bits], bit b of element p
        out[s:s + _CHUNK_TILES] = np.packbits(planes.reshape(c.shape[0], -1), axis=-1,
                                              bitorder="little")
    return out.reshape(tuple(lead) + (TK, TN, 32 * bits))


def unpack(packed, bits: int, K: int, N: int) -> np.ndarray:
    """Inverse of :func:`pack`: ``uint8 [..., TK, TN, 32*bits]`` -> ``uint8 [..., N, K]``."""
    bits = _check_bits(bits)
    p = _to_numpy(packed, "packed")
    if p.dtype != np.uint8:
        raise TypeError(f"packed must be uint8, got dtype {p.dtype}")
    K, N = int(K), int(N)
    if K <= 0 or N <= 0:
        raise ValueError(f"K and N must be positive, got K={K}, N={N}")
    TK, TN = -(-K // TILE), -(-N // TILE)
    if p.ndim < 3 or p.shape[-3:] != (TK, TN, 32 * bits):
        raise ValueError(f"packed must have shape [..., {TK}, {TN}, {32 * bits}] for K={K}, "
                         f"N={N}, bits={bits}, got {p.shape}")
    lead = p.shape[:-3]
    flat = p.reshape(-1, 32 * bits)
    idx = np.empty((flat.shape[0], TILE_ELEMS), dtype=np.uint8)
    weights = (1 << np.arange(bits)).astype(np.uint8)
    for s in range(0, flat.shape[0], _CHUNK_TILES):
        c = flat[s:s + _CHUNK_TILES]
        planes = np.unpackbits(c, axis=-1, bitorder="little").reshape(c.shape[0], TILE_ELEMS, bits)
        idx[s:s + _CHUNK_TILES] = (planes * weights).sum(-1, dtype=np.uint16).astype(np.uint8)
    t = idx.reshape(lead + (TK, TN, TILE, TILE))  # [..., kt, nt, n, k]
    t = np.moveaxis(t, -4, -2)  # [..., nt, n, kt, k]
    return np.ascontiguousarray(t.reshape(lead + (TN * TILE, TK * TILE))[..., :N, :K])


# ---------------------------------------------------------------------------------------
# validation of a full set of arrays
# ---------------------------------------------------------------------------------------
def check_arrays(w, scales, grid, su=None, sv=None, *, bits, group_size):
    """Validate trellis arrays (NumPy or MLX) against the spec; return ``(E, N, K)``.

    ``E`` is ``None`` for a single matrix. Raises ``TypeError`` (dtype) or ``ValueError``
    (shape or value) naming the offending argument.
    """
    bits = _check_bits(bits)
    gs = _check_group_size(group_size)
    for name, a in (("w", w), ("scales", scales), ("grid", grid), ("su", su), ("sv", sv)):
        if a is None and name in ("w", "scales", "grid"):
            raise ValueError(f"{name} is required for trellis weights")
        if a is not None and not (_is_mx(a) or isinstance(a, np.ndarray)):
            raise TypeError(f"{name} must be a NumPy or MLX array, got {type(a).__name__}")
    if _dtype_name(w) != "uint8":
        raise TypeError(f"w must be uint8 (packed tiles), got {_dtype_name(w)}")
    if _dtype_name(scales) not in SCALE_DTYPES:
        raise TypeError(f"scales must be one of {SCALE_DTYPES}, got {_dtype_name(scales)}")
    if _dtype_name(grid) not in GRID_DTYPES:
        raise TypeError(f"grid must be one of {GRID_DTYPES}, got {_dtype_name(grid)}")
    for name, a in (("su", su), ("sv", sv)):
        if a is not None and _dtype_name(a) not in SCALE_DTYPES:
            raise TypeError(f"{name} must be one of {SCALE_DTYPES}, got {_dtype_name(a)}")
    ws, ss, gsh = tuple(w.shape), tuple(scales.shape), tuple(grid.shape)
    if len(ws) not in (3, 4):
        raise ValueError(f"w must be [TK, TN, 32*bits] or [E, TK, TN, 32*bits], got {ws}")
    stacked = len(ws) == 4
    E = ws[0] if stacked else None
    lead = ws[:1] if stacked else ()
    if ws[-1] != 32 * bits:
        raise ValueError(f"w: the last axis must be 32*bits = {32 * bits} bytes per tile for "
                         f"bits={bits}, got {ws[-1]} (shape {ws})")
    if len(ss) != len(ws) - 1 or ss[:-2] != lead:
        raise ValueError(f"scales must be {'[E, ' if stacked else '['}K/group_size, N] "
                         f"matching w {ws}, got {ss}")
    G, N = ss[-2], ss[-1]
    K = G * gs
    if N < 1 or G < 1:
        raise ValueError(f"scales must have K/group_size >= 1 and N >= 1, got {ss}")
    if ws[-3:-1] != (K // TILE, -(-N // TILE)):
        raise ValueError(
            f"w has {ws[-3]}x{ws[-2]} tiles but scales {ss} with group_size {gs} imply "
            f"K={K}, N={N}, i.e. {K // TILE}x{-(-N // TILE)} tiles")
    L = 1 << bits
    if gsh[-1:] != (L,) or not (len(gsh) == 1 or (stacked and gsh == (E, L))):
        raise ValueError(f"grid must have 2**bits = {L} levels, shape [{L}]"
                         f"{f' or [{E}, {L}]' if stacked else ''}, got {gsh}")
    if su is not None and tuple(su.shape) != lead + (K,):
        raise ValueError(f"su must have shape {list(lead + (K,))} (one sign per k), "
                         f"got {tuple(su.shape)}")
    if sv is not None and tuple(sv.shape) != lead + (N,):
        raise ValueError(f"sv must have shape {list(lead + (N,))} (one sign per n), "
                         f"got {tuple(sv.shape)}")
    return E, N, K


# ---------------------------------------------------------------------------------------
# reference decoder
# ---------------------------------------------------------------------------------------
def dequantize_reference(tw) -> np.ndarray:
    """Float64 reference decode of a trellis weight -> ``[E, N, K]`` (``E = 1`` for one matrix).

    ``tw`` is a :class:`mlx_moe.QuantizedWeight` with ``mode="trellis"`` or any object with
    the attributes ``w, scales, grid, su, sv, bits, group_size``. Written from the spec,
    independently of kernels/common/trellis.h.
    """
    bits, gs = _check_bits(tw.bits), _check_group_size(tw.group_size)
    E, N, K = check_arrays(tw.w, tw.scales, tw.grid, tw.su, tw.sv, bits=bits, group_size=gs)
    one = E is None
    E = 1 if one else E

    def f64(a, shape):
        return None if a is None else _to_numpy(a, "").astype(np.float64).reshape(shape)

    w = _to_numpy(tw.w, "w").reshape(E, K // TILE, -(-N // TILE), 32 * bits)
    idx = unpack(w, bits, K, N).astype(np.intp)  # [E, N, K]
    grid = _to_numpy(tw.grid, "grid").astype(np.float64)
    g = grid[idx] if grid.ndim == 1 else np.take_along_axis(
        grid[:, None, :], idx.reshape(E, 1, -1), -1).reshape(E, N, K)
    s = f64(tw.scales, (E, K // gs, N))
    out = g * np.repeat(s, gs, axis=1).transpose(0, 2, 1)  # scale of (n, k): s[k // gs, n]
    if tw.su is not None:
        out = out * f64(tw.su, (E, 1, K))
    if tw.sv is not None:
        out = out * f64(tw.sv, (E, N, 1))
    return out


# ---------------------------------------------------------------------------------------
# codebooks
# ---------------------------------------------------------------------------------------
_SQRT2 = math.sqrt(2.0)
_erf = np.frompyfunc(math.erf, 1, 1)
_erfc = np.frompyfunc(math.erfc, 1, 1)


def _gauss_mass(a, b):
    """P(a < X < b) for X ~ N(0, 1), accurate in both tails (a < b elementwise)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    lo = 0.5 * (_erfc(a / _SQRT2) - _erfc(b / _SQRT2)).astype(np.float64)  # a > 0 tail
    hi = 0.5 * (_erfc(-b / _SQRT2) - _erfc(-a / _SQRT2)).astype(np.float64)  # b < 0 tail
    return np.where(a > 0, lo, hi)


def _phi(x):
    x = np.asarray(x, np.float64)
    return np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _lloyd_map(c):
    """One Lloyd step for N(0, 1): centroids of the cells of ``c``, with its Jacobian."""
    t = np.concatenate(([-np.inf], 0.5 * (c[1:] + c[:-1]), [np.inf]))
    a, b = t[:-1], t[1:]
    m = _gauss_mass(a, b)
    pa, pb = _phi(a), _phi(b)
    mu = (pa - pb) / m
    da = np.where(np.isfinite(a), pa * (mu - np.where(np.isfinite(a), a, 0.0)) / m, 0.0)
    db = np.where(np.isfinite(b), pb * (np.where(np.isfinite(b), b, 0.0) - mu) / m, 0.0)
    L = c.size
    J = np.zeros((L, L))
    i = np.arange(L)
    J[i, i] = 0.5 * (da + db)
    J[i[1:], i[1:] - 1] = 0.5 * da[1:]
    J[i[:-1], i[:-1] + 1] = 0.5 * db[:-1]
    return mu, J


def _distortion(c):
    """E[(X - Q(X))^2] for X ~ N(0, 1) and nearest-level quantizer ``c`` (exact formula)."""
    t = np.concatenate(([-np.inf], 0.5 * (c[1:] + c[:-1]), [np.inf]))
    a, b = t[:-1], t[1:]
    m = _gauss_mass(a, b)
    pa, pb = _phi(a), _phi(b)
    apa = np.where(np.isfinite(a), np.where(np.isfinite(a), a, 0.0) * pa, 0.0)
    bpb = np.where(np.isfinite(b), np.where(np.isfinite(b), b, 0.0) * pb, 0.0)
    # integral over [a, b] of (x - c)^2 phi = m + a phi(a) - b phi(b) - 2c (phi(a) - phi(b)) + c^2 m
    return float(np.sum(m + apa - bpb - 2.0 * c * (pa - pb) + c * c * m))


@lru_cache(maxsize=None)
def _lloyd_max_gaussian(bits: int):
    L = 1 << bits
    nd = NormalDist()
    # Panter-Dite start (point density ~ pdf^(1/3): quantiles of N(0, 3)), a few Lloyd
    # steps, then Newton on the fixed point c = centroids(c) (tridiagonal Jacobian).
    c = np.array([math.sqrt(3.0) * nd.inv_cdf((i + 0.5) / L) for i in range(L)])
    for _ in range(50):
        c, _J = _lloyd_map(c)
    for _ in range(100):
        mu, J = _lloyd_map(c)
        step = np.linalg.solve(J - np.eye(L), -(mu - c))
        c = c + step
        c = 0.5 * (c - c[::-1])  # exact symmetry
        if np.max(np.abs(step)) < 1e-14:
            break
    return c, _distortion(c)


def lloyd_max_gaussian(bits: int):
    """Lloyd-Max (MSE-optimal scalar) quantizer of N(0, 1) with ``2**bits`` levels.

    Returns ``(levels float64 [2**bits] ascending, mse)``; computed numerically (NumPy and
    the standard library only) and cached. ``mse`` for 3 bits is 0.03455.
    """
    c, mse = _lloyd_max_gaussian(_check_bits(bits))
    return c.copy(), mse


def _nearest(u, levels):
    """Index of the nearest of the ascending ``levels`` for every element of ``u``."""
    mids = 0.5 * (levels[1:] + levels[:-1])
    return np.searchsorted(mids, u).astype(np.uint8)


def _ls_scales(x, q):
    """Least-squares scale per row: argmin_s |x - s q|^2 (x, q [..., gs]); 0 if q == 0."""
    num = np.einsum("...i,...i->...", x, q)
    den = np.einsum("...i,...i->...", q, q)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def _fit(x, levels, iters):
    """Alternating minimisation of sum (x - s_g c[idx])^2 over scales s_g and codebook c.

    x: [S, gs] float64 groups (sampled), levels: initial ascending codebook.
    """
    L = levels.size
    s = np.sqrt(np.mean(x * x, axis=-1))
    s = np.where(s > 0, s, 1.0)
    c = levels.copy()
    for _ in range(iters):
        idx = _nearest(x / s[:, None], c)
        s = _ls_scales(x, c[idx])
        s = np.where(s > 0, s, 1.0)
        # codebook step given scales: c_j = sum s x / sum s^2 over the members of j
        sw = np.broadcast_to(s[:, None], x.shape).ravel()
        num = np.bincount(idx.ravel(), weights=(x * s[:, None]).ravel(), minlength=L)
        den = np.bincount(idx.ravel(), weights=sw * sw, minlength=L)
        c = np.where(den > 0, num / np.where(den > 0, den, 1.0), c)
        c = np.sort(c)
    return c


# ---------------------------------------------------------------------------------------
# quantizer
# ---------------------------------------------------------------------------------------
def _round_scale(s, scale_dtype):
    if scale_dtype == "float32":
        return s.astype(np.float32).astype(np.float64)
    if scale_dtype == "float16":
        return s.astype(np.float16).astype(np.float64)
    # bfloat16: round-to-nearest-even on the float32 bits
    u = s.astype(np.float32).view(np.uint32)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32).astype(np.float64)


def quantize(w, bits: int, group_size: int = DEFAULT_GROUP_SIZE, signs: bool = False,
             seed: int = 0, *, progress=None, scale_dtype: str = "float16",
             per_expert_grid: bool = False, sample_size: int = 1 << 20, iters: int = 12,
             chunk_elems: int = 1 << 23):
    """Quantize ``w [N, K]`` or a stack ``[E, N, K]`` (NumPy or MLX) to the trellis format.

    Scales are per (expert, group of ``group_size`` consecutive k, column n). The codebook
    (``2**bits`` levels, shared by all experts unless ``per_expert_grid``) and the scales are
    fitted jointly by alternating least squares on a sample of groups (started from the
    Lloyd-Max Gaussian codebook and RMS scales), then every group gets its least-squares
    scale, rounded to ``scale_dtype``, and nearest-level indices for that rounded scale.
    A power-of-two factor moves the scales' magnitude into the float32 grid so float16
    scales neither overflow nor lose precision to subnormals.

    ``signs=True`` draws random sign vectors ``su [E, K]``, ``sv [E, N]`` (from ``seed``)
    and quantizes ``w * su * sv`` so that the decode ``grid * scale * su * sv`` gives back
    ``w``; signs alone do not change the error (the format carries them for checkpoints
    made with an incoherence transform). ``progress`` (default: on for stacks) prints a
    progress line on stderr.

    Returns ``mlx_moe.QuantizedWeight(mode="trellis", w uint8, scales scale_dtype,
    grid float32, su/sv float16 or None, bits, group_size)``.
    """
    bits = _check_bits(bits)
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}, got {scale_dtype!r}")
    if not isinstance(signs, (bool, np.bool_)):
        raise TypeError(f"signs must be a bool, got {type(signs).__name__}")
    x = _to_numpy(w, "w", float_only=True)
    if x.ndim not in (2, 3):
        raise ValueError(f"w must be [N, K] or [E, N, K], got shape {tuple(x.shape)}")
    single = x.ndim == 2
    x = x[None] if single else x
    E, N, K = x.shape
    if min(E, N, K) < 1:
        raise ValueError(f"w must be non-empty, got shape {tuple(x.shape)}")
    gs = _check_group_size(group_size, K)
    G, L = K // gs, 1 << bits
    for e in range(E):
        if not np.all(np.isfinite(x[e])):
            raise ValueError(f"w contains NaN or infinity (expert {e})")
    if progress is None:
        progress = not single and E > 1
    rng = np.random.default_rng(seed)

    su = sv = None
    if signs:
        su = rng.choice(np.array([-1.0, 1.0]), size=(E, K))
        sv = rng.choice(np.array([-1.0, 1.0]), size=(E, N))

    def groups(e0, e1):
        """float64 [e1-e0, N, G, gs] groups of the sign-folded weights of experts e0..e1."""
        blk = x[e0:e1].astype(np.float64)
        if signs:
            blk = blk * su[e0:e1, None, :] * sv[e0:e1, :, None]
        return blk.reshape(e1 - e0, N, G, gs)

    # 1. codebook(s): alternating least squares on a sample of whole groups
    init, _ = lloyd_max_gaussian(bits)

    def sample_groups(experts):
        n_groups = len(experts) * N * G
        take = max(1, min(n_groups, sample_size // gs))
        pick = np.sort(rng.choice(n_groups, size=take, replace=False))
        e_of = np.asarray(experts)[pick // (N * G)]
        rest = pick % (N * G)
        xs = x[e_of, rest // G].reshape(take, G, gs)[np.arange(take), rest % G]
        xs = xs.astype(np.float64)
        if signs:
            k = (rest % G)[:, None] * gs + np.arange(gs)
            xs = xs * su[e_of[:, None], k] * sv[e_of, rest // G][:, None]
        return xs[np.any(xs != 0, axis=-1)]

    def fit(experts):
        xs = sample_groups(experts)
        return _fit(xs, init, iters) if xs.size else init.copy()

    codebooks = (np.stack([fit([e]) for e in range(E)]) if per_expert_grid
                 else fit(range(E))[None])

    # 2. per group: least-squares scale for nearest-level indices, then final indices for
    #    the rounded scale. Work in chunks of whole experts.
    scales = np.zeros((E, G, N), np.float64)
    idx = np.zeros((E, N, K), np.uint8)
    per = max(1, chunk_elems // max(1, N * K))
    step_total = -(-E // per)
    raw_s = np.zeros((E, N, G), np.float64)
    for ci, e0 in enumerate(range(0, E, per)):
        if progress:
            show_progress(ci, step_total, f"trellis {bits}-bit: experts {e0}..{min(E, e0 + per) - 1}")
        e1 = min(E, e0 + per)
        xg = groups(e0, e1)
        c = codebooks[e0:e1] if per_expert_grid else codebooks
        s = np.sqrt(np.mean(xg * xg, axis=-1))
        for _ in range(2):
            safe = np.where(s > 0, s, 1.0)[..., None]
            if per_expert_grid:
                q = np.stack([c[i][_nearest(xg[i] / safe[i], c[i])] for i in range(e1 - e0)])
            else:
                q = c[0][_nearest(xg / safe, c[0])]
            s = np.maximum(_ls_scales(xg, q), 0.0)
        raw_s[e0:e1] = s
    if progress:
        show_progress(step_total, step_total, f"trellis {bits}-bit: scales fitted")

    # 3. a power of two moves the scales' magnitude into the grid (exact), then round.
    pos = raw_s[raw_s > 0]
    shift = 0 if pos.size == 0 else int(np.round(np.log2(np.median(pos))))
    f = math.ldexp(1.0, shift)
    grid = (codebooks * f).astype(np.float32)  # stored grid, exactly as decoded
    if scale_dtype == "float16" and pos.size and pos.max() / f > 65504.0:
        raise ValueError("scales overflow float16 (the weights' dynamic range is too large); "
                         "use scale_dtype='float32'")
    s_stored = _round_scale(raw_s / f, scale_dtype)  # [E, N, G]
    for e0 in range(0, E, per):
        e1 = min(E, e0 + per)
        xg = groups(e0, e1)
        s = s_stored[e0:e1][..., None]
        safe = np.where(s > 0, s, 1.0)
        for i in range(e1 - e0):
            gl = grid[e0 + i] if per_expert_grid else grid[0]
            glv = gl.astype(np.float64)
            order = np.argsort(glv, kind="stable")
            j = _nearest(xg[i] / safe[i], glv[order])
            idx[e0 + i] = order[j].reshape(N, K)
    scales = s_stored.transpose(0, 2, 1)  # [E, G, N]

    packed = pack(idx, bits)
    if single:
        packed, scales = packed[0], scales[0]
        su = None if su is None else su[0]
        sv = None if sv is None else sv[0]
    grid_out = grid if per_expert_grid and not single else grid[0]

    import mlx.core as mx

    from ..ops import QuantizedWeight

    sd = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}[scale_dtype]
    return QuantizedWeight(
        w=mx.array(packed),
        scales=mx.array(scales.astype(np.float32)).astype(sd),
        mode="trellis",
        bits=bits,
        group_size=gs,
        grid=mx.array(np.ascontiguousarray(grid_out)),
        su=None if su is None else mx.array(su.astype(np.float16)),
        sv=None if sv is None else mx.array(sv.astype(np.float16)),
    )


def quantization_mse(w, tw) -> float:
    """Mean squared error between ``w`` and the float64 reference decode of ``tw``."""
    x = _to_numpy(w, "w", float_only=True).astype(np.float64)
    d = dequantize_reference(tw)
    return float(np.mean((d.reshape(x.shape) - x) ** 2))

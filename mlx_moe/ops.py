"""Python API of mlx_moe: thin, validated wrappers over the C++ primitives in ``_ext``.

Every function returns lazy ``mx.array``s (graph nodes). Shapes, dtypes and formats are
checked when the graph is built (``ValueError``/``TypeError`` naming the argument);
data-dependent checks (expert ids out of range) raise ``ValueError`` at evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional

import mlx.core as mx

try:
    from . import _ext
except ImportError as e:  # a source checkout on sys.path without the built extension
    raise ImportError(
        f"mlx_moe's compiled extension is missing next to {__file__}: install the package "
        "(pip install .) and import it from outside the source tree, or build it in place "
        f"(see docs/DESIGN.md). Original error: {e}") from e

MODES = ("affine", "mxfp4", "trellis")
FP4_DECODERS = ("e2m1", "e2m1_quarter_subnormal")


def _check_array(name, a):
    if not isinstance(a, mx.array):
        raise TypeError(f"{name} must be an mx.array, got {type(a).__name__}")


def route(logits: mx.array, k: int, normalize: bool = True, *, stream=None):
    """Router: fp32 softmax over the last axis, top-``k``, optional renormalisation.

    Args:
        logits: ``[..., E]`` router logits, any float dtype.
        k: experts per token, ``1 <= k <= E``.
        normalize: divide the k weights by their sum (guarded against a zero sum).

    Returns:
        ``(ids, weights)``: ``uint32 [..., k]`` expert ids in descending weight (ties go
        to the smaller id) and their ``float32 [..., k]`` weights.

    Rows that contain NaN give ids ``0..k-1`` and NaN weights; a row of all ``-inf``
    gives ids ``0..k-1`` and weights ``0``. See docs/DESIGN.md, "Router".
    """
    _check_array("logits", logits)
    return tuple(_ext.route(logits, int(k), bool(normalize), stream=stream))


def bucket(ids: mx.array, num_experts: int, *, tile: int = 32, stream=None):
    """Group the (token, slot) pairs of ``ids [T, k]`` by expert, deterministically.

    Returns ``(counts, offsets, pairs, dispatch)``:

    * ``counts  uint32 [E]``: pairs routed to each expert;
    * ``offsets uint32 [E+1]``: exclusive prefix sum of ``counts``;
    * ``pairs   uint32 [T*k]``: pair index ``t*k + slot``, grouped by expert, ascending
      within an expert;
    * ``dispatch uint32 [4]``: ``(x, 1, 1, dropped)``; the first three are the indirect
      dispatch arguments of a grouped GEMM with ``tile`` rows per threadgroup,
      ``x = max(1, sum_e ceil(counts[e] / tile))``; ``dropped`` counts out-of-range ids
      that a GPU kernel skipped (always 0 on the CPU, which raises instead).

    Out-of-range ids raise ``ValueError`` naming ``ids`` when ``ids`` is already
    materialised, and an error naming ``ids`` at evaluation otherwise (CPU); a GPU kernel
    drops them and counts them in ``dispatch[3]`` (no host sync).
    """
    _check_array("ids", ids)
    return tuple(_ext.bucket(ids, int(num_experts), int(tile), stream=stream))


@dataclass(frozen=True)
class QuantizedWeight:
    """One projection of all experts in one weight format (no copy of the arrays).

    * ``affine``: MLX's layout (``mx.quantize``): ``w uint32 [E, N, K*bits/32]``,
      ``scales``/``biases`` ``[E, N, K/group_size]``; bits in {2, 3, 4, 5, 6, 8}.
    * ``mxfp4``: MLX's layout: ``w uint32 [E, N, K/8]``, ``scales uint8 [E, N, K/32]``
      (E8M0); ``fp4_decoder`` may opt into ``"e2m1_quarter_subnormal"`` (see
      docs/FORMATS.md), never the default.
    * ``trellis``: 16x16 tiles of packed k-bit codebook indices:
      ``w uint8 [E, K/16, ceil(N/16), 32*bits]``, ``scales [E, K/group_size, N]``,
      ``grid [2^bits]`` (or ``[E, 2^bits]``), optional ``su [E, K]``, ``sv [E, N]``; see
      docs/FORMATS.md, "Trellis k-bit". ``mlx_moe.formats.trellis.quantize`` makes them.

    ``E`` may be absent (a single matrix, for :func:`dequantize`).
    """

    w: mx.array
    scales: mx.array
    biases: Optional[mx.array] = None
    mode: str = "affine"
    bits: int = 4
    group_size: int = 64
    grid: Optional[mx.array] = None
    su: Optional[mx.array] = None
    sv: Optional[mx.array] = None
    fp4_decoder: str = "e2m1"
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.fp4_decoder not in FP4_DECODERS:
            raise ValueError(f"fp4_decoder must be one of {FP4_DECODERS}, got {self.fp4_decoder!r}")
        _check_array("w", self.w)
        _check_array("scales", self.scales)
        for name in ("biases", "grid", "su", "sv"):
            a = getattr(self, name)
            if a is not None:
                _check_array(name, a)

    # -- what the C++ side receives -------------------------------------------------
    def arrays(self):
        """The arrays in the order the primitives read them."""
        out = [self.w, self.scales]
        if self.mode == "affine":
            if self.biases is None:
                raise ValueError("affine weights need biases")
            out.append(self.biases)
        elif self.mode == "trellis":
            if self.grid is None:
                raise ValueError("trellis weights need a codebook grid")
            out.append(self.grid)
            if self.su is not None:
                out.append(self.su)
            if self.sv is not None:
                out.append(self.sv)
        return out

    @cached_property
    def _spec(self):
        """(arrays, format) as the primitives take them, built once: the dataclass is frozen."""
        return self.arrays(), self.format()

    def format(self):
        return _ext.Format(
            self.mode,
            int(self.bits),
            int(self.group_size),
            self.su is not None,
            self.sv is not None,
            self.fp4_decoder == "e2m1_quarter_subnormal",
        )

    @property
    def out_features(self) -> int:
        return int(_ext.weight_shape(self.arrays(), self.format())[-2])

    @property
    def in_features(self) -> int:
        return int(_ext.weight_shape(self.arrays(), self.format())[-1])

    def dequantize(self, dtype=None, *, stream=None) -> mx.array:
        return dequantize(self, dtype=dtype, stream=stream)


@dataclass(frozen=True)
class Experts:
    """The stacked gate / up / down projections of all experts of one MoE block.

    gate, up: ``[E, F, D]`` (out, in); down: ``[E, D, F]``. Each projection may use its
    own format and bit width.
    """

    gate: QuantizedWeight
    up: QuantizedWeight
    down: QuantizedWeight

    @cached_property
    def _spec(self):
        """The three projections' array lists and formats, built once (frozen dataclass):
        a layer call then costs one extension call, not nine Python-level conversions."""
        specs = [p._spec for p in (self.gate, self.up, self.down)]
        return [a for a, _ in specs], [f for _, f in specs]

    @classmethod
    def from_switch_glu(cls, switch_glu) -> "Experts":
        """Wrap an mlx-lm ``SwitchGLU`` whose projections are ``QuantizedSwitchLinear``."""
        return cls(*(_from_quantized_switch_linear(getattr(switch_glu, n), n)
                     for n in ("gate_proj", "up_proj", "down_proj")))


def _from_quantized_switch_linear(layer, name) -> QuantizedWeight:
    if hasattr(layer, "quantized_weight"):  # mlx_moe's own holders (trellis)
        return layer.quantized_weight()
    if not hasattr(layer, "scales"):
        raise TypeError(
            f"{name} is not quantized ({type(layer).__name__}); mlx_moe runs quantized experts"
        )
    if "bias" in layer:
        raise ValueError(f"{name} has a bias term, which the fused expert MLP does not support")
    mode = getattr(layer, "mode", "affine")
    return QuantizedWeight(
        w=layer.weight,
        scales=layer.scales,
        biases=layer.get("biases") if mode == "affine" else None,
        mode=mode,
        bits=layer.bits,
        group_size=layer.group_size,
    )


def dequantize(weight, scales=None, biases=None, *, mode="affine", group_size=None, bits=None,
               dtype=None, fp4_decoder="e2m1", stream=None) -> mx.array:
    """Dequantize a weight to ``[..., N, K]``.

    Either ``dequantize(qw: QuantizedWeight, dtype=...)`` or MLX's own calling convention
    ``dequantize(w, scales, biases, mode=..., group_size=..., bits=...)``. Defaults follow
    ``mx.dequantize``: affine 64/4, mxfp4 32/4; the output dtype defaults to the scales'
    dtype (affine) or bfloat16 (mxfp4, as MLX).
    """
    if not isinstance(weight, QuantizedWeight):
        if mode == "mxfp4":
            group_size = 32 if group_size is None else group_size
            bits = 4 if bits is None else bits
        else:
            group_size = 64 if group_size is None else group_size
            bits = 4 if bits is None else bits
        weight = QuantizedWeight(weight, scales, biases, mode=mode, bits=bits,
                                 group_size=group_size, fp4_decoder=fp4_decoder)
    if dtype is None:
        if weight.mode == "affine":
            dtype = weight.scales.dtype
        elif weight.mode == "trellis":
            dtype = mx.float16 if weight.scales.dtype == mx.float16 else mx.float32
        else:
            dtype = mx.bfloat16
    if not isinstance(dtype, mx.Dtype):
        raise TypeError(f"dtype must be an mx.Dtype, got {dtype!r}")
    arrays, fmt = weight._spec
    return _ext.dequantize(arrays, fmt, dtype, stream=stream)


def moe_mlp(x: mx.array, ids: mx.array, weights: mx.array, experts: Experts, *,
            stream=None) -> mx.array:
    """Fused expert MLP: ``y[t] = sum_j weights[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t]))``
    with ``e = ids[t, j]``, in one primitive, accumulated in fp32.

    Args:
        x: ``[..., D]`` activations (float16, bfloat16 or float32).
        ids: ``[..., k]`` integer expert ids (same leading shape as ``x``).
        weights: ``[..., k]`` routing weights (any float dtype).
        experts: :class:`Experts`.

    Returns:
        ``[..., D]`` in ``x.dtype``.
    """
    _check_array("x", x)
    _check_array("ids", ids)
    _check_array("weights", weights)
    if not isinstance(experts, Experts):
        raise TypeError(f"experts must be an mlx_moe.Experts, got {type(experts).__name__}")
    arrays, formats = experts._spec
    return _ext.moe_mlp(x, ids, weights, arrays, formats, stream=stream)

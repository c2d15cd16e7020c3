"""mlx_moe: fused Mixture-of-Experts primitives for MLX.

Lazy ops on ``mx.array`` (graph nodes that compose with ``mx.compile``; inference only):

* :func:`route`      fp32 softmax + top-k (+ renormalise) over router logits
* :func:`bucket`     (token, slot) pairs grouped by expert + grouped-GEMM dispatch sizes
* :func:`dequantize` dequantize one weight format (affine, mxfp4, trellis)
* :func:`moe_mlp`    gate + up + SwiGLU + down + routing-weight combine in one primitive
"""

import mlx.core as mx  # noqa: F401  (loads libmlx before the extension)

from .ops import Experts, QuantizedWeight, bucket, dequantize, moe_mlp, route

__all__ = [
    "Experts",
    "QuantizedWeight",
    "bucket",
    "dequantize",
    "moe_mlp",
    "route",
    "load",
    "patch",
    "unpatch",
]
__version__ = "0.1.0"


def patch(model, **kwargs):
    """Replace every supported MoE block of an mlx-lm model with the fused path."""
    from .lm_patch import patch as _patch

    return _patch(model, **kwargs)


def load(path, **kwargs):
    """Load a local mlx-lm model directory (also one written by ``mlx_moe.convert``) with
    the fused path on its MoE blocks: ``(model, tokenizer)``."""
    from .layers import load as _load

    return _load(path, **kwargs)


def unpatch(model):
    """Undo :func:`patch`."""
    from .lm_patch import unpatch as _unpatch

    return _unpatch(model)

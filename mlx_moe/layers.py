"""nn.Module holders for weight formats mlx-lm has no layer for (trellis), and the loader
for checkpoints written by ``python -m mlx_moe.convert``."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .ops import QuantizedWeight, dequantize


class TrellisSwitchLinear(nn.Module):
    """A stack of expert projections in the trellis format, in the place of mlx-lm's
    ``SwitchLinear``. ``mlx_moe.patch`` runs it through the fused expert MLP; called
    directly (an unpatched model) it dequantizes and uses ``mx.gather_mm`` (slow, correct)."""

    def __init__(self, qw: QuantizedWeight):
        super().__init__()
        if qw.mode != "trellis":
            raise ValueError(f"TrellisSwitchLinear holds trellis weights, got mode {qw.mode!r}")
        self.weight = qw.w
        self.scales = qw.scales
        self.grid = qw.grid
        if qw.su is not None:
            self.su = qw.su
        if qw.sv is not None:
            self.sv = qw.sv
        self.bits = qw.bits
        self.group_size = qw.group_size
        self.mode = "trellis"
        self.freeze()

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self["weight"], self["scales"], mode="trellis", bits=self.bits,
                               group_size=self.group_size, grid=self["grid"],
                               su=self.get("su"), sv=self.get("sv"))

    def __call__(self, x, indices, sorted_indices=False):
        w = dequantize(self.quantized_weight(), dtype=x.dtype)
        return mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=indices,
                            sorted_indices=sorted_indices)


def _get_module(model: nn.Module, path: str):
    obj = model
    for part in path.split("."):
        obj = obj[int(part)] if isinstance(obj, list) else getattr(obj, part)
    return obj


def _set_module(model: nn.Module, path: str, module: nn.Module):
    parent_path, _, name = path.rpartition(".")
    parent = _get_module(model, parent_path) if parent_path else model
    setattr(parent, name, module)


def load(path, *, patch: bool = True, verbose: bool = False):
    """Load a local mlx-lm model directory (as mlx-lm saved it, or as ``mlx_moe.convert``
    rewrote it) and, with ``patch``, put every supported MoE block on the fused path.

    Returns ``(model, tokenizer)`` like ``mlx_lm.load``; the tokenizer is ``None`` when the
    directory has none."""
    try:
        from mlx_lm.utils import load_model, load_tokenizer
    except ImportError as e:  # pragma: no cover - exercised by the no-mlx-lm test
        raise ImportError("mlx_moe.load needs mlx-lm: pip install 'mlx-moe[lm]'") from e
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    moe = config.get("mlx_moe")
    # Trellis modules are unknown to mlx-lm: load lazily and non-strictly, then put the
    # trellis layers in before anything evaluates the placeholder float experts.
    model, _ = load_model(path, lazy=True, strict=moe is None)
    if moe is not None:
        if moe.get("format") != "trellis":
            raise ValueError(f"{path}: unknown mlx_moe format {moe.get('format')!r}")
        weights = {}
        for f in sorted(path.glob("model*.safetensors")):
            weights.update(mx.load(str(f)))
        for mpath, spec in moe["modules"].items():
            qw = QuantizedWeight(
                weights[f"{mpath}.trellis_w"], weights[f"{mpath}.trellis_scales"], mode="trellis",
                bits=int(spec["bits"]), group_size=int(spec["group_size"]),
                grid=weights[f"{mpath}.trellis_grid"], su=weights.get(f"{mpath}.trellis_su"),
                sv=weights.get(f"{mpath}.trellis_sv"))
            _set_module(model, mpath, TrellisSwitchLinear(qw))
    mx.eval(model.parameters())
    try:
        tokenizer = load_tokenizer(path)
    except Exception:  # a directory without tokenizer files
        tokenizer = None
    if patch:
        from .lm_patch import patch as _patch

        report = _patch(model, verbose=verbose)
        if verbose:
            print(report)
    return model, tokenizer

"""Put the MoE blocks of an mlx-lm model on mlx_moe's fused path, on their existing weights.

`patch(model)` finds every MoE block (a module with a `switch_mlp` that is mlx-lm's
`SwitchGLU`) and, for the architectures it knows, replaces the block's routed-expert path:

* softmax top-k routers (qwen3_moe, qwen2_moe, olmoe, mixtral): the router becomes
  `mlx_moe.route` (fp32 softmax + top-k + the architecture's renormalisation) and the experts
  `mlx_moe.moe_mlp`; qwen2_moe's shared expert and its sigmoid gate stay mlx-lm's code;
* other routers (deepseek_v3, glm4_moe: sigmoid scores, group-limited top-k, scaling): the
  block's own router stays, its output goes to `mlx_moe.moe_mlp`; shared experts stay.

The weights are the block's own arrays (affine 2-8 bit as mlx-community stores them, mxfp4,
or trellis from `python -m mlx_moe.convert`): nothing is converted or copied. A block is
patched by switching its class to a subclass whose `__call__` is the fused one, so its
parameters, `load_weights` and saving are unchanged, and `unpatch` switches it back.
Everything else (unknown architectures, unquantized experts, biases, activations other than
SwiGLU, tensor-parallel blocks) is left untouched and reported."""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx

from .ops import Experts, moe_mlp, route

_MARK = "_mlx_moe_original_class"


@dataclass
class PatchReport:
    """What `patch` did: `patched` and `skipped` are lists of (module path, description)."""

    patched: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    already: list = field(default_factory=list)

    def __len__(self):
        return len(self.patched)

    def __str__(self):
        lines = [f"mlx_moe.patch: {len(self.patched)} MoE block(s) on the fused path"]
        lines += [f"  patched  {p}: {d}" for p, d in self.patched]
        lines += [f"  already  {p}" for p in self.already]
        lines += [f"  skipped  {p}: {d}" for p, d in self.skipped]
        return "\n".join(lines)


def _require_mlx_lm():
    try:
        from mlx_lm.models import switch_layers
    except ImportError as e:
        raise ImportError("mlx_moe.patch needs mlx-lm: pip install 'mlx-moe[lm]'") from e
    return switch_layers


# ---------------------------------------------------------------------------------------------
# The fused __call__ of each kind of block.
def _flat(x):
    return x.reshape(-1, x.shape[-1])


def _softmax_topk_call(normalize):
    """Router: softmax over the experts, top-k, optional renormalisation (`normalize` is a
    function of the block)."""

    def __call__(self, x):
        xf = _flat(x)
        ids, w = route(self.gate(xf), _top_k(self), normalize=normalize(self))
        y = moe_mlp(xf, ids, w, Experts.from_switch_glu(self.switch_mlp)).reshape(x.shape)
        if getattr(self, "shared_expert", None) is not None:  # qwen2_moe
            y = y + mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y

    return __call__


def _own_router_call(self, x):
    """The block's own router (returns expert ids and weights), then the fused experts."""
    inds, scores = self.gate(x)
    shape = x.shape
    y = moe_mlp(_flat(x), inds.reshape(-1, inds.shape[-1]),
                scores.reshape(-1, scores.shape[-1]).astype(mx.float32),
                Experts.from_switch_glu(self.switch_mlp)).reshape(shape)
    if getattr(self, "shared_experts", None) is not None:
        y = y + self.shared_experts(x)
    return y


def _top_k(block):
    return getattr(block, "top_k", None) or getattr(block, "num_experts_per_tok")


# (module of the class, class name) -> (architecture, fused __call__)
_KNOWN = {
    ("mlx_lm.models.qwen3_moe", "Qwen3MoeSparseMoeBlock"):
        ("qwen3_moe", _softmax_topk_call(lambda b: bool(b.norm_topk_prob))),
    ("mlx_lm.models.qwen2_moe", "Qwen2MoeSparseMoeBlock"):
        ("qwen2_moe", _softmax_topk_call(lambda b: False)),
    ("mlx_lm.models.olmoe", "OlmoeSparseMoeBlock"):
        ("olmoe", _softmax_topk_call(lambda b: bool(b.norm_topk_prob))),
    # Mixtral: softmax over the k largest logits == the full softmax's top-k, renormalised.
    ("mlx_lm.models.mixtral", "MixtralSparseMoeBlock"):
        ("mixtral", _softmax_topk_call(lambda b: True)),
    ("mlx_lm.models.deepseek_v3", "DeepseekV3MoE"): ("deepseek_v3", _own_router_call),
    ("mlx_lm.models.glm4_moe", "MoE"): ("glm4_moe", _own_router_call),
}


def _why_not(block, switch_layers) -> str | None:
    """None if the block's experts can run fused, else the reason."""
    sm = block.switch_mlp
    if not isinstance(sm, switch_layers.SwitchGLU):
        return f"switch_mlp is a {type(sm).__name__}, not mlx-lm's SwitchGLU"
    if type(sm.activation) is not switch_layers.SwiGLU:
        return f"activation {type(sm.activation).__name__} is not SwiGLU (silu(gate) * up)"
    if getattr(block, "sharding_group", None) is not None:
        return "tensor-parallel (sharded) block"
    for name in ("gate_proj", "up_proj", "down_proj"):
        layer = getattr(sm, name)
        if "bias" in layer:
            return f"{name} has a bias"
        if not (hasattr(layer, "scales") or hasattr(layer, "quantized_weight")):
            return f"{name} is not quantized (mlx_moe runs quantized experts: mlx_lm.convert -q)"
        mode = getattr(layer, "mode", "affine")
        if mode not in ("affine", "mxfp4", "trellis"):
            return f"{name} is quantized in mode {mode!r}, which mlx_moe does not read"
    return None


def _describe(sm) -> str:
    parts = []
    for name in ("gate_proj", "up_proj", "down_proj"):
        layer = getattr(sm, name)
        parts.append(f"{getattr(layer, 'mode', 'affine')}{layer.bits}")
    return "/".join(parts)


def patch(model, *, verbose: bool = False) -> PatchReport:
    """Put every supported MoE block of an mlx-lm model on the fused path (in place).
    Returns a PatchReport of what was patched and what was left alone (and why); patching
    twice changes nothing more. `unpatch(model)` restores the original blocks."""
    switch_layers = _require_mlx_lm()
    report = PatchReport()
    for path, module in model.named_modules():
        if "switch_mlp" not in module:
            continue
        cls = type(module)
        if hasattr(cls, _MARK):
            report.already.append(path)
            continue
        known = _KNOWN.get((cls.__module__, cls.__name__))
        reason = _why_not(module, switch_layers)
        if reason is None and known is None:
            reason = (f"{cls.__module__}.{cls.__name__}: a router mlx_moe does not know; the "
                      "block keeps mlx-lm's code")
        if reason is not None:
            report.skipped.append((path, reason))
            continue
        arch, call = known
        fused = type(f"Fused{cls.__name__}", (cls,), {"__call__": call, _MARK: cls,
                                                      "__module__": __name__})
        module.__class__ = fused
        report.patched.append((path, f"{arch}, experts {_describe(module.switch_mlp)}"))
    if verbose:
        print(report)
    return report


def unpatch(model) -> int:
    """Restore every block `patch` changed; returns how many."""
    n = 0
    for _, module in model.named_modules():
        original = getattr(type(module), _MARK, None)
        if original is not None:
            module.__class__ = original
            n += 1
    return n

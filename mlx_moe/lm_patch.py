"""Put the MoE blocks of an mlx-lm model on mlx_moe's fused path, on their existing weights.

`patch(model)` finds every MoE block (a module with a `switch_mlp`, or any child that is
mlx-lm's `SwitchGLU`) and, for the architectures it knows, replaces its routed-expert path:

* softmax top-k routers (qwen3_moe, qwen2_moe, qwen3_next, olmoe, mellum, mixtral,
  granitemoe, hunyuan, ernie4_5_moe with a softmax gate): the router becomes `mlx_moe.route`
  (fp32 softmax + top-k + the architecture's renormalisation) and the experts
  `mlx_moe.moe_mlp`; shared experts (qwen2_moe/qwen3_next with their sigmoid gate, hunyuan,
  ernie4_5_moe) stay mlx-lm's code;
* other routers (deepseek_v3, deepseek_v32, glm4_moe, glm4_moe_lite: sigmoid scores,
  correction bias, group-limited top-k, scaling; deepseek, deepseek_v2: their softmax
  greedy / group-limited routers; minimax, lfm2_moe: sigmoid routers written inline in the
  block, reproduced op for op): the block's own router stays, its output goes to
  `mlx_moe.moe_mlp`; shared experts stay.

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


def _softmax_topk_call(normalize, gate=lambda b: b.gate, top_k=None, shared=None):
    """Router: a linear gate (`gate(block)`), softmax over the experts, top-k, optional
    renormalisation (`normalize(block)`), all as `mlx_moe.route`; `shared(block, x)` is the
    block's always-on expert term (mlx-lm's code), added after the routed experts."""
    top_k = top_k or _top_k

    def router(block, x):
        return route(gate(block)(_flat(x)), top_k(block), normalize=normalize(block))

    return _router_call(router, shared)


def _qwen_shared(block, x):
    """qwen2_moe / qwen3_next: a shared expert scaled by a sigmoid gate."""
    return mx.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)


def _shared_experts(block, x):
    """deepseek family / glm4_moe(_lite) / ernie4_5_moe: shared experts added unscaled (when present)."""
    se = getattr(block, "shared_experts", None)
    return None if se is None else se(x)


def _hunyuan_shared(block, x):
    return block.shared_mlp(x) if block.use_shared_mlp else None


def _experts(switch_mlp):
    """The block's Experts, wrapped once and reused while its weight arrays are the same
    objects (a weight update, e.g. load_weights, makes new ones and a new wrapper)."""
    cached = getattr(switch_mlp, "_mlx_moe_experts", None)
    if cached is not None:
        experts, key = cached
        if all(a is b for a, b in zip(key, _weight_arrays(switch_mlp))):
            return experts
    experts = Experts.from_switch_glu(switch_mlp)
    object.__setattr__(switch_mlp, "_mlx_moe_experts", (experts, tuple(_weight_arrays(switch_mlp))))
    return experts


def _weight_arrays(switch_mlp):
    return [getattr(switch_mlp, name).get(key)
            for name in ("gate_proj", "up_proj", "down_proj")
            for key in ("weight", "scales", "biases", "grid", "su", "sv")]


def _router_call(router, shared=None):
    """A router that is not softmax top-k, kept as mlx-lm computes it: `router(block, x)`
    returns (expert ids, weights) from mlx-lm's own code or ops; then the fused experts and
    the block's shared term."""

    def __call__(self, x):
        inds, scores = router(self, x)
        y = moe_mlp(_flat(x), inds.reshape(-1, inds.shape[-1]),
                    scores.reshape(-1, scores.shape[-1]).astype(mx.float32),
                    _experts(self.switch_mlp)).reshape(x.shape)
        extra = shared(self, x) if shared is not None else None
        return y if extra is None else y + extra

    return __call__


# The block's own router module (deepseek's MoEGate and its descendants), shared experts.
_own_router_call = _router_call(lambda b, x: b.gate(x), _shared_experts)


def _minimax_router(block, x):
    """MiniMax's inline router, op for op as mlx-lm's MiniMaxSparseMoeBlock: fp32 sigmoid,
    correction bias for the choice only, renormalised, cast to the activation dtype."""
    scores = mx.sigmoid(block.gate(x.astype(mx.float32)))
    k = block.num_experts_per_tok
    inds = mx.argpartition(-(scores + block.e_score_correction_bias), kth=k - 1, axis=-1)[..., :k]
    scores = mx.take_along_axis(scores, inds, axis=-1)
    scores = scores / (mx.sum(scores, axis=-1, keepdims=True) + 1e-20)
    return inds, scores.astype(x.dtype)


def _lfm2_router(block, x):
    """LFM2-MoE's inline router, op for op as mlx-lm's Lfm2MoeSparseMoeBlock: sigmoid, the
    expert bias for the choice only, optional renormalisation, routed scaling factor."""
    w = mx.sigmoid(block.gate(x))
    k = block.top_k
    choice = w.astype(mx.float32) + block.expert_bias if block.use_expert_bias else w
    inds = mx.argpartition(choice, kth=-k, axis=-1)[..., -k:]
    scores = mx.take_along_axis(w, inds, axis=-1)
    if block.norm_topk_prob:
        scores = scores / (mx.sum(scores, axis=-1, keepdims=True) + 1e-6)
    scores = scores * block.routed_scaling_factor
    return inds, scores.astype(x.dtype)


def _top_k(block):
    return getattr(block, "top_k", None) or getattr(block, "num_experts_per_tok")


def _ernie_check(block):
    if type(block.gate_act).__name__ != "Softmax":
        return (f"router activation {type(block.gate_act).__name__} (moe_gate_act) is not "
                "softmax; the block keeps mlx-lm's code")
    return None


# (module of the class, class name) -> (architecture, fused __call__[, extra check]).
# Each entry reproduces the mlx-lm block's __call__ (mlx-lm 0.32.2): same router semantics,
# same shared-expert term.
_KNOWN = {
    ("mlx_lm.models.qwen3_moe", "Qwen3MoeSparseMoeBlock"):
        ("qwen3_moe", _softmax_topk_call(lambda b: bool(b.norm_topk_prob))),
    ("mlx_lm.models.qwen2_moe", "Qwen2MoeSparseMoeBlock"):
        ("qwen2_moe", _softmax_topk_call(lambda b: False, shared=_qwen_shared)),
    ("mlx_lm.models.qwen3_next", "Qwen3NextSparseMoeBlock"):
        ("qwen3_next", _softmax_topk_call(lambda b: bool(b.norm_topk_prob), shared=_qwen_shared)),
    ("mlx_lm.models.olmoe", "OlmoeSparseMoeBlock"):
        ("olmoe", _softmax_topk_call(lambda b: bool(b.norm_topk_prob))),
    ("mlx_lm.models.mellum", "MellumSparseMoeBlock"):
        ("mellum", _softmax_topk_call(lambda b: bool(b.norm_topk_prob))),
    # Mixtral: softmax over the k largest logits == the full softmax's top-k, renormalised.
    ("mlx_lm.models.mixtral", "MixtralSparseMoeBlock"):
        ("mixtral", _softmax_topk_call(lambda b: True)),
    # GraniteMoE: its router (GraniteMoeTopKGating) is Mixtral's: top-k logits, softmax.
    ("mlx_lm.models.granitemoe", "GraniteMoeMoE"):
        ("granitemoe", _softmax_topk_call(lambda b: True, gate=lambda b: b.router.layer,
                                          top_k=lambda b: b.router.top_k)),
    # Hunyuan: softmax top-k without renormalisation, plus an unscaled shared MLP.
    ("mlx_lm.models.hunyuan", "MoeBlock"):
        ("hunyuan", _softmax_topk_call(lambda b: False, shared=_hunyuan_shared)),
    # ERNIE 4.5: fp32 softmax top-k renormalised (its max(sum, 1e-12) never binds for a
    # softmax), plus unscaled shared experts; the sigmoid-gated variant is left alone.
    ("mlx_lm.models.ernie4_5_moe", "Ernie4_5_MoeMLP"):
        ("ernie4_5_moe", _softmax_topk_call(lambda b: True, top_k=lambda b: b.k,
                                            shared=_shared_experts), _ernie_check),
    ("mlx_lm.models.deepseek_v3", "DeepseekV3MoE"): ("deepseek_v3", _own_router_call),
    ("mlx_lm.models.glm4_moe", "MoE"): ("glm4_moe", _own_router_call),
    ("mlx_lm.models.glm4_moe_lite", "Glm4MoeLiteMoE"): ("glm4_moe_lite", _own_router_call),
    ("mlx_lm.models.deepseek_v32", "DeepseekV32MoE"): ("deepseek_v32", _own_router_call),
    ("mlx_lm.models.deepseek_v2", "DeepseekV2MoE"): ("deepseek_v2", _own_router_call),
    ("mlx_lm.models.deepseek", "DeepseekMoE"): ("deepseek", _own_router_call),
    ("mlx_lm.models.minimax", "MiniMaxSparseMoeBlock"): ("minimax", _router_call(_minimax_router)),
    ("mlx_lm.models.lfm2_moe", "Lfm2MoeSparseMoeBlock"): ("lfm2_moe", _router_call(_lfm2_router)),
}


def _experts_child(module, switch_layers) -> str | None:
    """The name under which a module holds its routed experts (a `switch_mlp`, or any direct
    child that is mlx-lm's SwitchGLU / SwitchMLP: llama4, gpt_oss, dots1, ... call it
    `experts`), or None for a module that is not a MoE block."""
    if "switch_mlp" in module:
        return "switch_mlp"
    for name, child in module.items():
        if isinstance(child, (switch_layers.SwitchGLU, switch_layers.SwitchMLP)):
            return name
    return None


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
        experts = _experts_child(module, switch_layers)
        if experts is None:
            continue
        cls = type(module)
        if hasattr(cls, _MARK):
            report.already.append(path)
            continue
        if experts != "switch_mlp":
            report.skipped.append((path, f"{cls.__module__}.{cls.__name__}: a MoE block mlx_moe "
                                         f"does not know (experts in .{experts}); the block keeps "
                                         "mlx-lm's code"))
            continue
        known = _KNOWN.get((cls.__module__, cls.__name__))
        reason = _why_not(module, switch_layers)
        if reason is None and known is not None and len(known) > 2:
            reason = known[2](module)
        if reason is None and known is None:
            reason = (f"{cls.__module__}.{cls.__name__}: a router mlx_moe does not know; the "
                      "block keeps mlx-lm's code")
        if reason is not None:
            report.skipped.append((path, reason))
            continue
        arch, call = known[:2]
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

"""A Qwen3-30B-A3B MoE layer through mlx-lm's own block and through mlx_moe, side by side.

Builds mlx-lm's `Qwen3MoeSparseMoeBlock` with the real shapes (128 experts, top-8, hidden
2048, expert width 768) and random 4-bit weights in MLX's affine layout (group 64: what
mlx-community checkpoints store), then runs, on the same input, for a few token counts:

* mlx-lm: softmax, argpartition, `SwitchGLU` (three `mx.gather_qmm`), weighted sum;
* mlx_moe: `route` (fp32 softmax + top-k) and `moe_mlp` (gate + up + SwiGLU + down + combine
  in one primitive) on the same quantized weights, no conversion.

It prints the error of ours against mlx-lm's and a timing table. `mlx_moe.patch(model)` does
the same swap for every MoE block of a whole mlx-lm model (examples/generate.py).

    python examples/qwen3_moe_layer.py [--tokens 1 4 16] [--repeats 3]
"""

import argparse
import time

import numpy as np

import mlx.core as mx
import mlx.nn as nn

import mlx_moe

try:
    from mlx_lm.models.qwen3_moe import ModelArgs, Qwen3MoeSparseMoeBlock
except ImportError as e:  # pragma: no cover
    raise SystemExit("this example needs mlx-lm: pip install '.[examples]'") from e

E, K, D, F = 128, 8, 2048, 768  # Qwen3-30B-A3B


def make_block(seed=0):
    args = ModelArgs(model_type="qwen3_moe", hidden_size=D, num_hidden_layers=1,
                     intermediate_size=6144, num_attention_heads=32, num_experts=E,
                     num_experts_per_tok=K, decoder_sparse_step=1, mlp_only_layers=[],
                     moe_intermediate_size=F, rms_norm_eps=1e-6, vocab_size=151936,
                     num_key_value_heads=4, head_dim=128, rope_theta=1e6,
                     tie_word_embeddings=False, max_position_embeddings=40960,
                     norm_topk_prob=True)
    block = Qwen3MoeSparseMoeBlock(args)
    # Quantize the experts (mlx-lm's QuantizedSwitchLinear), then give them random codes,
    # scales and biases directly: drawing 600M float weights first would take minutes.
    nn.quantize(block, group_size=64, bits=4, class_predicate=lambda _, m: hasattr(m, "num_experts"))
    mx.random.seed(seed)
    for name in ("gate_proj", "up_proj", "down_proj"):
        layer = getattr(block.switch_mlp, name)
        groups = layer.scales.shape
        shape = layer.weight.shape
        hi, lo = (mx.random.randint(0, 1 << 16, shape).astype(mx.uint32) for _ in range(2))
        layer.weight = (hi << 16) | lo  # uniformly random 4-bit codes
        scale = mx.random.uniform(0.5, 1.5, groups) * (0.04 / 15)
        layer.scales = scale.astype(mx.bfloat16)
        layer.biases = (-7.5 * scale * mx.random.uniform(0.8, 1.2, groups)).astype(mx.bfloat16)
    block.gate.weight = (mx.random.normal((E, D)) * 0.05).astype(mx.bfloat16)
    mx.eval(block.parameters())
    return block


def ours(block, experts, x):
    """mlx-lm's block, on mlx_moe's primitives."""
    ids, weights = mlx_moe.route(block.gate(x), block.top_k, normalize=block.norm_topk_prob)
    return mlx_moe.moe_mlp(x, ids, weights, experts)


def timed(fn, repeats, budget_s=3.0):
    """Median wall time (ms) of `repeats` evaluated calls, after one warm-up call; calls that
    would take the total past `budget_s` are skipped (the slow baseline on a CPU)."""
    t = time.perf_counter()
    mx.eval(fn())  # warm-up (and lazy graph construction)
    first = time.perf_counter() - t
    times = [] if first * (repeats + 1) < budget_s else [first]
    while len(times) < repeats and sum(times) + first < budget_s or not times:
        t = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3


def float64_reference(experts, x, ids, w):
    """The layer in float64 (NumPy) from the dequantized weights, for the given routing."""
    x64 = np.array(x.astype(mx.float32), dtype=np.float64)
    ids_np, w64 = np.array(ids), np.array(w, dtype=np.float64)
    dense = {}

    def weight(q, e):  # 4-bit affine, straight from the layout (docs/FORMATS.md)
        key = (id(q), e)
        if key not in dense:
            words = np.array(q.w[e])
            codes = (words[..., None] >> (4 * np.arange(8, dtype=np.uint32))) & 0xF
            codes = codes.reshape(words.shape[0], -1).astype(np.float64)
            s = np.repeat(np.array(q.scales[e].astype(mx.float32), np.float64), q.group_size, -1)
            b = np.repeat(np.array(q.biases[e].astype(mx.float32), np.float64), q.group_size, -1)
            dense[key] = s * codes + b
        return dense[key]

    y = np.zeros_like(x64)
    for t in range(x64.shape[0]):
        for j in range(ids_np.shape[1]):
            e = int(ids_np[t, j])
            g, u = weight(experts.gate, e) @ x64[t], weight(experts.up, e) @ x64[t]
            y[t] += w64[t, j] * (weight(experts.down, e) @ (g / (1 + np.exp(-g)) * u))
    return mx.array(y.astype(np.float32))


def rel_err(a, b):
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return (mx.linalg.norm(a - b) / mx.linalg.norm(b)).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    print(f"Qwen3-30B-A3B MoE layer: {E} experts, top-{K}, hidden {D}, expert width {F}, "
          f"affine 4-bit (group 64), bfloat16 activations, on {mx.default_device()}")
    block = make_block()
    experts = mlx_moe.Experts.from_switch_glu(block.switch_mlp)  # the same arrays, no copy

    rows = []
    for T in args.tokens:
        x = (mx.random.normal((1, T, D), key=mx.random.key(T))).astype(mx.bfloat16)
        ref = block(x)[0]
        y = ours(block, experts, x[0])
        # The experts, on the same routing: mlx-lm's SwitchGLU + weighted sum vs moe_mlp.
        ids, w = mlx_moe.route(block.gate(x[0]), K)
        swiglu = (block.switch_mlp(x[0], ids) * w[..., None].astype(mx.bfloat16)).sum(-2)
        y_same = mlx_moe.moe_mlp(x[0], ids, w, experts)
        mlp_err = rel_err(y_same, swiglu)
        if T <= 16:  # float64 check (a Python loop over tokens)
            y64 = float64_reference(experts, x[0], ids, w)
            exact = f"; vs float64: mlx_moe {rel_err(y_same, y64):.1e}, mlx-lm {rel_err(swiglu, y64):.1e}"
        else:
            exact = ""
        # The routers: mlx-lm ranks bfloat16 probabilities, mlx_moe float32 ones.
        gates = mx.softmax(block.gate(x[0]), axis=-1, precise=True)
        ref_ids = mx.sort(mx.argpartition(gates, kth=-K, axis=-1)[..., -K:], axis=-1)
        same = mx.all(ref_ids == mx.sort(ids.astype(ref_ids.dtype), axis=-1), axis=-1).sum().item()
        t_ref = timed(lambda: block(x), args.repeats)
        t_ours = timed(lambda: ours(block, experts, x[0]), args.repeats)
        rows.append((T, t_ref, t_ours))
        print(f"  {T:4d} tokens: experts on the same routing: mlx_moe vs mlx-lm relative "
              f"error {mlp_err:.1e}{exact}")
        print(f"              "
              f"same top-{K} set for {same}/{T} tokens; whole layer relative error "
              f"{rel_err(y, ref):.1e}, max |diff| {mx.abs(y.astype(mx.float32) - ref.astype(mx.float32)).max().item():.2g} "
              f"(max |y| {mx.abs(ref).max().item():.2g})", flush=True)

    print("\n| tokens | mlx-lm ms | mlx_moe ms | speed-up |")
    print("|---:|---:|---:|---:|")
    for T, t_ref, t_ours in rows:
        print(f"| {T} | {t_ref:.2f} | {t_ours:.2f} | {t_ref / t_ours:.1f}x |")
    print("\nSame 4-bit weights on both paths. On the same routing the experts differ by\n"
          "rounding: mlx-lm's CPU gather_qmm works in bfloat16 for bfloat16 inputs and rounds\n"
          "the gate/up outputs and the SwiGLU product to bfloat16; mlx_moe accumulates in\n"
          "float32 and rounds once (its error against float64 is that one rounding). The\n"
          "routers may pick a different expert where two probabilities tie in bfloat16\n"
          "(mlx-lm ranks bfloat16 values, mlx_moe float32 ones).")


if __name__ == "__main__":
    main()

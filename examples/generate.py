"""Greedy generation with an mlx-lm MoE model, on mlx-lm's path and then on mlx_moe's.

    python examples/generate.py MODEL_DIR "Why is the sky blue?" [--max-tokens 64]
    python examples/generate.py            # no model: a tiny random Qwen3-MoE, made locally

MODEL_DIR is a local mlx-lm checkpoint directory (for example one `mlx_lm.convert -q` wrote,
or an mlx-community download), or one `python -m mlx_moe.convert` rewrote. The script loads
it, generates greedily with mlx-lm's code, patches the MoE blocks with `mlx_moe.patch`, and
generates again: it prints what was patched, both texts, whether the tokens agree, and the
speed of each.
"""

import argparse
import time

import mlx.core as mx

import mlx_moe

try:
    from mlx_lm.generate import generate_step
except ImportError as e:  # pragma: no cover
    raise SystemExit("this example needs mlx-lm: pip install '.[examples]'") from e


def tiny_random_model():
    """Qwen3-MoE with 2 layers, 8 experts, 4-bit experts: random weights, made here."""
    from mlx_lm.models import qwen3_moe
    from mlx_lm.utils import quantize_model

    mx.random.seed(0)
    args = qwen3_moe.ModelArgs(
        model_type="qwen3_moe", hidden_size=256, num_hidden_layers=2, intermediate_size=512,
        num_attention_heads=8, num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1,
        mlp_only_layers=[], moe_intermediate_size=128, rms_norm_eps=1e-6, vocab_size=1000,
        num_key_value_heads=4, head_dim=32, rope_theta=1e6, tie_word_embeddings=False,
        max_position_embeddings=4096, norm_topk_prob=True)
    model = qwen3_moe.Model(args)
    quantize_model(model, {}, group_size=64, bits=4)
    mx.eval(model.parameters())
    return model


def run(model, prompt, max_tokens):
    tokens, t0, t_first = [], time.perf_counter(), None
    for tok, _ in generate_step(prompt, model, max_tokens=max_tokens,
                                sampler=lambda x: mx.argmax(x, axis=-1)):
        tokens.append(int(tok))
        if t_first is None:
            t_first = time.perf_counter()
    t_end = time.perf_counter()
    rate = (len(tokens) - 1) / (t_end - t_first) if len(tokens) > 1 else float("nan")
    return tokens, rate


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", help="local mlx-lm model directory")
    ap.add_argument("prompt", nargs="?", default="Mixture-of-experts layers are fast when")
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()

    if args.model:
        model, tokenizer = mlx_moe.load(args.model, patch=False)
        if tokenizer is None:
            raise SystemExit(f"{args.model} has no tokenizer files")
        text = args.prompt
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                 add_generation_prompt=True, tokenize=False)
        prompt = mx.array(tokenizer.encode(text))
        decode = tokenizer.decode
    else:
        print("No model directory given: using a tiny random Qwen3-MoE model made locally "
              "(its text is noise; token ids are shown).")
        model, decode = tiny_random_model(), (lambda ids: " ".join(map(str, ids)))
        prompt = mx.array([1, 2, 3, 4, 5])

    ref_tokens, ref_rate = run(model, prompt, args.max_tokens)
    report = mlx_moe.patch(model)
    print(report)
    tokens, rate = run(model, prompt, args.max_tokens)

    print(f"\nmlx-lm  ({ref_rate:6.1f} tokens/s): {decode(ref_tokens)!r}")
    print(f"mlx_moe ({rate:6.1f} tokens/s): {decode(tokens)!r}")
    same = next((i for i, (a, b) in enumerate(zip(ref_tokens, tokens)) if a != b), None)
    if same is None:
        print(f"\nThe {len(tokens)} greedy tokens are identical; speed-up {rate / ref_rate:.2f}x "
              f"on {mx.default_device()}.")
    else:
        print(f"\nThe greedy tokens agree up to token {same}: a near-tie resolved differently by "
              "rounding (mlx_moe accumulates in float32, mlx-lm in the model's dtype); "
              f"speed-up {rate / ref_rate:.2f}x on {mx.default_device()}.")


if __name__ == "__main__":
    main()

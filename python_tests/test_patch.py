"""mlx_moe.patch on mlx-lm models: tiny random models built from mlx-lm's own ModelArgs (no
download), quantized with mlx-lm's own quantize_model, patched against unpatched.

Tolerance of the logits: both paths use the same quantized weights and float32 activations;
they differ only in summation order inside the expert projections (fp32, K <= 64 terms:
relative ~1e-6 per layer) and in the router's softmax (fp32 both). Through 2 layers and the
LM head that stays far below 1e-4 of the logits' scale; the assertion uses 1e-4 * max|logit|.
Measured: 1e-7 to 6e-7 of max|logit| for every architecture here, while a wrong router
(renormalising or not when mlx-lm does the opposite) or a dropped shared expert moves the
logits by 0.17 to 0.39 of max|logit|: the bound is ~200x above rounding and ~1000x below a
semantic error. The 32 greedy tokens must be identical (argmax over logits that agree to that
precision)."""

import subprocess
import sys

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
import mlx_moe

mlx_lm = pytest.importorskip("mlx_lm")
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.utils import quantize_model  # noqa: E402

COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              rms_norm_eps=1e-6)
# Multi-head latent attention (deepseek_v2/v32, glm4_moe_lite), tiny.
MLA = dict(kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=16, v_head_dim=16, qk_nope_head_dim=16)
CONFIGS = {
    "qwen3_moe": dict(intermediate_size=128, num_experts=8, num_experts_per_tok=2,
                      decoder_sparse_step=1, mlp_only_layers=[], moe_intermediate_size=32,
                      num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
                      tie_word_embeddings=False, max_position_embeddings=512, norm_topk_prob=True),
    "qwen2_moe": dict(intermediate_size=128, num_experts_per_tok=2, num_experts=8,
                      moe_intermediate_size=32, shared_expert_intermediate_size=64,
                      num_key_value_heads=2),
    "mixtral": dict(intermediate_size=32, num_key_value_heads=2, num_local_experts=8,
                    num_experts_per_tok=2),
    "olmoe": dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
    "qwen3_next": dict(intermediate_size=128, linear_num_value_heads=2, linear_num_key_heads=2,
                       linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
                       num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1,
                       shared_expert_intermediate_size=64, mlp_only_layers=[],
                       moe_intermediate_size=32, num_key_value_heads=2, rope_theta=10000.0,
                       partial_rotary_factor=0.5, max_position_embeddings=512, head_dim=16,
                       norm_topk_prob=True, full_attention_interval=2),
    "mellum": dict(intermediate_size=128, num_experts=8, num_experts_per_tok=2,
                   moe_intermediate_size=32, num_key_value_heads=2, head_dim=16,
                   tie_word_embeddings=False, max_position_embeddings=512, norm_topk_prob=True,
                   sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                   rope_parameters={"sliding_attention": {"rope_theta": 10000.0},
                                    "full_attention": {"rope_theta": 10000.0}}),
    "hunyuan": dict(intermediate_size=64, num_key_value_heads=2, attention_bias=False, moe_topk=2,
                    num_experts=8, num_shared_expert=1, use_mixed_mlp_moe=True, use_qk_norm=True,
                    rope_theta=10000.0, use_cla=False, cla_share_factor=2, moe_intermediate_size=32,
                    rope_scaling={"alpha": 1.0, "factor": 1.0, "type": "dynamic"}),
    # granitemoe's quant_predicate puts mlp.down_proj (so the experts' down_proj) at 8-bit,
    # group 64: mixed bits per projection, and an expert width of 64.
    "granitemoe": dict(intermediate_size=64, logits_scaling=4.0, attention_multiplier=0.125,
                       embedding_multiplier=12.0, residual_multiplier=0.22,
                       max_position_embeddings=512, num_key_value_heads=2, attention_bias=False,
                       rope_theta=10000.0, num_local_experts=8, num_experts_per_tok=2),
    "ernie4_5_moe": dict(intermediate_size=128, max_position_embeddings=512, num_key_value_heads=2,
                         rope_theta=10000.0, use_bias=False, tie_word_embeddings=True,
                         moe_num_experts=8, moe_layer_start_index=0, moe_intermediate_size=32,
                         moe_k=2, moe_num_shared_experts=1, head_dim=16),
    "minimax": dict(intermediate_size=32, num_key_value_heads=2, max_position_embeddings=512,
                    num_experts_per_tok=2, num_local_experts=8, shared_intermediate_size=0,
                    rope_theta=10000.0, rotary_dim=8, head_dim=16),
    "lfm2_moe": dict(intermediate_size=128, moe_intermediate_size=32, num_experts=8,
                     num_experts_per_tok=2, norm_topk_prob=True, num_key_value_heads=2,
                     max_position_embeddings=512, use_expert_bias=True, num_dense_layers=0,
                     norm_eps=1e-5, conv_bias=False, conv_L_cache=3, routed_scaling_factor=1.5,
                     layer_types=["conv", "full_attention"]),
    "deepseek_v3": dict(intermediate_size=128, moe_intermediate_size=32, num_key_value_heads=4,
                        n_shared_experts=1, n_routed_experts=8, routed_scaling_factor=2.5,
                        kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=16, v_head_dim=16,
                        qk_nope_head_dim=16, topk_method="noaux_tc", scoring_func="sigmoid",
                        norm_topk_prob=True, n_group=2, topk_group=1, num_experts_per_tok=2,
                        moe_layer_freq=1, first_k_dense_replace=1, max_position_embeddings=512,
                        rope_theta=10000.0, rope_scaling=None, attention_bias=False),
    "deepseek": dict(intermediate_size=128, moe_intermediate_size=32, num_key_value_heads=4,
                     n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
                     first_k_dense_replace=1, max_position_embeddings=512),
    "deepseek_v2": dict(intermediate_size=128, moe_intermediate_size=32, num_key_value_heads=4,
                        n_shared_experts=1, n_routed_experts=8, routed_scaling_factor=1.5, **MLA,
                        topk_method="group_limited_greedy", n_group=2, topk_group=1,
                        rope_scaling={"factor": 1.0, "original_max_position_embeddings": 512},
                        num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=512),
    "deepseek_v32": dict(intermediate_size=128, moe_intermediate_size=32, num_key_value_heads=4,
                         index_head_dim=32, index_n_heads=2, index_topk=8,
                         n_shared_experts=1, n_routed_experts=8, routed_scaling_factor=2.5, **MLA,
                         n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
                         max_position_embeddings=512),
    "glm4_moe_lite": dict(intermediate_size=128, moe_intermediate_size=32, num_key_value_heads=4,
                          n_shared_experts=1, n_routed_experts=8, routed_scaling_factor=1.8, **MLA,
                          n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
                          max_position_embeddings=512, num_nextn_predict_layers=0),
    "glm4_moe": dict(intermediate_size=128, max_position_embeddings=512, moe_intermediate_size=32,
                     norm_topk_prob=True, n_group=1, head_dim=16, topk_group=1, n_shared_experts=1,
                     n_routed_experts=8, routed_scaling_factor=1.5, num_experts_per_tok=2,
                     first_k_dense_replace=1, num_key_value_heads=2, rope_theta=10000.0,
                     rope_scaling=None, use_qk_norm=False, tie_word_embeddings=False,
                     attention_bias=False, partial_rotary_factor=0.5),
}


def tiny_model(arch, seed=0, bits=4, mode="affine", group_size=32, **overrides):
    import importlib
    mod = importlib.import_module(f"mlx_lm.models.{arch}")
    mx.random.seed(seed)
    args = mod.ModelArgs.from_dict({"model_type": arch, **COMMON, **CONFIGS[arch], **overrides})
    model = mod.Model(args)
    # Routers that initialise to zeros (deepseek-style MoEGate) get random weights too, and the
    # selection biases (e_score_correction_bias, lfm2_moe's expert_bias) random values, so
    # that the choice differs from the plain top-k of the scores.
    for _, m in model.named_modules():
        if type(m).__name__ == "MoEGate":
            m.weight = mx.random.normal(m.weight.shape) * 0.5
        for bias in ("e_score_correction_bias", "expert_bias"):
            if bias in m:
                m[bias] = mx.random.normal(m[bias].shape) * 0.1
    quantize_model(model, {}, group_size=group_size, bits=bits, mode=mode)
    mx.eval(model.parameters())
    return model


def greedy(model, prompt, n=32):
    out = []
    for tok, _ in generate_step(prompt, model, max_tokens=n, sampler=lambda x: mx.argmax(x, axis=-1)):
        out.append(int(tok))
    return out


def logits_close(a, b):
    a, b = np.array(a, np.float64), np.array(b, np.float64)
    assert np.all(np.abs(a - b) <= 1e-4 * np.abs(b).max()), np.abs(a - b).max()


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_patched_model_matches_mlx_lm(arch):
    model = tiny_model(arch)
    prompt = mx.array(np.random.default_rng(1).integers(0, 256, 12).astype(np.uint32))
    ref_logits = model(prompt[None])
    ref_tokens = greedy(model, prompt)
    report = mlx_moe.patch(model)
    moe_layers = 2 - CONFIGS[arch].get("first_k_dense_replace", 0)
    assert len(report.patched) == moe_layers and not report.skipped, str(report)
    assert report.patched[0][1].startswith(arch + ",")
    logits_close(model(prompt[None]), ref_logits)
    assert greedy(model, prompt) == ref_tokens
    # the fused path really ran: the block's class is the patched one
    assert all(type(m).__name__.startswith("Fused") for p, m in model.named_modules()
               if p in dict(report.patched))


@pytest.mark.parametrize("bits,mode,group_size", [(8, "affine", 32), (3, "affine", 32), (4, "mxfp4", 32)])
def test_patch_other_formats(bits, mode, group_size):
    model = tiny_model("qwen3_moe", seed=2, bits=bits, mode=mode, group_size=group_size)
    prompt = mx.array(np.arange(9, dtype=np.uint32) * 7)
    ref = model(prompt[None])
    report = mlx_moe.patch(model)
    assert len(report.patched) == 2
    assert f"{mode}{bits}" in report.patched[0][1]
    logits_close(model(prompt[None]), ref)


def test_unpatch_restores_and_patch_is_idempotent():
    model = tiny_model("qwen2_moe", seed=3)
    prompt = mx.array(np.arange(10, dtype=np.uint32))
    ref = np.array(model(prompt[None]))
    first = mlx_moe.patch(model)
    second = mlx_moe.patch(model)
    assert len(first.patched) == 2 and not second.patched and len(second.already) == 2
    assert mlx_moe.unpatch(model) == 2
    assert not any(type(m).__name__.startswith("Fused") for _, m in model.named_modules())
    np.testing.assert_array_equal(np.array(model(prompt[None])), ref)  # mlx-lm's code again


def test_unsupported_blocks_are_left_alone_and_reported():
    from mlx_lm.models.switch_layers import SwitchGLU
    # Unquantized experts: left on mlx-lm's path.
    import importlib
    mod = importlib.import_module("mlx_lm.models.qwen3_moe")
    model = mod.Model(mod.ModelArgs.from_dict({"model_type": "qwen3_moe", **COMMON, **CONFIGS["qwen3_moe"]}))
    report = mlx_moe.patch(model)
    assert not report.patched and len(report.skipped) == 2
    assert "not quantized" in report.skipped[0][1]
    # A non-SwiGLU activation, and an unknown block class.
    model = tiny_model("qwen3_moe", seed=4)
    blocks = [m for _, m in model.named_modules() if "switch_mlp" in m]
    blocks[0].switch_mlp.activation = nn.GELU()

    class MyMoE(nn.Module):
        def __init__(self, sm):
            super().__init__()
            self.switch_mlp = sm

    class OtherMoE(nn.Module):  # experts under another name, as llama4 / gpt_oss / dots1
        def __init__(self, sm):
            super().__init__()
            self.experts = sm

    model.extra = MyMoE(blocks[1].switch_mlp)
    model.other = OtherMoE(blocks[1].switch_mlp)
    report = mlx_moe.patch(model)
    reasons = dict(report.skipped)
    assert any("not SwiGLU" in r for r in reasons.values())
    assert "router mlx_moe does not know" in reasons["extra"]
    assert "experts in .experts" in reasons["other"]
    assert len(report.patched) == 1 and isinstance(blocks[1].switch_mlp, SwitchGLU)
    assert "skipped" in str(report)
    # ERNIE 4.5 with a sigmoid router (moe_gate_act): a known block class, but not softmax.
    model = tiny_model("ernie4_5_moe", seed=5, moe_gate_act="sigmoid")
    report = mlx_moe.patch(model)
    assert not report.patched and len(report.skipped) == 2
    assert all("not softmax" in r for _, r in report.skipped)


def test_import_without_mlx_lm_and_clear_patch_error(tmp_path):
    code = ("import sys; sys.modules['mlx_lm'] = None\n"
            "import mlx_moe\n"
            "try:\n"
            "    mlx_moe.patch(object())\n"
            "except ImportError as e:\n"
            "    print('ERR', e)\n")
    # From outside the source tree (from the repository root, the unbuilt source package
    # would shadow the installed one).
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "ERR mlx_moe.patch needs mlx-lm: pip install" in r.stdout


def _run_example(name, *args):
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, str(root / "examples" / name), *args],
                          capture_output=True, text=True, cwd=root / "examples", timeout=600)


def test_generate_example_without_a_model():
    r = _run_example("generate.py", "--max-tokens", "12")
    assert r.returncode == 0, r.stderr
    assert "tiny random Qwen3-MoE" in r.stdout and "2 MoE block(s) on the fused path" in r.stdout
    assert "greedy tokens are identical" in r.stdout


def test_qwen3_layer_example_runs():
    r = _run_example("qwen3_moe_layer.py", "--tokens", "1", "--repeats", "1")
    assert r.returncode == 0, r.stderr
    assert "| 1 |" in r.stdout and "speed-up" in r.stdout

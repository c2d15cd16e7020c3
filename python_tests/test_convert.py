"""The converter CLI on a tiny random mlx-lm model the test writes to a temporary
directory (no download): the fp4 checkpoint it writes must hold exactly MLX's own
mx.quantize(mode="mxfp4") of the original experts, load with plain mlx-lm, and leave every
other tensor untouched."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mlx.core as mx

mlx_lm = pytest.importorskip("mlx_lm")
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.models import qwen3_moe  # noqa: E402
from mlx_lm.utils import load_model  # noqa: E402

from mlx_moe import convert  # noqa: E402

ARGS = dict(model_type="qwen3_moe", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
            num_attention_heads=4, num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1,
            mlp_only_layers=[], moe_intermediate_size=64, rms_norm_eps=1e-6, vocab_size=97,
            num_key_value_heads=2, head_dim=16, rope_theta=10000.0, tie_word_embeddings=False,
            max_position_embeddings=512, norm_topk_prob=True)


def write_tiny_model(path: Path, quantize: bool):
    mx.random.seed(7)
    model = qwen3_moe.Model(qwen3_moe.ModelArgs.from_dict(ARGS))
    config = dict(ARGS)
    if quantize:
        nn.quantize(model, group_size=32, bits=4)
        config["quantization"] = {"group_size": 32, "bits": 4}
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    path.mkdir(parents=True)
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer.json").write_text("{}")  # any other file travels unchanged
    return weights


def run_cli(tmp_path, *args):
    """Run ``python -m mlx_moe.convert`` as a user would, from a directory outside the source
    tree (from the repository root, ``-m`` would import the unbuilt source package)."""
    return subprocess.run([sys.executable, "-m", "mlx_moe.convert", *map(str, args)],
                          capture_output=True, text=True, cwd=tmp_path)


@pytest.mark.parametrize("quantized", [True, False])
def test_convert_fp4(tmp_path, quantized):
    src, dst = tmp_path / "src", tmp_path / "dst"
    original = write_tiny_model(src, quantized)
    r = run_cli(tmp_path, src, dst, "--format", "fp4")
    assert r.returncode == 0, r.stderr
    assert "converted 6 expert projections" in r.stdout
    assert (dst / "tokenizer.json").read_text() == "{}"
    out = mx.load(str(dst / "model.safetensors"))
    config = json.loads((dst / "config.json").read_text())
    experts = [k[: -len(".weight")] for k in original if ".switch_mlp." in k and k.endswith(".weight")]
    assert len(experts) == 6
    for path in experts:
        if quantized:
            dense = mx.dequantize(original[f"{path}.weight"], original[f"{path}.scales"],
                                  original[f"{path}.biases"], group_size=32, bits=4, dtype=mx.float32)
        else:
            dense = original[f"{path}.weight"].astype(mx.float32)
        ref_w, ref_s = mx.quantize(dense, group_size=32, bits=4, mode="mxfp4")
        assert np.array_equal(np.array(out[f"{path}.weight"]), np.array(ref_w))
        assert np.array_equal(np.array(out[f"{path}.scales"]), np.array(ref_s))
        assert f"{path}.biases" not in out
        assert config["quantization"][path] == {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    for k, v in original.items():
        if ".switch_mlp." not in k:
            assert np.array_equal(np.array(out[k].astype(mx.float32)), np.array(v.astype(mx.float32))), k
    # Plain mlx-lm loads it, with the experts as mxfp4 QuantizedSwitchLinear.
    model, _ = load_model(dst)
    sw = model.model.layers[0].mlp.switch_mlp.gate_proj
    assert sw.mode == "mxfp4" and sw.bits == 4 and sw.group_size == 32
    logits = model(mx.array([[1, 2, 3]]))
    assert logits.shape == (1, 3, ARGS["vocab_size"]) and bool(mx.all(mx.isfinite(logits)))


def test_convert_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        convert.convert(tmp_path, tmp_path / "out", "fp4", progress=False)
    src = tmp_path / "src"
    write_tiny_model(src, True)
    with pytest.raises(ValueError, match="format must be"):
        convert.convert(src, tmp_path / "out", "int3", progress=False)
    with pytest.raises(ValueError, match="--bits"):
        convert.convert(src, tmp_path / "out", "trellis", bits="9,2,3", progress=False)
    with pytest.raises(ValueError, match="--bits"):
        convert.convert(src, tmp_path / "out", "trellis", bits=None, progress=False)
    with pytest.raises(ValueError, match="must differ"):
        convert.convert(src, src, "fp4", progress=False)
    r = run_cli(tmp_path, src, tmp_path / "o", "--format", "fp4", "--bits", "3")
    assert r.returncode == 2 and "--bits does not apply" in r.stderr


def test_convert_trellis_and_load(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    original = write_tiny_model(src, True)
    r = run_cli(tmp_path, src, dst, "--format", "trellis", "--bits", "6,2,3", "--group-size", "32")
    assert r.returncode == 0, r.stderr
    config = json.loads((dst / "config.json").read_text())
    mods = config["mlx_moe"]["modules"]
    assert {p.rsplit(".", 1)[1]: m["bits"] for p, m in mods.items()} == {
        "gate_proj": 6, "up_proj": 2, "down_proj": 3}
    from mlx_moe.formats import trellis
    from mlx_moe.layers import TrellisSwitchLinear
    import mlx_moe

    model, tok = mlx_moe.load(dst, patch=False)
    assert tok is None
    layer = model.model.layers[1].mlp.switch_mlp
    assert isinstance(layer.gate_proj, TrellisSwitchLinear) and layer.gate_proj.bits == 6
    # The stored experts decode (reference decoder) to a quantization of the original ones.
    dense = np.array(mx.dequantize(original["model.layers.1.mlp.switch_mlp.gate_proj.weight"],
                                   original["model.layers.1.mlp.switch_mlp.gate_proj.scales"],
                                   original["model.layers.1.mlp.switch_mlp.gate_proj.biases"],
                                   group_size=32, bits=4, dtype=mx.float32))
    dec = trellis.dequantize_reference(layer.gate_proj.quantized_weight())
    assert np.mean((dec - dense) ** 2) < 0.01 * np.var(dense)  # 6-bit
    logits = model(mx.array([[1, 2, 3]]))
    assert bool(mx.all(mx.isfinite(logits)))


def test_trellis_checkpoint_runs_fused_after_load(tmp_path):
    """mlx_moe.load(patch=True) puts the trellis experts on the fused path; its logits agree
    with the same model's unpatched path (dequantize + gather_mm, float32): same weights,
    different summation order only (1e-4 of the logits' scale)."""
    import mlx_moe

    src, dst = tmp_path / "src", tmp_path / "dst"
    write_tiny_model(src, True)
    r = run_cli(tmp_path, src, dst, "--format", "trellis", "--bits", "4,3,5", "--group-size", "32")
    assert r.returncode == 0, r.stderr
    tokens = mx.array([[5, 17, 3, 64, 2, 90]])
    plain, _ = mlx_moe.load(dst, patch=False)
    ref = np.array(plain(tokens), np.float64)
    fused, _ = mlx_moe.load(dst, patch=True)
    assert type(fused.model.layers[0].mlp).__name__.startswith("Fused")
    got = np.array(fused(tokens), np.float64)
    assert np.all(np.abs(got - ref) <= 1e-4 * np.abs(ref).max()), np.abs(got - ref).max()

"""Rewrite the routed-expert weights of a local mlx-lm checkpoint into another format.

    python -m mlx_moe.convert MODEL_DIR OUT_DIR --format fp4
    python -m mlx_moe.convert MODEL_DIR OUT_DIR --format trellis --bits 6,2,3

Only the stacked expert projections (``*.switch_mlp.{gate,up,down}_proj``) change; every
other tensor and file is copied as it is. Expert weights are first dequantized from what
the checkpoint holds (float, or any mode mlx-lm wrote: affine, mxfp4, ...) to float32.

* ``fp4``: MLX's ``mxfp4`` layout (FP4 E2M1, E8M0 scales per 32), recorded as per-module
  quantization in ``config.json``: the result loads with plain ``mlx_lm.load`` and with
  ``mlx_moe.load``.
* ``trellis``: the trellis k-bit format (docs/FORMATS.md), bits per projection in the order
  gate, up, down (one value for all three). Recorded under ``config["mlx_moe"]``; load it
  with ``mlx_moe.load(OUT_DIR)``, which builds the model with mlx-lm and puts the fused
  path on its MoE blocks.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import mlx.core as mx

from ._progress import progress as show_progress

EXPERT_RE = re.compile(r"^(.*\.switch_mlp\.(gate_proj|up_proj|down_proj))\.weight$")
PROJ_INDEX = {"gate_proj": 0, "up_proj": 1, "down_proj": 2}


def _quant_params(config: dict, path: str):
    q = config.get("quantization")
    if not q:
        return None
    per = q.get(path)
    if isinstance(per, dict):
        return per
    if per is False:
        return None
    return {k: q[k] for k in ("group_size", "bits", "mode") if k in q}


def dense_expert_weight(weights: dict, config: dict, path: str) -> mx.array:
    """The float32 [E, N, K] weight of one stacked expert projection."""
    w = weights[f"{path}.weight"]
    if f"{path}.scales" not in weights:
        return w.astype(mx.float32)
    q = _quant_params(config, path) or {}
    return mx.dequantize(
        w, weights[f"{path}.scales"], weights.get(f"{path}.biases"),
        group_size=q.get("group_size"), bits=q.get("bits"), mode=q.get("mode", "affine"),
        dtype=mx.float32)


def parse_bits(text: str | None, fmt: str):
    if fmt == "fp4":
        if text not in (None, "4"):
            raise ValueError("--bits does not apply to --format fp4 (always 4)")
        return (4, 4, 4)
    if text is None:
        raise ValueError("--format trellis needs --bits (one value, or gate,up,down such as 6,2,3)")
    try:
        vals = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--bits must be integers like 4 or 6,2,3, got {text!r}") from None
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3 or not all(2 <= v <= 8 for v in vals):
        raise ValueError(f"--bits takes one or three values in 2..8 (gate,up,down), got {text!r}")
    return tuple(vals)


def convert(model_dir, out_dir, fmt: str = "fp4", bits: str | None = None,
            group_size: int | None = None, progress: bool = True) -> dict:
    """Convert; returns a summary {path: format description}."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if fmt not in ("fp4", "trellis"):
        raise ValueError(f"format must be 'fp4' or 'trellis', got {fmt!r}")
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{model_dir} has no config.json: not an mlx-lm model directory")
    files = sorted(model_dir.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} has no model*.safetensors")
    if out_dir.resolve() == model_dir.resolve():
        raise ValueError("OUT_DIR must differ from MODEL_DIR")
    bits_per_proj = parse_bits(bits, fmt)

    config = json.loads((model_dir / "config.json").read_text())
    weights = {}
    for f in files:
        weights.update(mx.load(str(f)))
    targets = sorted({m.group(1) for k in weights if (m := EXPERT_RE.match(k))})
    if not targets:
        raise ValueError(f"{model_dir} has no stacked expert projections (*.switch_mlp.*_proj)")

    quant = dict(config.get("quantization") or {})
    moe_cfg = {"format": fmt, "modules": {}}
    summary = {}
    for i, path in enumerate(targets):
        if progress:
            show_progress(i, len(targets), path)
        w = dense_expert_weight(weights, config, path)
        for suffix in ("weight", "scales", "biases", "global_scale"):
            weights.pop(f"{path}.{suffix}", None)
        b = bits_per_proj[PROJ_INDEX[path.rsplit(".", 1)[1]]]
        if fmt == "fp4":
            wq, s = mx.quantize(w, group_size=32, bits=4, mode="mxfp4")
            mx.eval(wq, s)
            weights[f"{path}.weight"], weights[f"{path}.scales"] = wq, s
            quant[path] = {"group_size": 32, "bits": 4, "mode": "mxfp4"}
            summary[path] = "mxfp4"
        else:
            from .formats import trellis

            gs = group_size or trellis.DEFAULT_GROUP_SIZE
            tw = trellis.quantize(w, b, group_size=gs, progress=False)
            for name in ("w", "scales", "grid", "su", "sv"):
                a = getattr(tw, name)
                if a is not None:
                    weights[f"{path}.trellis_{name}"] = a
            quant[path] = False  # mlx-lm leaves the module alone; mlx_moe.load fills it
            moe_cfg["modules"][path] = {"bits": b, "group_size": gs,
                                        "su": tw.su is not None, "sv": tw.sv is not None}
            summary[path] = f"trellis {b}-bit"
        del w
    if progress:
        show_progress(len(targets), len(targets), "done")

    if "group_size" not in quant:  # a float checkpoint: other layers stay float
        quant.update({"group_size": 32, "bits": 4, "mode": "mxfp4"} if fmt == "fp4" else
                     {"group_size": 64, "bits": 4})
    config["quantization"] = quant
    if "quantization_config" in config and isinstance(config["quantization_config"], dict):
        config["quantization_config"] = quant
    if fmt == "trellis":
        config["mlx_moe"] = moe_cfg

    out_dir.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.is_file() and not f.name.startswith("model") and f.name != "config.json":
            shutil.copy2(f, out_dir / f.name)
    # Shards of at most ~4 GB, named as mlx-lm names them.
    shards, cur, size = [], {}, 0
    for k in sorted(weights):
        n = weights[k].nbytes
        if cur and size + n > 4 << 30:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = weights[k], size + n
    shards.append(cur)
    for old in out_dir.glob("model*.safetensors"):
        old.unlink()
    index = {"metadata": {}, "weight_map": {}}
    for i, shard in enumerate(shards):
        name = ("model.safetensors" if len(shards) == 1
                else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
        mx.save_safetensors(str(out_dir / name), shard, metadata={"format": "mlx"})
        index["weight_map"].update({k: name for k in shard})
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m mlx_moe.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", help="local mlx-lm model directory (config.json + safetensors)")
    ap.add_argument("out_dir", help="where to write the converted model")
    ap.add_argument("--format", choices=["fp4", "trellis"], required=True)
    ap.add_argument("--bits", help="trellis bits: one value or gate,up,down (e.g. 6,2,3)")
    ap.add_argument("--group-size", type=int, help="trellis scale group size")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        summary = convert(args.model_dir, args.out_dir, args.format, args.bits, args.group_size,
                          progress=not args.quiet)
    except (ValueError, FileNotFoundError) as e:
        ap.error(str(e))
    print(f"converted {len(summary)} expert projections to {args.format}: {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Test-session settings.

MLX_MOE_TEST_DEVICE=cpu|gpu runs the whole suite on that device (default: MLX's default
device: the CPU on Linux, the GPU on a Mac or an NVIDIA machine with MLX's CUDA build)."""

import os

import mlx.core as mx

_device = os.environ.get("MLX_MOE_TEST_DEVICE", "").strip().lower()
if _device in ("cpu", "gpu"):
    mx.set_default_device(mx.cpu if _device == "cpu" else mx.gpu)
elif _device:
    raise ValueError(f"MLX_MOE_TEST_DEVICE must be 'cpu' or 'gpu', got {_device!r}")

"""Shared pieces of the GPU tests: loading with a device, precision and offload mode, images as arrays,
and the measurement file that `tools/gpu-check.sh` folds into `$OUT/gpu-check.json`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

DRY = os.environ.get("DIFUSI_GPU_CHECK_DRY") == "1"
"""CPU dry run of tools/gpu-check.sh: the tests run with device "cpu" so their code paths are exercised
without a GPU; tests that only mean something on CUDA are skipped (marker `cuda_only`)."""

MEASUREMENTS = os.environ.get("DIFUSI_GPU_MEASUREMENTS")
"""JSON file that collects every number the tests measured (pixel differences, peak memory)."""

CUDA = os.environ.get("DIFUSI_GPU_TEST_CUDA_DEVICE", "cuda")
"""The device of the `cuda_only` tests. Set DIFUSI_GPU_TEST_CUDA_DEVICE=cpu (with the dry run) to walk their code
on the CPU before a GPU session: their assertions about CUDA may then fail, but no call may crash."""



def compare_device() -> str:
    """The device the tests compare against the CPU: CUDA, or the CPU itself in the dry run."""
    return "cuda" if torch.cuda.is_available() and not DRY else "cpu"


def on_cuda() -> bool:
    return torch.device(CUDA).type == "cuda"


def reset_peak() -> None:
    """Start a peak-memory measurement from an empty cache (no-op off CUDA)."""
    if on_cuda():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_allocated() -> int:
    """Bytes of peak allocated CUDA memory since `reset_peak` (0 off CUDA)."""
    if not on_cuda():
        return 0
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def record(name: str, value: Any) -> None:
    """Store one measurement under `name` (read-modify-write: a killed run keeps what it measured so far)."""
    if not MEASUREMENTS:
        return
    path = Path(MEASUREMENTS)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = value
    path.write_text(json.dumps(data, indent=1, sort_keys=True))


def load(path: str | Path, device: str, precision: str = "fp32", offload: str = "none") -> Any:
    """`difusi.models.load_model` with a device, a precision and an offload mode."""
    from difusi.models import load_model

    return load_model(path, device=device, precision=precision, offload=offload)


def free(model: Any) -> None:
    """Drop a model's GPU memory now, so the next measurement starts from an empty card."""
    try:
        from difusi.models.loader import free_model

        free_model(model)
    except ImportError:
        pass
    del model
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def module_dtype(module: Any) -> torch.dtype:
    return next(module.parameters()).dtype


def pixels(result: Any) -> np.ndarray:
    """A job's images as one uint8 array [N, H, W, 3]."""
    return np.stack([np.asarray(image.image.convert("RGB"), dtype=np.uint8) for image in result.images])


def pixel_difference(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Max, mean and 99th-percentile absolute difference of two uint8 image stacks, in 1/255 units."""
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {"max": float(diff.max()), "mean": float(diff.mean()), "p99": float(np.percentile(diff, 99))}


def with_rng(params: Any, source: str) -> Any:
    """`params` with the `rng` field (noise source) set."""
    return params.replace(rng=source)


def tf32_state() -> str:
    """TF32 switches: CUDA fp32 differs from the CPU beyond rounding when convolutions or matmuls use TF32."""
    return (f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
            f"cuda.matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}")

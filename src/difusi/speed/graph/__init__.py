"""Compiled-graph UNet backends for the CPU (issue 18): which backend runs a job's UNet calls.

`unet_for(model, params)` returns a `UNetChoice` whose `unet` the pipeline's denoiser calls in place of `model.unet`,
with the same signature (`(x, t, encoder_hidden_states=..., added_cond_kwargs=...) -> object with .sample`), and the
warnings the job's result carries (e.g. a fallback to the torch path).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from difusi.errors import ParamError

BACKENDS = ("auto", "torch", "openvino", "onnx")


@dataclass
class UNetChoice:
    unet: Any
    """Called like `model.unet`."""
    backend: str
    """The backend that runs: "torch", "openvino" or "onnx"."""
    warnings: list[str] = field(default_factory=list)


def check_backend(name: str) -> None:
    """Raise ParamError("backend", ...) unless `name` is one of BACKENDS."""
    if name not in BACKENDS:
        raise ParamError("backend", f"must be one of {', '.join(BACKENDS)}, got {name!r}")


def unet_for(model: Any, params: Any) -> UNetChoice:
    """The UNet for this job; the torch module itself until a graph backend is chosen."""
    return UNetChoice(model.unet, "torch")

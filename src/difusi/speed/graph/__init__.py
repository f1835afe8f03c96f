"""Compiled-graph UNet backends for the CPU (issue 18): which backend runs a job's UNet calls.

`unet_for(model, params)` returns the callable the pipeline's denoiser calls in place of `model.unet`, with the
same signature (`(x, t, encoder_hidden_states=..., added_cond_kwargs=...) -> object with .sample`).
"""

from __future__ import annotations

from typing import Any

from difusi.errors import ParamError

BACKENDS = ("auto", "torch", "openvino", "onnx")


def check_backend(name: str) -> None:
    """Raise ParamError("backend", ...) unless `name` is one of BACKENDS."""
    if name not in BACKENDS:
        raise ParamError("backend", f"must be one of {', '.join(BACKENDS)}, got {name!r}")


def unet_for(model: Any, params: Any) -> Any:
    """The UNet callable for this job; the torch module itself until a graph backend is chosen."""
    return model.unet

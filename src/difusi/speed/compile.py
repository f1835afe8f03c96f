"""Opt-in `torch.compile` of the UNet (`--compile`): for GPUs, where it can pay; off by default everywhere.

On the 2-core CPU it did not pay (bench/cpu_speed.py: 0.81x the exact path after a 287 s cold compile), so it is
never switched on by itself. On CUDA, inductor fuses the UNet's pointwise work around the attention and
convolution kernels. Mode "max-autotune-no-cudagraphs" tunes matmul/conv choices without CUDA graphs, which would
pin input buffers and break the per-batch shapes and the DeepCache/ToMe patches.

Compilation is lazy (the first call compiles); the compiled kernels are kept on disk under
`$DIFUSI_CACHE_DIR/inductor` (torch's `TORCHINDUCTOR_CACHE_DIR`), so a second process warms up much faster. If
compiling fails (no compiler, an unsupported op, a torch without inductor), the UNet falls back to eager mode with
one warning and the job goes on: `--compile` never costs an image.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("difusi.speed")

COMPILE_MODE = "max-autotune-no-cudagraphs"


def inductor_cache_dir() -> Path:
    """Where inductor keeps compiled kernels: `inductor/` in difusi's cache folder (`difusi.models.hashing.cache_dir`:
    `$DIFUSI_CACHE_DIR`, else `$XDG_CACHE_HOME/difusi`, else `~/.cache/difusi`)."""
    from difusi.models.hashing import cache_dir

    return cache_dir() / "inductor"


class _CompiledForward:
    """The UNet's forward through torch.compile, falling back to the eager forward (for good) on the first error."""

    def __init__(self, model: Any, eager: Any, mode: str):
        self.model = model
        self.eager = eager
        self.compiled: Any = None
        self.failed = False
        self.warmup_seconds: float | None = None
        try:
            self.compiled = torch.compile(eager, mode=mode, dynamic=False)
        except Exception as error:  # noqa: BLE001  (any failure to set up compilation means: run eagerly)
            self._fall_back(error)

    def _fall_back(self, error: BaseException) -> None:
        self.failed = True
        self.model.compiled = False
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        log.warning("torch.compile failed (%s: %s); the UNet runs uncompiled", type(error).__name__, first_line[:200])

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed or self.compiled is None:
            return self.eager(*args, **kwargs)
        started = time.perf_counter() if self.warmup_seconds is None else None
        try:
            result = self.compiled(*args, **kwargs)
        except Exception as error:  # noqa: BLE001  (a compile error surfaces at the first call)
            self._fall_back(error)
            return self.eager(*args, **kwargs)
        if started is not None:
            self.warmup_seconds = time.perf_counter() - started
            log.info("torch.compile warm-up (first UNet call): %.1f s", self.warmup_seconds)
        return result


def compile_unet(model: Any) -> None:
    """Route `model.unet`'s forward through `torch.compile` (idempotent); `model.compiled` says whether the UNet
    runs compiled (False again after a fallback).

    The module itself stays in place (its parameters, hooks and the speed patches keep working); only its
    `forward` is replaced by a wrapper that compiles on the first call and falls back to eager with one
    warning if compilation fails then or now.
    """
    unet = model.unet
    if isinstance(unet.__dict__.get("forward"), _CompiledForward):
        model.compiled = True
        return
    cache = inductor_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    # Set, not setdefault: torch itself fills TORCHINDUCTOR_CACHE_DIR with /tmp/torchinductor_<user> when inductor's
    # cache is first looked at, which a reboot wipes; difusi's cache folder survives it.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    model.compiled = True
    unet.forward = _CompiledForward(model, unet.forward, COMPILE_MODE)


def compile_state(model: Any) -> _CompiledForward | None:
    """The compile wrapper on `model.unet` (for warm-up time and fallback state), None when not compiled."""
    forward = model.unet.__dict__.get("forward")
    return forward if isinstance(forward, _CompiledForward) else None

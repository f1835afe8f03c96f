"""Catching NaN/inf from a model early, so a broken checkpoint gives an error instead of a black image.

A NaN anywhere in a latent spreads through every later step and the VAE turns it into a black (or noise)
picture that would otherwise be saved as if it were a result. The check is one reduction per step, negligible
next to a network call.
"""

from __future__ import annotations

import torch

from difusi.errors import NumericalError


def ensure_finite(tensor: torch.Tensor | None, phase: str, step: int | None = None) -> None:
    """Raise NumericalError naming `phase` (and `step`) when `tensor` holds NaN or infinity."""
    if tensor is None or bool(torch.isfinite(tensor).all()):
        return
    bad = "NaN" if bool(torch.isnan(tensor).any()) else "infinite values"
    where = f"{phase} (step {step})" if step is not None else phase
    raise NumericalError(
        phase,
        f"the model produced {bad} during {where}, so the image would be blank; nothing was saved for this batch. "
        "The checkpoint may be broken or unstable in this precision, or the settings extreme (cfg_scale, eta, s_noise).",
        step,
    )

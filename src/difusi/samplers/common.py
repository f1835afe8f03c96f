"""Helpers every sampler shares: the ODE derivative, the ancestral split, sigma/option checks,
the default noise source and the per-step callback.

Notation follows Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models" (EDM): `x = x0 + sigma * n`, the denoiser `D(x, sigma)` estimates `x0`, and the
probability-flow ODE is `dx/dsigma = (x - D(x, sigma)) / sigma`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from difusi.errors import ParamError

Model = Callable[..., torch.Tensor]
NoiseSampler = Callable[[Any, Any], torch.Tensor]
Callback = Callable[[dict[str, Any]], None]


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """Probability-flow ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, eq. 3)."""
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0) -> tuple[Any, Any]:
    """Split a step sigma_from -> sigma_to into a deterministic part down to `sigma_down` and fresh noise
    of size `sigma_up`, with sigma_down**2 + sigma_up**2 == sigma_to**2.

    eta=1 adds exactly the noise the reverse SDE would (ancestral sampling, Ho et al. 2020); eta=0 is
    the ODE. The same split is DDIM's eta (Song et al. 2020) written in sigma space.
    """
    if not eta:
        return sigma_to, torch.zeros_like(torch.as_tensor(sigma_to))
    variance = sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2
    sigma_up = torch.minimum(torch.as_tensor(sigma_to), eta * torch.as_tensor(variance).clamp(min=0).sqrt())
    sigma_down = (sigma_to**2 - sigma_up**2).clamp(min=0).sqrt()
    return sigma_down, sigma_up


def sigma_batch(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The per-image sigma vector `[B]` the model is called with (docs/ARCHITECTURE.md contract 1)."""
    return sigma * x.new_ones([x.shape[0]])


def default_noise_sampler(x: torch.Tensor) -> NoiseSampler:
    """Fresh N(0, I) noise from torch's global generator; pipelines pass per-image samplers instead."""
    return lambda sigma, sigma_next: torch.randn_like(x)


def report(callback: Callback | None, x, i: int, sigma, sigma_hat, denoised) -> None:
    """Call the progress callback once per step.

    The callback is also the cancel mechanism: a pipeline that wants to stop raises
    `difusi.errors.Interrupted` from it, and the exception leaves the sampler untouched
    (no sampler catches exceptions).
    """
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


def check_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """Validate a schedule: 1-D, at least one step, strictly decreasing, finite, ending in 0."""
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ParamError("sigmas", "must be a 1-D tensor of at least 2 values (one step) ending in 0")
    if not bool(torch.isfinite(sigmas).all()):
        raise ParamError("sigmas", f"must be finite, got {sigmas.tolist()}")
    if float(sigmas[-1]) != 0.0:
        raise ParamError("sigmas", f"must end in 0, got last value {float(sigmas[-1])}")
    steps = sigmas[1:] - sigmas[:-1]
    bad = torch.nonzero(steps >= 0)
    if bad.numel():
        i = int(bad[0])
        raise ParamError(
            "sigmas",
            f"must be strictly decreasing; sigmas[{i + 1}]={float(sigmas[i + 1]):g} >= sigmas[{i}]={float(sigmas[i]):g}",
        )
    if float(sigmas[-2]) <= 0:
        raise ParamError("sigmas", "all values but the last must be positive")
    return sigmas


def check_nonnegative(**values: float) -> None:
    """Raise ParamError naming the first negative option (eta, s_noise, s_churn, ...)."""
    for name, value in values.items():
        if value is None or not math.isfinite(float(value)) or float(value) < 0:
            raise ParamError(name, f"must be a finite number >= 0, got {value!r}")


def churn_gamma(sigma: torch.Tensor, steps: int, s_churn: float, s_tmin: float, s_tmax: float) -> float:
    """EDM's stochastic churn (Karras et al. 2022, Algorithm 2): how much to raise sigma before a step."""
    if s_churn <= 0 or not (s_tmin <= float(sigma) <= s_tmax):
        return 0.0
    return min(s_churn / steps, 2**0.5 - 1)


def add_churn(x, sigma, gamma: float, s_noise: float, noise_sampler: NoiseSampler):
    """Raise the noise level of `x` from sigma to sigma_hat = sigma * (1 + gamma) with fresh noise."""
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        x = x + noise_sampler(sigma, sigma_hat) * s_noise * (sigma_hat**2 - sigma**2) ** 0.5
    return x, sigma_hat


def sigma_fn(t: torch.Tensor) -> torch.Tensor:
    """sigma from half-log-SNR time t = -log(sigma) (Lu et al. 2022 use lambda = -log sigma)."""
    return t.neg().exp()


def t_fn(sigma: torch.Tensor) -> torch.Tensor:
    """Half-log-SNR time t = -log(sigma) of a noise level."""
    return sigma.log().neg()

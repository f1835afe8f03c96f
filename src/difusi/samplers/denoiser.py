"""Turn a noise-prediction network into the denoiser D(x, sigma) the samplers call.

Stable Diffusion is a discrete-time VP model: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps. Dividing by
sqrt(abar_t) gives k-diffusion's variables x = x0 + sigma * eps with sigma_t = sqrt((1 - abar_t) / abar_t)
(Karras et al. 2022, sec. 2 and Appendix C.3). The network sees x * c_in (c_in = 1 / sqrt(sigma^2 + 1))
and the timestep t found from sigma by interpolating log-sigma between the table's 1000 entries.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from difusi.errors import ParamError


class DiscreteNoiseTable:
    """SD's training noise levels: scaled-linear betas (sqrt-space linear from beta_start to beta_end).

    `sigmas` is increasing in t (sigmas[0] ~ 0.0292, sigmas[999] ~ 14.61 for SD), stored in float64.
    """

    def __init__(self, beta_start: float = 0.00085, beta_end: float = 0.012, num_timesteps: int = 1000,
                 alphas_cumprod: torch.Tensor | None = None):
        if alphas_cumprod is None:
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
            alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.alphas_cumprod = alphas_cumprod.to(torch.float64)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous timestep for a sigma, linear in log-sigma between neighbouring table entries
        (clamped to [0, len - 1])."""
        sigma = torch.as_tensor(sigma)
        log_sigma = sigma.to(torch.float64).clamp(min=1e-30).log()
        high = torch.searchsorted(self.log_sigmas, log_sigma).clamp(1, len(self.sigmas) - 1)
        low = high - 1
        w = ((log_sigma - self.log_sigmas[low]) / (self.log_sigmas[high] - self.log_sigmas[low])).clamp(0, 1)
        return (low + w).to(sigma.dtype if sigma.is_floating_point() else torch.float64)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma at a (possibly fractional) timestep, interpolating log-sigma linearly."""
        t = torch.as_tensor(t, dtype=torch.float64)
        low = t.floor().long().clamp(0, len(self.sigmas) - 1)
        high = t.ceil().long().clamp(0, len(self.sigmas) - 1)
        w = t - t.floor()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()


Network = Callable[..., torch.Tensor]


def _per_image(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))


class EpsDenoiser:
    """D(x, sigma) = x - sigma * eps_theta(x * c_in, t(sigma)) for epsilon-prediction networks (SD 1.x, SD2-base, SDXL)."""

    def __init__(self, network: Network, table: DiscreteNoiseTable):
        self.network = network
        self.table = table

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        sigma = _per_image(sigma, x)
        c_in = 1 / (sigma**2 + 1) ** 0.5
        eps = self.network(x * c_in, self.table.sigma_to_t(sigma.flatten()), **cond)
        return x - eps * sigma


class VDenoiser:
    """D(x, sigma) = c_skip x + c_out v_theta(x * c_in, t) for v-prediction networks (SD 2.x 768-v;
    Salimans & Ho 2022; sigma_data = 1: c_skip = 1/(sigma^2+1), c_out = -sigma/sqrt(sigma^2+1))."""

    def __init__(self, network: Network, table: DiscreteNoiseTable):
        self.network = network
        self.table = table

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        sigma = _per_image(sigma, x)
        c_in = 1 / (sigma**2 + 1) ** 0.5
        v = self.network(x * c_in, self.table.sigma_to_t(sigma.flatten()), **cond)
        return x / (sigma**2 + 1) - v * sigma * c_in


def _concat(uncond: Any, cond: Any, key: str) -> Any:
    """Stack uncond before cond along the batch for one network call; recurse into nested dicts
    (SDXL's added_cond_kwargs); non-tensor values must agree."""
    if isinstance(cond, Mapping):
        if set(cond) != set(uncond):
            raise ParamError("cond", f"cond and uncond differ in keys under {key!r}: {sorted(cond)} vs {sorted(uncond)}")
        return {k: _concat(uncond[k], cond[k], f"{key}.{k}") for k in cond}
    if isinstance(cond, torch.Tensor):
        if cond.shape[1:] != uncond.shape[1:]:
            raise ParamError("cond", f"{key}: cond shape {tuple(cond.shape)} and uncond shape {tuple(uncond.shape)} "
                                     "differ; pad the prompts to the same chunk count first")
        return torch.cat([uncond, cond])
    if cond != uncond:
        raise ParamError("cond", f"{key}: non-tensor values differ between cond and uncond")
    return cond


class CFGDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022): D = D_u + cond_scale * (D_c - D_u), with cond and
    uncond evaluated in one batched call. cond_scale == 1 returns D_c and skips the uncond pass."""

    def __init__(self, inner: Callable[..., torch.Tensor]):
        self.inner = inner

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, Any],
                 uncond: Mapping[str, Any] | None = None, cond_scale: float = 1.0) -> torch.Tensor:
        if cond_scale == 1 or uncond is None:
            return self.inner(x, sigma, **cond)
        kwargs = {k: _concat(uncond[k], cond[k], k) for k in cond} if set(cond) == set(uncond) else None
        if kwargs is None:
            raise ParamError("cond", f"cond and uncond differ in keys: {sorted(cond)} vs {sorted(uncond)}")
        out = self.inner(torch.cat([x, x]), torch.cat([sigma, sigma]), **kwargs)
        out_uncond, out_cond = out.chunk(2)
        return out_uncond + (out_cond - out_uncond) * cond_scale

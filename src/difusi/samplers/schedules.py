"""Noise schedules: how `steps` sigmas are spread between sigma_max and sigma_min, always ending in 0.

Names follow A1111's "Schedule type" list; ComfyUI's scheduler names are aliases. Each schedule function
takes (n, sigma_min, sigma_max, table, rho, family) and returns a float64 tensor of n + 1 values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from difusi.errors import ParamError


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas.to(torch.float64), sigmas.new_zeros(1, dtype=torch.float64)])


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: uniform in sigma^(1/rho) from sigma_max to sigma_min, then 0."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((max_inv + ramp * (min_inv - max_inv)) ** rho)


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Uniform in log(sigma) (equal steps in half-log-SNR, as DPM-Solver recommends; Lu et al. 2022)."""
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp())


def polyexponential_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> torch.Tensor:
    """Log-sigma interpolated along a polynomial ramp (1 - i/(n-1))^rho: rho = 1 is Exponential (k-diffusion)."""
    ramp = torch.linspace(1, 0, n, dtype=torch.float64) ** rho
    return _append_zero((ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)).exp())


def uniform_sigmas(n: int, table) -> torch.Tensor:
    """Equal steps in the model's timestep from the last (999) to the first (0) table entry (A1111 "Uniform",
    k-diffusion's DiscreteSchedule.get_sigmas)."""
    t = torch.linspace(len(table.sigmas) - 1, 0, n, dtype=torch.float64)
    return _append_zero(table.t_to_sigma(t))


def normal_sigmas(n: int, sigma_min: float, sigma_max: float, table, sgm: bool = False) -> torch.Tensor:
    """Equal steps in timestep between t(sigma_max) and t(sigma_min) ("Normal"); "SGM Uniform" takes n of
    n + 1 equal steps and drops the last, as Stability's SGM code does."""
    start, end = float(table.sigma_to_t(torch.tensor(sigma_max))), float(table.sigma_to_t(torch.tensor(sigma_min)))
    t = torch.linspace(start, end, n + 1, dtype=torch.float64)[:-1] if sgm else torch.linspace(start, end, n, dtype=torch.float64)
    return _append_zero(table.t_to_sigma(t))


def simple_sigmas(n: int, table) -> torch.Tensor:
    """Every (1000/n)-th table sigma counting down from the top (ComfyUI/A1111 "Simple"; equals diffusers'
    "trailing" timestep spacing)."""
    stride = len(table.sigmas) / n
    return _append_zero(torch.stack([table.sigmas[-(1 + int(i * stride))] for i in range(n)]))


def ddim_sigmas(n: int, table) -> torch.Tensor:
    """DDIM's uniform timesteps 1, 1 + k, 1 + 2k, ... with k = 1000 // n, top first (CompVis/A1111 DDIM;
    diffusers "leading" spacing with steps_offset = 1). Exactly n values: A1111's loop can give n + 1 when
    1000 is not a multiple of n; difusi keeps the step count the user asked for."""
    stride = max(len(table.sigmas) // n, 1)
    if 1 + (n - 1) * stride > len(table.sigmas) - 1:
        raise ParamError("steps", f"the DDIM schedule has at most {len(table.sigmas) - 1} steps, got {n}")
    t = torch.tensor([1 + i * stride for i in range(n)])
    return _append_zero(table.sigmas[t.flip(0)])


def beta_sigmas(n: int, sigma_min: float, sigma_max: float, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    """Lee et al. 2024, "Beta Sampling is All You Need": sigma positions at Beta(alpha, beta) quantiles of
    1 - i/(n-1), mapped linearly onto [sigma_min, sigma_max] (A1111's formulation), which puts more steps
    near both ends."""
    from scipy import stats  # lazy: scipy.stats costs ~0.5 s to import and only this schedule needs it

    quantiles = stats.beta.ppf(1 - np.linspace(0, 1, n), alpha, beta)
    return _append_zero(torch.tensor(sigma_min + quantiles * (sigma_max - sigma_min), dtype=torch.float64))


def kl_optimal_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Sabour et al. 2024 (Align Your Steps, "KL optimal" closed form): uniform in arctan(sigma) from
    sigma_max to sigma_min, then 0 (ComfyUI's convention of n non-zero sigmas)."""
    w = torch.linspace(0, 1, n, dtype=torch.float64)
    return _append_zero(torch.tan(w * math.atan(sigma_min) + (1 - w) * math.atan(sigma_max)))


# Published Align Your Steps sigmas, 11 values for 11 steps (then 0) (Sabour et al. 2024, NVIDIA's AYS "how to" page).
AYS_SIGMAS = {
    "sd1": [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029],
    "sdxl": [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029],
}


def align_your_steps_sigmas(n: int, family: str = "sd1") -> torch.Tensor:
    """Sabour et al. 2024, "Align Your Steps": the optimised 10-step table for the model family, resampled
    to n sigmas by linear interpolation of log-sigma over an even grid, then 0. SD2 uses the SD1.5 table."""
    table = AYS_SIGMAS["sdxl" if family == "sdxl" else "sd1"]
    if n == 1:
        return _append_zero(torch.tensor(table[:1], dtype=torch.float64))
    if n == len(table):
        return _append_zero(torch.tensor(table, dtype=torch.float64))
    log_desc = np.log(table[::-1])
    resampled = np.exp(np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(table)), log_desc))[::-1].copy()
    return _append_zero(torch.tensor(resampled, dtype=torch.float64))


@dataclass(frozen=True)
class Schedule:
    """One schedule type: `name` is A1111's label ("Karras"), `key` its lower-case id ("karras"), `function`
    builds the sigmas (None for "Automatic"), `default_rho` is the rho it uses unless one is given."""

    name: str
    key: str
    function: Callable[..., torch.Tensor] | None
    aliases: tuple[str, ...] = ()
    default_rho: float | None = None
    need_inner_model: bool = False
    description: str = ""

    def to_a1111(self) -> dict:
        """The shape of one entry of A1111's GET /sdapi/v1/schedulers."""
        return {"name": self.key, "label": self.name, "aliases": list(self.aliases) or None,
                "default_rho": -1 if self.default_rho is None else self.default_rho,
                "need_inner_model": self.need_inner_model}


def _s(name, key, fn, aliases=(), rho=None, inner=False, description=""):
    return Schedule(name, key, fn, tuple(aliases), rho, inner, description)


SCHEDULES: list[Schedule] = [
    _s("Automatic", "automatic", None, description="the sampler's own default (A1111's choice)"),
    _s("Uniform", "uniform", lambda n, lo, hi, table, rho, family: uniform_sigmas(n, table), inner=True,
       description="equal timestep steps over the whole table"),
    _s("Karras", "karras", lambda n, lo, hi, table, rho, family: karras_sigmas(n, lo, hi, rho), rho=7.0,
       description="Karras et al. 2022, uniform in sigma^(1/rho)"),
    _s("Exponential", "exponential", lambda n, lo, hi, table, rho, family: exponential_sigmas(n, lo, hi),
       description="uniform in log sigma"),
    _s("Polyexponential", "polyexponential",
       lambda n, lo, hi, table, rho, family: polyexponential_sigmas(n, lo, hi, rho), rho=1.0,
       description="log sigma along a polynomial ramp"),
    _s("SGM Uniform", "sgm_uniform", lambda n, lo, hi, table, rho, family: normal_sigmas(n, lo, hi, table, sgm=True),
       aliases=("SGMUniform",), inner=True, description="Stability SGM: n of n+1 equal timestep steps"),
    _s("KL Optimal", "kl_optimal", lambda n, lo, hi, table, rho, family: kl_optimal_sigmas(n, lo, hi),
       description="uniform in arctan(sigma)"),
    _s("Align Your Steps", "align_your_steps",
       lambda n, lo, hi, table, rho, family: align_your_steps_sigmas(n, family),
       description="Sabour et al. 2024 table for the model family (SDXL table for SDXL, else SD1.5)"),
    _s("Simple", "simple", lambda n, lo, hi, table, rho, family: simple_sigmas(n, table), inner=True,
       description="every (1000/n)-th training sigma (diffusers 'trailing')"),
    _s("Normal", "normal", lambda n, lo, hi, table, rho, family: normal_sigmas(n, lo, hi, table), inner=True,
       description="equal timestep steps from t(sigma_max) to t(sigma_min)"),
    _s("DDIM", "ddim", lambda n, lo, hi, table, rho, family: ddim_sigmas(n, table), aliases=("ddim_uniform",),
       inner=True, description="DDIM's uniform timesteps 1 + k*(1000//n)"),
    _s("Beta", "beta", lambda n, lo, hi, table, rho, family: beta_sigmas(n, lo, hi), inner=False,
       description="Lee et al. 2024, Beta(0.6, 0.6) quantiles"),
    _s("Align Your Steps SDXL", "align_your_steps_sdxl",
       lambda n, lo, hi, table, rho, family: align_your_steps_sigmas(n, "sdxl"), description="the SDXL table"),
]


def _norm(name: str) -> str:
    return name.strip().lower().replace("-", " ").replace("_", " ")


def get_schedule(name: str | None) -> Schedule:
    """Find a schedule by A1111 label, lower-case key or alias (case-insensitive); None means Automatic."""
    if name is None or name == "":
        return SCHEDULES[0]
    wanted = _norm(str(name))
    for schedule in SCHEDULES:
        if wanted in {_norm(schedule.name), _norm(schedule.key), *(_norm(a) for a in schedule.aliases)}:
            return schedule
    valid = ", ".join(s.name for s in SCHEDULES)
    raise ParamError("scheduler", f"unknown schedule {name!r}; valid: {valid}")


def list_schedules() -> list[Schedule]:
    """Every schedule type, "Automatic" first."""
    return list(SCHEDULES)


def schedule_sigmas(schedule: str | Schedule, steps: int, table, rho: float | None = None,
                    family: str = "sd1") -> torch.Tensor:
    """`steps` + 1 sigmas (float64, ending in 0) of a concrete (not Automatic) schedule over the table's range."""
    schedule = schedule if isinstance(schedule, Schedule) else get_schedule(schedule)
    if schedule.function is None:
        raise ParamError("scheduler", "'Automatic' needs a sampler; use build_sigmas(sampler, ...)")
    check_steps(steps)
    rho = schedule.default_rho if rho is None else rho
    if rho is not None and not rho > 0:
        raise ParamError("rho", f"must be > 0, got {rho}")
    return schedule.function(int(steps), table.sigma_min, table.sigma_max, table, rho, family)


MAX_STEPS = 1000


def check_steps(steps) -> None:
    """Steps must be an integer in [1, 1000] (one model step per training timestep at most)."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= MAX_STEPS:
        raise ParamError("steps", f"must be an integer from 1 to {MAX_STEPS}, got {steps!r}")

"""Sampler names: A1111 names, A1111 aliases, ComfyUI names and legacy combined names ("DPM++ 2M Karras"),
each sampler's A1111 defaults, and `build_sigmas`, which resolves "Automatic" and the penultimate-sigma rule."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import torch

from difusi.errors import ParamError
from difusi.samplers import ddim, dpm, dpmpp, euler, lcm, multistep, restart
from difusi.samplers.schedules import Schedule, check_steps, get_schedule, list_schedules, schedule_sigmas


@dataclass(frozen=True)
class Sampler:
    """A sampler function plus what A1111 knows about it. Calling it calls the function with the
    registry's default options, overridden by any keyword options given (unknown options raise ParamError).
    The function's own keyword defaults equal `options`, so calling `function` directly gives the same result."""

    name: str
    function: Callable[..., torch.Tensor]
    aliases: tuple[str, ...] = ()
    default_schedule: str = "Uniform"
    schedule_override: str | None = None
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    discard_penultimate_sigma: bool = False
    uses_brownian_noise: bool = False
    stochastic: bool = False
    second_order: bool = False
    description: str = ""

    def __call__(self, model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                 **options: Any) -> torch.Tensor:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ParamError(unknown[0], f"not an option of sampler {self.name!r}; valid: {sorted(self.options) or 'none'}")
        merged = {**self.options, **options}
        return self.function(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                             noise_sampler=noise_sampler, **merged)

    def to_a1111(self) -> dict:
        """One entry of A1111's GET /sdapi/v1/samplers: {"name", "aliases", "options"}; options carries
        A1111's flags (scheduler, discard_next_to_last_sigma, brownian_noise, second_order, uses_ensd), all
        JSON-safe. The sampler's own keyword options and defaults are in `self.options`."""
        flags: dict[str, Any] = {}
        if self.default_schedule != "Uniform":
            flags["scheduler"] = get_schedule(self.default_schedule).key
        if self.discard_penultimate_sigma:
            flags["discard_next_to_last_sigma"] = True
        if self.uses_brownian_noise:
            flags["brownian_noise"] = True
        if self.second_order:
            flags["second_order"] = True
        if self.stochastic:
            flags["uses_ensd"] = True
        return {"name": self.name, "aliases": list(self.aliases), "options": flags}


_CHURN = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": float("inf"), "s_noise": 1.0}
_ANCESTRAL = {"eta": 1.0, "s_noise": 1.0}


def _sampler(name, function, aliases, default_schedule="Uniform", options=None, **flags) -> Sampler:
    return Sampler(name, function, tuple(aliases), default_schedule,
                   options=MappingProxyType(dict(options or {})), **flags)


# A1111's list (modules/sd_samplers_kdiffusion.py, sd_samplers_timesteps.py, sd_samplers_lcm.py) with its
# "Automatic" schedule per sampler; ComfyUI's names appended to the aliases.
SAMPLERS: list[Sampler] = [
    _sampler("DPM++ 2M", dpmpp.sample_dpmpp_2m, ["k_dpmpp_2m", "dpmpp_2m"], "Karras"),
    _sampler("DPM++ SDE", dpmpp.sample_dpmpp_sde, ["k_dpmpp_sde", "dpmpp_sde", "dpmpp_sde_gpu"], "Karras",
             {**_ANCESTRAL, "r": 0.5}, uses_brownian_noise=True, stochastic=True, second_order=True),
    _sampler("DPM++ 2M SDE", dpmpp.sample_dpmpp_2m_sde, ["k_dpmpp_2m_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu"],
             "Exponential", {**_ANCESTRAL, "solver_type": "midpoint"}, uses_brownian_noise=True, stochastic=True),
    _sampler("DPM++ 2M SDE Heun", dpmpp.sample_dpmpp_2m_sde_heun,
             ["k_dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu"],
             "Exponential", {**_ANCESTRAL, "solver_type": "heun"}, uses_brownian_noise=True, stochastic=True),
    _sampler("DPM++ 2S a", dpmpp.sample_dpmpp_2s_ancestral, ["k_dpmpp_2s_a", "dpmpp_2s_ancestral"], "Karras",
             _ANCESTRAL, stochastic=True, second_order=True),
    _sampler("DPM++ 3M SDE", dpmpp.sample_dpmpp_3m_sde, ["k_dpmpp_3m_sde", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu"],
             "Exponential", _ANCESTRAL, discard_penultimate_sigma=True, uses_brownian_noise=True, stochastic=True),
    _sampler("Euler a", euler.sample_euler_ancestral, ["k_euler_a", "k_euler_ancestral", "euler_ancestral"],
             options=_ANCESTRAL, stochastic=True),
    _sampler("Euler", euler.sample_euler, ["k_euler", "euler"], options=_CHURN),
    _sampler("LMS", multistep.sample_lms, ["k_lms", "lms"], options={"order": 4}),
    _sampler("Heun", euler.sample_heun, ["k_heun", "heun"], options=_CHURN, second_order=True),
    _sampler("DPM2", dpm.sample_dpm_2, ["k_dpm_2", "dpm_2"], "Karras", _CHURN,
             discard_penultimate_sigma=True, second_order=True),
    _sampler("DPM2 a", dpm.sample_dpm_2_ancestral, ["k_dpm_2_a", "dpm_2_ancestral"], "Karras", _ANCESTRAL,
             discard_penultimate_sigma=True, stochastic=True, second_order=True),
    _sampler("DPM fast", dpm.sample_dpm_fast, ["k_dpm_fast", "dpm_fast"], options=_ANCESTRAL, stochastic=True),
    _sampler("DPM adaptive", dpm.sample_dpm_adaptive, ["k_dpm_ad", "dpm_adaptive"],
             options={"order": 3, "rtol": 0.05, "atol": 0.0078, "h_init": 0.05, "pcoeff": 0.0, "icoeff": 1.0,
                      "dcoeff": 0.0, "accept_safety": 0.81, **_ANCESTRAL, "shared_steps": False}, stochastic=True),
    _sampler("Restart", restart.sample_restart, ["restart"], "Karras", {"s_noise": 1.0, "restart_list": None},
             stochastic=True, second_order=True),
    _sampler("DDIM", ddim.sample_ddim, ["ddim"], "DDIM", {"eta": 0.0, "s_noise": 1.0}),
    _sampler("PLMS", multistep.sample_plms, ["plms"], "DDIM"),
    _sampler("UniPC", multistep.sample_unipc, ["unipc", "uni_pc"], "DDIM",
             {"order": 3, "variant": "bh1", "use_corrector": True}, discard_penultimate_sigma=True),
    _sampler("UniPC bh2", multistep.sample_unipc_bh2, ["uni_pc_bh2"], "DDIM",
             {"order": 3, "variant": "bh2", "use_corrector": True}, discard_penultimate_sigma=True),
    _sampler("LCM", lcm.sample_lcm, ["k_lcm", "lcm"], options={"s_noise": 1.0}, stochastic=True),
]

# A1111's old aliases for combined names: k_dpmpp_2m_ka = "DPM++ 2M Karras", k_dpmpp_2m_sde_exp = "... Exponential".
_ALIAS_SUFFIXES = {"_ka": "Karras", "_karras": "Karras", "_exp": "Exponential", "_exponential": "Exponential"}


def _norm(name: str) -> str:
    return " ".join(name.strip().lower().split())


def _lookup() -> dict[str, Sampler]:
    table = {}
    for sampler in SAMPLERS:
        for key in (sampler.name, *sampler.aliases):
            table[_norm(key)] = sampler
    return table


_BY_NAME = _lookup()


def _exact(name: str) -> Sampler | None:
    return _BY_NAME.get(_norm(name))


def _combined(name: str) -> Sampler | None:
    """"DPM++ 2M Karras" -> DPM++ 2M with schedule Karras; also "k_dpmpp_2m_ka" style aliases."""
    norm = _norm(name)
    for schedule in list_schedules()[1:]:
        suffix = " " + schedule.name.lower()
        if norm.endswith(suffix) and (base := _exact(norm[: -len(suffix)])) is not None:
            return replace(base, schedule_override=schedule.name)
    for suffix, schedule_name in _ALIAS_SUFFIXES.items():
        if norm.endswith(suffix) and (base := _exact(norm[: -len(suffix)])) is not None:
            return replace(base, schedule_override=schedule_name)
    return None


def get_sampler(name: str | Sampler) -> Sampler:
    """Resolve any A1111 name, A1111 alias, ComfyUI name or legacy combined name (case-insensitive).

    Legacy names such as "DPM++ 2M Karras" return the base sampler with `schedule_override` set; it is used
    when the schedule asked for is "Automatic". Unknown names raise ParamError("sampler_name", ...) listing
    the valid names.
    """
    if isinstance(name, Sampler):
        return name
    if not isinstance(name, str) or not name.strip():
        raise ParamError("sampler_name", f"must be a sampler name, got {name!r}; valid: {_valid_names()}")
    sampler = _exact(name) or _combined(name)
    if sampler is None:
        raise ParamError("sampler_name", f"unknown sampler {name!r}; valid: {_valid_names()}")
    return sampler


def _valid_names() -> str:
    return ", ".join(s.name for s in SAMPLERS)


def list_samplers() -> list[Sampler]:
    """Every sampler in A1111's order, with aliases, default schedule and options."""
    return list(SAMPLERS)


def resolve_schedule(sampler: Sampler, schedule_name: str | None) -> Schedule:
    """The concrete schedule a (sampler, "Schedule type") pair uses: an explicit schedule wins, then a
    legacy name's override, then the sampler's A1111 default."""
    schedule = get_schedule(schedule_name)
    if schedule.function is None:
        schedule = get_schedule(sampler.schedule_override or sampler.default_schedule)
    return schedule


def build_sigmas(sampler: str | Sampler, schedule_name: str | None, steps: int, noise_table,
                 family: str = "sd1", rho: float | None = None) -> torch.Tensor:
    """The sigmas (float64, 1-D, steps + 1 values ending in 0) to sample `steps` steps with.

    Resolves "Automatic" (see `resolve_schedule`); samplers that discard the penultimate sigma (DPM2,
    DPM2 a, DPM++ 3M SDE, UniPC) get a steps + 1 schedule with its next-to-last value removed, as A1111.
    `family` ("sd1", "sd2", "sdxl") picks the Align Your Steps table.
    """
    sampler = get_sampler(sampler)
    check_steps(steps)
    schedule = resolve_schedule(sampler, schedule_name)
    if not sampler.discard_penultimate_sigma:
        return schedule_sigmas(schedule, steps, noise_table, rho, family)
    sigmas = schedule_sigmas(schedule, steps + 1, noise_table, rho, family)
    return torch.cat([sigmas[:-2], sigmas[-1:]])

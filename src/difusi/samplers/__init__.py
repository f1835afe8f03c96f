"""Sampling: k-diffusion-style sampler functions, noise schedules, the sampler registry, noise sources and
the denoiser wrappers that turn a network into D(x, sigma).

    from difusi.samplers import get_sampler, build_sigmas
    from difusi.samplers.denoiser import DiscreteNoiseTable
    sampler = get_sampler("DPM++ 2M Karras")
    sigmas = build_sigmas(sampler, "Automatic", 20, DiscreteNoiseTable())
    x0 = sampler(denoiser, noise * sigmas[0], sigmas, callback=on_step)

Progress and cancel: every sampler calls `callback({'x', 'i', 'sigma', 'sigma_hat', 'denoised'})` once per
step; to cancel, the callback raises `difusi.errors.Interrupted`, which propagates out of the sampler.
"""

from difusi.samplers.registry import Sampler, build_sigmas, get_sampler, list_samplers, resolve_schedule
from difusi.samplers.schedules import Schedule, get_schedule, list_schedules

__all__ = [
    "Sampler",
    "Schedule",
    "build_sigmas",
    "get_sampler",
    "get_schedule",
    "list_samplers",
    "list_schedules",
    "resolve_schedule",
]

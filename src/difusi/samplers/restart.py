"""Restart sampling (Xu et al. 2023, "Restart Sampling for Improving Generative Processes")."""

from __future__ import annotations

import torch

from difusi.samplers.common import check_nonnegative, check_sigmas, default_noise_sampler, report, sigma_batch, to_d
from difusi.samplers.schedules import karras_sigmas


def _automatic_plan(sigmas: torch.Tensor) -> tuple[torch.Tensor, dict[float, tuple[int, int, float]]]:
    """A1111's automatic Restart plan: with >= 20 steps, spend 9 steps (or steps // 4 twice, from 36 steps)
    on restarts from sigma ~0.1 back up to sigma ~2, and rebuild the main path as a Karras schedule over
    the same range with the remaining steps, so the model-evaluation budget stays about the same."""
    steps = len(sigmas) - 1
    if steps < 20:
        return sigmas, {}
    restart_steps, restart_times = (steps // 4, 2) if steps >= 36 else (9, 1)
    main = karras_sigmas(steps - restart_steps * restart_times, float(sigmas[-2]), float(sigmas[0]))
    return main.to(sigmas.dtype), {0.1: (restart_steps + 1, restart_times, 2.0)}


def _step_plan(sigmas, restart_list) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (sigma, sigma_next) pairs to integrate, with each restart segment inserted after the main step
    that reaches the sigma nearest its `min_sigma` key."""
    nearest = {int(torch.argmin((sigmas - key).abs())): value for key, value in restart_list.items()}
    plan = []
    for i in range(len(sigmas) - 1):
        plan.append((sigmas[i], sigmas[i + 1]))
        if i + 1 not in nearest:
            continue
        n_steps, times, max_sigma = nearest[i + 1]
        max_idx = int(torch.argmin((sigmas - max_sigma).abs()))
        if max_idx < i + 1:
            segment = karras_sigmas(n_steps, float(sigmas[i + 1]), float(sigmas[max_idx]))[:-1].to(sigmas.dtype)
            plan.extend(list(zip(segment[:-1], segment[1:], strict=True)) * times)
    return plan


@torch.no_grad()
def sample_restart(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                   s_noise=1.0, restart_list=None):
    """Restart sampling: Heun ODE steps, with segments that jump back up to a higher sigma by adding fresh
    noise (sqrt(sigma_hi**2 - sigma_lo**2)) and integrate down again, contracting accumulated errors.

    `restart_list` maps min_sigma -> (restart_steps, restart_times, max_sigma). None picks A1111's automatic
    plan (see `_automatic_plan`: with >= 20 steps the main path becomes a Karras schedule over the given
    range). Fewer than 20 steps and no list: plain Heun on the given sigmas. The callback fires once per
    Heun step, its `i` counting all steps including restarts.
    """
    check_sigmas(sigmas)
    check_nonnegative(s_noise=s_noise)
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x)
    if restart_list is None:
        sigmas, restart_list = _automatic_plan(sigmas)
    last_sigma = None
    for i, (sigma, sigma_next) in enumerate(_step_plan(sigmas, restart_list)):
        if last_sigma is not None and last_sigma < sigma:
            x = x + noise_sampler(last_sigma, sigma) * s_noise * (sigma**2 - last_sigma**2) ** 0.5
        denoised = model(x, sigma_batch(sigma, x), **extra_args)
        d = to_d(x, sigma, denoised)
        report(callback, x, i, sigma, sigma, denoised)
        x_euler = x + d * (sigma_next - sigma)
        if sigma_next == 0:
            x = x_euler
        else:
            d_next = to_d(x_euler, sigma_next, model(x_euler, sigma_batch(sigma_next, x), **extra_args))
            x = x + (d + d_next) / 2 * (sigma_next - sigma)
        last_sigma = sigma_next
    return x

"""DPM-Solver++ samplers (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models"): exponential integrators on the data prediction D(x, sigma) in t = -log(sigma),
plus their SDE variants (Lu et al. 2022, sec. 5 / Gonzalez et al. 2023 "SEEDS" for the SDE form).

With D frozen over a step from sigma to sigma_next (h = t_next - t), the exact ODE solution is
x_next = (sigma_next / sigma) * x - expm1(-h) * D; the multistep methods replace D by a linear (2M) or
quadratic (3M) extrapolation through earlier denoised values.
"""

from __future__ import annotations

import torch

from difusi.errors import ParamError
from difusi.samplers.common import (
    check_nonnegative,
    check_sigmas,
    default_noise_sampler,
    get_ancestral_step,
    report,
    sigma_batch,
    sigma_fn,
    t_fn,
    to_d,
)


def _first_order(x, sigma, sigma_next, denoised):
    """DPM-Solver++(1) = DDIM step: exact for a constant denoiser."""
    if sigma_next == 0:
        return denoised
    h = t_fn(sigma_next) - t_fn(sigma)
    return (sigma_next / sigma) * x - (-h).expm1() * denoised


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                              eta=1.0, s_noise=1.0):
    """DPM-Solver++(2S) single-step second order (Lu et al. 2022, Alg. 1) down to sigma_down, then
    ancestral noise of size sigma_up."""
    check_sigmas(sigmas)
    check_nonnegative(eta=eta, s_noise=s_noise)
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        denoised = model(x, sigma_batch(sigma, x), **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigmas[i + 1], eta)
        report(callback, x, i, sigma, sigma, denoised)
        if sigma_down == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        else:
            t, t_next = t_fn(sigma), t_fn(sigma_down)
            t_mid = t + (t_next - t) / 2
            x_mid = (sigma_fn(t_mid) / sigma) * x - (t - t_mid).expm1() * denoised
            denoised_mid = model(x_mid, sigma_batch(sigma_fn(t_mid), x), **extra_args)
            x = (sigma_down / sigma) * x - (t - t_next).expm1() * denoised_mid
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigma, sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                     eta=1.0, s_noise=1.0, r=0.5):
    """DPM-Solver++ SDE: a stochastic single-step second-order method (two evaluations per step at
    t and t + r*h, each sub-step ancestral), k-diffusion's "DPM++ SDE" built on Lu et al. 2022.
    Meant to be used with a Brownian-tree noise sampler so results barely change with the step count."""
    check_sigmas(sigmas)
    check_nonnegative(eta=eta, s_noise=s_noise)
    if not 0 < r <= 1:
        raise ParamError("r", f"must be in (0, 1], got {r}")
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma_batch(sigma, x), **extra_args)
        report(callback, x, i, sigma, sigma, denoised)
        if sigma_next == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_next - sigma)
            continue
        t, t_next = t_fn(sigma), t_fn(sigma_next)
        s = t + r * (t_next - t)
        # Sub-step 1: ancestral DPM-Solver++(1) from t to s.
        sd, su = get_ancestral_step(sigma, sigma_fn(s), eta)
        x_s = (sd / sigma) * x - (t - t_fn(sd)).expm1() * denoised
        x_s = x_s + noise_sampler(sigma, sigma_fn(s)) * s_noise * su
        denoised_s = model(x_s, sigma_batch(sigma_fn(s), x), **extra_args)
        # Sub-step 2: from t to t_next with the denoised values combined to second order.
        sd, su = get_ancestral_step(sigma, sigma_next, eta)
        fac = 1 / (2 * r)
        denoised_d = (1 - fac) * denoised + fac * denoised_s
        x = (sd / sigma) * x - (t - t_fn(sd)).expm1() * denoised_d
        x = x + noise_sampler(sigma, sigma_next) * s_noise * su
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """DPM-Solver++(2M) multistep second order (Lu et al. 2022, Alg. 2): one evaluation per step, the
    denoised value extrapolated linearly in t from the previous step. First step and the step to 0 are first order."""
    check_sigmas(sigmas)
    extra_args = extra_args or {}
    old_denoised = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma_batch(sigma, x), **extra_args)
        report(callback, x, i, sigma, sigma, denoised)
        if old_denoised is None or sigma_next == 0:
            x = _first_order(x, sigma, sigma_next, denoised)
        else:
            h = t_fn(sigma_next) - t_fn(sigma)
            r = (t_fn(sigma) - t_fn(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                        eta=1.0, s_noise=1.0, solver_type="midpoint"):
    """DPM-Solver++(2M) SDE: the multistep method on the SDE (noise fraction eta), with the second-order
    correction in its "midpoint" or "heun" form (Lu et al. 2022, sec. 4; the Heun weight is the exact
    phi-function integral). eta=0 gives a deterministic 2M variant."""
    check_sigmas(sigmas)
    check_nonnegative(eta=eta, s_noise=s_noise)
    if solver_type not in ("midpoint", "heun"):
        raise ParamError("solver_type", f"must be 'midpoint' or 'heun', got {solver_type!r}")
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x)
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma_batch(sigma, x), **extra_args)
        report(callback, x, i, sigma, sigma, denoised)
        if sigma_next == 0:
            x = denoised
        else:
            h = t_fn(sigma_next) - t_fn(sigma)
            eta_h = eta * h
            phi = (-h - eta_h).expm1().neg()
            x = (sigma_next / sigma) * (-eta_h).exp() * x + phi * denoised
            if old_denoised is not None:
                slope = (denoised - old_denoised) * (h / h_last)
                weight = 0.5 * phi if solver_type == "midpoint" else phi / (-h - eta_h) + 1
                x = x + weight * slope
            if eta:
                x = x + noise_sampler(sigma, sigma_next) * sigma_next * (-2 * eta_h).expm1().neg().sqrt() * s_noise
            h_last = h
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                             eta=1.0, s_noise=1.0, solver_type="heun"):
    """DPM-Solver++(2M) SDE with the Heun form of the second-order correction (A1111's "DPM++ 2M SDE Heun")."""
    return sample_dpmpp_2m_sde(model, x, sigmas, extra_args, callback, disable, noise_sampler,
                               eta=eta, s_noise=s_noise, solver_type=solver_type)


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                        eta=1.0, s_noise=1.0):
    """DPM-Solver++(3M) SDE: third-order multistep on the SDE (quadratic extrapolation of the denoised
    values through the last three steps). eta=0 gives the deterministic DPM-Solver++(3M)."""
    check_sigmas(sigmas)
    check_nonnegative(eta=eta, s_noise=s_noise)
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x)
    denoised_1 = denoised_2 = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma_batch(sigma, x), **extra_args)
        report(callback, x, i, sigma, sigma, denoised)
        h = None
        if sigma_next == 0:
            x = denoised
        else:
            h = t_fn(sigma_next) - t_fn(sigma)
            h_eta = h * (eta + 1)
            x = (-h_eta).exp() * x + (-h_eta).expm1().neg() * denoised
            phi_2 = (-h_eta).expm1() / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
            if eta:
                x = x + noise_sampler(sigma, sigma_next) * sigma_next * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x

"""Euler, Euler ancestral and Heun: the EDM family (Karras et al. 2022, "Elucidating the Design Space
of Diffusion-Based Generative Models", Algorithms 1 and 2)."""

from __future__ import annotations

import torch

from difusi.samplers.common import (
    add_churn,
    check_nonnegative,
    check_sigmas,
    churn_gamma,
    default_noise_sampler,
    get_ancestral_step,
    report,
    sigma_batch,
    to_d,
)


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                 s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Euler's method on the probability-flow ODE, with EDM's optional churn (Karras et al. 2022, Alg. 2).

    First order. With s_churn > 0 each step within [s_tmin, s_tmax] first re-noises x to a higher
    sigma_hat, drawing that noise from `noise_sampler`.
    """
    check_sigmas(sigmas)
    check_nonnegative(s_churn=s_churn, s_noise=s_noise)
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x)
    steps = len(sigmas) - 1
    for i in range(steps):
        gamma = churn_gamma(sigmas[i], steps, s_churn, s_tmin, s_tmax)
        x, sigma_hat = add_churn(x, sigmas[i], gamma, s_noise, noise_sampler)
        denoised = model(x, sigma_batch(sigma_hat, x), **extra_args)
        report(callback, x, i, sigmas[i], sigma_hat, denoised)
        x = x + to_d(x, sigma_hat, denoised) * (sigmas[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                           eta=1.0, s_noise=1.0):
    """Ancestral Euler: an Euler step down to sigma_down, then fresh noise of size sigma_up
    (see `get_ancestral_step`; Ho et al. 2020 ancestral sampling in Karras et al. 2022's sigma space)."""
    check_sigmas(sigmas)
    check_nonnegative(eta=eta, s_noise=s_noise)
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigma_batch(sigmas[i], x), **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        report(callback, x, i, sigmas[i], sigmas[i], denoised)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Heun's second-order method (Karras et al. 2022, Algorithm 1/2): Euler predictor, trapezoidal
    corrector; the last step to sigma = 0 is a plain Euler step (the corrector would divide by 0)."""
    check_sigmas(sigmas)
    check_nonnegative(s_churn=s_churn, s_noise=s_noise)
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x)
    steps = len(sigmas) - 1
    for i in range(steps):
        gamma = churn_gamma(sigmas[i], steps, s_churn, s_tmin, s_tmax)
        x, sigma_hat = add_churn(x, sigmas[i], gamma, s_noise, noise_sampler)
        denoised = model(x, sigma_batch(sigma_hat, x), **extra_args)
        d = to_d(x, sigma_hat, denoised)
        report(callback, x, i, sigmas[i], sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
            continue
        x_euler = x + d * dt
        d_next = to_d(x_euler, sigmas[i + 1], model(x_euler, sigma_batch(sigmas[i + 1], x), **extra_args))
        x = x + (d + d_next) / 2 * dt
    return x

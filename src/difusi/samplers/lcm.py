"""LCM sampling (Luo et al. 2023, "Latent Consistency Models: Synthesizing High-Resolution Images with
Few-Step Inference", Alg. 1 multistep consistency sampling)."""

from __future__ import annotations

import torch

from difusi.samplers.common import check_nonnegative, check_sigmas, default_noise_sampler, report, sigma_batch


@torch.no_grad()
def sample_lcm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, s_noise=1.0):
    """Multistep consistency sampling: jump to the model's clean estimate, then re-noise it with fresh
    noise to the next sigma. Built for consistency-distilled models (few steps); with an ordinary denoiser
    the result is biased towards the data mean because D(x, sigma) is a posterior mean, not a sample."""
    check_sigmas(sigmas)
    check_nonnegative(s_noise=s_noise)
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigma_batch(sigmas[i], x), **extra_args)
        report(callback, x, i, sigmas[i], sigmas[i], denoised)
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * s_noise
    return x

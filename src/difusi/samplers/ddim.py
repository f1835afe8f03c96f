"""DDIM (Song et al. 2020, "Denoising Diffusion Implicit Models") in sigma space."""

from __future__ import annotations

import torch

from difusi.samplers.euler import sample_euler_ancestral


@torch.no_grad()
def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                eta=0.0, s_noise=1.0):
    """DDIM with its `eta`, written for k-diffusion variables x = x_vp / sqrt(alpha_bar).

    Dividing DDIM's update (Song et al. 2020, eq. 12) by sqrt(alpha_bar_prev) gives exactly an ancestral
    Euler step: with sigma = sqrt((1 - alpha_bar) / alpha_bar), DDIM's sigma_t(eta)/sqrt(alpha_bar_prev)
    equals `get_ancestral_step`'s sigma_up, and the deterministic part lands on sigma_down. So eta=0 is
    Euler on the probability-flow ODE (Karras et al. 2022, sec. 3) and eta=1 is DDPM-like ancestral
    sampling. A1111's default is eta=0 with the "DDIM" (uniform timestep) schedule.
    """
    return sample_euler_ancestral(model, x, sigmas, extra_args, callback, disable, noise_sampler,
                                  eta=eta, s_noise=s_noise)

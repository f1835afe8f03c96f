"""Cross-check against diffusers' schedulers (the project's reference implementation).

Both sides get the same epsilon network and the same sigmas; the network is the exact Gaussian-mixture
denoiser written as an SD-style eps-predictor, so this also exercises `EpsDenoiser` and the noise table.
Tolerance: max |difference| <= 2e-5 on samples of scale ~3 (diffusers keeps its sigmas in float32, which
bounds agreement at ~1e-6 relative per step).
"""

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from difusi.samplers import get_sampler
from difusi.samplers.denoiser import EpsDenoiser

from .conftest import gaussian

TOLERANCE = 2e-5
SD_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
STEPS = 12


def eps_network(mixture, table):
    """An SD-style eps network over 2-D 'latents' shaped [B, 2, 1, 1]: input x * c_in and timestep t."""

    def network(x_in, t):
        sigma = table.t_to_sigma(torch.as_tensor(t, dtype=torch.float64)).reshape(-1, 1)
        x = x_in.reshape(-1, 2) * (sigma**2 + 1) ** 0.5
        return ((x - mixture.denoise(x, sigma.flatten())) / sigma).reshape(x_in.shape)

    return network


def run_diffusers(scheduler, network, x_T, step_kwargs=None):
    """The standard diffusers loop; VP schedulers (init_noise_sigma == 1) start from x_T / sqrt(sigma_0^2 + 1)."""
    vp = float(scheduler.init_noise_sigma) == 1.0
    alpha_bar_0 = float(scheduler.alphas_cumprod[int(scheduler.timesteps[0])])
    x = x_T * alpha_bar_0**0.5 if vp else x_T.clone()
    for i, t in enumerate(scheduler.timesteps):
        x_in = scheduler.scale_model_input(x, t)
        kwargs = step_kwargs(i) if step_kwargs else {}
        x = scheduler.step(network(x_in, t.reshape(1)), t, x, **kwargs).prev_sample
    return x


def run_ours(name, network, table, sigmas, x_T, **options):
    model = EpsDenoiser(network, table)
    return get_sampler(name)(model, x_T.clone(), sigmas, **options)


def vp_sigmas(table, timesteps):
    """k-diffusion sigmas for a VP scheduler's integer timesteps, ending at 0 (set_alpha_to_one)."""
    return torch.cat([table.sigmas[torch.as_tensor(timesteps).long()], torch.zeros(1, dtype=torch.float64)])


@pytest.fixture
def x_T():
    return gaussian((8, 2, 1, 1), 0) * 14.6


@pytest.fixture
def network(mixture, table):
    return eps_network(mixture, table)


@pytest.mark.parametrize(
    ("name", "scheduler_cls", "config"),
    [
        ("Euler", EulerDiscreteScheduler, {"timestep_spacing": "trailing"}),
        ("Heun", HeunDiscreteScheduler, {"timestep_spacing": "trailing"}),
        ("LMS", LMSDiscreteScheduler, {"timestep_spacing": "trailing"}),
        ("DPM2", KDPM2DiscreteScheduler, {"timestep_spacing": "trailing"}),
    ],
)
def test_deterministic_k_samplers_match_diffusers(name, scheduler_cls, config, network, table, x_T):
    scheduler = scheduler_cls(**SD_CONFIG, **config)
    scheduler.set_timesteps(STEPS)
    sigmas = torch.unique_consecutive(scheduler.sigmas.to(torch.float64))
    assert len(sigmas) == STEPS + 1
    ours = run_ours(name, network, table, sigmas, x_T)
    theirs = run_diffusers(scheduler, network, x_T)
    assert (ours - theirs).abs().max() < TOLERANCE


@pytest.mark.parametrize(
    ("name", "scheduler_cls"),
    [("Euler a", EulerAncestralDiscreteScheduler), ("DPM2 a", KDPM2AncestralDiscreteScheduler)],
)
def test_ancestral_samplers_match_diffusers_with_the_same_noise(name, scheduler_cls, network, table, x_T):
    scheduler = scheduler_cls(**SD_CONFIG, timestep_spacing="trailing")
    scheduler.set_timesteps(STEPS)
    sigmas = torch.unique_consecutive(scheduler.sigmas.to(torch.float64))
    ours_gen, theirs_gen = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    noise = lambda s, sn: torch.randn(x_T.shape, generator=ours_gen, dtype=x_T.dtype)  # noqa: E731
    ours = run_ours(name, network, table, sigmas, x_T, noise_sampler=noise)
    theirs = run_diffusers(scheduler, network, x_T, lambda i: {"generator": theirs_gen})
    assert (ours - theirs).abs().max() < TOLERANCE


def test_dpmpp_2m_matches_dpm_solver_multistep(network, table, x_T):
    scheduler = DPMSolverMultistepScheduler(**SD_CONFIG)  # dpmsolver++, order 2, midpoint, final sigma 0
    scheduler.set_timesteps(STEPS)
    sigmas = scheduler.sigmas.to(torch.float64)
    ours = run_ours("DPM++ 2M", network, table, sigmas, x_T)
    theirs = run_diffusers(scheduler, network, x_T)
    assert (ours - theirs).abs().max() < TOLERANCE


@pytest.mark.parametrize(("eta", "seed"), [(0.0, 0), (1.0, 3)])
def test_ddim_matches_diffusers_ddim(eta, seed, network, table, x_T):
    scheduler = DDIMScheduler(**SD_CONFIG, clip_sample=False, set_alpha_to_one=True, steps_offset=1, timestep_spacing="leading")
    scheduler.set_timesteps(STEPS)
    noises = [gaussian(x_T.shape, seed + i) for i in range(STEPS)]
    calls = iter(noises)
    ours = run_ours("DDIM", network, table, vp_sigmas(table, scheduler.timesteps), x_T, eta=eta,
                    noise_sampler=lambda s, sn: next(calls))
    theirs = run_diffusers(scheduler, network, x_T, lambda i: {"eta": eta, "variance_noise": noises[i]})
    assert (ours - theirs).abs().max() < TOLERANCE


def test_plms_matches_diffusers_pndm(network, table, x_T):
    scheduler = PNDMScheduler(**SD_CONFIG, set_alpha_to_one=True, skip_prk_steps=True, steps_offset=1)
    scheduler.set_timesteps(STEPS)
    sigmas = vp_sigmas(table, scheduler._timesteps[::-1].copy())
    ours = run_ours("PLMS", network, table, sigmas, x_T)
    theirs = run_diffusers(scheduler, network, x_T)
    assert (ours - theirs).abs().max() < TOLERANCE


# bh1 is checked by the exact-oracle order test only: diffusers' bh1 returns NaN with a zero final sigma
# (B(h) = -inf times a zero correction at the last step).
@pytest.mark.parametrize(("order", "variant"), [(2, "bh2"), (3, "bh2")])
def test_unipc_matches_diffusers(order, variant, network, table, x_T):
    scheduler = UniPCMultistepScheduler(**SD_CONFIG, solver_order=order, solver_type=variant)
    scheduler.set_timesteps(STEPS)
    sigmas = scheduler.sigmas.to(torch.float64)
    ours = run_ours("UniPC", network, table, sigmas, x_T, order=order, variant=variant)
    theirs = run_diffusers(scheduler, network, x_T)
    assert torch.isfinite(theirs).all()
    assert (ours - theirs).abs().max() < TOLERANCE
